"""Where a clip's lip sync breaks, from SyncNet's per-window confidences: the in-sync stretches worth keeping.

No Beam and no media here (transforms/sync_split.py cuts the clip): a clip's windows (5 frames at 25 fps each,
transforms/lib/avsync.py) are sorted into runs in sync and out of it, and the runs become frame ranges that
partition the clip. Why hysteresis: the per-window confidence wanders around any threshold on a clip that is in
sync all along (it is median-filtered over 9 windows, still noisy), and cutting at every crossing would shred
it; so a run in sync ends only below `threshold - margin` and one out of sync only at `threshold + margin`, and
a dip shorter than `min_break` windows between two in-sync runs does not break. A window without a face (NaN)
is not in sync. Each output frame goes with the window whose middle is nearest to it.
"""
from __future__ import annotations

import dataclasses
import math
from typing import List, Optional, Sequence, Tuple

import numpy as np

from transforms.lib.avsync import FPS, WINDOW_FRAMES

SYNC_MARGIN = 0.5  # hysteresis around --min_sync_conf, in confidence (LSE-C) units: --sync_break_margin
MIN_BREAK_WINDOWS = 5  # an out-of-sync run shorter than this (0.2 s) between in-sync runs does not break


@dataclasses.dataclass(frozen=True)
class Stretch:
  """A range of a clip's output frames [start, end) and of its SyncNet windows [first_window, stop_window).
  `kept`: in sync and at least the shortest duration; otherwise the stretch is rejected. `conf`: the median
  confidence of its windows with a face (NaN: none)."""
  start: int
  end: int
  first_window: int
  stop_window: int
  kept: bool
  conf: float
  short_runs: int = 0  # in-sync runs under the shortest duration that a rejected stretch holds

  def piece_id(self, clip_id: str, fps: float) -> str:
    """`<clip>_sync<start in ms from the clip's start>`: from the time, like the tracker's `_f` pieces, so a
    rerun that finds the same breaks names them the same. No dots: ids are webdataset keys."""
    return f'{clip_id}_sync{int(round(self.start / fps * 1000))}'


def sync_states(values: Sequence[float], threshold: float, margin: float = SYNC_MARGIN) -> np.ndarray:
  """(N,) bool per window: in sync, with hysteresis. The first window is in sync at `threshold` or more."""
  states = np.zeros(len(values), bool)
  current: Optional[bool] = None
  for i, value in enumerate(np.asarray(values, np.float64)):
    if np.isnan(value):
      current = False
    elif current is None:
      current = bool(value >= threshold)
    else:
      current = bool(value >= (threshold - margin if current else threshold + margin))
    states[i] = current
  return states


def runs(states: Sequence[bool]) -> List[Tuple[int, int, bool]]:
  """(first, stop, state) of each run of equal states."""
  out: List[Tuple[int, int, bool]] = []
  for i, state in enumerate(states):
    if out and out[-1][2] == bool(state):
      out[-1] = (out[-1][0], i + 1, bool(state))
    else:
      out.append((i, i + 1, bool(state)))
  return out


def bridge_short_breaks(found: List[Tuple[int, int, bool]], min_break: int) -> List[Tuple[int, int, bool]]:
  """Runs with every out-of-sync run shorter than `min_break` that lies between two in-sync runs made in sync
  (and merged with them)."""
  states = []
  for k, (first, stop, state) in enumerate(found):
    inside = 0 < k < len(found) - 1
    states += [state or (inside and stop - first < min_break)] * (stop - first)
  return runs(states)


def window_frame(window: float, num_frames: int, fps: float) -> int:
  """The first output frame at or after the time between SyncNet window `window - 1`'s middle and window
  `window`'s: where a run of windows starting at `window` begins. Window i's middle is 25 fps frame i + 2."""
  if window <= 0:
    return 0
  return min(num_frames, max(0, math.ceil((window + WINDOW_FRAMES // 2 - 0.5) / FPS * fps - 1e-6)))


def plan_stretches(values: Sequence[float], num_frames: int, fps: float, threshold: float, min_duration: float,
                   margin: float = SYNC_MARGIN, min_break: int = MIN_BREAK_WINDOWS) -> List[Stretch]:
  """The clip as consecutive stretches (they cover frames 0..num_frames once): the in-sync runs of at least
  `min_duration` seconds kept, everything between them one rejected stretch each. [] when the clip is not to be
  split: every window in sync (one stretch), or no in-sync run long enough (the filters judge it whole)."""
  values = np.asarray(values, np.float64)
  if not len(values) or not num_frames:
    return []
  found = bridge_short_breaks(runs(sync_states(values, threshold, margin)), min_break)
  spans = []  # (first window, stop window, in sync, start frame, end frame)
  for first, stop, state in found:
    start = window_frame(first, num_frames, fps)
    end = num_frames if stop == len(values) else window_frame(stop, num_frames, fps)
    spans.append((first, stop, state, start, end))
  kept = [state and end > start and (end - start) / fps >= min_duration - 1e-9 for _, _, state, start, end in spans]
  if not any(kept) or len(spans) == 1:
    return []
  stretches: List[Stretch] = []
  for (first, stop, state, start, end), keep in zip(spans, kept):
    short = int(state and not keep)
    if not keep and stretches and not stretches[-1].kept:  # one rejected stretch between two kept ones
      last = stretches.pop()
      first, start, short = last.first_window, last.start, short + last.short_runs
    if end > start:  # below 25 fps, a run of one window may hold no output frame
      stretches.append(Stretch(start, end, first, stop, keep, _median(values[first:stop]), short))
  return stretches


def _median(values: np.ndarray) -> float:
  values = values[~np.isnan(values)]
  return float(np.median(values)) if len(values) else float('nan')
