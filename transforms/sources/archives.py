"""Archive members as the parse step lists them and `Unpacker` copies them into the work dir, bounded.

The parse step (transforms/sources/manifest.py) only lists an archive. Each member video becomes a
`Source` whose url names the member (`archive-member:?archive=...`, see `ArchiveMember`),
so the element that flows on is still a `Source` and resume can drop written clips before
any byte is unpacked. `Unpacker` turns those urls into unpacked files under
`work_dir/archives/<archive id>/` (the pipeline steps are in transforms/sources/unpack.py):
- uncompressed tars and zips member by member: each element seeks to its own member,
  so members spread over workers;
- compressed tars (gzip, bzip2, xz cannot seek) in one sequential pass per archive that
  unpacks every member still needed, then stops.
A member already unpacked with its listed size is not read again, and every file is
published atomically, so a rerun unpacks nothing twice and a retried bundle is harmless.
Sizes are bounded twice: by the listing (per member and, through `before`, per archive)
and by the copy itself, which never writes more than the listed size.
"""
from __future__ import annotations

import dataclasses
import logging
import lzma
import os
import struct
import tarfile
import tempfile
import urllib.parse
import zipfile
import zlib
from typing import Dict, Iterable, Iterator, List, Optional, Tuple, Union

from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms.core.elements import Reject, Source
from transforms.core.fileio import put_file
from transforms.lib.safety import InputPolicy, UnsafeInput, check_url, local_path, safe_member_name, scheme_of

STAGE = 'unpack'
MEMBER_SCHEME = 'archive-member'
FRAME_SCHEME = 'frame-folder'  # a folder of numbered images, encoded here too (transforms/sources/frames.py)
TAR, TAR_STREAM, ZIP = 'tar', 'tar-stream', 'zip'
CHUNK = 1 << 20
MIB = 1024 * 1024
ZIP_LOCAL_HEADER = b'PK\x03\x04'
ZIP_LOCAL_HEADER_SIZE = 30
TEXT_FIELDS = ('archive', 'kind', 'name', 'file')  # of ArchiveMember; the others are integers
NAME_ERRORS = 'surrogateescape'  # tar member names need not be UTF-8: tarfile keeps their bytes this way
# What corrupt or truncated archive data raises while it is listed or read (zlib/lzma/bz2, the archive modules).
UNPACK_ERRORS = (OSError, EOFError, ValueError, tarfile.TarError, zipfile.BadZipFile, zlib.error, lzma.LZMAError,
                 NotImplementedError)


@dataclasses.dataclass(frozen=True)
class ArchiveMember:
  """One listed member: where it sits in its archive and where it unpacks to. Travels as a Source url."""
  archive: str  # the archive's url, as the listing checked it
  kind: str  # TAR (seek to offset), TAR_STREAM (compressed: one pass per archive) or ZIP
  name: str  # the member's name inside the archive
  offset: int  # tar: TarInfo.offset_data (in the uncompressed stream); zip: its local header's offset
  size: int  # listed unpacked size in bytes
  before: int  # listed sizes of the archive's members unpacked before this one (the --max_archive_mb budget)
  file: str  # '<archive id>/<member id><ext>' under work_dir/archives
  method: int = 0  # zip only: compression method, compressed size, CRC-32, flag bits (central directory)
  compressed_size: int = 0
  crc: int = 0
  flags: int = 0

  @property
  def url(self) -> str:
    return f'{MEMBER_SCHEME}:?{urllib.parse.urlencode(dataclasses.asdict(self), errors=NAME_ERRORS)}'

  @classmethod
  def from_url(cls, url: str) -> 'ArchiveMember':
    """The member a url names; ValueError when it is malformed or its target is not a flat safe name."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query, keep_blank_values=True, errors=NAME_ERRORS)
    try:
      member = cls(**{f.name: query[f.name][0] if f.name in TEXT_FIELDS else int(query[f.name][0])
                      for f in dataclasses.fields(cls) if f.name in query})
    except (TypeError, ValueError) as error:
      raise ValueError(f'malformed archive member url: {error}') from error
    folder, _, name = member.file.partition('/')
    if member.kind not in (TAR, TAR_STREAM, ZIP) or safe_member_name(member.file) != member.file or not name \
        or '/' in name or folder.startswith('.') or name.startswith('.'):
      raise ValueError(f'archive member url names kind {member.kind!r} and file {member.file!r}')
    return member


def is_member_url(url: str) -> bool:
  """By prefix: any text can be asked (a malformed URL makes urlsplit raise). Frame folders count: both
  schemes are the listing's own, never an input's."""
  return str(url).strip().lower().startswith((MEMBER_SCHEME + ':', FRAME_SCHEME + ':'))


def is_frame_url(url: str) -> bool:
  return str(url).strip().lower().startswith(FRAME_SCHEME + ':')


def _size_of(uri: str) -> Optional[int]:
  """Bytes in the file at `uri`, or None when there is none."""
  if '://' not in uri:
    return os.path.getsize(uri) if os.path.isfile(uri) else None
  try:
    found = FileSystems.match([uri])[0].metadata_list
  except Exception:  # pylint: disable=broad-except  # a missing object reads as "not there yet"
    return None
  return found[0].size_in_bytes if found else None


def unpacked_uri(work_dir: str, file: str) -> str:
  """Where an archive member (or an encoded frame folder) lives once unpacked: `work_dir/archives/<file>`."""
  return FileSystems.join(work_dir, 'archives', *file.split('/'))


def _open(archive: str, policy: InputPolicy):
  """The archive checked against the policy again (a listing may be old), opened for raw byte reads."""
  url = check_url(archive, policy)
  if scheme_of(url) not in ('file', 'gs'):
    raise UnsafeInput('bad_url', f'{url[:200]}: archives are read from local or gs:// paths only')
  path = local_path(url, policy) if scheme_of(url) == 'file' else url
  return FileSystems.open(path, mime_type='application/octet-stream', compression_type='uncompressed')


def _zip_member(handle, member: ArchiveMember):
  """A reader of one zip member found from its local header: the central directory is not read again."""
  handle.seek(member.offset)
  header = handle.read(ZIP_LOCAL_HEADER_SIZE)
  if len(header) != ZIP_LOCAL_HEADER_SIZE or not header.startswith(ZIP_LOCAL_HEADER):
    raise zipfile.BadZipFile(f'no local file header at offset {member.offset}')
  name_length, extra_length = struct.unpack('<HH', header[26:30])
  handle.seek(member.offset + ZIP_LOCAL_HEADER_SIZE + name_length + extra_length)
  info = zipfile.ZipInfo(member.name)
  info.compress_type, info.compress_size, info.file_size = member.method, member.compressed_size, member.size
  info.CRC, info.flag_bits = member.crc, member.flags
  return zipfile.ZipExtFile(handle, 'r', info)  # checks the CRC when the member's last byte is read


class Unpacker:
  """Unpacks members under the size caps; shared by the pipeline steps and `read_input`."""

  def __init__(self, work_dir: str, policy: InputPolicy = InputPolicy(), max_member_bytes: int = 4096 * MIB,
               max_total_bytes: int = 65536 * MIB):
    if not work_dir:
      raise ValueError('archive members need a work dir to unpack into')
    self.work_dir = work_dir
    self.policy = policy
    self.max_member_bytes = int(max_member_bytes)
    self.max_total_bytes = int(max_total_bytes)
    self.unpacked = Metrics.counter(STAGE, 'members_unpacked')
    self.kept = Metrics.counter(STAGE, 'members_already_unpacked')
    self.unpacked_bytes = Metrics.counter(STAGE, 'bytes_unpacked')
    self.passes = Metrics.counter(STAGE, 'compressed_archive_passes')

  def target(self, member: ArchiveMember) -> str:
    return unpacked_uri(self.work_dir, member.file)

  def unpack_one(self, source: Source) -> Iterator[Union[Source, Reject]]:
    """A member of an uncompressed tar or a zip: seek to it, copy it, nothing else is read."""
    try:
      member = ArchiveMember.from_url(source.url)
    except ValueError as error:
      yield from _rejects(source, 'bad_url', str(error))
      return
    ready = self._ready(source, member)
    if ready is not None:
      yield from ready
      return
    try:
      with _open(member.archive, self.policy) as handle:
        if member.kind == ZIP:
          reader = _zip_member(handle, member)
        else:
          handle.seek(member.offset)
          reader = handle
        scratch = self._copy(reader, member)
    except UnsafeInput as error:
      yield from _rejects(source, error.reason, str(error))
      return
    except UNPACK_ERRORS as error:
      yield from _rejects(source, 'bad_archive', f'member {member.name}: {type(error).__name__}: {error}')
      return
    yield self._publish(scratch, [(source, member)])[0]

  def unpack_archive(self, archive: str, sources: Iterable[Source]) -> Iterator[Union[Source, Reject]]:
    """Members of one compressed tar: one sequential pass unpacks those still needed, in archive order.

    A failure part-way (corrupt or truncated data) rejects only the members not yet delivered.
    """
    pending: Dict[int, List[Tuple[Source, ArchiveMember]]] = {}
    for source in sources:
      try:
        member = ArchiveMember.from_url(source.url)
      except ValueError as error:
        yield from _rejects(source, 'bad_url', str(error))
        continue
      ready = self._ready(source, member)
      if ready is not None:
        yield from ready
      else:
        pending.setdefault(member.offset, []).append((source, member))
    if not pending:
      return
    self.passes.inc()
    failure = 'the member is not in the archive'
    try:
      with _open(archive, self.policy) as handle, tarfile.open(fileobj=handle, mode='r|*') as tar:
        for info in tar:
          wanted = pending.get(info.offset_data)
          if wanted is None:
            continue
          member = wanted[0][1]
          if info.name != member.name or info.size != member.size or not info.isreg():
            del pending[info.offset_data]
            for source, _ in wanted:
              yield from _rejects(source, 'bad_archive', f'member {member.name} changed since the archive was listed')
          else:
            scratch = self._copy(tar.extractfile(info), member)
            del pending[info.offset_data]
            yield from self._publish(scratch, wanted)
          if not pending:
            break
    except UnsafeInput as error:
      for source, _ in (pair for wanted in pending.values() for pair in wanted):
        yield from _rejects(source, error.reason, str(error))
      return
    except UNPACK_ERRORS as error:
      failure = f'the archive broke off: {type(error).__name__}: {error}'
    for source, member in (pair for wanted in pending.values() for pair in wanted):
      yield from _rejects(source, 'bad_archive', f'member {member.name}: {failure}')

  def _ready(self, source: Source, member: ArchiveMember) -> Optional[List[Union[Source, Reject]]]:
    """[the Source of the file already unpacked], too_large rejects, or None when the member must be read."""
    if member.size > self.max_member_bytes:
      return list(_rejects(source, 'too_large', f'member {member.name} is {member.size} bytes, over the per-member '
                           f'limit of {self.max_member_bytes} bytes (--max_download_mb)'))
    if member.before + member.size > self.max_total_bytes:
      return list(_rejects(source, 'too_large', f'member {member.name} ({member.size} bytes) would bring what is '
                           f'unpacked from {os.path.basename(member.archive)} to {member.before + member.size} '
                           f'bytes, over --max_archive_mb ({self.max_total_bytes} bytes)'))
    uri = self.target(member)
    if _size_of(uri) == member.size:
      self.kept.inc()
      return [dataclasses.replace(source, url=uri)]
    return None

  def _copy(self, reader, member: ArchiveMember) -> str:
    """Exactly the listed size of `reader` into a scratch file (beside the target when local); never more."""
    uri = self.target(member)
    folder = os.path.dirname(uri) if '://' not in uri else None
    if folder:
      os.makedirs(folder, exist_ok=True)
    fd, scratch = tempfile.mkstemp(prefix='unpack-', dir=folder)
    try:
      copied = 0
      with os.fdopen(fd, 'wb') as out:
        while copied < member.size:
          block = reader.read(min(CHUNK, member.size - copied))
          if not block:
            raise EOFError(f'the member ended after {copied} of its {member.size} bytes')
          copied += len(block)
          out.write(block)
    except BaseException:
      os.unlink(scratch)
      raise
    self.unpacked_bytes.inc(copied)
    return scratch

  def _publish(self, scratch: str, wanted: List[Tuple[Source, ArchiveMember]]) -> List[Source]:
    """The scratch file published at every target that asked for it (atomically); the last one takes it."""
    try:
      for number, (_, member) in enumerate(wanted, 1):
        put_file(scratch, self.target(member), move=number == len(wanted))
        self.unpacked.inc()
    finally:
      if os.path.exists(scratch):
        os.unlink(scratch)
    return [dataclasses.replace(source, url=self.target(member)) for source, member in wanted]


def _rejects(source: Source, reason: str, detail: str) -> Iterator[Reject]:
  """One reject per clip of `source`: its clips are what the run planned."""
  if reason == 'bad_archive':
    logging.warning('unpack: %s: %s', source.source_id, detail)
  return (Reject(c.clip_id, STAGE, reason, detail[:500], source.source_id) for c in source.clips)
