"""`--incremental`: what a scheduled rerun over a growing manifest may skip.

Every run already skips clips whose ids are in a finished shard (resume). An
incremental run also skips clips that an earlier run rejected for a reason
that a retry cannot change (the media itself: no face, too short, corrupt
file...) while the clip's inputs (its source, range, crop and the run's
deciding options: transforms/resume.clip_inputs) stay the same. Every reject
records its planned clip's inputs (`RecordInputs`); an earlier reject is
carried into this run's `rejects.jsonl` only when they equal the clip's
inputs now, so the accounting still adds up and a changed clip is tried
again. A reject from before rejects recorded inputs is tried again once: no
record says it was judged with today's range, crop and options. Transient
failures (timeouts, network and HTTP errors, unknown reasons) are always
retried. The earlier rejects are read inside the pipeline, so the job graph
does not grow with them.
"""
from __future__ import annotations

import dataclasses
from typing import Iterator

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from transforms.core.elements import Reject
from transforms.core.fileio import iter_jsonl

REJECTS = 'rejects.jsonl'

# Reasons that describe the source media or the annotation, not the run: retrying cannot change them
# while the options stay the same. Manifest-stage rejects are re-derived from the input on every run.
PERMANENT_REASONS = frozenset({
    # download / probe: the file itself
    'download_corrupt', 'empty_file', 'no_video', 'still_image', 'too_many_pixels', 'too_small',
    'unsupported_codec', 'too_large', 'playlist_refused',
    # plan: the clip against the media
    'bad_crop', 'clip_past_end', 'no_audio', 'too_short', 'too_long',
    # crop / render / analyse: what the frames hold
    'no_face', 'no_frames',
    # frame folders (transforms/sources/frames.py): the images themselves
    'bad_frame', 'mixed_frame_sizes',
    # mmvox face tubes (beam_pipeline/recipes/mmvox/tubes.py): the tube's frames against video-preprocessing's rules
    'tube_too_short', 'tube_too_small', 'tube_out_of_frame',
    # avatar frames (beam_pipeline/recipes/avatar/face_frames.py): no frame with the face inside the crop
    'face_outside_crop',
})


def permanent_rejects(path: str) -> Iterator[Reject]:
  """Permanent rejects recorded in a rejects.jsonl (none if there is none), streamed line by line."""
  for record in iter_jsonl(path):
    if record.get('stage') != 'manifest' and record.get('reason') in PERMANENT_REASONS:
      planned = record.get('planned_id') or record['id']
      yield Reject(record['id'], record['stage'], record['reason'], record.get('detail', ''),
                   record.get('source_id', ''), planned if planned != record['id'] else '',
                   record.get('value'), record.get('threshold'), inputs=record.get('inputs', ''))


class ReadCarriedRejects(beam.PTransform):
  """The last finished run's permanent rejects in `output` (with `enabled` False: none)."""

  def __init__(self, output: str, enabled: bool):
    super().__init__()
    self.path = FileSystems.join(output, REJECTS)
    self.enabled = enabled

  def expand(self, pbegin):
    return (pbegin
            | 'RejectsFile' >> beam.Create([self.path] if self.enabled else [])
            | 'PermanentRejects' >> beam.FlatMap(permanent_rejects))


class RecordInputs(beam.PTransform):
  """(rejects, plans (planned id, inputs)) -> the rejects, each with its planned clip's inputs ('' for an entry
  that planned no clip): what a later --incremental run compares before it carries the reject."""

  def expand(self, inputs):
    rejects, plans = inputs
    return ({'reject': rejects | 'KeyRejects' >> beam.Map(lambda reject: (reject.planned, reject)),
             'planned': plans}
            | 'JoinPlanned' >> beam.CoGroupByKey()
            | 'WithInputs' >> beam.FlatMap(_with_inputs))


def _with_inputs(keyed):
  _, grouped = keyed
  plans = set(grouped['planned'])
  inputs = plans.pop() if len(plans) == 1 else ''
  for reject in grouped['reject']:
    yield reject if reject.inputs else dataclasses.replace(reject, inputs=inputs)


class CarryRejects(beam.PTransform):
  """(plans (planned id, inputs), earlier rejects) -> the earlier rejects whose planned clip this run plans again
  with the inputs the reject recorded (a clip gone from the input, or changed, is dropped: it is tried again)."""

  def expand(self, inputs):
    plans, earlier = inputs
    keyed_rejects = earlier | 'KeyRejects' >> beam.Map(lambda reject: (reject.planned, reject))
    return ({'reject': keyed_rejects, 'planned': plans}
            | 'JoinPlanned' >> beam.CoGroupByKey()
            | 'StillPlanned' >> beam.FlatMap(_if_planned_alike))


def _if_planned_alike(keyed):
  _, grouped = keyed
  plans = set(grouped['planned'])
  seen = set()
  for reject in grouped['reject']:
    if reject.inputs in plans and reject.id not in seen:
      seen.add(reject.id)
      yield reject
