"""`nerf`: AD-NeRF / RAD-NeRF / ER-NeRF per-subject folders (their `process_video.py`, tasks 1-9).

On the spine: the spine's face detection and tracking per clip without a given window, then one window for
all of a subject's clips (the union of their windows, given or tracked, square and fitted to the frame;
transforms/subject_window.py): AD-NeRF merges bc.jpg pixel by pixel over the subject's frames and places every
frame on one image plane, so a subject has one fixed framing, and is written whole (not while a clip of it
failed in a way a later run retries). In the render pass: the face parsing analyzers (person segmentation +
parsing), then `NerfFrames` (each frame's jpg and parsing into a per-clip archive, and the clip's partial
background), optionally depth; the writer lays out one folder per source video (writer.py).

Defaults: a wider crop than HDTF's (3.0 x the face box instead of 1.8) so that neck and shoulders are in
frame, as in the head-and-shoulders videos these models train on (the head about a third of the frame);
one face per subject (`--multi_face=largest`); 25 fps, the rate AD-NeRF's audio windows assume.
"""
from __future__ import annotations

from beam_pipeline.recipes.base import Recipe
from beam_pipeline.recipes.nerf.audio_features import CHECKS, parse_kinds
from beam_pipeline.recipes.nerf.depth import DepthMaps
from beam_pipeline.recipes.nerf.writer import NerfFrames, WriteNerfSubjects
from transforms.analyzers.parsing import parsing_analyzers
from transforms.core.layout import work_dir_of
from transforms.sampling import shot_detection
from transforms.subject_window import TrackedPerSubject, UnionOfWindows
from transforms.track import DetectAndTrack


class Nerf(Recipe):
  name = 'nerf'
  layout = 'folders'
  subjects = True
  defaults = {'crop_scale': 3.0, 'multi_face': 'largest', 'fps': 25.0}
  silent = 'nerf needs speech: AD-NeRF learns the face from the audio features of every frame'

  def tracker(self, opts, detector):
    per_clip = DetectAndTrack(detector, opts.crop_scale, opts.detect_fps, shot_detection(opts), opts.multi_face,
                              opts.max_gap / opts.fps, opts.min_duration, opts.crop_follow)
    return TrackedPerSubject(per_clip, UnionOfWindows())

  def analyzers(self, opts, landmarker):
    analyzers = parsing_analyzers(opts) + [NerfFrames(work_dir_of(opts), opts.fps)]
    if opts.depth:
      analyzers.append(DepthMaps.from_options(opts, work_dir_of(opts)))
    return analyzers

  def write(self, kept, opts, work_dir: str):
    models = {'hubert': opts.hubert_model, 'wav2vec': opts.wav2vec_model, 'deepspeech': opts.deepspeech_model}
    try:
      kinds = parse_kinds(opts.audio_features)
    except ValueError as error:
      raise SystemExit(f'--audio_features={opts.audio_features}: {error}') from None
    for kind in kinds:
      if kind in CHECKS:
        CHECKS[kind](models[kind])  # a missing or wrong model fails here, before any work
    return kept | 'NerfWriter' >> WriteNerfSubjects(opts.output, work_dir, opts.audio_features, opts.focal,
                                                    opts.val_every, opts.hubert_model, opts.wav2vec_model,
                                                    opts.deepspeech_model)


RECIPE = Nerf()
