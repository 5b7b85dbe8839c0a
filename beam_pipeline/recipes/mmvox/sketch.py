"""Pencil drawings of face frames (Multimodal VoxCeleb's draw/style1/), offline with OpenCV.

MMVID drew its frames with Unpaired Portrait Drawing (a GAN whose weights are not ours to ship); the offline
stand-in is the classic colour-dodge pencil sketch: the grey frame divided by the blurred inverse of itself,
so flat regions go white and edges stay as dark strokes, much like a line drawing. Pure arithmetic on the
frame: the same frame always gives the same drawing.
"""
from __future__ import annotations

import cv2
import numpy as np

BLUR_FRACTION = 0.012  # Gaussian sigma as a share of the frame side: stroke width follows the resolution


def pencil_sketch(rgb: np.ndarray) -> np.ndarray:
  """(H, W, 3) RGB uint8 -> (H, W) uint8 grey drawing, dark strokes on white."""
  grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
  sigma = max(1.0, BLUR_FRACTION * max(grey.shape))
  blurred_inverse = cv2.GaussianBlur(255 - grey, (0, 0), sigma)
  return cv2.divide(grey, 255 - blurred_inverse, scale=256)
