"""Drop the native libraries' per-frame chatter from stderr, keep everything else.

MediaPipe's TFLite runtime writes warnings such as "Sparsity tensors may not
yet be fully supported" straight to file descriptor 2, once per detection, and
no logging setting reaches them. The CLI routes fd 2 through a pipe and copies
every other line to the real stderr; Python's own stderr (logs, tracebacks)
keeps writing to the real one directly, so nothing it says can be lost at exit.
"""
from __future__ import annotations

import atexit
import os
import re
import sys
import threading

NOISE = re.compile(rb'Sparsity tensors may not yet be fully supported|DestroyAccelerator: ptr=|'
                   rb'Created TensorFlow Lite XNNPACK delegate|Logging before InitGoogle|'
                   rb'^[WI]0000 00:00:|^INFO: \[|'
                   # TensorFlow, when installed (an extra), is imported by mediapipe.tasks and says this once
                   rb'^WARNING: All log messages before absl::InitializeLog|rebuild TensorFlow with the appropriate')


def filter_native_stderr() -> None:
  """Install the filter for this process (and the workers it starts); call once, early."""
  real_stderr = os.dup(2)
  read_end, write_end = os.pipe()
  sys.stderr.flush()
  sys.stderr = os.fdopen(os.dup(real_stderr), 'w', buffering=1)
  os.dup2(write_end, 2)
  os.close(write_end)

  def copy():
    with os.fdopen(read_end, 'rb', buffering=0) as pipe:
      pending = b''
      while True:
        block = pipe.read(65536)
        if not block:
          break
        pending += block
        *lines, pending = pending.split(b'\n')
        kept = [line for line in lines if not NOISE.search(line)]
        if kept:
          os.write(real_stderr, b'\n'.join(kept) + b'\n')
      if pending and not NOISE.search(pending):
        os.write(real_stderr, pending)

  copier = threading.Thread(target=copy, name='native-stderr-filter', daemon=True)
  copier.start()

  def restore():
    """At exit: put the real stderr back (closing the pipe) and let the copier drain it."""
    os.dup2(real_stderr, 2)
    copier.join(timeout=2)

  atexit.register(restore)
