"""The avatar recipe's writer: one HRAvatar/IMAvatar-layout folder per subject (source video).

`<output>/<subject>/`:
- `image/%05d.png`: RGBA frames (beam_pipeline/recipes/avatar/), numbered from 0 over the subject's kept clips in
  time order;
- `keypoint.json`: frame file name -> 68 [x, y] points in output pixels (IMAvatar's keypoint_detector.py
  layout; null for a frame without a face);
- `iris.json`: frame file name -> [x, y, x, y], the subject's left iris centre (image right) then the right
  (IMAvatar's iris.py order, which its FLAME fit swaps into the landmark embedding's); null without a face;
- with `--flame_model`: `flame_params.npz` and `flame_error.json` (the FLAME fit of the subject,
  beam_pipeline/recipes/avatar/flame.py).

A subject is one folder unit (transforms/writers/folders.py): every file is written atomically with bytes that
depend only on the subject's kept clips, then the unit's index (one record per clip) last, then the clips'
work-dir media go. A retried bundle writes the same files; a unit an earlier attempt already published is
not written again (its clips' media may already be gone).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
from typing import Callable, List, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from beam_pipeline.recipes.avatar.frames import ARCHIVE, frame_name
from transforms.core.elements import Reject
from transforms.core.fileio import delete_quietly, read_bytes, write_atomic
from transforms.core.frame_store import read_frame_archive
from transforms.deadletter import DeadLetter
from transforms.writers.folders import publish_unit, published_records
from transforms.writers.shards import sample_json

STAGE = 'write'
IMAGES = 'image'
FLAME_ERRORS = 'flame_error.json'  # per-frame landmark reprojection error of the FLAME fit
_FRAME_FILE = re.compile(r'(\d+)\.png$')


def _points(values: np.ndarray) -> Optional[list]:
  """Rounded [[x, y], ...] of one frame, or None where the face was not found (NaN)."""
  if np.isnan(values).any():
    return None
  return np.round(values.astype(np.float64), 3).tolist()


def keypoint_json(names: Sequence[str], lmk68: np.ndarray) -> bytes:
  """{frame name: 68 [x, y]} for (T, 68, 2) points."""
  return json.dumps({name: _points(points) for name, points in zip(names, lmk68)}, sort_keys=True).encode()


def iris_json(names: Sequence[str], iris: np.ndarray) -> bytes:
  """{frame name: [x, y, x, y]} for (T, 2, 2) iris centres in the spine's order (image left first): written
  image right first, as IMAvatar's iris.py does."""
  flat = {}
  for name, centres in zip(names, iris):
    points = _points(centres[::-1])
    flat[name] = None if points is None else [v for point in points for v in point]
  return json.dumps(flat, sort_keys=True).encode()


def _rounded(values: np.ndarray) -> list:
  return [None if not np.isfinite(v) else round(float(v), 3) for v in values]


class SubjectFlameFit:
  """keypoints (T, 68, 2), iris (T, 2, 2), frame names -> {flame_params.npz, flame_error.json}: the subject's
  FLAME fit (flame_fit.py) on the worker's GPU when it has one. The FLAME layer loads once per
  process; `--shape_from` reuses another subject's fitted shape."""

  def __init__(self, model: str, landmarks: Optional[str], trust_weight_pickles: bool, size: int, fx: Optional[float],
               fy: Optional[float], cx: Optional[float], cy: Optional[float], shape_from: Optional[str] = None,
               iterations: int = 1000):
    self.model, self.landmarks, self.trust_weight_pickles = model, landmarks, trust_weight_pickles
    self.iterations = iterations
    self.size, self.focal = size, (fx, fy, cx, cy)
    self.shape_from = shape_from
    self._layer = None
    self.seconds = Metrics.distribution(STAGE, 'avatar_flame_fit_ms')

  def layer(self):
    """The FLAME layer (a WeightsError naming the flag when the files are wrong)."""
    from beam_pipeline.recipes.avatar.flame import load_flame
    if self._layer is None:
      self._layer = load_flame(self.model, self.trust_weight_pickles, self.landmarks)
    return self._layer

  def __getstate__(self):
    return dict(self.__dict__, _layer=None)  # the layer is rebuilt on the worker, not shipped

  def __call__(self, lmk68: np.ndarray, iris: np.ndarray, names: List[str]) -> dict:
    from beam_pipeline.recipes.avatar.flame_fit import PARAMS_NAME, Intrinsics, fit_flame, read_shape
    shape = None
    if self.shape_from:
      shape = read_shape(read_bytes(FileSystems.join(self.shape_from, PARAMS_NAME)))
    rigid = self.iterations // 5
    fit = fit_flame(self.layer(), lmk68, iris, Intrinsics.for_size(self.size, *self.focal), shape=shape,
                    rigid_iterations=rigid, iterations=self.iterations - rigid)
    self.seconds.update(int(fit.seconds * 1000))
    logging.info('FLAME fit of %d frames on %s in %.1f s: landmark error %.2f -> %.2f px', len(names), fit.device,
                 fit.seconds, np.nanmean(fit.error_before), np.nanmean(fit.error_after))
    per_frame = zip(names, _rounded(fit.error_before), _rounded(fit.error_after), _rounded(fit.iris_error))
    errors = {'frames': {name: {'before_px': before, 'after_px': after, 'iris_px': eye}
                         for name, before, after, eye in per_frame},
              'mean_before_px': _rounded([np.nanmean(fit.error_before)])[0],
              'mean_after_px': _rounded([np.nanmean(fit.error_after)])[0],
              'intrinsics': dataclasses.asdict(fit.intrinsics), 'shape_from': self.shape_from}
    return {PARAMS_NAME: fit.to_npz_bytes(), FLAME_ERRORS: json.dumps(errors, sort_keys=True).encode()}


def subject_record(analysis, subject: str, first_frame: int) -> dict:
  record = sample_json(analysis)
  last = first_frame + analysis.clip.num_frames - 1
  record.update(subject=subject, frames=[frame_name(first_frame), frame_name(last)])
  return record


class WriteSubject(beam.DoFn):
  """(subject, [Analysis]) -> one index record per clip, after the subject's folder is published; `Reject`s on
  tag `rejects` (`subject_exists` for every clip when an earlier run published the subject with other clips;
  run under DeadLetter, an unexpected failure is `internal_error` for every clip of the subject).

  `fit` (optional): keypoints (T, 68, 2), iris (T, 2, 2), frame names -> {file name: bytes} of the FLAME fit.
  """

  def __init__(self, output: str, fit: Optional[Callable[[np.ndarray, np.ndarray, List[str]], dict]] = None):
    self.output = output
    self.fit = fit
    self.subjects = Metrics.counter(STAGE, 'avatar_subjects')
    self.frames = Metrics.counter(STAGE, 'avatar_frames')

  def published(self, element) -> Optional[List[dict]]:
    """The subject's records when some attempt published its folder (DeadLetter: a concurrent attempt)."""
    return published_records(self.output, element[0])

  def process(self, element):
    subject, analyses = element
    analyses = sorted(analyses, key=lambda a: (a.clip.task.start, a.clip.task.clip_id))
    published = published_records(self.output, subject)
    if published is not None and sorted(r['id'] for r in published) != sorted(a.clip.task.clip_id for a in analyses):
      detail = (f'the subject folder {subject} was published by an earlier run with other clips '
                f'({len(published)}); write to another --output to make it with these')
      yield from self._rejects(analyses, 'subject_exists', detail)
      self._drop_media(analyses)
      return
    # An unexpected error here rejects each of the subject's clips (DeadLetter, with their planned ids).
    records = published if published is not None else self._write(subject, analyses)
    self._drop_media(analyses)  # only once the unit is published: a retry may need them until then
    yield from records

  @staticmethod
  def _drop_media(analyses) -> None:
    for analysis in analyses:
      delete_quietly([analysis.clip.mp4_uri, *analysis.clip.files.values()])

  @staticmethod
  def _rejects(analyses, reason: str, detail: str):
    for analysis in analyses:
      task = analysis.clip.task
      yield beam.pvalue.TaggedOutput('rejects', Reject(task.clip_id, STAGE, reason, detail[:500], task.source_id,
                                                       planned_id=task.planned_id))

  def _write(self, subject: str, analyses) -> List[dict]:
    folder = FileSystems.join(self.output, subject)
    names: List[str] = []
    records, lmk68, iris = [], [], []
    for analysis in analyses:
      clip = analysis.clip
      records.append(subject_record(analysis, subject, len(names)))
      count = 0
      for member, data in read_frame_archive(clip.files[ARCHIVE]):
        local = int(_FRAME_FILE.search(member).group(1))
        if local != count:
          raise ValueError(f'frame archive of {clip.task.clip_id} holds {member} where frame {count} belongs')
        name = frame_name(len(names) + count)
        write_atomic(FileSystems.join(folder, IMAGES, name), data)
        count += 1
      if count != clip.num_frames:
        raise ValueError(f'frame archive of {clip.task.clip_id} holds {count} of its {clip.num_frames} frames')
      names += [frame_name(len(names) + k) for k in range(count)]
      lmk68.append(analysis.arrays['lmk68'])
      iris.append(analysis.arrays['iris'])
    lmk68, iris = np.concatenate(lmk68), np.concatenate(iris)
    self._drop_stale_frames(folder, len(names))
    write_atomic(FileSystems.join(folder, 'keypoint.json'), keypoint_json(names, lmk68))
    write_atomic(FileSystems.join(folder, 'iris.json'), iris_json(names, iris))
    if self.fit is not None:
      for file_name, data in sorted(self.fit(lmk68, iris, names).items()):
        write_atomic(FileSystems.join(folder, file_name), data)
    published = publish_unit(self.output, subject, records)
    self.subjects.inc()
    self.frames.inc(len(names))
    return published

  @staticmethod
  def _drop_stale_frames(folder: str, count: int) -> None:
    """Frames past `count` left by an unpublished earlier attempt that had more clips."""
    pattern = FileSystems.join(folder, IMAGES, '*.png')
    found = FileSystems.match([pattern])[0].metadata_list
    stale = [m.path for m in found if _FRAME_FILE.search(m.path) and int(_FRAME_FILE.search(m.path).group(1)) >= count]
    delete_quietly(stale)


class WriteAvatarFolders(beam.PTransform):
  """Kept clips (transforms/filters.Analysis) -> {'records', 'rejects'}: grouped by subject (one group per
  source video: a subject's clips meet on one worker, nothing more) and written by `WriteSubject`."""

  def __init__(self, output: str, fit=None):
    super().__init__()
    self.writer = WriteSubject(output, fit)

  def expand(self, kept):
    written = (kept
               | 'AvatarBySubject' >> beam.Map(lambda analysis: (analysis.clip.task.source_id, analysis))
               | 'AvatarGroupSubjects' >> beam.GroupByKey()
               | 'AvatarWriteSubjects' >> beam.ParDo(DeadLetter(self.writer, STAGE)).with_outputs(
                   'rejects', main='records'))
    return {'records': written.records, 'rejects': written.rejects}

