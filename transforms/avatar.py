"""The avatar recipe's stages on the shared spine: HRAvatar's first-frame crop (in place of face detection and
tracking) and the RGBA frames (matte x face-parsing foreground) written in the render pass.

Crop: HRAvatar crops a whole video with one box from its first frame's 68 landmarks
(transforms/avatar_crop.py). `FirstFrameCrop` decodes only a clip's first frame, runs the face landmarker on
it (in-process, one model per worker) and sets the clip's window and padding; the render pass then crops,
pads and resizes every frame with that box, at the recipe's size and frame rate.

Frames: `AvatarFrames` follows the landmarker and the person segmentation and face parsing analyzers in the
render pass and makes each frame's alpha: the person matte (RobustVideoMatting when `--matting_weights` is
given, carried frame to frame within the clip; else the segmentation's person mask) times the parsing
foreground (every class but background; `--mask_clothes` drops the cloth class too), RGB premultiplied, as
HRAvatar's `merge_maks`. Frames go into the clip's frame archive (transforms/frame_store.py) as
`image/%05d.png` RGBA; the writer lays them out once the clip passed its filters.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional

import apache_beam as beam
import av
import cv2
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler

from beam_pipeline.elements import ClipTask, Reject
from model_handlers.in_process import ModelError, SharedModel
from model_handlers.matting import MattingSession
from transforms.avatar_crop import box_in_square, hravatar_window
from transforms.crop import sample_frames
from transforms.deadletter import DeadLetter
from transforms.features import LMK68
from transforms.frame_analysis import ClipPass, Frame, FrameAnalyzer, PassResult
from transforms.frame_store import FrameArchive, archive_uri
from transforms.parsing import foreground

STAGE = 'track'
ARCHIVE = 'avatar'  # the clip's frame archive: <work_dir>/frames/<clip>.avatar.tar
LANDMARK_MAX_SIDE = 1280  # the first frame is scaled to at most this for the landmarker (points scale back)


def frame_name(index: int) -> str:
  return f'{index:05d}.png'


class FirstFrameCrop(beam.DoFn):
  """ClipTask -> the same task with HRAvatar's window and padding from its first frame's landmarks;
  `Reject`s on tag `rejects` (no face on the first frame, an undecodable first frame, a landmarker error)."""

  def __init__(self, landmarker: ModelHandler, bbox_scale: float):
    self.model = SharedModel(landmarker)
    self.bbox_scale = bbox_scale
    self.no_face = Metrics.counter(STAGE, 'avatar_first_frames_without_face')

  def setup(self):
    self.model.setup()

  def process(self, task: ClipTask):
    info = task.media.info
    try:
      frames = sample_frames(task, 1.0, LANDMARK_MAX_SIDE)
      first = next(frames, None)
      frames.close()
    except (av.error.FFmpegError, OSError) as error:
      yield self._reject(task, 'decode_error', f'decoding the first frame failed: {error}')
      return
    if first is None:
      yield self._reject(task, 'no_frames', f'no video frame at the clip start {task.start:.3f}s')
      return
    _, t, image = first
    face = self.model.infer([image])[0]
    if isinstance(face, ModelError):
      yield self._reject(task, 'model_error', f'the face landmarker failed on the first frame: {face.detail}')
      return
    if not face.num_faces:
      self.no_face.inc()
      yield self._reject(task, 'no_face', f'no face on the first frame ({t:.3f}s into the clip): the HRAvatar '
                         f'crop is taken from its landmarks')
      return
    scale = np.array([info.width / image.shape[1], info.height / image.shape[0]], np.float32)
    points = face.landmarks[0][list(LMK68), :2] * scale  # the largest face's 68 points, in source pixels
    fitted = hravatar_window(points, self.bbox_scale, info.width, info.height)
    if fitted is None:
      yield self._reject(task, 'bad_crop', f'the HRAvatar box of the first frame\'s face misses the '
                         f'{info.width}x{info.height} frame')
      return
    window, padding = fitted
    size = float(np.max(points.max(0) - points.min(0)))
    note = (f'HRAvatar crop from the first frame\'s 68 landmarks (--bbox_scale {self.bbox_scale}): window '
            f'{list(window)}' + (f', padded {list(padding)} (left, top, right, bottom)' if any(padding) else ''))
    yield dataclasses.replace(task, window=window, padding=padding, crop_mode='first_frame',
                              face_box=box_in_square(points, window, padding), notes=task.notes + (note,),
                              face_stats=task.face_stats + (('source_face_px', size),))

  @staticmethod
  def _reject(task: ClipTask, reason: str, detail: str):
    return beam.pvalue.TaggedOutput('rejects', Reject(task.clip_id, STAGE, reason, detail[:500], task.source_id,
                                                      planned_id=task.planned_id))


class FirstFrameTrack(beam.PTransform):
  """ClipTasks without a window -> {'tasks': with HRAvatar's window, 'rejects'}: the avatar recipe's
  replacement for the spine's DetectAndTrack."""

  def __init__(self, landmarker: ModelHandler, bbox_scale: float):
    super().__init__()
    self.crop = FirstFrameCrop(landmarker, bbox_scale)

  def expand(self, tasks):
    cropped = tasks | 'FirstFrameCrop' >> beam.ParDo(DeadLetter(self.crop, STAGE)).with_outputs(
        'rejects', main='tasks')
    return {'tasks': cropped.tasks, 'rejects': cropped.rejects}


def rgba_png(image: np.ndarray, alpha: np.ndarray) -> bytes:
  """RGB premultiplied by alpha, alpha as the fourth channel, PNG bytes (deterministic for the same pixels)."""
  a = np.clip(alpha, 0.0, 1.0)[..., None]
  rgb = np.rint(image.astype(np.float32) * a).astype(np.uint8)
  bgra = np.concatenate([rgb[..., ::-1], np.rint(a * 255).astype(np.uint8)], axis=2)
  ok, data = cv2.imencode('.png', bgra)
  if not ok:
    raise ValueError(f'PNG encoding failed for a frame of shape {image.shape}')
  return data.tobytes()


class _AvatarPass(ClipPass):

  def __init__(self, archive: FrameArchive, session: Optional[MattingSession], drop_cloth: bool, num_frames: int):
    self.archive = archive
    self.session = session
    self.drop_cloth = drop_cloth
    self.coverage = np.full((num_frames,), np.nan, np.float32)
    self.errors = 0
    self.last_error = ''

  def add(self, frames: List[Frame]) -> None:
    mattes = self.session.matte([frame.image for frame in frames]) if self.session else \
        [frame.found.get('person') for frame in frames]
    for frame, matte in zip(frames, mattes):
      parsing = frame.found.get('parsing')
      if isinstance(matte, ModelError) or matte is None or parsing is None:
        # The frame keeps its place (keypoints are numbered with it) with nothing marked as the person.
        self.errors += 1
        self.last_error = matte.detail if isinstance(matte, ModelError) else \
            f'no {"person matte" if matte is None else "face parsing"} for frame {frame.index}'
        alpha = np.zeros(frame.image.shape[:2], np.float32)
      else:
        alpha = np.asarray(matte, np.float32) * foreground(parsing, self.drop_cloth)
        if frame.index < len(self.coverage):
          self.coverage[frame.index] = float(alpha.mean())
      self.archive.add('image/' + frame_name(frame.index), rgba_png(frame.image, alpha))

  def finish(self, num_frames: int) -> PassResult:
    return PassResult({'alpha_coverage': self.coverage[:num_frames]}, self.errors, self.last_error,
                      files={ARCHIVE: self.archive.close()})

  def abandon(self) -> None:
    self.archive.discard()


class AvatarFrames(FrameAnalyzer):
  """RGBA frames (matte x parsing foreground) into the clip's frame archive, after the parsing analyzers.

  `matting` is an RVM handler (model_handlers/matting.py) or None for the segmentation's person mask.
  `alpha_coverage` (the mean alpha per frame) goes with the clip's arrays.
  """

  name = 'avatar_frames'

  def __init__(self, work_dir: str, matting: Optional[ModelHandler], drop_cloth: bool = False):
    self.work_dir = work_dir
    self.model = SharedModel(matting) if matting is not None else None
    self.drop_cloth = drop_cloth
    self.batch_size = 16 if matting is not None else 1  # RVM's chunk on a GPU; the CPU cuts it smaller

  def setup(self) -> None:
    if self.model is not None:
      self.model.setup()

  def start(self, task: ClipTask, num_frames: int, size: int) -> ClipPass:
    session = MattingSession(self.model) if self.model is not None else None
    return _AvatarPass(FrameArchive(archive_uri(self.work_dir, task.clip_id, ARCHIVE)), session,
                       self.drop_cloth, num_frames)
