"""SyncNet (joonson/syncnet_python) for the user's `syncnet_v2.model`: lip and audio embeddings.

The network is written here in plain torch with the published module names, so the published state dict
(`netcnnaud.0.weight`, `netfcaud.0.weight`, `netcnnlip.0.weight`, `netfclip.3.bias`, ...; a torch.save of the
module's state dict) loads strictly. A TorchScript module with `forward_lip` and `forward_aud` methods loads
too. Inputs as syncnet_python hands them: 5 frames of the 224 x 224 BGR face crop (0-255, no normalisation)
and a (13, 20) MFCC window (transforms/lib/avsync.py makes both). Needs the torch extra.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
import torch
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult
from torch import nn

from model_handlers import weights as weights_lib
from model_handlers.torch_handler import pick_device
from transforms.lib.avsync import AUDIO, EMBEDDING, LIP

FLAG = '--syncnet_weights'
WHAT = "joonson/syncnet_python's SyncNet weights: the state dict syncnet_v2.model, or a TorchScript export " \
       'with forward_lip and forward_aud'
BATCH_SIZES = {'cuda': 64, 'cpu': 8}


def _conv2d(cin: int, cout: int, kernel, stride=(1, 1), padding=(1, 1)):
  return [nn.Conv2d(cin, cout, kernel_size=kernel, stride=stride, padding=padding), nn.BatchNorm2d(cout),
          nn.ReLU(inplace=True)]


def _conv3d(cin: int, cout: int, kernel, stride=(1, 1, 1), padding=(0, 1, 1)):
  return [nn.Conv3d(cin, cout, kernel_size=kernel, stride=stride, padding=padding), nn.BatchNorm3d(cout),
          nn.ReLU(inplace=True)]


def _head(size: int) -> nn.Sequential:
  return nn.Sequential(nn.Linear(512, 512), nn.BatchNorm1d(512), nn.ReLU(), nn.Linear(512, size))


class SyncNet(nn.Module):
  """The two-stream SyncNet: audio (1, 13, 20) MFCC -> 1024, video (3, 5, 224, 224) -> 1024. The module
  indices inside each Sequential match the published ones, pooling layers included."""

  def __init__(self, size: int = EMBEDDING):
    super().__init__()
    self.netcnnaud = nn.Sequential(
        *_conv2d(1, 64, 3), nn.MaxPool2d(kernel_size=1, stride=1),
        *_conv2d(64, 192, 3), nn.MaxPool2d(kernel_size=3, stride=(1, 2)),
        *_conv2d(192, 384, 3), *_conv2d(384, 256, 3), *_conv2d(256, 256, 3), nn.MaxPool2d(kernel_size=3, stride=2),
        *_conv2d(256, 512, (5, 4), padding=0))
    self.netfcaud = _head(size)
    self.netfclip = _head(size)
    self.netcnnlip = nn.Sequential(
        *_conv3d(3, 96, (5, 7, 7), stride=(1, 2, 2), padding=0), nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2)),
        *_conv3d(96, 256, (1, 5, 5), stride=(1, 2, 2)), nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),
        *_conv3d(256, 256, (1, 3, 3)), *_conv3d(256, 256, (1, 3, 3)), *_conv3d(256, 256, (1, 3, 3)),
        nn.MaxPool3d((1, 3, 3), stride=(1, 2, 2)),
        *_conv3d(256, 512, (1, 6, 6), padding=0))

  def forward(self, lips: torch.Tensor, audio: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    return self.forward_lip(lips), self.forward_aud(audio)

  @torch.jit.export
  def forward_aud(self, x: torch.Tensor) -> torch.Tensor:
    return self.netfcaud(self.netcnnaud(x).flatten(1))

  @torch.jit.export
  def forward_lip(self, x: torch.Tensor) -> torch.Tensor:
    return self.netfclip(self.netcnnlip(x).flatten(1))


def load_syncnet(path: str, device=None):
  """The user's SyncNet in eval mode: TorchScript when the file is an archive with code, else the published
  state dict loaded strictly. Errors are WeightsErrors naming --syncnet_weights."""
  weights_lib.require(path, FLAG, WHAT)
  device = device or torch.device('cpu')
  if weights_lib.is_torchscript(path):
    model = weights_lib.load_torchscript(path, FLAG, WHAT, device)
    if not (hasattr(model, 'forward_lip') and hasattr(model, 'forward_aud')):
      raise weights_lib.WeightsError(FLAG, path, f'the TorchScript module has no forward_lip/forward_aud ({WHAT})')
    return model.eval()
  state = weights_lib.load_torch_state(path, FLAG, WHAT)
  return weights_lib.load_into(SyncNet(), state, FLAG, path, WHAT, strip_prefixes=('module.', '__S__.')) \
      .to(device).eval()


class SyncNetModelHandler(ModelHandler[Tuple[str, np.ndarray], PredictionResult, Any]):
  """(kind, input) -> float32 (1024,) embedding. kind `lip`: uint8 (5, 224, 224, 3) BGR face crops;
  `audio`: float32 (13, 20) MFCC window. A batch may mix both kinds (each runs through its own stream)."""

  model_name = 'syncnet'

  def __init__(self, weights: str, device: str = 'auto', batch_sizes: Optional[Dict[str, int]] = None,
               metrics_namespace: str = 'syncnet'):
    super().__init__()
    self.weights = weights
    self._device_name = device
    self._batch_sizes = dict(BATCH_SIZES, **(batch_sizes or {}))
    self._namespace = metrics_namespace
    self._windows = Metrics.counter(metrics_namespace, f'{self.model_name}_windows')
    self.device = None  # set on the worker by load_model

  def load_model(self):
    self.device = pick_device(self._device_name)
    return load_syncnet(self.weights, self.device)

  def run_inference(self, batch: Sequence[Tuple[str, np.ndarray]], model,
                    inference_args: Optional[Dict[str, Any]] = None) -> Iterable[PredictionResult]:
    if self.device is None:
      self.device = pick_device(self._device_name)
    step = self._batch_sizes[self.device.type]
    results: list = [None] * len(batch)
    for kind in (LIP, AUDIO):
      picked = [i for i, (k, _) in enumerate(batch) if k == kind]
      for first in range(0, len(picked), step):
        chunk = picked[first:first + step]
        for i, embedding in zip(chunk, self._embed(model, kind, [batch[i][1] for i in chunk])):
          results[i] = embedding
    unknown = [k for k, _ in batch if k not in (LIP, AUDIO)]
    if unknown:
      raise ValueError(f'unknown SyncNet input kind {unknown[0]!r} (expected {LIP!r} or {AUDIO!r})')
    self._windows.inc(len(batch))
    for result in results:
      yield PredictionResult(example=None, inference=result, model_id=self.model_name)

  def _embed(self, model, kind: str, inputs: Sequence[np.ndarray]) -> np.ndarray:
    with torch.inference_mode():
      if kind == LIP:  # (N, 5, H, W, 3) -> (N, 3, 5, H, W)
        x = torch.from_numpy(np.stack(inputs)).to(self.device).permute(0, 4, 1, 2, 3).float()
        out = model.forward_lip(x)
      else:
        x = torch.from_numpy(np.stack(inputs).astype(np.float32)).to(self.device)[:, None]
        out = model.forward_aud(x)
    return out.float().cpu().numpy()

  def get_num_bytes(self, batch: Sequence[Tuple[str, np.ndarray]]) -> int:
    return sum(array.nbytes for _, array in batch)

  def batch_elements_kwargs(self) -> Dict[str, Any]:
    return {'max_batch_size': max(self._batch_sizes.values())}

  def get_metrics_namespace(self) -> str:
    return self._namespace
