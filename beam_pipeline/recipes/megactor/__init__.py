"""`megactor`: MegActor's VFHQ / CelebV packing as WebDataset shards (writer.py).

Inputs: a zip of frame folders (VFHQ layout, read at --fps: transforms/sources/frames.py), videos, or tars
of this format to re-process (transforms/sources/megactor_tars.py). The spine renders and filters the clips
(MegActor's eye-motion curation on by default); DWPose runs in the render pass when its ONNX files are
given; the kept clips get their styled and face-swapped copies and go to the shard writer, with MegActor's
pickled members (or `.npy` with --megactor_members=npy).
"""
from __future__ import annotations

import apache_beam as beam

from beam_pipeline.recipes.base import Recipe
from beam_pipeline.recipes.megactor.dwpose import DETECTOR_FLAG, POSE_FLAG, DWPoseHandler
from beam_pipeline.recipes.megactor.faceswap import FaceSwap
from beam_pipeline.recipes.megactor.stylize import make_styler
from beam_pipeline.recipes.megactor.writer import AssembleMegactorSample, DWPoseKeypoints, MakeCopies, style_key
from model_handlers.weights import require
from transforms.deadletter import DeadLetter
from transforms.writers.shards import write_shards


class Megactor(Recipe):
  name = 'megactor'
  # 30 fps as MegActor's packer; frame folders and many VFHQ clips have no audio; its eye-motion curation.
  defaults = {'fps': 30.0, 'eye_motion': True, 'allow_silent': True}

  def analyzers(self, opts, landmarker):
    gaze = []
    if opts.l2cs_weights:  # MegActor's own gaze model for the eye-motion score (torch, imported only then)
      from beam_pipeline.recipes.megactor.l2cs import FLAG, WHAT, L2CSGaze, L2CSModelHandler
      require(opts.l2cs_weights, FLAG, WHAT)
      gaze = [L2CSGaze(L2CSModelHandler(opts.l2cs_weights))]
    if not (opts.dwpose_detector or opts.dwpose_model):
      return gaze
    # Both files or none: a missing or mistyped one fails here, before any work.
    require(opts.dwpose_detector, DETECTOR_FLAG, 'the DWPose person detector yolox_l.onnx')
    require(opts.dwpose_model, POSE_FLAG, 'the DWPose whole-body model dw-ll_ucoco_384.onnx')
    return gaze + [DWPoseKeypoints(DWPoseHandler(opts.dwpose_detector, opts.dwpose_model))]

  def write(self, kept, opts, work_dir: str):
    styler = make_styler(opts.style, opts.sdxl_model, opts.style_prompt)
    faceswap = FaceSwap.from_options(opts) if opts.faceswap_cmd else None
    style_id = style_key(opts.style, opts.style_prompt, opts.sdxl_model)
    copies = kept | 'MegactorCopies' >> beam.ParDo(DeadLetter(MakeCopies(
        work_dir, styler, style_id, faceswap, opts.crf, opts.x264_preset), 'megactor')).with_outputs('rejects',
                                                                                                     main='kept')
    written = write_shards(copies.kept, opts.output, work_dir, opts.shard_max_samples, opts.shard_max_mb,
                           opts.shard_writers,
                           AssembleMegactorSample(work_dir, opts.style, faceswap, opts.megactor_members))
    rejects = (copies.rejects, written['rejects']) | 'MegactorRejects' >> beam.Flatten()
    return {'records': written['records'], 'rejects': rejects}


RECIPE = Megactor()
