"""Unpack listed archive members into the work dir: after a shuffle, each member once.

`UnpackMembers` spreads members of uncompressed tars and zips over workers (each seeks to its own member),
unpacks a compressed tar in one pass per archive, and encodes frame folders (transforms/sources/frames.py);
the member format and the bounded copy are transforms/sources/archives.py.
"""
from __future__ import annotations

from typing import Dict, Iterable, Iterator, List, Union

import apache_beam as beam

from transforms.core.elements import Reject, Source
from transforms.deadletter import DeadLetter
from transforms.lib.safety import InputPolicy
from transforms.sources.archives import (MIB, STAGE, TAR, TAR_STREAM, ArchiveMember, Unpacker, is_frame_url,
                                         is_member_url)
from transforms.sources.frames import EncodeFrameFolders, FolderEncoder

def unpack_in_process(items: Iterable[Union[Source, Reject]], unpacker: Unpacker) -> Iterator[Union[Source, Reject]]:
  """Archive members of `items` unpacked here, compressed tars one pass each, frame folders encoded (tools and
  tests; no pipeline)."""
  encoder = FolderEncoder(unpacker.work_dir, unpacker.policy, unpacker.max_total_bytes)
  streamed: Dict[str, List[Source]] = {}
  for item in items:
    if not isinstance(item, Source) or not is_member_url(item.url):
      yield item
    elif is_frame_url(item.url):
      yield from encoder.encode(item)
    elif _kind(item) == TAR_STREAM:
      streamed.setdefault(ArchiveMember.from_url(item.url).archive, []).append(item)
    else:
      yield from unpacker.unpack_one(item)
  for archive, sources in streamed.items():
    yield from unpacker.unpack_archive(archive, sources)


def _kind(source: Source) -> str:
  """TAR_STREAM, or TAR for other members (a malformed url is rejected on the per-member path)."""
  try:
    return ArchiveMember.from_url(source.url).kind
  except ValueError:
    return TAR


class _UnpackMember(beam.DoFn):
  """A member of an uncompressed tar or zip -> the Source of its unpacked file, or rejects."""

  def __init__(self, unpacker: Unpacker):
    self.unpacker = unpacker

  def process(self, source: Source):
    for item in self.unpacker.unpack_one(source):
      yield beam.pvalue.TaggedOutput('rejects', item) if isinstance(item, Reject) else item


class _UnpackArchive(beam.DoFn):
  """(archive url, its members still needed) -> Sources of unpacked files and rejects, in one pass."""

  def __init__(self, unpacker: Unpacker):
    self.unpacker = unpacker

  def process(self, keyed):
    archive, sources = keyed
    for item in self.unpacker.unpack_archive(archive, sources):
      yield beam.pvalue.TaggedOutput('rejects', item) if isinstance(item, Reject) else item


class UnpackMembers(beam.PTransform):
  """Sources -> {'sources': ready to download, 'rejects': Rejects}; only archive-member urls change.

  Place it after the skip of written clips (nothing written is unpacked) and after a
  reshuffle (members spread over workers). Frame folders are encoded to videos
  (transforms/sources/frames.py). Other Sources pass through untouched.
  """

  def __init__(self, work_dir: str, policy: InputPolicy = InputPolicy(), max_member_bytes: int = 4096 * MIB,
               max_total_bytes: int = 65536 * MIB):
    super().__init__()
    self.unpacker = Unpacker(work_dir, policy, max_member_bytes, max_total_bytes)

  def expand(self, sources):
    other, seekable, streamed, folders = sources | 'ByArchiveKind' >> beam.Partition(
        lambda s, _: 0 if not is_member_url(s.url) else 3 if is_frame_url(s.url) else 2 if _kind(s) == TAR_STREAM
        else 1, 4)
    members = seekable | 'UnpackMember' >> beam.ParDo(DeadLetter(_UnpackMember(self.unpacker), STAGE)).with_outputs(
        'rejects', main='sources')
    encoder = FolderEncoder(self.unpacker.work_dir, self.unpacker.policy, self.unpacker.max_total_bytes)
    encoded = folders | 'EncodeFrameFolders' >> beam.ParDo(DeadLetter(EncodeFrameFolders(encoder), STAGE)) \
        .with_outputs('rejects', main='sources')
    archives = (streamed
                | 'KeyByArchive' >> beam.Map(lambda s: (ArchiveMember.from_url(s.url).archive, s))
                | 'ByArchive' >> beam.GroupByKey()
                | 'UnpackArchive' >> beam.ParDo(DeadLetter(_UnpackArchive(self.unpacker), STAGE))
                .with_outputs('rejects', main='sources'))
    spread = archives.sources | 'SpreadArchiveMembers' >> beam.Reshuffle()  # one pass yields them all on one worker
    return {'sources': (other, members.sources, spread, encoded.sources) | 'Unpacked' >> beam.Flatten(),
            'rejects': (members.rejects, archives.rejects, encoded.rejects) | 'UnpackRejects' >> beam.Flatten()}
