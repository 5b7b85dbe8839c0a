"""Render a clip in one decode pass: cut, deinterlace, fps, crop, resize, encode.

The same pass hands every output frame (RGB, output size) to the per-frame
analyzers inside the DoFn (transforms/frame_analysis.py), so no stage decodes the
rendered clip again and no frame or per-frame result leaves the DoFn on its own.
"""
from __future__ import annotations

import collections
import contextlib
import io
import os
import shutil
import tempfile
import wave
from fractions import Fraction
from typing import Any, Deque, Iterator, List, Optional, Sequence, Tuple

import apache_beam as beam
import av
import cv2
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms.core.elements import ClipTask, Reject, RenderedClip
from transforms.core.fileio import delete_quietly, put_file
from transforms.crash_guard import CrashGuard, crash_guarded
from transforms.frame_analysis import Frame, FrameAnalyzer
from transforms.lib.geometry import follow_crop
from transforms.lib.prefetch import prefetch
from transforms.lib.probe import open_media

STAGE = 'render'
WAV_RATE = 16000
THUMBNAIL_PX = 256
_AGAIN = (av.error.BlockingIOError, BlockingIOError)
_END = (av.error.EOFError, EOFError)


_TURNS = {90: (('transpose', 'cclock'),), 180: (('hflip', None), ('vflip', None)), 270: (('transpose', 'clock'),)}


def picture_box(window, padding, size: int) -> Tuple[int, int, int, int]:
  """(x0, y0, x1, y1): the output pixels of a `size` square that hold the window's picture; the rest is the
  black padding (exact pixels: the padding is added after the scale)."""
  _, _, w, h = window
  left, top, right, bottom = padding
  side = max(w + left + right, h + top + bottom)
  scale = size / side
  out_w, out_h = max(1, round(w * scale)), max(1, round(h * scale))
  pad_x = min(size - out_w, round((left + (side - w - left - right) / 2) * scale))
  pad_y = min(size - out_h, round((top + (side - h - top - bottom) / 2) * scale))
  return pad_x, pad_y, pad_x + out_w, pad_y + out_h


class _Deinterlace:
  """buffer -> yadif -> buffersink: the one temporal filter, so it sees every decoded frame (the frame selection
  comes after it); without interlacing, frames pass through untouched."""

  def __init__(self, stream, interlaced: bool):
    self.graph = None
    if interlaced:
      self.graph = av.filter.Graph()
      chain = [self.graph.add_buffer(template=stream), self.graph.add('yadif', 'mode=send_frame:parity=auto:deint=all'),
               self.graph.add('buffersink')]
      for a, b in zip(chain, chain[1:]):
        a.link_to(b)
      self.graph.configure()

  def __call__(self, frame) -> Iterator:
    """The frames ready after `frame` (None: the end of the stream, flush)."""
    if self.graph is None:
      if frame is not None:
        yield frame
      return
    self.graph.push(frame)
    while True:
      try:
        yield self.graph.pull()
      except _AGAIN:
        return
      except _END:
        return


class _VideoFilter:
  """buffer -> [turn upright] -> crop -> scale -> rgb24 -> [pad], as one libavfilter graph, run only on the
  source frames the frame selection picked (bench/results.md "fps before crop/scale": the 30 -> 25 fps
  resampling drops one in six, which are never turned, scaled or converted).

  The window is in displayed pixels, so a phone video's display-matrix turn comes before the crop. The
  window plus its padding spans `size` output pixels with one scale for both axes, so nothing is stretched;
  the padding is black (an honest "no picture here" that the json records, where replicated edges would
  pass for image content), added after the scale in RGB, where it lands on exact pixels. Without padding the
  crop is `split`: a second scale makes x264's BT.601 limited-range yuv420p (what its own RGB -> YUV conversion
  made) from it, cheaper than converting the RGB back (bench/results.md "x264 fed yuv420p"; the RGB frames stay
  as they were: made from the one yuv420p scale, they would cost less again but move the landmarks slightly).
  """

  def __init__(self, stream, window, size: int, rotation: int = 0, follow: bool = False, padding=(0, 0, 0, 0)):
    x, y, w, h = window
    self.graph = av.filter.Graph()
    add = self.graph.add
    self.last = None  # (source frame, its result): a source frame picked for two ticks is filtered once
    self.yuv_sink = split = None
    chain = [self.graph.add_buffer(template=stream)] + [add(name, args) for name, args in _TURNS.get(rotation, ())]
    if follow:  # a window that follows the face is cut per frame (crop.follow_crop)
      chain.append(add('format', 'rgb24'))
    else:
      pad_x, pad_y, right, bottom = picture_box(window, padding, size)
      out_w, out_h = right - pad_x, bottom - pad_y
      chain.append(add('crop', f'{w}:{h}:{x}:{y}'))
      if (out_w, out_h) == (size, size):
        split, self.yuv_sink = add('split', '2'), add('buffersink')
        to_x264 = [split, add('scale', f'{size}:{size}:flags=area:out_color_matrix=bt601:out_range=tv'),
                   add('format', 'yuv420p'), self.yuv_sink]
        for a, b in zip(to_x264, to_x264[1:]):
          a.link_to(b)
        chain += [split, add('scale', f'{size}:{size}:flags=area'), add('format', 'rgb24')]
      else:
        chain += [add('scale', f'{out_w}:{out_h}:flags=area'), add('format', 'rgb24'),
                  add('pad', f'{size}:{size}:{pad_x}:{pad_y}:black')]
    self.rgb_sink = add('buffersink')
    chain.append(self.rgb_sink)
    for a, b in zip(chain, chain[1:]):
      a.link_to(b, 1 if a is split else 0)  # the split's first output went to x264's scale
    self.graph.configure()

  def __call__(self, frame) -> Tuple[np.ndarray, Optional[av.VideoFrame]]:
    """(RGB output frame, the same picture as yuv420p for x264 or None where x264 takes the RGB) of a source
    frame (every filter here makes one frame of one)."""
    if self.last is None or self.last[0] is not frame:
      self.graph.push(frame)
      yuv = self.yuv_sink.pull() if self.yuv_sink is not None else None
      self.last = (frame, (self.rgb_sink.pull().to_ndarray(), yuv))
    return self.last[1]


class _FrameSelector:
  """Resample a timestamped frame stream to a constant rate: nearest source frame per output tick (the frames
  are decoded source frames: only the picked ones are filtered)."""

  def __init__(self, start: float, count: int, fps: float, source_interval: float):
    self.start, self.count, self.fps = start, count, fps
    self.source_interval = source_interval
    self.index = 0
    self.previous: Optional[Tuple[float, Any]] = None

  def tick(self) -> float:
    return self.start + self.index / self.fps

  def push(self, ts: float, image) -> Iterator:
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

  def flush(self) -> Iterator:
    while self.previous is not None and self.index < self.count and \
        self.tick() - self.previous[0] <= 1.5 * self.source_interval:
      yield self.previous[1]
      self.index += 1


class _AudioCutter:
  """Cut decoded audio to [start, start + duration) and feed the AAC stream and the 16 kHz wav.

  Samples wait until the video has frames up to their time (`release`), so when the source runs out of
  video early the audio ends where the video does. The wait is bounded by how far the container
  interleaves audio ahead of video (about a second), not by the clip's length.
  """

  def __init__(self, out_stream, start: float, duration: float, rate: int, layout: str):
    self.stream = out_stream
    self.start = start
    self.rate = rate
    self.total = int(round(duration * rate))
    self.received = 0  # clip samples placed so far: written, or waiting in `pending`
    self.pending: Deque[np.ndarray] = collections.deque()
    self.written = 0
    self.to_aac = av.AudioResampler(format='fltp', layout=layout, rate=rate)
    self.to_wav = av.AudioResampler(format='s16', layout='mono', rate=WAV_RATE)
    self.wav = io.BytesIO()
    self.wav_samples = 0
    self.channels = 1 if layout == 'mono' else 2

  def push(self, frame) -> None:
    for converted in self.to_aac.resample(frame):
      if converted.pts is None or converted.time_base is None:
        continue
      first = int(round((float(converted.pts * converted.time_base) - self.start) * self.rate))
      data = converted.to_ndarray()
      if first > self.received:  # a gap: pad silence so audio stays aligned with video
        data = np.concatenate([np.zeros((data.shape[0], first - self.received), data.dtype), data], axis=1)
        first = self.received
      data = data[:, self.received - first:] if first < self.received else data
      data = data[:, :self.total - self.received]
      if data.shape[1]:
        self.pending.append(data)
        self.received += data.shape[1]

  def release(self, upto: int) -> list:
    """Encode the waiting samples before clip sample `upto` (as far as the video has got)."""
    ready = min(upto, self.received) - self.written
    if ready <= 0:
      return []
    taken = []
    while ready > 0:
      chunk = self.pending.popleft()
      if chunk.shape[1] > ready:
        self.pending.appendleft(chunk[:, ready:])
        chunk = chunk[:, :ready]
      taken.append(chunk)
      ready -= chunk.shape[1]
    return self._emit(np.concatenate(taken, axis=1) if len(taken) > 1 else taken[0])

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

  def finish(self, total: int) -> Tuple[list, bytes]:
    """Exactly `total` samples (the video's length) in both outputs: what waits beyond is dropped, a
    shortfall is silence."""
    packets = self.release(total)
    if self.written < total:
      packets += self._emit(np.zeros((self.channels, total - self.written), np.float32))
    for pcm in self.to_wav.resample(None):
      self._write_wav(pcm)
    packets += list(self.stream.encode(None))
    wanted = int(round(total * WAV_RATE / self.rate))
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
    deinterlace = _Deinterlace(vin, task.media.info.interlaced)
    video_filter = _VideoFilter(vin, task.window, size, task.media.info.rotation, follow=bool(task.path),
                                padding=task.padding)
    selector = _FrameSelector(t0, count, fps, 1.0 / source_fps)
    with av.open(mp4_path, 'w', format='mp4', options={'movflags': '+faststart'}) as out:
      vout = out.add_stream('libx264', rate=rate)
      vout.width = vout.height = size
      vout.pix_fmt = 'yuv420p'
      # a53cc off: source frames reach x264 with their side data now, and captions must not ride along
      vout.options = {'crf': str(crf), 'preset': preset, 'a53cc': '0'}
      cutter = None
      if ain is not None:
        layout = 'mono' if (ain.channels or 1) == 1 else 'stereo'
        aout = out.add_stream('aac', rate=ain.rate)
        aout.layout = layout
        cutter = _AudioCutter(aout, t0, count / fps, ain.rate, layout)
      streams = [vin] + ([ain] if ain is not None else [])
      video_done = audio_done = False
      produced = 0

      def encode(source):
        nonlocal produced
        image, frame = video_filter(source)
        if task.path:
          image = follow_crop(image, task.path, task.window[2], produced / fps, size)
        if frame is None:
          frame = av.VideoFrame.from_ndarray(image, format='rgb24')
        else:  # the source's frame type would force x264's (an I frame where the source had one)
          frame.pict_type = av.video.frame.PictureType.NONE
        frame.pts = produced
        frame.time_base = 1 / rate
        out.mux(vout.encode(frame))
        produced += 1
        if cutter is not None:
          out.mux(cutter.release(audio_upto()))
        return produced - 1, image

      def audio_upto() -> int:
        return int(round(produced / fps * cutter.rate))

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
            for source in deinterlace(frame):
              for picked in selector.push(source.time, source):
                yield encode(picked)
            if selector.index >= count or ts > t0 + duration + 1.0:
              video_done = True
        elif cutter is not None and not audio_done:
          for frame in packet.decode():
            if frame.time is not None and frame.time > t0 + duration + 0.5:
              audio_done = True
              break
            cutter.push(frame)
          out.mux(cutter.release(audio_upto()))
        if video_done and (cutter is None or audio_done):
          break
      if selector.index < count:
        for source in deinterlace(None):
          for picked in selector.push(source.time, source):
            yield encode(picked)
        for picked in selector.flush():
          yield encode(picked)
      out.mux(vout.encode(None))
      wav = silent_wav(produced / fps)
      if cutter is not None:
        packets, wav = cutter.finish(audio_upto())
        out.mux(packets)
  return produced, wav


class RenderClips(beam.DoFn):
  """ClipTask -> RenderedClip carrying the clip's per-frame arrays and a thumbnail; `Reject`s on tag `rejects`.

  One pass per clip: decode, crop, encode, and every output frame handed to each frame analyzer
  (transforms/frame_analysis.py) as it is produced, so the per-frame results are packed into the clip's
  arrays where the frames are and never travel on their own. The encoded mp4 goes to `work_dir/clips/`
  and travels as a URI. A clip whose frames a model failed on more than half the time is rejected as
  `model_error` (transient: a rerun tries again), not judged on the frames that came through.
  """

  def __init__(self, work_dir: str, size: int, fps: float, crf: int, preset: str, max_render_s: float = 0,
               analyzers: Sequence[FrameAnalyzer] = (), run_id: Optional[str] = None):
    self.work_dir = work_dir
    self.crash_guard = CrashGuard(work_dir, run_id)  # markers/<run_id>/<clip>: a retry after a crash rejects
    self.size, self.fps, self.crf, self.preset = size, fps, crf, preset
    self.max_render_s = max_render_s
    self.analyzers = tuple(analyzers)
    # Frames rendered ahead: room for two model batches, so rendering goes on while a batch is in the model
    # (with one batch of room the two took turns: 11.2 against 9.8 ms a frame, bench in the report).
    # Frames go to the analyzers in batches as large as the largest model batch; twice that is in flight.
    self.batch_size = max([1] + [analyzer.batch_size for analyzer in self.analyzers])
    self.prefetch_depth = max(16, 2 * self.batch_size)
    self.frames = Metrics.counter(STAGE, 'frames')
    self.clips = Metrics.counter(STAGE, 'clips')
    self.model_errors = Metrics.counter(STAGE, 'model_error_frames')

  def setup(self):
    for analyzer in self.analyzers:
      analyzer.setup()

  @crash_guarded(STAGE)
  def process(self, task: ClipTask):
    tmp = tempfile.mkdtemp(prefix='render-')
    try:
      yield from self._render(task, tmp)
    finally:
      shutil.rmtree(tmp, ignore_errors=True)

  def _reject(self, task: ClipTask, reason: str, detail: str):
    return beam.pvalue.TaggedOutput('rejects', Reject(task.clip_id, STAGE, reason, detail[:500], task.source_id,
                                                      planned_id=task.planned_id))

  @staticmethod
  def _analyse(passes, batch: List[Frame]) -> None:
    """Each analyzer in order on the batch: a later one reads what earlier ones put in `Frame.found`."""
    for analysis in passes:
      analysis.add(batch)

  def _render(self, task: ClipTask, tmp: str):
    passes = [analyzer.start(task, int(round((task.end - task.start) * self.fps)), self.size)
              for analyzer in self.analyzers]
    try:
      yield from self._render_with(task, tmp, passes)
    finally:
      for analysis in passes:  # drops what a pass that never finished (a reject, an error) kept locally
        analysis.abandon()

  def _render_with(self, task: ClipTask, tmp: str, passes):
    mp4 = os.path.join(tmp, task.clip_id + '.mp4')
    planned = int(round((task.end - task.start) * self.fps))
    still = None  # the middle output frame (or the last, if the clip ends early), for the thumbnail
    batch: List[Frame] = []
    with contextlib.closing(prefetch(render(task, mp4, self.size, self.fps, self.crf, self.preset,
                                            self.max_render_s), self.prefetch_depth)) as frames:
      while True:
        try:
          index, image = next(frames)
        except StopIteration as done:
          produced, wav = done.value
          break
        except (av.error.FFmpegError, OSError, ValueError, TimeoutError) as error:
          yield self._reject(task, 'render_timeout' if isinstance(error, TimeoutError) else 'decode_error',
                             str(error))
          return
        self.frames.inc()
        batch.append(Frame(index, image))
        if len(batch) >= self.batch_size:
          self._analyse(passes, batch)
          batch = []
        if index <= planned // 2:
          still = image
    if batch:
      self._analyse(passes, batch)
    if produced == 0:
      yield self._reject(task, 'no_frames', f'no video frames between {task.start:.3f}s and {task.end:.3f}s')
      return
    if produced < planned - max(2, planned // 10):  # the header promised frames the file does not hold
      yield self._reject(task, 'source_truncated', f'the source ran out after {produced} of {planned} frames '
                         f'(about {task.start + produced / self.fps:.3f}s of a clip ending at {task.end:.3f}s)')
      return
    arrays, files, model_errors = {}, {}, 0
    for analyzer, analysis in zip(self.analyzers, passes):
      analysis.hear(wav)
      found = analysis.finish(produced)
      self.model_errors.inc(found.model_errors)
      files.update(found.files)
      if 2 * found.model_errors > produced:
        delete_quietly(list(files.values()))
        yield self._reject(task, 'model_error', f'{analyzer.name} failed on {found.model_errors} of {produced} '
                           f'frames (last: {found.last_error})')
        return
      arrays.update(found.arrays)
      model_errors = max(model_errors, found.model_errors)
    uri = FileSystems.join(self.work_dir, 'clips', task.clip_id + '.mp4')
    put_file(mp4, uri, move=True)
    self.clips.inc()
    yield RenderedClip(task=task, mp4_uri=uri, wav=wav, num_frames=produced, fps=self.fps, size=self.size,
                       arrays=arrays, thumbnail=thumbnail_jpeg(still), model_errors=model_errors, files=files)


def thumbnail_jpeg(image: np.ndarray, side: int = THUMBNAIL_PX) -> bytes:
  """A small JPEG of an RGB output frame (report.html shows it; the frame itself is not kept)."""
  small = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)
  ok, data = cv2.imencode('.jpg', cv2.cvtColor(small, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 85])
  return data.tobytes() if ok else b''
