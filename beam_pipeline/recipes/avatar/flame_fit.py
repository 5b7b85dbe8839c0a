"""Per-subject FLAME tracking: fit the 68 landmarks and 2 iris centres of T frames with a pinhole camera.

Follows IMAvatar's `preprocess/DECA/optimize.py` (also used by HRAvatar's preprocessing): Adam at lr 1e-2 on
all frames at once, landmarks in coordinates normalised to [-1, 1] across the image, mean Euclidean landmark
distance (not squared, so outliers pull less), priors 1e-2 on mean squared shape and expression, temporal
smoothness 1e-1 on expression and 10 on pose (mean squared frame-to-frame difference). Differences: the
fit runs rigid first (rotation and translation only), then everything, with the learning rate decayed to
zero (cosine) so it settles; translation is per frame with smoothness (IMAvatar's non-GLOBAL_POSE variant,
weight 10 in its 4x-scaled units = 160 in metres); small priors keep neck, jaw and eyes near rest (the
neck otherwise trades off against the global rotation). No DECA initialisation: the fit starts from the
neutral face, frontal, placed by the landmarks' centroid and spread.

Camera: OpenCV pinhole (x right, y down, looking along +z). A FLAME point p (y up, face looking +z) is at
diag(1, -1, -1) p + translation in camera coordinates and projects to (fx X / Z + cx, fy Y / Z + cy).

Output (`seed_files`): what the seed's optimize.py writes. `tracked_params.json` (HRAvatar's TrackedData reads
it): per image name `expcode` [[E]], `fullposecode` [[15]] (global, neck, jaw, eyes), `world_mat` (4 x 4,
OpenGL, FLAME x 4 units) and `translation` [[3]] (metres, added to FLAME's vertices), plus `shapecode` [[S]],
`intrinsics` [fx, fy, cx, cy] and the first frame's `world_mat`. The camera is one for the subject, as the seed's
(GLOBAL_POSE): at the mean of our per-frame translations, each frame's remainder in `translation`, so
diag(1, -1, -1) world_mat (4 (p + translation)) = 4 (our camera point). `flame_params.json` is IMAvatar's layout
(frames with world_mat 3 x 4, expression, pose, translation, bbox and flame_keypoints in [-1, 1];
intrinsics [-fx, fy, cx, cy] / size; shape_params), which `--shape_from` reads as the seed does.
"""
from __future__ import annotations

import dataclasses
import json
import time
from typing import Dict, Optional, Sequence, Union

import numpy as np
import torch

from beam_pipeline.recipes.avatar.flame import NUM_KEYPOINTS, NUM_LANDMARKS, POSE_PARTS, FlameLayer
from model_handlers.torch_handler import pick_device

TRACKED_NAME = 'tracked_params.json'  # HRAvatar's TrackedData
PARAMS_NAME = 'flame_params.json'  # IMAvatar's layout; --shape_from reads its shape_params
CAMERA_FLIP = (1.0, -1.0, -1.0)
FLAME_SCALE = 4.0  # the seed scales FLAME by 4 ("to fit unit sphere tightly"); world_mat is in those units
NUM_SHAPE = NUM_EXPRESSION = 100  # the seed's --n_shape 100 --n_expr 100 (fewer when the model has fewer)
# Translation is optimised in decimetres so that one Adam step (lr 1e-2) moves the head about a millimetre.
TRANSLATION_UNIT = 0.1
# HRAvatar's intrinsics for 512 px frames (its Data_Preprocessing.md and HDTF scripts).
REFERENCE = {'fx': 1539.67462, 'fy': 1508.93280, 'cx': 261.442628, 'cy': 253.231895}
REFERENCE_SIZE = 512


@dataclasses.dataclass(frozen=True)
class Intrinsics:
  fx: float
  fy: float
  cx: float
  cy: float

  @classmethod
  def for_size(cls, size: int, fx: Optional[float] = None, fy: Optional[float] = None,
               cx: Optional[float] = None, cy: Optional[float] = None) -> 'Intrinsics':
    """Given values, else HRAvatar's at 512 px scaled to size."""
    given = {'fx': fx, 'fy': fy, 'cx': cx, 'cy': cy}
    return cls(**{key: value if value is not None else REFERENCE[key] * size / REFERENCE_SIZE
                  for key, value in given.items()})


@dataclasses.dataclass(frozen=True)
class FitWeights:
  landmarks: float = 1.0
  iris: float = 1.0
  shape: float = 1e-2
  expression: float = 1e-2
  neck: float = 1e-2
  jaw: float = 1e-3
  eyes: float = 1e-2
  expression_smooth: float = 1e-1
  pose_smooth: float = 10.0
  translation_smooth: float = 160.0


@dataclasses.dataclass
class FlameFit:
  """One subject's FLAME parameters; errors are mean landmark distances in pixels per frame (NaN: no points)."""
  shape: np.ndarray          # (S,)
  expression: np.ndarray     # (T, E)
  rotation: np.ndarray       # (T, 3) global, axis-angle
  neck_pose: np.ndarray      # (T, 3)
  jaw_pose: np.ndarray       # (T, 3)
  eyes_pose: np.ndarray      # (T, 6)
  translation: np.ndarray    # (T, 3) metres, camera coordinates
  intrinsics: Intrinsics
  error_before: np.ndarray   # (T,) 68 landmarks, neutral face at its initial placement
  error_after: np.ndarray    # (T,)
  iris_error: np.ndarray     # (T,) after the fit
  keypoints_2d: np.ndarray   # (T, 70, 2) the fitted model's landmarks and iris centres, pixels
  shape_fixed: bool
  device: str
  seconds: float

  @property
  def pose(self) -> np.ndarray:
    """FLAME's (T, 15) full pose: global, neck, jaw, eyes."""
    return np.concatenate([getattr(self, name) for name, _ in POSE_PARTS], 1)


def _tolist(values) -> list:
  return np.asarray(values, np.float64).tolist()


def seed_files(fit: FlameFit, names: Sequence[str], keypoints: np.ndarray, iris: np.ndarray,
               size: int) -> Dict[str, bytes]:
  """{tracked_params.json, flame_params.json} of a fit of the frames `names` (see the module docstring);
  keypoints (T, 68, 2) and iris (T, 2, 2) are the targets, pixels. Same fit, same bytes."""
  flip = np.asarray(CAMERA_FLIP)
  centre = fit.translation.astype(np.float64).mean(0)
  world = np.eye(4)
  world[:3, 3] = FLAME_SCALE * flip * centre
  translation = (fit.translation - centre) * flip
  pose = fit.pose
  target = np.concatenate([keypoints, iris], 1) / size * 2 - 1
  corners = np.concatenate([target.min(1), target.max(1)], 1)
  intrinsics = fit.intrinsics
  frames, tracked = [], {'world_mat': _tolist(world), 'intrinsics': [intrinsics.fx, intrinsics.fy, intrinsics.cx,
                                                                     intrinsics.cy],
                         'shapecode': [_tolist(fit.shape)]}
  for k, name in enumerate(names):
    frames.append({'file_path': './image/' + name, 'world_mat': _tolist(world[:3]),
                   'expression': _tolist(fit.expression[k]), 'pose': _tolist(pose[k]), 'bbox': _tolist(corners[k]),
                   'flame_keypoints': _tolist(fit.keypoints_2d[k] / size * 2 - 1),
                   'translation': [_tolist(translation[k])]})
    tracked[name] = {'expcode': [_tolist(fit.expression[k])], 'fullposecode': [_tolist(pose[k])],
                     'world_mat': _tolist(world), 'translation': [_tolist(translation[k])]}
  params = {'frames': frames, 'intrinsics': [-intrinsics.fx / size, intrinsics.fy / size, intrinsics.cx / size,
                                             intrinsics.cy / size],
            'shape_params': _tolist(fit.shape)}
  return {TRACKED_NAME: json.dumps(tracked).encode(), PARAMS_NAME: json.dumps(params).encode()}


def read_shape(data: bytes) -> np.ndarray:
  """The shared shape of another subject's flame_params.json (--shape_from, as the seed's optimize.py)."""
  try:
    shape = json.loads(data)['shape_params']
  except (ValueError, KeyError, TypeError) as error:
    raise ValueError(f'{PARAMS_NAME} holds no shape_params ({type(error).__name__}: {error})') from error
  return np.asarray(shape, dtype=np.float32).reshape(-1)


def project(points: torch.Tensor, translation: torch.Tensor, intrinsics: Intrinsics) -> torch.Tensor:
  """(T, N, 3) FLAME points and (T, 3) translations -> (T, N, 2) pixels."""
  flip = torch.tensor(CAMERA_FLIP, dtype=points.dtype, device=points.device)
  camera = points * flip + translation[:, None]
  depth = camera[..., 2:].clamp(min=1e-4)
  focal = torch.tensor([intrinsics.fx, intrinsics.fy], dtype=points.dtype, device=points.device)
  centre = torch.tensor([intrinsics.cx, intrinsics.cy], dtype=points.dtype, device=points.device)
  return camera[..., :2] / depth * focal + centre


def initial_translation(model_points: np.ndarray, observed: np.ndarray, valid: np.ndarray,
                        intrinsics: Intrinsics) -> np.ndarray:
  """(T, 3) placing the neutral face (N, 3) under each frame's landmarks: depth from their spread, x and y from
  their centroid."""
  camera = model_points * np.asarray(CAMERA_FLIP)
  focal = (intrinsics.fx + intrinsics.fy) / 2
  result = np.full((len(observed), 3), np.nan)
  for frame, (points, ok) in enumerate(zip(observed, valid)):
    if ok.sum() < 2:
      continue
    model, seen = camera[ok], points[ok]
    model_spread = np.sqrt(((model[:, :2] - model[:, :2].mean(0)) ** 2).sum(1).mean())
    seen_spread = np.sqrt(((seen - seen.mean(0)) ** 2).sum(1).mean())
    depth = focal * model_spread / max(seen_spread, 1e-6)
    centre = seen.mean(0)
    result[frame] = [(centre[0] - intrinsics.cx) * depth / intrinsics.fx - model[:, 0].mean(),
                     (centre[1] - intrinsics.cy) * depth / intrinsics.fy - model[:, 1].mean(),
                     depth - model[:, 2].mean()]
  known = ~np.isnan(result[:, 0])
  if not known.any():
    raise ValueError('no frame has two or more landmarks to fit')
  result[~known] = np.median(result[known], 0)
  return result


def _mean_sq(values: torch.Tensor) -> torch.Tensor:
  return values.square().mean() if values.numel() else values.sum()


def _smooth(values: torch.Tensor, joined: torch.Tensor) -> torch.Tensor:
  """Mean squared step between frames that follow each other in time (`joined`: (T - 1,) 0/1)."""
  if not values.shape[0] > 1:
    return values.sum() * 0
  steps = (values[1:] - values[:-1]).square().mean(-1) * joined
  return steps.sum() / joined.sum().clamp(min=1)


def _per_frame_error(projected: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> np.ndarray:
  distance = torch.linalg.norm(torch.nan_to_num(projected - target), dim=-1) * valid
  count = valid.sum(1)
  error = distance.sum(1) / count.clamp(min=1)
  return torch.where(count > 0, error, torch.full_like(error, float('nan'))).detach().cpu().numpy()


def fit_flame(layer: FlameLayer, keypoints: np.ndarray, iris: Optional[np.ndarray], intrinsics: Intrinsics,
              shape: Optional[np.ndarray] = None, num_shape: int = NUM_SHAPE, num_expression: int = NUM_EXPRESSION,
              rigid_iterations: int = 200, iterations: int = 800, learning_rate: float = 1e-2,
              weights: FitWeights = FitWeights(), device: Union[str, torch.device, None] = None,
              joined: Optional[np.ndarray] = None) -> FlameFit:
  """Fit one subject. keypoints (T, 68, 2) and iris (T, 2, 2) in pixels, NaN where missing (iris may be None:
  eyes then stay at rest). `shape` given: used as is (another subject's), not optimised. `joined` (T - 1,)
  bool: frame k + 1 follows frame k in time (default all); smoothness only pulls joined frames together."""
  started = time.perf_counter()
  device = device if isinstance(device, torch.device) else pick_device(device or 'auto')
  keypoints = np.asarray(keypoints, dtype=np.float32)
  frames = keypoints.shape[0]
  if keypoints.shape != (frames, NUM_LANDMARKS, 2) or frames == 0:
    raise ValueError(f'keypoints have shape {keypoints.shape}; (T, {NUM_LANDMARKS}, 2) with T > 0 is expected')
  iris = np.full((frames, 2, 2), np.nan, np.float32) if iris is None else np.asarray(iris, dtype=np.float32)
  if iris.shape != (frames, 2, 2):
    raise ValueError(f'iris has shape {iris.shape}; ({frames}, 2, 2) is expected')
  layer = layer.to(device)
  num_expression = min(num_expression, layer.num_expression)
  fixed = shape is not None
  if fixed:
    shape = np.asarray(shape, dtype=np.float32).reshape(-1)
    if shape.size > layer.num_shape:
      raise ValueError(f'the given shape has {shape.size} components; the model has {layer.num_shape}')
  else:
    shape = np.zeros(min(num_shape, layer.num_shape), np.float32)

  joined_np = np.ones(frames - 1, bool) if joined is None else np.asarray(joined, bool)
  if joined_np.shape != (frames - 1,):
    raise ValueError(f'joined has shape {joined_np.shape}; ({frames - 1},) is expected')
  joined_t = torch.as_tensor(joined_np, dtype=torch.float32, device=device)
  target_np = np.concatenate([keypoints, iris], 1)
  valid_np = np.isfinite(target_np).all(-1) & layer.keypoint_mask.cpu().numpy()[None]
  target = torch.as_tensor(np.nan_to_num(target_np), device=device)
  valid = torch.as_tensor(valid_np, device=device)
  point_weight = torch.full((NUM_KEYPOINTS,), weights.landmarks, device=device)
  point_weight[NUM_LANDMARKS:] = weights.iris
  point_weight = point_weight * valid
  half_size = (intrinsics.cx + intrinsics.cy) / 2  # [-1, 1] across the image, as IMAvatar's loss

  shape_t = torch.as_tensor(shape, device=device).requires_grad_(not fixed)
  expression = torch.zeros(frames, num_expression, device=device, requires_grad=True)
  pose_parts = {name: torch.zeros(frames, size, device=device, requires_grad=True) for name, size in POSE_PARTS}
  with torch.no_grad():
    neutral = layer.keypoints(shape_t, expression[:1], torch.zeros(1, 15, device=device))[0].cpu().numpy()
  landmark_valid = valid_np[:, :NUM_LANDMARKS]
  start_translation = torch.as_tensor(
      initial_translation(neutral[:NUM_LANDMARKS], keypoints, landmark_valid, intrinsics), dtype=torch.float32,
      device=device)
  translation_step = torch.zeros(frames, 3, device=device, requires_grad=True)

  def evaluate():
    pose = torch.cat([pose_parts[name] for name, _ in POSE_PARTS], 1)
    translation = start_translation + TRANSLATION_UNIT * translation_step
    projected = project(layer.keypoints(shape_t, expression, pose), translation, intrinsics)
    return projected, pose, translation

  def loss_of(projected, pose, translation):
    distance = torch.sqrt(((projected - target) / half_size).square().sum(-1) + 1e-8)
    data = (distance * point_weight).sum() / valid.sum().clamp(min=1)
    return (data + weights.pose_smooth * _smooth(pose, joined_t)
            + weights.translation_smooth * _smooth(translation, joined_t)
            + weights.expression_smooth * _smooth(expression, joined_t) + weights.expression * _mean_sq(expression)
            + (0 if fixed else weights.shape * _mean_sq(shape_t)) + weights.neck * _mean_sq(pose_parts['neck_pose'])
            + weights.jaw * _mean_sq(pose_parts['jaw_pose']) + weights.eyes * _mean_sq(pose_parts['eyes_pose']))

  with torch.no_grad():
    before = _per_frame_error(evaluate()[0][:, :NUM_LANDMARKS], target[:, :NUM_LANDMARKS],
                              valid[:, :NUM_LANDMARKS])
  rigid = [pose_parts['rotation'], translation_step]
  everything = rigid + [expression] + [pose_parts[name] for name, _ in POSE_PARTS[1:]] + ([] if fixed else [shape_t])
  for stage, steps in ((rigid, rigid_iterations), (everything, iterations)):
    if steps <= 0:
      continue
    optimizer = torch.optim.Adam(stage, lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(steps):
      optimizer.zero_grad(set_to_none=True)
      loss_of(*evaluate()).backward()
      optimizer.step()
      schedule.step()

  with torch.no_grad():
    projected, _, translation = evaluate()
    after = _per_frame_error(projected[:, :NUM_LANDMARKS], target[:, :NUM_LANDMARKS], valid[:, :NUM_LANDMARKS])
    iris_error = _per_frame_error(projected[:, NUM_LANDMARKS:], target[:, NUM_LANDMARKS:], valid[:, NUM_LANDMARKS:])
  host = lambda tensor: tensor.detach().cpu().numpy().astype(np.float32)  # noqa: E731
  return FlameFit(shape=host(shape_t), expression=host(expression), translation=host(translation),
                  intrinsics=intrinsics, error_before=before, error_after=after, iris_error=iris_error,
                  keypoints_2d=host(projected), shape_fixed=fixed, device=str(device),
                  seconds=time.perf_counter() - started,
                  **{name: host(value) for name, value in pose_parts.items()})
