"""RunInference handler for user-supplied torch weights, on the best device the worker has.

The device is chosen when the model loads on the worker (CUDA when present), not
when the graph is built: the flex-template launcher and the laptop that submits
a Dataflow job have no GPU. BatchElements' size is fixed at graph construction,
so batches are formed at the largest per-device size and cut to the size of the
device actually found. Large models are loaded once per worker VM and shared by
its SDK processes. Weights are read with `weights_only=True` (no pickled code),
through Beam FileSystems (local or gs://). Needs the `torch` extra.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Optional, Sequence

import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

DEFAULT_BATCH_SIZES = {'cuda': 64, 'cpu': 8}
DEVICES = ('auto', 'cuda', 'cpu')


def pick_device(requested: str = 'auto'):
  """torch.device: CUDA when asked for or available ('auto'), else CPU (a missing GPU is an error when asked for)."""
  import torch
  if requested not in DEVICES:
    raise ValueError(f'device {requested!r} is not one of {DEVICES}')
  if requested == 'cuda' and not torch.cuda.is_available():
    raise RuntimeError('device cuda was asked for but this worker has no usable CUDA GPU')
  if requested == 'cuda' or (requested == 'auto' and torch.cuda.is_available()):
    return torch.device('cuda')
  return torch.device('cpu')


class TorchModelHandler(ModelHandler[np.ndarray, PredictionResult, Any]):
  """numpy array -> PredictionResult with the model's output for it (numpy, on the host).

  `weights` is a `torch.export` program (.pt2), or a state dict when
  `model_class` (and `model_params`) say which module to build.
  """

  def __init__(self, weights: str, model_class: Optional[Callable[..., Any]] = None,
               model_params: Optional[Dict[str, Any]] = None, device: str = 'auto',
               batch_sizes: Optional[Dict[str, int]] = None, large_model: bool = False,
               model_copies: Optional[int] = None, metrics_namespace: str = 'torch'):
    super().__init__()
    if device not in DEVICES:
      raise ValueError(f'device {device!r} is not one of {DEVICES}')
    self._weights = weights
    self._model_class = model_class
    self._model_params = model_params or {}
    self._device_name = device
    self._batch_sizes = dict(DEFAULT_BATCH_SIZES, **(batch_sizes or {}))
    self._large_model = large_model
    self._model_copies = model_copies
    self._namespace = metrics_namespace
    self.device = None  # set on the worker by load_model

  def load_model(self):
    import torch
    self.device = pick_device(self._device_name)
    with FileSystems.open(self._weights, mime_type='application/octet-stream') as handle:
      if self._model_class is None:  # an exported program is traced in inference mode already
        return torch.export.load(handle).module().to(self.device)
      model = self._model_class(**self._model_params)
      model.load_state_dict(torch.load(handle, map_location=self.device, weights_only=True))
    return model.to(self.device).eval()

  def run_inference(self, batch: Sequence[np.ndarray], model,
                    inference_args: Optional[Dict[str, Any]] = None) -> Iterable[PredictionResult]:
    import torch
    if self.device is None:  # the model was loaded in another process (shared large model)
      self.device = pick_device(self._device_name)
    device = self.device
    step = self._batch_sizes[device.type]
    for first in range(0, len(batch), step):
      chunk = batch[first:first + step]
      with torch.inference_mode():
        output = model(torch.from_numpy(np.stack(chunk)).to(device), **(inference_args or {}))
      for example, result in zip(chunk, output.detach().cpu().numpy()):
        yield PredictionResult(example, result)

  def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
    return sum(example.nbytes for example in batch)

  def batch_elements_kwargs(self) -> Dict[str, Any]:
    return {'max_batch_size': max(self._batch_sizes.values())}

  def share_model_across_processes(self) -> bool:
    return self._large_model or bool(self._model_copies)

  def model_copies(self) -> int:
    return self._model_copies or 1

  def get_metrics_namespace(self) -> str:
    return self._namespace
