"""Per-frame depth for the nerf recipe, from user-supplied weights (`--depth`).

Two forms:
- DaGAN's face-depth network (harlanhong/CVPR2022-DaGAN, `depth/`), which is monodepth2's: a ResNet-18
  encoder (`encoder.pth`: torchvision's resnet keys under `encoder.`, plus monodepth2's `height`, `width`,
  `use_stereo` entries and the unused classifier `encoder.fc.*`, which are ignored as monodepth2's loader
  filters them) and a U-Net decoder (`depth.pth`: `decoder.<n>.conv.conv.*` blocks, `decoder.10-13.conv.*`
  disparity heads). Written here in plain torch with the published key names. Frames are resized to
  256 x 256 in [0, 1] as DaGAN's demo feeds them, and the result is what DaGAN itself uses as the depth
  map: the scale-0 sigmoid output `("disp", 0)` in (0, 1), larger = nearer, resized back to the frame.
  DaGAN never turns it into metric depth, so neither do we.
- Any TorchScript model mapping a (B, 3, H, W) float image in [0, 1] (the frame at its own size) to a
  (B, 1, h, w) or (B, h, w) depth map; its output is resized to the frame when h, w differ.

Either way the handler returns one float32 H x W map per RGB uint8 H x W x 3 frame.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Iterable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from model_handlers.torch_handler import pick_device
from model_handlers.weights import WeightsError, is_remote, is_torchscript, load_into, load_torch_state, load_torchscript, \
  require_files

FLAG = '--depth'
WHAT = ('DaGAN\'s depth network (a folder holding encoder.pth and depth.pth, as in DaGAN\'s '
        'depth/models/weights_19) or a TorchScript file mapping an image to a depth map')
ENCODER_FILE = 'encoder.pth'
DECODER_FILE = 'depth.pth'
DAGAN_INPUT_SIZE = 256
# Entries of monodepth2's encoder.pth that are not encoder weights (monodepth2 and DaGAN filter them out).
ENCODER_EXTRAS = ('height', 'width', 'use_stereo', 'encoder.fc.weight', 'encoder.fc.bias')
ENCODER_CHANNELS = (64, 64, 128, 256, 512)
DECODER_CHANNELS = (16, 32, 64, 128, 256)
SCALES = 4  # DaGAN's decoder is built with scales=range(4); only scale 0 (full size) is used
BATCH_SIZES = {'cuda': 32, 'cpu': 4}


class BasicBlock(nn.Module):
  """torchvision's ResNet basic block (same attribute names, so the same state-dict keys)."""

  def __init__(self, inplanes: int, planes: int, stride: int = 1):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.relu = nn.ReLU(inplace=True)
    self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.downsample = None
    if stride != 1 or inplanes != planes:
      self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

  def forward(self, x):
    out = self.relu(self.bn1(self.conv1(x)))
    out = self.bn2(self.conv2(out))
    return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
  """torchvision's resnet18 trunk without its classifier (conv1, bn1, layer1-4: the same keys)."""

  def __init__(self):
    super().__init__()
    self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
    self.bn1 = nn.BatchNorm2d(64)
    self.relu = nn.ReLU(inplace=True)
    self.maxpool = nn.MaxPool2d(3, 2, 1)
    inplanes = 64
    for number, planes in enumerate(ENCODER_CHANNELS[1:], start=1):
      stride = 1 if number == 1 else 2
      setattr(self, f'layer{number}', nn.Sequential(BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes)))
      inplanes = planes


class ResnetEncoder(nn.Module):
  """monodepth2's ResnetEncoder(18): the five feature maps of a ResNet-18 on an ImageNet-normalised image."""

  def __init__(self):
    super().__init__()
    self.encoder = ResNet18()

  def forward(self, image):
    net = self.encoder
    features = [net.relu(net.bn1(net.conv1((image - 0.45) / 0.225)))]
    features.append(net.layer1(net.maxpool(features[-1])))
    for layer in (net.layer2, net.layer3, net.layer4):
      features.append(layer(features[-1]))
    return features


class Conv3x3(nn.Module):
  """Reflection-padded 3x3 convolution (monodepth2's layers.Conv3x3)."""

  def __init__(self, in_channels: int, out_channels: int):
    super().__init__()
    self.pad = nn.ReflectionPad2d(1)
    self.conv = nn.Conv2d(in_channels, out_channels, 3)

  def forward(self, x):
    return self.conv(self.pad(x))


class ConvBlock(nn.Module):
  """Conv3x3 then ELU (monodepth2's layers.ConvBlock)."""

  def __init__(self, in_channels: int, out_channels: int):
    super().__init__()
    self.conv = Conv3x3(in_channels, out_channels)
    self.nonlin = nn.ELU(inplace=True)

  def forward(self, x):
    return self.nonlin(self.conv(x))


class DepthDecoder(nn.Module):
  """monodepth2's DepthDecoder (skips on, scales 0-3): `decoder` holds, in order, upconv (4, 0), (4, 1), ...
  (0, 0), (0, 1), then the disparity heads of scales 0-3, which is how its keys are numbered."""

  def __init__(self):
    super().__init__()
    blocks = []
    for i in range(4, -1, -1):
      blocks.append(ConvBlock(ENCODER_CHANNELS[-1] if i == 4 else DECODER_CHANNELS[i + 1], DECODER_CHANNELS[i]))
      blocks.append(ConvBlock(DECODER_CHANNELS[i] + (ENCODER_CHANNELS[i - 1] if i > 0 else 0), DECODER_CHANNELS[i]))
    blocks += [Conv3x3(DECODER_CHANNELS[s], 1) for s in range(SCALES)]
    self.decoder = nn.ModuleList(blocks)

  def forward(self, features):
    """The scale-0 disparity ("disp", 0): sigmoid, at the input image's size."""
    x = features[-1]
    for step, i in enumerate(range(4, -1, -1)):
      x = F.interpolate(self.decoder[2 * step](x), scale_factor=2, mode='nearest')
      if i > 0:
        x = torch.cat([x, features[i - 1]], 1)
      x = self.decoder[2 * step + 1](x)
    return torch.sigmoid(self.decoder[10](x))


class DaGANDepth(nn.Module):
  """(B, 3, 256, 256) RGB in [0, 1] -> (B, 1, 256, 256) disparity in (0, 1), DaGAN's depth map."""

  def __init__(self):
    super().__init__()
    self.encoder = ResnetEncoder()
    self.decoder = DepthDecoder()

  def forward(self, image):
    return self.decoder(self.encoder(image))


def _encoder_state(state: Dict) -> Dict:
  """encoder.pth as monodepth2 saves it, less what is not encoder weights; BatchNorm counters that
  pre-1.0 checkpoints lack are filled (they play no part in inference)."""
  state = {key: value for key, value in state.items() if key not in ENCODER_EXTRAS}
  own = ResnetEncoder().state_dict()
  for key, value in own.items():
    if key.endswith('num_batches_tracked') and key not in state:
      state[key] = value
  return state


def load_dagan(folder: str, device=None) -> DaGANDepth:
  """DaGAN's encoder.pth + depth.pth from `folder`, loaded strictly (WeightsError naming --depth)."""
  model = DaGANDepth()
  encoder_path = FileSystems.join(folder, ENCODER_FILE)
  decoder_path = FileSystems.join(folder, DECODER_FILE)
  load_into(model.encoder, _encoder_state(load_torch_state(encoder_path, FLAG, f'{ENCODER_FILE} of {WHAT}')),
            FLAG, encoder_path, 'DaGAN\'s depth encoder (ResNet-18, keys encoder.conv1.weight ...)')
  load_into(model.decoder, load_torch_state(decoder_path, FLAG, f'{DECODER_FILE} of {WHAT}'),
            FLAG, decoder_path, 'DaGAN\'s depth decoder (keys decoder.0.conv.conv.weight ...)')
  return model.to(device or 'cpu').eval()


def check_depth_weights(path: Optional[str]) -> str:
  """`path` (local or gs://) when it names a folder with encoder.pth and depth.pth, or a file; else a
  WeightsError naming --depth (call when the graph is built)."""
  if not path:
    raise WeightsError(FLAG, None, f'not given; pass the path of {WHAT}')
  if _is_folder(path):
    return require_files(path, (ENCODER_FILE, DECODER_FILE), FLAG, WHAT)
  if not FileSystems.exists(path):
    raise WeightsError(FLAG, path, f'no such file or folder; it should hold {WHAT}')
  return path


def _is_folder(path: str) -> bool:
  """A local folder, or a gs:// prefix with something under it that is not itself a file."""
  if not is_remote(path):
    return os.path.isdir(path)
  return not FileSystems.exists(path) and bool(FileSystems.match([path.rstrip('/') + '/*'])[0].metadata_list)


class DepthHandler(ModelHandler[np.ndarray, PredictionResult, Any]):
  """RGB uint8 H x W x 3 frame -> PredictionResult with its float32 H x W depth map (see the module doc for
  what the values are). Frames of one batch share a size (they are one clip's output frames)."""

  model_name = 'depth'

  def __init__(self, path: str, device: str = 'auto', batch_sizes: Optional[Dict[str, int]] = None):
    super().__init__()
    self.path = path
    self._device_name = device
    self._batch_sizes = dict(BATCH_SIZES, **(batch_sizes or {}))
    self.device = None

  def load_model(self):
    check_depth_weights(self.path)
    self.device = pick_device(self._device_name)
    if _is_folder(self.path):
      return load_dagan(self.path, self.device)  # read through FileSystems: local or gs://
    if not is_torchscript(self.path):
      raise WeightsError(FLAG, self.path, f'not a TorchScript archive; it should be {WHAT}')
    return load_torchscript(self.path, FLAG, WHAT, self.device).eval()

  def run_inference(self, batch: Sequence[np.ndarray], model,
                    inference_args: Optional[Dict[str, Any]] = None) -> Iterable[PredictionResult]:
    if self.device is None:
      self.device = pick_device(self._device_name)
    scripted = not isinstance(model, DaGANDepth)
    step = self._batch_sizes[self.device.type]
    for first in range(0, len(batch), step):
      chunk = batch[first:first + step]
      height, width = chunk[0].shape[:2]
      with torch.inference_mode():
        images = torch.from_numpy(np.stack(chunk)).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        if not scripted:
          images = F.interpolate(images, size=(DAGAN_INPUT_SIZE, DAGAN_INPUT_SIZE), mode='bilinear',
                                 align_corners=False, antialias=True)
        output = model(images)
        if isinstance(output, (tuple, list)):
          output = output[0]
        if output.dim() == 3:
          output = output[:, None]
        if output.dim() != 4 or output.shape[1] != 1:
          raise ValueError(f'the depth model gave a {tuple(output.shape)} output; a (B, 1, H, W) or (B, H, W) '
                           'map per image is expected')
        if tuple(output.shape[2:]) != (height, width):
          output = F.interpolate(output.float(), size=(height, width), mode='bilinear', align_corners=False)
        maps = output[:, 0].float().cpu().numpy()
      for frame, depth in zip(chunk, maps):
        yield PredictionResult(frame, depth.astype(np.float32))

  def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
    return sum(frame.nbytes for frame in batch)

  def batch_elements_kwargs(self) -> Dict[str, Any]:
    return {'max_batch_size': max(self._batch_sizes.values())}

  def get_metrics_namespace(self) -> str:
    return 'depth'
