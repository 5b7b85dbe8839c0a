"""Resume inside the pipeline: anti-joins of planned work against the ids an earlier run settled.

The ids come from the published shard indexes (and, with --incremental, permanent rejects), read by the
pipeline itself: nothing about the output is baked into the job graph, whose size therefore does not grow
with the number of clips already written. Both joins are shuffles keyed by clip id, so they also spread
clips of one source over workers.
"""
from __future__ import annotations

import dataclasses

import apache_beam as beam
from apache_beam.metrics import Metrics

from beam_pipeline.elements import Source

STAGE = 'resume'


def _clip_entries(source: Source):
  header = dataclasses.replace(source, clips=())
  for clip in source.clips:
    yield clip.clip_id, (header, clip)


def _keep_undone(counter):
  def keep(keyed):
    _, grouped = keyed
    if any(True for _ in grouped['done']):
      counter.inc(sum(1 for _ in grouped['todo']))
      return
    yield from grouped['todo']
  return keep


def _rebuild_source(keyed) -> Source:
  _, entries = keyed
  entries = sorted(entries, key=lambda entry: entry[1].index)
  return dataclasses.replace(entries[0][0], clips=tuple(clip for _, clip in entries))


class SkipDoneClips(beam.PTransform):
  """Sources -> Sources holding only the clips not in `done` (ids); a source with none left is dropped."""

  def __init__(self, done: beam.PCollection):
    super().__init__()
    self.done = done

  def expand(self, sources):
    done = self.done
    skipped = Metrics.counter(STAGE, 'clips_already_done')
    return ({'todo': sources | 'ClipEntries' >> beam.FlatMap(_clip_entries),
             'done': done | 'KeyDoneClips' >> beam.Map(lambda clip_id: (clip_id, None))}
            | 'JoinDoneClips' >> beam.CoGroupByKey()
            | 'UndoneClips' >> beam.FlatMap(_keep_undone(skipped))
            | 'BySource' >> beam.Map(lambda entry: (entry[0].source_id, entry))
            | 'GroupSourceClips' >> beam.GroupByKey()
            | 'RebuildSource' >> beam.Map(_rebuild_source))


class SkipDoneTasks(beam.PTransform):
  """ClipTasks -> the tasks whose id is not in `done`: pieces of a split clip already written, or rejected
  for good (--incremental), are not rendered again."""

  def __init__(self, done: beam.PCollection):
    super().__init__()
    self.done = done

  def expand(self, tasks):
    done = self.done
    skipped = Metrics.counter(STAGE, 'pieces_already_done')
    return ({'todo': tasks | 'KeyTasks' >> beam.Map(lambda task: (task.clip_id, task)),
             'done': done | 'KeyDonePieces' >> beam.Map(lambda clip_id: (clip_id, None))}
            | 'JoinDonePieces' >> beam.CoGroupByKey()
            | 'UndoneTasks' >> beam.FlatMap(_keep_undone(skipped)))
