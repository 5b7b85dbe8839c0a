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
"""
from __future__ import annotations

import dataclasses
import io
import time
from typing import Optional, Union

import numpy as np
import torch

from beam_pipeline.recipes.avatar.flame import NUM_KEYPOINTS, NUM_LANDMARKS, POSE_PARTS, FlameLayer, npz_bytes
from model_handlers.torch_handler import pick_device

PARAMS_NAME = 'flame_params.npz'
CAMERA_FLIP = (1.0, -1.0, -1.0)
# Translation is optimised in decimetres so that one Adam step (lr 1e-2) moves the head about a millimetre.
TRANSLATION_UNIT = 0.1
# IMAvatar's default focal length for 512 px frames.
REFERENCE_FOCAL, REFERENCE_SIZE = 1500.0, 512


@dataclasses.dataclass(frozen=True)
class Intrinsics:
  fx: float
  fy: float
  cx: float
  cy: float

  @classmethod
  def for_size(cls, size: int, fx: Optional[float] = None, fy: Optional[float] = None,
               cx: Optional[float] = None, cy: Optional[float] = None) -> 'Intrinsics':
    """Given values, else IMAvatar's (fx = fy = 1500 at 512 px, principal point in the middle) scaled to size."""
    focal = REFERENCE_FOCAL * size / REFERENCE_SIZE
    return cls(fx if fx is not None else focal, fy if fy is not None else focal,
               cx if cx is not None else size / 2, cy if cy is not None else size / 2)


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

  def to_npz_bytes(self) -> bytes:
    """flame_params.npz: GaussianAvatars' parameter names plus the camera and the errors; same fit, same bytes."""
    arrays = {'shape': self.shape, 'expr': self.expression, 'translation': self.translation,
              'error_before_px': self.error_before, 'error_after_px': self.error_after,
              'iris_error_px': self.iris_error, 'keypoints_2d': self.keypoints_2d}
    arrays.update({name: getattr(self, name) for name, _ in POSE_PARTS})
    arrays = {key: np.asarray(value, dtype=np.float32) for key, value in arrays.items()}
    camera = dataclasses.asdict(self.intrinsics)
    arrays.update({key: np.asarray(value, dtype=np.float64) for key, value in camera.items()})
    arrays['shape_fixed'] = np.asarray(self.shape_fixed)
    return npz_bytes(arrays)


def read_shape(data: bytes) -> np.ndarray:
  """The shared shape of another subject's flame_params.npz (for --shape_from)."""
  with np.load(io.BytesIO(data), allow_pickle=False) as archive:
    if 'shape' not in archive.files:
      raise ValueError(f'{PARAMS_NAME} holds no shape (keys: {archive.files})')
    return np.asarray(archive['shape'], dtype=np.float32)


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


def _smooth(values: torch.Tensor) -> torch.Tensor:
  return _mean_sq(values[1:] - values[:-1])


def _per_frame_error(projected: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> np.ndarray:
  distance = torch.linalg.norm(torch.nan_to_num(projected - target), dim=-1) * valid
  count = valid.sum(1)
  error = distance.sum(1) / count.clamp(min=1)
  return torch.where(count > 0, error, torch.full_like(error, float('nan'))).detach().cpu().numpy()


def fit_flame(layer: FlameLayer, keypoints: np.ndarray, iris: Optional[np.ndarray], intrinsics: Intrinsics,
              shape: Optional[np.ndarray] = None, num_shape: int = 100, num_expression: int = 50,
              rigid_iterations: int = 200, iterations: int = 800, learning_rate: float = 1e-2,
              weights: FitWeights = FitWeights(), device: Union[str, torch.device, None] = None) -> FlameFit:
  """Fit one subject. keypoints (T, 68, 2) and iris (T, 2, 2) in pixels, NaN where missing (iris may be None:
  eyes then stay at rest). `shape` given: used as is (another subject's), not optimised."""
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
    return (data + weights.pose_smooth * _smooth(pose) + weights.translation_smooth * _smooth(translation)
            + weights.expression_smooth * _smooth(expression) + weights.expression * _mean_sq(expression)
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
