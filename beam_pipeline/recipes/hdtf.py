"""`hdtf`: HDTF-style clips, as WebDataset shards (mp4, wav, per-frame arrays, json) or in HDTF's own layout.

The spine as it is: the spine's tracker, the face landmarker only, and the shard writer; `--layout=files` puts
each clip in one folder as HDTF names it (`<video name>_<clip index>.mp4`), which is what LatentSync's
UNetDataset lists, with the rest of the sample beside it.
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile

import apache_beam as beam
import av
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from beam_pipeline.recipes.base import Recipe
from transforms.core.fileio import PARTIAL, delete_quietly, write_atomic
from transforms.deadletter import DeadLetter
from transforms.render import WAV_RATE
from transforms.writers.folders import (
    UnitFiles, existing, publish_unit, published_records, same_version, unpublish)
from transforms.writers.shards import STAGE, AssembleSample, encode_payload, sample_key, write_shards

FILES = 'clips'  # `--layout=files`: the one folder of clips (LatentSync's train_data_dir)


def with_wav_audio(mp4: bytes, wav: bytes) -> bytes:
  """The clip with its video stream copied and its audio re-encoded (AAC, 16 kHz mono) from its wav: what
  LatentSync's resample_fps_hz.py (`-ar 16000`) makes, from the same samples as the wav sidecar."""
  local = tempfile.mkdtemp(prefix='audio16k-')
  path = os.path.join(local, 'clip.mp4')
  try:
    with av.open(io.BytesIO(mp4)) as source:
      if not source.streams.audio:  # a silent clip (--allow_silent) stays silent
        return mp4
    with av.open(io.BytesIO(mp4)) as source, av.open(io.BytesIO(wav)) as pcm, \
        av.open(path, 'w', format='mp4', options={'movflags': '+faststart'}) as out:
      video_in = source.streams.video[0]
      video_out = out.add_stream_from_template(video_in)
      audio_out = out.add_stream('aac', rate=WAV_RATE, layout='mono')
      samples = pcm.decode(audio=0)
      audio_time = 0.0

      def audio_until(seconds):  # interleaved, so the muxer never queues a whole stream
        nonlocal audio_time
        while audio_time <= seconds:
          frame = next(samples, None)
          if frame is None:
            audio_time = float('inf')
            return
          audio_time = float(frame.pts + frame.samples) / WAV_RATE
          out.mux(audio_out.encode(frame))

      for packet in source.demux(video_in):
        if packet.dts is None:  # the demuxer's end-of-stream marker
          continue
        audio_until(float(packet.dts * packet.time_base))
        packet.stream = video_out
        out.mux(packet)
      audio_until(float('inf'))
      out.mux(audio_out.encode(None))
    with open(path, 'rb') as handle:
      return handle.read()
  finally:
    shutil.rmtree(local, ignore_errors=True)


class HdtfSample(AssembleSample):
  """The spine's sample; with `audio_16k` its mp4's audio is the clip's 16 kHz wav (LatentSync's rate)."""

  def __init__(self, work_dir: str, audio_16k: bool = False):
    super().__init__(work_dir)
    self.audio_16k = audio_16k

  def payload(self, analysis):
    meta, payload, consumed = super().payload(analysis)
    if self.audio_16k:
      payload['mp4'] = with_wav_audio(payload['mp4'], payload['wav'])
    return meta, payload, consumed


class WriteClipFiles(beam.DoFn):
  """Analysis -> its index record, once `clips/<key>.mp4` and its sidecars are published (`--layout=files`).

  Every member of the shard sample becomes a file named as the tar member (`<key>.json`, `<key>.wav`,
  `<key>.landmarks.npy`, ...), each written atomically (a scratch name, then a rename), the mp4 last, so a
  listed mp4 has its sidecars. Then `published/<key>.jsonl` (transforms/writers/folders.py), which makes the
  clip count for resume, index.jsonl and a retried or concurrent attempt; only then is the work-dir media
  deleted. Two attempts at once write the same bytes under their own scratch names. A clip published from
  other inputs (it changed since) is unpublished first, written over file by file, the members the old version
  had and this one does not are deleted, and it is published again (folders.py: nothing of the old version is
  deleted before the new one's files are all in place).
  """

  def __init__(self, output: str, work_dir: str, audio_16k: bool):
    self.output = output
    self.sample = HdtfSample(work_dir, audio_16k)
    self.written = Metrics.counter(STAGE, 'clip_files')
    self.republished = Metrics.counter(STAGE, 'clip_files_already_published')

  def published(self, analysis):
    """The clip's record when some attempt published it from the same inputs (DeadLetter: a concurrent
    attempt); a record of the clip as it was before its source, range, crop or settings changed is not it."""
    task = analysis.clip.task
    records = published_records(self.output, sample_key(task.clip_id))
    return records if same_version(records, [(task.clip_id, task.inputs)]) else None

  def process(self, analysis):
    task = analysis.clip.task
    key = sample_key(task.clip_id)
    earlier = published_records(self.output, key)
    if same_version(earlier, [(task.clip_id, task.inputs)]):  # a retry: its rendered clip went at the publish
      self.republished.inc()
      delete_quietly([analysis.clip.mp4_uri])
      yield from earlier
      return
    if earlier is not None:  # the clip changed since a run published it: made again over it
      unpublish(self.output, key, earlier)
    meta, payload, consumed = self.sample.payload(analysis)
    files = UnitFiles(FileSystems.join(self.output, FILES))
    for name in sorted(payload, key=lambda member: (member == 'mp4', member)):
      write_atomic(files.uri(f'{key}.{name}'), encode_payload(payload[name]))
    files.drop_others(clip_files(self.output, earlier or []))
    records = publish_unit(self.output, key, [dict(meta, file=f'{FILES}/{key}.mp4', members=sorted(payload))])
    delete_quietly(consumed)
    self.written.inc()
    yield from records


def clip_files(output: str, records) -> list:
  """The files of a published clip (`--layout=files`), its mp4 first: the file LatentSync lists. A record from
  before `members` was stored: every `<key>.*` but scratch files (a live attempt's may be among them)."""
  uris = []
  for record in records:
    key = record.get('folder') or sample_key(record['id'])
    if 'members' in record:
      names = sorted(record['members'], key=lambda member: member != 'mp4')
      uris += [FileSystems.join(output, FILES, f'{key}.{name}') for name in names]
    else:
      found = existing([FileSystems.join(output, FILES, key + '.*')])
      uris += sorted((uri for uri in found if not uri.endswith(PARTIAL)), key=lambda uri: not uri.endswith('.mp4'))
  return uris


class Hdtf(Recipe):
  name = 'hdtf'
  scratch_folders = Recipe.scratch_folders + (FILES,)  # `--layout=files` writes a clip's files via scratch copies

  def output_layout(self, opts) -> str:
    return opts.layout

  def unit_files(self, output: str, records) -> list:
    return clip_files(output, records)

  def write(self, kept, opts, work_dir: str):
    if opts.layout == 'files':
      written = kept | 'WriteClipFiles' >> beam.ParDo(DeadLetter(
          WriteClipFiles(opts.output, work_dir, opts.audio_16k), STAGE)).with_outputs('rejects', main='records')
      return {'records': written.records, 'rejects': written.rejects}
    return write_shards(kept, opts.output, work_dir, opts.shard_max_samples, opts.shard_max_mb, opts.shard_writers,
                        assemble=HdtfSample(work_dir, opts.audio_16k))


RECIPE = Hdtf()
