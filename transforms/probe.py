"""Probe media with PyAV: a file that does not decode is not a source."""
from __future__ import annotations

from fractions import Fraction

import av

from beam_pipeline.elements import ProbeInfo


class ProbeError(Exception):
  """The file is not usable media; the message says why."""


def open_media(uri: str):
  """Open a local path or any Beam FileSystems URI (seekable stream) with PyAV."""
  if '://' in uri and not uri.startswith('file://'):
    from apache_beam.io.filesystems import FileSystems
    return av.open(FileSystems.open(uri, mime_type='application/octet-stream'), 'r')
  return av.open(uri[len('file://'):] if uri.startswith('file://') else uri, 'r')


def probe(uri: str) -> ProbeInfo:
  """Stream facts plus one decoded video frame, so truncated or fake files fail here."""
  try:
    container = open_media(uri)
  except (av.error.FFmpegError, OSError, ValueError) as error:
    raise ProbeError(f'cannot open: {error}') from error
  with container:
    if not container.streams.video:
      raise ProbeError('no video stream')
    video = container.streams.video[0]
    audio = container.streams.audio[0] if container.streams.audio else None
    duration = _duration(container, video)
    rate = video.average_rate or video.guessed_rate or video.base_rate
    fps = float(rate) if rate else 0.0
    try:
      first = next(container.decode(video=0))
    except (StopIteration, av.error.FFmpegError) as error:
      raise ProbeError(f'no decodable video frame: {error or "empty stream"}') from error
    if first.width < 1 or first.height < 1:
      raise ProbeError('video frame has no pixels')
    start = float(container.start_time / av.time_base) if container.start_time is not None else 0.0
    interlaced = bool(getattr(first, 'interlaced_frame', False)) or str(
        getattr(video.codec_context, 'field_order', '') or '').lower() in ('tt', 'bb', 'tb', 'bt')
    return ProbeInfo(
        duration=duration, width=first.width, height=first.height, fps=fps,
        has_audio=audio is not None, interlaced=interlaced, video_codec=video.codec_context.name,
        audio_rate=int(audio.rate or 0) if audio is not None else 0, start_time=start)


def _duration(container, video) -> float:
  if video.duration and video.time_base:
    return float(video.duration * video.time_base)
  if container.duration:
    return float(Fraction(container.duration, av.time_base))
  return 0.0
