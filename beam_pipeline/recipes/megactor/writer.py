"""MegActor's training samples on the shard writer: DWPose-layout keypoints, a styled and a face-swapped copy.

MegActor's four scripts each read and rewrite whole tars (pack, DWPose, style transfer, face swap) and keep
their arrays as pickles (`.pyd`). Here every kept clip gets, in one pass over the kept clips:
- `dwpose_result.npy` (T, 134, 2), `dwpose_score.npy` (T, 134), `faces_bbox.npy` (T, 4): from the DWPose
  analyzer of the render pass when its ONNX files were given (all 134 points), else the offline default: the
  68 face points at 24-91 from the face landmarker (score 1 where the face was found, 0 elsewhere) and the
  face box of its mesh;
- `mp4_styled` (stylize.py) and, with --faceswap_cmd, `swapped.mp4` (faceswap.py),
  made in the work dir by `MakeCopies` and packed by `AssembleMegactorSample` (the spine's AssembleSample with
  these members added), then published by the spine's WriteShards.
No pickle is written.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
from typing import Dict, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from beam_pipeline.recipes.megactor.dwpose import NUM_POINTS, face_only_keypoints, faces_bbox
from beam_pipeline.recipes.megactor.stylize import StyleFailed, stylize_clip
from model_handlers.in_process import SharedModel
from transforms.core.elements import ReasonError, Reject
from transforms.core.fileio import delete_quietly, put_file, read_bytes
from transforms.frame_analysis import ClipPass, Frame, ModelAnalyzer, ModelPass, PassResult
from transforms.writers.shards import AssembleSample, sample_key

STAGE = 'megactor'
COPIES = 'megactor'  # work-dir folder of the styled and swapped copies
KEYPOINT_ARRAYS = ('dwpose_result', 'dwpose_score', 'faces_bbox')
STYLED, SWAPPED = 'mp4_styled', 'swapped.mp4'
NO_SWAP = 'no --faceswap_cmd was given'


# ----------------------------------------------------------------------------- keypoints

class _DWPosePass(ModelPass):
  """One clip's DWPose results, packed as they come; frames the model failed on stay zero with score 0."""

  def __init__(self, model: SharedModel, num_frames: int):
    super().__init__(model)
    self.keypoints = np.zeros((num_frames, NUM_POINTS, 2), np.float32)
    self.scores = np.zeros((num_frames, NUM_POINTS), np.float32)

  def take(self, frame: Frame, result) -> None:
    if frame.index < len(self.scores):
      self.keypoints[frame.index], self.scores[frame.index] = result.keypoints, result.scores

  def finish(self, num_frames: int) -> PassResult:
    keypoints, scores = self.keypoints[:num_frames], self.scores[:num_frames]
    return self.result({'dwpose_result': keypoints, 'dwpose_score': scores,
                        'faces_bbox': faces_bbox(keypoints, scores)})


class DWPoseKeypoints(ModelAnalyzer):
  """DWPose (model_handlers/dwpose.DWPoseHandler) on every output frame of the render pass: no second decode."""

  name = 'dwpose'

  def start(self, task, num_frames: int, size: int) -> ClipPass:
    return _DWPosePass(self.model, num_frames)


def keypoint_arrays(arrays: Dict[str, np.ndarray]) -> Tuple[Dict[str, np.ndarray], str]:
  """The sample's three DWPose-layout arrays and where they came from ('dwpose' or 'face_landmarker')."""
  if all(name in arrays for name in KEYPOINT_ARRAYS):
    return {name: arrays[name] for name in KEYPOINT_ARRAYS}, 'dwpose'
  keypoints, scores = face_only_keypoints(arrays['lmk68'])
  boxes = np.nan_to_num(np.asarray(arrays['bbox'], np.float32), nan=0.0)  # zeros where no face, as DWPose's
  return {'dwpose_result': keypoints, 'dwpose_score': scores, 'faces_bbox': boxes}, 'face_landmarker'


# ----------------------------------------------------------------------------- styled and swapped copies

def copy_uri(work_dir: str, clip_id: str, member: str) -> str:
  return FileSystems.join(work_dir, COPIES, f'{sample_key(clip_id)}.{member}')


def _local_clip(uri: str, scratch: str) -> str:
  """A local path of the rendered mp4 (copied into `scratch` when it lives in an object store)."""
  if '://' not in uri:
    return uri
  path = os.path.join(scratch, 'clip.mp4')
  with open(path, 'wb') as out:
    out.write(read_bytes(uri))
  return path


class MakeCopies(beam.DoFn):
  """filters.Analysis -> the same Analysis with `mp4_styled` (and `swapped.mp4`) in the work dir, named in its
  clip's `files`; or a Reject (style_failed, or the face swap's reason). A copy already in the work dir
  (published atomically, named from the clip id) is not made again."""

  def __init__(self, work_dir: str, styler, faceswap=None, crf: int = 18, preset: str = 'veryfast'):
    self.work_dir = work_dir
    self.styler = styler
    self.faceswap = faceswap
    self.crf = crf
    self.preset = preset
    self.styled = Metrics.counter(STAGE, 'clips_styled')
    self.swapped = Metrics.counter(STAGE, 'clips_swapped')

  def setup(self):
    self.styler.setup()

  def process(self, analysis):
    clip = analysis.clip
    clip_id = clip.task.clip_id
    files = dict(clip.files)
    scratch = tempfile.mkdtemp(prefix='megactor-')
    try:
      source = _local_clip(clip.mp4_uri, scratch)
      files[STYLED] = self._styled(clip_id, source, scratch)
      if self.faceswap is not None:
        files[SWAPPED] = self._swapped(clip_id, source, scratch)
    except CopyFailed as error:
      delete_quietly([clip.mp4_uri, *files.values()])
      yield beam.pvalue.TaggedOutput('rejects', Reject(clip_id, STAGE, error.reason, str(error)[:500],
                                                       clip.task.source_id, clip.task.planned))
      return
    finally:
      for name in os.listdir(scratch):
        os.unlink(os.path.join(scratch, name))
      os.rmdir(scratch)
    yield dataclasses.replace(analysis, clip=dataclasses.replace(clip, files=files))

  def _styled(self, clip_id: str, source: str, scratch: str) -> str:
    target = copy_uri(self.work_dir, clip_id, STYLED)
    if FileSystems.exists(target):
      return target
    local = os.path.join(scratch, 'styled.mp4')
    try:
      stylize_clip(source, local, self.styler.for_clip(clip_id), crf=self.crf, preset=self.preset)
    except StyleFailed as error:
      raise CopyFailed('style_failed', f'styling failed: {error}') from error
    put_file(local, target, move=True)
    self.styled.inc()
    return target

  def _swapped(self, clip_id: str, source: str, scratch: str) -> str:
    target = copy_uri(self.work_dir, clip_id, SWAPPED)
    if FileSystems.exists(target):
      return target
    local = os.path.join(scratch, 'swapped.mp4')
    failure = self.faceswap.swap(clip_id, source, local)
    if failure is not None:
      raise CopyFailed(*failure)
    put_file(local, target, move=True)
    self.swapped.inc()
    return target


class CopyFailed(ReasonError):
  """A styled or swapped copy that could not be made; `reason` is the reject code."""


# ----------------------------------------------------------------------------- the sample

class AssembleMegactorSample(AssembleSample):
  """The spine's sample plus MegActor's members: the three keypoint arrays as .npy, `mp4_styled` and, when
  made, `swapped.mp4`; the json says where the keypoints came from, the style, and the face swapped in (or
  why there is no swapped copy)."""

  def __init__(self, work_dir: str, style: str, faceswap=None):
    super().__init__(work_dir)
    self.style = style
    self.faceswap = faceswap

  def extra_members(self, analysis, meta: dict):
    arrays, origin = keypoint_arrays(analysis.arrays)
    files = analysis.clip.files
    members = {f'{name}.npy': array for name, array in arrays.items()}
    members[STYLED] = read_bytes(files[STYLED])
    meta['keypoints'] = {'layout': 'dwpose_134', 'source': origin, 'face': [24, 92]}
    meta['styled'] = self.style
    if SWAPPED in files:
      members[SWAPPED] = read_bytes(files[SWAPPED])
      source = self.faceswap.source_for(analysis.clip.task.clip_id)
      meta['swapped'] = {'member': SWAPPED, 'source_image': os.path.basename(source) if source else None}
    else:
      meta['swapped'] = None
      meta['swapped_why'] = NO_SWAP
    return members, tuple(files[name] for name in (STYLED, SWAPPED) if name in files)
