"""SyncNet's inputs and read-out without the network: face crop, MFCC, offset/confidence, audio shift.

Written from the published method (Chung & Zisserman 2016, joonson/syncnet_python, read as a spec): 5 frames
of a 224 x 224 BGR face crop (0-255) per video window at 25 fps, 13 MFCCs at 100 Hz over the same 0.2 s per
audio window, distances between the two embeddings over audio shifts of +-15 frames. The pieces live here,
apart from torch, so the read-out is tested on embeddings with a known shift.
"""
from __future__ import annotations

import dataclasses
import io
import wave
from typing import Optional

import cv2
import numpy as np
from scipy import fft as sp_fft

FPS = 25.0  # SyncNet's video rate: one window is 5 frames (0.2 s), 4 MFCC frames per video frame
CROP_PX = 224
CROP_SCALE = 0.4  # syncnet_python's --crop_scale: the face box is widened by this and extended down to the chin
WINDOW_FRAMES = 5
MFCC_PER_FRAME = 4
MFCC_WINDOW = WINDOW_FRAMES * MFCC_PER_FRAME
AUDIO_RATE = 16000
VSHIFT = 15  # offsets searched, in 25 fps frames either way (syncnet_python's default)
PAD_GREY = 110  # syncnet_python pads the frame with this grey before cropping
FRAME_MEDIAN = 9  # the per-frame confidence is median-filtered over this many windows
EMBEDDING = 1024  # SyncNet's embedding size
LIP, AUDIO = 'lip', 'audio'  # the two kinds of SyncNet input (model_handlers/syncnet.py)


def crop_matrix(landmarks: np.ndarray) -> np.ndarray:
  """(2, 3) affine from an output frame to SyncNet's 224 x 224 crop, from the face's landmark box.

  syncnet_python's crop of a face box of half-size `bs` (the larger half-side) centred at (mx, my): x in
  mx +- bs(1 + cs), y from my - bs to my + bs(1 + 2cs), i.e. a square of side 2bs(1 + cs) whose centre sits
  bs*cs below the box centre, cs = 0.4. The mesh's bounding box stands in for the S3FD box.
  """
  pts = np.asarray(landmarks, np.float64)[:, :2]
  x0, y0 = np.nanmin(pts, 0)
  x1, y1 = np.nanmax(pts, 0)
  bs = max(x1 - x0, y1 - y0) / 2
  side = 2 * bs * (1 + CROP_SCALE)
  cx, cy = (x0 + x1) / 2, (y0 + y1) / 2 + bs * CROP_SCALE
  scale = CROP_PX / max(side, 1.0)
  return np.array([[scale, 0, CROP_PX / 2 - scale * cx], [0, scale, CROP_PX / 2 - scale * cy]], np.float64)


def face_crop(image: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
  """(224, 224, 3) uint8 BGR crop of an RGB output frame, SyncNet's video input (grey outside the frame)."""
  bgr = np.ascontiguousarray(image[:, :, ::-1])
  return cv2.warpAffine(bgr, crop_matrix(landmarks), (CROP_PX, CROP_PX), flags=cv2.INTER_AREA,
                        borderMode=cv2.BORDER_CONSTANT, borderValue=(PAD_GREY,) * 3)


def _hz_to_mel(hz):
  return 2595 * np.log10(1 + np.asarray(hz, np.float64) / 700.0)


def _mel_to_hz(mel):
  return 700 * (10 ** (np.asarray(mel, np.float64) / 2595.0) - 1)


def mfcc(samples: np.ndarray, rate: int = AUDIO_RATE, numcep: int = 13, nfilt: int = 26, nfft: int = 512,
         winlen: float = 0.025, winstep: float = 0.01, preemph: float = 0.97, lifter: int = 22) -> np.ndarray:
  """(frames, 13) MFCCs the way SyncNet was trained on (the python_speech_features defaults): pre-emphasis,
  25 ms rectangular frames every 10 ms, 512-point power spectrum, 26 mel filters, log, orthonormal DCT-II,
  sine lifter 22, and the first coefficient replaced by the log frame energy. `samples` in int16 units."""
  x = np.asarray(samples, np.float64)
  x = np.append(x[:1], x[1:] - preemph * x[:-1])
  length, step = int(round(winlen * rate)), int(round(winstep * rate))
  count = 1 if len(x) <= length else 1 + int(np.ceil((len(x) - length) / step))
  x = np.concatenate([x, np.zeros(max(0, (count - 1) * step + length - len(x)))])
  frames = x[np.arange(length)[None, :] + step * np.arange(count)[:, None]]
  power = np.abs(np.fft.rfft(frames, nfft)) ** 2 / nfft
  energy = power.sum(1)
  bins = np.floor((nfft + 1) * _mel_to_hz(np.linspace(0, _hz_to_mel(rate / 2), nfilt + 2)) / rate).astype(int)
  bank = np.zeros((nfilt, nfft // 2 + 1))
  for j in range(nfilt):
    lo, mid, hi = bins[j], bins[j + 1], bins[j + 2]
    bank[j, lo:mid] = (np.arange(lo, mid) - lo) / max(mid - lo, 1)
    bank[j, mid:hi] = (hi - np.arange(mid, hi)) / max(hi - mid, 1)
  tiny = np.finfo(float).eps
  feat = np.log(np.maximum(power @ bank.T, tiny))
  feat = sp_fft.dct(feat, type=2, axis=1, norm='ortho')[:, :numcep]
  feat *= 1 + (lifter / 2.0) * np.sin(np.pi * np.arange(numcep) / lifter)
  feat[:, 0] = np.log(np.maximum(energy, tiny))
  return feat.astype(np.float32)


def audio_windows(samples: np.ndarray, count: int) -> np.ndarray:
  """(count, 13, 20) MFCC windows: window i covers video frames i..i+4 (MFCC frames 4i..4i+19)."""
  feat = mfcc(samples).T
  return np.stack([feat[:, MFCC_PER_FRAME * i:MFCC_PER_FRAME * i + MFCC_WINDOW] for i in range(count)]) \
      if count > 0 else np.zeros((0, feat.shape[0], MFCC_WINDOW), np.float32)


def window_count(video_frames: int, audio_samples: int) -> int:
  """Windows syncnet_python scores: min(video frames, whole 40 ms audio frames) - 5 (every window complete)."""
  return max(0, min(video_frames, audio_samples // int(AUDIO_RATE / FPS)) - WINDOW_FRAMES)


@dataclasses.dataclass
class SyncResult:
  """SyncNet's read-out of one clip.

  `offset`: frames at 25 fps, SyncNet's sign (positive: the sound comes before the mouth, so the audio must be
  delayed by that much). `confidence` (LSE-C): median minus minimum of the mean distance over offsets;
  `min_dist` (LSE-D): the mean distance at the best offset. `frame_conf`: per window at that offset, median
  of the mean distances minus the window's distance, median-filtered over 9 windows (NaN where no face).
  """
  offset: int
  confidence: float
  min_dist: float
  frame_conf: np.ndarray
  windows: int


def window_distances(video: np.ndarray, audio: np.ndarray, vshift: int = VSHIFT) -> np.ndarray:
  """(N, 2 * vshift + 1) distances between each video window's embedding and the audio windows shifted by
  -vshift..vshift (zeros beyond the ends), as syncnet_python computes them; N = the shorter of the two."""
  n = min(len(video), len(audio))
  video, audio = np.asarray(video[:n], np.float64), np.asarray(audio[:n], np.float64)
  if n == 0:
    return np.zeros((0, 2 * vshift + 1))
  padded = np.concatenate([np.zeros((vshift, audio.shape[1])), audio, np.zeros((vshift, audio.shape[1]))])
  shifts = np.arange(2 * vshift + 1)
  return np.stack([np.linalg.norm(video[i][None] - padded[i + shifts] + 1e-6, axis=1) for i in range(n)])


def read_out(dists: np.ndarray, valid: Optional[np.ndarray] = None) -> Optional[SyncResult]:
  """Offset and confidence from per-window distances (N, 2 * vshift + 1) (`window_distances`), over the windows
  with a face (`valid`; rows of NaN count as without): syncnet_python's read-out. Kept apart from the distances
  so that a piece of a clip is read out from its own windows' rows. None when no window has a face."""
  dists = np.asarray(dists, np.float64)
  vshift = (dists.shape[1] - 1) // 2
  valid = (np.ones(len(dists), bool) if valid is None else np.asarray(valid, bool)) & ~np.isnan(dists).any(1)
  if not valid.any():
    return None
  mean = dists[valid].mean(0)
  best = int(np.argmin(mean))
  median = float(np.median(mean))
  frame_conf = np.where(valid, median - dists[:, best], np.nan)
  filtered = frame_conf.copy()
  if valid.sum() >= FRAME_MEDIAN:
    from scipy import signal  # here: importing scipy.signal costs every CLI start 0.4 s, and only this needs it
    filtered[valid] = signal.medfilt(frame_conf[valid], FRAME_MEDIAN)
  return SyncResult(offset=vshift - best, confidence=median - float(mean[best]), min_dist=float(mean[best]),
                    frame_conf=filtered.astype(np.float32), windows=int(valid.sum()))


def sync_offset(video: np.ndarray, audio: np.ndarray, valid: Optional[np.ndarray] = None,
                vshift: int = VSHIFT) -> Optional[SyncResult]:
  """Offset and confidence from per-window embeddings (N, D) of video and audio, as syncnet_python reads them:
  each video window against audio windows shifted by -vshift..vshift (zeros beyond the ends), the mean
  distance per shift over the windows with a face (`valid`). None when no window has a face."""
  dists = window_distances(video, audio, vshift)
  return read_out(dists, None if valid is None else np.asarray(valid)[:len(dists)])


def shift_samples(data: np.ndarray, shift: int) -> np.ndarray:
  """`data` (..., samples) played `shift` samples later (earlier when negative), same length, silence filled."""
  out = np.zeros_like(data)
  if abs(shift) >= data.shape[-1]:
    return out
  if shift >= 0:
    out[..., shift:] = data[..., :data.shape[-1] - shift]
  else:
    out[..., :shift] = data[..., -shift:]
  return out


def shift_wav(wav: bytes, seconds: float) -> bytes:
  """The 16-bit PCM wav with its sound `seconds` later (earlier when negative), same length."""
  with wave.open(io.BytesIO(wav)) as handle:
    params = handle.getparams()
    data = np.frombuffer(handle.readframes(params.nframes), '<i2').reshape(-1, params.nchannels).T
  shifted = shift_samples(data, int(round(seconds * params.framerate)))
  out = io.BytesIO()
  with wave.open(out, 'wb') as handle:
    handle.setparams(params)
    handle.writeframes(np.ascontiguousarray(shifted.T).astype('<i2').tobytes())
  return out.getvalue()


def shift_mp4_audio(src: str, dst: str, seconds: float) -> None:
  """Copy the mp4 `src` to `dst` with its audio `seconds` later (earlier when negative), same length: the
  video packets are copied as they are, the audio is decoded, shifted (silence filled) and encoded again."""
  import av
  with av.open(src) as container:
    vin = container.streams.video[0]
    ain = container.streams.audio[0]
    rate, layout = ain.rate, ain.layout.name
    resampler = av.AudioResampler(format='fltp', layout=layout, rate=rate)
    chunks = [f.to_ndarray() for frame in container.decode(ain) for f in resampler.resample(frame)]
    chunks += [f.to_ndarray() for f in resampler.resample(None)]
    sound = shift_samples(np.concatenate(chunks, axis=1), int(round(seconds * rate)))
    container.seek(0)
    with av.open(dst, 'w', format='mp4', options={'movflags': '+faststart'}) as out:
      vout = out.add_stream_from_template(vin)
      aout = out.add_stream('aac', rate=rate)
      aout.layout = layout
      for packet in container.demux(vin):
        if packet.dts is None:
          continue
        packet.stream = vout
        out.mux(packet)
      frame = av.AudioFrame.from_ndarray(np.ascontiguousarray(sound, np.float32), format='fltp', layout=layout)
      frame.sample_rate, frame.pts = rate, 0
      out.mux(aout.encode(frame))
      out.mux(aout.encode(None))
