"""Atomic writes to local paths or any Beam FileSystems URI (gs://...)."""
from __future__ import annotations

import os
import shutil

from apache_beam.io.filesystems import FileSystems

PARTIAL = '.partial'
CHUNK = 1 << 20


def _is_local(uri: str) -> bool:
  return '://' not in uri


def write_atomic(uri: str, data: bytes) -> None:
  """Write under a temporary name, then rename: readers never see half a file."""
  tmp = uri + PARTIAL
  if _is_local(uri):
    os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
    with open(tmp, 'wb') as handle:
      handle.write(data)
    os.replace(tmp, uri)
    return
  with FileSystems.create(tmp) as handle:
    handle.write(data)
  _replace(tmp, uri)


def put_file(path: str, uri: str, move: bool = False) -> None:
  """Publish a finished local file at `uri` atomically."""
  tmp = uri + PARTIAL
  if _is_local(uri):
    os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
    (shutil.move if move else shutil.copyfile)(path, tmp)
    os.replace(tmp, uri)
    return
  with open(path, 'rb') as src, FileSystems.create(tmp) as dst:
    shutil.copyfileobj(src, dst, CHUNK)
  _replace(tmp, uri)
  if move:
    os.unlink(path)


def read_bytes(uri: str) -> bytes:
  with FileSystems.open(uri, mime_type='application/octet-stream', compression_type='uncompressed') as handle:
    return handle.read()


def _replace(tmp: str, uri: str) -> None:
  if FileSystems.exists(uri):
    FileSystems.delete([uri])
  FileSystems.rename([tmp], [uri])
