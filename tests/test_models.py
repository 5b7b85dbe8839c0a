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
