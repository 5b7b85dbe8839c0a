"""WebDataset shards that a retried or duplicated bundle can neither duplicate nor lose a sample of.

The run's index, rejects and stats are transforms/writers/summary.py.

    Analysis -> AssembleSample -> SampleRef -> BatchSamples -> ShardBatch -> PublishShard -> index record

- AssembleSample packs each sample's tar members into one fragment file in the work dir, named by its key:
  a retried bundle writes the same file again.
- BatchSamples (a stateful DoFn per writer key) fixes which samples a shard holds, bounded by count and
  bytes. Its output is checkpointed by the runner, so everything after it sees the same batches on a retry,
  and shard sizes no longer follow bundle boundaries.
- PublishShard names the shard from its sample keys and writes `shards/<name>.jsonl`, then
  `shards/<name>.tar` (the shard counts once its tar exists). A retry rewrites the same name or, finding the
  shard published, only re-emits its records. Fragments and rendered clips are deleted only after that.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import tempfile
import time
import zlib
from typing import Dict, List, Optional, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.coders import VarIntCoder
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms.userstate import BagStateSpec, CombiningValueStateSpec, TimerSpec, on_timer
from apache_beam.transforms.timeutil import TimeDomain
from apache_beam.transforms.window import GlobalWindow

from model_handlers.mediapipe_face import BLENDSHAPE_NAMES
from transforms.core.elements import SampleRef, ShardBatch
from transforms.core.fileio import PARTIAL, delete_quietly, iter_jsonl, put_file, read_bytes, write_atomic
from transforms.deadletter import DeadLetter

STAGE = 'write'
SHARDS = 'shards'
FRAGMENTS = 'samples'  # in the work dir
KEY_LIMIT = 96
_KEY_UNSAFE = re.compile(r'[^A-Za-z0-9_-]')
_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE


# ----------------------------------------------------------------------------- output state

def _matches(pattern: str) -> List:
  try:
    return FileSystems.match([pattern])[0].metadata_list
  except Exception:  # pylint: disable=broad-except  # no shards folder yet
    return []


def _shard_files(output: str, pattern: str) -> List[str]:
  return sorted(m.path for m in _matches(FileSystems.join(output, SHARDS, pattern)))


def finished_shard_indexes(output: str) -> List[str]:
  """Index files of shards whose tar exists."""
  tars = set(_shard_files(output, '*.tar'))
  return [path for path in _shard_files(output, '*.jsonl') if path[:-len('.jsonl')] + '.tar' in tars]


def clean_unfinished(output: str, older_than_s: float) -> int:
  """Remove temporary files, index files whose shard never finished and the pieces of rejects.jsonl a killed
  job left in `beam-temp-*` (Beam's text sink removes its folder when its job finishes), when older than
  `older_than_s`. A job writing to the same output right now has only fresh ones, so its work in flight is left
  alone (a local folder left empty goes at the end of the run: fileio.remove_empty_dirs). Returns how many were
  removed.
  """
  now = time.time()
  entries = _matches(FileSystems.join(output, SHARDS, '*'))
  tars = {m.path for m in entries if m.path.endswith('.tar')}
  stale = [m.path for m in entries
           if (m.path.endswith(PARTIAL) or (m.path.endswith('.jsonl') and m.path[:-len('.jsonl')] + '.tar' not in tars))
           and now - (m.last_updated_in_seconds or now) > older_than_s]
  stale += [m.path for m in _matches(FileSystems.join(output, 'beam-temp-*', '*'))
            if now - (m.last_updated_in_seconds or now) > older_than_s]
  delete_quietly(stale)
  return len(stale)


# ----------------------------------------------------------------------------- keys and tar members

def sample_key(clip_id: str) -> str:
  """The sample's WebDataset key: no dots (webdataset splits a member name at the first one), no more than
  KEY_LIMIT characters. An id that is not already such a key gets a digest suffix, so keys stay distinct;
  the full id is in the sample's json."""
  key = _KEY_UNSAFE.sub('_', clip_id)
  if key == clip_id and len(key) <= KEY_LIMIT:
    return key
  digest = hashlib.sha1(clip_id.encode('utf-8', 'surrogatepass')).hexdigest()[:12]
  return f'{key[:KEY_LIMIT - len(digest) - 1]}-{digest}'


def encode_payload(value) -> bytes:
  if isinstance(value, (bytes, bytearray)):
    return bytes(value)
  if isinstance(value, np.ndarray):
    buffer = io.BytesIO()
    np.save(buffer, value, allow_pickle=False)
    return buffer.getvalue()
  return json.dumps(value, sort_keys=True).encode()


def tar_members(key: str, payload: Dict[str, object]) -> bytes:
  """`key.name` members in POSIX pax format (any name length), without the end-of-archive blocks, so
  fragments concatenate into one tar. mtime 0 keeps the bytes the same when a retry writes them again."""
  out = io.BytesIO()
  for name, value in sorted(payload.items()):
    data = encode_payload(value)
    member = tarfile.TarInfo(f'{key}.{name}')
    member.size, member.mtime, member.mode = len(data), 0, 0o444
    out.write(member.tobuf(tarfile.PAX_FORMAT, 'utf-8', 'surrogateescape'))
    out.write(data)
    out.write(b'\0' * (-len(data) % _BLOCK))
  return out.getvalue()


# ----------------------------------------------------------------------------- samples

def sample_json(analysis) -> dict:
  clip, task = analysis.clip, analysis.clip.task
  info = task.media.info
  return {
      'id': task.clip_id, 'key': sample_key(task.clip_id), 'planned_id': task.planned, 'source_id': task.source_id,
      'url': task.url, 'start': round(task.start, 4), 'end': round(task.end, 4),
      'duration': round(clip.num_frames / clip.fps, 4), 'fps': clip.fps, 'num_frames': clip.num_frames,
      'size': [clip.size, clip.size],
      'source': {'width': info.width, 'height': info.height, 'fps': round(info.fps, 4),
                 'codec': info.video_codec, 'interlaced': info.interlaced, 'audio_rate': info.audio_rate},
      'crop': {'mode': task.crop_mode, 'window': list(task.window), 'padding': list(task.padding),
               'ratio': task.crop_ratio, 'follow': [list(p) for p in task.path]},
      'face': {**analysis.face, **{k: round(v, 4) for k, v in task.face_stats}},
      'scores': analysis.scores,
      'failed': [code for code, *_ in analysis.failed],
      'blendshape_names': list(BLENDSHAPE_NAMES),
      'notes': list(task.notes),
      'inputs': task.inputs,
      **({'language': task.language} if task.language else {}),
      # --split_at_sync_breaks: resume skips the clip it was cut from once all its in-sync pieces are written
      **({'cut_from': task.cut_from, 'cut_pieces': task.cut_pieces} if task.cut_from else {}),
  }


class AssembleSample(beam.DoFn):
  """filters.Analysis -> SampleRef: the mp4, wav, per-frame arrays and a json with every score, packed as
  tar members into `work_dir/samples/<key>.tar`. The rendered mp4 stays until its shard is published."""

  def __init__(self, work_dir: str):
    self.work_dir = work_dir
    self.assembled = Metrics.counter(STAGE, 'samples_assembled')

  def extra_members(self, analysis, meta: dict) -> Tuple[Dict[str, object], Tuple[str, ...]]:
    """A recipe's hook: members it adds to the sample (it may add fields to `meta`, the json and index
    record), and the work-dir files they came from (deleted once the shard is published). None here."""
    return {}, ()

  def payload(self, analysis) -> Tuple[dict, Dict[str, object], Tuple[str, ...]]:
    """(json, member name -> value, work-dir files the members came from): what a sample holds, whatever
    packs it (a tar fragment here; one file per member in hdtf's `--layout=files`)."""
    clip, arrays = analysis.clip, analysis.arrays
    meta = sample_json(analysis)
    extra, consumed = self.extra_members(analysis, meta)
    payload = {
        'mp4': read_bytes(clip.mp4_uri), 'wav': clip.wav, 'json': meta,
        'landmarks.npy': arrays['landmarks'], 'bbox.npy': arrays['bbox'], 'pose.npy': arrays['pose'],
        'blendshapes.npy': arrays['blendshapes'], 'iris.npy': arrays['iris'], 'lmk68.npy': arrays['lmk68'],
        # SyncNet's per-window confidence at each window's middle frame (cut a long clip where it drops)
        **({'sync_conf.npy': arrays['sync_frame_conf']} if 'sync_frame_conf' in arrays else {}),
        **extra,
    }
    return meta, payload, (clip.mp4_uri,) + tuple(consumed)

  def process(self, analysis):
    meta, payload, consumed = self.payload(analysis)
    data = tar_members(meta['key'], payload)
    uri = FileSystems.join(self.work_dir, FRAGMENTS, meta['key'] + '.tar')
    write_atomic(uri, data)
    ref = SampleRef(meta['key'], meta['id'], analysis.clip.task.source_id, uri, len(data), meta, consumed)
    # Written after the fragment: a rerun after a kill packs the fragment instead of making the clip again.
    write_atomic(ref_uri(uri), json.dumps(dataclasses.asdict(ref), sort_keys=True).encode())
    self.assembled.inc()
    yield ref


def ref_uri(fragment_uri: str) -> str:
  return fragment_uri[:-len('.tar')] + '.ref.json'


def read_fragment_ref(uri: str) -> Optional[SampleRef]:
  """The SampleRef a `.ref.json` describes, when its fragment is still there (else None)."""
  try:
    fields = json.loads(read_bytes(uri))
  except (OSError, ValueError):
    return None
  ref = SampleRef(**dict(fields, consumed=tuple(fields.get('consumed', ()))))
  return ref if FileSystems.exists(ref.fragment_uri) else None


class ReadFragments(beam.PTransform):
  """The SampleRefs of fragments in `work_dir` that no shard has published yet (an interrupted run's)."""

  def __init__(self, work_dir: str):
    super().__init__()
    self.work_dir = work_dir

  def expand(self, pbegin):
    return (pbegin
            | 'WorkDir' >> beam.Create([FileSystems.join(self.work_dir, FRAGMENTS, '*.ref.json')])
            | 'RefFiles' >> beam.FlatMap(lambda pattern: [m.path for m in _matches(pattern)])
            | 'SpreadRefFiles' >> beam.Reshuffle()
            | 'ReadRefs' >> beam.FlatMap(lambda uri: [ref for ref in [read_fragment_ref(uri)] if ref]))


class DropLeftover(beam.DoFn):
  """SampleRef of a work-dir fragment no run will pack (its clip changed, left the input with --prune, or its
  sample is published) -> its files deleted: the ref, the fragment, the rendered media. Runs once every writer
  of the run is done (the side input); the ref is read again first, and a fragment this run made again under
  the same key (its clip re-made) is left alone. Run twice, the second finds nothing."""

  def __init__(self):
    self.dropped = Metrics.counter(STAGE, 'fragments_dropped')

  def process(self, ref: SampleRef, unused_writers_done=None):
    now = read_fragment_ref(ref_uri(ref.fragment_uri))
    if now is None or now.record.get('inputs', '') != ref.record.get('inputs', ''):
      return
    delete_quietly([ref_uri(ref.fragment_uri), ref.fragment_uri, *ref.consumed])
    self.dropped.inc()
    yield ref.id


class _Total(beam.CombineFn):
  """An int sum whose accumulator is the int itself (state cells store it with VarIntCoder)."""

  def create_accumulator(self):
    return 0

  def add_input(self, total, value):
    return total + value

  def merge_accumulators(self, totals):
    return sum(totals)

  def extract_output(self, total):
    return total


class BatchSamples(beam.DoFn):
  """(writer key, SampleRef) -> ShardBatch of at most `max_samples` samples and about `max_bytes`.

  State per writer key; the rest is flushed when the input ends (the global window's end timer). The
  runner commits these batches before the next stage, which is what makes shard contents stable.
  """
  REFS = BagStateSpec('refs', beam.coders.PickleCoder())
  COUNT = CombiningValueStateSpec('count', VarIntCoder(), _Total())
  BYTES = CombiningValueStateSpec('bytes', VarIntCoder(), _Total())
  END = TimerSpec('end', TimeDomain.WATERMARK)

  def __init__(self, max_samples: int, max_bytes: int):
    self.max_samples = max_samples
    self.max_bytes = max_bytes

  def process(self, keyed, refs=beam.DoFn.StateParam(REFS), count=beam.DoFn.StateParam(COUNT),
              size=beam.DoFn.StateParam(BYTES), end=beam.DoFn.TimerParam(END)):
    _, ref = keyed
    end.set(GlobalWindow().max_timestamp())
    refs.add(ref)
    count.add(1)
    size.add(ref.size)
    if count.read() >= self.max_samples or size.read() >= self.max_bytes:
      yield from self._flush(refs, count, size)

  @on_timer(END)
  def at_end(self, refs=beam.DoFn.StateParam(REFS), count=beam.DoFn.StateParam(COUNT),
             size=beam.DoFn.StateParam(BYTES)):
    yield from self._flush(refs, count, size)

  @staticmethod
  def _flush(refs, count, size):
    batch = tuple(sorted(refs.read(), key=lambda ref: ref.key))
    refs.clear()
    count.clear()
    size.clear()
    if batch:
      yield ShardBatch(batch)


def shard_name(batch: ShardBatch) -> str:
  """Named from the keys it holds: a retried publish of the same batch writes the same shard."""
  digest = hashlib.sha1('\n'.join(ref.key + ref.record.get('inputs', '') for ref in batch.refs).encode()).hexdigest()
  return f'shard-{digest[:20]}'


class PublishShard(beam.DoFn):
  """ShardBatch -> its index records (with `shard`), after `shards/<name>.jsonl` and `.tar` are published."""

  def __init__(self, output: str):
    self.output = output
    self.shards = Metrics.counter(STAGE, 'shards')
    self.samples = Metrics.counter(STAGE, 'samples')
    self.republished = Metrics.counter(STAGE, 'shards_already_published')

  def published(self, batch: ShardBatch) -> Optional[List[dict]]:
    """The batch's records when its shard is published (by this attempt's twin), else None (DeadLetter)."""
    base = FileSystems.join(self.output, SHARDS, shard_name(batch))
    if FileSystems.exists(base + '.tar') and FileSystems.exists(base + '.jsonl'):
      return list(iter_jsonl(base + '.jsonl'))
    return None

  def process(self, batch: ShardBatch):
    name = shard_name(batch)
    base = FileSystems.join(self.output, SHARDS, name)
    records = [dict(ref.record, shard=f'{SHARDS}/{name}.tar') for ref in batch.refs]
    if FileSystems.exists(base + '.tar') and FileSystems.exists(base + '.jsonl'):
      self.republished.inc()  # a retry after the publish: the fragments may be gone already
    else:
      self._publish(batch, base, records)
    delete_quietly([uri for ref in batch.refs for uri in (ref_uri(ref.fragment_uri), ref.fragment_uri) + ref.consumed])
    self.samples.inc(len(records))
    yield from records

  def _publish(self, batch: ShardBatch, base: str, records: List[dict]) -> None:
    local = tempfile.mkdtemp(prefix='shard-')
    try:
      path = os.path.join(local, 'shard.tar')
      with open(path, 'wb') as out:
        for ref in batch.refs:
          with FileSystems.open(ref.fragment_uri, mime_type='application/octet-stream',
                                compression_type='uncompressed') as fragment:
            shutil.copyfileobj(fragment, out, 1 << 20)
        end = out.tell() + 2 * _BLOCK
        out.write(b'\0' * (2 * _BLOCK + (-end % _RECORD)))
      write_atomic(base + '.jsonl', ''.join(json.dumps(r, sort_keys=True) + '\n' for r in records).encode())
      put_file(path, base + '.tar', move=True)
      self.shards.inc()
    finally:
      shutil.rmtree(local, ignore_errors=True)


class _FirstRef(beam.CombineFn):
  """One SampleRef per sample key: a sample that reached the writer twice (a duplicated bundle upstream)
  is packed once. The refs of one key are the same sample, so which one is kept does not matter."""

  def create_accumulator(self):
    return None

  def add_input(self, kept, ref):
    return kept if kept is not None and kept.fragment_uri <= ref.fragment_uri else ref

  def merge_accumulators(self, kept):
    present = [ref for ref in kept if ref is not None]
    return min(present, key=lambda ref: ref.fragment_uri) if present else None

  def extract_output(self, kept):
    return kept


class WriteShards(beam.PTransform):
  """SampleRefs -> published index records: one ref per sample key, batched under `writers` keys, the
  batches spread over workers and published."""

  def __init__(self, output: str, max_samples: int, max_mb: float, writers: int):
    super().__init__()
    self.output = output
    self.max_samples = max_samples
    self.max_bytes = int(max_mb * 1024 * 1024)
    self.writers = max(1, writers)

  def expand(self, refs):
    writers = self.writers
    published = (refs
                 | 'BySampleKey' >> beam.Map(lambda ref: (ref.key, ref))
                 | 'OneRefPerKey' >> beam.CombinePerKey(_FirstRef())
                 | 'ByWriter' >> beam.Map(lambda keyed: (zlib.crc32(keyed[0].encode()) % writers, keyed[1]))
                 .with_output_types(Tuple[int, SampleRef])
                 | 'BatchSamples' >> beam.ParDo(BatchSamples(self.max_samples, self.max_bytes))
                 | 'SpreadShards' >> beam.Reshuffle()
                 | 'PublishShard' >> beam.ParDo(DeadLetter(PublishShard(self.output), STAGE))
                 .with_outputs('rejects', main='records'))
    return {'records': published.records, 'rejects': published.rejects}

def write_shards(kept, output: str, work_dir: str, max_samples: int, max_mb: float, writers: int,
                 assemble: AssembleSample = None):
  """Analysis -> tar fragments -> published shards; the writer every shard recipe builds on."""
  samples = (kept | 'AssembleSample' >> beam.ParDo(DeadLetter(assemble or AssembleSample(work_dir), 'assemble'))
             .with_outputs('rejects', main='refs'))
  written = samples.refs | 'WriteShards' >> WriteShards(output, max_samples, max_mb, writers)
  rejects = (samples.rejects, written['rejects']) | 'WriterRejects' >> beam.Flatten()
  return {'records': written['records'], 'rejects': rejects}


# ----------------------------------------------------------------------------- retiring samples

def _without_keys(tar_path: str, keys: set, out_path: str) -> int:
  """Copy the tar at `tar_path` to `out_path` byte for byte, less the members of `keys`; returns how many
  members went."""
  dropped = 0
  with tarfile.open(tar_path, 'r:') as archive, open(tar_path, 'rb') as raw, open(out_path, 'wb') as out:
    for member in archive:
      if member.name.split('.', 1)[0] in keys:
        dropped += 1
        continue
      raw.seek(member.offset)
      out.write(raw.read(member.offset_data + member.size + (-member.size % _BLOCK) - member.offset))
    end = out.tell() + 2 * _BLOCK
    out.write(b'\0' * (2 * _BLOCK + (-end % _RECORD)))
  return dropped


class RetireFromShards(beam.DoFn):
  """(shard path relative to the output, [earlier records (id, planned id, frames, inputs, shard, key, cut,
  unit)]) -> those records, once their samples are no longer in the output.

  The shard is rewritten in place without those samples: the tar first (one atomic replace), then its index.
  A crash between the two leaves index lines whose samples are gone, which the next run retires again; a
  bundle run twice rewrites the same bytes. A shard left with no sample is removed (tar, then index).
  """

  def __init__(self, output: str):
    self.output = output
    self.retired = Metrics.counter(STAGE, 'samples_retired')

  def process(self, keyed):
    shard, records = keyed
    keys = {record[5] for record in records}
    base = FileSystems.join(self.output, shard[:-len('.tar')])
    kept = [record for record in iter_jsonl(base + '.jsonl') if record.get('key') not in keys]
    if not kept:
      delete_quietly([base + '.tar'])
      delete_quietly([base + '.jsonl'])
    elif FileSystems.exists(base + '.tar'):
      local = tempfile.mkdtemp(prefix='retire-')
      try:
        source, trimmed = os.path.join(local, 'in.tar'), os.path.join(local, 'out.tar')
        with FileSystems.open(base + '.tar', mime_type='application/octet-stream',
                              compression_type='uncompressed') as handle, open(source, 'wb') as out:
          shutil.copyfileobj(handle, out, 1 << 20)
        if _without_keys(source, keys, trimmed):
          put_file(trimmed, base + '.tar', move=True)
        write_atomic(base + '.jsonl', ''.join(json.dumps(r, sort_keys=True) + '\n' for r in kept).encode())
      finally:
        shutil.rmtree(local, ignore_errors=True)
    self.retired.inc(len(records))
    yield from records


class RetireSamples(beam.PTransform):
  """Earlier records (id, planned id, frames, inputs, shard, key, cut, unit) to retire -> those retired (shard
  samples; folder units: transforms/writers/folders.RetireUnits)."""

  def __init__(self, output: str):
    super().__init__()
    self.output = output

  def expand(self, stale):
    return (stale
            | 'InShards' >> beam.Filter(lambda record: bool(record[4]))
            | 'ByShard' >> beam.Map(lambda record: (record[4], record))
            | 'GroupByShard' >> beam.GroupByKey()
            | 'Retire' >> beam.ParDo(RetireFromShards(self.output)))
