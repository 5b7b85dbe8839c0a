"""L2CS-Net (Ahmednull/L2CS-Net), MegActor's own gaze model, for the user's gaze360 weights (--l2cs_weights).

The network is written here in plain torch with the published module names (`conv1`, `bn1`, `layer1.0.conv1`,
... `layer4.2.bn3`, `fc_yaw_gaze`, `fc_pitch_gaze`, `fc_finetune`), so the published state dict (a torch.save
of the module's state dict, `L2CSNet_gaze360.pkl`) loads strictly with weights_only=True: never by unpickling
code. The depth is read from the state dict's block names, so every arch L2CS-Net's `getArch` builds (ResNet-18
and 34 with basic blocks, 50/101/152 with bottlenecks; gaze360 is ResNet-50) loads. Its 90 bins of 4 degrees
over -180..180 give yaw and pitch in degrees, as L2CS-Net's demo reads them: the softmax-weighted bin index
x 4 - 180. Input: the face crop at 448 x 448, ImageNet-normalised RGB. Needs the torch extra.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Optional, Sequence

import cv2
import numpy as np
import torch
from apache_beam.ml.inference.base import ModelHandler, PredictionResult
from torch import nn

from model_handlers import weights as weights_lib
from model_handlers.in_process import SharedModel
from model_handlers.torch_handler import pick_device
from transforms.frame_analysis import Frame, ModelAnalyzer, ModelPass, PassResult

FLAG = '--l2cs_weights'
WHAT = "L2CS-Net's gaze360 state dict (L2CSNet_gaze360.pkl, Ahmednull/L2CS-Net)"
BINS = 90
INPUT_PX = 448
_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
_STD = np.array([0.229, 0.224, 0.225], np.float32)


class _Basic(nn.Module):
  expansion = 1

  def __init__(self, cin: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = downsample

  def forward(self, x):
    out = torch.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return torch.relu(out + (self.downsample(x) if self.downsample is not None else x))


class _Bottleneck(nn.Module):
  expansion = 4

  def __init__(self, cin: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.downsample = downsample

  def forward(self, x):
    out = torch.relu(self.bn1(self.conv1(x)))
    out = torch.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(out))
    return torch.relu(out + (self.downsample(x) if self.downsample is not None else x))


class L2CS(nn.Module):
  """ResNet trunk with two 90-bin heads (yaw, pitch); `fc_finetune` is the published vestigial layer, kept so the
  published state dict loads strictly."""

  def __init__(self, layers: Sequence[int] = (3, 4, 6, 3), bottleneck: bool = True, bins: int = BINS):
    super().__init__()
    block = _Bottleneck if bottleneck else _Basic
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    cin = 64
    stages = []
    for index, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
      stride = 1 if index == 0 else 2
      downsample = None
      if stride != 1 or cin != planes * block.expansion:
        downsample = nn.Sequential(nn.Conv2d(cin, planes * block.expansion, 1, stride, bias=False),
                                   nn.BatchNorm2d(planes * block.expansion))
      stage = [block(cin, planes, stride, downsample)]
      cin = planes * block.expansion
      stage += [block(cin, planes) for _ in range(1, blocks)]
      stages.append(nn.Sequential(*stage))
    self.layer1, self.layer2, self.layer3, self.layer4 = stages
    self.fc_yaw_gaze = nn.Linear(cin, bins)
    self.fc_pitch_gaze = nn.Linear(cin, bins)
    self.fc_finetune = nn.Linear(cin + 3, 3)

  def forward(self, x):
    x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    x = torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)
    return self.fc_yaw_gaze(x), self.fc_pitch_gaze(x)


def arch_of(state: Dict[str, Any]) -> Optional[tuple]:
  """(blocks per stage, bottleneck) from the state dict's key names; None when they are not L2CS-Net's."""
  blocks = [1 + max((int(m.group(1)) for key in state for m in [re.match(rf'layer{i}\.(\d+)\.', key)] if m),
                    default=-1) for i in range(1, 5)]
  if min(blocks) < 1 or 'fc_yaw_gaze.weight' not in state:
    return None
  return tuple(blocks), 'layer1.0.conv3.weight' in state


def load_l2cs(path: str, device=None) -> L2CS:
  """The user's L2CS-Net state dict in a module of its depth, strictly; a WeightsError naming --l2cs_weights."""
  weights_lib.require(path, FLAG, WHAT)
  state = weights_lib.load_torch_state(path, FLAG, WHAT)
  state = {key[len('module.'):] if key.startswith('module.') else key: value for key, value in state.items()}
  arch = arch_of(state)
  if arch is None:
    raise weights_lib.WeightsError(FLAG, path, f'not an L2CS-Net state dict (no layer1-4 blocks and fc_yaw_gaze '
                                   f'among its {len(state)} keys); it should hold {WHAT}')
  model = weights_lib.load_into(L2CS(*arch), state, FLAG, path, WHAT)
  return model.to(device or pick_device()).eval()


def face_input(image: np.ndarray, box: np.ndarray) -> np.ndarray:
  """(3, 448, 448) float32: the face box (made square, 10% wider) cut from the RGB frame, resized and
  ImageNet-normalised, as L2CS-Net's demo feeds it."""
  cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
  half = max(box[2] - box[0], box[3] - box[1]) * 0.55
  x0, y0 = int(max(0, cx - half)), int(max(0, cy - half))
  x1, y1 = int(min(image.shape[1], cx + half)), int(min(image.shape[0], cy + half))
  crop = cv2.resize(np.ascontiguousarray(image[y0:y1, x0:x1]), (INPUT_PX, INPUT_PX), interpolation=cv2.INTER_AREA)
  return ((crop.astype(np.float32) / 255 - _MEAN) / _STD).transpose(2, 0, 1)


def angles(logits: torch.Tensor) -> torch.Tensor:
  """(B, 90) bin logits -> (B,) degrees: the softmax-weighted bin index x 4 - 180."""
  return (torch.softmax(logits, 1) * torch.arange(logits.shape[1], device=logits.device)).sum(1) * 4 - 180


class L2CSModelHandler(ModelHandler[np.ndarray, PredictionResult, Any]):
  """(3, 448, 448) face input -> PredictionResult whose inference is (yaw, pitch) in degrees."""

  def __init__(self, weights: str, device: str = 'auto', batch_size: int = 16):
    super().__init__()
    self._weights, self._device, self._batch_size = weights, device, batch_size

  def load_model(self):
    return load_l2cs(self._weights, pick_device(self._device))

  def run_inference(self, batch: Sequence[np.ndarray], model: Any,
                    inference_args: Optional[Dict[str, Any]] = None) -> Iterable[PredictionResult]:
    device = next(model.parameters()).device
    with torch.inference_mode():
      yaw, pitch = model(torch.from_numpy(np.stack(batch)).to(device))
      found = torch.stack([angles(yaw), angles(pitch)], 1).cpu().numpy()
    for row in found:
      yield PredictionResult(example=None, inference=row, model_id='l2cs')

  def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
    return sum(item.nbytes for item in batch)

  def get_metrics_namespace(self) -> str:
    return 'megactor'

  def batch_elements_kwargs(self) -> Dict[str, Any]:
    return {'min_batch_size': 1, 'max_batch_size': self._batch_size}


class _GazePass(ModelPass):

  def __init__(self, model: SharedModel, num_frames: int):
    super().__init__(model)
    self.gaze = np.full((num_frames, 2), np.nan, np.float32)

  def add(self, frames: List[Frame]) -> None:
    with_face = [f for f in frames if 'landmarks' in f.found and f.index < len(self.gaze)]
    inputs = []
    for frame in with_face:
      points = frame.found['landmarks'][:, :2]
      inputs.append(face_input(frame.image, np.concatenate([points.min(0), points.max(0)])))
    for frame, result in zip(with_face, self.model.infer(inputs)):
      if isinstance(result, np.ndarray):
        self.gaze[frame.index] = result
      else:
        self.errors.append(result)

  def finish(self, num_frames: int) -> PassResult:
    return self.result({'l2cs_gaze': self.gaze[:num_frames]})


class L2CSGaze(ModelAnalyzer):
  """L2CS-Net on the tracked face of every output frame (after FaceLandmarks): the clip's `l2cs_gaze` array
  (T, 2) yaw and pitch in degrees, which MegActor's eye-motion score then reads instead of the iris landmarks."""

  name = 'l2cs'

  def start(self, task, num_frames: int, size: int):
    return _GazePass(self.model, num_frames)
