"""BiSeNet face parsing (zllrunning/face-parsing.PyTorch) for user-supplied `79999_iter.pth`.

The architecture is written here in plain torch with the published module names, so the published state
dict loads strictly (`cp.resnet.conv1.weight`, `ffm.convblk.conv.weight`, `conv_out.conv_out.weight`, ...).
Unlike the original, building it never downloads ImageNet ResNet-18 weights: every weight comes from the
user's file. A TorchScript export of the same network (its first output the 19-class logits) loads too.
Input as the original's test.py: RGB resized to 512 x 512 (bilinear, antialiased like PIL), ImageNet
mean/std; output the argmax of the first head, resized back to the frame (nearest). Needs the torch extra.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler, PredictionResult
from torch import nn

from model_handlers import weights as weights_lib
from model_handlers.torch_handler import pick_device

FLAG = '--parsing_weights'
WHAT = ("face-parsing.PyTorch's BiSeNet(n_classes=19) weights: the state dict 79999_iter.pth, or a TorchScript "
        'export of that network')
NUM_CLASSES = 19
INPUT_SIZE = 512
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
BATCH_SIZES = {'cuda': 32, 'cpu': 4}


class ConvBNReLU(nn.Module):

  def __init__(self, in_chan: int, out_chan: int, ks: int = 3, stride: int = 1, padding: int = 1):
    super().__init__()
    self.conv = nn.Conv2d(in_chan, out_chan, kernel_size=ks, stride=stride, padding=padding, bias=False)
    self.bn = nn.BatchNorm2d(out_chan)

  def forward(self, x):
    return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):

  def __init__(self, in_chan: int, out_chan: int, stride: int = 1):
    super().__init__()
    self.conv1 = nn.Conv2d(in_chan, out_chan, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(out_chan)
    self.conv2 = nn.Conv2d(out_chan, out_chan, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(out_chan)
    self.downsample = None
    if in_chan != out_chan or stride != 1:
      self.downsample = nn.Sequential(nn.Conv2d(in_chan, out_chan, 1, stride, bias=False), nn.BatchNorm2d(out_chan))

  def forward(self, x):
    residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    shortcut = x if self.downsample is None else self.downsample(x)
    return F.relu(shortcut + residual)


def _layer(in_chan: int, out_chan: int, blocks: int, stride: int) -> nn.Sequential:
  return nn.Sequential(BasicBlock(in_chan, out_chan, stride),
                       *[BasicBlock(out_chan, out_chan) for _ in range(blocks - 1)])


class Resnet18(nn.Module):
  """ResNet-18 trunk returning the 1/8, 1/16 and 1/32 features (no fc)."""

  def __init__(self):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
    self.layer1 = _layer(64, 64, 2, 1)
    self.layer2 = _layer(64, 128, 2, 2)
    self.layer3 = _layer(128, 256, 2, 2)
    self.layer4 = _layer(256, 512, 2, 2)

  def forward(self, x):
    x = self.layer1(self.maxpool(F.relu(self.bn1(self.conv1(x)))))
    feat8 = self.layer2(x)
    feat16 = self.layer3(feat8)
    return feat8, feat16, self.layer4(feat16)


class AttentionRefinementModule(nn.Module):

  def __init__(self, in_chan: int, out_chan: int):
    super().__init__()
    self.conv = ConvBNReLU(in_chan, out_chan)
    self.conv_atten = nn.Conv2d(out_chan, out_chan, kernel_size=1, bias=False)
    self.bn_atten = nn.BatchNorm2d(out_chan)

  def forward(self, x):
    feat = self.conv(x)
    attention = torch.sigmoid(self.bn_atten(self.conv_atten(feat.mean(dim=(2, 3), keepdim=True))))
    return feat * attention


class ContextPath(nn.Module):

  def __init__(self):
    super().__init__()
    self.resnet = Resnet18()
    self.arm16 = AttentionRefinementModule(256, 128)
    self.arm32 = AttentionRefinementModule(512, 128)
    self.conv_head32 = ConvBNReLU(128, 128)
    self.conv_head16 = ConvBNReLU(128, 128)
    self.conv_avg = ConvBNReLU(512, 128, ks=1, padding=0)

  def forward(self, x):
    feat8, feat16, feat32 = self.resnet(x)
    avg = self.conv_avg(feat32.mean(dim=(2, 3), keepdim=True))
    feat32_sum = self.arm32(feat32) + F.interpolate(avg, feat32.shape[2:], mode='nearest')
    feat32_up = self.conv_head32(F.interpolate(feat32_sum, feat16.shape[2:], mode='nearest'))
    feat16_sum = self.arm16(feat16) + feat32_up
    feat16_up = self.conv_head16(F.interpolate(feat16_sum, feat8.shape[2:], mode='nearest'))
    return feat8, feat16_up, feat32_up


class FeatureFusionModule(nn.Module):

  def __init__(self, in_chan: int, out_chan: int):
    super().__init__()
    self.convblk = ConvBNReLU(in_chan, out_chan, ks=1, padding=0)
    self.conv1 = nn.Conv2d(out_chan, out_chan // 4, kernel_size=1, bias=False)
    self.conv2 = nn.Conv2d(out_chan // 4, out_chan, kernel_size=1, bias=False)

  def forward(self, fsp, fcp):
    feat = self.convblk(torch.cat([fsp, fcp], dim=1))
    attention = torch.sigmoid(self.conv2(F.relu(self.conv1(feat.mean(dim=(2, 3), keepdim=True)))))
    return feat * attention + feat


class BiSeNetOutput(nn.Module):

  def __init__(self, in_chan: int, mid_chan: int, n_classes: int):
    super().__init__()
    self.conv = ConvBNReLU(in_chan, mid_chan)
    self.conv_out = nn.Conv2d(mid_chan, n_classes, kernel_size=1, bias=False)

  def forward(self, x):
    return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
  """face-parsing.PyTorch's BiSeNet: the ResNet's 1/8 feature stands in for the spatial path; three heads
  (fused, 1/8, 1/16), each upsampled to the input size."""

  def __init__(self, n_classes: int = NUM_CLASSES):
    super().__init__()
    self.cp = ContextPath()
    self.ffm = FeatureFusionModule(256, 256)
    self.conv_out = BiSeNetOutput(256, 256, n_classes)
    self.conv_out16 = BiSeNetOutput(128, 64, n_classes)
    self.conv_out32 = BiSeNetOutput(128, 64, n_classes)

  def forward(self, x):
    size = x.shape[2:]
    feat_res8, feat_cp8, feat_cp16 = self.cp(x)
    outputs = (self.conv_out(self.ffm(feat_res8, feat_cp8)), self.conv_out16(feat_cp8), self.conv_out32(feat_cp16))
    return tuple(F.interpolate(out, size, mode='bilinear', align_corners=True) for out in outputs)


def load_bisenet(path: str, device=None):
  """The user's BiSeNet in eval mode on `device`: TorchScript when the file is an archive with code, else the
  published state dict loaded strictly. Errors are WeightsErrors naming --parsing_weights."""
  weights_lib.require(path, FLAG, WHAT)
  device = device or torch.device('cpu')
  if weights_lib.is_torchscript(path):
    return weights_lib.load_torchscript(path, FLAG, WHAT, device).eval()
  state = weights_lib.load_torch_state(path, FLAG, WHAT)
  return weights_lib.load_into(BiSeNet(NUM_CLASSES), state, FLAG, path, WHAT).to(device).eval()


class FaceParsingModelHandler(ModelHandler[np.ndarray, PredictionResult, Any]):
  """RGB uint8 (H, W, 3) frame -> uint8 (H, W) map of the 19 face-parsing classes."""

  model_name = 'face_parsing'

  def __init__(self, weights: str, device: str = 'auto', batch_sizes: Optional[Dict[str, int]] = None,
               input_size: int = INPUT_SIZE, metrics_namespace: str = 'parsing'):
    """`input_size`: the side frames are resized to; the published weights were trained at 512."""
    super().__init__()
    self.weights = weights
    self._input_size = input_size
    self._device_name = device
    self._batch_sizes = dict(BATCH_SIZES, **(batch_sizes or {}))
    self._namespace = metrics_namespace
    self._frames = Metrics.counter(metrics_namespace, f'{self.model_name}_frames')
    self.device = None  # set on the worker by load_model

  def load_model(self):
    self.device = pick_device(self._device_name)
    return load_bisenet(self.weights, self.device)

  def run_inference(self, batch: Sequence[np.ndarray], model,
                    inference_args: Optional[Dict[str, Any]] = None) -> Iterable[PredictionResult]:
    if self.device is None:
      self.device = pick_device(self._device_name)
    step = self._batch_sizes[self.device.type]
    for first in range(0, len(batch), step):
      chunk = batch[first:first + step]
      for parsing in self._parse(model, chunk):
        self._frames.inc()
        yield PredictionResult(example=None, inference=parsing, model_id=self.model_name)

  def _parse(self, model, images: Sequence[np.ndarray]) -> list:
    mean = torch.tensor(MEAN, device=self.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=self.device).view(1, 3, 1, 1)
    with torch.inference_mode():
      inputs = torch.cat([_to_input(image, self.device, self._input_size) for image in images])
      output = model((inputs - mean) / std)
      logits = output[0] if isinstance(output, (tuple, list)) else output
      if logits.ndim != 4 or logits.shape[1] != NUM_CLASSES:
        raise ValueError(f'the parsing model returned {tuple(logits.shape)}, expected (N, {NUM_CLASSES}, H, W)')
      labels = logits.argmax(dim=1, keepdim=True).to(torch.uint8)
      return [F.interpolate(labels[i:i + 1], image.shape[:2], mode='nearest')[0, 0].cpu().numpy()
              for i, image in enumerate(images)]

  def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
    return sum(image.nbytes for image in batch)

  def batch_elements_kwargs(self) -> Dict[str, Any]:
    return {'max_batch_size': max(self._batch_sizes.values())}

  def get_metrics_namespace(self) -> str:
    return self._namespace


def _to_input(image: np.ndarray, device, size: int) -> torch.Tensor:
  """(1, 3, size, size) float in [0, 1]: PIL's BILINEAR resize (antialiased when shrinking) as the original."""
  if np.ndim(image) != 3 or np.shape(image)[2] != 3 or np.asarray(image).dtype != np.uint8:
    raise ValueError(f'expected an RGB uint8 frame (H, W, 3), got shape {np.shape(image)}')
  tensor = torch.from_numpy(np.ascontiguousarray(image)).to(device).permute(2, 0, 1)[None].float() / 255.0
  if tensor.shape[2:] == (size, size):
    return tensor
  resized = F.interpolate(tensor, (size, size), mode='bilinear', align_corners=False, antialias=True)
  return torch.round(resized.clamp(0, 1) * 255.0) / 255.0  # PIL hands ToTensor 8-bit pixels
