"""Face tubes as Siarohin's video-preprocessing cuts VoxCeleb (crop_vox.py, util.py), for `--recipe=mmvox`.

A tube follows one face while its box overlaps the tube's FIRST box by at least 0.25 IoU; a lower overlap,
a frame without the face, a shot cut, or 1024 frames start a new tube. The tube's box is the union of its
boxes, enlarged by 0.1 on each side and made square (their `compute_aspect_preserved_bbox`), and the frames
are that square resized to 256x256. A tube is rejected when it has fewer than `--min_frames` frames
(`tube_too_short`), when the union's longer side is under `--min_tube_px` source pixels (`tube_too_small`),
or when the enlarged square leaves the frame (`tube_out_of_frame`: their default `max_pad=0`), in that order.

What differs: video-preprocessing runs the detector on every frame and picks, per frame, the detection
nearest VoxCeleb's annotated box. Here the spine's sampler (transforms/crop.SampleFrames) gives boxes every
1/--detect_fps seconds (the recipe defaults it to the output fps: every frame) and there is no annotation,
so a tube continues with the detection that best overlaps its first box and a new tube starts on the
largest face. Frame counts come from time (a tube spans from its first sample to the sample that ended it),
which equals their count when every frame is sampled.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler

from transforms.core.elements import ClipTask, FaceSamples, Reject, Window
from transforms.track import SampleAndTrack, Track, face_box_in_window, iou, piece_ids, shot_ranges

STAGE = 'tubes'
IOU_WITH_FIRST = 0.25  # video-preprocessing --iou_with_initial
MAX_TUBE_FRAMES = 1024  # video-preprocessing --max_frames
INCREASE = 0.1  # video-preprocessing --increase


def cut_tubes(samples: Sequence[Tuple[float, np.ndarray]], cuts: Sequence[float], duration: float, fps: float,
              max_frames: int = MAX_TUBE_FRAMES, min_iou: float = IOU_WITH_FIRST) -> List[Track]:
  """Tubes over (clip time, boxes (F, 4) in source pixels) samples, shot by shot; each gets the clip time
  range it covers (`start`, `end`): from its first sample (the shot's start for the shot's first sample) to
  the sample that ended it (the shot's end for its last)."""
  samples = sorted(samples, key=lambda s: s[0])
  tubes: List[Track] = []
  for shot_start, shot_end in shot_ranges(cuts, duration):
    current: Optional[Track] = None
    first_in_shot = True
    for t, boxes in samples:
      if not shot_start <= t < shot_end:
        continue
      start = shot_start if first_in_shot else t
      first_in_shot = False
      boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
      if current is not None:
        overlaps = [iou(current.boxes[0], box) for box in boxes]
        best = int(np.argmax(overlaps)) if overlaps else -1
        full = (t - current.start) * fps >= max_frames - 0.5
        if best >= 0 and overlaps[best] >= min_iou and not full:
          current.times.append(t)
          current.boxes.append(boxes[best])
          continue
        current.end = t
        current = None
      if len(boxes):
        largest = int(np.argmax(np.maximum(boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1])))
        current = Track([t], [boxes[largest]], start=start)
        tubes.append(current)
    if current is not None:
      current.end = shot_end
  return tubes


def aspect_preserved_box(box: Sequence[float], increase: float = INCREASE) -> Tuple[int, int, int, int]:
  """video-preprocessing's compute_aspect_preserved_bbox: each side grows by `increase` of its length, the
  shorter one more, so that both end at (1 + 2 increase) x the longer side."""
  left, top, right, bottom = box
  width, height = right - left, bottom - top
  width_increase = max(increase, ((1 + 2 * increase) * height - width) / (2 * width))
  height_increase = max(increase, ((1 + 2 * increase) * width - height) / (2 * height))
  return (int(left - width_increase * width), int(top - height_increase * height),
          int(right + width_increase * width), int(bottom + height_increase * height))


def tube_window(union: Sequence[float], width: int, height: int,
                increase: float = INCREASE) -> Tuple[Window, Tuple[int, int, int, int]]:
  """(the square window (x, y, side, side) in source pixels, how far it leaves the frame: left, top, right,
  bottom). The enlarged box is made exactly square with an even side (their int rounding can leave a pixel
  between width and height, which their resize then stretches), around the same centre."""
  left, top, right, bottom = aspect_preserved_box(union, increase)
  side = max(right - left, bottom - top) // 2 * 2
  x = int(round((left + right - side) / 2))
  y = int(round((top + bottom - side) / 2))
  outside = (max(0, -x), max(0, -y), max(0, x + side - width), max(0, y + side - height))
  return (x, y, side, side), outside


@dataclasses.dataclass(frozen=True)
class TubeRules:
  """video-preprocessing's crop_bbox_from_frames limits (options `--min_frames`, `--min_tube_px`)."""
  min_frames: int = 64
  min_size: int = 256
  increase: float = INCREASE

  def judge(self, tube: Track, fps: float, width: int, height: int) -> Tuple[Optional[Window], str, str]:
    """(window, '', '') for a kept tube, else (None, reason, detail)."""
    frames = int(round((tube.end - tube.start) * fps))
    if frames < self.min_frames:
      return None, 'tube_too_short', f'{frames} frames < --min_frames {self.min_frames}'
    union = tube.union()
    size = max(union[2] - union[0], union[3] - union[1])
    if size < self.min_size:
      return None, 'tube_too_small', f'tube box {size:.0f} source px < --min_tube_px {self.min_size}'
    window, outside = tube_window(union, width, height, self.increase)
    if any(outside):
      return None, 'tube_out_of_frame', (f'the tube box enlarged by {self.increase} leaves the {width}x{height} '
                                         f'frame by {outside} px (left, top, right, bottom)')
    return window, '', ''


class CutTubes(beam.DoFn):
  """FaceSamples -> a ClipTask per kept tube (its square window, `crop_mode` detect), `Reject`s on tag
  `rejects` for the others. Ids as the spine's tracker names pieces (transforms/track.piece_ids), over
  kept and rejected tubes alike, so a rerun names them the same."""

  def __init__(self, rules: TubeRules, fps: float, detect_fps: float):
    self.rules = rules
    self.fps = fps
    self.interval = 1.0 / detect_fps
    self.kept = Metrics.counter(STAGE, 'tubes_kept')
    self.rejected = Metrics.counter(STAGE, 'tubes_rejected')

  def process(self, found: FaceSamples):
    yield from list(self._tubes(found))  # all worked out first: an error rejects the planned clip whole

  def _tubes(self, found: FaceSamples):
    task = found.task
    info = task.media.info
    scale = np.array([info.width, info.height] * 2, np.float32)
    samples = [(t, boxes * scale) for t, boxes in found.samples]
    tubes = cut_tubes(samples, found.cuts, task.end - task.start, self.fps)
    if not tubes:
      yield self._reject(task, task.clip_id, 'no_face', f'no face on any of {len(samples)} sampled frames')
      return
    for tube, tube_id in zip(tubes, piece_ids(task.clip_id, tubes)):
      window, reason, detail = self.rules.judge(tube, self.fps, info.width, info.height)
      if window is None:
        self.rejected.inc()
        yield self._reject(task, tube_id, reason, f'tube {tube.start:.2f}s-{tube.end:.2f}s: {detail}')
      else:
        self.kept.inc()
        yield self._task(task, tube, tube_id, window, len(tubes), found.cuts)

  @staticmethod
  def _reject(task: ClipTask, tube_id: str, reason: str, detail: str):
    planned_id = task.planned if tube_id != task.clip_id else task.planned_id
    return beam.pvalue.TaggedOutput('rejects', Reject(tube_id, STAGE, reason, detail, task.source_id,
                                                      planned_id=planned_id))

  def _task(self, task: ClipTask, tube: Track, tube_id: str, window: Window, count: int, cuts) -> ClipTask:
    notes = task.notes
    if count > 1:
      notes += (f'face tube {tube.start:.2f}s-{tube.end:.2f}s of {task.clip_id} ({count} tubes, shot cuts at '
                f'{[round(c, 2) for c in cuts]})',)
    samples_in = int(round((tube.end - tube.start) / self.interval)) or 1
    stats = (('detect_samples', float(len(tube.times))), ('detect_face_ratio', min(1.0, len(tube.times) / samples_in)),
             ('source_face_px', tube.size()))
    return dataclasses.replace(
        task, clip_id=tube_id, planned_id=task.planned if tube_id != task.clip_id else task.planned_id,
        start=task.start + tube.start, end=task.start + tube.end, window=window, path=(), padding=(0, 0, 0, 0),
        crop_mode='detect', notes=notes, face_stats=task.face_stats + stats,
        face_box=face_box_in_window(tube, window, ()))


class TrackTubes(SampleAndTrack):
  """ClipTasks without a window -> one ClipTask per kept face tube (tag `tasks`) and `rejects`: the spine's
  sampler (detector on frames every 1/detect_fps s, shot cuts on every frame) then the tube rules, both
  per clip without a shuffle."""

  def __init__(self, detector: ModelHandler, rules: TubeRules, fps: float, detect_fps: float,
               shot_threshold: float):
    super().__init__(detector, detect_fps, shot_threshold, CutTubes(rules, fps, detect_fps), 'CutTubes', STAGE)
