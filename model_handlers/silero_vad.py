"""Silero VAD (the `silero-vad` wheel, which ships its model): 16 kHz mono samples -> speech probabilities.

The model file comes from the installed wheel (`silero_vad/data/silero_vad.onnx`), never from the network; it
runs in onnxruntime on the CPU, where it took 45 ms per second of audio against the TorchScript copy's 75 on
the busy build machine (bench/speech_shots_gaze.py: 1.9 ms per 25 fps frame). One probability per 512-sample window (32 ms). Needs the `vad` extra.
"""
from __future__ import annotations

import numpy as np

from model_handlers.whole_input import WholeInputHandler

RATE = 16000
WINDOW = 512  # samples per probability at 16 kHz


def require_vad(flag: str) -> None:
  """A one-line error where the vad extra is missing, when the pipeline is built (not on a worker)."""
  import importlib.util
  missing = [name for name in ('silero_vad', 'onnxruntime', 'torch') if importlib.util.find_spec(name) is None]
  if missing:
    raise SystemExit(f'{flag} needs the vad extra (pip install ".[vad]"); missing: {", ".join(missing)}')


def load_vad():
  """The wheel's ONNX model on the CPU. Importing `silero_vad` sets torch's thread count to 1 for the
  whole process; the count is put back, so the worker's other torch models keep theirs."""
  try:
    import torch
    threads = torch.get_num_threads()
    from silero_vad import load_silero_vad
  except ImportError as error:
    raise SystemExit(f'--vad needs the vad extra (pip install ".[vad]"): {error}') from error
  torch.set_num_threads(threads)
  return load_silero_vad(onnx=True)


def speech_probabilities(model, samples: np.ndarray) -> np.ndarray:
  """(ceil(N / 512),) speech probability of each 32 ms window of 16 kHz float samples, from a fresh state."""
  import torch
  if len(samples) < WINDOW:
    return np.zeros(0, np.float32)
  model.reset_states()
  with torch.inference_mode():
    probs = model.audio_forward(torch.from_numpy(np.ascontiguousarray(samples, np.float32)), sr=RATE)
  return probs.reshape(-1).numpy().astype(np.float32)


class SileroVadModelHandler(WholeInputHandler):
  """(N,) float32 16 kHz samples -> PredictionResult whose inference is the (windows,) speech probabilities.
  One clip's audio at a time: the model keeps a recurrent state across windows, reset for each clip."""

  model_name = 'silero_vad'
  namespace = 'speech'

  def load_model(self):
    return load_vad()

  def infer(self, model, example: np.ndarray) -> np.ndarray:
    return speech_probabilities(model, example)
