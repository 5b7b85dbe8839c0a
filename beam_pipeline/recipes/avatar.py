"""`avatar`: HRAvatar-style subject folders (its crop_and_matting.py, keypoint and iris scripts, FLAME fit).

On the spine: HRAvatar's crop replaces face detection and tracking (one box per subject, from the first frame
of its earliest clip, for all of its clips: transforms/avatar.FirstFrameTrack, transforms/subject_window.py);
the render pass adds the person segmentation and face parsing analyzers, then `AvatarFrames` (RGBA frames:
matte x parsing foreground, into a per-clip archive); the writer lays out one folder per source video with
keypoint.json, iris.json and, given `--flame_model`, the FLAME fit (transforms/writers/avatar.py).

Defaults: HRAvatar's 512 x 512 frames at 25 fps.
"""
from __future__ import annotations

from beam_pipeline.recipes.base import Recipe

TRACKER_FACES = 4  # faces the first-frame landmarker reports; the largest gives the crop


class Avatar(Recipe):
  name = 'avatar'
  layout = 'folders'
  defaults = {'size': 512, 'fps': 25.0}

  def tracker(self, opts, detector):
    from model_handlers.mediapipe_face import FaceLandmarkerModelHandler
    from transforms.avatar import FirstFrameTrack
    landmarker = FaceLandmarkerModelHandler(model_dir=opts.model_dir, max_faces=TRACKER_FACES, max_batch_size=1)
    return FirstFrameTrack(landmarker, opts.bbox_scale, detector)

  def analyzers(self, opts, landmarker):
    from beam_pipeline.pipeline import work_dir_of
    from transforms.avatar import AvatarFrames
    from transforms.parsing import parsing_analyzers
    matting = None
    if opts.matting_weights:
      from model_handlers import matting as rvm
      from model_handlers.weights import require
      require(opts.matting_weights, rvm.FLAG, rvm.WHAT)  # a wrong path fails here, before any work
      matting = rvm.MattingModelHandler(opts.matting_weights)
    return parsing_analyzers(opts) + [AvatarFrames(work_dir_of(opts), matting, opts.mask_clothes)]

  def write(self, kept, opts, work_dir: str):
    from transforms.writers.avatar import WriteAvatarFolders
    return kept | 'AvatarWriter' >> WriteAvatarFolders(opts.output, flame_fit(opts))


def flame_fit(opts):
  """The per-subject FLAME fit the writer runs when `--flame_model` is given, else None. The model is loaded
  here once, so wrong files fail before any work (a WeightsError naming the flag)."""
  if not opts.flame_model:
    return None
  from transforms.writers.avatar import SubjectFlameFit
  fit = SubjectFlameFit(opts.flame_model, opts.flame_landmarks, opts.trust_pickle, opts.size, opts.fx, opts.fy,
                        opts.cx, opts.cy, opts.shape_from, opts.flame_iterations)
  fit.layer()
  return fit


RECIPE = Avatar()
