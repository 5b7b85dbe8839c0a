"""Per-clip frame archives: the per-frame images a recipe keeps, waiting in the work dir for the writer.

Images (jpg, png, npy) are kept as one tar per clip and analyzer, until the clip passed its filters and its
writer lays them out.

Why: the render pass is the only place a clip's frames exist, but the clip may still be filtered out, so
nothing per frame goes to the output from there; and one file per clip (not per frame) keeps the work dir
and the writer's reads small in number. The tar is built locally while frames come and published in one
atomic step at `close`; its bytes depend only on the members (mtime 0), so a retried bundle writes the same
archive again.
"""
from __future__ import annotations

import os
import tarfile
import tempfile
from typing import Iterator, Optional, Tuple

from apache_beam.io.filesystems import FileSystems

from transforms.core.fileio import put_file

ARCHIVES = 'frames'  # folder in the work dir


def archive_uri(work_dir: str, clip_id: str, name: str) -> str:
  return FileSystems.join(work_dir, ARCHIVES, f'{clip_id}.{name}.tar')


class FrameArchive:
  """Add members while frames come; `close` publishes the archive at `uri`, `discard` drops it."""

  def __init__(self, uri: str):
    self.uri = uri
    fd, self._local = tempfile.mkstemp(prefix='frames-', suffix='.tar')
    os.close(fd)
    self._tar: Optional[tarfile.TarFile] = tarfile.open(self._local, 'w', format=tarfile.PAX_FORMAT)
    self.members = 0

  def add(self, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o444
    self._tar.addfile(info, _Reader(data))
    self.members += 1

  def close(self) -> str:
    """Publish the archive (atomically) and return its URI."""
    self._tar.close()
    self._tar = None
    put_file(self._local, self.uri, move=True)
    return self.uri

  def discard(self) -> None:
    """Drop the local archive of a pass that will not finish; a no-op after `close`."""
    if self._tar is not None:
      self._tar.close()
      self._tar = None
    if os.path.exists(self._local):
      os.unlink(self._local)


class _Reader:
  """A file-like view of bytes for tarfile.addfile (no copy into BytesIO)."""

  def __init__(self, data: bytes):
    self._view = memoryview(data)
    self._at = 0

  def read(self, size: int = -1) -> bytes:
    end = len(self._view) if size is None or size < 0 else min(len(self._view), self._at + size)
    chunk = self._view[self._at:end].tobytes()
    self._at = end
    return chunk


def read_frame_archive(uri: str) -> Iterator[Tuple[str, bytes]]:
  """(member name, bytes) in the order they were added, streamed (one member in memory at a time)."""
  with FileSystems.open(uri, mime_type='application/octet-stream', compression_type='uncompressed') as handle:
    with tarfile.open(fileobj=handle, mode='r|') as tar:
      for member in tar:
        if member.isfile():
          yield member.name, tar.extractfile(member).read()
