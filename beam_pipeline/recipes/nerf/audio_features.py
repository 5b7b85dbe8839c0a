"""Audio features aligned to video frames, written as AD-NeRF / RAD-NeRF / ER-NeRF's loaders open them.

Every model's features are first brought to two steps per video frame (linear interpolation at the step
timestamps; at 25 fps the 50 Hz features pass unchanged, as AD-NeRF's `interpolate_features` and ER-NeRF's
`reshape(-1, 2, 1024)` assume). Most trainers then read per video frame a window of 16 steps centred on the
frame's timestamp, zero-padded past either end of the audio -> (N, 16, D) (AD-NeRF's DeepSpeech windows,
RAD-NeRF's `F.unfold` of its wav2vec logits); ER-NeRF reads HuBERT as the frame's own two steps, (N, 2, D).

Kinds, and the files they are written as (`trainer_files`):
- `mel` -> `audio_mel.npy` (N, 16, 80): 80-bin log-mel at 50 steps/s (hop 320, 400-sample Hann window,
  512-point FFT), pure numpy, no weights (the offline default). No trainer's network takes it as it is; the name
  is none of theirs, so no loader mistakes it for a model's.
- `hubert` -> `aud_hu.npy` (N, 2, D): the last hidden state of a HuBERT (facebook/hubert-large-ls960-ft, D 1024),
  as ER-NeRF's `data_utils/hubert.py`: the whole utterance normalised once, then cut into 20 s chunks that
  overlap by the CNN's kernel minus stride (80 samples), so the chunks' steps join without a gap or a repeat.
- `wav2vec` -> `aud_eo.npy` (N, 16, C): the CTC logits of a wav2vec2 model (C = its vocabulary: 44 for
  cpierse/wav2vec2-large-xlsr-53-esperanto, the one RAD-NeRF and ER-NeRF name `aud_eo`), in the same chunks.
- `deepspeech` -> `aud_ds.npy` (RAD-NeRF / ER-NeRF) and `aud.npy` (AD-NeRF), (N, 16, 29): the logits of
  DeepSpeech 0.1.0's frozen graph (`output_graph.pb`) run through TensorFlow on AD-NeRF's input (26 MFCCs every
  10 ms, every second one kept, 9 steps of context either side, normalised over the utterance).
"""
from __future__ import annotations

import functools
import json
import os
import re
from typing import Any, Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from model_handlers.in_process import ModelError
from model_handlers.torch_handler import pick_device
from model_handlers.weights import WeightsError, is_remote, local_copy, read_weights, require, require_files

SAMPLE_RATE = 16000
STEPS_PER_S = 50  # mel hop, the transformers models' CNN stride (320 samples) and DeepSpeech's step at 16 kHz
WINDOW = 16  # feature steps per video frame
STEPS_PER_FRAME = 2
KINDS = ('mel', 'hubert', 'wav2vec', 'deepspeech')
# The files each kind is written as: the names the trainers' loaders open (ER-NeRF and RAD-NeRF pick them by
# their --asr_model: 'hubert' -> aud_hu, 'esperanto' -> aud_eo, 'deepspeech' -> aud_ds; AD-NeRF always aud.npy).
FILES = {'mel': ('audio_mel.npy',), 'hubert': ('aud_hu.npy',), 'wav2vec': ('aud_eo.npy',),
         'deepspeech': ('aud_ds.npy', 'aud.npy')}

MEL_BINS = 80
MEL_HOP = SAMPLE_RATE // STEPS_PER_S
MEL_WIN = 400
MEL_FFT = 512
MEL_FLOOR = 1e-10  # power floor before the log: digital silence is log10(1e-10) = -10, not -inf

HUBERT_FLAG = '--hubert_model'
HUBERT_WHAT = ('a HuBERT model: a folder saved with transformers\' save_pretrained (config.json with model_type '
               '"hubert" and model.safetensors or pytorch_model.bin) or a model hub name such as '
               'facebook/hubert-large-ls960-ft')
WAV2VEC_FLAG = '--wav2vec_model'
WAV2VEC_WHAT = ('a wav2vec2 CTC model: a folder saved with transformers\' save_pretrained (config.json with '
                'model_type "wav2vec2" and architectures Wav2Vec2ForCTC, and its weights) or a model hub name such '
                'as cpierse/wav2vec2-large-xlsr-53-esperanto')
DEEPSPEECH_FLAG = '--deepspeech_model'
DEEPSPEECH_WHAT = ('DeepSpeech 0.1.0\'s frozen TensorFlow graph, output_graph.pb (tensors input_node, input_lengths '
                   'and logits), as AD-NeRF\'s deepspeech_features uses it; it needs the [deepspeech] extra '
                   '(tensorflow-cpu, python_speech_features)')
CHUNK_STEPS = 1000  # 20 s per forward pass, as ER-NeRF / RAD-NeRF's HuBERT script
BATCH_SIZES = {'cuda': 8, 'cpu': 1}  # 20 s chunks run at once
WEIGHT_FILES = ('model.safetensors', 'pytorch_model.bin', 'model.safetensors.index.json',
                'pytorch_model.bin.index.json')
HUB_NAME = re.compile(r'[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*')  # owner/name, as the model hub spells them

DS_CEPSTRA = 26  # AD-NeRF's DeepSpeech input: 26 MFCCs per 10 ms step, every second step kept (50 Hz) ...
DS_CONTEXT = 9  # ... with 9 steps of context either side: 19 x 26 = 494 values per step
DS_LETTERS = 29  # DeepSpeech 0.1.0's alphabet (a-z, space, apostrophe, blank)


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


def is_hub_name(model: Optional[str]) -> bool:
  """Whether `model` names a model on the hub (owner/name) rather than a folder: it is not one on this machine."""
  return bool(model) and not is_remote(model) and not os.path.exists(model) and bool(HUB_NAME.fullmatch(model))


def _hub_json(name: str, filename: str) -> Optional[dict]:
  """`filename` of hub model `name` (from the local hub cache, or downloaded as transformers would); None when
  the hub (or its cache) does not have it."""
  from huggingface_hub import hf_hub_download
  try:
    with open(hf_hub_download(name, filename), encoding='utf-8') as handle:
      return json.load(handle)
  except Exception:  # pylint: disable=broad-except  # offline, unknown repo, no such file: all mean "not there"
    return None


def _folder_json(model: str, filename: str) -> Optional[dict]:
  if is_hub_name(model):
    return _hub_json(model, filename)
  path = FileSystems.join(model, filename)
  if not FileSystems.exists(path):
    return None
  with FileSystems.open(path) as handle:
    return json.loads(handle.read())


def check_transformers_model(model: Optional[str], flag: str, what: str, model_type: str,
                             architecture: Optional[str] = None) -> str:
  """`model` when it is a folder (local or gs://, holding weights) or a model hub name whose config.json is for
  `model_type` (and `architecture`); else a WeightsError naming `flag` (call when the graph is built, so a wrong
  path fails before any work). A hub name is checked through the hub's client (the hub, or its local cache)."""
  if is_hub_name(model):
    config = _hub_json(model, 'config.json')
    if config is None:
      raise WeightsError(flag, model, f'no such folder, and the model hub (or its local cache) has no config.json '
                         f'for that name; it should be {what}')
  else:
    require_files(model, ('config.json',), flag, what)
    try:
      config = _folder_json(model, 'config.json')
    except (OSError, ValueError) as error:
      raise WeightsError(flag, model, f'config.json is unreadable ({error}); it should be {what}')
    if not any(FileSystems.exists(FileSystems.join(model, name)) for name in WEIGHT_FILES):
      raise WeightsError(flag, model, f'no weights file ({", ".join(WEIGHT_FILES[:2])}); it should be {what}')
  if config.get('model_type') != model_type:
    raise WeightsError(flag, model, f'config.json is for model_type {config.get("model_type")!r}, not '
                       f'"{model_type}"')
  if architecture and architecture not in (config.get('architectures') or ()):
    raise WeightsError(flag, model, f'config.json\'s architectures are {config.get("architectures")}, without '
                       f'{architecture} (the CTC head whose logits are the features)')
  return model


def check_hubert_dir(model: Optional[str]) -> str:
  return check_transformers_model(model, HUBERT_FLAG, HUBERT_WHAT, 'hubert')


def check_wav2vec_dir(model: Optional[str]) -> str:
  return check_transformers_model(model, WAV2VEC_FLAG, WAV2VEC_WHAT, 'wav2vec2', 'Wav2Vec2ForCTC')


def check_deepspeech_graph(path: Optional[str]) -> str:
  require(path, DEEPSPEECH_FLAG, DEEPSPEECH_WHAT)
  _deepspeech_modules(path)
  return path


def _receptive_field(config) -> Tuple[int, int]:
  """(kernel, stride) in samples of the model's convolutional front end as one convolution (400 and 320 for
  HuBERT and wav2vec2): T = (samples - kernel) // stride + 1 steps."""
  kernel, stride = 1, 1
  for size, step in zip(config.conv_kernel, config.conv_stride):
    kernel += (size - 1) * stride
    stride *= step
  return kernel, stride


class _TransformersAudioHandler(ModelHandler[np.ndarray, PredictionResult, Any]):
  """16 kHz mono float PCM -> PredictionResult with the model's 50 Hz output, (S, D) float32 with
  S = (len(pcm) - 80) // 320 (ER-NeRF's count). One element is a whole utterance; its 20 s chunks are batched
  inside `run_inference`. The model is a folder (local or gs://) or a model hub name (loaded from the hub or
  its cache, as the original scripts do)."""

  model_name = ''
  flag = what = ''

  def __init__(self, model_dir: str, device: str = 'auto', batch_sizes: Optional[Dict[str, int]] = None,
               chunk_steps: int = CHUNK_STEPS):
    super().__init__()
    self.model_dir = model_dir
    self._device_name = device
    self._batch_sizes = dict(BATCH_SIZES, **(batch_sizes or {}))
    self._chunk_steps = chunk_steps
    self.device = None

  def check(self) -> str:
    raise NotImplementedError

  def architecture(self):
    raise NotImplementedError

  def output(self, result):
    """The (B, T, D) features of one forward pass's result."""
    raise NotImplementedError

  def load_model(self):
    self.check()
    hub = is_hub_name(self.model_dir)
    self.local_dir = self.model_dir if hub else local_copy(self.model_dir, self.flag, self.what)  # gs://: once
    self.device = pick_device(self._device_name)
    safetensors = None if hub else os.path.exists(os.path.join(self.local_dir, 'model.safetensors'))
    try:
      model = self.architecture().from_pretrained(self.local_dir, local_files_only=not hub,
                                                  use_safetensors=safetensors)
    except Exception as error:  # pylint: disable=broad-except  # transformers raises many kinds here
      raise WeightsError(self.flag, self.model_dir, f'could not load as {self.what}: '
                         f'{type(error).__name__}: {str(error)[:300]}') from error
    model = model.float().to(self.device).eval()  # float32 whatever the checkpoint's dtype
    # The feature extractor's do_normalize (without preprocessor_config.json: True, as both models' extractors).
    model.normalise_input = bool((_folder_json(self.model_dir, 'preprocessor_config.json') or {}).get(
        'do_normalize', True))
    return model

  def run_inference(self, batch: Sequence[np.ndarray], model,
                    inference_args: Optional[Dict[str, Any]] = None) -> Iterable[PredictionResult]:
    if self.device is None:
      self.device = pick_device(self._device_name)
    for pcm in batch:
      yield PredictionResult(pcm, self._features(model, np.asarray(pcm, np.float32).reshape(-1)))

  def _features(self, model, pcm: np.ndarray) -> np.ndarray:
    import torch
    if model.normalise_input and len(pcm):  # Wav2Vec2FeatureExtractor's zero_mean_unit_var_norm, whole utterance
      pcm = (pcm - pcm.mean()) / np.sqrt(pcm.var() + 1e-7)
    kernel, stride = _receptive_field(model.config)
    expected = max(0, (len(pcm) - (kernel - stride)) // stride)
    clip = stride * self._chunk_steps
    chunk_len = clip - stride + kernel
    full = len(pcm) // clip
    pieces = [pcm[i * clip:i * clip + chunk_len] for i in range(full)]
    # A chunk running to the very end is shorter than chunk_len; it goes alone, like the remainder.
    equal = [p for p in pieces if len(p) == chunk_len]
    rest = [p for p in pieces if len(p) != chunk_len] + [pcm[full * clip:]]
    rest = [p for p in rest if len(p) >= kernel]
    outputs = []
    step = self._batch_sizes[self.device.type]
    with torch.inference_mode():
      for first in range(0, len(equal), step):
        inputs = torch.from_numpy(np.stack(equal[first:first + step])).to(self.device)
        outputs += list(self.output(model(inputs)).float().cpu().numpy())
      for piece in rest:
        inputs = torch.from_numpy(np.ascontiguousarray(piece)[None]).to(self.device)
        outputs.append(self.output(model(inputs))[0].float().cpu().numpy())
    width = outputs[0].shape[1] if outputs else self.width(model)
    features = np.concatenate(outputs) if outputs else np.zeros((0, width), np.float32)
    if len(features) < expected:  # ER-NeRF pads the (at most one) missing step with zeros
      features = np.concatenate([features, np.zeros((expected - len(features), width), np.float32)])
    return features[:expected].astype(np.float32)

  def width(self, model) -> int:
    return model.config.hidden_size

  def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
    return sum(np.asarray(pcm).nbytes for pcm in batch)

  def batch_elements_kwargs(self) -> Dict[str, Any]:
    return {'max_batch_size': 1}  # one utterance (of any length) per call; its chunks form the batch

  def get_metrics_namespace(self) -> str:
    return 'audio_features'


class HubertHandler(_TransformersAudioHandler):
  """HuBERT's last hidden state (1024 values at 50 Hz for large), as ER-NeRF's `get_hubert_from_16k_speech`.
  A HubertForCTC checkpoint (facebook/hubert-large-ls960-ft) loads too: its `hubert.` weights are the base
  model, the CTC head is dropped."""

  model_name = 'hubert'
  flag, what = HUBERT_FLAG, HUBERT_WHAT

  def check(self) -> str:
    return check_hubert_dir(self.model_dir)

  def architecture(self):
    # From its module, not the lazy top level: inside a pipeline run `transformers.HubertModel` failed its first
    # look-up (AttributeError from transformers' _LazyModule) while the module imports cleanly.
    from transformers.models.hubert.modeling_hubert import HubertModel
    return HubertModel

  def output(self, result):
    return result.last_hidden_state


class Wav2VecHandler(_TransformersAudioHandler):
  """A wav2vec2 CTC model's logits at 50 Hz (44 for the Esperanto xlsr-53 model), the features RAD-NeRF's
  `nerf/asr.py --save_feats` saves (it runs them in a stream of 10 + 50 + 10 step windows; here 20 s chunks)."""

  model_name = 'wav2vec'
  flag, what = WAV2VEC_FLAG, WAV2VEC_WHAT

  def check(self) -> str:
    return check_wav2vec_dir(self.model_dir)

  def architecture(self):
    from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2ForCTC  # from its module, as HubertModel
    return Wav2Vec2ForCTC

  def output(self, result):
    return result.logits

  def width(self, model) -> int:
    return model.config.vocab_size


def _deepspeech_modules(path: Optional[str]):
  """(tensorflow, python_speech_features.mfcc); a WeightsError naming the flag when the extra is missing."""
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # TensorFlow's start-up chatter on stderr
  try:
    import tensorflow as tf
    from python_speech_features import mfcc
  except ImportError as error:
    raise WeightsError(DEEPSPEECH_FLAG, path, f'{error}: install the [deepspeech] extra '
                       '(pip install "talking-face-pipeline[deepspeech]") to run DeepSpeech') from error
  return tf, mfcc


def deepspeech_input(pcm: np.ndarray, mfcc) -> np.ndarray:
  """(S, 494) float32 DeepSpeech 0.1.0 input for 16 kHz float PCM, as AD-NeRF feeds it: the audio as 16-bit
  sample values, 26 MFCCs (python_speech_features' defaults: 25 ms windows every 10 ms), every second step
  kept (50 Hz), zero context rows added at both ends, 19 steps side by side, normalised over the utterance."""
  samples = np.clip(np.round(np.asarray(pcm, np.float64) * 32768.0), -32768, 32767)
  features = mfcc(samples, samplerate=SAMPLE_RATE, numcep=DS_CEPSTRA)[::2]
  empty = np.zeros((DS_CONTEXT, DS_CEPSTRA), features.dtype)
  padded = np.concatenate([empty, features, empty])
  inputs = np.lib.stride_tricks.sliding_window_view(padded, (2 * DS_CONTEXT + 1, DS_CEPSTRA))[:, 0]
  inputs = inputs.reshape(len(features), -1)
  return ((inputs - inputs.mean()) / inputs.std()).astype(np.float32)


class _DeepSpeechGraph:
  """A TensorFlow session on the imported graph and its three tensors."""

  def __init__(self, tf, graph):
    self.session = tf.compat.v1.Session(graph=graph)
    self.logits, self.inputs, self.lengths = (graph.get_tensor_by_name(f'deepspeech/{name}:0')
                                              for name in ('logits', 'input_node', 'input_lengths'))

  def __call__(self, inputs: np.ndarray) -> np.ndarray:
    logits = self.session.run(self.logits, {self.inputs: inputs[None], self.lengths: [len(inputs)]})
    return np.asarray(logits, np.float32)[:, 0]  # time-major (S, 1, 29) -> (S, 29)


class DeepSpeechHandler(ModelHandler[np.ndarray, PredictionResult, Any]):
  """16 kHz mono float PCM -> PredictionResult with DeepSpeech 0.1.0's logits, (S, 29) float32 at 50 Hz, from the
  user's `output_graph.pb` (local or gs://) through TensorFlow on the CPU, the whole utterance in one run as
  AD-NeRF's `conv_audios_to_deepspeech`."""

  model_name = 'deepspeech'

  def __init__(self, graph_path: str):
    super().__init__()
    self.graph_path = graph_path

  def load_model(self):
    tf, _ = _deepspeech_modules(self.graph_path)
    data = read_weights(self.graph_path, DEEPSPEECH_FLAG, DEEPSPEECH_WHAT)
    graph = tf.Graph()
    try:
      graph_def = tf.compat.v1.GraphDef()
      graph_def.ParseFromString(data)
      with graph.as_default():
        tf.import_graph_def(graph_def, name='deepspeech')
      return _DeepSpeechGraph(tf, graph)
    except Exception as error:  # pylint: disable=broad-except  # protobuf and TensorFlow raise many kinds here
      raise WeightsError(DEEPSPEECH_FLAG, self.graph_path, f'not {DEEPSPEECH_WHAT}: {type(error).__name__}: '
                         f'{str(error)[:300]}') from error

  def run_inference(self, batch: Sequence[np.ndarray], model,
                    inference_args: Optional[Dict[str, Any]] = None) -> Iterable[PredictionResult]:
    _, mfcc = _deepspeech_modules(self.graph_path)
    for pcm in batch:
      yield PredictionResult(pcm, model(deepspeech_input(pcm, mfcc)))

  def get_num_bytes(self, batch: Sequence[np.ndarray]) -> int:
    return sum(np.asarray(pcm).nbytes for pcm in batch)

  def batch_elements_kwargs(self) -> Dict[str, Any]:
    return {'max_batch_size': 1}

  def get_metrics_namespace(self) -> str:
    return 'audio_features'


HANDLERS = {'hubert': HubertHandler, 'wav2vec': Wav2VecHandler, 'deepspeech': DeepSpeechHandler}
CHECKS = {'hubert': check_hubert_dir, 'wav2vec': check_wav2vec_dir, 'deepspeech': check_deepspeech_graph}


def parse_kinds(value: Any) -> Tuple[str, ...]:
  """'hubert,deepspeech' (or a sequence of kinds) -> ('hubert', 'deepspeech'); a ValueError names a wrong one."""
  kinds = tuple(dict.fromkeys(k.strip() for k in (value.split(',') if isinstance(value, str) else value)
                              if k.strip()))
  wrong = [kind for kind in kinds if kind not in KINDS]
  if wrong or not kinds:
    raise ValueError(f'audio feature kind {",".join(wrong) or value!r} is not one of {", ".join(KINDS)}')
  return kinds


def step_features(kind: str, pcm: np.ndarray, model=None) -> np.ndarray:
  """(S, D) features at 50 Hz of 16 kHz mono float PCM. `model` is a set-up `SharedModel` of the kind's handler
  (one model per worker process); its failure is an `AudioFeatureError`."""
  if kind == 'mel':
    return log_mel(pcm)
  if kind not in HANDLERS:
    raise ValueError(f'audio feature kind {kind!r} is not one of {KINDS}')
  if model is None:
    flag = {'hubert': HUBERT_FLAG, 'wav2vec': WAV2VEC_FLAG, 'deepspeech': DEEPSPEECH_FLAG}[kind]
    raise ValueError(f'audio features of kind {kind} need a model ({flag})')
  features = model.infer([np.asarray(pcm, np.float32)])[0]
  if isinstance(features, ModelError):
    raise AudioFeatureError(features.detail)
  return features


def audio_features(kind: str, pcm: np.ndarray, num_frames: int, fps: float, model=None) -> np.ndarray:
  """(num_frames, 16, D) float32 windows for 16 kHz mono float PCM: D = 80 for `mel`, the hidden size for
  `hubert` (1024 for large), the vocabulary for `wav2vec` (44), 29 for `deepspeech`."""
  per_frame = to_frame_rate(step_features(kind, pcm, model), STEPS_PER_S, num_frames, fps)
  return frame_windows(per_frame, STEPS_PER_FRAME * fps, num_frames, fps)


def trainer_files(kind: str, pcm: np.ndarray, num_frames: int, fps: float, model=None) -> Dict[str, np.ndarray]:
  """File name -> float32 array, as the trainers open it: `aud_hu.npy` (num_frames, 2, D), the frame's own two
  steps (ER-NeRF); every other kind (num_frames, 16, D) windows, under each name in FILES[kind]."""
  per_frame = to_frame_rate(step_features(kind, pcm, model), STEPS_PER_S, num_frames, fps)
  if kind == 'hubert':
    return {FILES[kind][0]: per_frame.reshape(num_frames, STEPS_PER_FRAME, -1)}
  windows = frame_windows(per_frame, STEPS_PER_FRAME * fps, num_frames, fps)
  return {name: windows for name in FILES[kind]}
