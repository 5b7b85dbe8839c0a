"""MegActor's training samples on the shard writer: DWPose keypoints per person, a styled and a face-swapped copy.

MegActor's scripts each read and rewrite whole tars (pack, DWPose, style transfer, face swap; for Sigma, the
audio packer and the DWPose curation) and keep their arrays as pickles (`.pyd`). Every kept clip gets here,
in one pass over the kept clips, the members its readers open (v1 `face_dataset.py`; Sigma `_preprocess.py`
`get_compact_frames`), pickled as MegActor's scripts pickle them (`--megactor_members=pyd`, the default):
- `dwpose_result.pyd`, `dwpose_score.pyd`: a list of T float32 arrays, (people, 134, 2) and (people, 134),
  largest person first; from the DWPose analyzer of the render pass when its ONNX files were given (all 134
  points, every person), else the offline default: one person, the 68 face points at 24-91 from the face
  landmarker (score 1 where the face was found, 0 elsewhere);
- `faces_bbox.pyd`: a list of T float32 (4,) boxes around person 0's face; `exist_face_frame_index.pyd`: a
  list of T bools, Sigma's frames to train on (one person, at least 60 face points seen);
- `fps.str`, and for a clip with sound `audio_frames.pyd` (float32 mono samples) and `sample_rate.str`;
- `mp4_styled` (stylize.py) and, with --faceswap_cmd, `swapped.mp4` (faceswap.py), made in the work dir by
  `MakeCopies` under names keyed by the style and the swap command, and packed by `AssembleMegactorSample`
  (the spine's AssembleSample with these members added), then published by the spine's WriteShards.
`--megactor_members=npy` writes person 0's arrays as `.npy` instead, and no pickle. Pickles are only written
here, from our own arrays; reading one from an input is what --read_input_pickles guards.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
import tempfile
from typing import Dict, List, Optional, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from beam_pipeline.recipes.megactor.dwpose import (FACE, VISIBLE_SCORE, WholeBody, face_only_keypoints, faces_bbox,
                                                   stack_results)
from beam_pipeline.recipes.megactor.stylize import StyleFailed, stylize_clip
from model_handlers.in_process import SharedModel
from transforms.core.elements import ReasonError, Reject
from transforms.core.fileio import delete_quietly, put_file, read_bytes
from transforms.frame_analysis import ClipPass, Frame, ModelAnalyzer, ModelPass, PassResult
from transforms.lib.features import wav_samples
from transforms.writers.shards import AssembleSample, sample_key

STAGE = 'megactor'
COPIES = 'megactor'  # work-dir folder of the styled and swapped copies
STYLED, SWAPPED = 'mp4_styled', 'swapped.mp4'
NO_SWAP = 'no --faceswap_cmd was given'
MEMBERS = ('pyd', 'npy')
# Sigma's curation (2_dwpose_filter_data_audio.py): a frame to train on has one person and at least this many
# of its 68 face points scoring 0.3 or more, away from the image's top and left edges.
SIGMA_FACE_POINTS, SIGMA_EDGE_PX = 60, 0.01


# ----------------------------------------------------------------------------- keypoints

class _DWPosePass(ModelPass):
  """One clip's DWPose results, kept as they come; frames the model failed on are one person of zeros."""

  def __init__(self, model: SharedModel, num_frames: int):
    super().__init__(model)
    self.results: List[Optional[WholeBody]] = [None] * num_frames

  def take(self, frame: Frame, result) -> None:
    if frame.index < len(self.results):
      self.results[frame.index] = result

  def finish(self, num_frames: int) -> PassResult:
    return self.result(stack_results(self.results[:num_frames]))


class DWPoseKeypoints(ModelAnalyzer):
  """DWPose (dwpose.DWPoseHandler) on every output frame of the render pass: no second decode."""

  name = 'dwpose'

  def start(self, task, num_frames: int, size: int) -> ClipPass:
    return _DWPosePass(self.model, num_frames)


@dataclasses.dataclass(frozen=True)
class Keypoints:
  """A clip's keypoints per frame, largest person first, and where they came from."""
  points: List[np.ndarray]  # T x (people, 134, 2) float32
  scores: List[np.ndarray]  # T x (people, 134) float32
  faces_bbox: np.ndarray  # (T, 4) float32 box of person 0's face, zeros where it was not seen
  source: str  # 'dwpose' or 'face_landmarker'

  def first_person(self) -> Tuple[np.ndarray, np.ndarray]:
    """(T, 134, 2), (T, 134): person 0 of every frame."""
    return np.stack([p[0] for p in self.points]), np.stack([s[0] for s in self.scores])

  def sigma_frames(self) -> List[bool]:
    """Sigma's `exist_face_frame_index`: per frame, one person whose face is seen."""
    flags = []
    for points, scores in zip(self.points, self.scores):
      face, seen = points[0, FACE], scores[0, FACE] >= VISIBLE_SCORE
      seen &= (face >= SIGMA_EDGE_PX).all(1)
      flags.append(bool(len(points) == 1 and seen.sum() >= SIGMA_FACE_POINTS))
    return flags


def clip_keypoints(arrays: Dict[str, np.ndarray]) -> Keypoints:
  """The sample's keypoints: DWPose's every person when it ran, else the face landmarker's one face."""
  if 'dwpose_people' in arrays:
    counts = arrays['dwpose_people']
    points = [np.ascontiguousarray(p[:n]) for p, n in zip(arrays['dwpose_result'], counts)]
    scores = [np.ascontiguousarray(s[:n]) for s, n in zip(arrays['dwpose_score'], counts)]
    return Keypoints(points, scores, faces_bbox(arrays['dwpose_result'][:, 0], arrays['dwpose_score'][:, 0]), 'dwpose')
  keypoints, scores = face_only_keypoints(arrays['lmk68'])
  boxes = np.nan_to_num(np.asarray(arrays['bbox'], np.float32), nan=0.0)  # zeros where no face, as DWPose's
  return Keypoints(list(keypoints[:, None]), list(scores[:, None]), boxes, 'face_landmarker')


def pyd_members(keypoints: Keypoints, clip) -> Dict[str, bytes]:
  """MegActor's pickled members (webdataset pickles `.pyd` values), Sigma's audio and fps strings: each the
  type its scripts write (lists of per-frame float32 arrays, a list of bools, a float32 waveform)."""
  members = {
      'dwpose_result.pyd': pickle.dumps(keypoints.points),
      'dwpose_score.pyd': pickle.dumps(keypoints.scores),
      'faces_bbox.pyd': pickle.dumps(list(keypoints.faces_bbox)),
      'exist_face_frame_index.pyd': pickle.dumps(keypoints.sigma_frames()),
      'fps.str': str(float(clip.fps)).encode(),
  }
  if clip.task.media.info.has_audio:
    samples, rate = wav_samples(clip.wav)
    members['audio_frames.pyd'] = pickle.dumps(np.ascontiguousarray(samples, np.float32))
    members['sample_rate.str'] = str(rate).encode()
  return members


def npy_members(keypoints: Keypoints) -> Dict[str, np.ndarray]:
  """Person 0's arrays as `.npy`, for users who want no pickles: (T, 134, 2), (T, 134), (T, 4)."""
  points, scores = keypoints.first_person()
  return {'dwpose_result.npy': points, 'dwpose_score.npy': scores, 'faces_bbox.npy': keypoints.faces_bbox}


# ----------------------------------------------------------------------------- styled and swapped copies

def copy_key(*parts) -> str:
  """A short digest of what made a copy (the style, the swap command and face), part of the copy's name."""
  return hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:12]


def style_key(style: str, prompt: Optional[str] = None, model: Optional[str] = None) -> str:
  """The styled copy's key: --style, and --style_prompt and --sdxl_model where the style reads them."""
  return copy_key(style, *((prompt, model) if style == 'sdxl_turbo' else ()))


def copy_uri(work_dir: str, clip_id: str, member: str, key: str) -> str:
  return FileSystems.join(work_dir, COPIES, f'{sample_key(clip_id)}.{key}.{member}')


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
  (published atomically, named from the clip id and what made it: `style_key`, the swap command and face) is
  not made again; one made with another style or command is not reused."""

  def __init__(self, work_dir: str, styler, style_id: str, faceswap=None, crf: int = 18, preset: str = 'veryfast'):
    self.work_dir = work_dir
    self.styler = styler
    self.style_id = style_id  # style_key() of the flags that made `styler`
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

  def target(self, clip_id: str, member: str) -> str:
    """Where the clip's copy `member` (STYLED or SWAPPED) is kept in the work dir."""
    if member == STYLED:
      return copy_uri(self.work_dir, clip_id, STYLED, self.style_id)
    return copy_uri(self.work_dir, clip_id, SWAPPED, copy_key(self.faceswap.argv, self.faceswap.source_for(clip_id)))

  def _styled(self, clip_id: str, source: str, scratch: str) -> str:
    target = self.target(clip_id, STYLED)
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
    target = self.target(clip_id, SWAPPED)
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
  """The spine's sample plus MegActor's members: the keypoints (`members` pyd or npy, see the module doc),
  `mp4_styled` and, when made, `swapped.mp4`; the json says where the keypoints came from, the style, and the
  face swapped in (or why there is no swapped copy)."""

  def __init__(self, work_dir: str, style: str, faceswap=None, members: str = 'pyd'):
    super().__init__(work_dir)
    if members not in MEMBERS:
      raise ValueError(f'--megactor_members {members!r} is not one of {MEMBERS}')
    self.style = style
    self.faceswap = faceswap
    self.members = members

  def extra_members(self, analysis, meta: dict):
    clip, files = analysis.clip, analysis.clip.files
    keypoints = clip_keypoints(analysis.arrays)
    members = pyd_members(keypoints, clip) if self.members == 'pyd' else npy_members(keypoints)
    members[STYLED] = read_bytes(files[STYLED])
    meta['keypoints'] = {'layout': 'dwpose_134', 'source': keypoints.source, 'face': [24, 92],
                         'members': self.members, 'most_people': max(len(p) for p in keypoints.points)}
    meta['styled'] = self.style
    if SWAPPED in files:
      members[SWAPPED] = read_bytes(files[SWAPPED])
      source = self.faceswap.source_for(clip.task.clip_id)
      meta['swapped'] = {'member': SWAPPED, 'source_image': os.path.basename(source) if source else None}
    else:
      meta['swapped'] = None
      meta['swapped_why'] = NO_SWAP
    return members, tuple(files[name] for name in (STYLED, SWAPPED) if name in files)
