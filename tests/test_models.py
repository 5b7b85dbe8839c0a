"""The model registry: local directory, cache, verified download, clear errors."""
import dataclasses
import hashlib
import os

import pytest

from model_handlers import registry
from tests.helpers import media_server


def test_local_directory_stands_in_for_download():
  path = registry.resolve('face_landmarker')  # conftest points BEAM_PIPELINE_MODEL_DIR at shared models
  assert os.path.basename(path) == 'face_landmarker.task'
  assert registry.sha256_of(path) == registry.MODELS['face_landmarker'].sha256


def test_missing_model_names_file_and_place(tmp_path):
  with pytest.raises(registry.ModelNotFoundError) as error:
    registry.resolve('face_landmarker', model_dir=str(tmp_path))
  message = str(error.value)
  assert 'face_landmarker.task' in message and str(tmp_path) in message and 'https://' in message


def test_download_verifies_sha_and_caches(tmp_path, monkeypatch):
  served = tmp_path / 'served'
  served.mkdir()
  (served / 'tiny.bin').write_bytes(b'model bytes')
  monkeypatch.delenv(registry.MODEL_DIR_ENV, raising=False)
  monkeypatch.setenv(registry.CACHE_ENV, str(tmp_path / 'cache'))
  with media_server(str(served)) as url:
    good = registry.ModelFile('tiny.bin', f'{url}/tiny.bin', hashlib.sha256(b'model bytes').hexdigest())
    monkeypatch.setitem(registry.MODELS, 'tiny', good)
    path = registry.resolve('tiny')
    assert open(path, 'rb').read() == b'model bytes'
    monkeypatch.setitem(registry.MODELS, 'tiny', dataclasses.replace(good, filename='bad.bin', sha256='0' * 64,
                                                                      url=f'{url}/tiny.bin'))
    with pytest.raises(registry.ModelNotFoundError, match='sha256'):
      registry.resolve('tiny')
    assert not os.path.exists(tmp_path / 'cache' / 'bad.bin')


def test_a_failed_graph_is_torn_down_so_garbage_collection_cannot_hang():
  """MediaPipe's close() on a failed graph raises before it forgets the handle; its __del__ then blocked
  forever on the freed graph. The pool finishes the teardown; checked in a child so a hang is a failure."""
  import subprocess
  import sys
  code = '''
import gc
import numpy as np
from model_handlers.mediapipe_face import FaceDetectorModelHandler, TaskPool
from model_handlers import registry
handler = FaceDetectorModelHandler(max_faces=4)
pool = TaskPool(lambda: handler._create(registry.resolve(handler.model_name, None)))
out = pool.map(lambda task, image: handler._infer(task, image), [np.zeros((0, 0, 3), np.uint8)],
               on_error=lambda image, error: type(error).__name__)
del pool
gc.collect()
print('collected', out)
'''
  from tests.helpers import REPO
  result = subprocess.run([sys.executable, '-c', code], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0 and 'collected' in result.stdout, result.stderr[-2000:]


def test_mediapipe_loads_without_tensorflow_which_stays_importable():
  """TensorFlow (the DeepSpeech extra) is installed in the test environment: mediapipe would import it in every
  process that loads a landmarker. It is refused to mediapipe alone, and still imports for whoever asks."""
  import subprocess
  import sys
  script = ('import sys; from model_handlers import mediapipe_tasks; mediapipe_tasks.tasks().vision.FaceLandmarker; '
            'print("tensorflow" in sys.modules); import tensorflow; print(tensorflow.__version__ > "2")')
  run = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert run.returncode == 0, run.stderr
  assert run.stdout.split() == ['False', 'True']
