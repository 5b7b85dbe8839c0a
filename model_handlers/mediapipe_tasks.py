"""MediaPipe's Python tasks, imported with TensorFlow hidden.

mediapipe imports TensorFlow whenever it is installed (for its API docs and gfile), which costs about 6 s of CPU in
every process that loads a MediaPipe model; the DeepSpeech extra installs TensorFlow. mediapipe falls back to plain
files without it, so it is hidden for that import unless something in the process has already loaded it.
"""
import importlib
import sys
import threading


_LOCK = threading.Lock()
_TASKS = []  # the module once fully imported: sys.modules holds it half-imported while another thread imports it


def tasks():
  """The `mediapipe.tasks.python` module (BaseOptions, vision)."""
  if _TASKS:
    return _TASKS[0]
  with _LOCK:
    if not _TASKS:
      hide = 'tensorflow' not in sys.modules
      if hide:
        sys.modules['tensorflow'] = None  # `import tensorflow` now raises ModuleNotFoundError, which mediapipe handles
      try:
        loaded = importlib.import_module('mediapipe.tasks.python')
        importlib.import_module('mediapipe.tasks.python.vision')  # its metadata module also tries TensorFlow
      finally:
        if hide and sys.modules.get('tensorflow', False) is None:
          del sys.modules['tensorflow']
      _TASKS.append(loaded)
  return _TASKS[0]


def image(data):
  """A MediaPipe SRGB image of an RGB uint8 array."""
  tasks()
  import mediapipe as mp
  return mp.Image(image_format=mp.ImageFormat.SRGB, data=data)
