"""Audio features aligned to video frames, as AD-NeRF / RAD-NeRF / ER-NeRF train on them.

Every kind ends in the same layout: per video frame, a window of 16 feature steps centred on the frame's
timestamp, zero-padded past either end of the audio -> (N, 16, D). As in AD-NeRF's DeepSpeech windows, the
features are first brought to two steps per video frame (linear interpolation at the step timestamps; at
25 fps the 50 Hz features pass unchanged, which is what RAD-NeRF / ER-NeRF's `reshape(-1, 2, 1024)` assumes),
so a window always spans 8 frames whatever the frame rate.

Kinds:
- `mel`: 80-bin log-mel spectrogram at 50 steps/s (hop 320, 400-sample Hann window, 512-point FFT), pure
  numpy; needs no weights (the offline default).
- `hubert`: the last hidden state of a user-supplied HuBERT (`transformers` directory saved with
  `save_pretrained`, e.g. facebook/hubert-large-ls960-ft: 1024 values at 50 Hz), computed as RAD-NeRF's
  `get_hubert_from_16k_speech` does: the whole utterance normalised once, then cut into 20 s chunks that
  overlap by the CNN's kernel minus stride (80 samples), so the chunks' steps join without a gap or a repeat.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Dict, Iterable, Optional, Sequence

import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from model_handlers.in_process import ModelError
from model_handlers.torch_handler import pick_device
from model_handlers.weights import WeightsError, local_copy, require_files

SAMPLE_RATE = 16000
STEPS_PER_S = 50  # mel hop and HuBERT's CNN stride (320 samples) at 16 kHz
WINDOW = 16  # feature steps per video frame
STEPS_PER_FRAME = 2
KINDS = ('mel', 'hubert')

MEL_BINS = 80
MEL_HOP = SAMPLE_RATE // STEPS_PER_S
MEL_WIN = 400
MEL_FFT = 512
MEL_FLOOR = 1e-10  # power floor before the log: digital silence is log10(1e-10) = -10, not -inf

HUBERT_FLAG = '--hubert_model'
HUBERT_WHAT = ('a HuBERT model folder saved with transformers\' save_pretrained (config.json with model_type '
               '"hubert" and model.safetensors or pytorch_model.bin), e.g. facebook/hubert-large-ls960-ft')
HUBERT_KERNEL = 400  # HuBERT's CNN is one conv of kernel 400 and stride 320 samples
HUBERT_STRIDE = 320
HUBERT_CHUNK_STEPS = 1000  # 20 s per forward pass, as RAD-NeRF
HUBERT_BATCH_SIZES = {'cuda': 8, 'cpu': 1}  # 20 s chunks run at once


class AudioFeatureError(RuntimeError):
  """The feature model failed on this audio (a model error, not bad input); `detail` says how."""

  def __init__(self, detail: str):
    super().__init__(detail)
    self.detail = detail


def _hz_to_mel(hz):
  return 2595.0 * np.log10(1.0 + np.asarray(hz, np.float64) / 700.0)


def _mel_to_hz(mel):
  return 700.0 * (10.0 ** (np.asarray(mel, np.float64) / 2595.0) - 1.0)


@functools.lru_cache(maxsize=4)
def mel_filterbank(rate: int = SAMPLE_RATE, n_fft: int = MEL_FFT, bins: int = MEL_BINS) -> np.ndarray:
  """(bins, n_fft // 2 + 1) triangular filters evenly spaced on the HTK mel scale from 0 Hz to Nyquist,
  each normalised to unit area (Slaney's normalisation) so wide high filters do not dominate."""
  edges = _mel_to_hz(np.linspace(0.0, _hz_to_mel(rate / 2), bins + 2))
  freqs = np.linspace(0.0, rate / 2, n_fft // 2 + 1)
  lower, centre, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
  rising = (freqs[None] - lower) / (centre - lower)
  falling = (upper - freqs[None]) / (upper - centre)
  weights = np.maximum(0.0, np.minimum(rising, falling))
  return (weights * (2.0 / (upper - lower))).astype(np.float32)


def log_mel(pcm: np.ndarray, rate: int = SAMPLE_RATE) -> np.ndarray:
  """(S, 80) float32 log10 mel power of mono float PCM in [-1, 1]; step j is centred on sample j * 320
  (time j / 50 s), S = 1 + len(pcm) // 320."""
  if rate != SAMPLE_RATE:
    raise ValueError(f'log_mel expects {SAMPLE_RATE} Hz audio, got {rate} Hz')
  pcm = np.asarray(pcm, np.float32).reshape(-1)
  padded = np.pad(pcm, MEL_FFT // 2)  # frames centred on their step (zeros beyond the ends)
  steps = 1 + len(pcm) // MEL_HOP
  frames = np.lib.stride_tricks.sliding_window_view(padded, MEL_FFT)[::MEL_HOP][:steps]
  window = np.zeros(MEL_FFT, np.float32)
  start = (MEL_FFT - MEL_WIN) // 2
  window[start:start + MEL_WIN] = np.hanning(MEL_WIN + 1)[:-1]  # periodic Hann, centred in the FFT frame
  power = np.abs(np.fft.rfft(frames * window, axis=1)) ** 2
  return np.log10(np.maximum(power.astype(np.float32) @ mel_filterbank().T, MEL_FLOOR)).astype(np.float32)


def to_frame_rate(features: np.ndarray, steps_per_s: float, num_frames: int, fps: float) -> np.ndarray:
  """(2 * num_frames, D): `features` (step j at j / steps_per_s s) linearly interpolated at two steps per
  video frame (step k at k / (2 fps) s); past the last step the last value holds (AD-NeRF's
  `interpolate_features`)."""
  features = np.asarray(features, np.float32)
  wanted = STEPS_PER_FRAME * num_frames
  if len(features) == 0:
    return np.zeros((wanted, features.shape[1]), np.float32)
  rate = STEPS_PER_FRAME * fps
  if abs(rate - steps_per_s) < 1e-9 and len(features) >= wanted:
    return features[:wanted].copy()
  position = np.clip(np.arange(wanted) / rate * steps_per_s, 0, len(features) - 1)
  below = np.floor(position).astype(np.int64)
  above = np.minimum(below + 1, len(features) - 1)
  weight = (position - below)[:, None].astype(np.float32)
  return features[below] * (1 - weight) + features[above] * weight


def frame_windows(features: np.ndarray, steps_per_s: float, num_frames: int, fps: float,
                  window: int = WINDOW) -> np.ndarray:
  """(num_frames, window, D): for frame i, steps c - window/2 ... c + window/2 - 1 where c is the step at
  the frame's timestamp (round(i / fps * steps_per_s)); steps outside the features are zeros."""
  features = np.asarray(features, np.float32)
  half = window // 2
  centres = np.rint(np.arange(num_frames) / fps * steps_per_s).astype(np.int64)
  end = int(centres.max(initial=0)) + window  # one past the last padded index any window reads
  tail = max(0, end - half - len(features))
  padded = np.concatenate([np.zeros((half, features.shape[1]), np.float32), features,
                           np.zeros((tail, features.shape[1]), np.float32)])
  return padded[centres[:, None] + np.arange(window)[None]]  # padded index c + k is step c - half + k


class HubertHandler(ModelHandler[np.ndarray, PredictionResult, Any]):
  """16 kHz mono float PCM -> PredictionResult with HuBERT's last hidden state, (S, D) float32 at 50 Hz,
  S = (len(pcm) - 80) // 320 (RAD-NeRF's count). One element is a whole utterance; its 20 s chunks are
  batched inside `run_inference`."""

  model_name = 'hubert'

  def __init__(self, model_dir: str, device: str = 'auto', batch_sizes: Optional[Dict[str, int]] = None,
               chunk_steps: int = HUBERT_CHUNK_STEPS):
    super().__init__()
    self.model_dir = model_dir
    self._device_name = device
    self._batch_sizes = dict(HUBERT_BATCH_SIZES, **(batch_sizes or {}))
    self._chunk_steps = chunk_steps
    self.device = None

  def load_model(self):
    from transformers import HubertModel
    check_hubert_dir(self.model_dir)
    self.local_dir = local_copy(self.model_dir, HUBERT_FLAG, HUBERT_WHAT)  # a gs:// folder: once per machine
    self.device = pick_device(self._device_name)
    safetensors = os.path.exists(os.path.join(self.local_dir, 'model.safetensors'))
    try:
      # A HubertForCTC checkpoint loads too: its `hubert.` weights are the base model, the CTC head is dropped.
      model = HubertModel.from_pretrained(self.local_dir, local_files_only=True, use_safetensors=safetensors)
    except Exception as error:  # pylint: disable=broad-except  # transformers raises many kinds here
      raise WeightsError(HUBERT_FLAG, self.model_dir, f'could not load as {HUBERT_WHAT}: '
                         f'{type(error).__name__}: {str(error)[:300]}') from error
    return model.float().to(self.device).eval()  # float32 whatever the checkpoint's dtype

  def run_inference(self, batch: Sequence[np.ndarray], model,
                    inference_args: Optional[Dict[str, Any]] = None) -> Iterable[PredictionResult]:
    if self.device is None:
      self.device = pick_device(self._device_name)
    normalise = _normalises(self.model_dir)
    for pcm in batch:
      yield PredictionResult(pcm, self._features(model, np.asarray(pcm, np.float32).reshape(-1), normalise))

  def _features(self, model, pcm: np.ndarray, normalise: bool) -> np.ndarray:
    import torch
    if normalise and len(pcm):  # Wav2Vec2FeatureExtractor's zero_mean_unit_var_norm over the whole utterance
      pcm = (pcm - pcm.mean()) / np.sqrt(pcm.var() + 1e-7)
    expected = max(0, (len(pcm) - (HUBERT_KERNEL - HUBERT_STRIDE)) // HUBERT_STRIDE)
    hidden = model.config.hidden_size
    clip = HUBERT_STRIDE * self._chunk_steps
    chunk_len = clip - HUBERT_STRIDE + HUBERT_KERNEL
    full = len(pcm) // clip
    pieces = [pcm[i * clip:i * clip + chunk_len] for i in range(full)]
    # A chunk running to the very end is shorter than chunk_len; it goes alone, like the remainder.
    equal = [p for p in pieces if len(p) == chunk_len]
    rest = [p for p in pieces if len(p) != chunk_len] + [pcm[full * clip:]]
    rest = [p for p in rest if len(p) >= HUBERT_KERNEL]
    outputs = []
    step = self._batch_sizes[self.device.type]
    with torch.inference_mode():
      for first in range(0, len(equal), step):
        inputs = torch.from_numpy(np.stack(equal[first:first + step])).to(self.device)
        outputs += list(model(inputs).last_hidden_state.float().cpu().numpy())
      for piece in rest:
        inputs = torch.from_numpy(np.ascontiguousarray(piece)[None]).to(self.device)
        outputs.append(model(inputs).last_hidden_state[0].float().cpu().numpy())
    features = np.concatenate(outputs) if outputs else np.zeros((0, hidden), np.float32)
    if len(features) < expected:  # ER-NeRF pads the (at most one) missing step with zeros
      features = np.concatenate([features, np.zeros((expected - len(features), hidden), np.float32)])
    return features[:expected].astype(np.float32)

  def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
    return sum(np.asarray(pcm).nbytes for pcm in batch)

  def batch_elements_kwargs(self) -> Dict[str, Any]:
    return {'max_batch_size': 1}  # one utterance (of any length) per call; its chunks form the batch

  def get_metrics_namespace(self) -> str:
    return 'audio_features'


def check_hubert_dir(model_dir: Optional[str]) -> str:
  """`model_dir` (local or gs://) when it holds a HuBERT config and weights; else a WeightsError naming
  --hubert_model (call when the graph is built, so a wrong path fails before any work)."""
  require_files(model_dir, ('config.json',), HUBERT_FLAG, HUBERT_WHAT)
  try:
    with FileSystems.open(FileSystems.join(model_dir, 'config.json')) as handle:
      model_type = json.loads(handle.read()).get('model_type')
  except (OSError, ValueError) as error:
    raise WeightsError(HUBERT_FLAG, model_dir, f'config.json is unreadable ({error}); it should be {HUBERT_WHAT}')
  if model_type != 'hubert':
    raise WeightsError(HUBERT_FLAG, model_dir, f'config.json is for model_type {model_type!r}, not "hubert"')
  weights = ('model.safetensors', 'pytorch_model.bin', 'model.safetensors.index.json',
             'pytorch_model.bin.index.json')
  if not any(FileSystems.exists(FileSystems.join(model_dir, name)) for name in weights):
    raise WeightsError(HUBERT_FLAG, model_dir, f'no weights file ({", ".join(weights[:2])}); it should be '
                       f'{HUBERT_WHAT}')
  return model_dir


def _normalises(model_dir: str) -> bool:
  """Whether the model's feature extractor normalises the waveform (preprocessor_config.json's do_normalize);
  without that file, True, as facebook/hubert-large-ls960-ft's extractor does."""
  path = FileSystems.join(model_dir, 'preprocessor_config.json')
  if not FileSystems.exists(path):
    return True
  with FileSystems.open(path) as handle:
    return bool(json.loads(handle.read()).get('do_normalize', True))


def audio_features(kind: str, pcm: np.ndarray, num_frames: int, fps: float, hubert_model=None) -> np.ndarray:
  """(num_frames, 16, D) float32 windows for 16 kHz mono float PCM: D = 80 for `mel`, the model's hidden
  size for `hubert` (1024 for large). `hubert_model` is a set-up `SharedModel(HubertHandler(...))`
  (one model per worker process); its failure is an `AudioFeatureError`."""
  if kind == 'mel':
    features = log_mel(pcm)
  elif kind == 'hubert':
    if hubert_model is None:
      raise ValueError('audio features of kind hubert need a HuBERT model (--hubert_model)')
    features = hubert_model.infer([np.asarray(pcm, np.float32)])[0]
    if isinstance(features, ModelError):
      raise AudioFeatureError(features.detail)
  else:
    raise ValueError(f'audio feature kind {kind!r} is not one of {KINDS}')
  per_frame = to_frame_rate(features, STEPS_PER_S, num_frames, fps)
  return frame_windows(per_frame, STEPS_PER_FRAME * fps, num_frames, fps)
