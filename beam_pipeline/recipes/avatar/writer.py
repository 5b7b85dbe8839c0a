"""The avatar recipe's writer: one HRAvatar/IMAvatar-layout folder per subject (source video).

`<output>/<subject>/`:
- `image/%05d.png`: RGBA frames (beam_pipeline/recipes/avatar/), numbered from 0 over the subject's kept clips in
  time order;
- `keypoint.json`: frame file name -> 68 [x, y] points in output pixels (IMAvatar's keypoint_detector.py
  layout);
- `iris.json`: frame file name -> [x, y, x, y], the subject's left iris centre (image right) then the right
  (IMAvatar's iris.py order, which its FLAME fit swaps into the landmark embedding's);
- with `--flame_model`: `tracked_params.json` (HRAvatar's), `flame_params.json` (IMAvatar's) and
  `flame_error.json` (the FLAME fit of the subject, flame_fit.py).
Every image has a face inside the picture: frames without one are filled in or cut out per clip (face_frames.py),
so the images, keypoints, irises and fitted frames are the same names, one to one.

Two steps, so that a subject's group is small: `StageAvatarClip` picks each kept clip's frames and parks their
points in a small work-dir archive (the Analysis, with its per-frame arrays and audio, goes no further);
`WriteSubject` gets the subject's `AvatarClip` references.

A subject is one folder unit (transforms/writers/folders.py): every file is written atomically with bytes that
depend only on the subject's kept clips, then the unit's index (one record per clip) last, then the clips'
work-dir media go. A retried bundle writes the same files; a unit an earlier attempt already published is
not written again (its clips' media may already be gone); a version an earlier run published before its clips
changed is re-made over (folders.py).
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from beam_pipeline.recipes.avatar import face_frames
from beam_pipeline.recipes.avatar.frames import ARCHIVE, frame_name, picture_of
from transforms.core.elements import ClipTask, Reject
from transforms.core.fileio import delete_quietly, read_bytes, write_atomic
from transforms.core.frame_store import FrameArchive, archive_uri, read_frame_archive
from transforms.deadletter import DeadLetter
from transforms.writers.folders import (
    UnitFiles, publish_unit, published_records, remade, same_version, tree, unpublish)
from transforms.writers.shards import sample_json

STAGE = 'write'
IMAGES = 'image'
FLAME_ERRORS = 'flame_error.json'  # per-frame landmark reprojection error of the FLAME fit
STAGED = 'avatar_points'  # the writer's per-clip archive of the kept frames' points
_FRAME_FILE = re.compile(r'(\d+)\.png$')


def _points(values: np.ndarray) -> list:
  """Rounded [[x, y], ...] of one frame."""
  if not np.isfinite(values).all():
    raise ValueError('a kept frame has no face: keypoint.json and iris.json hold a face for every image')
  return np.round(values.astype(np.float64), 3).tolist()


def keypoint_json(names: Sequence[str], lmk68: np.ndarray) -> bytes:
  """{frame name: 68 [x, y]} for (T, 68, 2) points."""
  return json.dumps({name: _points(points) for name, points in zip(names, lmk68)}, sort_keys=True).encode()


def iris_json(names: Sequence[str], iris: np.ndarray) -> bytes:
  """{frame name: [x, y, x, y]} for (T, 2, 2) iris centres in the spine's order (image left first): written
  image right first, as IMAvatar's iris.py does."""
  flat = {}
  for name, centres in zip(names, iris):
    flat[name] = [v for point in _points(centres[::-1]) for v in point]
  return json.dumps(flat, sort_keys=True).encode()


def _rounded(values: np.ndarray) -> list:
  return [None if not np.isfinite(v) else round(float(v), 3) for v in values]


class SubjectFlameFit:
  """keypoints (T, 68, 2), iris (T, 2, 2), frame names, joined (T - 1,) -> {tracked_params.json,
  flame_params.json, flame_error.json}: the subject's FLAME fit (flame_fit.py) on the worker's GPU when it has
  one. The FLAME layer loads once per process; `--shape_from` reuses another subject's fitted shape (its
  flame_params.json, as the seed's optimize.py)."""

  def __init__(self, model: str, landmarks: Optional[str], trust_weight_pickles: bool, size: int, fx: Optional[float],
               fy: Optional[float], cx: Optional[float], cy: Optional[float], shape_from: Optional[str] = None,
               iterations: int = 1000):
    self.model, self.landmarks, self.trust_weight_pickles = model, landmarks, trust_weight_pickles
    self.iterations = iterations
    self.size, self.focal = size, (fx, fy, cx, cy)
    self.shape_from = shape_from
    self._layer, self._shape = None, None
    self.seconds = Metrics.distribution(STAGE, 'avatar_flame_fit_ms')

  def layer(self):
    """The FLAME layer (a WeightsError naming the flag when the files are wrong)."""
    from beam_pipeline.recipes.avatar.flame import load_flame
    if self._layer is None:
      self._layer = load_flame(self.model, self.trust_weight_pickles, self.landmarks)
    return self._layer

  def __getstate__(self):
    return dict(self.__dict__, _layer=None)  # the layer is rebuilt on the worker, not shipped

  def fixed_shape(self) -> Optional[np.ndarray]:
    """`--shape_from`'s shape, read once (a WeightsError naming the flag when the folder has none)."""
    from beam_pipeline.recipes.avatar.flame_fit import PARAMS_NAME, read_shape
    from model_handlers.weights import WeightsError
    if self.shape_from and self._shape is None:
      path = FileSystems.join(self.shape_from, PARAMS_NAME)
      try:
        self._shape = read_shape(read_bytes(path))
      except (OSError, ValueError) as error:
        raise WeightsError('--shape_from', self.shape_from, f'needs the {PARAMS_NAME} of an avatar subject folder '
                           f'(HRAvatar\'s optimize.py output): {str(error)[:200]}') from error
      if self._shape.size > self.layer().num_shape:
        raise WeightsError('--shape_from', self.shape_from, f'its shape has {self._shape.size} components; the '
                           f'--flame_model has {self.layer().num_shape}')
    return self._shape

  def __call__(self, lmk68: np.ndarray, iris: np.ndarray, names: List[str], joined: np.ndarray) -> dict:
    from beam_pipeline.recipes.avatar.flame_fit import Intrinsics, fit_flame, seed_files
    rigid = self.iterations // 5
    fit = fit_flame(self.layer(), lmk68, iris, Intrinsics.for_size(self.size, *self.focal), shape=self.fixed_shape(),
                    rigid_iterations=rigid, iterations=self.iterations - rigid, joined=joined)
    self.seconds.update(int(fit.seconds * 1000))
    logging.info('FLAME fit of %d frames on %s in %.1f s: landmark error %.2f -> %.2f px', len(names), fit.device,
                 fit.seconds, np.nanmean(fit.error_before), np.nanmean(fit.error_after))
    per_frame = zip(names, _rounded(fit.error_before), _rounded(fit.error_after), _rounded(fit.iris_error))
    errors = {'frames': {name: {'before_px': before, 'after_px': after, 'iris_px': eye}
                         for name, before, after, eye in per_frame},
              'mean_before_px': _rounded([np.nanmean(fit.error_before)])[0],
              'mean_after_px': _rounded([np.nanmean(fit.error_after)])[0],
              'intrinsics': dataclasses.asdict(fit.intrinsics), 'shape_from': self.shape_from}
    return dict(seed_files(fit, names, lmk68, iris, self.size), **{
        FLAME_ERRORS: json.dumps(errors, sort_keys=True).encode()})


@dataclasses.dataclass(frozen=True)
class AvatarClip:
  """A kept clip waiting for its subject's writer: small (its points wait in `staged_uri`)."""
  task: ClipTask  # DeadLetter finds the clip it owes through this
  kept: int  # frames the subject keeps
  record: dict  # the index record less its subject and frame names
  staged_uri: str
  frames_uri: str
  consumed: Tuple[str, ...]  # work-dir media to delete once the subject is published


def _npy(values: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, values, allow_pickle=False)
  return buffer.getvalue()


def _load(staged: Dict[str, bytes], name: str) -> np.ndarray:
  return np.load(io.BytesIO(staged[name]), allow_pickle=False)


class StageAvatarClip(beam.DoFn):
  """Analysis -> (subject, AvatarClip): picks the frames with a face inside the picture (face_frames.py) and
  parks their points in the work dir; a clip with none left is a `Reject` on tag `rejects`."""

  def __init__(self, work_dir: str):
    self.work_dir = work_dir
    self.dropped = {reason: Metrics.counter(STAGE, f'avatar_frames_dropped_{reason}')
                    for reason in (face_frames.OUTSIDE, face_frames.NO_FACE)}
    self.filled = Metrics.counter(STAGE, 'avatar_frames_filled_in')

  def process(self, analysis):
    clip = analysis.clip
    task = clip.task
    chosen = face_frames.select(analysis.arrays['lmk68'], analysis.arrays['iris'], picture_of(task, clip.size),
                                face_frames.max_gap_frames(clip.fps))
    for reason, count in chosen.dropped.items():
      self.dropped[reason].inc(count)
    self.filled.inc(chosen.filled)
    media = (clip.mp4_uri, *sorted(clip.files.values()))
    if not chosen.keep.any():
      delete_quietly(media)
      reason = max(chosen.dropped, key=chosen.dropped.get) if chosen.dropped else 'no_frames'
      yield beam.pvalue.TaggedOutput('rejects', Reject(
          task.clip_id, STAGE, reason, f'no frame of {clip.num_frames} has its face inside the avatar crop '
          f'({_dropped_text(chosen.dropped)})', task.source_id, planned_id=task.planned_id))
      return
    staged = FrameArchive(archive_uri(self.work_dir, task.clip_id, STAGED))
    try:
      staged.add('keep.npy', _npy(chosen.keep))
      staged.add('lmk68.npy', _npy(chosen.lmk68))
      staged.add('iris.npy', _npy(chosen.iris))
      staged.add('joined.npy', _npy(chosen.joined))
      staged_uri = staged.close()
    finally:
      staged.discard()
    record = sample_json(analysis)
    record['avatar_frames'] = {'kept': int(chosen.keep.sum()), 'runs': chosen.runs(), 'dropped': chosen.dropped,
                               'filled_in': chosen.filled, 'max_gap_frames': face_frames.max_gap_frames(clip.fps)}
    yield task.source_id, AvatarClip(task, int(chosen.keep.sum()), record, staged_uri, clip.files[ARCHIVE],
                                     (*media, staged_uri))


def _dropped_text(dropped: Dict[str, int]) -> str:
  return ', '.join(f'{count} {reason}' for reason, count in sorted(dropped.items())) or 'none dropped'


def subject_record(clip: AvatarClip, subject: str, first_frame: int) -> dict:
  record = dict(clip.record)
  record.update(subject=subject, frames=[frame_name(first_frame), frame_name(first_frame + clip.kept - 1)])
  return record


class WriteSubject(beam.DoFn):
  """(subject, [AvatarClip]) -> one index record per clip, after the subject's folder is published; `Reject`s on
  tag `rejects` (`subject_exists` for every clip when an earlier run published the subject without them;
  run under DeadLetter, an unexpected failure is `internal_error` for every clip of the subject).

  `fit` (optional): keypoints (T, 68, 2), iris (T, 2, 2), frame names, joined (T - 1,) -> {file name: bytes} of
  the FLAME fit.
  """

  def __init__(self, output: str, fit: Optional[Callable[..., dict]] = None):
    self.output = output
    self.fit = fit
    self.subjects = Metrics.counter(STAGE, 'avatar_subjects')
    self.frames = Metrics.counter(STAGE, 'avatar_frames')

  def published(self, element) -> Optional[List[dict]]:
    """The subject's records when some attempt published its folder with these clips (DeadLetter: a concurrent
    attempt); not an earlier version of the subject this attempt re-makes."""
    records = published_records(self.output, element[0])
    return records if same_version(records, _versions(element[1])) else None

  def process(self, element):
    subject, analyses = element
    analyses = sorted(analyses, key=lambda a: (a.task.start, a.task.clip_id))
    published = published_records(self.output, subject)
    same = same_version(published, _versions(analyses))  # a retried bundle finds its subject published
    if published is not None and not same and not remade(published, _versions(analyses)):
      # clips added to a published subject would renumber its frames
      detail = (f'the subject folder {subject} was published by an earlier run with other clips '
                f'({len(published)}); write to another --output to make it with these')
      yield from self._rejects(analyses, 'subject_exists', detail)
      self._drop_media(analyses)
      return
    # An unexpected error here rejects each of the subject's clips (DeadLetter, with their planned ids).
    records = published if same else self._write(subject, analyses, published)
    self._drop_media(analyses)  # only once the unit is published: a retry may need them until then
    yield from records

  @staticmethod
  def _drop_media(analyses) -> None:
    for clip in analyses:
      delete_quietly(list(clip.consumed))

  @staticmethod
  def _rejects(analyses, reason: str, detail: str):
    for clip in analyses:
      task = clip.task
      yield beam.pvalue.TaggedOutput('rejects', Reject(task.clip_id, STAGE, reason, detail[:500], task.source_id,
                                                       planned_id=task.planned_id))

  def _write(self, subject: str, clips: List[AvatarClip], earlier: Optional[List[dict]]) -> List[dict]:
    """Writes the subject's folder and publishes it; `earlier`: the records of the version a run published
    before its clips changed, unpublished first and written over (transforms/writers/folders.py)."""
    if earlier is not None:
      unpublish(self.output, subject, earlier)
    files = UnitFiles(FileSystems.join(self.output, subject))
    names: List[str] = []
    records, lmk68, iris, joined = [], [], [], []
    ended, ended_kept = None, False  # where the previous clip ended, and whether its last frame was kept
    for clip in clips:
      staged = dict(read_frame_archive(clip.staged_uri))
      keep = _load(staged, 'keep.npy')
      records.append(subject_record(clip, subject, len(names)))
      count, seen = 0, 0
      for member, data in read_frame_archive(clip.frames_uri):
        local = int(_FRAME_FILE.search(member).group(1))
        if local != seen:
          raise ValueError(f'frame archive of {clip.task.clip_id} holds {member} where frame {seen} belongs')
        seen += 1
        if local < len(keep) and keep[local]:
          write_atomic(files.uri(IMAGES, frame_name(len(names) + count)), data)
          count += 1
      if seen != len(keep) or count != clip.kept:
        raise ValueError(f'frame archive of {clip.task.clip_id} holds {seen} of its {len(keep)} frames')
      names += [frame_name(len(names) + k) for k in range(count)]
      lmk68.append(_load(staged, 'lmk68.npy'))
      iris.append(_load(staged, 'iris.npy'))
      if len(lmk68) > 1:  # a piece that ends where the next starts (--max_clip_s) is one run with it
        joined.append(bool(ended_kept and keep[0] and abs(clip.task.start - ended) < 0.5 / clip.record['fps']))
      joined += _load(staged, 'joined.npy').tolist()
      ended, ended_kept = clip.task.end, bool(keep[-1])
    lmk68, iris = np.concatenate(lmk68), np.concatenate(iris)
    write_atomic(files.uri('keypoint.json'), keypoint_json(names, lmk68))
    write_atomic(files.uri('iris.json'), iris_json(names, iris))
    if self.fit is not None:
      for file_name, data in sorted(self.fit(lmk68, iris, names, np.asarray(joined, bool)).items()):
        write_atomic(files.uri(file_name), data)
    # What an earlier version or an unpublished attempt left and this one does not write: frames past the new
    # count, a FLAME fit this run does not make.
    files.drop_others(tree(files.root))
    published = publish_unit(self.output, subject, records)
    self.subjects.inc()
    self.frames.inc(len(names))
    return published


def _versions(clips) -> List[Tuple[str, str]]:
  return [(clip.task.clip_id, clip.task.inputs) for clip in clips]


class WriteAvatarFolders(beam.PTransform):
  """Kept clips (transforms/filters.Analysis) -> {'records', 'rejects'}: staged (`StageAvatarClip`: the clip's
  frames picked, its points parked in the work dir), grouped by subject (one group of small references per
  source video) and written by `WriteSubject`."""

  def __init__(self, output: str, work_dir: str, fit=None):
    super().__init__()
    self.stage = StageAvatarClip(work_dir)
    self.writer = WriteSubject(output, fit)

  def expand(self, kept):
    staged = kept | 'AvatarStageClips' >> beam.ParDo(DeadLetter(self.stage, STAGE)).with_outputs(
        'rejects', main='clips')
    written = (staged.clips
               | 'AvatarGroupSubjects' >> beam.GroupByKey()
               | 'AvatarWriteSubjects' >> beam.ParDo(DeadLetter(self.writer, STAGE)).with_outputs(
                   'rejects', main='records'))
    rejects = (staged.rejects, written.rejects) | 'AvatarWriterRejects' >> beam.Flatten()
    return {'records': written.records, 'rejects': rejects}

