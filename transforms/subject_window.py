"""A subject (a source video) as one unit for nerf and avatar: one crop window for all its clips, written whole.

A subject can have several clips (manifest clips, --max_clip_s pieces, face-track pieces), and per-clip tracking
or the manifest (HDTF's `crop_wh` is per clip) gives each its own window. AD-NeRF merges its background (bc.jpg)
pixel by pixel over all of a subject's frames and places every frame on one image plane; HRAvatar crops a whole
video with one box. So the recipe's tracker gets every clip, the ones with a given window too (--crop_mode=fixed,
or `auto` with a manifest window), the subject's tasks are grouped (`OneWindowPerSubject`: small elements, one
group per subject) and each gets the same window, chosen by a `SubjectWindowFn`:

- `UnionOfWindows` (nerf): the union of the clips' windows, given or tracked (and, with --crop_follow, of every
  place a tracked window went), made square and fitted to the frame (plan.fit_window: black padding where the
  square is larger than the frame). Given windows are the user's framing, so the union keeps all of each in view;
  only the clips without one are tracked. Each task's `face_box` is recomputed for the new window and its `path`
  cleared.
- beam_pipeline/recipes/avatar/track.EarliestFirstFrame (avatar): HRAvatar's box from the earliest clip's first
  frame, for every crop mode: a given window is not used (HRAvatar's training assumes its own framing).

A subject whose files differ in frame size (section downloads at different resolutions) gets one window per size,
since a window is in its file's pixels.

A subject's folder is written once, with all its clips numbered in time order, and never renumbered. So it waits
until every clip of it is settled: `HoldIncompleteSubjects` rejects the kept clips of a subject one of whose clips
failed in a way a later run retries (`PASSING_FAILURES`: a model, the network, a timeout, a crashed decoder) as
`subject_incomplete`, itself retried: the next run makes the whole subject. Published with a clip missing, the
subject could never take that clip (`subject_exists` on every later run).
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, List, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics

from transforms.core.elements import ClipTask, Padding, Reject, Window
from transforms.core.fileio import delete_quietly
from transforms.deadletter import DeadLetter
from transforms.lib.geometry import box_in_square, fit_window

STAGE = 'track'


def subject_key(task: ClipTask) -> Tuple[str, int, int]:
  """The group a task's window is shared in: its subject, and its file's frame size (windows are in its pixels)."""
  return task.source_id, task.media.info.width, task.media.info.height


def earliest_first(tasks: Iterable[ClipTask]) -> List[ClipTask]:
  return sorted(tasks, key=lambda task: (task.start, task.clip_id))


def reject(task: ClipTask, reason: str, detail: str) -> beam.pvalue.TaggedOutput:
  return beam.pvalue.TaggedOutput('rejects', Reject(task.clip_id, STAGE, reason, detail[:500], task.source_id,
                                                    planned_id=task.planned_id))


def face_box_in_source(task: ClipTask) -> Optional[np.ndarray]:
  """The tracked face's box (x0, y0, x1, y1) in source pixels from `task.face_box` (fractions of the output
  square; with --crop_follow, of where the window was, taken at its median place)."""
  if task.face_box is None:
    return None
  x, y, _, _ = task.window
  left, top, _, _ = task.padding
  origin = np.array([x - left, y - top], np.float64)
  if task.path:
    origin = np.median(np.array([(px, py) for _, px, py in task.path], np.float64), axis=0)
  return np.asarray(task.face_box, np.float64) * task.square_side + np.concatenate([origin, origin])


def with_window(task: ClipTask, window: Window, padding: Padding, note: str, **changes) -> ClipTask:
  """`task` cropped with the subject's window; its face box moved into the new square (unless `changes` sets
  one) and the --crop_follow path dropped: a subject's camera does not move."""
  if 'face_box' not in changes:
    box = face_box_in_source(task)
    changes['face_box'] = None if box is None else box_in_square(box.reshape(2, 2), window, padding)
  return dataclasses.replace(task, window=window, padding=padding, path=(), notes=task.notes + (note,), **changes)


class SubjectWindowFn(beam.DoFn):
  """((subject, width, height), ClipTasks) -> the same tasks with one window for all; `Reject`s on tag `rejects`.

  Subclasses give `choose(tasks)`: the tasks (earliest first) -> their outputs (tasks and rejects). Everything is
  worked out before the first output, so an unexpected error (under `DeadLetter`) rejects each of the subject's
  clips (`internal_error`, with its planned id) and none gets a window of its own.
  """

  def __init__(self):
    self.subjects = Metrics.counter(STAGE, 'subject_windows')

  def choose(self, tasks: List[ClipTask]) -> Iterable:
    raise NotImplementedError

  def process(self, keyed):
    _, tasks = keyed
    outputs = list(self.choose(earliest_first(tasks)))
    self.subjects.inc()
    yield from outputs


def union_window(tasks: Sequence[ClipTask]) -> Window:
  """(x, y, w, h) around every window of `tasks`, including each place a --crop_follow window went."""
  boxes = []
  for task in tasks:
    x, y, w, h = task.window
    boxes.append((x, y, x + w, y + h))
    boxes += [(px, py, px + w, py + h) for _, px, py in task.path]
  b = np.array(boxes, np.int64)
  x0, y0, x1, y1 = int(b[:, 0].min()), int(b[:, 1].min()), int(b[:, 2].max()), int(b[:, 3].max())
  return x0, y0, x1 - x0, y1 - y0


class UnionOfWindows(SubjectWindowFn):
  """nerf: the union of the subject's windows (given or tracked), square and fitted to the frame, for every clip."""

  def choose(self, tasks: List[ClipTask]) -> Iterable:
    info = tasks[0].media.info
    union = union_window(tasks)
    window, padding = fit_window(union, info.width, info.height)
    if len(tasks) == 1 and not tasks[0].path and (window, padding) == (tasks[0].window, tasks[0].padding):
      return tasks
    note = (f'one window for the subject\'s {len(tasks)} clip(s): the union {list(union)} of their windows, '
            f'square and fitted to the frame: {list(window)}'
            + (f', padded {list(padding)} (left, top, right, bottom)' if any(padding) else ''))
    return [with_window(task, window, padding, note) for task in tasks]


class OneWindowPerSubject(beam.PTransform):
  """ClipTasks with windows -> {'tasks': the same tasks, one window per subject (`assign` chooses it),
  'rejects'}."""

  def __init__(self, assign: SubjectWindowFn):
    super().__init__()
    self.assign = assign

  def expand(self, tasks):
    chosen = (tasks
              | 'KeyBySubject' >> beam.Map(lambda task: (subject_key(task), task))
              | 'GroupBySubject' >> beam.GroupByKey()
              | 'OneWindow' >> beam.ParDo(DeadLetter(self.assign, STAGE)).with_outputs('rejects', main='tasks'))
    return {'tasks': chosen.tasks, 'rejects': chosen.rejects}


class TrackedPerSubject(beam.PTransform):
  """A per-clip tracker (e.g. the spine's DetectAndTrack: {'tasks', 'rejects'}) for the tasks without a given
  window, then `OneWindowPerSubject(assign)` over all of them: a recipe's `tracker` (it gets every task)."""

  def __init__(self, tracker: beam.PTransform, assign: SubjectWindowFn):
    super().__init__()
    self.tracker = tracker
    self.assign = assign

  def expand(self, tasks):
    given, untracked = tasks | 'WindowGiven' >> beam.Partition(lambda task, _: 0 if task.window is not None else 1, 2)
    tracked = untracked | 'TrackClips' >> self.tracker
    shared = ((given, tracked['tasks'])
              | 'AllWindows' >> beam.Flatten()
              | 'OneWindowPerSubject' >> OneWindowPerSubject(self.assign))
    rejects = (tracked['rejects'], shared['rejects']) | 'SubjectTrackRejects' >> beam.Flatten()
    return {'tasks': shared['tasks'], 'rejects': rejects}


# A run's own failures, which a later run retries and may get past (a model, the network, a timeout, a decoder
# that crashed its worker, an unexpected error); other reasons are about the clip (its media, the filters).
INCOMPLETE = 'subject_incomplete'
PASSING_FAILURES = frozenset({
    'internal_error', 'model_error', 'decode_error', 'decoder_crash', 'render_timeout', 'download_timeout',
    'probe_timeout', 'http_error', 'unreachable', 'ytdlp_error', 'truncated', 'source_truncated', INCOMPLETE})


class _HoldClip(beam.DoFn):
  """A kept clip (transforms/filters.Analysis) -> itself, or `subject_incomplete` on tag `rejects` (its work-dir
  media removed: the next run renders it again) when its subject is in `held` ({source id: a failed clip})."""

  def __init__(self):
    self.held_clips = Metrics.counter('write', 'clips_held_for_their_subject')

  def process(self, analysis, held):
    task = analysis.clip.task
    failed = held.get(task.source_id)
    if failed is None:
      yield analysis
      return
    self.held_clips.inc()
    yield beam.pvalue.TaggedOutput('rejects', Reject(
        task.clip_id, 'write', INCOMPLETE, f'subject {task.source_id} is written only with all its clips, and '
        f'{failed} failed in a way a later run retries: that run makes the subject', task.source_id,
        planned_id=task.planned_id))
    delete_quietly([analysis.clip.mp4_uri, *analysis.clip.files.values()])


class HoldIncompleteSubjects(beam.PTransform):
  """(kept Analyses, the run's rejects before writing) -> {'kept': the clips of subjects none of whose clips
  failed with a `PASSING_FAILURES` reason, 'rejects': `subject_incomplete` for the kept clips of the others}.

  The failed subjects reach each clip as a side input of ids (small): no subject's clips meet on one worker."""

  def expand(self, inputs):
    kept, rejects = inputs
    held = (rejects
            | 'PassingFailures' >> beam.Filter(lambda reject: reject.reason in PASSING_FAILURES and reject.source_id)
            | 'BySubject' >> beam.Map(lambda reject: (reject.source_id, f'{reject.id} ({reject.reason})'))
            | 'OneFailurePerSubject' >> beam.CombinePerKey(min))
    out = kept | 'HoldClips' >> beam.ParDo(_HoldClip(), beam.pvalue.AsDict(held)).with_outputs('rejects', main='kept')
    return {'kept': out.kept, 'rejects': out.rejects}
