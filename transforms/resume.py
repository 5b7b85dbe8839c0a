"""Resume inside the pipeline: planned work against what an earlier run settled, matched on clip id and inputs.

A clip's inputs (`clip_inputs`) are a digest of what decides its bytes: its source, range, crop and the run's
decisive settings. A published sample or a finished work-dir fragment counts as done only for a planned clip
of the same id AND inputs; a sample whose clip changed, or left the manifest (with --prune), is retired.
Everything about the output is read by the pipeline itself, so the job graph does not grow with it. The joins
are shuffles keyed by clip id, so they also spread clips of one source over workers.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.core.elements import ClipSpec, Source

STAGE = 'resume'


def clip_inputs(source: Source, clip: ClipSpec, settings: str) -> str:
  """What decides a clip's sample: the source's address and reference height, the clip's range and crop, and
  `settings` (a digest of the run's decisive options). Not the clip's id or position."""
  spec = [source.url, source.height, clip.start, clip.end, list(clip.crop) if clip.crop else None, clip.crop_ratio,
          settings]
  return hashlib.sha1(json.dumps(spec).encode()).hexdigest()[:16]


def planned_inputs(source: Source, settings: str):
  """(clip id, inputs) of each clip a source plans."""
  for clip in source.clips:
    yield clip.clip_id, clip_inputs(source, clip, settings)


def _clip_entries(source: Source, settings: str):
  header = dataclasses.replace(source, clips=())
  for clip in source.clips:
    yield clip.clip_id, (header, dataclasses.replace(clip, inputs=clip_inputs(source, clip, settings)))


def _rebuild_source(keyed) -> Source:
  _, entries = keyed
  entries = sorted(entries, key=lambda entry: entry[1].index)
  return dataclasses.replace(entries[0][0], clips=tuple(clip for _, clip in entries))


def settled(inputs: str, done_inputs) -> bool:
  """Whether work with `inputs` is done by any of `done_inputs`; '' (a record from before inputs were stored,
  or a carried reject) settles any."""
  return any(done == '' or done == inputs for done in done_inputs)


class _WithoutDone(beam.PTransform):
  """(id, value) -> the values not settled by a (id, inputs) in `done` (a bare id settles any inputs),
  counting the others in `resume/<counter>`."""

  def __init__(self, done: beam.PCollection, counter: str, inputs_of):
    super().__init__()
    self.done = done
    self.counter = counter
    self.inputs_of = inputs_of

  def expand(self, keyed):
    skipped = Metrics.counter(STAGE, self.counter)
    inputs_of = self.inputs_of

    def undone(joined):
      _, grouped = joined
      done_inputs = set(grouped['done'])
      for value in grouped['todo']:
        if done_inputs and settled(inputs_of(value), done_inputs):
          skipped.inc()
        else:
          yield value

    done = self.done | 'KeyDone' >> beam.Map(lambda done: (done, '') if isinstance(done, str) else done)
    return ({'todo': keyed, 'done': done}
            | 'JoinDone' >> beam.CoGroupByKey()
            | 'Undone' >> beam.FlatMap(undone))


class SkipDoneClips(beam.PTransform):
  """Sources -> Sources holding only the clips not settled by `done` ((id, inputs)), each clip with its
  inputs set (`settings`: the run's decisive options digest); a source with none left is dropped."""

  def __init__(self, done: beam.PCollection, settings: str = ''):
    super().__init__()
    self.done = done
    self.settings = settings

  def expand(self, sources):
    return (sources
            | 'ClipEntries' >> beam.FlatMap(_clip_entries, self.settings)
            | 'UndoneClips' >> _WithoutDone(self.done, 'clips_already_done', lambda entry: entry[1].inputs)
            | 'BySource' >> beam.Map(lambda entry: (entry[0].source_id, entry))
            | 'GroupSourceClips' >> beam.GroupByKey()
            | 'RebuildSource' >> beam.Map(_rebuild_source))


class SkipDoneTasks(beam.PTransform):
  """ClipTasks -> the tasks not settled by `done`: pieces of a split clip already written (or waiting in the
  work dir), or rejected for good (--incremental), are not rendered again."""

  def __init__(self, done: beam.PCollection):
    super().__init__()
    self.done = done

  def expand(self, tasks):
    return (tasks
            | 'KeyTasks' >> beam.Map(lambda task: (task.clip_id, task))
            | 'UndoneTasks' >> _WithoutDone(self.done, 'pieces_already_done', lambda task: task.inputs))


def _sort_earlier(keyed, prune: bool):
  """One planned id's earlier records against the inputs it is planned with now: current, or stale (its clip
  changed, or the input lists it but rejects it now; or, with --prune, it left the input). A clip no longer
  listed stays current without --prune (the summary lists it)."""
  _, grouped = keyed
  listed = list(grouped['planned'])
  plans = {inputs for inputs in listed if inputs is not None}
  for record in grouped['earlier']:
    inputs = record[3]
    if (listed and (not plans or (inputs and inputs not in plans))) or (not listed and prune):
      yield beam.pvalue.TaggedOutput('stale', record)
    else:
      yield record


class SortEarlier(beam.PTransform):
  """(earlier records (id, planned id, frames, inputs, shard, key), planned (id, inputs; None for a clip the
  input lists but rejected)) -> {'current': records still valid, 'stale': records to retire}."""

  def __init__(self, prune: bool):
    super().__init__()
    self.prune = prune

  def expand(self, inputs):
    earlier, planned = inputs
    sorted_ = ({'earlier': earlier | 'KeyEarlier' >> beam.Map(lambda record: (record[1], record)),
                'planned': planned}
               | 'JoinPlanned' >> beam.CoGroupByKey()
               | 'Sort' >> beam.FlatMap(_sort_earlier, self.prune).with_outputs('stale', main='current'))
    return {'current': sorted_.current, 'stale': sorted_.stale}


def _reusable(keyed):
  """Fragments of one planned id that match the inputs it is planned with now."""
  _, grouped = keyed
  plans = set(grouped['planned'])
  for ref in grouped['fragment']:
    if ref.record.get('inputs', '') in plans:
      yield ref


def _unpublished(keyed):
  _, grouped = keyed
  published = set(grouped['published'])
  for ref in grouped['fragment']:
    if not settled(ref.record.get('inputs', ''), published):
      yield ref


class ReusableFragments(beam.PTransform):
  """(fragments (SampleRefs found in the work dir), planned (id, inputs), published (id, inputs)) -> the
  fragments of clips planned with the same inputs and not yet published: what an interrupted run rendered and
  filtered, ready to be packed into shards without being made again."""

  def expand(self, inputs):
    fragments, planned, published = inputs
    matching = ({'fragment': fragments | 'ByPlannedId' >> beam.Map(
                    lambda ref: (ref.record.get('planned_id') or ref.id, ref)),
                 'planned': planned}
                | 'JoinPlanned' >> beam.CoGroupByKey()
                | 'Matching' >> beam.FlatMap(_reusable))
    return ({'fragment': matching | 'ById' >> beam.Map(lambda ref: (ref.id, ref)), 'published': published}
            | 'JoinPublished' >> beam.CoGroupByKey()
            | 'Unpublished' >> beam.FlatMap(_unpublished))
