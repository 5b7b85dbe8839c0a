"""Which of a clip's frames the avatar subject keeps: a face inside the picture on every kept frame.

HRAvatar's fit (its optimize.py) reads 68 keypoints and 2 irises for every image and fails on a missing one,
and it crops a whole video with one box, so a head that leaves the box gives keypoints on padding or past the
edge. Per clip, in output pixels:
- a frame whose 68 points are not all inside the picture (the square less its black padding) is dropped
  (`face_outside_crop`);
- a run of frames without a face (or iris) of up to `MAX_GAP_S` between two kept frames is filled in: the
  points interpolated linearly from the two neighbours (a blink of the detector, a hand passing). A longer
  run, or one at the clip's start or end, is dropped (`no_face`).
The kept frames are runs of the clip (it is split where frames are dropped); `joined` says which kept frame
follows the previous one in time, so the fit's smoothness does not bridge a cut.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

import numpy as np

MAX_GAP_S = 0.2  # 6 frames at 30 fps: longer faceless runs are cut out, not made up
OUTSIDE, NO_FACE = 'face_outside_crop', 'no_face'


@dataclasses.dataclass
class FaceFrames:
  keep: np.ndarray  # (T,) bool
  lmk68: np.ndarray  # (K, 68, 2) of the kept frames, gaps filled
  iris: np.ndarray  # (K, 2, 2)
  joined: np.ndarray  # (K - 1,) bool: kept frame k + 1 is the clip's frame right after kept frame k
  dropped: Dict[str, int]  # reason -> frames
  filled: int  # frames whose points were interpolated

  def runs(self) -> list:
    """[first, last] clip frame indices of each kept run."""
    kept = np.flatnonzero(self.keep)
    if not kept.size:
      return []
    cuts = np.flatnonzero(np.diff(kept) > 1)
    starts, ends = np.r_[kept[0], kept[cuts + 1]], np.r_[kept[cuts], kept[-1]]
    return [[int(a), int(b)] for a, b in zip(starts, ends)]


def max_gap_frames(fps: float) -> int:
  return max(1, int(round(MAX_GAP_S * fps)))


def select(lmk68: np.ndarray, iris: np.ndarray, picture: Tuple[int, int, int, int], max_gap: int) -> FaceFrames:
  """lmk68 (T, 68, 2) and iris (T, 2, 2) in output pixels, NaN without a face; `picture` (x0, y0, x1, y1) the
  part of the frame that is not padding."""
  lmk68, iris = np.asarray(lmk68, np.float64), np.asarray(iris, np.float64)
  count = len(lmk68)
  found = np.isfinite(lmk68).all((1, 2)) & np.isfinite(iris).all((1, 2))
  x0, y0, x1, y1 = picture
  with np.errstate(invalid='ignore'):
    inside = ((lmk68[..., 0] >= x0) & (lmk68[..., 0] <= x1) & (lmk68[..., 1] >= y0) & (lmk68[..., 1] <= y1)).all(1)
  good = found & inside
  keep = good.copy()
  lmk68, iris = lmk68.copy(), iris.copy()
  dropped = {OUTSIDE: int((found & ~inside).sum()), NO_FACE: 0}
  filled = 0
  frame = 0
  while frame < count:
    if found[frame]:
      frame += 1
      continue
    end = frame
    while end < count and not found[end]:
      end += 1
    before, after = frame - 1, end  # the run is [frame, end)
    if end - frame <= max_gap and before >= 0 and after < count and good[before] and good[after]:
      weight = ((np.arange(frame, end) - before) / (after - before))[:, None, None]
      lmk68[frame:end] = (1 - weight) * lmk68[before] + weight * lmk68[after]
      iris[frame:end] = (1 - weight) * iris[before] + weight * iris[after]
      keep[frame:end] = True
      filled += end - frame
    else:
      dropped[NO_FACE] += end - frame
    frame = end
  kept = np.flatnonzero(keep)
  return FaceFrames(keep, lmk68[keep].astype(np.float32), iris[keep].astype(np.float32), np.diff(kept) == 1,
                    {reason: n for reason, n in dropped.items() if n}, filled)
