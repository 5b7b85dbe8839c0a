"""Generated talking-head media: the embedded demo input and the test fixtures.

The face is a real portrait (scikit-image's astronaut photo) that drifts across
the frame while its mouth opens and closes with syllable-like audio bursts, so
face detection, cropping and audio-visual sync have something true to find.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from fractions import Fraction
from typing import Optional, Tuple

import av
import cv2
import numpy as np

# Where things sit in skimage.data.astronaut() (measured with the MediaPipe face landmarker).
_SPRITE = (0, 300, 60, 380)  # y0, y1, x0, x1 of the head-and-shoulders region
_MOUTH = (163, 143)  # mouth centre in sprite pixels
_MOUTH_HALF_WIDTH = 19
_FACE_AXIS_X = 165  # sprite column of the face's vertical axis
_FACE_RADIUS = 45  # radius of the cylinder the face turns on (a turn of 45 reads as ~26 degrees of yaw)
_SLIDE_S = 0.4  # seconds the face takes to slide out of (or back into) the frame


@dataclasses.dataclass
class VideoSpec:
  """What to generate. Times in seconds, sizes in pixels."""
  duration: float = 6.0
  fps: float = 30.0
  width: int = 640
  height: int = 480
  face: bool = True
  audio: bool = True
  audio_rate: int = 44100
  sync_offset_frames: int = 0  # audio lags the mouth by this many video frames
  face_scale: float = 1.0
  motion_px: float = 40.0
  seed: int = 0
  crf: int = 23
  # Known-truth variations for the analysis tests; the defaults leave the clip as above.
  yaw_deg: float = 0.0  # the head turns from 0 to this (cylinder warp) over the clip
  blur_sigma: float = 0.0  # Gaussian blur of every frame (an out-of-focus camera)
  second_face_scale: float = 0.0  # > 0: a second, static face of this scale in the right third
  face_gone: Tuple[float, float] = ()  # the face slides out before this interval and back in after
  cut_at: float = 0.0  # > 0: a hard shot change here (other background, face elsewhere)
  irregular_speech: bool = False  # syllables at random times, so a sync offset has one true lag


def _sprite(scale: float) -> np.ndarray:
  from skimage import data
  y0, y1, x0, x1 = _SPRITE
  sprite = data.astronaut()[y0:y1, x0:x1]
  if scale != 1.0:
    sprite = cv2.resize(sprite, None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
  return sprite


def mouth_openness(t: np.ndarray) -> np.ndarray:
  """Syllables at ~3.3 Hz in phrases of 1.6 s with 0.6 s pauses; 0 closed, 1 open."""
  t = np.asarray(t, np.float64)
  syllable = np.clip(np.sin(2 * np.pi * 3.3 * t), 0, None) ** 2
  in_phrase = (np.mod(t, 2.2) < 1.6).astype(np.float64)
  return syllable * in_phrase


def irregular_openness(t: np.ndarray, seed: int) -> np.ndarray:
  """Syllables of random length (0.15-0.35 s) and loudness after random pauses (0.1-0.6 s)."""
  t = np.asarray(t, np.float64)
  rng = np.random.default_rng(seed + 11)
  opening = np.zeros_like(t)
  start = 0.1
  while start < float(np.max(t, initial=0.0)):
    width, amplitude = rng.uniform(0.15, 0.35), rng.uniform(0.5, 1.0)
    inside = (t >= start) & (t < start + width)
    opening[inside] = np.maximum(opening[inside], amplitude * np.sin(np.pi * (t[inside] - start) / width) ** 2)
    start += width + rng.uniform(0.1, 0.6)
  return opening


def openness(spec: VideoSpec, t) -> np.ndarray:
  return irregular_openness(t, spec.seed) if spec.irregular_speech else mouth_openness(t)


def face_position(spec: VideoSpec, t: float, sprite_shape) -> Tuple[int, int]:
  """Top-left of the sprite at time t: a slow drift around the frame centre (left third beside a second
  face or after a cut), sliding out to the right around `face_gone`."""
  h, w = sprite_shape[:2]
  centre = 0.3 if spec.second_face_scale > 0 or (spec.cut_at > 0 and t >= spec.cut_at) else 0.5
  cx = spec.width * centre - w / 2 + spec.motion_px * math.sin(2 * math.pi * t / 4.0)
  cy = (spec.height - h) / 2 + 0.3 * spec.motion_px * math.sin(2 * math.pi * t / 3.0)
  if spec.face_gone:
    gone, back = spec.face_gone
    away = min(1.0, max(0.0, min(t - gone + _SLIDE_S, back + _SLIDE_S - t) / _SLIDE_S))
    cx += away * (spec.width - cx)
  return int(round(cx)), int(round(cy))


def turn_sprite(sprite: np.ndarray, degrees: float, scale: float) -> np.ndarray:
  """The head turned about its vertical axis, modelled as a cylinder (a homography barely moves
  MediaPipe's yaw; this moves the nose and eyes across the face like a real turn)."""
  h, w = sprite.shape[:2]
  cx, r = _FACE_AXIS_X * scale, _FACE_RADIUS * scale
  yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
  u = (xx - cx) / r
  phi = np.arcsin(np.clip(u, -1, 1)) - math.radians(degrees)
  visible = (np.abs(u) < 1) & (np.abs(phi) < np.pi / 2)
  map_x = np.where(visible, cx + r * np.sin(phi), xx).astype(np.float32)
  return cv2.remap(sprite, map_x, yy, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)


def _turned_x(x: float, degrees: float, scale: float) -> float:
  cx, r = _FACE_AXIS_X * scale, _FACE_RADIUS * scale
  return cx + r * math.sin(math.asin(max(-1.0, min(1.0, (x - cx) / r))) + math.radians(degrees))


def _background(spec: VideoSpec, second_shot: bool = False) -> np.ndarray:
  rng = np.random.default_rng(spec.seed + (7 if second_shot else 0))
  yy, xx = np.mgrid[0:spec.height, 0:spec.width]
  base = np.stack([60 + 40 * xx / spec.width, 80 + 30 * yy / spec.height, 110 + 0 * xx], -1)
  if second_shot:  # a warm, bright room instead of the cool one
    base = np.stack([200 + 0 * xx, 150 - 40 * yy / spec.height, 60 + 30 * xx / spec.width], -1)
  noise = rng.normal(0, 6, base.shape)
  return np.clip(base + noise, 0, 255).astype(np.uint8)


def render_frame(spec: VideoSpec, t: float, background: np.ndarray, sprite: Optional[np.ndarray],
                 cut_background: Optional[np.ndarray] = None, second: Optional[np.ndarray] = None) -> np.ndarray:
  frame = _draw_face(spec, t, background if cut_background is None or t < spec.cut_at else cut_background,
                     sprite, second)
  return cv2.GaussianBlur(frame, (0, 0), spec.blur_sigma) if spec.blur_sigma > 0 else frame


def _draw_face(spec: VideoSpec, t: float, background: np.ndarray, sprite: Optional[np.ndarray],
               second: Optional[np.ndarray]) -> np.ndarray:
  frame = background.copy()
  if second is not None:  # a silent listener, static in the right third
    sh, sw = second.shape[:2]
    sx, sy = max(0, int(spec.width * 0.75 - sw / 2)), max(0, (spec.height - sh) // 2)
    part = second[:spec.height - sy, :spec.width - sx]
    frame[sy:sy + part.shape[0], sx:sx + part.shape[1]] = part
  if sprite is None:
    return frame
  turn = spec.yaw_deg * t / spec.duration
  if turn:
    sprite = turn_sprite(sprite, turn, spec.face_scale)
  x, y = face_position(spec, t, sprite.shape)
  h, w = sprite.shape[:2]
  fy0, fx0 = max(0, y), max(0, x)
  fy1, fx1 = min(spec.height, y + h), min(spec.width, x + w)
  if fy1 <= fy0 or fx1 <= fx0:
    return frame
  frame[fy0:fy1, fx0:fx1] = sprite[fy0 - y:fy1 - y, fx0 - x:fx1 - x]
  scale = spec.face_scale
  opening = float(openness(spec, t))
  mouth_x = _turned_x(_MOUTH[0] * scale, turn, scale) if turn else _MOUTH[0] * scale
  centre = (int(x + mouth_x), int(y + _MOUTH[1] * scale))
  axes = (int(_MOUTH_HALF_WIDTH * scale), max(1, int((1.5 + 11 * opening) * scale)))
  cv2.ellipse(frame, centre, axes, 0, 0, 360, (70, 20, 30), -1)
  if opening > 0.3:
    teeth = (axes[0] - 3, max(1, axes[1] // 3))
    cv2.ellipse(frame, (centre[0], centre[1] - axes[1] + teeth[1]), teeth, 0, 0, 360, (230, 225, 220), -1)
  return frame


def speech_audio(spec: VideoSpec) -> np.ndarray:
  """Mono float32 voice-like bursts whose loudness follows the mouth, shifted by the sync offset."""
  n = int(round(spec.duration * spec.audio_rate))
  t = np.arange(n) / spec.audio_rate
  envelope = openness(spec, t - spec.sync_offset_frames / spec.fps)
  f0 = 140 + 15 * np.sin(2 * np.pi * 0.7 * t)
  phase = 2 * np.pi * np.cumsum(f0) / spec.audio_rate
  voice = sum(np.sin(k * phase) / k for k in range(1, 8))
  rng = np.random.default_rng(spec.seed + 1)
  return (0.25 * envelope * voice + 0.003 * rng.normal(size=n)).astype(np.float32)


def write_video(path: str, spec: VideoSpec) -> str:
  """Encode the talking clip as H.264 (+ AAC when `spec.audio`) mp4 at `path`."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  sprite = _sprite(spec.face_scale) if spec.face else None
  background = _background(spec)
  cut_background = _background(spec, second_shot=True) if spec.cut_at > 0 else None
  second = _sprite(spec.second_face_scale) if spec.second_face_scale > 0 else None
  rate = Fraction(spec.fps).limit_denominator(1001)
  with av.open(path, 'w') as out:
    video = out.add_stream('libx264', rate=rate)
    video.width, video.height, video.pix_fmt = spec.width, spec.height, 'yuv420p'
    video.options = {'crf': str(spec.crf), 'preset': 'ultrafast'}
    audio = None
    if spec.audio:
      audio = out.add_stream('aac', rate=spec.audio_rate)
      audio.layout = 'mono'
    frames = int(round(spec.duration * spec.fps))
    for index in range(frames):
      image = render_frame(spec, index / spec.fps, background, sprite, cut_background, second)
      frame = av.VideoFrame.from_ndarray(image, format='rgb24')
      frame.pts = index
      frame.time_base = 1 / rate
      out.mux(video.encode(frame))
    out.mux(video.encode())
    if audio is not None:
      samples = speech_audio(spec)
      block = 1024
      for offset in range(0, len(samples), block):
        chunk = samples[offset:offset + block]
        frame = av.AudioFrame.from_ndarray(chunk[None, :], format='flt', layout='mono')
        frame.sample_rate = spec.audio_rate
        frame.pts = offset
        frame.time_base = Fraction(1, spec.audio_rate)
        out.mux(audio.encode(frame))
      out.mux(audio.encode())
  return path


def write_demo_input(directory: str) -> str:
  """A demo source (12 s talking clip) plus a JSONL manifest with two annotated clips."""
  video = write_video(os.path.join(directory, 'demo_talking.mp4'),
                      VideoSpec(duration=12.0, width=960, height=540))
  manifest = os.path.join(directory, 'demo.jsonl')
  with open(manifest, 'w') as handle:
    handle.write(json.dumps({'id': 'demo', 'url': video, 'clips': [['00:00.5', '00:05.5'], [6.0, 11.5]]}) + '\n')
  return manifest
