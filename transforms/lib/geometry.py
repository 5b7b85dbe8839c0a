"""Crop geometry in source pixels: windows scaled, made square, fitted to the frame, and mapped to the output.

Fixed windows are made square and fitted to the frame (with padding where the square is larger); a face track
gets the square around its union; points are placed in the padded output square.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import cv2
import numpy as np

from transforms.core.elements import Padding, Window


def scale_window(window: Window, reference_height: Optional[int], actual_height: int) -> Window:
  """A fixed window given at the reference resolution, in pixels of the file we got."""
  if not reference_height or reference_height == actual_height:
    return window
  s = actual_height / reference_height
  x, y, w, h = window
  return int(round(x * s)), int(round(y * s)), int(round(w * s)), int(round(h * s))


def _place(start: int, side: int, extent: int) -> Tuple[int, int, int, int]:
  """(crop start, crop length, padding before, padding after) of a `side`-long span on an axis of `extent`
  pixels: shifted inside when it fits, else the whole axis with the rest as padding, as near `start` as can be."""
  if side <= extent:
    return min(max(start, 0), extent - side), side, 0, 0
  start = min(max(start, extent - side), 0)
  return 0, extent, -start, side - extent + start


def fit_window(window: Window, width: int, height: int) -> Optional[Tuple[Window, Padding]]:
  """A window made square (its longer side, same centre) and shifted into the frame, so the 1:1 output never
  stretches the picture; where the square is larger than the frame, the frame's extent is cropped and the
  rest is padding. Returns (crop window, (left, top, right, bottom) padding), or None when the window
  does not overlap the frame at all."""
  x, y, w, h = window
  if w < 1 or h < 1 or x >= width or y >= height or x + w <= 0 or y + h <= 0:
    return None
  side = max(w, h)
  left, crop_w, pad_left, pad_right = _place(x + (w - side) // 2, side, width)
  top, crop_h, pad_top, pad_bottom = _place(y + (h - side) // 2, side, height)
  return (left, top, crop_w, crop_h), (pad_left, pad_top, pad_right, pad_bottom)


def square_window(union: Sequence[float], scale: float, width: int, height: int) -> Window:
  """A square around the union's centre, side = longest side x scale, shifted and shrunk to fit."""
  x0, y0, x1, y1 = union
  side = max(x1 - x0, y1 - y0) * scale
  side = int(min(side, width, height)) // 2 * 2
  cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
  left = int(round(min(max(cx - side / 2, 0), width - side)))
  top = int(round(min(max(cy - side / 2, 0), height - side)))
  return left, top, side, side


def follow_crop(image: np.ndarray, path, side: int, t: float, size: int) -> np.ndarray:
  """--crop_follow: the window at clip time `t` (linear between path points), resized to `size`."""
  times = [p[0] for p in path]
  left = int(round(np.interp(t, times, [p[1] for p in path])))
  top = int(round(np.interp(t, times, [p[2] for p in path])))
  return cv2.resize(np.ascontiguousarray(image[top:top + side, left:left + side]), (size, size),
                    interpolation=cv2.INTER_AREA)


def box_in_square(points: np.ndarray, window: Window, padding: Padding) -> Tuple[float, float, float, float]:
  """The points' box (x0, y0, x1, y1) as fractions of the padded output square, where the landmarker looks
  for the tracked face."""
  x, y, w, h = window
  left, top, right, bottom = padding
  side = max(w + left + right, h + top + bottom)
  xy = np.asarray(points, np.float64)[:, :2]
  origin = np.array([x - left, y - top], np.float64)
  low, high = (xy.min(0) - origin) / side, (xy.max(0) - origin) / side
  return tuple(round(float(v), 4) for v in (low[0], low[1], high[0], high[1]))
