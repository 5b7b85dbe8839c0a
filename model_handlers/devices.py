"""Which accelerator each model runtime in this environment sees: run it inside the worker image on a GPU host.

`python -m model_handlers.devices` prints one line per runtime (torch, onnxruntime, TensorFlow) that is installed;
with `--require_gpu` it exits 1 when an installed runtime has no GPU, so an image whose torch is the CPU build or
whose onnxruntime lacks the CUDA provider fails the check instead of running every handler on the CPU in silence.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import List, Optional, Tuple


def _torch() -> Tuple[str, bool]:
  import torch
  if torch.cuda.is_available():
    names = ', '.join(torch.cuda.get_device_name(k) for k in range(torch.cuda.device_count()))
    return f'torch {torch.__version__} (CUDA {torch.version.cuda}): {names}', True
  build = f'CUDA {torch.version.cuda} build, no visible GPU' if torch.version.cuda else 'CPU-only build'
  return f'torch {torch.__version__}: {build}', False


def _onnxruntime() -> Tuple[str, bool]:
  import onnxruntime
  available = onnxruntime.get_available_providers()
  return f'onnxruntime {onnxruntime.__version__}: {", ".join(available)}', 'CUDAExecutionProvider' in available


def _tensorflow() -> Tuple[str, bool]:
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # its start-up log would bury the one line
  import tensorflow as tf
  gpus = tf.config.list_physical_devices('GPU')
  return f'tensorflow {tf.__version__}: {len(gpus)} GPU(s)', bool(gpus)


# TensorFlow only runs the DeepSpeech graph, which is small: its CPU build is what the image installs, so a missing
# TensorFlow GPU never fails --require_gpu.
RUNTIMES = (('torch', _torch, True), ('onnxruntime', _onnxruntime, True), ('tensorflow', _tensorflow, False))


def report() -> List[Tuple[str, str, bool, bool]]:
  """(runtime, line, sees a GPU, GPU required) for each installed runtime."""
  rows = []
  for name, probe, needs_gpu in RUNTIMES:
    if importlib.util.find_spec(name) is not None:
      line, gpu = probe()
      rows.append((name, line, gpu, needs_gpu))
  return rows


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m model_handlers.devices', description=__doc__.splitlines()[0])
  parser.add_argument('--require_gpu', action='store_true',
                      help='exit 1 when torch or onnxruntime is installed without a usable GPU')
  args = parser.parse_args(argv)
  rows = report()
  for _, line, _, _ in rows:
    print(line)
  missing = [name for name, _, gpu, needs_gpu in rows if needs_gpu and not gpu]
  if args.require_gpu and missing:
    print(f'error: no GPU for {", ".join(missing)}', file=sys.stderr)
    return 1
  return 0


if __name__ == '__main__':
  sys.exit(main())
