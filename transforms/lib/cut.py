"""Cut an encoded clip into frame ranges, each its own mp4 (H.264 + AAC), in one decode pass of the clip.

Why from the rendered clip and not the source: where a clip is cut is known only once the render pass that made
it is over (SyncNet reads a clip out as a whole, transforms/sync_split.py), so the pieces come from the clip the
render wrote, at output size, not from a second decode of the source (and a second run of every per-frame
model). The frames go from the decoder to the encoder as they are (YUV, no colour conversion); cutting on any
frame, not only on key frames, costs one more H.264 generation of the kept frames at the render's --crf.
"""
from __future__ import annotations

from fractions import Fraction
from typing import List, Optional, Sequence, Tuple

import av
import numpy as np
from av.video.frame import PictureType


class _Piece:
  """One range's output: opened at its first frame or sample, closed once its video and audio are complete."""

  def __init__(self, start: int, end: int, path: Optional[str], fps: float, audio_rate: int):
    self.start, self.end, self.path = start, end, path
    self.first_sample = int(round(start / fps * audio_rate)) if audio_rate else 0
    self.end_sample = int(round(end / fps * audio_rate)) if audio_rate else 0
    self.out = self.video = self.audio = None
    self.frames = self.samples = 0
    self.middle: Optional[np.ndarray] = None

  def open(self, size: Tuple[int, int], rate: Fraction, crf: int, preset: str, audio) -> None:
    self.out = av.open(self.path, 'w', format='mp4', options={'movflags': '+faststart'})
    self.video = self.out.add_stream('libx264', rate=rate)
    self.video.width, self.video.height = size
    self.video.pix_fmt = 'yuv420p'
    self.video.options = {'crf': str(crf), 'preset': preset}
    if audio is not None:
      self.audio = self.out.add_stream('aac', rate=audio.rate)
      self.audio.layout = audio.layout.name

  def close(self) -> None:
    if self.out is None:
      return
    self.out.mux(self.video.encode(None))
    if self.audio is not None:
      self.out.mux(self.audio.encode(None))
    self.out.close()
    self.out = None


def cut_clip(src: str, ranges: Sequence[Tuple[int, int, Optional[str]]], fps: float, crf: int,
             preset: str) -> List[Optional[np.ndarray]]:
  """Write the frames [start, end) of the clip `src` to `path` for each (start, end, path) of `ranges`, with
  the audio of the same span (AAC at the clip's own rate; its samples counted from the clip's start); a range
  without a path is only looked at. Returns each range's middle frame (RGB; None where the clip ran short)."""
  rate = Fraction(fps).limit_denominator(1001)
  with av.open(src) as container:
    vin = container.streams.video[0]
    ain = container.streams.audio[0] if container.streams.audio else None
    audio_rate = ain.rate if ain is not None else 0
    pieces = [_Piece(start, end, path, fps, audio_rate) for start, end, path in ranges]
    size = (vin.codec_context.width, vin.codec_context.height)
    resampler = av.AudioResampler(format='fltp', layout=ain.layout.name, rate=audio_rate) if ain else None
    frame_index = sample_index = 0
    for packet in container.demux(*([vin] + ([ain] if ain is not None else []))):
      for frame in packet.decode():
        if packet.stream.type == 'video':
          for piece in pieces:
            if piece.start <= frame_index < piece.end:
              _take_frame(piece, frame, frame_index, size, rate, crf, preset, ain)
          frame_index += 1
        else:
          for converted in resampler.resample(frame):
            data = converted.to_ndarray()
            for piece in pieces:
              _take_samples(piece, data, sample_index, size, rate, crf, preset, ain)
            sample_index += data.shape[1]
        for piece in pieces:
          if frame_index >= piece.end and (ain is None or sample_index >= piece.end_sample):
            piece.close()
    if resampler is not None:
      for converted in resampler.resample(None):
        for piece in pieces:
          _take_samples(piece, converted.to_ndarray(), sample_index, size, rate, crf, preset, ain)
        sample_index += converted.samples
    for piece in pieces:
      piece.close()
  return [piece.middle for piece in pieces]


def _take_frame(piece: _Piece, frame, index: int, size, rate: Fraction, crf: int, preset: str, ain) -> None:
  if index == piece.start + (piece.end - piece.start) // 2:
    piece.middle = frame.to_ndarray(format='rgb24')
  if piece.path is None:
    return
  if piece.out is None:
    piece.open(size, rate, crf, preset, ain)
  frame.pts, frame.time_base, frame.pict_type = piece.frames, 1 / rate, PictureType.NONE
  piece.out.mux(piece.video.encode(frame))
  piece.frames += 1


def _take_samples(piece: _Piece, data: np.ndarray, first: int, size, rate: Fraction, crf: int, preset: str,
                  ain) -> None:
  """The part of `data` (channels, n: clip samples first..first + n) that falls in the piece's span."""
  low, high = max(first, piece.first_sample), min(first + data.shape[1], piece.end_sample)
  if piece.path is None or high <= low or piece.samples >= piece.end_sample - piece.first_sample:
    return
  if piece.out is None:
    piece.open(size, rate, crf, preset, ain)
  chunk = av.AudioFrame.from_ndarray(np.ascontiguousarray(data[:, low - first:high - first], np.float32),
                                     format='fltp', layout=ain.layout.name)
  chunk.sample_rate, chunk.pts, chunk.time_base = ain.rate, piece.samples, Fraction(1, ain.rate)
  piece.out.mux(piece.audio.encode(chunk))
  piece.samples += high - low
