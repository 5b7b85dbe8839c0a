"""RunInference ModelHandler for MediaPipe's selfie segmenter: RGB frame -> person probability.

Same plumbing as the face handlers (model_handlers/mediapipe_face.py): a pool of task instances shared by
the process's threads, a frame the task fails on is a `ModelError` and its task is replaced, CPU only.
The model's confidence mask is kept (not the thresholded category mask): the avatar recipe's alpha matte
needs soft edges, and each consumer thresholds as it needs.
"""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, Optional, Sequence

import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from model_handlers import registry
from model_handlers.in_process import ModelError
from model_handlers.mediapipe_face import TaskPool, _mp_image


class PersonSegmenterModelHandler(ModelHandler[np.ndarray, PredictionResult, TaskPool]):
  """RGB uint8 (H, W, 3) frame -> float32 (H, W) person probability in [0, 1] at the frame's size."""

  model_name = 'selfie_segmenter'

  def __init__(self, model_dir: Optional[str] = None, min_batch_size: int = 1, max_batch_size: int = 32,
               metrics_namespace: str = 'segmentation'):
    super().__init__()
    self._model_dir = model_dir
    self._batch_kwargs = {'min_batch_size': min_batch_size, 'max_batch_size': max_batch_size}
    self._namespace = metrics_namespace
    self._with_person = Metrics.counter(metrics_namespace, f'{self.model_name}_frames_with_person')
    self._without_person = Metrics.counter(metrics_namespace, f'{self.model_name}_frames_without_person')
    self._errors = Metrics.counter(metrics_namespace, f'{self.model_name}_frame_errors')

  def _create(self, model_path: str):
    from mediapipe.tasks.python import BaseOptions, vision
    return vision.ImageSegmenter.create_from_options(vision.ImageSegmenterOptions(
        base_options=BaseOptions(model_asset_path=model_path), running_mode=vision.RunningMode.IMAGE,
        output_confidence_masks=True, output_category_mask=False))

  def _infer(self, task, image: np.ndarray) -> np.ndarray:
    masks = task.segment(_mp_image(image)).confidence_masks
    # The selfie segmenter has one output channel (person); a multi-class model would put background first.
    person = np.asarray(masks[-1].numpy_view(), np.float32)
    if person.ndim == 3:
      person = person[..., 0]
    if person.shape != image.shape[:2]:
      raise ValueError(f'segmenter returned a {person.shape} mask for a {image.shape[:2]} frame')
    return np.clip(person, 0.0, 1.0)

  def _failed(self, image: np.ndarray, error: Exception) -> ModelError:
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
        (self._with_person if float(result.max(initial=0.0)) > 0.5 else self._without_person).inc()
      yield PredictionResult(example=None, inference=result, model_id=self.model_name)

  def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
    return sum(image.nbytes for image in batch)

  def get_metrics_namespace(self) -> str:
    return self._namespace

  def batch_elements_kwargs(self) -> Dict[str, Any]:
    return self._batch_kwargs
