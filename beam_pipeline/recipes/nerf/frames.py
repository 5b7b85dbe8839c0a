"""Per-frame pieces of the `nerf` recipe's subject folder, in AD-NeRF's formats (no Beam in here).

AD-NeRF (and RAD-NeRF / ER-NeRF after it) prepares one video with `process_video.py`: 68-point `.lms`
text files, a background image `bc.jpg` chosen per pixel from the frame where the person is farthest
away, `gt_imgs` (background replaced by `bc`), `torso_imgs` (RGBA, head removed, neck filled upwards) and
`transforms_{train,val}.json` with camera-to-world poses. The functions here make the same files from one
frame at a time, so the pipeline never needs a subject's frames together: the background is a running
per-pixel maximum that merges across clips in any order (`Background`).

Parsing maps use the 19-class face-parsing labels (0 background, 1 skin, 2/3 brows, 4/5 eyes, 6 glasses,
7/8 ears, 9 earring, 10 nose, 11 mouth, 12/13 lips, 14 neck, 15 necklace, 16 cloth, 17 hair, 18 hat),
grouped into head, neck and torso as AD-NeRF's face-parsing step colours them.
"""
from __future__ import annotations

import dataclasses
import functools
import io
import math
from typing import Dict, List, Optional, Sequence, Union

import cv2
import numpy as np
from scipy import ndimage

HEAD_CLASSES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 17, 18)  # AD-NeRF paints these red (head)
NECK_CLASSES = (14, 15)  # green
TORSO_CLASSES = (16,)  # blue; 0 is background (white)

MIN_BACKGROUND_DISTANCE = 5.0  # px from the person: nearer pixels of bc.jpg are filled from farther ones
# Below this frame diagonal (px) a float32 distance squared is within 0.25 of its whole number (2 x 2^-24 x d^2).
EXACT_CV2_DIAGONAL = 2048
# AD-NeRF's fill lengths, in pixels of its 512 px frames (scaled to other sizes):
TORSO_FILL_PX = 8  # the torso's top row copied upwards this far where the head sits on it
NECK_FILL_PX = 48  # the neck's top row copied upwards this far under the removed head
NECK_PUSH_DOWN = 4  # the neck colour is taken this far below its top edge (the edge itself is often chin)
NECK_DILATION = 3  # the neck is first grown this far up and down
FILL_REFERENCE_PX = 512
FILL_DARKENING = 0.98  # each filled row up is this much darker (AD-NeRF's shading of the filled neck)
FILL_BLUR_SIGMA = 4.0  # the filled neck is blurred 5 x 5 with this sigma (the original passes BORDER_DEFAULT, 4)

MEDIAPIPE_VERTICAL_FOV = 63.0  # degrees: the perspective camera MediaPipe's face geometry assumes
CM_PER_UNIT = 100.0  # poses are written in metres (AD-NeRF's tracked heads sit ~0.5-0.8 units away)


def classes_mask(labels: np.ndarray, classes: Sequence[int]) -> np.ndarray:
  """Bool (H, W): the pixels of a uint8 label map in `classes` (a table look-up: np.isin is several times slower)."""
  return cv2.LUT(labels, _class_table(tuple(classes))).view(bool)


@functools.lru_cache(maxsize=None)
def _class_table(classes: tuple) -> np.ndarray:
  table = np.zeros(256, np.uint8)
  table[list(classes)] = 1
  return table


# ----------------------------------------------------------------------------- landmarks

def lms_text(points: np.ndarray) -> bytes:
  """A (68, 2) landmark array as AD-NeRF writes `<i>.lms` (np.savetxt with '%f': 'x y' per line)."""
  buffer = io.BytesIO()
  np.savetxt(buffer, np.asarray(points, np.float64).reshape(68, 2), '%f')
  return buffer.getvalue()


def read_lms(data: bytes) -> np.ndarray:
  return np.loadtxt(io.BytesIO(data), dtype=np.float64).reshape(-1, 2)


def face_rect(lms: np.ndarray, width: int, height: int) -> List[int]:
  """AD-NeRF's `face_rect` (x, y, w, h) around the 68 landmarks: 1.5 x the half width, from the nose bridge
  to 1.15 x the chin, clamped to the frame."""
  min_x, max_x = float(np.min(lms[:, 0])), float(np.max(lms[:, 0]))
  cx, cy = int((min_x + max_x) / 2.0), int(lms[27, 1])
  half_w, half_h = int((max_x - cx) * 1.5), int((lms[8, 1] - cy) * 1.15)
  x, y = max(cx - half_w, 0), max(cy - half_h, 0)
  return [x, y, min(width - 1 - x, 2 * half_w), min(height - 1 - y, 2 * half_h)]


# ----------------------------------------------------------------------------- background (bc.jpg)

def foreground_distance(labels: np.ndarray) -> np.ndarray:
  """(H, W) float32 Euclidean distance of each pixel to the nearest non-background pixel (0 on the person).

  A frame with no person at all is background everywhere: every pixel gets the frame's diagonal.
  """
  background = labels == 0
  if background.all():
    return np.full(labels.shape, float(np.hypot(*labels.shape)), np.float32)
  if np.hypot(*labels.shape) >= EXACT_CV2_DIAGONAL:
    return ndimage.distance_transform_edt(background).astype(np.float32)
  # OpenCV's exact transform is a few times faster than scipy's (it runs on every frame), but its float32 result
  # varies in the last bit from call to call; a squared distance is a whole number, so rounding it gives exactly
  # scipy's result every time, and ties between frames stay ties. In float32, in place: below this diagonal the
  # square is under 2^22, where float32 rounds it by at most 1/8 more, so it rounds to the same whole number as
  # in float64, and a float32 square root of it is float64's rounded (2 x 24 + 2 <= 53 bits).
  distance = cv2.distanceTransform(background.view(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
  np.multiply(distance, distance, out=distance)
  np.rint(distance, out=distance)
  return np.sqrt(distance, out=distance)


@dataclasses.dataclass
class Background:
  """Per pixel, the colour of the frame where it lay farthest from the person so far (AD-NeRF's
  `extract_background`, as a running maximum).

  Ties go to the earlier frame (`time`, seconds in the source), as `np.argmax` over frames in time order
  does, so merging partial backgrounds of clips in any order gives what one pass over all frames gives.
  """
  distance: np.ndarray  # (H, W) float32; -1 where no frame was added
  colour: np.ndarray  # (H, W, 3) uint8
  time: np.ndarray  # (H, W) float64, the chosen frame's time; inf where none

  @classmethod
  def empty(cls, size: int) -> 'Background':
    return cls(np.full((size, size), -1.0, np.float32), np.zeros((size, size, 3), np.uint8),
               np.full((size, size), np.inf, np.float64))

  def add(self, image: np.ndarray, distance: np.ndarray, time: float) -> None:
    """One frame (RGB) with its foreground distance; frames may come in any order."""
    self._take(distance, image, time)

  def merge(self, other: 'Background') -> 'Background':
    self._take(other.distance, other.colour, other.time)
    return self

  def _take(self, distance: np.ndarray, colour: np.ndarray, time: Union[float, np.ndarray]) -> None:
    """In place (this runs on every frame); `time` is a frame's (a number) or a partial background's (H, W)."""
    better = (distance > self.distance) | ((distance == self.distance) & (time < self.time))
    np.copyto(self.distance, distance, where=better)
    self.colour = cv2.copyTo(colour, better.view(np.uint8), self.colour)
    np.copyto(self.time, time, where=better)

  def to_arrays(self, prefix: str) -> Dict[str, np.ndarray]:
    return {f'{prefix}_distance': self.distance, f'{prefix}_colour': self.colour, f'{prefix}_time': self.time}

  @classmethod
  def from_arrays(cls, arrays: dict, prefix: str) -> 'Background':
    return cls(np.array(arrays[f'{prefix}_distance'], np.float32), np.array(arrays[f'{prefix}_colour'], np.uint8),
               np.array(arrays[f'{prefix}_time'], np.float64))

  def image(self) -> np.ndarray:
    """bc.jpg's pixels (RGB): the kept colour where it lay more than 5 px from the person, elsewhere the
    colour of the nearest such pixel. Black when no pixel ever was that far (the person fills every frame)."""
    reliable = self.distance > MIN_BACKGROUND_DISTANCE
    if not reliable.any():
      return np.zeros_like(self.colour)
    _, (rows, cols) = ndimage.distance_transform_edt(~reliable, return_indices=True)
    return self.colour[rows, cols]


# ----------------------------------------------------------------------------- gt_imgs, torso_imgs

def gt_image(image: np.ndarray, labels: np.ndarray, bc: np.ndarray) -> np.ndarray:
  """The frame with its background pixels replaced by bc's (AD-NeRF's gt_imgs)."""
  return cv2.copyTo(bc, (labels == 0).view(np.uint8), image.copy())


def head_image(gt: np.ndarray, labels: np.ndarray, bc: np.ndarray) -> np.ndarray:
  """The gt image with everything but the head replaced by bc's pixels (AD-NeRF's head_imgs, which its
  HeadNeRF trains on; its com_imgs are the gt images)."""
  return cv2.copyTo(gt, classes_mask(labels, HEAD_CLASSES).view(np.uint8), bc.copy())


def _fill_upwards(target: np.ndarray, source: np.ndarray, part: np.ndarray, head: np.ndarray, length: int,
                  push_down: int, darkening: float) -> np.ndarray:
  """For each column whose topmost `part` pixel has the head right above it, copy that pixel's colour
  (taken up to `push_down` px lower, inside the part) upwards over `length` rows, each row `darkening`
  times the one below.
  Returns the mask of filled pixels."""
  filled = np.zeros(part.shape, bool)
  by_column = cv2.transpose(part.view(np.uint8))  # (W, H): a column per row, so that its scans run along memory
  counts = cv2.reduce(by_column, 1, cv2.REDUCE_SUM, dtype=cv2.CV_32S)[:, 0]
  columns = np.flatnonzero(counts)
  tops = by_column[columns].argmax(axis=1)  # each column's topmost part pixel
  under_head = (tops > 0) & head[np.maximum(tops - 1, 0), columns]
  columns, tops = columns[under_head], tops[under_head] + np.minimum(counts[columns[under_head]] - 1, push_down)
  if not len(columns):
    return filled
  colours = source[tops, columns].astype(np.float64)  # (m, 3)
  steps = np.arange(length + 1)
  rows = tops[None, :] - steps[:, None]  # (L, m)
  shaded = colours[None] * (darkening ** steps)[:, None, None]  # (L, m, 3)
  inside = rows >= 0
  cols = np.broadcast_to(columns[None, :], rows.shape)
  target[rows[inside], cols[inside]] = shaded[inside].astype(np.uint8)
  filled[rows[inside], cols[inside]] = True
  return filled


def torso_image(gt: np.ndarray, labels: np.ndarray, bc: np.ndarray) -> np.ndarray:
  """(H, W, 4) RGBA torso without the head, as AD-NeRF's `extract_torso_and_gt`: the head is replaced by
  the background, the torso's and the (vertically dilated) neck's top rows under the head are copied
  upwards (over 8 and 52 rows, darkening), the filled neck is blurred, and everything outside neck, torso and the
  filled pixels is transparent black. The lengths are AD-NeRF's at 512 px, scaled to the frame's height.
  (The original wraps filled rows above the image top round to the bottom by negative indexing; here they
  are dropped.)"""
  head = classes_mask(labels, HEAD_CLASSES)
  neck = classes_mask(labels, NECK_CLASSES)
  torso = classes_mask(labels, TORSO_CLASSES)
  image = cv2.copyTo(bc, head.view(np.uint8), gt.copy())
  scale = gt.shape[0] / FILL_REFERENCE_PX

  def px(value: int) -> int:
    return max(1, int(round(value * scale)))

  darkening = FILL_DARKENING ** (1.0 / scale)  # the same shading over the same share of the frame
  torso_filled = _fill_upwards(image, gt, torso, head, px(TORSO_FILL_PX), 0, darkening)
  reach = px(NECK_DILATION)  # up and down (a vertical line, as AD-NeRF's [[0,1,0]]*3 dilation iterated)
  neck = cv2.dilate(neck.view(np.uint8), np.ones((2 * reach + 1, 1), np.uint8)).view(bool)
  neck_filled = _fill_upwards(image, gt, neck, head, px(NECK_FILL_PX) + px(NECK_PUSH_DOWN), px(NECK_PUSH_DOWN),
                              darkening)
  _blur_into(image, neck_filled)
  keep = (neck | torso | neck_filled | torso_filled).view(np.uint8)
  # RGB and alpha 255 where kept, transparent black elsewhere.
  return cv2.copyTo(cv2.cvtColor(image, cv2.COLOR_RGB2RGBA), keep, np.zeros(image.shape[:2] + (4,), np.uint8))


def _blur_into(image: np.ndarray, where: np.ndarray) -> None:
  """`image`'s pixels under the bool mask `where` replaced, in place, by those of the image blurred 5 x 5 with
  FILL_BLUR_SIGMA (OpenCV's default border). Only the mask's box and the kernel's reach around it are blurred: the
  same pixels as blurring the whole frame (OpenCV's 8-bit Gaussian is bit-exact, and where the box meets the frame's
  edge it meets it in both), at a fraction of the cost."""
  if not where.any():
    return
  x, y, w, h = cv2.boundingRect(where.view(np.uint8))
  reach = 2  # the 5 x 5 kernel's
  x0, y0 = max(x - reach, 0), max(y - reach, 0)
  x1, y1 = min(x + w + reach, image.shape[1]), min(y + h + reach, image.shape[0])
  region = image[y0:y1, x0:x1]
  blurred = cv2.GaussianBlur(np.ascontiguousarray(region), (5, 5), FILL_BLUR_SIGMA)
  np.copyto(region, blurred, where=where[y0:y1, x0:x1, None])


# ----------------------------------------------------------------------------- image files

def encode_jpeg(rgb: np.ndarray, quality: int = 95) -> bytes:
  ok, data = cv2.imencode('.jpg', cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR),
                          [cv2.IMWRITE_JPEG_QUALITY, quality])
  if not ok:
    raise ValueError('JPEG encoding failed')
  return data.tobytes()


def encode_png(pixels: np.ndarray) -> bytes:
  """PNG of a label map (H, W), RGB (H, W, 3) or RGBA (H, W, 4) image."""
  pixels = np.ascontiguousarray(pixels)
  if pixels.ndim == 3:
    pixels = cv2.cvtColor(pixels, cv2.COLOR_RGB2BGR if pixels.shape[2] == 3 else cv2.COLOR_RGBA2BGRA)
  ok, data = cv2.imencode('.png', pixels)
  if not ok:
    raise ValueError('PNG encoding failed')
  return data.tobytes()


def decode_image(data: bytes) -> np.ndarray:
  """JPEG/PNG bytes -> RGB, RGBA or a label map (as stored)."""
  pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
  if pixels is None:
    raise ValueError('image does not decode')
  if pixels.ndim == 3:
    pixels = cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB if pixels.shape[2] == 3 else cv2.COLOR_BGRA2RGBA)
  return pixels


def npy_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, array, allow_pickle=False)
  return buffer.getvalue()


# ----------------------------------------------------------------------------- poses and transforms json

def mediapipe_focal(size: int) -> float:
  """Focal length in pixels of the camera MediaPipe's facial transformation matrix assumes (63 degrees
  vertical field of view over the frame it saw)."""
  return (size / 2.0) / math.tan(math.radians(MEDIAPIPE_VERTICAL_FOV) / 2.0)


def intrinsics(size: int, focal: Optional[float]) -> Dict[str, float]:
  """AD-NeRF's intrinsics for square frames: f = w unless given, principal point at the centre."""
  return {'focal_len': float(focal or size), 'cx': size / 2.0, 'cy': size / 2.0}


def camera_pose(face_matrix: np.ndarray, size: int, focal: float) -> np.ndarray:
  """Camera-to-world (4, 4) in the head's frame, OpenGL/NeRF axes (x right, y up, the camera looks down -z),
  metres: the inverse of the face pose, as AD-NeRF builds its poses from its face tracker.

  MediaPipe's matrix maps the canonical face (cm) into its camera's space; its rotation is orthonormalised,
  and its depth scaled by focal / MediaPipe's focal so the head projects to the same pixels through the
  intrinsics written beside it.
  """
  matrix = np.asarray(face_matrix, np.float64)
  u, _, vt = np.linalg.svd(matrix[:3, :3])
  rotation = u @ vt
  translation = matrix[:3, 3] / CM_PER_UNIT
  translation[2] *= focal / mediapipe_focal(size)
  pose = np.eye(4)
  pose[:3, :3] = rotation.T
  pose[:3, 3] = -rotation.T @ translation
  return pose


def split_ids(frame_ids: Sequence[int], val_every: Optional[int] = None) -> Dict[str, List[int]]:
  """AD-NeRF's split by default (`val_every` None): the last 1/11 of the frames (from int(n * 10 / 11) on) go to
  val, the rest to train. `val_every` > 0: every `val_every`-th frame (frames val_every-1, 2*val_every-1, ...)
  to val, interleaved; 0 puts every frame in train."""
  frame_ids = list(frame_ids)
  if val_every is None:
    cut = int(len(frame_ids) * 10 / 11)
    return {'train': frame_ids[:cut], 'val': frame_ids[cut:]}
  val = [i for i in frame_ids if val_every > 0 and (i + 1) % val_every == 0]
  chosen = set(val)
  return {'train': [i for i in frame_ids if i not in chosen], 'val': val}


def near_far(poses: Dict[int, np.ndarray]) -> Dict[str, float]:
  """AD-NeRF's sampling bounds: the head's mean distance in front of the camera (minus the mean z of the face's
  translation in camera space) - 0.2 and + 0.4."""
  depth = -float(np.mean([np.linalg.inv(pose)[2, 3] for pose in poses.values()])) if poses else 0.0
  return {'near': depth - 0.2, 'far': depth + 0.4}


def transforms_json(frame_ids: Sequence[int], poses: Dict[int, np.ndarray], rects: Dict[int, List[int]],
                    camera: Dict[str, float]) -> dict:
  """AD-NeRF's transforms_{train,val}.json: focal_len, cx, cy, near and far (over all of `poses`: the same in
  both files) and per frame img_id, aud_id (= the frame: audio features are aligned to frames),
  transform_matrix (camera-to-world) and face_rect."""
  bounds = {key: round(value, 6) for key, value in near_far(poses).items()}
  return dict(camera, **bounds, frames=[
      {'img_id': i, 'aud_id': i, 'transform_matrix': np.round(poses[i], 8).tolist(), 'face_rect': rects[i]}
      for i in frame_ids])


# ----------------------------------------------------------------------------- blinks (au.csv)

AU_MAX = 5.0  # OpenFace's AU intensities run from 0 to 5


def au_csv(blinks: np.ndarray, fps: float) -> bytes:
  """(F, 2) eye-blink scores -> au.csv in OpenFace FeatureExtraction's CSV layout, with the columns of it that
  apply (`frame, face_id, timestamp, success, AU45_r`, every name after the first with a leading space, as
  ER-NeRF reads ' AU45_r' back with pandas), one row per frame in order.
  AU45_r (blink) = 5 x the mean of MediaPipe's two eye-blink blendshape scores (0..1): the landmarker's blink
  score put on OpenFace's 0-5 intensity scale, linearly. A frame without a face: success 0, AU45_r 0."""
  lines = ['frame, face_id, timestamp, success, AU45_r']
  for i, pair in enumerate(np.asarray(blinks, np.float64).reshape(-1, 2)):
    found = bool(np.isfinite(pair).all())
    value = float(np.clip(AU_MAX * pair.mean(), 0.0, AU_MAX)) if found else 0.0
    lines.append(f'{i + 1}, 0, {i / fps:.3f}, {int(found)}, {value:.2f}')
  return ('\n'.join(lines) + '\n').encode()


# ----------------------------------------------------------------------------- audio

def frame_aligned_pcm(pcm: np.ndarray, first_frame: int, num_frames: int, fps: float, rate: int) -> np.ndarray:
  """A clip's samples cut or zero-padded to exactly its frames' span in the subject's audio, so that
  frame i of the subject starts at sample round(i * rate / fps) however the clips' audio was rounded."""
  start = int(round(first_frame * rate / fps))
  end = int(round((first_frame + num_frames) * rate / fps))
  wanted = end - start
  return pcm[:wanted] if len(pcm) >= wanted else np.concatenate([pcm, np.zeros(wanted - len(pcm), pcm.dtype)])
