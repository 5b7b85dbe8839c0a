"""--multi_face=speaker: of the faces on screen together, keep the one whose mouth is in sync with the audio.

Why after the filter: whether a mouth moves with the sound is known only once the face has been rendered and
scored (SyncNet's confidence, or the offline mouth/audio correlation), so the tracker keeps every face (as
`split` does) and this stage compares the scored pieces of each planned clip. A piece that overlaps in time a
better-synced piece is rejected as `not_speaking`; a face with no measurable sync (a shut mouth, silence)
ranks last.
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.core.elements import Reject
from transforms.core.fileio import delete_quietly

STAGE = 'speaker'


def sync_score(scores: dict) -> Tuple[str, Optional[float]]:
  """(name, value) of the sync measure a piece is ranked by: SyncNet's confidence when it ran, else the
  offline correlation."""
  if 'lse_c' in scores:
    return 'lse_c', scores['lse_c']
  return 'sync_corr', scores.get('sync_corr')


class _Choose(beam.DoFn):

  def __init__(self):
    self.dropped = Metrics.counter(STAGE, 'faces_not_speaking')

  def process(self, element: Tuple[str, Iterable]):
    _, pieces = element
    ranked = sorted(pieces, key=lambda a: (-(sync_score(a.scores)[1] if sync_score(a.scores)[1] is not None
                                             else float('-inf')), a.clip.task.clip_id))
    kept = []
    for analysis in ranked:
      task = analysis.clip.task
      rival = next((k for k in kept if task.start < k.clip.task.end and k.clip.task.start < task.end), None)
      if rival is None:
        kept.append(analysis)
        yield analysis
        continue
      name, value = sync_score(analysis.scores)
      _, best = sync_score(rival.scores)
      self.dropped.inc()
      delete_quietly([analysis.clip.mp4_uri, *analysis.clip.files.values()])
      yield beam.pvalue.TaggedOutput('rejects', Reject(
          task.clip_id, STAGE, 'not_speaking', f'{name} {value} below {best} of {rival.clip.task.clip_id}, on '
          f'screen at the same time (--multi_face=speaker)', task.source_id, planned_id=task.planned,
          value=value, threshold=best))


class ChooseSpeaker(beam.PTransform):
  """filters.Analysis -> the speaking face's Analysis per stretch of time (main), `Reject`s (tag `rejects`)."""

  def expand(self, analysed):
    return (analysed
            | 'ByPlannedClip' >> beam.Map(lambda a: (a.clip.task.planned, a))
            | 'PiecesOfAClip' >> beam.GroupByKey()
            | 'KeepTheSpeaker' >> beam.ParDo(_Choose()).with_outputs('rejects', main='kept'))
