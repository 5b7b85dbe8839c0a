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

from transforms.core.elements import Source

STAGE = 'resume'


def _clip_entries(source: Source):
  header = dataclasses.replace(source, clips=())
  for clip in source.clips:
    yield clip.clip_id, (header, clip)


def _rebuild_source(keyed) -> Source:
  _, entries = keyed
  entries = sorted(entries, key=lambda entry: entry[1].index)
  return dataclasses.replace(entries[0][0], clips=tuple(clip for _, clip in entries))


class _WithoutDone(beam.PTransform):
  """(id, value) -> the values whose id is not in `done`, counting the others in `resume/<counter>`."""

  def __init__(self, done: beam.PCollection, counter: str):
    super().__init__()
    self.done = done
    self.counter = counter

  def expand(self, keyed):
    skipped = Metrics.counter(STAGE, self.counter)

    def undone(joined):
      _, grouped = joined
      if any(True for _ in grouped['done']):
        skipped.inc(sum(1 for _ in grouped['todo']))
        return
      yield from grouped['todo']

    return ({'todo': keyed, 'done': self.done | 'KeyDone' >> beam.Map(lambda done_id: (done_id, None))}
            | 'JoinDone' >> beam.CoGroupByKey()
            | 'Undone' >> beam.FlatMap(undone))


class SkipDoneClips(beam.PTransform):
  """Sources -> Sources holding only the clips not in `done` (ids); a source with none left is dropped."""

  def __init__(self, done: beam.PCollection):
    super().__init__()
    self.done = done

  def expand(self, sources):
    return (sources
            | 'ClipEntries' >> beam.FlatMap(_clip_entries)
            | 'UndoneClips' >> _WithoutDone(self.done, 'clips_already_done')
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
    return (tasks
            | 'KeyTasks' >> beam.Map(lambda task: (task.clip_id, task))
            | 'UndoneTasks' >> _WithoutDone(self.done, 'pieces_already_done'))
