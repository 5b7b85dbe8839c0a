"""SyncNet in the render pass: AV offset, confidence (LSE-C), LSE-D and per-window confidence per clip.

Runs after FaceLandmarks: each output frame's tracked-face landmarks place SyncNet's face crop
(transforms/lib/avsync.py). Frames are taken at SyncNet's 25 fps (nearest output frame, so clips at any --fps
are read at the rate the network was trained on), and each 5-frame window goes to the model as soon as it is
complete: only 5 crops and the 1024-float embeddings are kept per clip, never the frames. The audio windows
run once the clip's wav is known (ClipPass.hear), then the offset is read out.
"""
from __future__ import annotations

import collections
from typing import Deque, Dict, List, Optional

import numpy as np

from model_handlers.in_process import ModelError, SharedModel
from model_handlers.weights import is_remote, require
from transforms.frame_analysis import ClipPass, Frame, FrameAnalyzer, PassResult
from transforms.lib import avsync
from transforms.lib.avsync import AUDIO, EMBEDDING, LIP
from transforms.lib.features import wav_samples

# arrays['syncnet']: (offset frames at 25 fps, confidence LSE-C, LSE-D, windows scored); NaN when not measured
SUMMARY = 'syncnet'
FRAME_CONF = 'sync_frame_conf'  # (T,) per output frame: the confidence of the window centred there
# (windows, 31) each window's distances over the offsets searched, NaN rows where no face: a piece of the clip is
# read out again from its own rows (transforms/sync_split.py); not written to the output
DISTS = 'sync_dists'


class _SyncPass(ClipPass):

  def __init__(self, model: SharedModel, fps: float):
    self.model, self.fps = model, fps
    self.tick = 0  # next 25 fps frame to take
    self.crops: Deque[Optional[np.ndarray]] = collections.deque(maxlen=avsync.WINDOW_FRAMES)
    self.pending: List[tuple] = []  # (window index, lip input) waiting for a full batch
    self.lips: Dict[int, np.ndarray] = {}
    self.errors: List[ModelError] = []
    self.samples: Optional[np.ndarray] = None

  def add(self, frames: List[Frame]) -> None:
    for frame in frames:
      landmarks = frame.found.get('landmarks')
      crop = None if landmarks is None else avsync.face_crop(frame.image, landmarks)
      # each 25 fps tick whose nearest output frame is this one (or an earlier one the render never produced)
      while int(round(self.tick * self.fps / avsync.FPS)) <= frame.index:
        self.crops.append(crop)
        self.tick += 1
        if len(self.crops) == avsync.WINDOW_FRAMES and all(c is not None for c in self.crops):
          self.pending.append((self.tick - avsync.WINDOW_FRAMES, np.stack(self.crops)))
    if len(self.pending) >= self.model.batch_size:
      self._run_lips()

  def _run_lips(self) -> None:
    results = self.model.infer([(LIP, crops) for _, crops in self.pending])
    for (index, _), result in zip(self.pending, results):
      if isinstance(result, ModelError):
        self.errors.append(result)
      else:
        self.lips[index] = result
    self.pending = []

  def hear(self, wav: bytes) -> None:
    samples, _ = wav_samples(wav)  # 16 kHz mono in [-1, 1); SyncNet's MFCCs take int16 units
    self.samples = samples * 32768.0

  def finish(self, num_frames: int) -> PassResult:
    if self.pending:
      self._run_lips()
    dists = np.zeros((0, 2 * avsync.VSHIFT + 1), np.float32)
    count = avsync.window_count(self.tick, 0 if self.samples is None else len(self.samples))
    if count and self.lips and np.abs(self.samples).max() > 0:
      audio = self.model.infer([(AUDIO, window) for window in avsync.audio_windows(self.samples, count)])
      failed = [r for r in audio if isinstance(r, ModelError)]
      self.errors += failed
      if not failed:
        valid = np.array([i in self.lips for i in range(count)])
        video = np.stack([self.lips.get(i, np.zeros(EMBEDDING, np.float32)) for i in range(count)])
        # float32, as stored: a piece read out again from these rows agrees with the clip's own read-out
        dists = avsync.window_distances(video, np.stack(audio)).astype(np.float32)
        dists[~valid] = np.nan
    # a model error costs the frames of its windows; the clip is judged on how many
    errors = min(num_frames, len(self.errors))
    return PassResult(sync_arrays(dists, num_frames, self.fps), errors, self.errors[-1].detail if self.errors else '')


def sync_arrays(dists: np.ndarray, num_frames: int, fps: float, first_window: int = 0, start_frame: int = 0) -> dict:
  """The arrays SyncNet leaves in a clip from its windows' distances (NaN rows: no face): `syncnet` (offset,
  LSE-C, LSE-D, windows; NaN when nothing was measured), `sync_frame_conf` (each window's confidence at its
  middle output frame) and `sync_dists`. For a piece of a clip: its own windows' rows, the first of them window
  `first_window` of the clip, the piece starting at the clip's output frame `start_frame`."""
  summary = np.full(4, np.nan, np.float32)
  frame_conf = np.full(num_frames, np.nan, np.float32)
  found = avsync.read_out(dists) if len(dists) and num_frames else None
  if found is not None:
    summary[:] = (found.offset, found.confidence, found.min_dist, found.windows)
    middles = (np.arange(len(dists)) + first_window + avsync.WINDOW_FRAMES // 2) / avsync.FPS  # in s, clip time
    at = np.clip(np.round(middles * fps).astype(int) - start_frame, 0, num_frames - 1)
    frame_conf[at] = found.frame_conf
  return {SUMMARY: summary, FRAME_CONF: frame_conf, DISTS: dists}


class SyncNetAnalyzer(FrameAnalyzer):
  """SyncNet on the tracked face (model_handlers/syncnet.py): arrays `syncnet` (offset, LSE-C, LSE-D,
  windows) and `sync_frame_conf` (T,) for ScoreAndFilter, `sync_dists` for SplitAtSyncBreaks."""

  name = 'syncnet'

  def __init__(self, handler, fps: float):
    self.model = SharedModel(handler)
    self.batch_size = 1  # windows are batched by the pass itself, across frame batches
    self.fps = fps

  def setup(self) -> None:
    self.model.setup()

  def start(self, task, num_frames: int, size: int) -> ClipPass:
    return _SyncPass(self.model, self.fps)


def syncnet_analyzers(opts) -> List[FrameAnalyzer]:
  """[SyncNetAnalyzer] when --syncnet_weights is given, else []. Local weights are loaded once here, when the
  graph is built, so a wrong path or a wrong file fails before any work, naming the flag; gs:// weights are
  checked for existence here and loaded on the workers."""
  weights = getattr(opts, 'syncnet_weights', None)
  if not weights:
    return []
  from model_handlers import syncnet
  require(weights, syncnet.FLAG, syncnet.WHAT)
  if not is_remote(weights):
    syncnet.load_syncnet(weights)
  return [SyncNetAnalyzer(syncnet.SyncNetModelHandler(weights), opts.fps)]
