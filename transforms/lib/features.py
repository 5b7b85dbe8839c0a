"""Per-frame face features and the signals the quality scores are computed from.

Features come from the landmarker's output on the rendered frames; signals are mouth opening, audio energy
and gaze.
"""
from __future__ import annotations

import io
import wave
from typing import Optional, Tuple

import cv2
import numpy as np
from scipy import ndimage

from transforms.core.elements import FaceResult, NUM_BLENDSHAPES, NUM_LANDMARKS, RenderedClip

# iBUG/dlib 68-point order as indices into MediaPipe's 478-point mesh: jaw (17, image left to right),
# brows (5 + 5), nose bridge (4), nose base (5), eyes (6 + 6), outer lips (12), inner lips (8).
LMK68 = (
    127, 234, 93, 132, 58, 136, 150, 176, 152, 400, 379, 365, 288, 361, 323, 454, 356,
    70, 63, 105, 66, 107, 336, 296, 334, 293, 300,
    168, 197, 5, 4, 75, 97, 2, 326, 305,
    33, 160, 158, 133, 153, 144, 362, 385, 387, 263, 373, 380,
    61, 39, 37, 0, 267, 269, 291, 405, 314, 17, 84, 181,
    78, 82, 13, 312, 308, 317, 14, 87)
IRIS_CENTRES = (468, 473)  # the subject's right and left iris centres (image left, image right)
# Per eye: outer corner, inner corner, upper lid, lower lid (subject's right eye first).
EYE_CORNERS = ((33, 133, 159, 145), (263, 362, 386, 374))
INNER_LIPS = (13, 14)
# eyeBlinkLeft, eyeBlinkRight in the landmarker's blendshapes (model_handlers/mediapipe_face.BLENDSHAPE_NAMES).
EYE_BLINK = (9, 10)
BLINK = 0.4  # an eye this closed (blendshape score) is blinking: its gaze is not measured
SHARPNESS_FACE_PX = 128  # the face's longest side where sharpness is measured (face_sharpness)


def pose_from_matrix(matrix: np.ndarray) -> np.ndarray:
  """Yaw, pitch, roll in degrees from MediaPipe's facial transformation matrix (R = Rz Ry Rx)."""
  r = np.asarray(matrix, np.float64)[:3, :3]
  r = r / np.linalg.norm(r, axis=0, keepdims=True)
  pitch = np.degrees(np.arctan2(r[2, 1], r[2, 2]))
  yaw = np.degrees(np.arctan2(-r[2, 0], np.hypot(r[2, 1], r[2, 2])))
  roll = np.degrees(np.arctan2(r[1, 0], r[0, 0]))
  return np.array([yaw, pitch, roll], np.float32)


class FaceArrays:
  """A clip's per-frame face arrays, filled frame by frame as results come (no frame is kept).

  Sized for the planned frame count and cut to the frames rendered; NaN where no face was found.
  """

  def __init__(self, num_frames: int):
    self.landmarks = np.full((num_frames, NUM_LANDMARKS, 3), np.nan, np.float32)
    self.blendshapes = np.full((num_frames, NUM_BLENDSHAPES), np.nan, np.float32)
    self.pose = np.full((num_frames, 3), np.nan, np.float32)
    self.matrix = np.full((num_frames, 4, 4), np.nan, np.float32)
    self.bbox = np.full((num_frames, 4), np.nan, np.float32)
    self.sharpness = np.full((num_frames,), np.nan, np.float32)

  def put(self, index: int, face: FaceResult, which: int, sharpness: float = float('nan')) -> None:
    """Frame `index` holds face `which` of the landmarker's result (frames past the planned count are dropped)."""
    if index >= len(self.bbox):
      return
    self.landmarks[index] = face.landmarks[which]
    self.blendshapes[index] = face.blendshapes[which]
    self.pose[index] = pose_from_matrix(face.matrices[which])
    self.matrix[index] = face.matrices[which]
    self.bbox[index] = face.boxes()[which]
    self.sharpness[index] = sharpness

  def arrays(self, num_frames: int) -> dict:
    """name -> (num_frames, ...) array, with the iris centres and the 68-point subset."""
    landmarks = self.landmarks[:num_frames]
    return {'landmarks': landmarks, 'blendshapes': self.blendshapes[:num_frames], 'pose': self.pose[:num_frames],
            'matrix': self.matrix[:num_frames],
            'bbox': self.bbox[:num_frames], 'iris': landmarks[:, IRIS_CENTRES, :2].copy(),
            'lmk68': landmarks[:, LMK68, :2].copy(), 'sharpness': self.sharpness[:num_frames]}


def face_sharpness(image: np.ndarray, box: np.ndarray, source_scale: float = 1.0) -> float:
  """Variance of the Laplacian of the grey face region (the usual focus measure), with the face resampled to
  its size in source pixels, capped at `SHARPNESS_FACE_PX` across.

  Why a fixed scale: the Laplacian's variance moves with the scale it is taken at (about its fourth power),
  so the same source face read 27.9 in a tracked crop and 15-16 in 380-400 px windows scaled up to 512.
  Resampled to at most 128 px, the frame's face reads within 10% of its source pixels whatever the window
  (real 512 px clips, README); a face under 128 source px is judged at its own size, so a sharp low-resolution
  source is not called blurry. NaN when the box holds under 3 x 3 source pixels.
  """
  x0, y0 = max(0, int(box[0])), max(0, int(box[1]))
  x1, y1 = min(image.shape[1], int(np.ceil(box[2]))), min(image.shape[0], int(np.ceil(box[3])))
  side = max(x1 - x0, y1 - y0)
  scale = min(side * source_scale, SHARPNESS_FACE_PX) / max(side, 1)
  width, height = int(round((x1 - x0) * scale)), int(round((y1 - y0) * scale))
  if width < 3 or height < 3:
    return float('nan')
  grey = cv2.cvtColor(np.ascontiguousarray(image[y0:y1, x0:x1]), cv2.COLOR_RGB2GRAY)
  if (width, height) != grey.shape[::-1]:
    grey = cv2.resize(grey, (width, height), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
  return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def face_statistics(arrays: dict, clip: RenderedClip) -> dict:
  """Summary numbers kept in every sample's json (output pixels unless named `source_`)."""
  bbox = arrays['bbox']
  present = ~np.isnan(bbox[:, 0])
  judged = len(present) - clip.model_errors  # a frame the model failed on is not a frame without a face
  stats = {'face_frames': int(present.sum()), 'face_ratio': float(present.sum() / judged) if judged > 0 else 0.0,
           'model_error_frames': clip.model_errors}
  if present.any():
    boxes = bbox[present]
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1)
    sizes = np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])
    square_side = clip.task.square_side  # source pixels across the output square
    stats.update({
        'face_centre': [round(float(v), 2) for v in centres.mean(0)],
        'face_size': round(float(np.median(sizes)), 2),
        'source_face_size': round(float(np.median(sizes)) * square_side / clip.size, 2),
    })
  return stats


# ----------------------------------------------------------------------------- audio-visual sync

def mouth_opening(landmarks: np.ndarray) -> np.ndarray:
  """(T,) inner-lip gap over the eye-corner distance, so it does not change with face size."""
  gap = np.linalg.norm(landmarks[:, INNER_LIPS[0], :2] - landmarks[:, INNER_LIPS[1], :2], axis=1)
  eyes = np.linalg.norm(landmarks[:, EYE_CORNERS[0][0], :2] - landmarks[:, EYE_CORNERS[1][0], :2], axis=1)
  return gap / np.maximum(eyes, 1e-6)


def wav_samples(wav: bytes) -> Tuple[np.ndarray, int]:
  """16-bit PCM wav bytes -> (mono float samples, rate)."""
  with wave.open(io.BytesIO(wav)) as handle:
    rate, channels = handle.getframerate(), handle.getnchannels()
    data = np.frombuffer(handle.readframes(handle.getnframes()), '<i2').astype(np.float32) / 32768.0
  return data.reshape(-1, channels).mean(1), rate


def audio_envelope(wav: bytes, num_frames: int, fps: float) -> np.ndarray:
  """(T,) RMS loudness of the audio in a one-frame window centred on each video frame's time."""
  samples, rate = wav_samples(wav)
  edges = np.clip(np.round((np.arange(num_frames + 1) - 0.5) * rate / fps), 0, None).astype(int)
  energy = np.zeros(num_frames, np.float64)
  for i in range(num_frames):
    chunk = samples[edges[i]:edges[i + 1]]
    energy[i] = np.sqrt(np.mean(chunk.astype(np.float64) ** 2)) if chunk.size else 0.0
  return energy


def best_lag(video: np.ndarray, audio: np.ndarray, max_lag: int) -> Tuple[Optional[float], int]:
  """Highest Pearson correlation of video[t] with audio[t + lag] over |lag| <= max_lag: (corr, lag).

  A positive lag means the sound comes after the mouth moves. (None, 0) when either signal is flat
  (silence, no face) over too few common frames to judge.
  """
  n = min(len(video), len(audio))
  best: Tuple[Optional[float], int] = (None, 0)
  for lag in range(-max_lag, max_lag + 1):
    if abs(lag) >= n:  # a clip shorter than the lags searched (--min_duration under 0.6 s)
      continue
    v, a = (video[:n - lag], audio[lag:n]) if lag >= 0 else (video[-lag:n], audio[:n + lag])
    keep = ~np.isnan(v)
    v, a = v[keep], a[keep]
    if len(v) < 2 * max_lag + 2 or np.std(v) < 1e-6 or np.std(a) < 1e-6:
      continue
    corr = float(np.corrcoef(v, a)[0, 1])
    if best[0] is None or corr > best[0]:
      best = (corr, lag)
  return best


# ----------------------------------------------------------------------------- speech (Silero VAD)

SPEECH = 0.5  # a frame with this speech probability or more is speech (Silero's own default threshold)


def speech_ratio(speech: np.ndarray) -> Optional[float]:
  """Share of the frames with audio whose speech probability (`speech` array, --vad) is at least SPEECH; None
  without audio."""
  speech = speech[~np.isnan(speech)]
  return float(np.mean(speech >= SPEECH)) if len(speech) else None


# ----------------------------------------------------------------------------- eye motion (MegActor)

def gaze_angles(landmarks: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """(T,) gaze yaw and pitch in degrees from where each iris sits between its eye corners and lids."""
  yaws, pitches = [], []
  for iris, (outer, inner, upper, lower) in zip(IRIS_CENTRES, EYE_CORNERS):
    pts = landmarks[:, :, :2]
    centre_x = (pts[:, outer, 0] + pts[:, inner, 0]) / 2
    half_w = np.abs(pts[:, inner, 0] - pts[:, outer, 0]) / 2
    centre_y = (pts[:, upper, 1] + pts[:, lower, 1]) / 2
    half_h = np.maximum(np.abs(pts[:, lower, 1] - pts[:, upper, 1]) / 2, 1e-6)
    yaws.append(np.degrees(np.arcsin(np.clip((pts[:, iris, 0] - centre_x) / np.maximum(half_w, 1e-6), -1, 1))))
    pitches.append(np.degrees(np.arcsin(np.clip((pts[:, iris, 1] - centre_y) / half_h, -1, 1))))
  return np.mean(yaws, 0), np.mean(pitches, 0)


def eye_motion_variance(landmarks: np.ndarray, blendshapes: np.ndarray, gaze: Optional[np.ndarray] = None,
                        samples: int = 32, step: int = 10) -> Optional[float]:
  """MegActor's eye-motion score, in degrees²: theta (angle of the gaze off the camera axis, from gaze pitch
  and yaw), a maximum filter of size 3, then the variance over `samples` frames taken every `step`.

  Blink frames (either eyeBlink blendshape at BLINK or more, and the frame on each side) are left out first:
  as the lids close, the iris's place between them runs to +-90 degrees, so blinks lifted real talking clips
  to 618 and 1,093 deg² where their gaze varies 4-44 deg² (README). `gaze` (T, 2) yaw and pitch in degrees
  from a gaze model (L2CS-Net, MegActor's own) stands in for the iris landmarks where given."""
  yaw, pitch = gaze_angles(landmarks) if gaze is None else (gaze[:, 0], gaze[:, 1])
  theta = np.degrees(np.arccos(np.cos(np.radians(pitch)) * np.cos(np.radians(yaw))))
  blink = ndimage.binary_dilation(np.nan_to_num(blendshapes[:, EYE_BLINK]).max(1) >= BLINK)
  theta = theta[~np.isnan(theta) & ~blink]
  if len(theta) < 2:
    return None
  picked = ndimage.maximum_filter1d(theta, size=3)[::step][:samples]
  return float(np.var(picked)) if len(picked) >= 2 else None
