"""Typed elements that travel between pipeline stages.

Big media never travels: sources are URIs in the work dir. Only finished clip
outputs (encoded mp4/wav bytes and small arrays) move as bytes.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

import numpy as np

NUM_LANDMARKS = 478  # the face landmarker's mesh points per face
NUM_BLENDSHAPES = 52  # and its blendshape scores

Window = Tuple[int, int, int, int]  # x, y, w, h in source pixels
Padding = Tuple[int, int, int, int]  # left, top, right, bottom in source pixels, added around a window


@dataclasses.dataclass(frozen=True)
class ClipSpec:
  """One planned clip of a source, as the manifest states it."""
  clip_id: str
  index: int
  start: Optional[float] = None  # seconds; None: from the start
  end: Optional[float] = None  # seconds; None: to the end
  crop: Optional[Window] = None  # fixed window in reference pixels
  crop_ratio: Optional[float] = None  # auto-crop enlargement
  inputs: str = ''  # digest of what decides the clip's bytes (transforms/resume.clip_inputs); set by SkipDoneClips


@dataclasses.dataclass(frozen=True)
class Source:
  """One video to fetch and the clips planned from it."""
  source_id: str
  url: str
  clips: Tuple[ClipSpec, ...]
  height: Optional[int] = None  # reference / wanted download height
  # (speaker, video, utterance) when the manifest names them (VoxCeleb's identity, mmvox's ids); else ()
  origin: Tuple[str, ...] = ()
  language: str = ''  # the row's BCP-47 code (`en`, `pt-BR`), normalised; '' when not given


@dataclasses.dataclass(frozen=True)
class Reject:
  """A planned clip (or unusable manifest entry) that is not in the output."""
  id: str
  stage: str
  reason: str
  detail: str = ''
  source_id: str = ''
  planned_id: str = ''  # the planned clip this id is a piece of (plan or tracking splits); '' means id
  value: Optional[float] = None  # a filter reject's measured score (report.html sets it against the threshold)
  threshold: Optional[float] = None  # the filter setting it failed
  # a filter reject's every score, (name, value) pairs (a tuple keeps the Reject hashable): report.html's table
  scores: Tuple[Tuple[str, object], ...] = ()
  language: str = ''  # a reject with scores: its source's language (report.html's distributions per language)
  # its planned clip's inputs (transforms/resume.clip_inputs; '' for an entry that planned no clip, or a reject
  # from before rejects recorded them): --incremental carries a permanent reject only while they stay the same
  inputs: str = ''

  @property
  def planned(self) -> str:
    return self.planned_id or self.id

  def to_json(self) -> dict:
    record = dict(dataclasses.asdict(self), planned_id=self.planned, scores=dict(self.scores))
    for name in ('scores', 'language'):
      if not record[name]:
        del record[name]
    return record


class ReasonError(Exception):
  """An expected failure named by its reject reason code (`reason`); the message is the reject's detail."""

  def __init__(self, reason: str, detail: str):
    super().__init__(detail)
    self.reason = reason


class FatalError(Exception):
  """A failure that is not the element's fault: DeadLetter re-raises it so that the job stops loudly."""


@dataclasses.dataclass(frozen=True)
class ProbeInfo:
  """What a decodable media file holds."""
  duration: float
  width: int
  height: int
  fps: float
  has_audio: bool
  interlaced: bool
  video_codec: str
  audio_rate: int = 0
  start_time: float = 0.0  # container start offset, seconds
  rotation: int = 0  # display matrix turn (counterclockwise degrees); width/height are as displayed


@dataclasses.dataclass(frozen=True)
class MediaFile:
  """A downloaded, probed file and where its time zero sits in the source."""
  uri: str
  info: ProbeInfo
  offset: float = 0.0  # source time of this file's t=0 (section downloads)


@dataclasses.dataclass(frozen=True)
class ClipTask:
  """A clip ready to render: media, time range and (once known) crop window."""
  clip_id: str
  source_id: str
  url: str
  media: MediaFile
  start: float  # seconds, in source time
  end: float
  window: Optional[Window] = None  # in source pixels; None until detected
  crop_mode: str = 'auto'
  crop_ratio: Optional[float] = None
  notes: Tuple[str, ...] = ()
  face_stats: Tuple[Tuple[str, float], ...] = ()
  planned_id: str = ''  # the planned clip this one is a piece of (plan or tracking splits); '' means clip_id
  path: Tuple[Tuple[float, int, int], ...] = ()  # --crop_follow: (clip time, left, top) of the window
  # The tracked face's median box in its crop window, x0, y0, x1, y1 as fractions of the window side:
  # the landmarker follows this face, not another one in the crop. None: no track (a given window).
  face_box: Optional[Tuple[float, float, float, float]] = None
  padding: Padding = (0, 0, 0, 0)  # black added around `window` where the square did not fit the frame
  origin: Tuple[str, ...] = ()  # the source's (speaker, video, utterance), see Source
  inputs: str = ''  # the planned clip's ClipSpec.inputs: stored with the sample, resume compares it
  language: str = ''  # the source's, see Source
  # --split_at_sync_breaks (transforms/sync_split.py): the rendered clip this piece was cut from and how many
  # in-sync pieces it gave (a rerun skips the clip once all are written), and, on the clip itself, the pieces an
  # earlier run wrote (a rerun cuts them out again but does not write them twice)
  cut_from: str = ''
  cut_pieces: int = 0
  done_pieces: Tuple[str, ...] = ()

  @property
  def planned(self) -> str:
    return self.planned_id or self.clip_id

  @property
  def square_side(self) -> int:
    """Source pixels across the output square (window plus padding): output pixels x side / size = source."""
    x, y, w, h = self.window
    left, top, right, bottom = self.padding
    return max(w + left + right, h + top + bottom)

  @property
  def media_start(self) -> float:
    return self.start - self.media.offset

  @property
  def media_end(self) -> float:
    return self.end - self.media.offset


@dataclasses.dataclass
class FaceResult:
  """MediaPipe FaceLandmarker output for one image, in that image's pixels."""
  landmarks: np.ndarray  # (F, 478, 3) float32, x/y in pixels, z scaled by width
  blendshapes: np.ndarray  # (F, 52) float32
  matrices: np.ndarray  # (F, 4, 4) float32 facial transformation matrices
  image_width: int = 0
  image_height: int = 0

  @property
  def num_faces(self) -> int:
    return int(self.landmarks.shape[0])

  def boxes(self) -> np.ndarray:
    """(F, 4) x0, y0, x1, y1 of each face's landmarks."""
    if not self.num_faces:
      return np.zeros((0, 4), np.float32)
    xy = self.landmarks[:, :, :2]
    return np.concatenate([xy.min(1), xy.max(1)], axis=1).astype(np.float32)


@dataclasses.dataclass
class Detection:
  """FaceDetector output for one image: boxes (F, 4) x0, y0, x1, y1 in its pixels."""
  boxes: np.ndarray
  scores: np.ndarray
  image_width: int
  image_height: int

  @property
  def num_faces(self) -> int:
    return int(self.boxes.shape[0])


@dataclasses.dataclass
class FaceSamples:
  """A clip's face detections, one element per clip (per-frame results never travel on their own)."""
  task: ClipTask
  samples: Tuple[Tuple[float, np.ndarray], ...]  # (clip time, face boxes (F, 4) as fractions of the frame)
  cuts: Tuple[float, ...]  # hard shot changes, clip seconds
  model_errors: int = 0  # sampled frames the detector failed on (left out of `samples`)


@dataclasses.dataclass
class RenderedClip:
  """An encoded clip with its per-frame analysis packed: the mp4 stays in the work dir; the small 16 kHz
  wav, the per-frame arrays (T-length, see transforms/frame_analysis.py) and a thumbnail travel inline.

  What was produced is the truth: `task.end` becomes start + num_frames / fps (a source that ran out a
  little early gives a shorter clip, and its json says so)."""
  task: ClipTask
  mp4_uri: str
  wav: bytes
  num_frames: int
  fps: float
  size: int
  arrays: dict = dataclasses.field(default_factory=dict)  # name -> (T, ...) ndarray, NaN where not found
  thumbnail: bytes = b''  # JPEG of the middle output frame, about 256 px, for report.html
  model_errors: int = 0  # output frames a per-frame model failed on (not counted as frames without a face)
  files: dict = dataclasses.field(default_factory=dict)  # name -> work-dir URI of per-clip frame archives

  def __post_init__(self):
    end = self.task.start + self.num_frames / self.fps
    if end != self.task.end:
      notes = self.task.notes
      if self.task.end - end >= 1.0 / self.fps:
        notes += (f'the source ran out: the clip ends at {end:.3f}s, not the planned {self.task.end:.3f}s',)
      self.task = dataclasses.replace(self.task, end=end, notes=notes)


@dataclasses.dataclass(frozen=True)
class SampleRef:
  """A sample packed as tar members in the work dir, waiting for its shard: small enough to shuffle.

  `record` is its index line; `consumed` names work-dir media that may go once its shard is published.
  """
  key: str
  id: str
  source_id: str
  fragment_uri: str
  size: int
  record: dict
  consumed: Tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class ShardBatch:
  """The samples one shard holds, fixed by the batching step before anything is published."""
  refs: Tuple[SampleRef, ...]
