"""The bad-input corpus: hostile and odd media, archives and manifest rows, each with the outcome it must get.

Everything is generated here (nothing is checked in): broken files are made by
cutting, patching or faking real encodes, the odd-but-valid ones by
re-encoding the generated talking clip, so they still hold a face and speech.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import socket
import struct
import tarfile
import zipfile
from fractions import Fraction
from typing import Callable, Dict, List, Optional, Tuple

import av
import cv2
import numpy as np


WRITTEN = 'written'


def _decoded(path: str, seconds: float):
  """RGB frames (with times) and mono float audio of the first `seconds` of `path`."""
  frames, audio, rate = [], [], 44100
  with av.open(path) as container:
    for frame in container.decode(video=0):
      if frame.time >= seconds:
        break
      frames.append((frame.time, frame.to_ndarray(format='rgb24')))
  with av.open(path) as container:
    resampler = av.AudioResampler(format='flt', layout='mono', rate=rate)
    for frame in container.decode(audio=0):
      for out in resampler.resample(frame):
        audio.append(out.to_ndarray().reshape(-1))
  samples = np.concatenate(audio)[:int(seconds * rate)] if audio else np.zeros(0, np.float32)
  return frames, samples, rate


def reencode(src: str, dst: str, seconds: float = 2.0, pix_fmt: str = 'yuv420p', size: Optional[Tuple[int, int]] = None,
             turn: int = 0, times: Optional[Callable[[int, float], Optional[float]]] = None, audio: bool = True) -> str:
  """Re-encode the start of `src`: other pixel format or size, pixels stored turned with a display
  matrix that turns them back (`turn`, counterclockwise degrees), or other frame times (VFR)."""
  frames, samples, rate = _decoded(src, seconds)
  with av.open(dst, 'w') as out:
    video = out.add_stream('libx264', rate=30)
    video.codec_context.time_base = video.time_base = Fraction(1, 1000)
    first = frames[0][1]
    if turn:
      first = np.rot90(first, k=-turn // 90)
    height, width = first.shape[:2] if size is None else (size[1], size[0])
    video.width, video.height, video.pix_fmt = width, height, pix_fmt
    video.options = {'preset': 'ultrafast', 'crf': '20'}
    if turn:
      video.set_display_rotation(turn)
    stream = None
    if audio:
      stream = out.add_stream('aac', rate=rate)
      stream.layout = 'mono'
    for index, (t, image) in enumerate(frames):
      t = times(index, t) if times else t
      if t is None:
        continue
      if turn:
        image = np.ascontiguousarray(np.rot90(image, k=-turn // 90))
      if size is not None:
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
      frame = av.VideoFrame.from_ndarray(image, format='rgb24')
      frame.pts, frame.time_base = int(round(t * 1000)), Fraction(1, 1000)
      out.mux(video.encode(frame))
    out.mux(video.encode())
    if stream is not None:
      for offset in range(0, len(samples), 1024):
        chunk = samples[offset:offset + 1024].astype(np.float32)
        frame = av.AudioFrame.from_ndarray(chunk[None, :], format='flt', layout='mono')
        frame.sample_rate, frame.pts, frame.time_base = rate, offset, Fraction(1, rate)
        out.mux(stream.encode(frame))
      out.mux(stream.encode())
  return dst


def tiny_video(dst: str, width: int, height: int, frames: int = 3, pix_fmt: str = 'yuv444p') -> str:
  with av.open(dst, 'w') as out:
    video = out.add_stream('libx264', rate=25)
    video.width, video.height, video.pix_fmt = width, height, pix_fmt
    video.options = {'preset': 'ultrafast'}
    for index in range(frames):
      frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 40 * index, np.uint8), format='rgb24')
      frame.pts = index
      out.mux(video.encode(frame))
    out.mux(video.encode())
  return dst


def audio_only(dst: str) -> str:
  with av.open(dst, 'w') as out:
    stream = out.add_stream('aac', rate=16000)
    stream.layout = 'mono'
    for block in range(20):
      frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format='flt', layout='mono')
      frame.sample_rate, frame.pts, frame.time_base = 16000, block * 1024, Fraction(1, 16000)
      out.mux(stream.encode(frame))
    out.mux(stream.encode())
  return dst


def remux(src: str, dst: str, **options) -> str:
  """Copy the streams into another container (no re-encode); `options` go to av.open (format, options)."""
  with av.open(src) as container, av.open(dst, 'w', **options) as out:
    streams = {s.index: out.add_stream_from_template(s) for s in container.streams}
    for packet in container.demux():
      if packet.dts is None:
        continue
      packet.stream = streams[packet.stream.index]
      out.mux(packet)
  return dst


def to_mkv(src: str, dst: str) -> bytes:
  """Remux to Matroska and return its bytes, for header patching."""
  with open(remux(src, dst, format='matroska'), 'rb') as handle:
    return handle.read()


def long_duration_header(src: str, dst: str) -> str:
  """A 2 s Matroska file whose Segment Duration claims ten hours."""
  data = to_mkv(src, dst)
  at = data.find(b'\x44\x89')  # EBML id of Duration (a float in Segment Info)
  size = data[at + 2] & 0x7f
  value = struct.pack('>d' if size == 8 else '>f', 36000000.0)  # milliseconds
  with open(dst, 'wb') as handle:
    handle.write(data[:at + 3] + value + data[at + 3 + size:])
  return dst


def unknown_codec(src: str, dst: str) -> str:
  """Matroska whose video CodecID names a codec no decoder knows."""
  data = to_mkv(src, dst)
  assert b'V_MPEG4/ISO/AVC' in data
  with open(dst, 'wb') as handle:
    handle.write(data.replace(b'V_MPEG4/ISO/AVC', b'V_QQQQQ/ISO/AVC', 1))
  return dst


class Evil:
  """A pickle that would create a file when loaded: proof that it never is."""

  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):
    return (open, (self.marker, 'w'))


def closed_port() -> int:
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def build(root: str, talking: str, server: str) -> Tuple[str, Dict[str, str]]:
  """Write the corpus under `root` (served by `server`) and a JSONL manifest with a BOM and mixed
  line endings; return its path and {clip id: expected reject reason, or WRITTEN}."""
  media = os.path.join(root, 'media')
  os.makedirs(media, exist_ok=True)

  def path(name):
    return os.path.join(media, name)

  with open(talking, 'rb') as handle:
    good = handle.read()
  rows: List[dict] = []
  expect: Dict[str, str] = {}

  def case(row_id, url, outcome, clips=None, **extra):
    row = {'id': row_id, 'url': url, **extra}
    if clips is not None:
      row['clips'] = clips
    rows.append(row)
    if isinstance(outcome, dict):
      expect.update(outcome)
    else:
      expect[f'{row_id}_0'] = outcome

  # -- media files that are not (usable) video
  open(path('zero.mp4'), 'wb').close()
  case('zero_byte', path('zero.mp4'), 'empty_file')
  base = reencode(talking, path('base.mp4'), 2.0)  # moov at the end: a cut-off download loses it
  with open(base, 'rb') as handle:
    data = handle.read()
  with open(path('truncated.mp4'), 'wb') as handle:
    handle.write(data[:len(data) // 2])
  case('truncated', path('truncated.mp4'), 'download_corrupt')
  with open(remux(base, path('faststart.mp4'), options={'movflags': '+faststart'}), 'rb') as handle:
    data = handle.read()
  with open(path('truncated_faststart.mp4'), 'wb') as handle:  # index intact, the last 40% of the media gone
    handle.write(data[:len(data) * 6 // 10])
  case('truncated_faststart', path('truncated_faststart.mp4'), 'source_truncated')
  with open(path('random.mp4'), 'wb') as handle:
    handle.write(np.random.default_rng(5).bytes(60000))
  case('random_bytes', path('random.mp4'), 'download_corrupt')
  case('audio_only', audio_only(path('audio_only.mp4')), 'no_video')
  case('video_only', reencode(talking, path('video_only.mp4'), 1.5, audio=False), 'no_audio')
  cv2.imwrite(path('image.png'), np.zeros((240, 320, 3), np.uint8))
  os.replace(path('image.png'), path('image.mp4'))
  case('image', path('image.mp4'), 'still_image')
  case('unsupported_codec', unknown_codec(base, path('codec.mkv')), 'unsupported_codec')
  case('one_pixel', tiny_video(path('one.mp4'), 1, 1), 'too_small')
  tiny_video(path('8k.mp4'), 7680, 4320, frames=1, pix_fmt='yuv420p')  # a flat frame: 8K header, few kB payload
  case('eight_k', path('8k.mp4'), 'too_many_pixels')
  case('long_header', long_duration_header(base, path('long.mkv')), 'too_long')
  os.mkfifo(path('fifo.mp4'))  # opening it would block forever
  case('fifo', path('fifo.mp4'), 'not_a_file')

  # -- odd but valid video: must be written
  case('vfr', reencode(talking, path('vfr.mp4'), 2.0,
                       times=lambda i, t: None if i % 5 in (1, 2) else t + (0.011 if i % 3 else 0.0)), WRITTEN)
  case('rotated', reencode(talking, path('rotated.mp4'), 2.0, turn=90), WRITTEN)
  case('p10_422', reencode(talking, path('p10_422.mp4'), 2.0, pix_fmt='yuv422p10le'), WRITTEN)
  case('odd_size', reencode(talking, path('odd.mp4'), 2.0, pix_fmt='yuv444p', size=(641, 481)), WRITTEN)

  # -- clip stamps on a good source: one clip written, each other one rejected
  with open(path('talking.mp4'), 'wb') as handle:
    handle.write(good)
  case('stamps', path('talking.mp4'), {
      'stamps_0': WRITTEN, 'stamps_1': 'bad_range', 'stamps_2': 'clip_past_end', 'stamps_3': 'overlapping_clip',
      'stamps_4': 'bad_timestamp', 'stamps_5': 'bad_timestamp', 'stamps_6': 'bad_timestamp',
      'stamps_7': 'bad_timestamp'},
       clips=[['00:01', '00:02.5'], ['00:05', '00:03'], [20, 25], [2.0, 3.5], [-1, 2], '-00:01-00:02',
              'ab:cd-00:03', '00:61-01:10'])
  # -- ids
  case('dup', path('zero.mp4'), 'empty_file')
  rows.append({'id': 'dup', 'url': path('talking.mp4')})
  expect['dup_0'] = ['empty_file', 'duplicate_id']
  case('../../escape', path('talking.mp4'), {'escape': 'unsafe_id'})
  case('/etc/passwd', path('talking.mp4'), {'etc_passwd': 'unsafe_id'})
  case('nul\x00id', path('talking.mp4'), {'nulid': 'unsafe_id'})
  case('speaker 7/interview', path('talking.mp4'), {'speaker_7_interview_0': WRITTEN}, clips=[[4.0, 5.5]])
  case('\u8bf4\u8bdd', path('audio_only.mp4'), {'id_7a25e26621_0': 'no_video'})  # sanitises to nothing: hash id
  # -- URLs and paths
  case('outside_root', 'file:///etc/hostname', 'path_not_allowed')
  os.symlink('/etc/hostname', path('link.mp4'))
  case('symlink_out', path('link.mp4'), 'path_not_allowed')
  case('dash_url', '--exec=touch /tmp/pwned.mp4', 'bad_url')
  case('dash_o', '-o/tmp/x.mp4', 'bad_url')
  case('ftp', 'ftp://127.0.0.1/x.mp4', 'scheme_not_allowed')
  case('unreachable', f'http://127.0.0.1:{closed_port()}/x.mp4', 'unreachable')
  case('http_404', f'{server}/status/404/x.mp4', 'http_error')
  case('http_500', f'{server}/status/500/x.mp4', 'http_error')
  case('page_404', f'{server}/status/404/watch', 'http_error')  # not a media file name: goes through yt-dlp
  case('stall', f'{server}/stall/media/talking.mp4', 'download_timeout')
  case('redirect_loop', f'{server}/loop/x.mp4', 'too_many_redirects')
  with open(path('big.mp4'), 'wb') as handle:
    handle.write(np.random.default_rng(1).bytes(3 << 20))
  case('too_big', f'{server}/media/big.mp4', 'too_large')
  case('flaky', f'{server}/flaky/media/base.mp4', WRITTEN, clips=[[0.2, 1.4]])
  # -- archives
  tar_path = os.path.join(root, 'upload.tar')
  with tarfile.open(tar_path, 'w') as tar:
    def add(name, payload, kind=tarfile.REGTYPE, link=''):
      info = tarfile.TarInfo(name)
      info.type, info.linkname, info.size = kind, link, len(payload) if kind == tarfile.REGTYPE else 0
      tar.addfile(info, io.BytesIO(payload) if kind == tarfile.REGTYPE else None)
    with open(base, 'rb') as handle:
      add('clips/good.mp4', handle.read())
    add('clips/good.json', json.dumps({'clips': [[0.2, 1.6]]}).encode())
    add('clips/evil.pkl', pickle.dumps(Evil(os.path.join(root, 'PWNED'))))
    add('../escape.mp4', good)
    add('/tmp/absolute.mp4', good)
    add('clips/link.mp4', b'', tarfile.SYMTYPE, '/etc/hostname')
  case('tar', tar_path, {'tar_clips_good_0': WRITTEN, 'tar_clips_evil.pkl': 'pickle_refused',
                         'tar_escape.mp4': 'unsafe_member', 'tar_tmp_absolute.mp4': 'unsafe_member',
                         'tar_clips_link.mp4': 'unsafe_member'})
  zip_path = os.path.join(root, 'upload.zip')
  with zipfile.ZipFile(zip_path, 'w') as archive:
    archive.writestr('../../zip_escape.mp4', good)
    archive.writestr('data.pickle', pickle.dumps({'clips': [[0, 1]]}))
  case('zip', zip_path, {'zip_zip_escape.mp4': 'unsafe_member', 'zip_data.pickle': 'pickle_refused'})
  # -- rows that are not rows
  expect[f'row{len(rows)}'] = 'bad_manifest_row'  # rows without a usable id are named by position
  rows.append('this line is not JSON')
  rows.append({'id': 'no_url'})
  expect['no_url'] = 'bad_manifest_row'

  manifest = os.path.join(root, 'corpus.jsonl')
  endings = ['\r\n', '\n', '\r\n', '\r']
  lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
  with open(manifest, 'wb') as handle:
    handle.write('\ufeff'.encode() + ''.join(line + endings[i % 4] for i, line in enumerate(lines)).encode())
  return manifest, expect
