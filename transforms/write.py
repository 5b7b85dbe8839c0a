"""Pack samples into WebDataset shards and write the run's index, rejects and stats.

Each shard is built on local disk, then published as `shards/<name>.jsonl`
(its index) followed by `shards/<name>.tar`, both under temporary names first.
A shard counts only once its tar exists, so a killed run leaves nothing a
rerun could duplicate: the rerun skips exactly the clips of finished shards.
"""
from __future__ import annotations

import collections
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
import time
import uuid
from typing import Dict, Iterable, List, Optional, Set

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from beam_pipeline.elements import Reject, Sample
from model_handlers.mediapipe_face import BLENDSHAPE_NAMES
from transforms.fileio import PARTIAL, put_file, read_bytes, write_atomic

STAGE = 'write'
SHARDS = 'shards'


# ----------------------------------------------------------------------------- output state

def _shard_files(output: str, pattern: str) -> List[str]:
  try:
    return sorted(m.path for m in FileSystems.match([FileSystems.join(output, SHARDS, pattern)])[0].metadata_list)
  except Exception:  # no shards folder yet
    return []


def finished_shard_indexes(output: str) -> List[str]:
  """Index files of shards whose tar exists."""
  tars = set(_shard_files(output, '*.tar'))
  return [path for path in _shard_files(output, '*.jsonl') if path[:-len('.jsonl')] + '.tar' in tars]


def read_index(output: str) -> List[dict]:
  records = []
  for path in finished_shard_indexes(output):
    for line in read_bytes(path).decode().splitlines():
      if line.strip():
        records.append(json.loads(line))
  return records


def written_ids(output: str) -> Set[str]:
  """Ids a rerun skips: written clips and written pieces. A split clip's planned id is not among them,
  so the rerun tracks it again and writes only its pieces that are missing."""
  return {record['id'] for record in read_index(output)}


def clean_unfinished(output: str) -> int:
  """Remove temporary files and index files whose shard never finished; returns how many."""
  tars = set(_shard_files(output, '*.tar'))
  stale = _shard_files(output, '*' + PARTIAL)
  stale += [p for p in _shard_files(output, '*.jsonl') if p[:-len('.jsonl')] + '.tar' not in tars]
  if stale:
    FileSystems.delete(stale)
  return len(stale)


# ----------------------------------------------------------------------------- samples

class AssembleSample(beam.DoFn):
  """filters.Analysis -> Sample: the mp4, wav, per-frame arrays and a json with every score.

  Reads the rendered mp4 back from the work dir (and removes it): the only
  place clip media become bytes in flight, right before they are packed.
  """

  def process(self, analysis):
    clip, arrays = analysis.clip, analysis.arrays
    clip_id, task = clip.task.clip_id, clip.task
    info = task.media.info
    meta = {
        'id': clip_id, 'planned_id': task.planned, 'source_id': task.source_id, 'url': task.url,
        'start': round(task.start, 4), 'end': round(task.end, 4), 'duration': round(clip.num_frames / clip.fps, 4),
        'fps': clip.fps, 'num_frames': clip.num_frames, 'size': [clip.size, clip.size],
        'source': {'width': info.width, 'height': info.height, 'fps': round(info.fps, 4),
                   'codec': info.video_codec, 'interlaced': info.interlaced, 'audio_rate': info.audio_rate},
        'crop': {'mode': task.crop_mode, 'window': list(task.window), 'ratio': task.crop_ratio,
                 'follow': [list(p) for p in task.path]},
        'face': {**analysis.face, **{k: round(v, 4) for k, v in task.face_stats}},
        'scores': analysis.scores,
        'failed': [code for code, _ in analysis.failed],
        'blendshape_names': list(BLENDSHAPE_NAMES),
        'notes': list(task.notes),
    }
    payload = {
        'mp4': read_bytes(clip.mp4_uri), 'wav': clip.wav, 'json': meta,
        'landmarks.npy': arrays['landmarks'], 'bbox.npy': arrays['bbox'], 'pose.npy': arrays['pose'],
        'blendshapes.npy': arrays['blendshapes'], 'iris.npy': arrays['iris'], 'lmk68.npy': arrays['lmk68'],
    }
    FileSystems.delete([clip.mp4_uri])
    yield Sample(clip_id, payload)


def _encode(value) -> bytes:
  if isinstance(value, (bytes, bytearray)):
    return bytes(value)
  if isinstance(value, np.ndarray):
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=False)
    return buffer.getvalue()
  return json.dumps(value, sort_keys=True).encode()


class WriteShards(beam.DoFn):
  """Sample -> index records, packing samples into tar shards of bounded count and size."""

  def __init__(self, output: str, max_samples: int, max_mb: float):
    self.output = output
    self.max_samples = max_samples
    self.max_bytes = int(max_mb * 1024 * 1024)
    self.shards = Metrics.counter(STAGE, 'shards')
    self.samples = Metrics.counter(STAGE, 'samples')

  def setup(self):
    self.local = tempfile.mkdtemp(prefix='shards-')
    self.prefix = time.strftime('%Y%m%d-%H%M%S') + '-' + uuid.uuid4().hex[:8]
    self.serial = 0
    self.tar = None

  def start_bundle(self):
    self.tar = None

  def _open(self):
    self.name = f'{self.prefix}-{self.serial:05d}'
    self.serial += 1
    self.path = os.path.join(self.local, self.name + '.tar')
    self.tar = tarfile.open(self.path, 'w', format=tarfile.USTAR_FORMAT)
    self.records: List[dict] = []
    self.size = 0

  def process(self, sample: Sample):
    if self.tar is None:
      self._open()
    for name, value in sorted(sample.payload.items()):
      data = _encode(value)
      member = tarfile.TarInfo(f'{sample.key}.{name}')
      member.size, member.mtime, member.mode = len(data), int(time.time()), 0o444
      self.tar.addfile(member, io.BytesIO(data))
      self.size += len(data) + 1024
    record = dict(sample.payload['json'])
    record['shard'] = f'{SHARDS}/{self.name}.tar'
    self.records.append(record)
    self.samples.inc()
    if len(self.records) >= self.max_samples or self.size >= self.max_bytes:
      yield from self._publish()

  def finish_bundle(self):
    for record in self._publish():
      yield WindowedValue(record, MIN_TIMESTAMP, [GlobalWindow()])

  def _publish(self) -> Iterable[dict]:
    if self.tar is None:
      return []
    self.tar.close()
    self.tar = None
    base = FileSystems.join(self.output, SHARDS, self.name)
    write_atomic(base + '.jsonl', ''.join(json.dumps(r, sort_keys=True) + '\n' for r in self.records).encode())
    put_file(self.path, base + '.tar', move=True)
    self.shards.inc()
    return self.records

  def teardown(self):
    shutil.rmtree(getattr(self, 'local', ''), ignore_errors=True)


# ----------------------------------------------------------------------------- run summary

def summarise(planned: List[str], rejects: List[Reject], index: List[dict], written_this_run: int,
              pieces: Iterable = ()) -> dict:
  """Counts per planned clip. A clip that tracking split into pieces (`pieces`: (piece id, planned id);
  index records carry `planned_id` too) counts once: written when any piece is in the index, else
  rejected once however many pieces were rejected. `samples` and `reject_records` count pieces/lines."""
  planned_of = dict(pieces)
  planned_of.update({record['id']: record.get('planned_id') or record['id'] for record in index})
  planned_ids = collections.Counter(planned)
  written_planned = {planned_of.get(record['id'], record['id']) for record in index}
  written = sum(1 for clip_id in planned_ids if clip_id in written_planned)
  clip_rejects = [r for r in rejects if planned_of.get(r.id, r.id) == r.id]
  piece_rejects = [r for r in rejects if planned_of.get(r.id, r.id) != r.id]
  all_pieces_rejected = {planned_of[r.id] for r in piece_rejects} - written_planned
  rejected = len(clip_rejects) + len(all_pieces_rejected)
  by_reason = collections.Counter(r.reason for r in rejects)
  by_stage = collections.Counter(r.stage for r in rejects)
  total = sum(planned_ids.values())
  samples = [r for r in index if planned_of.get(r['id'], r['id']) in planned_ids]
  return {
      'planned': total, 'written': written, 'rejected': rejected,
      'written_this_run': written_this_run, 'already_written': written - written_this_run,
      'balanced': written + rejected == total,
      'samples': len(samples), 'reject_records': len(rejects), 'pieces_rejected': len(piece_rejects),
      'rejected_by_reason': dict(sorted(by_reason.items())), 'rejected_by_stage': dict(sorted(by_stage.items())),
      'frames_written': sum(r.get('num_frames', 0) for r in samples),
  }


class WriteRunSummary(beam.DoFn):
  """Runs once after every shard is published: index.jsonl, rejects.jsonl, stats.json."""

  def __init__(self, output: str):
    self.output = output

  def process(self, _, planned, rejects, new_records, pieces=()):
    index = sorted(read_index(self.output), key=lambda r: r['id'])
    rejects = sorted(rejects, key=lambda r: (r.id, r.stage, r.reason))
    new_clips = {r.get('planned_id') or r['id'] for r in new_records}
    stats = summarise(list(planned), rejects, index, len(new_clips), pieces)
    planned_of = dict(pieces)
    write_atomic(FileSystems.join(self.output, 'index.jsonl'),
                 ''.join(json.dumps(r, sort_keys=True) + '\n' for r in index).encode())
    write_atomic(FileSystems.join(self.output, 'rejects.jsonl'),
                 ''.join(json.dumps(dict(r.to_json(), planned_id=planned_of.get(r.id, r.id)), sort_keys=True) + '\n'
                         for r in rejects).encode())
    write_atomic(FileSystems.join(self.output, 'stats.json'), json.dumps(stats, indent=2, sort_keys=True).encode())
    if not stats['balanced']:
      logging.error('accounting mismatch: %s', stats)
    yield stats
