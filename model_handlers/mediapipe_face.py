"""RunInference ModelHandlers for MediaPipe Tasks: FaceDetector and FaceLandmarker.

RunInference keeps one model per worker process; here that "model" is a pool
of task instances, and each batch borrows one, so several SDK threads never
run the same MediaPipe graph at once. MediaPipe stays on the CPU: its GPU
delegate needs an EGL context that Dataflow GPU workers do not provide.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Any, Callable, Dict, Iterable, Optional, Sequence

os.environ.setdefault('GLOG_minloglevel', '2')  # MediaPipe/TFLite print a warning per image otherwise

import cv2
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from beam_pipeline.elements import Detection, FaceResult
from model_handlers import registry

NUM_LANDMARKS = 478
NUM_BLENDSHAPES = 52
# The landmarker's blendshape categories, in its output order (checked against the model in the tests).
BLENDSHAPE_NAMES = (
    '_neutral', 'browDownLeft', 'browDownRight', 'browInnerUp', 'browOuterUpLeft', 'browOuterUpRight',
    'cheekPuff', 'cheekSquintLeft', 'cheekSquintRight', 'eyeBlinkLeft', 'eyeBlinkRight', 'eyeLookDownLeft',
    'eyeLookDownRight', 'eyeLookInLeft', 'eyeLookInRight', 'eyeLookOutLeft', 'eyeLookOutRight', 'eyeLookUpLeft',
    'eyeLookUpRight', 'eyeSquintLeft', 'eyeSquintRight', 'eyeWideLeft', 'eyeWideRight', 'jawForward', 'jawLeft',
    'jawOpen', 'jawRight', 'mouthClose', 'mouthDimpleLeft', 'mouthDimpleRight', 'mouthFrownLeft',
    'mouthFrownRight', 'mouthFunnel', 'mouthLeft', 'mouthLowerDownLeft', 'mouthLowerDownRight', 'mouthPressLeft',
    'mouthPressRight', 'mouthPucker', 'mouthRight', 'mouthRollLower', 'mouthRollUpper', 'mouthShrugLower',
    'mouthShrugUpper', 'mouthSmileLeft', 'mouthSmileRight', 'mouthStretchLeft', 'mouthStretchRight',
    'mouthUpperUpLeft', 'mouthUpperUpRight', 'noseSneerLeft', 'noseSneerRight')


class TaskPool:
  """Thread-safe pool of MediaPipe task instances, created on demand, closed at exit."""

  def __init__(self, factory: Callable[[], Any]):
    self._factory = factory
    self._idle: 'queue.SimpleQueue' = queue.SimpleQueue()
    self._all = []

  def map(self, function: Callable[[Any, np.ndarray], Any], images: Iterable[np.ndarray]) -> list:
    try:
      task = self._idle.get_nowait()
    except queue.Empty:
      task = self._factory()
      if not self._all:
        # MediaPipe closes through an executor that shuts down at interpreter exit; close before it.
        threading._register_atexit(self.close)  # pylint: disable=protected-access
      self._all.append(task)
    try:
      return [function(task, image) for image in images]
    finally:
      self._idle.put(task)

  def close(self) -> None:
    while self._all:
      self._all.pop().close()


def _mp_image(image: np.ndarray):
  import mediapipe as mp
  if np.ndim(image) != 3 or np.shape(image)[2] != 3 or np.asarray(image).dtype != np.uint8:
    raise ValueError(f'expected an RGB uint8 frame (H, W, 3), got shape {np.shape(image)}')
  return mp.Image(image_format=mp.ImageFormat.SRGB, data=np.ascontiguousarray(image))


class _MediaPipeHandler(ModelHandler[np.ndarray, PredictionResult, TaskPool]):
  """Shared plumbing: model resolution, batching, per-frame face counters."""

  model_name = ''

  def __init__(self, model_dir: Optional[str] = None, min_confidence: float = 0.5, max_faces: int = 1,
               min_batch_size: int = 1, max_batch_size: int = 32, metrics_namespace: str = 'faces'):
    super().__init__()
    self._model_dir = model_dir
    self._min_confidence = min_confidence
    self._max_faces = max_faces
    self._batch_kwargs = {'min_batch_size': min_batch_size, 'max_batch_size': max_batch_size}
    self._namespace = metrics_namespace
    self._with_face = Metrics.counter(metrics_namespace, f'{self.model_name}_frames_with_face')
    self._without_face = Metrics.counter(metrics_namespace, f'{self.model_name}_frames_without_face')
    self._errors = Metrics.counter(metrics_namespace, f'{self.model_name}_frame_errors')

  def _create(self, model_path: str):
    raise NotImplementedError

  def _infer(self, task, image: np.ndarray):
    raise NotImplementedError

  def _no_face(self, image: np.ndarray):
    raise NotImplementedError

  def _infer_or_no_face(self, task, image: np.ndarray):
    """One bad frame must not fail its batch (and every clip in it): it counts as a frame without a face."""
    try:
      return self._infer(task, image)
    except Exception:  # pylint: disable=broad-except
      self._errors.inc()
      logging.warning('%s failed on a frame of shape %s; counted as no face', self.model_name,
                      getattr(image, 'shape', None), exc_info=True)
      return self._no_face(image)

  def load_model(self) -> TaskPool:
    path = registry.resolve(self.model_name, self._model_dir)
    return TaskPool(lambda: self._create(path))

  def run_inference(self, batch: Sequence[np.ndarray], model: TaskPool,
                    inference_args: Optional[Dict[str, Any]] = None) -> Iterable[PredictionResult]:
    for result in model.map(self._infer_or_no_face, batch):
      (self._with_face if result.num_faces else self._without_face).inc()
      # The frame is not kept in the result: it would travel on into the next shuffle.
      yield PredictionResult(example=None, inference=result, model_id=self.model_name)

  def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
    return sum(image.nbytes for image in batch)

  def get_metrics_namespace(self) -> str:
    return self._namespace

  def batch_elements_kwargs(self) -> Dict[str, Any]:
    return self._batch_kwargs


class FaceDetectorModelHandler(_MediaPipeHandler):
  """RGB frame -> `Detection` (BlazeFace full-range: small faces in wide shots), largest first."""

  model_name = 'face_detector_full_range'

  def _create(self, model_path: str):
    from mediapipe.tasks.python import BaseOptions, vision
    return vision.FaceDetector.create_from_options(vision.FaceDetectorOptions(
        base_options=BaseOptions(model_asset_path=model_path), running_mode=vision.RunningMode.IMAGE,
        min_detection_confidence=self._min_confidence))

  def _infer(self, task, image: np.ndarray) -> Detection:
    found = task.detect(_mp_image(image)).detections
    boxes = np.array([[d.bounding_box.origin_x, d.bounding_box.origin_y,
                       d.bounding_box.origin_x + d.bounding_box.width,
                       d.bounding_box.origin_y + d.bounding_box.height] for d in found], np.float32).reshape(-1, 4)
    scores = np.array([d.categories[0].score if d.categories else 0.0 for d in found], np.float32)
    order = np.argsort(-_areas(boxes))[:self._max_faces]
    return Detection(boxes[order], scores[order], image.shape[1], image.shape[0])

  def _no_face(self, image: np.ndarray) -> Detection:
    height, width = np.shape(image)[:2] if np.ndim(image) >= 2 else (0, 0)
    return Detection(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), width, height)


class FaceLandmarkerModelHandler(_MediaPipeHandler):
  """RGB frame -> `FaceResult`: 478 landmarks, 52 blendshapes, head pose matrix; largest face first."""

  model_name = 'face_landmarker'

  def _create(self, model_path: str):
    from mediapipe.tasks.python import BaseOptions, vision
    return vision.FaceLandmarker.create_from_options(vision.FaceLandmarkerOptions(
        base_options=BaseOptions(model_asset_path=model_path), running_mode=vision.RunningMode.IMAGE,
        num_faces=self._max_faces, min_face_detection_confidence=self._min_confidence,
        min_face_presence_confidence=self._min_confidence, output_face_blendshapes=True,
        output_facial_transformation_matrixes=True))

  def _infer(self, task, image: np.ndarray) -> FaceResult:
    face = to_face_result(task.detect(_mp_image(image)), image.shape[1], image.shape[0])
    boxes = face.boxes()
    order = np.argsort(-_areas(boxes))
    # Blur is measured here because only here the frame and its face box meet (frames are not kept).
    sharpness = np.array([face_sharpness(image, box) for box in boxes[order]], np.float32)
    return FaceResult(face.landmarks[order], face.blendshapes[order], face.matrices[order],
                      face.image_width, face.image_height, sharpness)

  def _no_face(self, image: np.ndarray) -> FaceResult:
    height, width = np.shape(image)[:2] if np.ndim(image) >= 2 else (0, 0)
    return FaceResult(np.zeros((0, NUM_LANDMARKS, 3), np.float32), np.zeros((0, NUM_BLENDSHAPES), np.float32),
                      np.zeros((0, 4, 4), np.float32), width, height, np.zeros(0, np.float32))


def face_sharpness(image: np.ndarray, box: np.ndarray) -> float:
  """Variance of the Laplacian of the grey face region (the usual focus measure); NaN if the box is empty."""
  x0, y0 = max(0, int(box[0])), max(0, int(box[1]))
  x1, y1 = min(image.shape[1], int(np.ceil(box[2]))), min(image.shape[0], int(np.ceil(box[3])))
  if x1 - x0 < 3 or y1 - y0 < 3:
    return float('nan')
  grey = cv2.cvtColor(np.ascontiguousarray(image[y0:y1, x0:x1]), cv2.COLOR_RGB2GRAY)
  return float(cv2.Laplacian(grey, cv2.CV_64F).var())


def to_face_result(result, width: int, height: int) -> FaceResult:
  """MediaPipe's normalised output -> arrays in pixels of the given image."""
  faces = len(result.face_landmarks)
  landmarks = np.zeros((faces, NUM_LANDMARKS, 3), np.float32)
  blendshapes = np.zeros((faces, NUM_BLENDSHAPES), np.float32)
  matrices = np.zeros((faces, 4, 4), np.float32)
  for i, points in enumerate(result.face_landmarks):
    landmarks[i] = [(p.x * width, p.y * height, p.z * width) for p in points]
    if result.face_blendshapes:
      blendshapes[i] = [c.score for c in result.face_blendshapes[i]]
    if result.facial_transformation_matrixes:
      matrices[i] = np.asarray(result.facial_transformation_matrixes[i], np.float32)
  return FaceResult(landmarks, blendshapes, matrices, width, height)


def _areas(boxes: np.ndarray) -> np.ndarray:
  return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
