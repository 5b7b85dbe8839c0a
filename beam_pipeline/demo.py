"""Generated talking-head media: the embedded demo input and the test fixtures.

The face is a real portrait (scikit-image's astronaut photo) that drifts across
the frame while its mouth opens and closes with syllable-like audio bursts, so
face detection, cropping and audio-visual sync have something true to find.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import zipfile
from fractions import Fraction
from typing import Dict, Optional, Tuple

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
# The eye openings (image-left eye first), measured like the constants above: the landmarker on _sprite(2.0),
# points halved. Centre x, y (between the corners 33/133 and 263/362 and the lids 159/145 and 386/374), half
# width, half height (corner to corner, lid to lid) and tilt in degrees (the line from outer to inner corner).
_EYES = ((144.7, 102.1, 9.3, 3.25, 8.9), (186.0, 104.1, 9.4, 3.05, -2.7))
_IRIS_RADIUS = 4.3  # the landmarker's iris contour (469-472, 474-477) lies 4.1 px from its centre
_EYEBALL_RADIUS = 8.0  # the iris centre turns on a sphere this large (an eye's width is about its diameter)
_SACCADE_S = 0.05  # how long the eyes take to jump from one fixation to the next
_SCLERA, _IRIS, _LIMBUS, _PUPIL = (225, 208, 202), (110, 72, 45), (45, 30, 24), (12, 8, 8)


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
  second_face_speaks: bool = False  # the second face's mouth moves with the audio, the main face's stays shut
  face_gone: Tuple[float, float] = ()  # the face slides out before this interval and back in after
  cut_at: float = 0.0  # > 0: a hard shot change here (other background, face elsewhere)
  irregular_speech: bool = False  # syllables at random times, so a sync offset has one true lag
  gaze_deg: float = 0.0  # > 0: drawn irises look around (saccades), up to this far off the camera axis


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


@functools.lru_cache(maxsize=16)
def _fixations(seed: int, duration: float) -> Tuple[np.ndarray, np.ndarray]:
  """Fixation start times and (yaw, pitch) targets as fractions of `gaze_deg`: 0.3-0.7 s each, every other one
  back at the camera, the others off to a random side (half as far up or down as sideways, like real gaze)."""
  rng = np.random.default_rng(seed + 23)
  starts, targets, t = [], [], 0.0
  while t < duration:
    if len(starts) % 2:
      angle, reach = rng.uniform(0, 2 * np.pi), rng.uniform(0.6, 1.0)
      targets.append((reach * math.cos(angle), 0.5 * reach * math.sin(angle)))
    else:
      targets.append(tuple(rng.normal(0, 0.05, 2)))
    starts.append(t)
    t += rng.uniform(0.3, 0.7)
  return np.array(starts), np.array(targets)


def gaze(spec: VideoSpec, t: float) -> Tuple[float, float]:
  """Gaze yaw (+: towards image right) and pitch (+: down) in degrees at time t; (0, 0) without `gaze_deg`."""
  if spec.gaze_deg <= 0:
    return 0.0, 0.0
  starts, targets = _fixations(spec.seed, spec.duration)
  k = max(0, int(np.searchsorted(starts, t, side='right')) - 1)
  previous = targets[k - 1] if k else targets[0]
  progress = min(1.0, (t - starts[k]) / _SACCADE_S)
  yaw, pitch = spec.gaze_deg * (previous + progress * progress * (3 - 2 * progress) * (targets[k] - previous))
  return float(yaw), float(pitch)


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
    if spec.second_face_speaks:
      _draw_mouth(frame, (int(sx + _MOUTH[0] * spec.second_face_scale), int(sy + _MOUTH[1] * spec.second_face_scale)),
                  spec.second_face_scale, float(openness(spec, t)))
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
  opening = 0.0 if spec.second_face_speaks else float(openness(spec, t))
  mouth_x = _turned_x(_MOUTH[0] * scale, turn, scale) if turn else _MOUTH[0] * scale
  _draw_mouth(frame, (int(x + mouth_x), int(y + _MOUTH[1] * scale)), scale, opening)
  if spec.gaze_deg > 0:
    _draw_eyes(frame, (x, y), scale, turn, gaze(spec, t))
  return frame


def _draw_mouth(frame: np.ndarray, centre: Tuple[int, int], scale: float, opening: float) -> None:
  axes = (int(_MOUTH_HALF_WIDTH * scale), max(1, int((1.5 + 11 * opening) * scale)))
  cv2.ellipse(frame, centre, axes, 0, 0, 360, (70, 20, 30), -1)
  if opening > 0.3:
    teeth = (axes[0] - 3, max(1, axes[1] // 3))
    cv2.ellipse(frame, (centre[0], centre[1] - axes[1] + teeth[1]), teeth, 0, 0, 360, (230, 225, 220), -1)


def _draw_eyes(frame: np.ndarray, origin: Tuple[int, int], scale: float, turn: float,
               gaze_deg: Tuple[float, float]) -> None:
  """Irises (limbus ring, pupil) looking `gaze_deg` (yaw, pitch), painted over each eye opening of the sprite
  placed at `origin` (its whites repainted first, covering the photo's own iris), clipped by the lids.
  Anti-aliased, so sub-pixel gaze moves show."""
  yaw, pitch = (math.radians(a) for a in gaze_deg)

  def turned(sprite_x: float) -> float:
    return _turned_x(sprite_x, turn, scale) if turn else sprite_x

  for cx, cy, half_w, half_h, tilt in _EYES:
    ex = origin[0] + turned(cx * scale)
    ey = origin[1] + cy * scale
    a = max(1.0, (turned((cx + half_w) * scale) - turned((cx - half_w) * scale)) / 2)
    b = half_h * scale
    ix = origin[0] + turned((cx + _EYEBALL_RADIUS * math.sin(yaw)) * scale)
    iy = ey + _EYEBALL_RADIUS * scale * math.sin(pitch)
    reach = int(math.ceil(a + 2))
    x0, x1 = max(0, int(ex) - reach), min(frame.shape[1], int(ex) + reach + 1)
    y0, y1 = max(0, int(ey) - reach), min(frame.shape[0], int(ey) + reach + 1)
    if x1 <= x0 or y1 <= y0:
      continue
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    cos_t, sin_t = math.cos(math.radians(tilt)), math.sin(math.radians(tilt))
    u = ((xx - ex) * cos_t + (yy - ey) * sin_t) / a
    v = (-(xx - ex) * sin_t + (yy - ey) * cos_t) / b
    # Pixels from the lid line: the ellipse's implicit function over its gradient's length.
    inside = (1 - u * u - v * v) / np.maximum(2 * np.sqrt((u / a) ** 2 + (v / b) ** 2), 1e-3)
    opening = np.clip(inside + 0.5, 0, 1)[..., None]
    radius = _IRIS_RADIUS * scale
    d = np.sqrt((xx - ix) ** 2 + (yy - iy) ** 2)
    ring = np.clip((d / radius - 0.6) / 0.4, 0, 1)[..., None]
    iris = np.clip(radius - d + 0.5, 0, 1)[..., None]
    pupil = np.clip(0.4 * radius - d + 0.5, 0, 1)[..., None]
    colour = np.float32(_IRIS) + ring * (np.float32(_LIMBUS) - np.float32(_IRIS))
    colour = colour + pupil * (np.float32(_PUPIL) - colour)
    eye = np.float32(_SCLERA) + iris * (colour - np.float32(_SCLERA))
    eye = eye * (0.8 + 0.2 * np.clip(v + 0.5, 0, 1))[..., None]  # the upper lid's shadow
    patch = frame[y0:y1, x0:x1].astype(np.float32)
    frame[y0:y1, x0:x1] = np.clip(patch + opening * (eye - patch) + 0.5, 0, 255).astype(np.uint8)


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


def write_frame_folders(path: str, folders: Dict[str, VideoSpec]) -> str:
  """A VFHQ-style zip at `path`: {folder name: VideoSpec} as `<folder>/<NNNNN>.jpg`, one frame each (JPEG
  quality 95: a tenth of PNG's size on the noisy background). Fixed member times, so the same specs give the
  same bytes (the frame listing is named by content)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with zipfile.ZipFile(path, 'w') as archive:
    for folder, spec in folders.items():
      background, sprite = _background(spec), _sprite(spec.face_scale)
      for index in range(int(round(spec.duration * spec.fps))):
        image = render_frame(spec, index / spec.fps, background, sprite)
        ok, data = cv2.imencode('.jpg', cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 95])
        assert ok, 'JPEG encoding failed'
        archive.writestr(zipfile.ZipInfo(f'{folder}/{index:05d}.jpg', date_time=(1980, 1, 1, 0, 0, 0)),
                         data.tobytes())
  return path


def _manifest(directory: str, video: str, clips) -> str:
  manifest = os.path.join(directory, 'demo.jsonl')
  with open(manifest, 'w') as handle:
    handle.write(json.dumps({'id': 'demo', 'url': video, **({'clips': clips} if clips else {})}) + '\n')
  return manifest


def write_demo_input(directory: str, recipe: str = 'hdtf') -> str:
  """The input `python -m beam_pipeline --recipe=RECIPE` runs on without --input; returns its path.

  hdtf: a 12 s 960x540 talking clip plus a JSONL manifest with two annotated clips; nerf and avatar: the same
  at 6 s (one subject of two clips). megactor: a VFHQ-style zip of two 3 s frame folders whose eyes look
  around (its eye-motion filter rejects still eyes). mmvox: a 5 s 1080p clip whose face is big enough
  for a face tube (>= 256 source px, >= 64 frames at 25 fps), the whole video one clip.
  """
  if recipe == 'megactor':
    folders = {f'Clip+demo+P{person}': VideoSpec(duration=3.0, width=512, height=512, audio=False,
                                                 face_scale=1.5, motion_px=12.0, seed=person, gaze_deg=25.0)
               for person in range(2)}
    return write_frame_folders(os.path.join(directory, 'demo_frames.zip'), folders)
  if recipe == 'mmvox':
    video = write_video(os.path.join(directory, 'demo_talking_1080p.mp4'),
                        VideoSpec(duration=5.0, width=1920, height=1080, face_scale=2.5))
    return _manifest(directory, video, None)
  if recipe in ('nerf', 'avatar'):  # per-frame parsing, matting and fitting: half the hdtf demo's length
    video = write_video(os.path.join(directory, 'demo_talking.mp4'), VideoSpec(duration=6.0, width=960, height=540))
    return _manifest(directory, video, [['00:00.5', '00:03.0'], [3.25, 5.75]])
  video = write_video(os.path.join(directory, 'demo_talking.mp4'), VideoSpec(duration=12.0, width=960, height=540))
  return _manifest(directory, video, [['00:00.5', '00:05.5'], [6.0, 11.5]])
