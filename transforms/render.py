"""Render a clip in one decode pass: cut, deinterlace, fps, crop, resize, encode.

The same pass yields every output frame (RGB, output size) for the per-frame
face analysis, so no stage ever decodes the rendered clip again.
"""
from __future__ import annotations

import io
import os
import shutil
import tempfile
import wave
from fractions import Fraction
from typing import Iterator, Optional, Tuple

import apache_beam as beam
import av
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from beam_pipeline.elements import ClipTask, Reject, RenderedClip
from transforms.crop import follow_crop
from transforms.fileio import put_file
from transforms.prefetch import prefetch
from transforms.probe import open_media

STAGE = 'render'
WAV_RATE = 16000
_AGAIN = (av.error.BlockingIOError, BlockingIOError)
_END = (av.error.EOFError, EOFError)


_TURNS = {90: (('transpose', 'cclock'),), 180: (('hflip', None), ('vflip', None)), 270: (('transpose', 'clock'),)}


class _VideoFilter:
  """buffer -> [yadif] -> [turn upright] -> crop -> scale -> rgb24, as one libavfilter graph.

  The window is in displayed pixels, so a phone video's display-matrix turn comes before the crop.
  """

  def __init__(self, stream, window, size: int, deinterlace: bool, rotation: int = 0, follow: bool = False):
    x, y, w, h = window
    self.graph = av.filter.Graph()
    chain = [self.graph.add_buffer(template=stream)]
    if deinterlace:
      chain.append(self.graph.add('yadif', 'mode=send_frame:parity=auto:deint=all'))
    chain += [self.graph.add(name, args) for name, args in _TURNS.get(rotation, ())]
    if not follow:  # a window that follows the face is cut per frame (crop.follow_crop)
      chain += [self.graph.add('crop', f'{w}:{h}:{x}:{y}'), self.graph.add('scale', f'{size}:{size}:flags=area')]
    chain += [self.graph.add('format', 'rgb24'),
              self.graph.add('buffersink')]
    for a, b in zip(chain, chain[1:]):
      a.link_to(b)
    self.graph.configure()

  def __call__(self, frame) -> Iterator:
    self.graph.push(frame)
    while True:
      try:
        yield self.graph.pull()
      except _AGAIN:
        return
      except _END:
        return


class _FrameSelector:
  """Resample a timestamped frame stream to a constant rate: nearest source frame per output tick."""

  def __init__(self, start: float, count: int, fps: float, source_interval: float):
    self.start, self.count, self.fps = start, count, fps
    self.source_interval = source_interval
    self.index = 0
    self.previous: Optional[Tuple[float, np.ndarray]] = None

  def tick(self) -> float:
    return self.start + self.index / self.fps

  def push(self, ts: float, image: np.ndarray) -> Iterator[np.ndarray]:
    while self.index < self.count and self.tick() <= ts:
      target = self.tick()
      if self.previous is not None and abs(target - self.previous[0]) <= abs(ts - target):
        yield self.previous[1]
      elif ts - target <= self.source_interval:
        yield image
      else:
        return  # a gap in the source: a later frame cannot stand in for this tick
      self.index += 1
    self.previous = (ts, image)

  def flush(self) -> Iterator[np.ndarray]:
    while self.previous is not None and self.index < self.count and \
        self.tick() - self.previous[0] <= 1.5 * self.source_interval:
      yield self.previous[1]
      self.index += 1


class _AudioCutter:
  """Cut decoded audio to [start, start + duration) and feed the AAC stream and the 16 kHz wav."""

  def __init__(self, out_stream, start: float, duration: float, rate: int, layout: str):
    self.stream = out_stream
    self.start = start
    self.rate = rate
    self.total = int(round(duration * rate))
    self.written = 0
    self.to_aac = av.AudioResampler(format='fltp', layout=layout, rate=rate)
    self.to_wav = av.AudioResampler(format='s16', layout='mono', rate=WAV_RATE)
    self.wav = io.BytesIO()
    self.wav_samples = 0
    self.channels = 1 if layout == 'mono' else 2

  def push(self, frame) -> list:
    packets = []
    for converted in self.to_aac.resample(frame):
      if converted.pts is None or converted.time_base is None:
        continue
      first = int(round((float(converted.pts * converted.time_base) - self.start) * self.rate))
      data = converted.to_ndarray()
      if first > self.written:  # a gap: pad silence so audio stays aligned with video
        data = np.concatenate([np.zeros((data.shape[0], first - self.written), data.dtype), data], axis=1)
        first = self.written
      data = data[:, self.written - first:] if first < self.written else data
      data = data[:, :self.total - self.written]
      if data.shape[1]:
        packets += self._emit(data)
    return packets

  def _emit(self, data: np.ndarray) -> list:
    frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(data, np.float32), format='fltp',
                                       layout='mono' if self.channels == 1 else 'stereo')
    frame.sample_rate = self.rate
    frame.pts = self.written
    frame.time_base = Fraction(1, self.rate)
    self.written += data.shape[1]
    for pcm in self.to_wav.resample(frame):
      self._write_wav(pcm)
    return list(self.stream.encode(frame))

  def _write_wav(self, pcm) -> None:
    samples = pcm.to_ndarray().reshape(-1)
    self.wav.write(samples.astype('<i2').tobytes())
    self.wav_samples += samples.size

  def finish(self) -> Tuple[list, bytes]:
    packets = []
    if self.written < self.total:
      packets += self._emit(np.zeros((self.channels, self.total - self.written), np.float32))
    for pcm in self.to_wav.resample(None):
      self._write_wav(pcm)
    packets += list(self.stream.encode(None))
    wanted = int(round(self.total * WAV_RATE / self.rate))
    pcm = self.wav.getvalue()[:wanted * 2].ljust(wanted * 2, b'\0')
    out = io.BytesIO()
    with wave.open(out, 'wb') as handle:
      handle.setnchannels(1)
      handle.setsampwidth(2)
      handle.setframerate(WAV_RATE)
      handle.writeframes(pcm)
    return packets, out.getvalue()


def silent_wav(duration: float) -> bytes:
  out = io.BytesIO()
  with wave.open(out, 'wb') as handle:
    handle.setnchannels(1)
    handle.setsampwidth(2)
    handle.setframerate(WAV_RATE)
    handle.writeframes(b'\0\0' * int(round(duration * WAV_RATE)))
  return out.getvalue()


def render(task: ClipTask, mp4_path: str, size: int, fps: float, crf: int, preset: str,
           max_seconds: float = 0) -> Iterator:
  """Yield (frame_index, rgb frame) for each output frame; return (num_frames, wav bytes) at the end."""
  import time
  deadline = time.monotonic() + max_seconds if max_seconds else None
  rate = Fraction(fps).limit_denominator(1001)
  with open_media(task.media.uri) as container:
    vin = container.streams.video[0]
    vin.thread_type = 'AUTO'
    ain = container.streams.audio[0] if container.streams.audio else None
    t0 = task.media_start + task.media.info.start_time
    duration = task.end - task.start
    count = int(round(duration * fps))
    container.seek(max(0, int((t0 - 0.5) * av.time_base)), backward=True, any_frame=False)
    source_fps = task.media.info.fps or fps
    video_filter = _VideoFilter(vin, task.window, size, task.media.info.interlaced,
                                 task.media.info.rotation, follow=bool(task.path))
    selector = _FrameSelector(t0, count, fps, 1.0 / source_fps)
    with av.open(mp4_path, 'w', format='mp4', options={'movflags': '+faststart'}) as out:
      vout = out.add_stream('libx264', rate=rate)
      vout.width = vout.height = size
      vout.pix_fmt = 'yuv420p'
      vout.options = {'crf': str(crf), 'preset': preset}
      cutter = None
      if ain is not None:
        layout = 'mono' if (ain.channels or 1) == 1 else 'stereo'
        aout = out.add_stream('aac', rate=ain.rate)
        aout.layout = layout
        cutter = _AudioCutter(aout, t0, count / fps, ain.rate, layout)
      streams = [vin] + ([ain] if ain is not None else [])
      video_done = audio_done = False
      produced = 0

      def encode(image):
        nonlocal produced
        if task.path:
          image = follow_crop(image, task.path, task.window[2], produced / fps, size)
        frame = av.VideoFrame.from_ndarray(image, format='rgb24')
        frame.pts = produced
        frame.time_base = 1 / rate
        out.mux(vout.encode(frame))
        produced += 1
        return produced - 1, image

      for packet in container.demux(*streams):
        if deadline and time.monotonic() > deadline:
          raise TimeoutError(f'rendering took longer than {max_seconds}s')
        if packet.stream.type == 'video':
          if video_done:
            continue
          for frame in packet.decode():
            ts = frame.time
            if ts is None or ts < t0 - 2.0 / source_fps:
              continue
            for filtered in video_filter(frame):
              for image in selector.push(filtered.time, filtered.to_ndarray()):
                yield encode(image)
            if selector.index >= count or ts > t0 + duration + 1.0:
              video_done = True
        elif cutter is not None and not audio_done:
          for frame in packet.decode():
            if frame.time is not None and frame.time > t0 + duration + 0.5:
              audio_done = True
              break
            for out_packet in cutter.push(frame):
              out.mux(out_packet)
        if video_done and (cutter is None or audio_done):
          break
      if selector.index < count:
        for filtered in video_filter(None):
          for image in selector.push(filtered.time, filtered.to_ndarray()):
            yield encode(image)
        for image in selector.flush():
          yield encode(image)
      out.mux(vout.encode(None))
      wav = silent_wav(produced / fps)
      if cutter is not None:
        cutter.total = int(round(produced / fps * cutter.rate))
        packets, wav = cutter.finish()
        for out_packet in packets:
          out.mux(out_packet)
  return produced, wav


class RenderClips(beam.DoFn):
  """ClipTask -> ((clip_id, frame_index), frame) per output frame; RenderedClip on tag `rendered`.

  The encoded files go to `work_dir/clips/` and travel as URIs; rejects go to tag `rejects`.
  """

  def __init__(self, work_dir: str, size: int, fps: float, crf: int, preset: str, max_render_s: float = 0):
    self.work_dir = work_dir
    self.size, self.fps, self.crf, self.preset = size, fps, crf, preset
    self.max_render_s = max_render_s
    self.frames = Metrics.counter(STAGE, 'frames')
    self.clips = Metrics.counter(STAGE, 'clips')

  def process(self, task: ClipTask):
    tmp = tempfile.mkdtemp(prefix='render-')
    try:
      yield from self._render(task, tmp)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)

  def _render(self, task: ClipTask, tmp: str):
    mp4 = os.path.join(tmp, task.clip_id + '.mp4')
    try:
      frames = prefetch(render(task, mp4, self.size, self.fps, self.crf, self.preset, self.max_render_s))
      try:
        while True:
          index, image = next(frames)
          self.frames.inc()
          yield (task.clip_id, index), image
      except StopIteration as done:
        produced, wav = done.value
    except (av.error.FFmpegError, OSError, ValueError, TimeoutError) as error:
      reason = 'render_timeout' if isinstance(error, TimeoutError) else 'decode_error'
      yield beam.pvalue.TaggedOutput('rejects', Reject(task.clip_id, STAGE, reason, str(error)[:500],
                                                       task.source_id))
      return
    if produced == 0:
      yield beam.pvalue.TaggedOutput('rejects', Reject(
          task.clip_id, STAGE, 'no_frames', f'no video frames between {task.start:.3f}s and {task.end:.3f}s',
          task.source_id))
      return
    planned = int(round((task.end - task.start) * self.fps))
    if produced < planned - max(2, planned // 10):  # the header promised frames the file does not hold
      yield beam.pvalue.TaggedOutput('rejects', Reject(
          task.clip_id, STAGE, 'source_truncated', f'the source ran out after {produced} of {planned} frames '
          f'(about {task.start + produced / self.fps:.3f}s of a clip ending at {task.end:.3f}s)', task.source_id))
      return
    uri = FileSystems.join(self.work_dir, 'clips', task.clip_id + '.mp4')
    put_file(mp4, uri, move=True)
    self.clips.inc()
    yield beam.pvalue.TaggedOutput('rendered', (task.clip_id, RenderedClip(
        task=task, mp4_uri=uri, wav=wav, num_frames=produced, fps=self.fps, size=self.size)))
