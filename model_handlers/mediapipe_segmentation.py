"""RunInference ModelHandler for MediaPipe's selfie segmenter: RGB frame -> person probability.

Same plumbing as the face handlers (model_handlers/mediapipe_face.py): a pool of task instances shared by
the process's threads, a frame the task fails on is a `ModelError` and its task is replaced, CPU only.
The model's confidence mask is kept (not the thresholded category mask): the avatar recipe's alpha matte
needs soft edges, and each consumer thresholds as it needs.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from model_handlers import mediapipe_tasks
from model_handlers.mediapipe_face import MediaPipeHandler, _mp_image


class PersonSegmenterModelHandler(MediaPipeHandler):
  """RGB uint8 (H, W, 3) frame -> float32 (H, W) person probability in [0, 1] at the frame's size."""

  model_name = 'selfie_segmenter'
  counted = 'person'

  def __init__(self, model_dir: Optional[str] = None, min_batch_size: int = 1, max_batch_size: int = 32,
               metrics_namespace: str = 'segmentation'):
    super().__init__(model_dir, min_batch_size=min_batch_size, max_batch_size=max_batch_size,
                     metrics_namespace=metrics_namespace)

  def _create(self, model_path: str):
    BaseOptions, vision = mediapipe_tasks.tasks().BaseOptions, mediapipe_tasks.tasks().vision
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

  def _found(self, result) -> bool:
    return float(result.max(initial=0.0)) > 0.5
