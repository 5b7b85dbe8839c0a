"""Small browser-playable previews of a clip (H.264 + AAC mp4) for report.html: kept samples and rejects."""
from __future__ import annotations

import io
import os
import tempfile
from typing import Optional

import av
import cv2
import numpy as np

from transforms.lib.features import wav_samples


def draw_points(image: np.ndarray, points: np.ndarray, scale: float, radius: int) -> None:
  """Green dots (landmarks) on an RGB image, in place; NaN points are skipped."""
  for x, y in points[np.isfinite(points).all(1)] * scale:
    cv2.circle(image, (int(round(x)), int(round(y))), radius, (40, 255, 80), -1, cv2.LINE_AA)


def preview_mp4(mp4: bytes, wav: Optional[bytes], side: int, seconds: float, points: Optional[np.ndarray] = None,
                crf: int = 30) -> Optional[bytes]:
  """The first `seconds` of `mp4`, `side` pixels wide, `points` ((T, P, 2) in its pixels) drawn on every frame,
  with `wav`'s audio: an mp4 that browsers play inline (moov atom first, hence a file, not a buffer). None when
  the clip has no frame."""
  images = []
  with av.open(io.BytesIO(mp4)) as source:
    stream = source.streams.video[0]
    rate = stream.average_rate or 25
    width = stream.codec_context.width
    height = int(round(side * stream.codec_context.height / width / 2)) * 2
    for index, frame in enumerate(source.decode(stream)):
      if index >= seconds * rate:
        break
      image = cv2.resize(frame.to_ndarray(format='rgb24'), (side, height), interpolation=cv2.INTER_AREA)
      if points is not None and index < len(points):
        draw_points(image, points[index], side / width, max(1, side // 128))
      images.append(image)
  if not images:
    return None
  with tempfile.TemporaryDirectory(prefix='preview-') as scratch:
    path = os.path.join(scratch, 'preview.mp4')
    with av.open(path, 'w', options={'movflags': '+faststart'}) as out:
      video = out.add_stream('libx264', rate=rate, options={'crf': str(crf), 'preset': 'veryfast'})
      video.width, video.height, video.pix_fmt = side, height, 'yuv420p'
      audio = None
      if wav:
        samples, sample_rate = wav_samples(wav)
        audio = out.add_stream('aac', rate=sample_rate, layout='mono')
      for image in images:
        out.mux(video.encode(av.VideoFrame.from_ndarray(image, format='rgb24')))
      out.mux(video.encode())
      if audio is not None:
        sound = samples[:int(round(len(images) / float(rate) * sample_rate))].astype(np.float32)
        chunk = audio.codec_context.frame_size or 1024
        for start in range(0, len(sound), chunk):
          block = av.AudioFrame.from_ndarray(sound[None, start:start + chunk], format='flt', layout='mono')
          block.sample_rate, block.pts = sample_rate, start
          out.mux(audio.encode(block))
        out.mux(audio.encode())
    with open(path, 'rb') as handle:
      return handle.read()
