"""Speech presence (Silero VAD, --vad): the share of a clip's frames with speech, and trimming to the speech.

`SpeechActivity` joins the render pass and hears the clip's 16 kHz wav once it is rendered: it packs a (T,)
speech probability per output frame (`speech`), from which ScoreAndFilter takes `speech_ratio` and rejects
music or silence under a talking face (`no_speech`). `TrimToSpeech` (--trim_silence) runs before the render
on the clip's source audio and moves the clip's start and end to its first and last speech, so the frames
that would be cut away are never rendered.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional

import apache_beam as beam
import av
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler

from model_handlers.in_process import ModelError, SharedModel
from model_handlers.silero_vad import RATE, WINDOW, SileroVadModelHandler, require_vad
from transforms.core.elements import ClipTask, Reject
from transforms.frame_analysis import ClipPass, FrameAnalyzer, PassResult
from transforms.lib.features import SPEECH, wav_samples
from transforms.lib.probe import open_media

TRIM_PAD_S = 0.2  # kept around the first and last speech when trimming: the breath before, the decay after


def per_frame(probs: np.ndarray, num_frames: int, fps: float) -> np.ndarray:
  """(num_frames,) the probability of the 32 ms window under each frame's middle; NaN past the audio."""
  windows = ((np.arange(num_frames) + 0.5) / fps * RATE // WINDOW).astype(int)
  out = np.full(num_frames, np.nan, np.float32)
  inside = windows < len(probs)
  out[inside] = probs[windows[inside]]
  return out


def speech_bounds(probs: np.ndarray, duration: float, pad: float = TRIM_PAD_S):
  """(start, end) seconds from the first to the last speech window, `pad` wider on each side (within the
  clip); None when no window is speech."""
  spoken = np.flatnonzero(probs >= SPEECH)
  if not len(spoken):
    return None
  step = WINDOW / RATE
  return max(0.0, spoken[0] * step - pad), min(duration, (spoken[-1] + 1) * step + pad)


class _SpeechPass(ClipPass):

  def __init__(self, model: SharedModel, fps: float):
    self.model, self.fps = model, fps
    self.speech: Optional[np.ndarray] = None
    self.error: Optional[ModelError] = None

  def add(self, frames) -> None:
    """The frames are not looked at: the pass hears the clip's sound."""

  def hear(self, wav: bytes) -> None:
    samples, rate = wav_samples(wav)
    if rate != RATE:  # the render pass writes 16 kHz (transforms/render.WAV_RATE)
      raise ValueError(f'Silero VAD takes {RATE} Hz audio, not {rate} Hz')
    (result,) = self.model.infer([samples])
    if isinstance(result, ModelError):
      self.error = result
    else:
      self.speech = result

  def finish(self, num_frames: int) -> PassResult:
    if self.speech is None:  # the model failed on the clip's audio: every frame is a model error
      return PassResult({}, num_frames, self.error.detail if self.error else 'no audio heard')
    return PassResult({'speech': per_frame(self.speech, num_frames, self.fps)}, 0)


class SpeechActivity(FrameAnalyzer):
  """Silero VAD on the rendered clip's audio -> the clip's `speech` array (per output frame)."""

  name = 'silero_vad'
  batch_size = 1  # it takes no frames: the render pass need not hold more for it

  def __init__(self, handler: ModelHandler, fps: float):
    self.model = SharedModel(handler)
    self.fps = fps

  def setup(self) -> None:
    self.model.setup()

  def start(self, task: ClipTask, num_frames: int, size: int) -> ClipPass:
    return _SpeechPass(self.model, self.fps)


def source_audio(task: ClipTask) -> np.ndarray:
  """The clip's audio from its source, 16 kHz mono float; empty when the source has no audio stream."""
  chunks = []
  with open_media(task.media.uri) as container:
    if not container.streams.audio:
      return np.zeros(0, np.float32)
    stream = container.streams.audio[0]
    t0 = task.media_start + task.media.info.start_time
    t1 = t0 + task.end - task.start
    container.seek(max(0, int((t0 - 0.5) * av.time_base)), backward=True, any_frame=False)
    resampler = av.AudioResampler(format='flt', layout='mono', rate=RATE)
    first = None
    for frame in container.decode(stream):
      if frame.time is None or frame.time + frame.samples / frame.sample_rate < t0:
        continue
      if frame.time > t1:
        break
      if first is None:
        first = frame.time
      chunks += [pcm.to_ndarray().reshape(-1) for pcm in resampler.resample(frame)]
    chunks += [pcm.to_ndarray().reshape(-1) for pcm in resampler.resample(None)]
  if first is None:
    return np.zeros(0, np.float32)
  samples = np.concatenate(chunks) if chunks else np.zeros(0, np.float32)
  skip = max(0, int(round((t0 - first) * RATE)))
  return samples[skip:skip + int(round((t1 - t0) * RATE))]


class TrimToSpeech(beam.DoFn):
  """ClipTask -> the same clip from its first to its last speech (--trim_silence), or a Reject on tag
  `rejects`: `no_speech` when Silero hears none, `too_short` when the speech spans under --min_duration.
  A clip without an audio stream passes as it is (the filters judge it)."""

  def __init__(self, handler: ModelHandler, min_duration: float, pad: float = TRIM_PAD_S):
    self.model = SharedModel(handler)
    self.min_duration, self.pad = min_duration, pad
    self.trimmed_s = Metrics.distribution('speech', 'trimmed_ms')

  def setup(self):
    self.model.setup()

  def process(self, task: ClipTask):
    samples = source_audio(task)
    if not len(samples):
      yield task
      return
    (probs,) = self.model.infer([samples])
    if isinstance(probs, ModelError):
      raise RuntimeError(f'silero_vad failed on the audio of {task.clip_id}: {probs.detail}')
    duration = task.end - task.start
    bounds = speech_bounds(probs, duration, self.pad)
    if bounds is None:
      yield self._reject(task, 'no_speech', f'no speech in {duration:.2f}s of audio (Silero VAD)')
      return
    start, end = bounds
    if end - start < self.min_duration:
      yield self._reject(task, 'too_short', f'speech spans {start:.2f}-{end:.2f}s of the clip, under '
                         f'--min_duration {self.min_duration}s (--trim_silence)')
      return
    self.trimmed_s.update(int(round((duration - (end - start)) * 1000)))
    if start <= 0 and end >= duration:
      yield task
      return
    yield dataclasses.replace(
        task, start=task.start + start, end=task.start + end,
        path=tuple((t - start, left, top) for t, left, top in task.path),
        notes=task.notes + (f'trimmed to its speech, {start:.2f}-{end:.2f}s of {duration:.2f}s (--trim_silence)',))

  @staticmethod
  def _reject(task: ClipTask, reason: str, detail: str):
    return beam.pvalue.TaggedOutput('rejects', Reject(task.clip_id, 'speech', reason, detail, task.source_id,
                                                      planned_id=task.planned_id))


def speech_analyzers(opts) -> List[FrameAnalyzer]:
  """The render pass's VAD analyzer where --vad is set."""
  if not opts.vad:
    return []
  require_vad('--vad')
  return [SpeechActivity(SileroVadModelHandler(), opts.fps)]


def trim_to_speech(opts) -> Optional[TrimToSpeech]:
  """The pre-render trim where --trim_silence is set."""
  if not opts.trim_silence:
    return None
  require_vad('--trim_silence')
  return TrimToSpeech(SileroVadModelHandler(), opts.min_duration)
