"""Probe media with PyAV: a file that does not decode is not a source.

Probing reads untrusted bytes, so it is bounded: the frame size is checked
against `max_pixels` from the stream header before anything is decoded, and a
deadline is checked between demuxed packets. Each failure has a reason code.
It runs in a child process (a fresh interpreter, argument list), so a decoder
that crashes (segfault, abort) on a hostile file costs only that file
(`decoder_crash`), and a decoder stuck inside one call is killed on time.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction

import av
import numpy as np

from transforms.core.elements import ProbeInfo, ReasonError

VIDEO_EXTENSIONS = ('.mp4', '.mkv', '.webm', '.mov', '.avi', '.m4v', '.flv', '.ts', '.mpg', '.mpeg')
MIN_SIDE_PX = 16  # smaller frames cannot hold a usable face
CHILD_START_S = 20.0  # allowance on top of the probe time limit for the child's interpreter to start
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository
# The child imports this module from where the parent did (first on its path only if not on it already).
_CHILD = ('import sys; root = sys.argv.pop(1); sys.path[:0] = [] if root in sys.path else [root]; '
          'from transforms.lib.probe import _child; _child(*sys.argv[1:])')
_IMAGE_FORMATS = ('image2',)  # plus every '*_pipe' image demuxer (png_pipe, jpeg_pipe, ...)


class ProbeError(ReasonError):
  """The file is not usable media; `reason` is the reject code, the message says why."""


def open_media(uri: str):
  """Open a local path or any Beam FileSystems URI (seekable stream) with PyAV."""
  if '://' in uri and not uri.startswith('file://'):
    from apache_beam.io.filesystems import FileSystems
    return av.open(FileSystems.open(uri, mime_type='application/octet-stream'), 'r')
  return av.open(uri[len('file://'):] if uri.startswith('file://') else uri, 'r')


def rotation_of(frame) -> int:
  """Display rotation (counterclockwise degrees: 0, 90, 180 or 270) from the frame's display matrix."""
  return int(round((getattr(frame, 'rotation', 0) or 0) / 90.0)) % 4 * 90


def upright(image: np.ndarray, rotation: int) -> np.ndarray:
  """A decoded frame turned the way players show it (the same turn ffmpeg's autorotate makes)."""
  return np.ascontiguousarray(np.rot90(image, k=rotation // 90)) if rotation else image


def upright_rgb(frame, width: int, height: int, rotation: int) -> np.ndarray:
  """RGB of `frame` at display size `width` x `height`, rotated upright."""
  if rotation in (90, 270):
    return upright(frame.to_ndarray(width=height, height=width, format='rgb24'), rotation)
  return upright(frame.to_ndarray(width=width, height=height, format='rgb24'), rotation)


def probe(uri: str, max_pixels: int = 0, timeout_s: float = 60.0) -> ProbeInfo:
  """`probe_here` in a child process: its ProbeErrors come back as ProbeErrors; a child killed by a signal
  is `decoder_crash`, one still running at the time limit (plus start-up) is killed: `probe_timeout`."""
  try:
    child = subprocess.run([sys.executable, '-c', _CHILD, _PACKAGE_ROOT, uri, str(int(max_pixels)), repr(timeout_s)],
                           stdin=subprocess.DEVNULL, capture_output=True, check=False,
                           timeout=timeout_s + CHILD_START_S if timeout_s else None)
  except subprocess.TimeoutExpired as error:
    raise ProbeError('probe_timeout', f'probing did not finish within {timeout_s:g}s (the decoder was killed)') \
        from error
  if child.returncode < 0:
    name = signal.Signals(-child.returncode).name if -child.returncode in signal.valid_signals() else 'a signal'
    raise ProbeError('decoder_crash', f'the decoder crashed on this file ({name}) while probing it')
  lines = child.stdout.decode(errors='replace').strip().splitlines()
  if child.returncode != 0 or not lines:
    raise RuntimeError(f'the probe child failed (exit {child.returncode}): '
                       f'{child.stderr.decode(errors="replace")[-1000:]}')
  result = json.loads(lines[-1])
  if 'reason' in result:
    raise ProbeError(result['reason'], result['detail'])
  return ProbeInfo(**result)


def probe_here(uri: str, max_pixels: int = 0, timeout_s: float = 60.0) -> ProbeInfo:
  """Stream facts plus one decoded video frame, so truncated or fake files fail here (in this process)."""
  local = uri[len('file://'):] if uri.startswith('file://') else uri
  if '://' not in local and os.path.isfile(local) and os.path.getsize(local) == 0:
    raise ProbeError('empty_file', 'the file has zero bytes')
  try:
    container = open_media(uri)
  except (av.error.FFmpegError, OSError, ValueError) as error:
    raise ProbeError('download_corrupt', f'cannot open: {error}') from error
  with container:
    if not container.streams:
      raise ProbeError('download_corrupt', f'the {container.format.name} container holds no streams')
    if not container.streams.video:
      kinds = ', '.join(sorted({s.type for s in container.streams}))
      raise ProbeError('no_video', f'no video stream (holds {kinds})')
    video = container.streams.video[0]
    if video.codec_context is None:
      raise ProbeError('unsupported_codec', f'no decoder for the video stream of this {container.format.name} file')
    fmt = container.format.name
    if fmt in _IMAGE_FORMATS or fmt.endswith('_pipe'):
      raise ProbeError('still_image', f'a still image ({fmt}, {video.codec_context.name}), not a video')
    coded = (video.codec_context.width or 0) * (video.codec_context.height or 0)
    if max_pixels and coded > max_pixels:
      raise ProbeError('too_many_pixels', f'{video.codec_context.width}x{video.codec_context.height} frames are '
                       f'over --max_pixels {max_pixels}')
    audio = container.streams.audio[0] if container.streams.audio else None
    duration = _duration(container, video)
    rate = video.average_rate or video.guessed_rate or video.base_rate
    fps = float(rate) if rate else 0.0
    first = _first_frame(container, video, time.monotonic() + timeout_s if timeout_s else None)
    if max_pixels and first.width * first.height > max_pixels:
      raise ProbeError('too_many_pixels', f'{first.width}x{first.height} frames are over --max_pixels {max_pixels}')
    rotation = rotation_of(first)
    width, height = (first.height, first.width) if rotation in (90, 270) else (first.width, first.height)
    if min(width, height) < MIN_SIDE_PX:
      raise ProbeError('too_small', f'{width}x{height} frames: a side is under {MIN_SIDE_PX} pixels')
    start = float(container.start_time / av.time_base) if container.start_time is not None else 0.0
    interlaced = bool(getattr(first, 'interlaced_frame', False)) or str(
        getattr(video.codec_context, 'field_order', '') or '').lower() in ('tt', 'bb', 'tb', 'bt')
    return ProbeInfo(
        duration=duration, width=width, height=height, fps=fps,
        has_audio=audio is not None, interlaced=interlaced, video_codec=video.codec_context.name,
        audio_rate=int(audio.rate or 0) if audio is not None else 0, start_time=start, rotation=rotation)


def _first_frame(container, video, deadline):
  """The first decodable frame, giving up at the deadline (checked between packets)."""
  try:
    for packet in container.demux(video):
      if deadline is not None and time.monotonic() > deadline:
        raise ProbeError('probe_timeout', 'no frame decoded within the probe time limit')
      for frame in packet.decode():
        if frame.width < 1 or frame.height < 1:
          raise ProbeError('download_corrupt', 'video frame has no pixels')
        return frame
  except av.error.FFmpegError as error:
    raise ProbeError('download_corrupt', f'no decodable video frame: {error}') from error
  raise ProbeError('download_corrupt', 'no decodable video frame: empty stream')


def _duration(container, video) -> float:
  if video.duration and video.time_base:
    return float(video.duration * video.time_base)
  if container.duration:
    return float(Fraction(container.duration, av.time_base))
  return 0.0


def _child(uri: str, max_pixels: str, timeout_s: str) -> None:
  """The child's side: one json line on stdout, the ProbeInfo or the ProbeError's reason and detail."""
  try:
    result = dataclasses.asdict(probe_here(uri, int(max_pixels), float(timeout_s)))
  except ProbeError as error:
    result = {'reason': error.reason, 'detail': str(error)}
  print(json.dumps(result), flush=True)
