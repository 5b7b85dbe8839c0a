"""Model files by name: official address, sha256, local cache, or a local directory.

A directory given by `--model_dir` or `BEAM_PIPELINE_MODEL_DIR` stands in for
the download (offline machines, CI, baked worker images).
"""
from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import tempfile
import urllib.request
from typing import Dict, Optional

MODEL_DIR_ENV = 'BEAM_PIPELINE_MODEL_DIR'
CACHE_ENV = 'BEAM_PIPELINE_CACHE'
DOWNLOAD_TIMEOUT_S = 120


@dataclasses.dataclass(frozen=True)
class ModelFile:
  filename: str
  url: str
  sha256: str


MODELS: Dict[str, ModelFile] = {
    'face_landmarker': ModelFile(
        'face_landmarker.task',
        'https://storage.googleapis.com/mediapipe-models/face_landmarker/face_landmarker/float16/1/face_landmarker.task',
        '64184e229b263107bc2b804c6625db1341ff2bb731874b0bcc2fe6544e0bc9ff'),
    'face_detector_short_range': ModelFile(
        'face_detection_short_range.tflite',
        'https://storage.googleapis.com/mediapipe-models/face_detector/blaze_face_short_range/float16/1/blaze_face_short_range.tflite',
        'bbff11cebd1eb27a1e004cae0b0e63ec8c551cbf34a4451148b4908b8db3eca8'),
    'face_detector_full_range': ModelFile(
        'face_detection_full_range_sparse.tflite',
        # MediaPipe's asset bucket (the mediapipe 0.10.x wheels ship the same file).
        'https://storage.googleapis.com/mediapipe-assets/face_detection_full_range_sparse.tflite',
        '2c3728e6da56f21e21a320433396fb06d40d9088f2247c05e5635a688d45dfe1'),
    'selfie_segmenter': ModelFile(
        'selfie_segmentation.tflite',
        'https://storage.googleapis.com/mediapipe-models/image_segmenter/selfie_segmenter/float16/latest/selfie_segmenter.tflite',
        '9ee168ec7c8f2a16c56fe8e1cfbc514974cbbb7e434051b455635f1bd1462f5c'),
}


class ModelNotFoundError(FileNotFoundError):
  pass


def sha256_of(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as handle:
    for block in iter(lambda: handle.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def cache_dir() -> str:
  return os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser('~'), '.cache', 'beam_pipeline', 'models')


def resolve(name: str, model_dir: Optional[str] = None) -> str:
  """Local path of a verified model file, downloading it into the cache if needed."""
  spec = MODELS[name]
  model_dir = model_dir or os.environ.get(MODEL_DIR_ENV)
  if model_dir:
    path = os.path.join(model_dir, spec.filename)
    if not os.path.isfile(path):
      raise ModelNotFoundError(
          f'model {spec.filename!r} not found in {model_dir!r} (from --model_dir or ${MODEL_DIR_ENV}); '
          f'download it from {spec.url}')
    _verify(path, spec)
    return path
  path = os.path.join(cache_dir(), spec.filename)
  if os.path.isfile(path) and sha256_of(path) == spec.sha256:
    return path
  _download(spec, path)
  return path


def _verify(path: str, spec: ModelFile) -> None:
  actual = sha256_of(path)
  if actual != spec.sha256:
    raise ModelNotFoundError(f'{path} has sha256 {actual}, expected {spec.sha256} ({spec.url})')


def _download(spec: ModelFile, path: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  logging.info('downloading %s from %s', spec.filename, spec.url)
  handle, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix='.' + spec.filename)
  try:
    with os.fdopen(handle, 'wb') as out, urllib.request.urlopen(spec.url, timeout=DOWNLOAD_TIMEOUT_S) as response:
      for block in iter(lambda: response.read(1 << 20), b''):
        out.write(block)
    _verify(tmp, spec)
    os.replace(tmp, path)
  except Exception as error:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise ModelNotFoundError(
        f'model {spec.filename!r} is not in the cache {os.path.dirname(path)!r} and could not be downloaded '
        f'from {spec.url}: {error}. Give a directory holding it with --model_dir or ${MODEL_DIR_ENV}.') from error


def main() -> None:
  """`python -m model_handlers.registry`: resolve (download if needed) every model file."""
  for name in MODELS:
    print(f'{name}: {resolve(name)}')


if __name__ == '__main__':
  main()
