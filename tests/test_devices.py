"""The GPU worker image: its default extras carry every handler's GPU runtime, and the device check it runs tells a
CPU-only runtime apart (here, where torch and onnxruntime are the CPU builds)."""
import ast
import os
import re
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def extras() -> dict:
  tree = ast.parse(open(os.path.join(REPO, 'setup.py')).read())
  call = next(node for node in ast.walk(tree) if isinstance(node, ast.Call) and getattr(node.func, 'id', '') == 'setup')
  return ast.literal_eval(next(k.value for k in call.keywords if k.arg == 'extras_require'))


def requirement_names(requirements) -> set:
  return {re.split(r'[<>=\[ ]', requirement, 1)[0].lower().replace('_', '-') for requirement in requirements}


def test_the_image_installs_the_gpu_extra_by_default():
  """The default build carries torch (PyPI's Linux wheel is the CUDA build), onnxruntime-gpu in place of the CPU
  onnxruntime (both install the `onnxruntime` module), and every model library an extra of a recipe needs."""
  default = re.search(r'^ARG EXTRAS=(\S*)$', open(os.path.join(REPO, 'Dockerfile')).read(), re.M).group(1)
  table = extras()
  gpu = requirement_names(table[default])
  assert 'onnxruntime-gpu' in gpu and 'onnxruntime' not in gpu
  assert 'torch==2.13.0' in table[default]
  needed = set().union(*(requirement_names(table[name]) for name in table if name not in ('test', default)))
  assert needed - {'onnxruntime'} <= gpu, needed - gpu


def test_device_check_names_the_runtimes_without_a_gpu():
  check = [sys.executable, '-m', 'model_handlers.devices']
  shown = subprocess.run(check, capture_output=True, text=True, timeout=120, cwd=REPO)
  assert shown.returncode == 0, shown.stderr
  lines = shown.stdout.splitlines()
  assert any(line.startswith('torch 2.13.0') for line in lines), lines
  assert any(line.startswith('onnxruntime ') and 'CPUExecutionProvider' in line for line in lines), lines
  required = subprocess.run(check + ['--require_gpu'], capture_output=True, text=True, timeout=120, cwd=REPO)
  assert required.returncode == 1
  assert required.stderr.strip().splitlines()[-1] == 'error: no GPU for torch, onnxruntime'
