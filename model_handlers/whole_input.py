"""A base for ModelHandlers that take one whole input per call (a clip's audio, a clip's frames)."""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Sequence

import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult


class WholeInputHandler(ModelHandler[np.ndarray, PredictionResult, Any]):
  """One example per batch: the model keeps state across the input (a recurrent VAD) or batches the input's own
  windows inside `infer`, so batching examples of different clips would gain nothing and mix their states.

  Subclasses set `model_name` and `namespace` and define `load_model` and `infer(model, example)`.
  """

  model_name = ''
  namespace = ''

  def infer(self, model: Any, example: np.ndarray) -> Any:
    raise NotImplementedError

  def run_inference(self, batch: Sequence[np.ndarray], model: Any,
                    inference_args: Optional[Dict[str, Any]] = None) -> Iterable[PredictionResult]:
    for example in batch:
      yield PredictionResult(example=None, inference=self.infer(model, example), model_id=self.model_name)

  def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
    return sum(np.asarray(example).nbytes for example in batch)

  def get_metrics_namespace(self) -> str:
    return self.namespace

  def batch_elements_kwargs(self) -> Dict[str, Any]:
    return {'min_batch_size': 1, 'max_batch_size': 1}
