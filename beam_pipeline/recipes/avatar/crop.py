"""HRAvatar's crop (crop_and_matting.py) as geometry: one box from the first frame's 68 landmarks.

The box is used for every frame of the clip.

The box is centred on the middle of the landmarks' x-extent and at 0.8 ymin + 0.2 ymax (nearer the brows
than the chin, so hair and shoulders fit), its side `bbox_scale` x 2 x the larger half-extent. It is clamped to
the frame (not shifted: the head stays where HRAvatar puts it), its sides made even, and the clamped
rectangle padded back to a square around its centre with black, as HRAvatar's `squarefiy` does.
"""
from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from transforms.core.elements import Padding, Window


def hravatar_box(points: np.ndarray, bbox_scale: float) -> Tuple[int, int, int]:
  """(left, top, side) of the unclamped square around (N, 2) landmark points, in their pixels; side even."""
  xy = np.asarray(points, np.float64)[:, :2]
  (x_min, y_min), (x_max, y_max) = xy.min(0), xy.max(0)
  centre_x = (x_min + x_max) / 2
  centre_y = 0.8 * y_min + 0.2 * y_max
  half_extent = max(x_max - x_min, y_max - y_min) / 2
  side = int(bbox_scale * 2 * half_extent) // 2 * 2
  return int(round(centre_x)) - side // 2, int(round(centre_y)) - side // 2, side


def _even_span(start: int, end: int) -> Tuple[int, int]:
  """[start, end) less one pixel at the end when its length is odd."""
  return start, end - (end - start) % 2


def hravatar_window(points: np.ndarray, bbox_scale: float, width: int,
                    height: int) -> Optional[Tuple[Window, Padding]]:
  """(window in the frame, (left, top, right, bottom) black padding to a square) for the HRAvatar box of
  `points` in a `width` x `height` frame; None when the box misses the frame or is under 2 pixels."""
  left, top, side = hravatar_box(points, bbox_scale)
  if side < 2:
    return None
  x0, x1 = _even_span(max(left, 0), min(left + side, width))
  y0, y1 = _even_span(max(top, 0), min(top + side, height))
  if x1 - x0 < 2 or y1 - y0 < 2:
    return None
  w, h = x1 - x0, y1 - y0
  square = max(w, h)
  pad_x, pad_y = square - w, square - h  # both even: every span is
  return (x0, y0, w, h), (pad_x // 2, pad_y // 2, pad_x - pad_x // 2, pad_y - pad_y // 2)

