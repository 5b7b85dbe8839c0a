"""`avatar`: HRAvatar-style subject folders (its crop_and_matting.py, keypoint and iris scripts, FLAME fit).

On the spine: HRAvatar's crop replaces face detection and tracking (one box per subject, from the first frame
of its earliest clip, for all of its clips whatever the crop mode: track.FirstFrameTrack,
transforms/subject_window.py; a subject is written whole);
the render pass adds the person segmentation and face parsing analyzers, then `AvatarFrames` (RGBA frames:
matte x parsing foreground, into a per-clip archive); the writer lays out one folder per source video with
keypoint.json, iris.json and, given `--flame_model`, the FLAME fit as tracked_params.json (writer.py).

Defaults: HRAvatar's (its Data_Preprocessing.md): 512 x 512 frames at 30 fps, clothes masked out of the alpha,
its intrinsics and 100 shape and 100 expression components for the fit (flame_fit.py).
"""
from __future__ import annotations

from beam_pipeline.recipes.avatar import matting as rvm
from beam_pipeline.recipes.avatar.frames import AvatarFrames
from beam_pipeline.recipes.avatar.track import FirstFrameTrack
from beam_pipeline.recipes.avatar.writer import SubjectFlameFit, WriteAvatarFolders
from beam_pipeline.recipes.base import Recipe
from model_handlers.mediapipe_face import FaceLandmarkerModelHandler
from model_handlers.weights import require
from transforms.analyzers.parsing import parsing_analyzers
from transforms.core.layout import work_dir_of

TRACKER_FACES = 4  # faces the first-frame landmarker reports; the largest gives the crop


class Avatar(Recipe):
  name = 'avatar'
  layout = 'folders'
  subjects = True
  defaults = {'size': 512, 'fps': 30.0, 'mask_clothes': True}

  def tracker(self, opts, detector):
    landmarker = FaceLandmarkerModelHandler(model_dir=opts.model_dir, max_faces=TRACKER_FACES, max_batch_size=1)
    return FirstFrameTrack(landmarker, opts.bbox_scale, detector)

  def analyzers(self, opts, landmarker):
    matting = None
    if opts.matting_weights:
      require(opts.matting_weights, rvm.FLAG, rvm.WHAT)  # a wrong path fails here, before any work
      matting = rvm.MattingModelHandler(opts.matting_weights)
    return parsing_analyzers(opts) + [AvatarFrames(work_dir_of(opts), matting, opts.mask_clothes)]

  def write(self, kept, opts, work_dir: str):
    return kept | 'AvatarWriter' >> WriteAvatarFolders(opts.output, work_dir, subject_flame_fit(opts))


def subject_flame_fit(opts):
  """The per-subject FLAME fit the writer runs when `--flame_model` is given, else None. The model is loaded
  here once, so wrong files fail before any work (a WeightsError naming the flag)."""
  if not opts.flame_model:
    return None
  fit = SubjectFlameFit(opts.flame_model, opts.flame_landmarks, opts.trust_weight_pickles, opts.size, opts.fx, opts.fy,
                        opts.cx, opts.cy, opts.shape_from, opts.flame_iterations)
  fit.layer()
  fit.fixed_shape()
  return fit


RECIPE = Avatar()
