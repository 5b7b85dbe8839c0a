"""The avatar recipe's RGBA frames (matte x face-parsing foreground), written in the render pass.

`AvatarFrames` follows the landmarker and the person segmentation and face parsing analyzers in the
render pass and makes each frame's alpha: the person matte (RobustVideoMatting when `--matting_weights` is
given, carried frame to frame within the clip; else the segmentation's person mask) times the parsing
foreground (every class but background; `--mask_clothes` drops the cloth class too), RGB premultiplied, as
HRAvatar's `merge_maks`. Alpha is 0 on the black padding where the box ran past the frame (the matte takes
that band for the person). Frames go into the clip's frame archive (transforms/core/frame_store.py) as
`image/%05d.png` RGBA; the writer lays them out once the clip passed its filters.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import cv2
import numpy as np
from apache_beam.ml.inference.base import ModelHandler

from beam_pipeline.recipes.avatar.matting import MattingSession
from model_handlers.in_process import ModelError, SharedModel
from transforms.analyzers.parsing import foreground
from transforms.core.elements import ClipTask
from transforms.core.frame_store import FrameArchive, archive_uri
from transforms.frame_analysis import ClipPass, Frame, FrameAnalyzer, PassResult
from transforms.render import picture_box

ARCHIVE = 'avatar'  # the clip's frame archive: <work_dir>/frames/<clip>.avatar.tar


def frame_name(index: int) -> str:
  return f'{index:05d}.png'


def rgba_png(image: np.ndarray, alpha: np.ndarray) -> bytes:
  """RGB premultiplied by alpha (float32, rounded half to even), alpha x 255 as the fourth channel, PNG bytes
  (deterministic for the same pixels). OpenCV does the arithmetic a block at a time, without numpy's full-frame
  float temporaries (and their page faults), with the same float32 products and rounding."""
  a = np.clip(np.asarray(alpha, np.float32), 0.0, 1.0)
  premultiplied = cv2.multiply(cv2.cvtColor(image, cv2.COLOR_RGB2BGR), cv2.merge([a, a, a]), dtype=cv2.CV_8U)
  bgra = cv2.merge([premultiplied, np.rint(a * 255).astype(np.uint8)])
  ok, data = cv2.imencode('.png', bgra)
  if not ok:
    raise ValueError(f'PNG encoding failed for a frame of shape {image.shape}')
  return data.tobytes()


class _AvatarPass(ClipPass):

  def __init__(self, archive: FrameArchive, session: Optional[MattingSession], drop_cloth: bool, num_frames: int,
               picture: Tuple[int, int, int, int]):
    self.archive = archive
    self.picture = picture
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
        x0, y0, x1, y1 = self.picture
        alpha[:y0], alpha[y1:], alpha[:, :x0], alpha[:, x1:] = 0, 0, 0, 0
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

  `matting` is an RVM handler (beam_pipeline/recipes/avatar/matting.py) or None for the segmentation's person mask.
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
                       self.drop_cloth, num_frames, picture_of(task, size))


def picture_of(task: ClipTask, size: int) -> Tuple[int, int, int, int]:
  """(x0, y0, x1, y1) of the output frame that is picture, not padding (the whole frame for a following window)."""
  if task.window is None or task.path:
    return 0, 0, size, size
  return picture_box(task.window, task.padding, size)
