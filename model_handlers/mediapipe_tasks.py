"""MediaPipe's Python tasks, imported without TensorFlow.

mediapipe imports TensorFlow whenever it is installed (for its API docs and gfile), which costs about 6 s of CPU in
every process that loads a MediaPipe model; the DeepSpeech extra installs TensorFlow. mediapipe falls back to plain
files without it, so an import finder refuses TensorFlow to mediapipe's own modules, and to them only: a finder
decides per import on the importing thread's stack, where hiding the module in sys.modules would hide it from every
thread of the process while mediapipe loads.
"""
import importlib
import importlib.abc
import sys


class _NoTensorFlowForMediaPipe(importlib.abc.MetaPathFinder):

  def find_spec(self, name, path=None, target=None):
    if name.partition('.')[0] != 'tensorflow':
      return None
    frame = sys._getframe(1)
    while frame is not None:
      if frame.f_globals.get('__name__', '').startswith('mediapipe.'):
        raise ModuleNotFoundError(f'No module named {name!r} (not loaded for mediapipe)', name=name)
      frame = frame.f_back
    return None


if not any(isinstance(finder, _NoTensorFlowForMediaPipe) for finder in sys.meta_path):
  sys.meta_path.insert(0, _NoTensorFlowForMediaPipe())


def tasks():
  """The `mediapipe.tasks.python` module (BaseOptions, vision)."""
  importlib.import_module('mediapipe.tasks.python.vision')
  return importlib.import_module('mediapipe.tasks.python')


def image(data):
  """A MediaPipe SRGB image of an RGB uint8 array."""
  tasks()
  import mediapipe as mp
  return mp.Image(image_format=mp.ImageFormat.SRGB, data=data)
