"""Archive inputs: listed in the parse step, unpacked after it member by member (compressed tars in one
pass), never twice, within the per-member and per-archive caps; broken data rejects only what it cost.

Reads of the archive are counted by wrapping `FileSystems.open` (the real open runs underneath), so the
tests see how often, and how much of, an archive each step reads.
"""
import dataclasses
import io
import json
import os
import tarfile
import zipfile

import apache_beam as beam
import pytest
from apache_beam.io.filesystems import FileSystems
from hypothesis import given, settings
from hypothesis import strategies as st
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms.core.elements import Reject, Source
from transforms.sources import archives
from transforms.sources.archives import MEMBER_SCHEME, ArchiveMember, is_member_url
from transforms.sources.manifest import ReadSources, list_input, read_input
from transforms.sources.unpack import UnpackMembers

MIB = 1024 * 1024


@dataclasses.dataclass
class _Open:
  path: str
  bytes_read: int = 0


class _CountingReader:
  """A file object that counts the bytes read through it and passes everything else on."""

  def __init__(self, inner, record: _Open):
    self.inner = inner
    self.record = record

  def read(self, size=-1):
    data = self.inner.read(size)
    self.record.bytes_read += len(data)
    return data

  def readinto(self, buffer):
    count = self.inner.readinto(buffer)
    self.record.bytes_read += count or 0
    return count

  def __getattr__(self, name):
    return getattr(self.inner, name)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.inner.close()


@pytest.fixture
def opens(monkeypatch):
  """Every FileSystems.open of this test, with the bytes read through it."""
  seen = []
  real_open = FileSystems.open

  def counting_open(path, *args, **kwargs):
    seen.append(_Open(path))
    return _CountingReader(real_open(path, *args, **kwargs), seen[-1])

  monkeypatch.setattr(FileSystems, 'open', counting_open)
  return seen


def _payloads(count, size=200_000):
  """Incompressible member videos (the unpacker never decodes them)."""
  return {f'clips/v{i}.mp4': os.urandom(size) for i in range(count)}


def _payload(payloads, source_id):
  """The bytes of the member a source id names (`[<row>_]clips_v<N>`)."""
  return payloads[f"clips/{source_id.rsplit('_', 1)[1]}.mp4"]


def _tar(path, members, mode='w'):
  with tarfile.open(path, mode) as tar:
    for name, payload in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))
  return str(path)


def _zip(path, members):
  with zipfile.ZipFile(path, 'w') as archive:
    for number, (name, payload) in enumerate(members.items()):
      archive.writestr(name, payload, zipfile.ZIP_DEFLATED if number % 2 else zipfile.ZIP_STORED)
  return str(path)


def _pipeline():
  """In this process (the counting open must see the reads), without Beam's attempt to fetch Prism."""
  return TestPipeline(runner=FnApiRunner())


def _append_to(path):
  def append(row):
    with open(path, 'a', encoding='utf-8') as handle:
      handle.write(json.dumps(row) + '\n')
  return append


def _lines(path):
  return sorted(tuple(json.loads(line)) for line in open(path, encoding='utf-8')) if os.path.exists(path) else []


def _read(spec, work, **options):
  """ReadSources then UnpackMembers, as the pipeline runs them: ([(source id, url)], [(reject id, stage,
  reason, detail)])."""
  found = os.path.join(str(work), '..', 'found')
  for kind in ('sources', 'rejects'):
    if os.path.exists(f'{found}.{kind}'):
      os.unlink(f'{found}.{kind}')
  with _pipeline() as p:
    read = p | ReadSources(spec)
    unpacked = read['sources'] | UnpackMembers(str(work), max_total_bytes=int(
        options.get('max_archive_mb', 65536) * MIB))
    rejects = (read['rejects'], unpacked['rejects']) | beam.Flatten()
    _ = unpacked['sources'] | 'Sources' >> beam.Map(lambda s: (s.source_id, s.url)) | 'KeepSources' >> beam.Map(
        _append_to(f'{found}.sources'))
    _ = rejects | 'Rejects' >> beam.Map(lambda r: (r.id, r.stage, r.reason, r.detail)) | 'KeepRejects' >> \
        beam.Map(_append_to(f'{found}.rejects'))
  return _lines(f'{found}.sources'), _lines(f'{found}.rejects')


def _of(opens, path):
  return [o.bytes_read for o in opens if o.path == path]


def _unpacked(work, archive_id):
  folder = os.path.join(str(work), 'archives', archive_id)
  return {name: os.stat(os.path.join(folder, name)) for name in os.listdir(folder)} if os.path.isdir(folder) else {}


def test_compressed_tar_is_streamed_once_per_run(tmp_path, opens):
  payloads = _payloads(3)
  payloads['clips/v1.json'] = json.dumps({'clips': [[0, 1], [2, 3]]}).encode()
  archive = _tar(tmp_path / 'in.tar.gz', payloads, 'w:gz')
  size = os.path.getsize(archive)
  work = tmp_path / 'work'

  sources, rejects = _read(archive, work)
  assert rejects == []
  assert [s for s, _ in sources] == ['clips_v0', 'clips_v1', 'clips_v2']
  for source_id, url in sources:
    assert open(url, 'rb').read() == _payload(payloads, source_id)
  # One listing pass and one unpacking pass, each reading the archive once through, never rewinding
  # (the listing first peeks at the 8 bytes that say how it is compressed).
  reads = _of(opens, archive)
  assert len(reads) == 2 and all(size - 1024 <= n <= size + 8 for n in reads), (reads, size)
  first = _unpacked(work, 'in')
  assert sorted(first) == ['clips_v0.mp4', 'clips_v1.mp4', 'clips_v2.mp4']

  opens.clear()
  assert _read(archive, work) == (sources, [])
  assert len(_of(opens, archive)) == 1  # the listing only: every member is already unpacked
  assert {n: (s.st_ino, s.st_mtime_ns) for n, s in _unpacked(work, 'in').items()} == {
      n: (s.st_ino, s.st_mtime_ns) for n, s in first.items()}


@pytest.mark.parametrize('kind', ['tar', 'zip'])
def test_seekable_members_are_unpacked_one_element_each(tmp_path, opens, kind):
  payloads = _payloads(3)
  archive = (_tar if kind == 'tar' else _zip)(tmp_path / f'in.{kind}', payloads)
  work = tmp_path / 'work'

  sources, rejects = _read(archive, work)
  assert rejects == [] and len(sources) == 3
  reads = _of(opens, archive)
  assert len(reads) == 4  # the listing, then each member on its own
  listing, members = reads[0], sorted(reads[1:])
  if kind == 'tar':
    assert listing <= 8 * 512  # headers only: the parse step reads no member's bytes
    assert members == [200_000] * 3  # each element seeks to its member and reads exactly it
  else:  # a zip member: its local header, then its compressed bytes
    local_header = 30
    compressed = sorted(i.compress_size + local_header for i in zipfile.ZipFile(archive).infolist())
    assert members == compressed
  for source_id, url in sources:
    assert open(url, 'rb').read() == _payload(payloads, source_id)

  opens.clear()
  assert _read(archive, work) == (sources, [])
  assert len(_of(opens, archive)) == 1  # a rerun lists, and reads no member again


def test_listing_reads_no_member_and_member_urls_name_their_target(tmp_path):
  archive = _tar(tmp_path / 'in.tar', _payloads(2))
  items = list(list_input(archive))
  assert all(isinstance(s, Source) and is_member_url(s.url) for s in items)
  members = [ArchiveMember.from_url(s.url) for s in items]
  assert [(m.kind, m.name, m.size, m.before, m.file) for m in members] == [
      ('tar', 'clips/v0.mp4', 200_000, 0, 'in/clips_v0.mp4'), ('tar', 'clips/v1.mp4', 200_000, 200_000,
                                                              'in/clips_v1.mp4')]
  assert os.listdir(tmp_path) == ['in.tar']


def test_total_cap_rejects_the_members_past_it(tmp_path):
  archive = _tar(tmp_path / 'in.tar', _payloads(3, size=300_000))
  work = tmp_path / 'work'
  sources, rejects = _read(archive, work, max_archive_mb=700_000 / MIB)
  assert [s for s, _ in sources] == ['clips_v0', 'clips_v1']
  assert [(r[0], r[1], r[2]) for r in rejects] == [('clips_v2_0', 'unpack', 'too_large')]
  assert '--max_archive_mb' in rejects[0][3] and '900000 bytes' in rejects[0][3]
  assert sorted(_unpacked(work, 'in')) == ['clips_v0.mp4', 'clips_v1.mp4']


def test_understated_zip_size_is_cut_at_the_listed_size(tmp_path):
  """A central directory that claims fewer bytes than the member holds: never more than it claims is written."""
  archive = tmp_path / 'in.zip'
  with zipfile.ZipFile(archive, 'w') as handle:
    handle.writestr('bomb.mp4', b'\0' * 1_000_000, zipfile.ZIP_DEFLATED)
  data = bytearray(archive.read_bytes())
  directory = data.index(b'PK\x01\x02')
  data[directory + 24:directory + 28] = (1000).to_bytes(4, 'little')  # uncompressed size
  archive.write_bytes(bytes(data))
  items = list(read_input(str(archive), work_dir=str(tmp_path / 'work')))
  assert [(r.id, r.stage, r.reason) for r in items] == [('bomb_0', 'unpack', 'bad_archive')]
  assert 'CRC' in items[0].detail
  assert _unpacked(tmp_path / 'work', 'in') == {}  # neither the member nor a scratch file is left


def test_truncated_compressed_tar_rejects_only_undelivered_members(tmp_path):
  payloads = _payloads(3)
  archive = _tar(tmp_path / 'in.tar.gz', payloads, 'w:gz')
  listed = [s for s in list_input(archive) if isinstance(s, Source)]
  with open(archive, 'r+b') as handle:  # the archive breaks off after the first member, e.g. an upload cut short
    handle.truncate(int(os.path.getsize(archive) * 0.55))
  work = tmp_path / 'work'
  with _pipeline() as p:
    unpacked = p | beam.Create(listed) | UnpackMembers(str(work))
    assert_that(unpacked['sources'] | beam.Map(lambda s: s.source_id), equal_to(['clips_v0']), label='sources')
    assert_that(unpacked['rejects'] | beam.Map(lambda r: (r.id, r.stage, r.reason)),
                equal_to([('clips_v1_0', 'unpack', 'bad_archive'), ('clips_v2_0', 'unpack', 'bad_archive')]),
                label='rejects')
  assert sorted(_unpacked(work, 'in')) == ['clips_v0.mp4']  # no half member, no scratch file


def test_an_unexpected_error_in_the_one_pass_unpack_rejects_only_what_it_owed(tmp_path, monkeypatch):
  """A bug or a failing disk while a compressed tar is unpacked: the member already unpacked goes on, the others
  are `internal_error` rejects of the unpack stage (no clip in both), and the job finishes instead of failing."""
  payloads = _payloads(3)
  archive = _tar(tmp_path / 'in.tar.gz', payloads, 'w:gz')
  listed = [s for s in list_input(archive) if isinstance(s, Source)]
  real_put = archives.put_file
  published = []

  def put_then_fail(path, uri, move=False):
    if published:
      raise RuntimeError('disk went away')
    published.append(uri)
    real_put(path, uri, move)

  monkeypatch.setattr(archives, 'put_file', put_then_fail)
  with _pipeline() as p:
    unpacked = p | beam.Create(listed) | UnpackMembers(str(tmp_path / 'work'))
    assert_that(unpacked['sources'] | beam.Map(lambda s: s.source_id), equal_to(['clips_v0']), label='sources')
    assert_that(unpacked['rejects'] | beam.Map(lambda r: (r.id, r.stage, r.reason)),
                equal_to([('clips_v1_0', 'unpack', 'internal_error'), ('clips_v2_0', 'unpack', 'internal_error')]),
                label='rejects')


def test_one_pass_serves_every_row_naming_the_archive(tmp_path, opens):
  payloads = _payloads(2)
  archive = _tar(tmp_path / 'in.tar.xz', payloads, 'w:xz')
  manifest = tmp_path / 'm.jsonl'
  manifest.write_text('\n'.join(json.dumps({'id': row, 'url': archive}) for row in ('a', 'b')))
  items = list(read_input(str(manifest), work_dir=str(tmp_path / 'work')))
  assert sorted(s.source_id for s in items) == ['a_clips_v0', 'a_clips_v1', 'b_clips_v0', 'b_clips_v1']
  assert all(open(s.url, 'rb').read() == _payload(payloads, s.source_id) for s in items)
  assert len(_of(opens, archive)) == 3  # each row's listing, then one unpacking pass for both


def test_member_names_that_are_not_utf8(tmp_path):
  archive = str(tmp_path / 'in.tar.gz')
  with tarfile.open(archive, 'w:gz', format=tarfile.GNU_FORMAT, encoding='utf-8', errors='surrogateescape') as tar:
    info = tarfile.TarInfo('caf\udce9.mp4')  # the Latin-1 byte 0xe9 of an old tool
    info.size = 3
    tar.addfile(info, io.BytesIO(b'abc'))
  (source,) = read_input(archive, work_dir=str(tmp_path / 'work'))
  assert source.source_id == 'caf' and open(source.url, 'rb').read() == b'abc'


def test_an_input_cannot_name_an_archive_member(tmp_path):
  """Member urls come from listings only: a manifest row giving one is refused before anything is read."""
  secret = _tar(tmp_path / 'secret.tar', {'v.mp4': b'x'})
  forged = ArchiveMember(secret, 'tar', 'v.mp4', 512, 1, 0, 'secret/v.mp4').url
  assert forged.startswith(MEMBER_SCHEME + ':')
  manifest = tmp_path / 'm.jsonl'
  manifest.write_text(json.dumps({'id': 'x', 'url': forged}))
  items = list(read_input(str(manifest), work_dir=str(tmp_path / 'work')))
  assert [(r.id, r.stage, r.reason) for r in items if isinstance(r, Reject)] == [('x', 'manifest', 'bad_url')]
  assert not (tmp_path / 'work').exists()


@settings(max_examples=150, deadline=None)
@given(st.text(max_size=40), st.text(max_size=60))
def test_member_urls_round_trip_and_refuse_garbage(name, garbage):
  member = ArchiveMember('/data/in.tar', 'tar', name, 512, 7, 0, 'in/v.mp4')
  assert ArchiveMember.from_url(member.url) == member
  try:
    parsed = ArchiveMember.from_url(f'{MEMBER_SCHEME}:?{garbage}')
  except ValueError:
    return
  assert parsed.kind in ('tar', 'tar-stream', 'zip') and '..' not in parsed.file  # only whole, safe members parse
