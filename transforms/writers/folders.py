"""Folder outputs (one folder per subject or tube, or one clip's files) with the same guarantees as shards.

A unit (a subject's or a tube's folder, or hdtf's `--layout=files` clip) counts as written once
`<output>/published/<unit>.jsonl` exists: its writer writes every file of the unit first (each atomically, with
deterministic bytes, so a retried bundle rewrites the same files), then this index of the unit's clips, last.
Resume and index.jsonl read these files as they read shard indexes; a unit whose index is missing is simply
written again.

A rerun replaces or retires a unit whose clips changed, never deleting before what replaces it is on disk:
1. its index is first rewritten with every record's `inputs` set to REPLACING (the unit no longer counts, for
   this run's resume or a later one's, but nothing is gone);
2. a writer then writes the new version's files over the old ones, deletes what the old version had and the
   new one does not write (`UnitFiles`), and publishes the new index; or `RetireUnits`, once every writer of
   the run is done, deletes the unit's files, then its index.
A crash anywhere leaves an index of REPLACING records, which the next run re-makes or retires again.
"""
from __future__ import annotations

import json
import os
import time
from typing import Callable, Iterable, List, Optional, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms.core.fileio import PARTIAL, delete_quietly, is_local, iter_jsonl, write_atomic

PUBLISHED = 'published'
REPLACING = 'replacing'  # `inputs` of a unit's records while it is re-made or retired (never a digest)
UNIT = 7  # where an earlier record (transforms/writers/summary._earlier_record) holds its unit
STAGE = 'write'


def unit_index_uri(output: str, unit: str) -> str:
  return FileSystems.join(output, PUBLISHED, unit + '.jsonl')


def unit_of(index_uri: str) -> str:
  """The unit a published index file is of; '' for another index (a shard's)."""
  folder, name = os.path.split(index_uri.rstrip('/'))
  return name[:-len('.jsonl')] if os.path.basename(folder) == PUBLISHED and name.endswith('.jsonl') else ''


def publish_unit(output: str, unit: str, records: Iterable[dict], folder: Optional[str] = None) -> List[dict]:
  """Mark `unit` written, with one index record per clip it holds (each gets `folder`: the unit's folder when
  its name is not one an object store reads back safely, as mmvox's '#' keys, else `unit`)."""
  records = [dict(record, folder=folder or unit) for record in records]
  _write_index(output, unit, records)
  return records


def _write_index(output: str, unit: str, records: List[dict]) -> None:
  write_atomic(unit_index_uri(output, unit),
               ''.join(json.dumps(record, sort_keys=True) + '\n' for record in records).encode())


def is_published(output: str, unit: str) -> bool:
  return FileSystems.exists(unit_index_uri(output, unit))


def published_records(output: str, unit: str) -> Optional[List[dict]]:
  """The records of `unit` when an earlier attempt (a retried bundle) or run published it, else None."""
  if not is_published(output, unit):
    return None
  return list(iter_jsonl(unit_index_uri(output, unit)))


def unit_indexes(output: str) -> List[str]:
  try:
    matched = FileSystems.match([FileSystems.join(output, PUBLISHED, '*.jsonl')])[0].metadata_list
  except Exception:  # pylint: disable=broad-except  # no folder output yet
    return []
  return sorted(m.path for m in matched)


# ----------------------------------------------------------------------------- re-making and retiring a unit

def versions(records: Iterable[dict]) -> set:
  return {(record['id'], record.get('inputs', '')) for record in records}


def same_version(records: Optional[List[dict]], clips: Iterable[Tuple[str, str]]) -> bool:
  """Whether published `records` are these (clip id, inputs): a retried or concurrent attempt of this unit
  published it. A record from before inputs were stored ('') matches any inputs."""
  if records is None:
    return False
  published = {record['id']: record.get('inputs', '') for record in records}
  clips = dict(clips)
  return published.keys() == clips.keys() and all(published[i] in ('', clips[i]) for i in clips)


def remade(records: Optional[List[dict]], clips: Iterable[Tuple[str, str]]) -> bool:
  """Whether an attempt with these (clip id, inputs) re-makes the published unit: one of its clips came back
  (resume lets a published clip through only when its unit changed), or an earlier attempt began replacing it.
  Otherwise new clips of a published subject would renumber its frames: they are refused."""
  return records is not None and (bool({record['id'] for record in records} & {i for i, _ in clips})
                                  or any(record.get('inputs') == REPLACING for record in records))


def unpublish(output: str, unit: str, records: List[dict]) -> None:
  """Step 1 of re-making or retiring `unit`: its index records with `inputs` REPLACING (nothing deleted)."""
  if records and all(record.get('inputs') == REPLACING for record in records):
    return  # a concurrent or earlier attempt did it
  _write_index(output, unit, [dict(record, inputs=REPLACING) for record in records])


def _same_path(uri: str) -> str:
  return os.path.normpath(uri) if is_local(uri) else uri


def existing(patterns: Iterable[str]) -> List[str]:
  """Files that match any of `patterns` (FileSystems globs: `*` within a folder, `**` below it)."""
  found = []
  for pattern in patterns:
    try:
      found += [m.path for m in FileSystems.match([pattern])[0].metadata_list]
    except Exception:  # pylint: disable=broad-except  # no such folder
      continue
  return found


def tree(folder: str) -> List[str]:
  """Every file under `folder`."""
  return existing([FileSystems.join(folder, '**')])


def folder_files(output: str, records: List[dict]) -> List[str]:
  """Every file of a unit that is one folder of its own (a subject's)."""
  return tree(FileSystems.join(output, records[0]['folder'])) if records else []


def delete_files(uris: Iterable[str], root: str) -> None:
  """Delete `uris`, then, on a local disk, the folders under `root` they leave empty (an object store has none)."""
  uris = list(uris)
  delete_quietly(uris)
  if not is_local(root):
    return
  top = os.path.normpath(root)
  for parent in sorted({os.path.dirname(os.path.normpath(uri)) for uri in uris}, key=len, reverse=True):
    while parent.startswith(top + os.sep):
      try:
        os.rmdir(parent)
      except OSError:  # not empty (or gone)
        break
      parent = os.path.dirname(parent)


class UnitFiles:
  """The files one attempt writes for a unit, so that what an earlier version (or an attempt that never
  published) left and this one does not write goes before the unit is published: frames past the new count,
  an audio feature or sidecar the run no longer makes. Another attempt's scratch files are left alone."""

  def __init__(self, root: str):
    self.root = root
    self.written = set()

  def uri(self, *parts: str) -> str:
    uri = FileSystems.join(self.root, *parts)
    self.written.add(_same_path(uri))
    return uri

  def drop_others(self, found: Iterable[str]) -> List[str]:
    stale = [uri for uri in found if _same_path(uri) not in self.written and not uri.endswith(PARTIAL)]
    delete_files(stale, self.root)
    return stale


class RetireUnit(beam.DoFn):
  """(unit, [earlier records (id, planned id, frames, inputs, shard, key, cut, unit)] its clips changed or left the
  input) -> those of them no longer in the output. Runs once every writer of the run is done (the side input):
  a unit a writer published anew keeps its new version (the records it re-made unchanged are not retired);
  one still as it was, or left REPLACING by a writer that failed, is unpublished, its files deleted
  (`unit_files(output, records)`, the file a listing finds first, first), then its index. Run twice, the
  second finds the index gone and deletes nothing."""

  def __init__(self, output: str, unit_files: Callable[[str, List[dict]], List[str]]):
    self.output = output
    self.unit_files = unit_files
    self.retired = Metrics.counter(STAGE, 'units_retired')

  def process(self, keyed, unused_writers_done=None):
    unit, stale = keyed
    records = published_records(self.output, unit)
    if records is None:  # retired by an earlier attempt
      yield from stale
      return
    now = versions(records)
    if (any(inputs == REPLACING for _, inputs in now)
        or now == {(record[0], record[3]) for record in stale}):
      unpublish(self.output, unit, records)
      delete_files(self.unit_files(self.output, records), self.output)
      delete_quietly([unit_index_uri(self.output, unit)])
      self.retired.inc()
      yield from stale
    else:  # re-made by this run's writer
      yield from (record for record in stale if (record[0], record[3]) not in now)


class RetireUnits(beam.PTransform):
  """Earlier records of folder units to retire -> those retired, once `writers_done` (a singleton computed from
  every record the run's writers emitted) exists."""

  def __init__(self, output: str, unit_files: Callable[[str, List[dict]], List[str]],
               writers_done: beam.PCollection):
    super().__init__()
    self.output = output
    self.unit_files = unit_files
    self.writers_done = writers_done

  def expand(self, stale):
    return (stale
            | 'InUnits' >> beam.Filter(lambda record: bool(record[UNIT]))
            | 'ByUnit' >> beam.Map(lambda record: (record[UNIT], record))
            | 'GroupByUnit' >> beam.GroupByKey()
            | 'Retire' >> beam.ParDo(RetireUnit(self.output, self.unit_files),
                                     beam.pvalue.AsSingleton(self.writers_done)))


def clean_scratch(output: str, folders: Iterable[str], older_than_s: float) -> int:
  """Remove scratch files (`*.partial`) in `folders` of the output older than `older_than_s`: what a killed
  attempt left mid-write. A job writing to the same output right now has only fresh ones. Returns how many."""
  now = time.time()
  stale = []
  for folder in folders:
    try:
      found = FileSystems.match([FileSystems.join(output, folder, '*' + PARTIAL)])[0].metadata_list
    except Exception:  # pylint: disable=broad-except  # no such folder
      continue
    stale += [m.path for m in found if now - (m.last_updated_in_seconds or now) > older_than_s]
  delete_quietly(stale)
  return len(stale)
