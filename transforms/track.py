"""Face tracks on the sampled detector frames, and one stable crop window per track.

IoU tracking within shots, splits where a face is lost for longer than `--max_gap` frames, the
`--multi_face` policy.

A planned clip becomes one clip per kept track (a "piece"). A single piece keeps the planned clip's id;
several pieces are named from their start time, `<clip>_f<start in ms>` (see `piece_ids`), so a rerun
with the same options names them the same whatever else changed. Pieces shorter than `--min_duration`
are rejected (`too_short`). Each piece (task or reject) carries its planned clip id, so the run summary
counts a planned clip once however it was split.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Iterable, List, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler
from scipy import ndimage

from transforms.core.elements import ClipTask, FaceSamples, Reject
from transforms.deadletter import DeadLetter
from transforms.lib.geometry import square_window
from transforms.sampling import SampleFrames

STAGE = 'track'
MIN_IOU = 0.3  # a detection continues a track when it overlaps the track's last box at least this much
MIN_TRACK_SAMPLES = 2  # a face seen on a single sampled frame is detector noise, not a track
MULTI_FACE = ('largest', 'split', 'reject')


@dataclasses.dataclass
class Track:
  """One face, seen on consecutive sampled frames of one shot; boxes in source pixels."""
  times: List[float]
  boxes: List[np.ndarray]
  start: float = 0.0  # the piece of the clip this track covers, clip seconds
  end: float = 0.0

  def size(self) -> float:
    b = np.array(self.boxes)
    return float(np.median(np.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1])))

  def union(self) -> Tuple[float, float, float, float]:
    b = np.array(self.boxes)
    return float(b[:, 0].min()), float(b[:, 1].min()), float(b[:, 2].max()), float(b[:, 3].max())

  def overlaps(self, other: 'Track') -> bool:
    return min(self.end, other.end) > max(self.start, other.start)

  def centre_x(self) -> float:
    b = np.array(self.boxes)
    return float(np.median((b[:, 0] + b[:, 2]) / 2))


def iou(a: np.ndarray, b: np.ndarray) -> float:
  w = min(a[2], b[2]) - max(a[0], b[0])
  h = min(a[3], b[3]) - max(a[1], b[1])
  if w <= 0 or h <= 0:
    return 0.0
  inter = w * h
  return float(inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter))


def shot_ranges(cuts: Iterable[float], duration: float) -> List[Tuple[float, float]]:
  bounds = [0.0] + sorted(c for c in cuts if 0 < c < duration) + [duration]
  return list(zip(bounds, bounds[1:]))


def track_faces(samples: Sequence[Tuple[float, np.ndarray]], cuts: Iterable[float], duration: float,
                interval: float, max_gap_s: float) -> List[Track]:
  """Greedy IoU tracking of every face box, shot by shot; each track gets the piece of clip it covers.

  A track continues only while its face is missing for at most `max_gap_s` between detections
  (`interval` is the sampling step). A piece starts at the shot start when the face is on the shot's
  first sample, else halfway from the last sample without it; it ends likewise.
  """
  samples = sorted(samples, key=lambda s: s[0])
  tracks: List[Track] = []
  for shot_start, shot_end in shot_ranges(cuts, duration):
    in_shot = [(t, boxes) for t, boxes in samples if shot_start <= t < shot_end]
    times = [t for t, _ in in_shot]
    shot_tracks: List[Track] = []
    for t, boxes in in_shot:
      alive = [tr for tr in shot_tracks if t - tr.times[-1] - interval <= max_gap_s + 1e-6]
      pairs = sorted(((iou(tr.boxes[-1], box), i, j) for i, tr in enumerate(alive) for j, box in enumerate(boxes)),
                     reverse=True)
      taken_tracks, taken_boxes = set(), set()
      for overlap, i, j in pairs:
        if overlap < MIN_IOU:
          break
        if i in taken_tracks or j in taken_boxes:
          continue
        alive[i].times.append(t)
        alive[i].boxes.append(boxes[j])
        taken_tracks.add(i)
        taken_boxes.add(j)
      shot_tracks += [Track([t], [box]) for j, box in enumerate(boxes) if j not in taken_boxes]
    for tr in shot_tracks:
      first, last = times.index(tr.times[0]), times.index(tr.times[-1])
      tr.start = shot_start if first == 0 else (times[first - 1] + times[first]) / 2
      tr.end = shot_end if last == len(times) - 1 else (times[last] + times[last + 1]) / 2
    tracks += shot_tracks
  return tracks


def choose_tracks(tracks: List[Track], policy: str) -> Tuple[List[Track], Optional[str]]:
  """Apply --multi_face: (tracks to keep, or a reject detail when faces share the screen under `reject`)."""
  if policy in ('split', 'speaker'):  # speaker: every face is rendered, transforms/speaker.py keeps the one speaking
    return tracks, None
  if policy == 'reject':
    for i, a in enumerate(tracks):
      for b in tracks[i + 1:]:
        if a.overlaps(b):
          return [], (f'two faces on screen together from {max(a.start, b.start):.2f}s to '
                      f'{min(a.end, b.end):.2f}s (--multi_face=reject)')
    return tracks, None
  kept: List[Track] = []
  # The dominant face first: size times time on screen, so a fragment of a face sliding past does not
  # outrank the speaker it overlaps.
  for tr in sorted(tracks, key=lambda t: (-t.size() * (t.end - t.start), t.start)):
    if not any(tr.overlaps(k) for k in kept):
      kept.append(tr)
  return kept, None


def follow_path(track: Track, side: int, smooth_s: float, width: int,
                height: int) -> Tuple[Tuple[float, int, int], ...]:
  """--crop_follow: (piece time, left, top) of a fixed-size window whose centre follows the face,
  Gaussian-smoothed over `smooth_s` seconds so it glides instead of jittering."""
  b = np.array(track.boxes)
  times = np.array(track.times)
  centres = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], 1)
  steps = np.diff(times)
  sigma = smooth_s / float(np.median(steps)) if len(steps) else 0.0
  if sigma > 0:
    centres = ndimage.gaussian_filter1d(centres, sigma, axis=0, mode='nearest')
  left = np.clip(np.round(centres[:, 0] - side / 2), 0, width - side).astype(int)
  top = np.clip(np.round(centres[:, 1] - side / 2), 0, height - side).astype(int)
  return tuple((round(float(t - track.start), 4), int(x), int(y)) for t, x, y in zip(times, left, top))


def piece_ids(clip_id: str, pieces: Sequence[Track]) -> List[str]:
  """Ids for a planned clip's kept tracks: the clip's own id for a single piece, else `<clip>_f<start in ms>`.

  Derived from the time range, not the order, so a piece found or lost earlier in the clip does not
  rename the others. Pieces that start together (faces on screen at once) get `_<k>` after it, numbered
  left to right by the face's median position. No dots: ids are webdataset keys.
  """
  if len(pieces) == 1:
    return [clip_id]
  starts = [int(round(tr.start * 1000)) for tr in pieces]
  together = collections.Counter(starts)
  ids = [''] * len(pieces)
  for start in together:
    same = sorted((i for i, s in enumerate(starts) if s == start), key=lambda i: pieces[i].centre_x())
    for k, i in enumerate(same):
      ids[i] = f'{clip_id}_f{start}' + (f'_{k}' if together[start] > 1 else '')
  return ids


def face_box_in_window(track: Track, window, path) -> Tuple[float, float, float, float]:
  """The track's median face box relative to its crop window (fractions of the side); with --crop_follow,
  relative to where the window was at each detection."""
  b = np.array(track.boxes, np.float64)
  if path:
    origins = np.array([(left, top) for _, left, top in path], np.float64)
  else:
    origins = np.array([window[:2]] * len(b), np.float64)
  relative = (b - np.concatenate([origins, origins], axis=1)) / window[2]
  return tuple(round(float(v), 4) for v in np.median(relative, axis=0))


class TrackFaces(beam.DoFn):
  """FaceSamples -> a ClipTask per piece, `Reject`s on tag `rejects`."""

  def __init__(self, crop_scale: float, multi_face: str = 'largest', max_gap_s: float = 0.5,
               min_duration: float = 1.0, detect_fps: float = 5.0, crop_follow_s: float = 0.0):
    self.crop_scale = crop_scale
    self.multi_face = multi_face
    self.max_gap_s = max_gap_s
    self.min_duration = min_duration
    self.interval = 1.0 / detect_fps
    self.crop_follow_s = crop_follow_s
    self.no_face = Metrics.counter(STAGE, 'clips_without_face')
    self.split = Metrics.counter(STAGE, 'clips_split')
    self.dropped = Metrics.counter(STAGE, 'smaller_faces_dropped')

  def process(self, found: FaceSamples):
    # Every piece is worked out before the first goes out: an error part-way then rejects the planned
    # clip as a whole (DeadLetter) instead of leaving some pieces out and others unaccounted.
    yield from list(self._pieces(found.task, list(found.samples), found.cuts))

  def _pieces(self, task: ClipTask, faces: list, cuts: Tuple[float, ...]):
    info = task.media.info
    scale = np.array([info.width, info.height] * 2, np.float32)
    samples = [(t, boxes * scale) for t, boxes in faces]
    duration = task.end - task.start
    tracks = track_faces(samples, cuts, duration, self.interval, self.max_gap_s)
    tracks = [tr for tr in tracks if len(tr.times) >= MIN_TRACK_SAMPLES]
    if not tracks:
      self.no_face.inc()
      yield self._reject(task, task.clip_id, 'no_face', f'no face on two or more of {len(faces)} sampled frames')
      return
    kept, refused = choose_tracks(tracks, self.multi_face)
    if refused:
      yield self._reject(task, task.clip_id, 'multiple_faces', refused)
      return
    self.dropped.inc(len(tracks) - len(kept))
    kept.sort(key=lambda tr: (tr.start, tr.centre_x()))
    if len(kept) > 1:
      self.split.inc()
    for tr, piece_id in zip(kept, piece_ids(task.clip_id, kept)):
      if tr.end - tr.start < self.min_duration:
        yield self._reject(task, piece_id, 'too_short', f'face track {tr.start:.2f}s-{tr.end:.2f}s of '
                           f'{task.clip_id} is shorter than --min_duration {self.min_duration}s')
      else:
        yield self._task(task, tr, piece_id, len(kept), len(tracks) - len(kept), cuts, len(faces))

  @staticmethod
  def _reject(task: ClipTask, clip_id: str, reason: str, detail: str):
    # A piece accounts against the clip that was planned, also when `task` is itself a piece of it (a long
    # clip cut at planning).
    planned_id = task.planned if clip_id != task.clip_id else task.planned_id
    return beam.pvalue.TaggedOutput('rejects', Reject(clip_id, STAGE, reason, detail, task.source_id,
                                                      planned_id=planned_id))

  def _task(self, task: ClipTask, tr: Track, piece_id: str, pieces: int, dropped: int, cuts, total: int):
    info = task.media.info
    window = square_window(tr.union(), task.crop_ratio or self.crop_scale, info.width, info.height)
    path = ()
    if self.crop_follow_s > 0:
      side = min(int(tr.size() * (task.crop_ratio or self.crop_scale)), info.width, info.height) // 2 * 2
      path = follow_path(tr, side, self.crop_follow_s, info.width, info.height)
      window = (path[0][1], path[0][2], side, side)
    samples_in = int(round((tr.end - tr.start) / self.interval)) or 1
    notes = list(task.notes)
    if pieces > 1 or tr.start > 0 or tr.end < task.end - task.start:
      notes.append(f'face track {tr.start:.2f}s-{tr.end:.2f}s of {task.clip_id} ({pieces} kept of '
                   f'{pieces + dropped} tracks, shot cuts at {[round(c, 2) for c in cuts]})')
    elif dropped:
      notes.append(f'{dropped} smaller face track(s) dropped (--multi_face=largest)')
    stats = (('detect_samples', float(total)), ('detect_face_ratio', min(1.0, len(tr.times) / samples_in)),
             ('source_face_px', tr.size()))
    return dataclasses.replace(
        task, clip_id=piece_id, planned_id=task.planned if piece_id != task.clip_id else task.planned_id,
        start=task.start + tr.start, end=task.start + tr.end, window=window, path=path, crop_mode='detect',
        notes=tuple(notes), face_stats=task.face_stats + stats, face_box=face_box_in_window(tr, window, path))


class SampleAndTrack(beam.PTransform):
  """ClipTasks without a window -> the ClipTasks `tracker` cuts from each clip's detector samples (tag
  `tasks`), and `rejects`. Per clip, one DoFn decodes the frames sampled at `detect_fps` and runs the
  detector on them in-process (no per-frame element), and `tracker` (a DoFn: FaceSamples -> ClipTasks)
  follows without a shuffle; an unexpected error in either is an `internal_error` reject of that clip.
  The spine's face tracks and mmvox's face tubes (beam_pipeline/recipes/mmvox/tubes.py) are two such trackers."""

  def __init__(self, detector: ModelHandler, detect_fps: float, shot_threshold: float, tracker: beam.DoFn,
               label: str, stage: str = STAGE):
    super().__init__()
    self.sampler = SampleFrames(detector, detect_fps, shot_threshold)
    self.tracker, self.label, self.stage = tracker, label, stage

  def expand(self, tasks):
    sampled = tasks | 'SampleFrames' >> beam.ParDo(DeadLetter(self.sampler, 'crop')).with_outputs(
        'rejects', main='samples')
    tracked = sampled.samples | self.label >> beam.ParDo(DeadLetter(self.tracker, self.stage)).with_outputs(
        'rejects', main='tasks')
    rejects = (sampled.rejects, tracked.rejects) | f'{self.label}Rejects' >> beam.Flatten()
    return {'tasks': tracked.tasks, 'rejects': rejects}


class DetectAndTrack(SampleAndTrack):
  """The spine's tracker: one ClipTask per face track, with its window (transforms/track.TrackFaces)."""

  def __init__(self, detector: ModelHandler, crop_scale: float, detect_fps: float, shot_threshold: float,
               multi_face: str, max_gap_s: float, min_duration: float, crop_follow_s: float = 0.0):
    super().__init__(detector, detect_fps, shot_threshold,
                     TrackFaces(crop_scale, multi_face, max_gap_s, min_duration, detect_fps, crop_follow_s),
                     'TrackFaces')
