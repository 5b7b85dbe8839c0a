"""Folder outputs (one folder per subject or tube) with the same guarantees as shards.

A unit (a subject's or a tube's folder) counts as written once `<output>/published/<unit>.jsonl` exists: its
writer writes every file of the unit first (each atomically, with deterministic bytes, so a retried bundle
rewrites the same files), then this index of the unit's clips, last. Resume and index.jsonl read these
files as they read shard indexes; a unit whose index is missing is simply written again.
"""
from __future__ import annotations

import json
from typing import Iterable, List, Optional

from apache_beam.io.filesystems import FileSystems

from transforms.core.fileio import iter_jsonl, write_atomic

PUBLISHED = 'published'


def unit_index_uri(output: str, unit: str) -> str:
  return FileSystems.join(output, PUBLISHED, unit + '.jsonl')


def publish_unit(output: str, unit: str, records: Iterable[dict], folder: Optional[str] = None) -> List[dict]:
  """Mark `unit` written, with one index record per clip it holds (each gets `folder`: the unit's folder when
  its name is not one an object store reads back safely, as mmvox's '#' keys, else `unit`)."""
  records = [dict(record, folder=folder or unit) for record in records]
  write_atomic(unit_index_uri(output, unit),
               ''.join(json.dumps(record, sort_keys=True) + '\n' for record in records).encode())
  return records


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
