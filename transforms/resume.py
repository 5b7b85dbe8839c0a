"""Resume inside the pipeline: planned work against what an earlier run settled, matched on clip id and inputs.

A clip's inputs (`clip_inputs`) are a digest of what decides its bytes: its source, range, crop and the run's
decisive settings. A published sample or a finished work-dir fragment counts as done only for a planned clip
of the same id AND inputs; a sample whose clip changed, or left the manifest (with --prune), is retired (a
folder unit, e.g. a subject, is re-made or retired whole; transforms/writers/folders.py).
Everything about the output is read by the pipeline itself, so the job graph does not grow with it. The joins
are shuffles keyed by clip id, so they also spread clips of one source over workers.
"""
from __future__ import annotations

import collections
import dataclasses
import hashlib
import json

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.core.elements import ClipSpec, Source
from transforms.writers.folders import REPLACING, UNIT

STAGE = 'resume'


def clip_inputs(source: Source, clip: ClipSpec, settings: str) -> str:
  """What decides a clip's sample: the source's address and reference height, the clip's range and crop, its
  language (the sample's json records it; only when given, so samples written before the field keep their
  inputs), and `settings` (a digest of the run's decisive options). Not the clip's id or position."""
  spec = [source.url, source.height, clip.start, clip.end, list(clip.crop) if clip.crop else None, clip.crop_ratio,
          settings] + ([source.language] if source.language else [])
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
  """Whether work with `inputs` is done by any of `done_inputs`; '' (a record from before inputs were stored)
  settles any."""
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
  """One planned id's earlier records against the inputs it is planned with now: (stale, record). Stale: its
  clip changed, or the input lists it but rejects it now, or its unit was being re-made or retired when a run
  stopped (REPLACING); or, with --prune, it left the input. A clip no longer listed stays current without
  --prune (the summary lists it)."""
  _, grouped = keyed
  listed = list(grouped['planned'])
  plans = {inputs for inputs in listed if inputs is not None}
  for record in grouped['earlier']:
    inputs = record[3]
    yield bool(inputs == REPLACING or (listed and (not plans or (inputs and inputs not in plans)))
               or (not listed and prune)), record


def _whole_unit(keyed):
  """A folder unit is re-made or retired whole: a subject numbers its frames over all its clips, so when one
  of its records is stale, all are."""
  _, decided = keyed
  decided = list(decided)
  stale = any(flag for flag, _ in decided)
  for _, record in decided:
    yield stale, record


def _route(decided):
  stale, record = decided
  yield beam.pvalue.TaggedOutput('stale', record) if stale else record


class SortEarlier(beam.PTransform):
  """(earlier records (id, planned id, frames, inputs, shard, key, cut, unit), planned (id, inputs; None for a
  clip the input lists but rejected)) -> {'current': records still valid, 'stale': records to retire}. A
  shard's samples are sorted one by one, a folder unit's records together (`_whole_unit`)."""

  def __init__(self, prune: bool):
    super().__init__()
    self.prune = prune

  def expand(self, inputs):
    earlier, planned = inputs
    decided = ({'earlier': earlier | 'KeyEarlier' >> beam.Map(lambda record: (record[1], record)),
                'planned': planned}
               | 'JoinPlanned' >> beam.CoGroupByKey()
               | 'Sort' >> beam.FlatMap(_sort_earlier, self.prune))
    in_shards, in_units = decided | 'ShardOrUnit' >> beam.Partition(lambda d, _: 1 if d[1][UNIT] else 0, 2)
    units = (in_units
             | 'ByUnit' >> beam.Map(lambda d: (d[1][UNIT], d))
             | 'GroupUnit' >> beam.GroupByKey()
             | 'WholeUnit' >> beam.FlatMap(_whole_unit))
    sorted_ = ((in_shards, units)
               | 'AllSorted' >> beam.Flatten()
               | 'Route' >> beam.FlatMap(_route).with_outputs('stale', main='current'))
    return {'current': sorted_.current, 'stale': sorted_.stale}


def _reusable(keyed, prune: bool):
  """Fragments of one planned id that match the inputs it is planned with now; on tag `leftover` those no run
  will pack: the clip changed or the input rejects it now, or (with --prune) it left the input."""
  _, grouped = keyed
  listed = list(grouped['planned'])
  plans = {inputs for inputs in listed if inputs is not None}
  for ref in grouped['fragment']:
    if ref.record.get('inputs', '') in plans:
      yield ref
    elif listed or prune:
      yield beam.pvalue.TaggedOutput('leftover', ref)


def _unpublished(keyed):
  _, grouped = keyed
  published = set(grouped['published'])
  for ref in grouped['fragment']:
    if not settled(ref.record.get('inputs', ''), published):
      yield ref
    else:  # its sample is published: a run stopped before it deleted the fragment
      yield beam.pvalue.TaggedOutput('leftover', ref)


class ReusableFragments(beam.PTransform):
  """(fragments (SampleRefs found in the work dir), listed (id, inputs; None for a clip the input lists but
  rejected), published (id, inputs)) -> {'reusable': the fragments of clips planned with the same inputs and
  not yet published: what an interrupted run rendered and filtered, ready to be packed into shards without
  being made again; 'leftover': the others, save those of clips no longer listed without --prune}."""

  def __init__(self, prune: bool = False):
    super().__init__()
    self.prune = prune

  def expand(self, inputs):
    fragments, planned, published = inputs
    matching = ({'fragment': fragments | 'ByPlannedId' >> beam.Map(
                    lambda ref: (ref.record.get('planned_id') or ref.id, ref)),
                 'planned': planned}
                | 'JoinPlanned' >> beam.CoGroupByKey()
                | 'Matching' >> beam.FlatMap(_reusable, self.prune).with_outputs('leftover', main='reusable'))
    unpublished = ({'fragment': matching.reusable | 'ById' >> beam.Map(lambda ref: (ref.id, ref)),
                    'published': published}
                   | 'JoinPublished' >> beam.CoGroupByKey()
                   | 'Unpublished' >> beam.FlatMap(_unpublished).with_outputs('leftover', main='reusable'))
    leftover = (matching.leftover, unpublished.leftover) | 'Leftover' >> beam.Flatten()
    return {'reusable': unpublished.reusable, 'leftover': leftover}


# --split_at_sync_breaks: a clip is cut into pieces after it is rendered (transforms/sync_split.py), so the pieces'
# ids are not known before the render. Each piece's record names the clip it was cut from (`cut_from`) and how many
# pieces that gave (`cut_pieces`): a rerun skips the clip when all of them are published (or wait as fragments in
# the work dir) with its inputs, and otherwise renders it again but leaves out the pieces already written.

def cut_facts_of_earlier(written):
  """(clip cut from, (piece id, inputs, pieces)) of an earlier record (transforms/writers/summary.ReadPublished)
  that is a piece of a clip cut at sync breaks; nothing for any other."""
  if written[6]:
    cut_from, pieces = written[6]
    yield cut_from, (written[0], written[3], pieces)


def cut_facts_of_fragment(ref):
  """The same for a fragment an interrupted run left in the work dir (a SampleRef)."""
  if ref.record.get('cut_from'):
    yield ref.record['cut_from'], (ref.id, ref.record.get('inputs', ''), int(ref.record.get('cut_pieces') or 0))


def _all_pieces_done(keyed):
  clip_id, facts = keyed
  pieces = collections.defaultdict(set)
  for piece_id, inputs, count in facts:
    pieces[(inputs, count)].add(piece_id)
  for (inputs, count), done in pieces.items():
    if len(done) >= count:
      yield clip_id, inputs


class CutClipsDone(beam.PTransform):
  """Cut facts (clip id, (piece id, inputs, pieces)) -> (clip id, inputs) of every clip whose pieces are all
  done with the same inputs: such a clip counts as done (`SkipDoneClips`, `SkipDoneTasks`)."""

  def expand(self, facts):
    return (facts
            | 'ByClipCutFrom' >> beam.GroupByKey()
            | 'AllPiecesDone' >> beam.FlatMap(_all_pieces_done))


def _mark_done_pieces(keyed):
  _, grouped = keyed
  facts = list(grouped['fact'])
  for task in grouped['task']:
    done = sorted({piece_id for piece_id, inputs, _ in facts if inputs in ('', task.inputs)})
    yield dataclasses.replace(task, done_pieces=tuple(done)) if done else task


class MarkDonePieces(beam.PTransform):
  """ClipTasks -> the same, each with the pieces an earlier run wrote of it (`done_pieces`, from cut facts
  (clip id, (piece id, inputs, pieces))): cut again, they are not written twice."""

  def __init__(self, facts: beam.PCollection):
    super().__init__()
    self.facts = facts

  def expand(self, tasks):
    return ({'task': tasks | 'KeyTasks' >> beam.Map(lambda task: (task.clip_id, task)), 'fact': self.facts}
            | 'JoinCutFacts' >> beam.CoGroupByKey()
            | 'WithDonePieces' >> beam.FlatMap(_mark_done_pieces))
