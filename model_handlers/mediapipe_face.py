"""RunInference ModelHandlers for MediaPipe Tasks: FaceDetector and FaceLandmarker.

The pipeline runs them in-process where the frames are (model_handlers/in_process.py),
which like RunInference keeps one model per worker process; here that "model" is
a pool of task instances, and each batch borrows one, so several SDK threads never
run the same MediaPipe graph at once. A frame a task fails on is a `ModelError`
(not "no face") and that task is replaced. MediaPipe stays on the CPU: its GPU
delegate needs an EGL context that Dataflow GPU workers do not provide.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Any, Callable, Dict, Iterable, Optional, Sequence

os.environ.setdefault('GLOG_minloglevel', '2')  # MediaPipe/TFLite print a warning per image otherwise

import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from model_handlers import mediapipe_tasks, registry
from model_handlers.in_process import ModelError
from transforms.core.elements import NUM_BLENDSHAPES, NUM_LANDMARKS, Detection, FaceResult

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

  def map(self, function: Callable[[Any, np.ndarray], Any], images: Iterable[np.ndarray],
          on_error: Callable[[np.ndarray, Exception], Any]) -> list:
    """function(task, image) for each image; where it raises, on_error(image, error) stands in and the
    task is replaced: a MediaPipe graph that failed once refuses every later frame ("Graph has errors")."""
    task = self._borrow()
    results = []
    try:
      for image in images:
        try:
          results.append(function(task, image))
        except Exception as error:  # pylint: disable=broad-except
          results.append(on_error(image, error))
          self._discard(task)
          task = self._borrow()
    finally:
      self._idle.put(task)
    return results

  def _borrow(self):
    try:
      return self._idle.get_nowait()
    except queue.Empty:
      task = self._factory()
      if not self._all:
        # MediaPipe closes through an executor that shuts down at interpreter exit; close before it.
        threading._register_atexit(self.close)  # pylint: disable=protected-access
      self._all.append(task)
      return task

  def _discard(self, task) -> None:
    self._all.remove(task)
    try:
      task.close()
    except Exception:  # pylint: disable=broad-except
      # A failed graph re-raises its error on close, before MediaPipe forgets its handle; its __del__ would
      # then close the freed graph again when garbage collected, which blocks forever (seen with
      # mediapipe 1.2.x). Finish the teardown close() left undone so __del__ has nothing to do.
      task._handle = None  # pylint: disable=protected-access
      task._dispatcher.close()  # pylint: disable=protected-access
      task._lib.close()  # pylint: disable=protected-access

  def close(self) -> None:
    while self._all:
      self._all.pop().close()


def _mp_image(image: np.ndarray):
  if np.ndim(image) != 3 or np.shape(image)[2] != 3 or np.asarray(image).dtype != np.uint8:
    raise ValueError(f'expected an RGB uint8 frame (H, W, 3), got shape {np.shape(image)}')
  return mediapipe_tasks.image(np.ascontiguousarray(image))


class MediaPipeHandler(ModelHandler[np.ndarray, PredictionResult, TaskPool]):
  """Shared plumbing of the MediaPipe Tasks handlers (faces here, person segmentation in
  model_handlers/mediapipe_segmentation.py): model resolution, batching, a task pool, per-frame counters of
  frames with and without what the model looks for (`counted`)."""

  model_name = ''
  counted = 'face'

  def __init__(self, model_dir: Optional[str] = None, min_confidence: float = 0.5, max_faces: int = 1,
               min_batch_size: int = 1, max_batch_size: int = 32, metrics_namespace: str = 'faces'):
    super().__init__()
    self._model_dir = model_dir
    self._min_confidence = min_confidence
    self._max_faces = max_faces
    self._batch_kwargs = {'min_batch_size': min_batch_size, 'max_batch_size': max_batch_size}
    self._namespace = metrics_namespace
    self._with = Metrics.counter(metrics_namespace, f'{self.model_name}_frames_with_{self.counted}')
    self._without = Metrics.counter(metrics_namespace, f'{self.model_name}_frames_without_{self.counted}')
    self._errors = Metrics.counter(metrics_namespace, f'{self.model_name}_frame_errors')

  def _create(self, model_path: str):
    raise NotImplementedError

  def _infer(self, task, image: np.ndarray):
    raise NotImplementedError

  def _found(self, result) -> bool:
    return bool(result.num_faces)

  def _failed(self, image: np.ndarray, error: Exception) -> ModelError:
    """One bad frame must not fail its batch (and every clip in it); it is a model error, not "no face"."""
    self._errors.inc()
    logging.warning('%s failed on a frame of shape %s', self.model_name, getattr(image, 'shape', None),
                    exc_info=True)
    return ModelError(self.model_name, f'{type(error).__name__}: {error}'[:300])

  def load_model(self) -> TaskPool:
    path = registry.resolve(self.model_name, self._model_dir)
    return TaskPool(lambda: self._create(path))

  def run_inference(self, batch: Sequence[np.ndarray], model: TaskPool,
                    inference_args: Optional[Dict[str, Any]] = None) -> Iterable[PredictionResult]:
    for result in model.map(self._infer, batch, self._failed):
      if not isinstance(result, ModelError):
        (self._with if self._found(result) else self._without).inc()
      # The frame is not kept in the result: only the caller holds frames, and only while it needs them.
      yield PredictionResult(example=None, inference=result, model_id=self.model_name)

  def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
    return sum(image.nbytes for image in batch)

  def get_metrics_namespace(self) -> str:
    return self._namespace

  def batch_elements_kwargs(self) -> Dict[str, Any]:
    return self._batch_kwargs


class FaceDetectorModelHandler(MediaPipeHandler):
  """RGB frame -> `Detection` (BlazeFace full-range: small faces in wide shots), largest first."""

  model_name = 'face_detector_full_range'

  def _create(self, model_path: str):
    BaseOptions, vision = mediapipe_tasks.tasks().BaseOptions, mediapipe_tasks.tasks().vision
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


class FaceLandmarkerModelHandler(MediaPipeHandler):
  """RGB frame -> `FaceResult`: 478 landmarks, 52 blendshapes, head pose matrix of up to `max_faces`
  faces, largest first."""

  model_name = 'face_landmarker'

  def _create(self, model_path: str):
    BaseOptions, vision = mediapipe_tasks.tasks().BaseOptions, mediapipe_tasks.tasks().vision
    return vision.FaceLandmarker.create_from_options(vision.FaceLandmarkerOptions(
        base_options=BaseOptions(model_asset_path=model_path), running_mode=vision.RunningMode.IMAGE,
        num_faces=self._max_faces, min_face_detection_confidence=self._min_confidence,
        min_face_presence_confidence=self._min_confidence, output_face_blendshapes=True,
        output_facial_transformation_matrixes=True))

  def _infer(self, task, image: np.ndarray) -> FaceResult:
    face = to_face_result(task.detect(_mp_image(image)), image.shape[1], image.shape[0])
    order = np.argsort(-_areas(face.boxes()))
    return FaceResult(face.landmarks[order], face.blendshapes[order], face.matrices[order],
                      face.image_width, face.image_height)


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
