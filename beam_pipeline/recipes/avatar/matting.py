"""RobustVideoMatting (RVM): a person matte for every output frame, from the official TorchScript export.

RVM is a recurrent video model: the matte of a frame depends on the frames before it, through four ConvGRU
states that the call returns and takes back (`fgr, pha, *rec = model(src, *rec, downsample_ratio)`, the
states None on a clip's first frame). So the unit of work is a `MattingChunk`: consecutive frames of one clip
(fed as the T axis of a (1, T, 3, H, W) input) and the state the previous chunk of that clip left. A
`MattingSession` is one clip's pass: it hands its chunks to the model in frame order and keeps the state for
the next chunk; sessions never share a state, so one clip's frames never leak into another's matte.

The user supplies the export (`rvm_mobilenetv3_fp32.torchscript` or `rvm_resnet50_fp32.torchscript`, fp16
exports too) with `--matting_weights`; TorchScript holds code as TorchScript, not pickle. Nothing downloads.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from model_handlers.in_process import ModelError, SharedModel
from model_handlers.torch_handler import pick_device
from model_handlers.weights import WeightsError, load_torchscript

FLAG = '--matting_weights'
WHAT = ('a RobustVideoMatting TorchScript export (rvm_mobilenetv3_fp32.torchscript or '
        'rvm_resnet50_fp32.torchscript from the RVM releases)')
CHUNK_FRAMES = {'cuda': 16, 'cpu': 4}  # frames per model call (time steps of one clip)
MAX_STAGE_ONE_PX = 512  # RVM's guide: downsample so its first stage sees 256-512 px (convert_video's auto rule)
_PROBE_PX = 128


@dataclasses.dataclass
class MattingChunk:
  """Consecutive frames of one clip, and the recurrent state after the clip's previous chunk (None: the start)."""
  frames: np.ndarray  # (T, H, W, 3) uint8 RGB
  state: Optional[Tuple[Any, ...]] = None


@dataclasses.dataclass
class MattingResult:
  alpha: np.ndarray  # (T, H, W) float32 in [0, 1]
  state: Tuple[Any, ...]  # the four recurrent states after the chunk's last frame (on the model's device)


def downsample_ratio(height: int, width: int) -> float:
  """RVM's automatic ratio: the first stage sees at most 512 px on the longer side (1 up to 512 x 512)."""
  return min(MAX_STAGE_ONE_PX / max(height, width), 1.0)


class MattingModelHandler(ModelHandler[MattingChunk, PredictionResult, Any]):
  """MattingChunk -> MattingResult through an RVM TorchScript export, on CUDA when the worker has it.

  Chunks are independent examples (each carries its own state), so this also runs under RunInference; a
  caller that wants temporal consistency hands a clip's chunks in order with the state of the previous one
  (`MattingSession`).
  """

  model_name = 'rvm'

  def __init__(self, weights: str, device: str = 'auto', metrics_namespace: str = 'matting'):
    super().__init__()
    self._weights = weights
    self._device_name = device
    self._namespace = metrics_namespace
    self.device = None
    self._frames = Metrics.counter(metrics_namespace, 'rvm_frames')

  def load_model(self):
    import torch
    self.device = pick_device(self._device_name)
    model = load_torchscript(self._weights, FLAG, WHAT, self.device).eval()
    try:  # a TorchScript archive of some other model fails here, with the flag named, not on the first clip
      with torch.inference_mode():
        probe = torch.zeros((1, 1, 3, _PROBE_PX, _PROBE_PX), dtype=_dtype(model), device=self.device)
        outputs = model(probe, None, None, None, None, 1.0)
      if len(outputs) != 6 or tuple(outputs[1].shape[-2:]) != (_PROBE_PX, _PROBE_PX):
        raise ValueError(f'returned {len(outputs)} outputs, alpha of shape {tuple(outputs[1].shape)}')
    except Exception as error:  # pylint: disable=broad-except  # TorchScript raises many kinds here
      raise WeightsError(FLAG, self._weights, f'does not work as {WHAT}: its call must be '
                         f'`fgr, pha, r1, r2, r3, r4 = model(src, r1, r2, r3, r4, downsample_ratio)` '
                         f'({type(error).__name__}: {str(error)[:200]})') from error
    return model

  def run_inference(self, batch: Sequence[MattingChunk], model,
                    inference_args: Optional[Dict[str, Any]] = None) -> Iterable[PredictionResult]:
    import torch
    if self.device is None:  # loaded in another process (shared model)
      self.device = pick_device(self._device_name)
    for chunk in batch:
      frames = np.asarray(chunk.frames)
      if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f'expected RGB uint8 frames (T, H, W, 3), got {frames.dtype} {frames.shape}')
      with torch.inference_mode():
        src = torch.from_numpy(frames).to(self.device).permute(0, 3, 1, 2).unsqueeze(0)
        src = src.to(_dtype(model)) / 255.0
        state = chunk.state or (None, None, None, None)
        ratio = downsample_ratio(frames.shape[1], frames.shape[2])
        _, pha, *state = model(src, *state, ratio)
        alpha = pha.float().reshape(frames.shape[0], frames.shape[1], frames.shape[2]).clamp(0, 1).cpu().numpy()
      self._frames.inc(len(frames))
      yield PredictionResult(example=None, inference=MattingResult(alpha, tuple(state)), model_id=self.model_name)

  def get_num_bytes(self, batch: Sequence[MattingChunk]) -> int:
    return sum(np.asarray(chunk.frames).nbytes for chunk in batch)

  def batch_elements_kwargs(self) -> Dict[str, Any]:
    return {'max_batch_size': 1}  # one chunk (already T frames) per call: chunks of different clips differ in state

  def get_metrics_namespace(self) -> str:
    return self._namespace

  def chunk_frames(self) -> int:
    """Frames per model call on the device the model loaded on (known on the worker only)."""
    return CHUNK_FRAMES['cuda' if self.device is not None and self.device.type == 'cuda' else 'cpu']


def _dtype(model):
  """The export's precision (fp32 or fp16); a frozen model without parameters is taken as fp32."""
  import torch
  for parameter in model.parameters():
    return parameter.dtype
  return torch.float32


class MattingSession:
  """One clip's frames through RVM in order, the recurrent state carried from chunk to chunk."""

  def __init__(self, model: SharedModel):
    self.model = model
    self.state: Optional[Tuple[Any, ...]] = None

  def matte(self, frames: List[np.ndarray]) -> List[Any]:
    """Alpha (H, W) float32 per frame, in order, or the `ModelError` standing for each frame of a failed chunk
    (the state then stays where the last good chunk left it)."""
    alphas: List[Any] = []
    step = self.model.handler.chunk_frames()
    for first in range(0, len(frames), step):
      chunk = frames[first:first + step]
      result = self.model.infer([MattingChunk(np.stack(chunk), self.state)])[0]
      if isinstance(result, ModelError):
        alphas += [result] * len(chunk)
      else:
        self.state = result.state
        alphas += list(result.alpha)
    return alphas
