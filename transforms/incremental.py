"""`--incremental`: what a scheduled rerun over a growing manifest may skip.

Every run already skips clips whose ids are in a finished shard (resume). An
incremental run also skips clips that an earlier run rejected for a reason
that a retry cannot change (the media itself: no face, too short, corrupt
file...). Their earlier rejects are carried into this run's `rejects.jsonl`,
so the accounting still adds up. Transient failures (timeouts, network and
HTTP errors, unknown reasons) are always retried.
"""
from __future__ import annotations

import json
from typing import Iterable, List

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_pipeline.elements import Reject
from transforms.fileio import read_bytes

REJECTS = 'rejects.jsonl'

# Reasons that describe the source media or the annotation, not the run: retrying cannot change them
# while the options stay the same. Manifest-stage rejects are re-derived from the input on every run.
PERMANENT_REASONS = frozenset({
    # download / probe: the file itself
    'download_corrupt', 'empty_file', 'no_video', 'still_image', 'too_many_pixels', 'too_small',
    'unsupported_codec', 'too_large',
    # plan: the clip against the media
    'bad_crop', 'clip_past_end', 'no_audio', 'too_short', 'too_long',
    # crop / render / analyse: what the frames hold
    'no_face', 'no_frames',
})


def earlier_rejects(output: str) -> List[Reject]:
  """Permanent rejects recorded by the last finished run in `output` (none if there is none)."""
  path = FileSystems.join(output, REJECTS)
  if not FileSystems.exists(path):
    return []
  carried = []
  for line in read_bytes(path).decode().splitlines():
    if not line.strip():
      continue
    record = json.loads(line)
    if record.get('stage') != 'manifest' and record.get('reason') in PERMANENT_REASONS:
      carried.append(Reject(record['id'], record['stage'], record['reason'], record.get('detail', ''),
                            record.get('source_id', '')))
  return carried


class CarryRejects(beam.PTransform):
  """planned ids -> the earlier rejects of clips this run plans again (a clip gone from the input is dropped)."""

  def __init__(self, rejects: Iterable[Reject]):
    super().__init__()
    self.rejects = list(rejects)

  def expand(self, planned):
    earlier = (planned.pipeline
               | 'EarlierRejects' >> beam.Create(self.rejects)
               | 'KeyRejects' >> beam.Map(lambda reject: (reject.id, reject)))
    again = planned | 'KeyPlanned' >> beam.Map(lambda clip_id: (clip_id, None))
    return ({'reject': earlier, 'planned': again}
            | 'JoinPlanned' >> beam.CoGroupByKey()
            | 'StillPlanned' >> beam.FlatMap(_if_planned))


def _if_planned(keyed):
  _, grouped = keyed
  rejects = list(grouped['reject'])
  if rejects and any(True for _ in grouped['planned']):
    yield rejects[0]
