"""The avatar recipe's tracker: HRAvatar's first-frame crop in place of face detection and tracking.

HRAvatar crops a whole video with one box from its first frame's 68 landmarks
(beam_pipeline/recipes/avatar/crop.py). `FirstFrameTrack` groups a subject's clips (transforms/subject_window.py) and
`EarliestFirstFrame` decodes only the earliest clip's first frame, runs the face landmarker on it (in-process,
one model per worker) and gives every clip of the subject that window and padding; the render pass then crops,
pads and resizes every frame with that box, at the recipe's size and frame rate.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, List, Optional, Tuple

import apache_beam as beam
import av
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler

from beam_pipeline.recipes.avatar.crop import hravatar_window
from model_handlers.in_process import ModelError, SharedModel
from transforms.core.elements import ClipTask, Padding, Window
from transforms.incremental import PERMANENT_REASONS
from transforms.lib.features import LMK68
from transforms.lib.geometry import box_in_square
from transforms.sampling import sample_frames
from transforms.subject_window import OneWindowPerSubject, SubjectWindowFn, reject, with_window

STAGE = 'track'
LANDMARK_MAX_SIDE = 1280  # the first frame is scaled to at most this for the landmarker (points scale back)


@dataclasses.dataclass(frozen=True)
class FirstFrameBox:
  """HRAvatar's box from one clip's first frame, in source pixels."""
  clip_id: str
  window: Window
  padding: Padding
  face_box: Tuple[float, float, float, float]  # the face's landmark box in the padded square, fractions
  face_px: float  # the face's larger extent, source pixels


class EarliestFirstFrame(SubjectWindowFn):
  """A subject's clips (earliest first) -> all of them with HRAvatar's box from the earliest clip's first frame
  (transforms/subject_window.py). The first frame is decoded and landmarked once per subject, in-process.

  When that frame cannot give the box for a lasting reason (no face on it, no frame at the clip start, a box
  outside the frame), the next clip's first frame gives it, and so on; the clips before keep the subject's box.
  When no clip's first frame gives one, each clip is rejected with its own first frame's reason. A passing
  failure (the landmarker or the decoder failed) rejects every clip of the subject with it, so a later run
  retries them and takes the box from the same frame.
  """

  def __init__(self, landmarker: ModelHandler, bbox_scale: float, detector: Optional[ModelHandler] = None):
    super().__init__()
    self.model = SharedModel(landmarker)
    self.detector = SharedModel(detector) if detector is not None else None
    self.bbox_scale = bbox_scale
    self.no_face = Metrics.counter(STAGE, 'avatar_first_frames_without_face')
    self.found_by_detector = Metrics.counter(STAGE, 'avatar_first_frames_found_by_detector')

  def setup(self):
    self.model.setup()
    if self.detector:
      self.detector.setup()

  def _landmarks(self, image: np.ndarray):
    """The largest face's 478 landmarks in `image` pixels, None when there is no face, or a ModelError.

    The landmarker's own detector is short-range: it misses faces under about a fifth of a wide frame (a
    1080p talking head of 230 px). Then the full-range detector finds the face, and the landmarker runs on a
    square around it (twice the face's size), its points mapped back."""
    face = self.model.infer([image])[0]
    if isinstance(face, ModelError):
      return face
    if face.num_faces:
      return face.landmarks[0]
    if self.detector is None:
      return None
    found = self.detector.infer([image])[0]
    if isinstance(found, ModelError):
      return found
    if not found.num_faces:
      return None
    x0, y0, x1, y1 = found.boxes[0]
    side = int(round(2 * max(x1 - x0, y1 - y0)))
    left, top = int(round((x0 + x1 - side) / 2)), int(round((y0 + y1 - side) / 2))
    pad = ((max(0, -top), max(0, top + side - image.shape[0])), (max(0, -left), max(0, left + side - image.shape[1])),
           (0, 0))
    square = np.pad(image, pad)[top + pad[0][0]:top + pad[0][0] + side, left + pad[1][0]:left + pad[1][0] + side]
    face = self.model.infer([np.ascontiguousarray(square)])[0]
    if isinstance(face, ModelError) or not face.num_faces:
      return face if isinstance(face, ModelError) else None
    self.found_by_detector.inc()
    points = face.landmarks[0].copy()
    points[:, 0] += left
    points[:, 1] += top
    return points

  def choose(self, tasks: List[ClipTask]) -> Iterable:
    failed = []  # (task, reason, detail) of the first frames that gave no box, earliest first
    for task in tasks:
      found = self.first_frame_box(task)
      if isinstance(found, FirstFrameBox):
        return [self._apply(other, found, failed) for other in tasks]
      reason, detail = found
      if reason not in PERMANENT_REASONS:
        return [reject(other, reason, detail if other is task else
                       f'the subject\'s crop comes from the first frame of {task.clip_id}: {detail}')
                for other in tasks]
      failed.append((task, reason, detail))
    return [reject(task, reason, detail) for task, reason, detail in failed]

  def _apply(self, task: ClipTask, box: FirstFrameBox, failed) -> ClipTask:
    source = 'earliest clip' if not failed else 'earliest clip whose first frame gave one (' + ', '.join(
        f'{earlier.clip_id}: {reason}' for earlier, reason, _ in failed) + ')'
    note = (f'HRAvatar crop from the 68 landmarks (--bbox_scale {self.bbox_scale}) of the first frame of '
            f'{box.clip_id}, the subject\'s {source}: window {list(box.window)}'
            + (f', padded {list(box.padding)} (left, top, right, bottom)' if any(box.padding) else '')
            + (f'; the window {list(task.window)} it was given ({task.crop_mode}) is not used: one HRAvatar box '
               'frames the subject' if task.window is not None else ''))
    return with_window(task, box.window, box.padding, note, crop_mode='first_frame', face_box=box.face_box,
                       face_stats=task.face_stats + (('source_face_px', box.face_px),))

  def first_frame_box(self, task: ClipTask):
    """The HRAvatar box of the task's first frame, or (reason, detail) why there is none."""
    info = task.media.info
    try:
      frames = sample_frames(task, 1.0, LANDMARK_MAX_SIDE)
      first = next(frames, None)
      frames.close()
    except (av.error.FFmpegError, OSError) as error:
      return 'decode_error', f'decoding the first frame of {task.clip_id} failed: {error}'
    if first is None:
      return 'no_frames', f'no video frame at the start {task.start:.3f}s of {task.clip_id}'
    _, t, image = first
    face = self._landmarks(image)
    if isinstance(face, ModelError):
      return 'model_error', f'the face {face.model} failed on the first frame of {task.clip_id}: {face.detail}'
    if face is None:
      self.no_face.inc()
      return 'no_face', (f'no face on the first frame of {task.clip_id} ({t:.3f}s into it): the HRAvatar crop is '
                         'taken from its landmarks')
    scale = np.array([info.width / image.shape[1], info.height / image.shape[0]], np.float32)
    points = face[list(LMK68), :2] * scale  # the largest face's 68 points, in source pixels
    fitted = hravatar_window(points, self.bbox_scale, info.width, info.height)
    if fitted is None:
      return 'bad_crop', (f'the HRAvatar box of the face on the first frame of {task.clip_id} misses the '
                          f'{info.width}x{info.height} frame')
    window, padding = fitted
    return FirstFrameBox(task.clip_id, window, padding, box_in_square(points, window, padding),
                         float(np.max(points.max(0) - points.min(0))))


class FirstFrameTrack(beam.PTransform):
  """ClipTasks (a window given to some or not) -> {'tasks': with their subject's HRAvatar window, 'rejects'}: the
  avatar recipe's replacement for the spine's DetectAndTrack."""

  def __init__(self, landmarker: ModelHandler, bbox_scale: float, detector: Optional[ModelHandler] = None):
    super().__init__()
    self.choose = EarliestFirstFrame(landmarker, bbox_scale, detector)

  def expand(self, tasks):
    return tasks | 'OneWindowPerSubject' >> OneWindowPerSubject(self.choose)
