"""What a person at the terminal sees: native chatter filtered, real errors kept."""
import subprocess
import sys

from tests.helpers import REPO

SCRIPT = r'''
import os, sys
from beam_pipeline import native_log
native_log.filter_native_stderr()
os.write(2, b"WARNING: [model_load.cc:402] Sparsity tensors may not yet be fully supported.\n")
os.write(2, b"INFO: [environment.cc:36] Creating LiteRT environment with options\n")
os.write(2, b"E0000 a real native error\n")
print("python warning", file=sys.stderr)
raise RuntimeError("boom")
'''


def test_native_noise_is_dropped_and_errors_kept():
  result = subprocess.run([sys.executable, '-c', SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert result.returncode == 1
  assert 'Sparsity tensors' not in result.stderr and 'LiteRT environment' not in result.stderr
  assert 'E0000 a real native error' in result.stderr
  assert 'python warning' in result.stderr and 'RuntimeError: boom' in result.stderr


def test_missing_input_is_a_clear_error(tmp_path):
  result = subprocess.run([sys.executable, '-m', 'beam_pipeline', f'--input={tmp_path}/none.jsonl',
                           f'--output={tmp_path}/out'], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1] == f'--input {tmp_path}/none.jsonl does not exist'
