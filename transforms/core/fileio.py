"""Atomic writes to local paths or any Beam FileSystems URI (gs://...).

Local files are written under a temporary name and renamed. Object stores (gs://, s3://) make an object
visible only when its upload completes, so there the final name is written directly: one atomic upload
instead of exists -> delete -> rename.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from typing import Iterable, Iterator

from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems

PARTIAL = '.partial'
CHUNK = 1 << 20


def is_local(uri: str) -> bool:
  return '://' not in uri


def _scratch(uri: str) -> str:
  """A temporary name beside `uri`, this attempt's own: two attempts writing the same file at once (a runner's
  backup attempt) never write into one another's half-written file. It ends in PARTIAL (stale ones are swept)."""
  return f'{uri}.{uuid.uuid4().hex[:12]}{PARTIAL}'


def _local_scratch(uri: str) -> str:
  """A scratch file for `uri`, created empty in its folder (made if missing): once it exists, no
  `remove_empty_dirs` of another job can take the folder away before the file is renamed into place."""
  tmp = _scratch(uri)

  def create():
    os.makedirs(os.path.dirname(os.path.abspath(uri)), exist_ok=True)
    open(tmp, 'xb').close()

  try:
    create()
  except FileNotFoundError:  # the folder went between makedirs and open (another job's clean-up): once more
    create()
  return tmp


def write_atomic(uri: str, data: bytes) -> None:
  """Readers never see half a file."""
  if is_local(uri):
    tmp = _local_scratch(uri)
    with open(tmp, 'wb') as handle:
      handle.write(data)
    os.replace(tmp, uri)
    return
  with FileSystems.create(uri) as handle:
    handle.write(data)


def put_file(path: str, uri: str, move: bool = False) -> None:
  """Publish a finished local file at `uri` atomically."""
  if is_local(uri):
    tmp = _local_scratch(uri)
    (shutil.move if move else shutil.copyfile)(path, tmp)
    os.replace(tmp, uri)
    return
  with open(path, 'rb') as src, FileSystems.create(uri) as dst:
    shutil.copyfileobj(src, dst, CHUNK)
  if move:
    os.unlink(path)


def read_bytes(uri: str) -> bytes:
  with FileSystems.open(uri, mime_type='application/octet-stream', compression_type='uncompressed') as handle:
    return handle.read()


def iter_jsonl(uri: str) -> Iterator[dict]:
  """The records of a JSON-lines file, streamed (an index of a million clips never sits in memory whole);
  nothing when the file does not exist."""
  if not FileSystems.exists(uri):
    return
  with FileSystems.open(uri, mime_type='application/octet-stream', compression_type='uncompressed') as handle:
    for line in handle:
      if line.strip():
        yield json.loads(line)


def delete_quietly(uris: Iterable[str]) -> None:
  """Delete what exists: a retried clean-up finds some files already gone, which is fine."""
  for uri in uris:
    try:
      if FileSystems.exists(uri):
        FileSystems.delete([uri])
    except BeamIOError:
      if FileSystems.exists(uri):
        raise


def remove_empty_dirs(root: str, keep_root: bool = True) -> int:
  """Remove the local folders under `root` (and `root` itself unless `keep_root`) that hold nothing, deepest
  first: what a finished run emptied (the work dir's clips, markers, fragments) is not left behind. Object
  stores have no folders. Returns how many went."""
  if not is_local(root) or not os.path.isdir(root):
    return 0
  removed = 0
  for folder, _, _ in os.walk(root, topdown=False):
    if keep_root and os.path.samefile(folder, root):
      continue
    try:
      os.rmdir(folder)
      removed += 1
    except OSError:  # not empty (a file, or a folder a job still writing made again)
      pass
  return removed
