"""The run's summary, whatever the recipe's writer: index.jsonl, rejects.jsonl and stats.json.

They come from combiners over this run's records and rejects and the records an earlier run published (read
for resume). Every planned clip is counted once: written, rejected, or published before. Each run also keeps its
own stats.json and rejects.jsonl under runs/<run id>/, which later runs leave alone.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import tempfile
from typing import List, Optional, Tuple

import apache_beam as beam
from apache_beam import typehints
from apache_beam.io.filesystems import FileSystems

from transforms.core.elements import Reject
from transforms.core.fileio import iter_jsonl, put_file, write_atomic
from transforms.writers.folders import unit_indexes, unit_of
from transforms.writers.shards import finished_shard_indexes


def published_indexes(output: str) -> List[str]:
  """Index files of everything published: finished shards and written folder units (transforms/writers)."""
  return finished_shard_indexes(output) + unit_indexes(output)


# ----------------------------------------------------------------------------- run summary

def _earlier_record(record: dict, unit: str = '') -> Tuple[str, str, int, str, str, str, tuple, str]:
  """(id, planned id, frames, inputs, shard, key, cut, unit): what resume, retiring and the summary need of a
  record; `cut`: (clip cut from, its in-sync pieces) for a piece of --split_at_sync_breaks, else (); `unit`: the
  folder unit whose published index holds it ('' in a shard)."""
  cut = (record['cut_from'], int(record.get('cut_pieces') or 0)) if record.get('cut_from') else ()
  return (record['id'], record.get('planned_id') or record['id'], int(record.get('num_frames', 0)),
          record.get('inputs', ''), record.get('shard', ''), record.get('key', ''), cut, unit)


# The element type of an earlier record: Beam would infer its cut from _earlier_record's code as a pair, and it
# is () for most records.
EARLIER = typehints.Tuple[str, str, int, str, str, str, typehints.Any, str]


class ReadPublished(beam.PTransform):
  """Records of the shards and folder units already published in `output` (an earlier run):
  (id, planned id, frames, inputs, shard, key, cut, unit).

  Read inside the pipeline, index file by index file, so the job graph does not grow with the output.
  """

  def __init__(self, output: str):
    super().__init__()
    self.output = output

  def expand(self, pbegin):
    return (pbegin
            | 'OutputDir' >> beam.Create([self.output])
            | 'IndexFiles' >> beam.FlatMap(published_indexes)
            | 'SpreadIndexFiles' >> beam.Reshuffle()
            | 'IndexRecords' >> beam.FlatMap(lambda path: (_earlier_record(r, unit_of(path))
                                                           for r in iter_jsonl(path)))
            .with_output_types(EARLIER))


def _events(tag):
  """Key each accounting fact by the planned clip it settles."""
  if tag == 'planned':
    return lambda clip_id: (clip_id, ('planned',))
  if tag == 'earlier':
    return lambda written: (written[1], ('earlier', written[0], written[2]))
  if tag == 'retired':
    return lambda written: (written[1], ('retired', written[0]))
  if tag == 'reused':
    return lambda ref: (ref.record.get('planned_id') or ref.id, ('reused', ref.id))
  if tag == 'written':
    return lambda record: (record.get('planned_id') or record['id'], ('written', record['id'],
                                                                       int(record.get('num_frames', 0))))
  return lambda reject: (reject.planned, (tag, reject.id, reject.reason, reject.stage))


MAX_UNBALANCED_LISTED = 20


def planned_outcome(keyed) -> dict:
  """Counts for one planned clip id from everything this run and earlier runs say about it.

  Written when any sample (the clip or a piece of it) is published, now or before; otherwise rejected
  once per reject of the clip itself, or once for all rejected pieces. `samples`/`reject_records` count lines.
  """
  planned_id, facts = keyed
  planned = sum(1 for fact in facts if fact[0] == 'planned')
  retired = sum(1 for fact in facts if fact[0] == 'retired')
  if not planned:  # an earlier sample (kept, or retired by --prune) or carried reject of a clip no longer planned
    kept = any(fact[0] == 'earlier' for fact in facts)
    return {'counts': collections.Counter({'not_in_manifest': int(kept), 'retired': retired}),
            'rejected_by_reason': collections.Counter(), 'rejected_by_stage': collections.Counter(),
            'unbalanced': [], 'not_in_manifest': [planned_id] if kept else []}
  new = {fact[1]: fact[2] for fact in facts if fact[0] == 'written'}
  earlier = {fact[1]: fact[2] for fact in facts if fact[0] == 'earlier' and fact[1] not in new}
  rejects = [fact for fact in facts if fact[0] in ('rejected', 'carried')]
  clip_rejects = [fact for fact in rejects if fact[1] == planned_id]
  piece_rejects = [fact for fact in rejects if fact[1] != planned_id]
  written = 1 if new or earlier else 0
  rejected = len(clip_rejects) + (1 if piece_rejects and not written else 0)
  counts = collections.Counter({
      'planned': planned, 'written': written, 'written_this_run': 1 if new else 0,
      'already_written': 1 if earlier and not new else 0, 'rejected': rejected,
      'samples': len(new) + len(earlier), 'frames_written': sum(new.values()) + sum(earlier.values()),
      'reject_records': len(rejects), 'pieces_rejected': len(piece_rejects),
      'carried_rejects': sum(1 for fact in rejects if fact[0] == 'carried'), 'retired': retired,
      'reused': sum(1 for fact in facts if fact[0] == 'reused')})
  summary = {'counts': counts,
             'rejected_by_reason': collections.Counter(fact[2] for fact in rejects),
             'rejected_by_stage': collections.Counter(fact[3] for fact in rejects),
             'unbalanced': [planned_id] if written + rejected != planned else [], 'not_in_manifest': []}
  return summary


class StatsFn(beam.CombineFn):
  """Adds up the per-planned-clip outcomes into stats.json; lifts, so no worker holds more than counters."""

  def create_accumulator(self):
    return {'counts': collections.Counter(), 'rejected_by_reason': collections.Counter(),
            'rejected_by_stage': collections.Counter(), 'unbalanced': [], 'not_in_manifest': []}

  def add_input(self, acc, outcome):
    if outcome:
      for name in ('counts', 'rejected_by_reason', 'rejected_by_stage'):
        acc[name].update(outcome[name])
      for name in ('unbalanced', 'not_in_manifest'):
        acc[name] = (acc[name] + outcome[name])[:MAX_UNBALANCED_LISTED]
    return acc

  def merge_accumulators(self, accs):
    merged = self.create_accumulator()
    for acc in accs:
      self.add_input(merged, acc)
    return merged

  def extract_output(self, acc):
    counts = acc['counts']
    stats = {name: int(counts.get(name, 0)) for name in (
        'planned', 'written', 'rejected', 'written_this_run', 'already_written', 'samples', 'reject_records',
        'pieces_rejected', 'frames_written', 'carried_rejects', 'not_in_manifest', 'retired', 'reused')}
    stats['balanced'] = stats['written'] + stats['rejected'] == stats['planned'] and not acc['unbalanced']
    stats['rejected_by_reason'] = dict(sorted(acc['rejected_by_reason'].items()))
    stats['rejected_by_stage'] = dict(sorted(acc['rejected_by_stage'].items()))
    stats['unbalanced_examples'] = sorted(acc['unbalanced'])
    stats['not_in_manifest_examples'] = sorted(acc['not_in_manifest'])
    return stats


def reject_line(reject: Reject) -> str:
  return json.dumps(reject.to_json(), sort_keys=True)


class WriteIndex(beam.DoFn):
  """Once every shard is published: index.jsonl, streamed from the shard and folder-unit index files
  (constant memory)."""

  def __init__(self, output: str):
    self.output = output

  def process(self, _, published_count, retired_count=0):
    target = FileSystems.join(self.output, 'index.jsonl')
    fd, local = tempfile.mkstemp(prefix='index-')
    try:
      lines = 0
      with os.fdopen(fd, 'wb') as out:
        for path in published_indexes(self.output):
          with FileSystems.open(path, mime_type='application/octet-stream',
                                compression_type='uncompressed') as handle:
            for line in handle:
              if line.strip():
                out.write(line if line.endswith(b'\n') else line + b'\n')
                lines += 1
      put_file(local, target, move=True)
    finally:
      if os.path.exists(local):
        os.unlink(local)
    yield lines


RUNS = 'runs'  # runs/<run id>/: each run's stats.json and rejects.jsonl, kept when a later run writes its own


class WriteStats(beam.DoFn):
  """Last: the run's copy of rejects.jsonl and stats.json under runs/<run id>/, then the output's stats.json
  (the CLI takes it as 'finished'), once index.jsonl and rejects.jsonl are in place."""

  def __init__(self, output: str, thresholds: dict, run_id: str = ''):
    self.output = output
    self.thresholds = thresholds
    self.run_id = run_id

  def process(self, stats, index_lines, unused_reject_files):
    stats = dict(stats, index_lines=index_lines, thresholds=self.thresholds, run_id=self.run_id)
    data = json.dumps(stats, indent=2, sort_keys=True).encode()
    if self.run_id:
      history = FileSystems.join(self.output, RUNS, self.run_id)
      fd, local = tempfile.mkstemp(prefix='rejects-')
      with os.fdopen(fd, 'wb') as out, FileSystems.open(
          FileSystems.join(self.output, 'rejects.jsonl'), mime_type='application/octet-stream',
          compression_type='uncompressed') as handle:
        shutil.copyfileobj(handle, out, 1 << 20)
      put_file(local, FileSystems.join(history, 'rejects.jsonl'), move=True)
      write_atomic(FileSystems.join(history, 'stats.json'), data)
    write_atomic(FileSystems.join(self.output, 'stats.json'), data)
    if not stats['balanced']:
      logging.error('accounting mismatch: %s', stats)
    yield stats


class WriteRunSummary(beam.PTransform):
  """index.jsonl, rejects.jsonl and stats.json from the planned ids, earlier and new records, and rejects.

  Accounting facts are grouped by planned clip id (a distributed shuffle of small tuples) and counted by a
  combiner; rejects are written by Beam's own text sink (temporary files, then one rename).
  """

  def __init__(self, output: str, thresholds: Optional[dict] = None, run_id: str = ''):
    super().__init__()
    self.output = output
    self.thresholds = thresholds or {}
    self.run_id = run_id

  def expand(self, inputs):
    """`earlier`: the records still valid; optional `retired`: the earlier records this run took out, and
    `reused`: the SampleRefs of work-dir fragments (an interrupted run's) packed without being made again."""
    planned, earlier, records, rejects, carried = (
        inputs['planned'], inputs['earlier'], inputs['records'], inputs['rejects'], inputs['carried'])
    retired, reused = inputs.get('retired'), inputs.get('reused')
    if retired is None:
      retired = planned.pipeline | 'NoneRetired' >> beam.Create([])
    if reused is None:
      reused = planned.pipeline | 'NoneReused' >> beam.Create([])
    facts = (
        (planned | 'PlannedFacts' >> beam.Map(_events('planned')),
         earlier | 'EarlierFacts' >> beam.Map(_events('earlier')),
         records | 'WrittenFacts' >> beam.Map(_events('written')),
         rejects | 'RejectFacts' >> beam.Map(_events('rejected')),
         carried | 'CarriedFacts' >> beam.Map(_events('carried')),
         retired | 'RetiredFacts' >> beam.Map(_events('retired')),
         reused | 'ReusedFacts' >> beam.Map(_events('reused')))
        | 'AllFacts' >> beam.Flatten())
    stats = (facts
             | 'ByPlannedClip' >> beam.GroupByKey()
             | 'Outcome' >> beam.Map(planned_outcome)
             | 'AddUp' >> beam.CombineGlobally(StatsFn()))
    published = records | 'CountPublished' >> beam.combiners.Count.Globally()
    index_lines = (published.pipeline
                   | 'AfterShards' >> beam.Create([None])
                   | 'WriteIndex' >> beam.ParDo(WriteIndex(self.output), beam.pvalue.AsSingleton(published),
                                                beam.pvalue.AsSingleton(
                                                    retired | 'CountRetired' >> beam.combiners.Count.Globally())))
    reject_files = ((rejects, carried)
                    | 'AllRejectLines' >> beam.Flatten()
                    | 'RejectLine' >> beam.Map(reject_line)
                    | 'WriteRejects' >> beam.io.WriteToText(FileSystems.join(self.output, 'rejects'),
                                                           file_name_suffix='.jsonl', num_shards=1,
                                                           shard_name_template=''))
    return stats | 'WriteStats' >> beam.ParDo(WriteStats(self.output, self.thresholds, self.run_id),
                                              beam.pvalue.AsSingleton(index_lines),
                                              beam.pvalue.AsList(reject_files))
