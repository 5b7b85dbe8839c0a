"""19-class face parsing (the CelebAMask-HQ / face-parsing.PyTorch convention) and its offline default.

Why an offline default: BiSeNet's weights (`79999_iter.pth`) are the user's to supply, yet the nerf, avatar
and mmvox recipes all need a parsing map. Without them, the face classes are filled polygons of the
MediaPipe face mesh (skin, brows, eyes, nose, mouth, lips) and the classes outside the face (hair, neck,
cloth) are the person segmentation split by the face's geometry. Classes the mesh cannot see (glasses, ears,
earrings, necklace, hat) are only produced by BiSeNet.

In the render pass, `parsing_analyzers(opts)` gives the two analyzers every recipe adds after FaceLandmarks,
so segmentation and parsing run once per frame whichever recipes read them: `PersonSegmentation` sets
`Frame.found['person']` and `FaceParsing` sets `Frame.found['parsing']`. They only fill `found`; what is
kept of it (frame archives, arrays) is each recipe's own analyzer's choice.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import cv2
import numpy as np

from model_handlers.in_process import SharedModel
from model_handlers.mediapipe_segmentation import PersonSegmenterModelHandler
from model_handlers.weights import require
from transforms.frame_analysis import ClipPass, Frame, FrameAnalyzer, ModelAnalyzer, ModelPass, PassResult

NUM_CLASSES = 19
BACKGROUND, SKIN, LEFT_BROW, RIGHT_BROW, LEFT_EYE, RIGHT_EYE, GLASSES, LEFT_EAR, RIGHT_EAR, EARRING = range(10)
NOSE, MOUTH, UPPER_LIP, LOWER_LIP, NECK, NECKLACE, CLOTH, HAIR, HAT = range(10, 19)
CLASS_NAMES = ('background', 'skin', 'l_brow', 'r_brow', 'l_eye', 'r_eye', 'eye_g', 'l_ear', 'r_ear', 'ear_r',
               'nose', 'mouth', 'u_lip', 'l_lip', 'neck', 'neck_l', 'cloth', 'hair', 'hat')
FACE_CLASSES = (SKIN, LEFT_BROW, RIGHT_BROW, LEFT_EYE, RIGHT_EYE, GLASSES, LEFT_EAR, RIGHT_EAR, EARRING, NOSE,
                MOUTH, UPPER_LIP, LOWER_LIP)
HEAD_CLASSES = FACE_CLASSES + (HAIR, HAT)  # what AD-NeRF removes to make its torso images

# face-parsing.PyTorch's test.py colours (`part_colors`), written by cv2 so they are BGR there; here RGB, so a
# mask looks like the repo's visualisation. Its background stays white.
_PART_COLORS_BGR = ((255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 0, 85), (255, 0, 170), (0, 255, 0),
                    (85, 255, 0), (170, 255, 0), (0, 255, 85), (0, 255, 170), (0, 0, 255), (85, 0, 255),
                    (170, 0, 255), (0, 85, 255), (0, 170, 255), (255, 255, 0), (255, 255, 85), (255, 255, 170))
PALETTE = np.array([(255, 255, 255)] + [c[::-1] for c in _PART_COLORS_BGR], np.uint8)  # (19, 3) RGB

# MediaPipe face-mesh outlines as ordered polygons, from mediapipe's FaceLandmarksConnections (FACE_OVAL, LIPS,
# LEFT_/RIGHT_EYE, LEFT_/RIGHT_EYEBROW, NOSE); "left" is the subject's left, as in MediaPipe and CelebAMask-HQ.
FACE_OVAL = (10, 338, 297, 332, 284, 251, 389, 356, 454, 323, 361, 288, 397, 365, 379, 378, 400, 377, 152, 148,
             176, 149, 150, 136, 172, 58, 132, 93, 234, 127, 162, 21, 54, 103, 67, 109)
LIPS_OUTER_UPPER = (61, 185, 40, 39, 37, 0, 267, 269, 270, 409, 291)
LIPS_OUTER_LOWER = (61, 146, 91, 181, 84, 17, 314, 405, 321, 375, 291)
LIPS_INNER_UPPER = (78, 191, 80, 81, 82, 13, 312, 311, 310, 415, 308)
LIPS_INNER_LOWER = (78, 95, 88, 178, 87, 14, 317, 402, 318, 324, 308)
LEFT_EYE_LOOP = (263, 249, 390, 373, 374, 380, 381, 382, 362, 398, 384, 385, 386, 387, 388, 466)
RIGHT_EYE_LOOP = (33, 7, 163, 144, 145, 153, 154, 155, 133, 173, 157, 158, 159, 160, 161, 246)
LEFT_BROW_LOOP = (276, 283, 282, 295, 285, 336, 296, 334, 293, 300)
RIGHT_BROW_LOOP = (46, 53, 52, 65, 55, 107, 66, 105, 63, 70)
NOSE_POINTS = (168, 6, 197, 195, 5, 4, 1, 19, 94, 2, 98, 97, 326, 327, 294, 278, 344, 440, 275, 45, 220, 115,
               48, 64)
UPPER_LIP_LOOP = LIPS_OUTER_UPPER + LIPS_INNER_UPPER[::-1]
LOWER_LIP_LOOP = LIPS_OUTER_LOWER + LIPS_INNER_LOWER[::-1]
MOUTH_LOOP = LIPS_INNER_UPPER + LIPS_INNER_LOWER[::-1]
CHIN, FOREHEAD = 152, 10

PERSON_THRESHOLD = 0.5
# The body split, in face heights (forehead landmark to chin) along the face's own up-down axis and face
# widths across it: the neck is the person below the mouth, within NECK_HALF_WIDTH of the face's axis and
# down to NECK_LENGTH under the chin; the person below the chin otherwise is cloth; above it, hair.
NECK_TOP = -0.35
NECK_LENGTH = 0.4
NECK_HALF_WIDTH = 0.33
_SUBPIXEL_BITS = 4  # cv2.fillPoly's fixed-point precision: polygons keep quarter-pixel detail on small faces


def _shape(size: Union[int, Sequence[int]]) -> Tuple[int, int]:
  return (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))


def _fill(parsing: np.ndarray, points: np.ndarray, label: int) -> None:
  fixed = np.round(points * (1 << _SUBPIXEL_BITS)).astype(np.int32)
  cv2.fillPoly(parsing, [fixed], int(label), lineType=cv2.LINE_8, shift=_SUBPIXEL_BITS)


def _face_polygons(parsing: np.ndarray, xy: np.ndarray) -> np.ndarray:
  """Paints the face classes, later ones over earlier ones; returns the mask of the face they cover."""
  _fill(parsing, xy[list(FACE_OVAL)], SKIN)
  _fill(parsing, cv2.convexHull(xy[list(NOSE_POINTS)].astype(np.float32))[:, 0], NOSE)
  for loop, label in ((LEFT_BROW_LOOP, LEFT_BROW), (RIGHT_BROW_LOOP, RIGHT_BROW), (LEFT_EYE_LOOP, LEFT_EYE),
                      (RIGHT_EYE_LOOP, RIGHT_EYE), (UPPER_LIP_LOOP, UPPER_LIP), (LOWER_LIP_LOOP, LOWER_LIP),
                      (MOUTH_LOOP, MOUTH)):
    _fill(parsing, xy[list(loop)], label)
  return parsing != BACKGROUND


def _paint_body(parsing: np.ndarray, where: np.ndarray, xy: np.ndarray) -> None:
  """Paints NECK, CLOTH or HAIR on the pixels of the bool mask `where` (the person outside the face) by where they
  lie relative to the face (rolled heads included). This runs on every frame: the class is worked out over the
  mask's box only, and from one product per row and one per column (a pixel's is their sum, the same number as
  multiplying pixel by pixel), not per pixel."""
  x, y, w, h = cv2.boundingRect(where.view(np.uint8))
  if not w:
    return
  chin, forehead = xy[CHIN], xy[FOREHEAD]
  down = chin - forehead
  face_height = max(float(np.linalg.norm(down)), 1.0)
  down /= face_height
  across = np.array([-down[1], down[0]])
  oval_across = (xy[list(FACE_OVAL)] - chin) @ across
  face_width = max(float(oval_across.max() - oval_across.min()), 1.0)
  axis = (oval_across.max() + oval_across.min()) / 2
  xx = np.arange(x, x + w, dtype=np.float32) - chin[0]  # columns, float64 from here as chin is
  yy = np.arange(y, y + h, dtype=np.float32) - chin[1]  # rows
  below = np.add.outer(yy * down[1], xx * down[0])
  below /= face_height
  side = np.add.outer(yy * across[1], xx * across[0])
  side -= axis
  side = np.abs(side, out=side)
  side /= face_width
  neck = (below > NECK_TOP) & (below < NECK_LENGTH) & (side < NECK_HALF_WIDTH)
  classes = np.where(neck, np.uint8(NECK), np.where(below > 0, np.uint8(CLOTH), np.uint8(HAIR)))
  np.copyto(parsing[y:y + h, x:x + w], classes, where=where[y:y + h, x:x + w])


def parse_from_landmarks(landmarks: Optional[np.ndarray], person: Optional[np.ndarray],
                         size: Union[int, Sequence[int]]) -> np.ndarray:
  """The offline parsing of one frame: uint8 (H, W) class map.

  `landmarks`: (478, 3) face-mesh points in pixels of this frame, or None when no face was found; `person`:
  (H, W) person probability (MediaPipe selfie segmentation) or None; `size`: the frame's side, or (H, W).
  Without landmarks the person is labelled CLOTH (the body; AD-NeRF's torso) and the rest background.
  """
  shape = _shape(size)
  parsing = np.zeros(shape, np.uint8)
  body = None if person is None else np.asarray(person) > PERSON_THRESHOLD
  if body is not None and body.shape != shape:
    raise ValueError(f'person mask of shape {body.shape} for a frame of {shape}')
  if landmarks is None:
    if body is not None:
      parsing[body] = CLOTH
    return parsing
  xy = np.asarray(landmarks, np.float64)[:, :2]
  face = _face_polygons(parsing, xy)
  if body is not None:
    _paint_body(parsing, body & ~face, xy)
  return parsing


def colorize(parsing: np.ndarray) -> np.ndarray:
  """(H, W) class map -> (H, W, 3) RGB uint8 in face-parsing.PyTorch's visualisation colours."""
  parsing = np.asarray(parsing)
  if parsing.ndim != 2 or parsing.size and int(parsing.max()) >= NUM_CLASSES:
    raise ValueError(f'expected an (H, W) map of classes 0..{NUM_CLASSES - 1}')
  return PALETTE[parsing]


def foreground(parsing: np.ndarray, drop_cloth: bool = False) -> np.ndarray:
  """Bool (H, W): every labelled pixel (the person), without the cloth class when asked (HRAvatar's
  --mask_clothes)."""
  keep = parsing != BACKGROUND
  return keep & (parsing != CLOTH) if drop_cloth else keep


class _FoundPass(ModelPass):
  """A per-frame model's result stored in each frame's `found[key]`."""

  def __init__(self, model, key: str):
    super().__init__(model)
    self.key = key

  def take(self, frame: Frame, result) -> None:
    frame.found[self.key] = result

  def finish(self, num_frames: int) -> PassResult:
    return self.result()


class _LandmarkParsingPass(ClipPass):
  """The offline parsing from what FaceLandmarks and PersonSegmentation put in `found`."""

  def add(self, frames: List[Frame]) -> None:
    for frame in frames:
      frame.found['parsing'] = parse_from_landmarks(frame.found.get('landmarks'), frame.found.get('person'),
                                                    frame.image.shape[:2])

  def finish(self, num_frames: int) -> PassResult:
    return PassResult({}, 0)


class PersonSegmentation(ModelAnalyzer):
  """MediaPipe selfie segmentation on every output frame: `found['person']`, float32 (H, W) in [0, 1]
  (absent on a frame the model failed on; such frames count as the clip's model errors)."""

  name = 'selfie_segmenter'

  def start(self, task, num_frames: int, size: int) -> ClipPass:
    return _FoundPass(self.model, 'person')


class FaceParsing(FrameAnalyzer):
  """`found['parsing']`, uint8 (H, W) of the 19 classes: BiSeNet when given its handler
  (model_handlers/face_parsing.py), else `parse_from_landmarks` on `found['landmarks']` and `found['person']`
  (so it runs after FaceLandmarks and PersonSegmentation)."""

  name = 'face_parsing'

  def __init__(self, handler=None):
    self.model = SharedModel(handler) if handler is not None else None
    self.batch_size = self.model.batch_size if self.model else 1

  def setup(self) -> None:
    if self.model:
      self.model.setup()

  def start(self, task, num_frames: int, size: int) -> ClipPass:
    return _FoundPass(self.model, 'parsing') if self.model else _LandmarkParsingPass()


def parsing_analyzers(opts) -> List[FrameAnalyzer]:
  """[PersonSegmentation, FaceParsing] from the options (--model_dir, --landmark_batch_size,
  --parsing_weights): what every recipe that reads `person` or `parsing` adds after FaceLandmarks.
  Given weights are checked here, when the graph is built, so a wrong path fails before any work."""
  batch = getattr(opts, 'landmark_batch_size', None) or 32
  segmenter = PersonSegmenterModelHandler(model_dir=getattr(opts, 'model_dir', None), max_batch_size=batch)
  bisenet = None
  weights = getattr(opts, 'parsing_weights', None)
  if weights:
    from model_handlers import face_parsing
    bisenet = face_parsing.FaceParsingModelHandler(require(weights, face_parsing.FLAG, face_parsing.WHAT))
  return [PersonSegmentation(segmenter), FaceParsing(bisenet)]
