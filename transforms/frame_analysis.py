"""Per-frame models run inside the render pass, on the output frames as they are produced.

Why: a clip's per-frame results must never become PCollection elements (see model_handlers/in_process.py).
The render DoFn hands each output frame to every `FrameAnalyzer` it was built with; an analyzer batches
frames for its model and packs each result into the clip's T-length arrays at once, so a clip costs
O(frames x small arrays) of memory and no frame is kept beyond its batch.

Analyzers run in order on each batch of frames: `FaceLandmarks` first, then the ones a recipe adds
(segmentation, parsing, frame writers). Each `Frame` carries a `found` dict: what earlier analyzers found on
that frame, for later ones to use (parsing reads the landmarks and the person mask), so every per-frame model
runs once per frame whichever recipes need its result.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

import numpy as np
from apache_beam.ml.inference.base import ModelHandler

from model_handlers.in_process import ModelError, SharedModel
from transforms.core.elements import ClipTask
from transforms.lib.features import FaceArrays, face_sharpness

MAX_FACE_JUMP = 1.0  # a candidate more than this far (in face sizes, plus size change) from the reference is not it
FOLLOW_FRAMES = 12  # the face chosen this many frames ago still guides the choice; older, the track's box does


@dataclasses.dataclass
class Frame:
  """One output frame in the render pass: its index in the clip, RGB pixels (size x size, uint8), and what
  the analyzers before this one found on it (`landmarks` (478, 3) output pixels, `matrix` (4, 4),
  `blendshapes` (52,) for the tracked face, absent where none was found; later analyzers add their own)."""
  index: int
  image: np.ndarray
  found: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class PassResult:
  """What one analyzer found in one clip."""
  arrays: dict  # name -> (T, ...) array
  model_errors: int  # frames the model failed on
  last_error: str = ''
  files: dict = dataclasses.field(default_factory=dict)  # name -> work-dir URI this pass wrote (frame archives)


class ClipPass:
  """One analyzer's work on one clip: `add` every batch of output frames in order, then `finish` once."""

  def add(self, frames: List[Frame]) -> None:
    raise NotImplementedError

  def hear(self, wav: bytes) -> None:
    """The clip's 16 kHz mono wav, once every frame was added and before `finish` (for a pass that judges
    the frames against the sound, e.g. SyncNet); ignored by default."""

  def finish(self, num_frames: int) -> PassResult:
    raise NotImplementedError

  def abandon(self) -> None:
    """Called after every pass, finished or not: drop local leftovers of a pass that did not finish
    (safe to call after `finish`)."""


class FrameAnalyzer:
  """A per-frame model for the render pass. Built with the pipeline; `setup` runs in `DoFn.setup`."""

  name = ''
  batch_size = 1  # frames it hands its model at once (the render pass keeps that many frames in flight)

  def setup(self) -> None:
    raise NotImplementedError

  def start(self, task: ClipTask, num_frames: int, size: int) -> ClipPass:
    """A pass over `task`'s (at most `num_frames`) output frames of `size` x `size` pixels."""
    raise NotImplementedError


class ModelPass(ClipPass):
  """A pass that runs one shared per-frame model on each batch: a frame the model failed on is counted (the
  clip's model errors), every other result goes to `take`."""

  def __init__(self, model: SharedModel):
    self.model = model
    self.errors: List[ModelError] = []

  def add(self, frames: List[Frame]) -> None:
    for frame, result in zip(frames, self.model.infer([frame.image for frame in frames])):
      if isinstance(result, ModelError):
        self.errors.append(result)
      else:
        self.take(frame, result)

  def take(self, frame: Frame, result) -> None:
    raise NotImplementedError

  def result(self, arrays: Optional[dict] = None, files: Optional[dict] = None) -> PassResult:
    return PassResult(arrays or {}, len(self.errors), self.errors[-1].detail if self.errors else '',
                      files=files or {})


class ModelAnalyzer(FrameAnalyzer):
  """An analyzer around one ModelHandler, loaded once per worker process (SharedModel) in `setup`; frames
  reach it in batches of the handler's size."""

  def __init__(self, handler: ModelHandler):
    self.model = SharedModel(handler)
    self.batch_size = self.model.batch_size

  def setup(self) -> None:
    self.model.setup()


def _centre_and_size(box: np.ndarray) -> Tuple[np.ndarray, float]:
  return np.array([(box[0] + box[2]) / 2, (box[1] + box[3]) / 2]), float(max(box[2] - box[0], box[3] - box[1], 1.0))


class FaceChooser:
  """Which of the landmarker's faces is the tracked face, frame after frame.

  The reference is the face chosen on a recent frame (a face moves little from frame to frame), else the
  track's box in the crop (`expected`, output pixels). The candidate nearest the reference, in face sizes
  of centre distance plus the log of the size change, is chosen when within `MAX_FACE_JUMP`; none is
  chosen otherwise (the tracked face is not found, whatever else is in the crop). Without a track
  (a given window), the largest face is chosen.
  """

  def __init__(self, expected: Optional[np.ndarray]):
    self.expected = expected
    self.previous: Optional[Tuple[int, np.ndarray]] = None

  def choose(self, index: int, boxes: np.ndarray) -> Optional[int]:
    if not len(boxes):
      return None
    if self.expected is None:
      return 0  # the landmarker's faces come largest first
    recent = self.previous is not None and index - self.previous[0] <= FOLLOW_FRAMES
    centre, size = _centre_and_size(self.previous[1] if recent else self.expected)
    costs = []
    for box in boxes:
      their_centre, their_size = _centre_and_size(box)
      costs.append(np.linalg.norm(their_centre - centre) / size + abs(np.log(their_size / size)))
    best = int(np.argmin(costs))
    if costs[best] > MAX_FACE_JUMP:
      return None
    self.previous = (index, boxes[best])
    return best


class _LandmarkPass(ModelPass):

  def __init__(self, model: SharedModel, num_frames: int, expected: Optional[np.ndarray], source_scale: float):
    super().__init__(model)
    self.packed = FaceArrays(num_frames)
    self.chooser = FaceChooser(expected)
    self.source_scale = source_scale

  def take(self, frame: Frame, face) -> None:
    which = self.chooser.choose(frame.index, face.boxes())
    if which is not None:
      # Blur is measured here: only here the frame and its chosen face box meet.
      self.packed.put(frame.index, face, which, face_sharpness(frame.image, face.boxes()[which], self.source_scale))
      frame.found.update(landmarks=face.landmarks[which], matrix=face.matrices[which],
                         blendshapes=face.blendshapes[which])

  def finish(self, num_frames: int) -> PassResult:
    return self.result(self.packed.arrays(num_frames))


class FaceLandmarks(ModelAnalyzer):
  """MediaPipe FaceLandmarker on every output frame, following the tracked face: landmarks, blendshapes,
  pose, matrix, bbox, iris, lmk68 and sharpness arrays (transforms/features.FaceArrays), and the tracked
  face's landmarks, matrix and blendshapes in each frame's `found`."""

  name = 'face_landmarker'

  def start(self, task: ClipTask, num_frames: int, size: int) -> ClipPass:
    # `face_box` is in fractions of the output square (the window with its padding, if any).
    expected = None if task.face_box is None else np.asarray(task.face_box, np.float32) * size
    return _LandmarkPass(self.model, num_frames, expected, source_scale=task.square_side / size)
