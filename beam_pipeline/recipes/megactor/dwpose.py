"""DWPose whole-body keypoints (134 points, OpenPose order) from the official ONNX files, and the face-only default.

The two-stage model is the one MegActor ran (DWPose's `annotator/dwpose`): `yolox_l.onnx` finds people
(input `images` (1, 3, 640, 640), a letterboxed 0-255 image; output (1, 8400, 85): YOLOX boxes per grid cell
of strides 8/16/32, objectness and 80 class scores, already passed through a sigmoid), then
`dw-ll_ucoco_384.onnx` reads 133 COCO-WholeBody points in each person's box (input `input`
(N, 3, 384, 288), outputs `simcc_x` (N, 133, 576) and `simcc_y` (N, 133, 768): SimCC bins at split ratio 2).
Pre- and post-processing follow DWPose's onnxdet.py / onnxpose.py / wholebody.py step for step so the
numbers match the published pipeline: the frame goes in as RGB (MegActor's note: "RGB, not BGR"), the person
box is padded by 1.25 and fixed to the model's aspect ratio, the argmax bin is the point and min(x peak,
y peak) its score, and the neck (mean of the shoulders) is inserted at 17 before the MMPose body order is
rewritten to OpenPose's. So the 68 face points sit at indices 24-91, the feet at 18-23 and the hands at
92-133.

Every person the detector finds is posed, as MegActor's `2.generate_dwpose.py` keeps them (its readers take
person 0 and its Sigma curation drops frames with more than one), largest box first so person 0 is the
face-centred subject of a VFHQ or CelebV clip. Where the detector finds no one the pose model reads the
whole frame as one person, as DWPose does.

Without the ONNX files the recipe fills only the face part from the face landmarker (`face_only_keypoints`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from model_handlers.weights import WeightsError, read_weights

NUM_POINTS = 134  # 133 COCO-WholeBody points plus the neck
FACE = slice(24, 92)  # the 68 face points (iBUG order) in the 134-point layout
DETECTOR_SIZE = (640, 640)  # (height, width) of yolox_l.onnx's input
DETECTOR_STRIDES = (8, 16, 32)
DETECTOR_PAD_VALUE = 114
NMS_IOU = 0.45
CANDIDATE_SCORE = 0.1  # boxes that enter NMS
PERSON_SCORE = 0.3  # boxes kept after NMS
PERSON_CLASS = 0
BOX_PADDING = 1.25
SIMCC_SPLIT_RATIO = 2.0
PIXEL_MEAN = np.array([123.675, 116.28, 103.53], np.float32)
PIXEL_STD = np.array([58.395, 57.12, 57.375], np.float32)
VISIBLE_SCORE = 0.3  # DWPose's threshold for a point to count as seen (neck score, face box)
# wholebody.py's reordering after the neck is inserted at 17: openpose[i] = mmpose[j].
MMPOSE_ORDER = (17, 6, 8, 10, 7, 9, 12, 14, 16, 13, 15, 2, 1, 4, 3)
OPENPOSE_ORDER = (1, 2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15, 16, 17)
DETECTOR_FLAG, POSE_FLAG = '--dwpose_detector', '--dwpose_model'
DEVICES = ('auto', 'cuda', 'cpu')


@dataclasses.dataclass(frozen=True)
class WholeBody:
  """One frame's DWPose result in image pixels, one row per person, the largest person box first."""
  keypoints: np.ndarray  # (people, 134, 2) float32, OpenPose whole-body order
  scores: np.ndarray  # (people, 134) float32
  person_boxes: np.ndarray  # (people, 4) x0, y0, x1, y1 each pose was read in (the whole frame when no one was)
  detected: bool  # the detector found a person


# ---------------------------------------------------------------- detector (onnxdet.py)

def letterbox(image: np.ndarray, size: Tuple[int, int] = DETECTOR_SIZE) -> Tuple[np.ndarray, float]:
  """(3, H, W) float32 detector input and the resize ratio: the image scaled to fit, top-left, padded 114."""
  padded = np.full((size[0], size[1], 3), DETECTOR_PAD_VALUE, np.uint8)
  ratio = min(size[0] / image.shape[0], size[1] / image.shape[1])
  width, height = int(image.shape[1] * ratio), int(image.shape[0] * ratio)
  padded[:height, :width] = cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)
  return np.ascontiguousarray(padded.transpose(2, 0, 1), np.float32), ratio


def _grid(size: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
  """The (A, 2) cell offsets and (A, 1) strides of YOLOX's anchor-free outputs, stride 8 first."""
  grids, strides = [], []
  for stride in DETECTOR_STRIDES:
    xs, ys = np.meshgrid(np.arange(size[1] // stride), np.arange(size[0] // stride))
    grids.append(np.stack((xs, ys), 2).reshape(-1, 2))
    strides.append(np.full((grids[-1].shape[0], 1), stride))
  return np.concatenate(grids).astype(np.float32), np.concatenate(strides).astype(np.float32)


def nms(boxes: np.ndarray, scores: np.ndarray, iou: float) -> List[int]:
  """Greedy single-class NMS with DWPose's +1 pixel areas; indices kept, best first."""
  x0, y0, x1, y1 = boxes.T
  areas = (x1 - x0 + 1) * (y1 - y0 + 1)
  order = scores.argsort()[::-1]
  keep = []
  while order.size:
    best = order[0]
    keep.append(int(best))
    rest = order[1:]
    width = np.maximum(0.0, np.minimum(x1[best], x1[rest]) - np.maximum(x0[best], x0[rest]) + 1)
    height = np.maximum(0.0, np.minimum(y1[best], y1[rest]) - np.maximum(y0[best], y0[rest]) + 1)
    inter = width * height
    overlap = inter / (areas[best] + areas[rest] - inter)
    order = rest[overlap <= iou]
  return keep


def person_boxes(raw: np.ndarray, ratio: float, size: Tuple[int, int] = DETECTOR_SIZE) -> np.ndarray:
  """(K, 4) person boxes x0, y0, x1, y1 in source pixels from one image's (A, 85) raw YOLOX output.

  onnxdet.py runs class-aware NMS over all classes and keeps class 0; NMS never mixes classes, so running it
  on the person scores alone gives the same boxes.
  """
  grid, strides = _grid(size)
  if raw.shape[0] != grid.shape[0]:
    raise ValueError(f'detector output has {raw.shape[0]} rows; a {size[1]}x{size[0]} YOLOX input makes '
                     f'{grid.shape[0]}')
  centres = (raw[:, :2] + grid) * strides
  sizes = np.exp(raw[:, 2:4]) * strides
  boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], 1) / ratio
  scores = raw[:, 4] * raw[:, 5 + PERSON_CLASS]
  candidates = scores > CANDIDATE_SCORE
  boxes, scores = boxes[candidates], scores[candidates]
  kept = nms(boxes, scores, NMS_IOU) if len(scores) else []
  return boxes[[k for k in kept if scores[k] > PERSON_SCORE]].reshape(-1, 4)


def largest_first(boxes: np.ndarray) -> np.ndarray:
  """(K, 4) boxes ordered by area, largest first (ties keep the detector's order)."""
  return boxes[np.argsort(-(boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]), kind='stable')]


# ---------------------------------------------------------------- pose (onnxpose.py)

def box_centre_scale(box: np.ndarray, input_wh: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
  """Centre and (w, h) scale of the region the pose model reads: the box padded 1.25, widened or heightened
  to the model input's aspect ratio."""
  x0, y0, x1, y1 = np.asarray(box, np.float64)
  centre = np.array([x0 + x1, y0 + y1]) * 0.5
  width, height = (x1 - x0) * BOX_PADDING, (y1 - y0) * BOX_PADDING
  aspect = input_wh[0] / input_wh[1]
  scale = np.array([width, width / aspect]) if width > height * aspect else np.array([height * aspect, height])
  return centre, scale


def pose_input(image: np.ndarray, centre: np.ndarray, scale: np.ndarray, input_wh: Tuple[int, int]) -> np.ndarray:
  """(3, h, w) float32: the region warped to the model input (no rotation), minus mean, over std."""
  zoom = input_wh[0] / scale[0]
  matrix = np.array([[zoom, 0, input_wh[0] / 2 - zoom * centre[0]],
                     [0, zoom, input_wh[1] / 2 - zoom * centre[1]]], np.float64)
  warped = cv2.warpAffine(image, matrix, (int(input_wh[0]), int(input_wh[1])), flags=cv2.INTER_LINEAR)
  return np.ascontiguousarray(((warped - PIXEL_MEAN) / PIXEL_STD).transpose(2, 0, 1), np.float32)


def decode_simcc(simcc_x: np.ndarray, simcc_y: np.ndarray, centre: np.ndarray, scale: np.ndarray,
                 input_wh: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
  """(K, 2) points in source pixels and (K,) scores from one person's (K, Wx) and (K, Wy) SimCC outputs:
  argmax bin / split ratio, score the smaller of the two peaks, points with no positive peak at bin -1."""
  points = np.stack([simcc_x.argmax(1), simcc_y.argmax(1)], -1).astype(np.float32)
  scores = np.minimum(simcc_x.max(1), simcc_y.max(1)).astype(np.float32)
  points[scores <= 0] = -1
  points /= SIMCC_SPLIT_RATIO
  points = points / np.asarray(input_wh, np.float32) * scale + centre - scale / 2
  return points.astype(np.float32), scores


def to_openpose(keypoints: np.ndarray, scores: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """(..., 133, 2), (..., 133) MMPose COCO-WholeBody -> (..., 134, 2), (..., 134) DWPose/OpenPose layout.

  The neck (mean of the shoulders, score 1 when both shoulders score above 0.3, else 0) goes in at 17, then
  the body points move to OpenPose's order, as wholebody.py does.
  """
  info = np.concatenate([keypoints, scores[..., None]], -1)
  neck = info[..., [5, 6], :].mean(-2)
  neck[..., 2] = np.logical_and(info[..., 5, 2] > VISIBLE_SCORE, info[..., 6, 2] > VISIBLE_SCORE)
  info = np.insert(info, 17, neck, axis=-2)
  info[..., list(OPENPOSE_ORDER), :] = info[..., list(MMPOSE_ORDER), :]
  return info[..., :2].astype(np.float32), info[..., 2].astype(np.float32)


# ---------------------------------------------------------------- the face-only default and the face box

def face_only_keypoints(lmk68: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
  """(T, 134, 2), (T, 134) from (T, 68, 2) face points: the face at 24-91 with score 1 on frames where the face
  was found (rows with NaN were not), everything else zero with score 0."""
  lmk68 = np.asarray(lmk68, np.float32)
  if lmk68.ndim != 3 or lmk68.shape[1:] != (68, 2):
    raise ValueError(f'expected (T, 68, 2) face points, got {lmk68.shape}')
  found = ~np.isnan(lmk68).any(axis=(1, 2))
  keypoints = np.zeros((len(lmk68), NUM_POINTS, 2), np.float32)
  scores = np.zeros((len(lmk68), NUM_POINTS), np.float32)
  keypoints[found, FACE] = lmk68[found]
  scores[found, FACE] = 1.0
  return keypoints, scores


def faces_bbox(keypoints: np.ndarray, scores: np.ndarray, threshold: float = VISIBLE_SCORE) -> np.ndarray:
  """(T, 4) x0, y0, x1, y1 around each frame's face points that score above `threshold`; zeros where none do."""
  face, seen = np.asarray(keypoints, np.float32)[:, FACE], np.asarray(scores)[:, FACE] > threshold
  boxes = np.zeros((len(face), 4), np.float32)
  for index in np.flatnonzero(seen.any(1)):
    points = face[index][seen[index]]
    boxes[index] = (*points.min(0), *points.max(0))
  return boxes


# ---------------------------------------------------------------- the handler

class _Sessions:
  """The two onnxruntime sessions and what the handler needs to know about their inputs."""

  def __init__(self, detector, pose):
    self.detector, self.pose = detector, pose
    self.detector_input = detector.get_inputs()[0].name
    self.pose_input = pose.get_inputs()[0].name
    height, width = pose.get_inputs()[0].shape[2:]
    self.pose_wh = (int(width), int(height))
    self.detector_batch = _fixed_batch(detector)
    self.pose_batch = _fixed_batch(pose)


def _fixed_batch(session) -> Optional[int]:
  """The input's batch size when the graph fixes it (the official yolox_l.onnx: 1), else None (any)."""
  first = session.get_inputs()[0].shape[0]
  return first if isinstance(first, int) and first > 0 else None


def _run(session, input_name: str, fixed: Optional[int], inputs: np.ndarray) -> List[np.ndarray]:
  """All outputs for a stack of inputs, in one call, or in slices of the batch size the graph fixes."""
  step = fixed or len(inputs)
  parts = [session.run(None, {input_name: inputs[first:first + step]}) for first in range(0, len(inputs), step)]
  return [np.concatenate([part[k] for part in parts]) for k in range(len(parts[0]))]


def providers(device: str = 'auto') -> List[str]:
  """onnxruntime providers: CUDA first when this build has it (and it is wanted), CPU always."""
  import onnxruntime
  if device not in DEVICES:
    raise ValueError(f'device {device!r} is not one of {DEVICES}')
  available = onnxruntime.get_available_providers()
  if device == 'cuda' and 'CUDAExecutionProvider' not in available:
    raise RuntimeError('device cuda was asked for but this onnxruntime has no CUDAExecutionProvider '
                       '(install onnxruntime-gpu)')
  if device != 'cpu' and 'CUDAExecutionProvider' in available:
    return ['CUDAExecutionProvider', 'CPUExecutionProvider']
  return ['CPUExecutionProvider']


def _session(path: str, flag: str, what: str, device: str):
  import onnxruntime
  data = read_weights(path, flag, what)
  try:
    return onnxruntime.InferenceSession(data, providers=providers(device))
  except Exception as error:  # pylint: disable=broad-except  # onnxruntime raises its own exception types
    raise WeightsError(flag, path, f'not an ONNX model onnxruntime can load ({what}): {type(error).__name__}: '
                       f'{str(error)[:200]}') from error


def _check_detector(session, path: str) -> None:
  inputs, outputs = session.get_inputs(), session.get_outputs()
  shape = inputs[0].shape if len(inputs) == 1 else None
  if shape is None or len(shape) != 4 or shape[1] != 3 or tuple(shape[2:]) != DETECTOR_SIZE:
    raise WeightsError(DETECTOR_FLAG, path, f'expected yolox_l.onnx (one input of shape (1, 3, 640, 640)), found '
                       f'inputs {[(i.name, i.shape) for i in inputs]}')
  last = outputs[0].shape[-1]
  if len(outputs[0].shape) != 3 or (isinstance(last, int) and last != 5 + 80):
    raise WeightsError(DETECTOR_FLAG, path, f'expected yolox_l.onnx (output (1, 8400, 85)), found output '
                       f'{outputs[0].name} {outputs[0].shape}')


def _check_pose(session, path: str) -> None:
  inputs, outputs = session.get_inputs(), session.get_outputs()
  shape = inputs[0].shape if len(inputs) == 1 else None
  if shape is None or len(shape) != 4 or shape[1] != 3 or not all(isinstance(s, int) for s in shape[2:]):
    raise WeightsError(POSE_FLAG, path, f'expected dw-ll_ucoco_384.onnx (one input of shape (N, 3, 384, 288)), '
                       f'found inputs {[(i.name, i.shape) for i in inputs]}')
  height, width = shape[2:]
  wanted = (int(width * SIMCC_SPLIT_RATIO), int(height * SIMCC_SPLIT_RATIO))
  found = tuple(o.shape[-1] for o in outputs[:2])
  if len(outputs) != 2 or any(len(o.shape) != 3 for o in outputs) or found != wanted or \
      any(o.shape[1] != 133 for o in outputs):
    raise WeightsError(POSE_FLAG, path, f'expected dw-ll_ucoco_384.onnx (outputs simcc_x (N, 133, {wanted[0]}) and '
                       f'simcc_y (N, 133, {wanted[1]})), found {[(o.name, o.shape) for o in outputs]}')


class DWPoseHandler(ModelHandler[np.ndarray, PredictionResult, _Sessions]):
  """RGB uint8 (H, W, 3) frames -> PredictionResult(frame, WholeBody) with DWPose's 134 points in pixels.

  One pair of onnxruntime sessions per worker process (CUDA provider when the installed onnxruntime has it);
  a batch runs the detector on its frames (stacked where the graph takes any batch, one by one through the
  official graph's fixed batch of 1), then the pose model on all of the batch's person crops at once.
  """

  model_name = 'dwpose'

  def __init__(self, detector_path: str, pose_path: str, device: str = 'auto', batch_size: int = 16):
    super().__init__()
    if device not in DEVICES:
      raise ValueError(f'device {device!r} is not one of {DEVICES}')
    self._detector_path, self._pose_path = detector_path, pose_path
    self._device, self._batch_size = device, batch_size

  def load_model(self) -> _Sessions:
    detector = _session(self._detector_path, DETECTOR_FLAG, 'the DWPose person detector yolox_l.onnx',
                        self._device)
    _check_detector(detector, self._detector_path)
    pose = _session(self._pose_path, POSE_FLAG, 'the DWPose whole-body model dw-ll_ucoco_384.onnx', self._device)
    _check_pose(pose, self._pose_path)
    return _Sessions(detector, pose)

  def run_inference(self, batch: Sequence[np.ndarray], model: _Sessions,
                    inference_args: Optional[Dict[str, Any]] = None) -> Iterable[PredictionResult]:
    if not len(batch):
      return []
    no_person = Metrics.counter(self.get_metrics_namespace(), 'dwpose_frames_without_person')
    letterboxed = [letterbox(np.asarray(frame)) for frame in batch]
    raw = _run(model.detector, model.detector_input, model.detector_batch,
               np.stack([image for image, _ in letterboxed]))[0]
    people, regions, crops = [], [], []
    for frame, (_, ratio), detections in zip(batch, letterboxed, raw):
      boxes = largest_first(person_boxes(detections, ratio))
      detected = len(boxes) > 0
      if not detected:
        no_person.inc()
        boxes = np.array([[0, 0, frame.shape[1], frame.shape[0]]], np.float32)
      people.append((np.asarray(boxes, np.float32), detected))
      for box in boxes:
        centre, scale = box_centre_scale(box, model.pose_wh)
        regions.append((centre, scale))
        crops.append(pose_input(np.asarray(frame), centre, scale, model.pose_wh))
    simcc_x, simcc_y = _run(model.pose, model.pose_input, model.pose_batch, np.stack(crops))[:2]
    if len(simcc_x) != len(crops) or len(simcc_y) != len(crops):
      raise RuntimeError(f'the pose model gave {len(simcc_x)} results for {len(crops)} person crops')
    decoded = [decode_simcc(x_bins, y_bins, centre, scale, model.pose_wh)
               for x_bins, y_bins, (centre, scale) in zip(simcc_x, simcc_y, regions)]
    results, first = [], 0
    for frame, (boxes, detected) in zip(batch, people):
      points = np.stack([p for p, _ in decoded[first:first + len(boxes)]])
      scores = np.stack([s for _, s in decoded[first:first + len(boxes)]])
      first += len(boxes)
      keypoints, scores = to_openpose(points, scores)
      results.append(PredictionResult(frame, WholeBody(keypoints, scores, boxes, detected)))
    return results

  def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
    return sum(np.asarray(frame).nbytes for frame in batch)

  def batch_elements_kwargs(self) -> Dict[str, Any]:
    return {'max_batch_size': self._batch_size}

  def get_metrics_namespace(self) -> str:
    return 'dwpose'


def stack_results(results: Sequence[Optional[WholeBody]]) -> Dict[str, np.ndarray]:
  """A clip's per-frame results as (T, ...) arrays, padded to the most people in a frame: dwpose_result
  (T, P, 134, 2), dwpose_score (T, P, 134) and dwpose_people (T,), each frame's count. A frame with no result
  (the model failed on it) is one person of zeros with score 0, as DWPose always gives at least one."""
  most = max([len(r.keypoints) for r in results if r is not None], default=1)
  keypoints = np.zeros((len(results), most, NUM_POINTS, 2), np.float32)
  scores = np.zeros((len(results), most, NUM_POINTS), np.float32)
  people = np.ones(len(results), np.int32)
  for index, result in enumerate(results):
    if result is not None:
      people[index] = len(result.keypoints)
      keypoints[index, :people[index]], scores[index, :people[index]] = result.keypoints, result.scores
  return {'dwpose_result': keypoints, 'dwpose_score': scores, 'dwpose_people': people}
