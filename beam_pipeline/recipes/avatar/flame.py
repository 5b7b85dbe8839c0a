"""FLAME (Li et al. 2017) in plain torch, built from the user's licensed model file.

Files the user gives (nothing is downloaded; the model is licensed per user at flame.is.tue.mpg.de):
- `--flame_model`: the official `generic_model.pkl` (FLAME 2020 / 2023; keys v_template, shapedirs, posedirs,
  J_regressor, weights, kintree_table, f; chumpy and scipy.sparse objects inside). A pickle can run code
  when loaded, so it is read only with `--trust_weight_pickles`, and then by a restricted unpickler that rebuilds
  numpy arrays, chumpy arrays (as plain arrays, chumpy not needed) and sparse matrices, and refuses every
  other global. Or the `.npz` that `python -m beam_pipeline.recipes.avatar.flame convert` writes (read with
  allow_pickle=False; it can bundle the landmark embedding, so one file is enough).
- `--flame_landmarks`: the landmark embedding, a separate file in the real distribution: DECA's
  `landmark_embedding.npy` (static 51 + dynamic 17-point contour chosen by head yaw, a pickled dict: needs
  `--trust_weight_pickles`), FLAME's `flame_static_embedding.pkl` (51 points only: the 17 contour points are then
  not predicted and the fit uses the other 51), or an `.npz` with DECA's key names. Not needed when the
  model `.npz` bundles it.

Keypoints are the 68 iBUG points (contour 0-16 from the dynamic embedding, 17-67 static) followed by two
iris centres: FLAME vertices 4597 and 4051, the centres metrical-tracker (MICA's tracker) pairs with
MediaPipe's iris landmarks 468 and 473, in that order. A model with another topology names its own
`iris_vertices` in the npz. Pose is FLAME's 15 numbers: global rotation, neck, jaw, two eyeballs (axis-angle).
"""
from __future__ import annotations

import argparse
import io
import sys
import zipfile
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from model_handlers.weights import WeightsError, read_weights
from transforms.core.fileio import write_atomic
from transforms.lib.pickles import load_restricted

MODEL_FLAG = '--flame_model'
LANDMARKS_FLAG = '--flame_landmarks'
MODEL_KEYS = ('v_template', 'shapedirs', 'posedirs', 'J_regressor', 'weights', 'kintree_table', 'f')
# FLAME's shapedirs hold 300 identity components, then the expression components (100).
FLAME_SHAPE_COMPONENTS = 300
FLAME_VERTICES = 5023
# metrical-tracker: left_iris_flame[0] <-> MediaPipe 468, right_iris_flame[0] <-> MediaPipe 473.
FLAME_IRIS_VERTICES = (4597, 4051)
NUM_LANDMARKS = 68
NUM_CONTOUR = 17
NUM_KEYPOINTS = NUM_LANDMARKS + 2
POSE_PARTS = (('rotation', 3), ('neck_pose', 3), ('jaw_pose', 3), ('eyes_pose', 6))
MODEL_WHAT = 'a FLAME model (the official generic_model.pkl, or its .npz conversion)'
LANDMARKS_WHAT = ("a FLAME landmark embedding (DECA's landmark_embedding.npy, FLAME's flame_static_embedding.pkl, "
                  'or an .npz with the same keys)')


# ---------------------------------------------------------------- reading the files

class _ChumpyArray:
  """Stands in for any chumpy class while unpickling: keeps the pickled state; its `x` is the array."""
  state = None

  def __setstate__(self, state):
    self.state = state


class _SparseMatrix:
  """Stands in for scipy.sparse csc/csr matrices while unpickling; densified without scipy."""
  state = None
  layout = 'csc'

  def __setstate__(self, state):
    self.state = state


class _CscMatrix(_SparseMatrix):
  layout = 'csc'


class _CsrMatrix(_SparseMatrix):
  layout = 'csr'


def _load_storage_from_bytes(data: bytes):
  """torch's storage pickles hold a torch.save archive: read it without pickled code."""
  return torch.load(io.BytesIO(data), weights_only=True)


def _flame_globals() -> Dict[Tuple[str, str], object]:
  """What FLAME and DECA pickles hold besides numpy arrays: torch tensors and scipy.sparse matrices (shims)."""
  from torch import _utils as torch_utils  # pylint: disable=import-outside-toplevel
  allowed = {('torch._utils', '_rebuild_tensor_v2'): torch_utils._rebuild_tensor_v2,  # pylint: disable=protected-access
             ('torch.storage', '_load_from_bytes'): _load_storage_from_bytes}
  for module in ('scipy.sparse.csc', 'scipy.sparse._csc'):
    allowed[(module, 'csc_matrix')] = _CscMatrix
  for module in ('scipy.sparse.csr', 'scipy.sparse._csr'):
    allowed[(module, 'csr_matrix')] = _CsrMatrix
  return allowed


def _restricted_unpickle(data: bytes, flag: str, path: str, what: str):
  """Arrays only (transforms/lib/pickles.py), chumpy's arrays read as a shim without chumpy."""
  try:
    return load_restricted(data, _flame_globals(), {'chumpy': lambda name: _ChumpyArray})
  except Exception as error:  # pylint: disable=broad-except  # any failure means the file is not what we read
    raise WeightsError(flag, path, f'not a pickle of plain arrays ({what}): {type(error).__name__}: '
                       f'{str(error)[:200]}') from error


def _refuse_pickle(flag: str, path: str, what: str):
  raise WeightsError(flag, path, f'is a Python pickle ({what}); pickles can run code when loaded, so it is not '
                     'read without --trust_weight_pickles. Pass --trust_weight_pickles (it is then read by a '
                     'restricted unpickler that only rebuilds arrays), or convert it once with '
                     '`python -m beam_pipeline.recipes.avatar.flame convert generic_model.pkl '
                     'landmark_embedding.npy flame.npz --trust_weight_pickles` and pass the .npz')


def _plain(value, flag: str, path: str, key: str):
  """A pickled value as a numpy array: chumpy shims read as their `x`, sparse matrices densified, tensors too."""
  if isinstance(value, _ChumpyArray):
    state = value.state if isinstance(value.state, dict) else {}
    if 'x' not in state:
      raise WeightsError(flag, path, f'{key} is a chumpy expression, not a chumpy array; convert the model with '
                         'chumpy installed or use the official FLAME file')
    return _plain(state['x'], flag, path, key)
  if isinstance(value, _SparseMatrix):
    return _densify(value, flag, path, key)
  if isinstance(value, torch.Tensor):
    return value.detach().cpu().numpy()
  return np.asarray(value)


def _densify(matrix: _SparseMatrix, flag: str, path: str, key: str) -> np.ndarray:
  state = matrix.state if isinstance(matrix.state, dict) else {}
  try:
    shape = tuple(int(n) for n in state.get('_shape', state.get('shape')))
    data, indices, indptr = (np.asarray(state[name]) for name in ('data', 'indices', 'indptr'))
  except (KeyError, TypeError) as error:
    raise WeightsError(flag, path, f'{key} is a sparse matrix whose pickled state is not understood') from error
  dense = np.zeros(shape, dtype=np.float64)
  major = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
  if matrix.layout == 'csc':
    np.add.at(dense, (indices, major), data)
  else:
    np.add.at(dense, (major, indices), data)
  return dense


def _read_dict(path: str, flag: str, what: str, trust_weight_pickles: bool) -> Dict[str, np.ndarray]:
  """The arrays of an .npz, an .npy holding a pickled dict, or a pickle; pickles only with trust_weight_pickles."""
  data = read_weights(path, flag, what)
  if data[:4] == b'PK\x03\x04':
    try:
      with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return {key: archive[key] for key in archive.files}
    except (ValueError, OSError, zipfile.BadZipFile) as error:
      raise WeightsError(flag, path, f'an .npz that cannot be read without pickles ({what}): {error}') from error
  if data[:6] == b'\x93NUMPY':
    handle = io.BytesIO(data)
    version = np.lib.format.read_magic(handle)
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    _, _, dtype = read_header(handle)
    if not dtype.hasobject:
      raise WeightsError(flag, path, f'holds a plain array, not a dict ({what})')
    if not trust_weight_pickles:
      _refuse_pickle(flag, path, what)
    loaded = _restricted_unpickle(data[handle.tell():], flag, path, what)
    loaded = loaded.item() if isinstance(loaded, np.ndarray) and loaded.shape == () else loaded
  else:
    if not trust_weight_pickles:
      _refuse_pickle(flag, path, what)
    loaded = _restricted_unpickle(data, flag, path, what)
  if not isinstance(loaded, Mapping):
    raise WeightsError(flag, path, f'holds a {type(loaded).__name__}, not a dict ({what})')
  return {str(key): value for key, value in loaded.items()}


def _model_arrays(raw: Mapping, flag: str, path: str) -> Dict[str, np.ndarray]:
  missing = [key for key in MODEL_KEYS if key not in raw]
  if missing:
    raise WeightsError(flag, path, f'does not hold {MODEL_WHAT}: missing keys {missing}')
  arrays = {key: _plain(raw[key], flag, path, key) for key in MODEL_KEYS}
  vertices = arrays['v_template'].shape[0]
  joints = arrays['kintree_table'].shape[-1]
  posedirs = arrays['posedirs']
  if posedirs.ndim == 2 and posedirs.shape[0] == vertices * 3:  # (V * 3, P), as some conversions store it
    arrays['posedirs'] = posedirs.reshape(vertices, 3, -1)
  expected = {'v_template': (vertices, 3), 'shapedirs': (vertices, 3, None),
              'posedirs': (vertices, 3, (joints - 1) * 9), 'J_regressor': (joints, vertices),
              'weights': (vertices, joints), 'kintree_table': (2, joints), 'f': (None, 3)}
  for key, shape in expected.items():
    actual = arrays[key].shape
    if len(actual) != len(shape) or any(want is not None and want != got for want, got in zip(shape, actual)):
      readable = tuple('N' if n is None else n for n in shape)
      raise WeightsError(flag, path, f'does not hold {MODEL_WHAT}: {key} has shape {actual} where {readable} is '
                         f'expected ({vertices} vertices, {joints} joints)')
  return arrays


def _landmark_arrays(raw: Mapping, flag: str, path: str) -> Dict[str, np.ndarray]:
  """DECA's or FLAME's embedding keys -> static (51), dynamic contour (K, 17) or static contour (17), iris."""
  def get(key):
    return _plain(raw[key], flag, path, key) if key in raw else None
  found = {}
  if 'static_lmk_faces_idx' in raw:  # DECA layout (also what the converter writes)
    found['static_faces'], found['static_bary'] = get('static_lmk_faces_idx'), get('static_lmk_bary_coords')
    if 'dynamic_lmk_faces_idx' in raw:
      found['dynamic_faces'], found['dynamic_bary'] = get('dynamic_lmk_faces_idx'), get('dynamic_lmk_bary_coords')
    if 'full_lmk_faces_idx' in raw:  # DECA's fixed 68: its first 17 are a static contour
      found['contour_faces'] = get('full_lmk_faces_idx').reshape(-1)[:NUM_CONTOUR]
      found['contour_bary'] = get('full_lmk_bary_coords').reshape(-1, 3)[:NUM_CONTOUR]
    elif 'contour_lmk_faces_idx' in raw:
      found['contour_faces'], found['contour_bary'] = get('contour_lmk_faces_idx'), get('contour_lmk_bary_coords')
  elif 'lmk_face_idx' in raw:  # FLAME's flame_static_embedding.pkl
    faces, bary = get('lmk_face_idx'), get('lmk_b_coords')
    if faces.ndim == 2:
      raise WeightsError(flag, path, "is FLAME's dynamic (contour) embedding alone; pass the static embedding or "
                         "DECA's landmark_embedding.npy, which holds both")
    found['static_faces'], found['static_bary'] = faces, bary
  else:
    raise WeightsError(flag, path, f'does not hold {LANDMARKS_WHAT}: no static_lmk_faces_idx or lmk_face_idx key')
  if 'iris_vertices' in raw:
    found['iris_vertices'] = get('iris_vertices')
  static = NUM_LANDMARKS - NUM_CONTOUR
  if found['static_faces'].reshape(-1).shape != (static,) or found['static_bary'].reshape(-1, 3).shape != (static, 3):
    raise WeightsError(flag, path, f'does not hold {LANDMARKS_WHAT}: the static embedding has '
                       f'{found["static_faces"].size} points where {static} are expected')
  if 'dynamic_faces' in found and (found['dynamic_faces'].ndim != 2 or found['dynamic_faces'].shape[1] != NUM_CONTOUR
                                   or found['dynamic_bary'].shape != found['dynamic_faces'].shape + (3,)):
    raise WeightsError(flag, path, f'does not hold {LANDMARKS_WHAT}: the dynamic embedding has shape '
                       f'{found["dynamic_faces"].shape} where (K, {NUM_CONTOUR}) is expected')
  return found


LANDMARK_KEYS = {'static_faces': 'static_lmk_faces_idx', 'static_bary': 'static_lmk_bary_coords',
                 'dynamic_faces': 'dynamic_lmk_faces_idx', 'dynamic_bary': 'dynamic_lmk_bary_coords',
                 'contour_faces': 'contour_lmk_faces_idx', 'contour_bary': 'contour_lmk_bary_coords',
                 'iris_vertices': 'iris_vertices'}


def read_flame_files(path: str, trust_weight_pickles: bool = False, landmarks_path: Optional[str] = None,
                     shape_components: Optional[int] = None) -> Dict[str, np.ndarray]:
  """The model's and the embedding's arrays, checked, in the converter's layout (see LANDMARK_KEYS)."""
  raw = _read_dict(path, MODEL_FLAG, MODEL_WHAT, trust_weight_pickles)
  arrays = _model_arrays(raw, MODEL_FLAG, path)
  if landmarks_path:
    landmarks = _landmark_arrays(_read_dict(landmarks_path, LANDMARKS_FLAG, LANDMARKS_WHAT, trust_weight_pickles),
                                 LANDMARKS_FLAG, landmarks_path)
  elif 'static_lmk_faces_idx' in raw or 'lmk_face_idx' in raw:
    landmarks = _landmark_arrays(raw, MODEL_FLAG, path)
  else:
    raise WeightsError(LANDMARKS_FLAG, None, f'{path} holds no landmark embedding; pass {LANDMARKS_WHAT}, or '
                       'convert the model with the embedding into one .npz')
  for name, key in LANDMARK_KEYS.items():
    if name in landmarks:
      arrays[key] = landmarks[name]
  total = arrays['shapedirs'].shape[2]
  if shape_components is None:
    shape_components = int(raw['shape_components']) if 'shape_components' in raw else min(FLAME_SHAPE_COMPONENTS,
                                                                                           total)
  if not 0 < shape_components <= total:
    raise WeightsError(MODEL_FLAG, path, f'shapedirs holds {total} components; {shape_components} shape '
                       'components cannot be split from it')
  arrays['shape_components'] = np.asarray(shape_components, dtype=np.int64)
  if 'iris_vertices' not in arrays and arrays['v_template'].shape[0] == FLAME_VERTICES:
    arrays['iris_vertices'] = np.asarray(FLAME_IRIS_VERTICES, dtype=np.int64)
  _check_indices(arrays, path)
  return arrays


def _check_indices(arrays: Dict[str, np.ndarray], path: str):
  vertices, faces = arrays['v_template'].shape[0], arrays['f'].shape[0]
  for key in ('static_lmk_faces_idx', 'dynamic_lmk_faces_idx', 'contour_lmk_faces_idx'):
    if key in arrays and (arrays[key].min() < 0 or arrays[key].max() >= faces):
      raise WeightsError(LANDMARKS_FLAG, path, f'{key} names faces beyond the model\'s {faces}: the embedding '
                         'belongs to another model')
  if 'iris_vertices' in arrays:
    iris = np.asarray(arrays['iris_vertices']).reshape(-1)
    if iris.shape != (2,) or iris.min() < 0 or iris.max() >= vertices:
      raise WeightsError(LANDMARKS_FLAG, path, f'iris_vertices {iris.tolist()} are not two of the model\'s '
                         f'{vertices} vertices')


def npz_bytes(arrays: Mapping[str, np.ndarray], compress: bool = True) -> bytes:
  """An .npz with fixed member timestamps: the same arrays always give the same bytes (np.savez stamps now)."""
  buffer = io.BytesIO()
  method = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
  with zipfile.ZipFile(buffer, 'w', compression=method) as archive:
    for key in sorted(arrays):
      member = io.BytesIO()
      np.lib.format.write_array(member, np.asarray(arrays[key], order='C'), allow_pickle=False)
      info = zipfile.ZipInfo(f'{key}.npy', date_time=(1980, 1, 1, 0, 0, 0))
      info.compress_type = method
      archive.writestr(info, member.getvalue())
  return buffer.getvalue()


def convert(model_path: str, landmarks_path: Optional[str], trust_weight_pickles: bool,
            shape_components: Optional[int] = None) -> bytes:
  """The .npz a pickle-free run loads: the model's arrays (float32, dense J_regressor) and the embedding."""
  arrays = read_flame_files(model_path, trust_weight_pickles, landmarks_path, shape_components)
  out = {}
  for key, value in arrays.items():
    value = np.asarray(value)
    out[key] = value.astype(np.float32) if value.dtype.kind == 'f' else value.astype(np.int64)
  return npz_bytes(out)


# ---------------------------------------------------------------- the layer

def rodrigues(rotvec: torch.Tensor) -> torch.Tensor:
  """(N, 3) axis-angle -> (N, 3, 3); the small offset keeps the gradient finite at zero rotation."""
  angle = torch.linalg.norm(rotvec + 1e-8, dim=1, keepdim=True)
  axis = rotvec / angle
  cos, sin = torch.cos(angle)[:, :, None], torch.sin(angle)[:, :, None]
  x, y, z = axis.unbind(1)
  zero = torch.zeros_like(x)
  skew = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], 1).view(-1, 3, 3)
  eye = torch.eye(3, dtype=rotvec.dtype, device=rotvec.device)[None]
  return eye + sin * skew + (1 - cos) * torch.bmm(skew, skew)


def yaw_degrees(rotation: torch.Tensor) -> torch.Tensor:
  """Rotation about y of (B, 3, 3) matrices, as DECA/FLAME select the contour row."""
  return torch.rad2deg(torch.atan2(-rotation[:, 2, 0], torch.sqrt(rotation[:, 0, 0] ** 2 + rotation[:, 1, 0] ** 2)))


class FlameLayer(nn.Module):
  """Batched FLAME: shape/expression blendshapes, pose blendshapes, linear blend skinning, keypoints.

  Everything can be evaluated on a subset of vertices (`vertex_ids`): joints come from the regressor applied
  to the blendshape bases ahead of time, so fitting keypoints never poses all 5023 vertices.
  """

  def __init__(self, arrays: Mapping[str, np.ndarray]):
    super().__init__()
    f32 = lambda key: torch.as_tensor(np.asarray(arrays[key], dtype=np.float32))  # noqa: E731
    self.num_shape = int(arrays['shape_components'])
    shapedirs = f32('shapedirs')
    self.num_expression = shapedirs.shape[2] - self.num_shape
    regressor = f32('J_regressor')
    self.register_buffer('v_template', f32('v_template'))
    self.register_buffer('shapedirs', shapedirs)
    self.register_buffer('posedirs', f32('posedirs'))
    self.register_buffer('lbs_weights', f32('weights'))
    self.register_buffer('joint_template', regressor @ self.v_template)
    self.register_buffer('joint_dirs', torch.einsum('jv,vkc->jkc', regressor, shapedirs))
    self.register_buffer('faces', torch.as_tensor(np.asarray(arrays['f'], dtype=np.int64)))
    parents = np.asarray(arrays['kintree_table'])[0].astype(np.int64)
    parents[0] = -1
    if any(not 0 <= parent < child for child, parent in enumerate(parents) if child):
      raise WeightsError(MODEL_FLAG, None, f'kintree_table parents {parents.tolist()} do not list each joint after '
                         'its parent')
    self.parents = parents.tolist()
    self.num_joints = len(self.parents)
    long = lambda key: torch.as_tensor(np.asarray(arrays[key], dtype=np.int64))  # noqa: E731
    self.register_buffer('static_faces', long('static_lmk_faces_idx').reshape(-1))
    self.register_buffer('static_bary', f32('static_lmk_bary_coords').reshape(-1, 3))
    self.contour = 'dynamic' if 'dynamic_lmk_faces_idx' in arrays else (
        'static' if 'contour_lmk_faces_idx' in arrays else None)
    if self.contour == 'dynamic':
      self.register_buffer('dynamic_faces', long('dynamic_lmk_faces_idx'))
      self.register_buffer('dynamic_bary', f32('dynamic_lmk_bary_coords'))
    elif self.contour == 'static':
      self.register_buffer('contour_faces', long('contour_lmk_faces_idx').reshape(-1))
      self.register_buffer('contour_bary', f32('contour_lmk_bary_coords').reshape(-1, 3))
    self.has_iris = 'iris_vertices' in arrays
    self.register_buffer('iris_vertices', long('iris_vertices').reshape(-1) if self.has_iris
                         else torch.zeros(2, dtype=torch.long))
    mask = torch.ones(NUM_KEYPOINTS, dtype=torch.bool)
    mask[:NUM_CONTOUR] = self.contour is not None
    mask[NUM_LANDMARKS:] = self.has_iris
    self.register_buffer('keypoint_mask', mask)

  @property
  def num_vertices(self) -> int:
    return self.v_template.shape[0]

  def _blend(self, base: torch.Tensor, dirs: torch.Tensor, shape: torch.Tensor, expression: torch.Tensor):
    """base (N, 3) + shape and expression blendshapes of `dirs` (N, 3, all components) -> (B, N, 3). A shape
    shared by the batch, (S,), is applied once, not per frame."""
    if shape.shape[-1] > self.num_shape or expression.shape[1] > self.num_expression:
      raise ValueError(f'the model has {self.num_shape} shape and {self.num_expression} expression components; '
                       f'{shape.shape[-1]} and {expression.shape[1]} were given')
    shape_dirs = dirs[:, :, :shape.shape[-1]]
    expression_dirs = dirs[:, :, self.num_shape:self.num_shape + expression.shape[1]]
    if shape.dim() == 1:
      shaped = (base + shape_dirs @ shape)[None]
    else:
      shaped = base + torch.einsum('bc,nkc->bnk', shape, shape_dirs)
    return shaped + torch.einsum('bc,nkc->bnk', expression, expression_dirs)

  def joints_and_transforms(self, shape, expression, pose):
    """Rotations (B, J, 3, 3) and the per-joint skinning transforms (B, J, 4, 4) of the shaped, posed head."""
    batch = pose.shape[0]
    joints = self._blend(self.joint_template, self.joint_dirs, shape, expression).expand(batch, -1, -1)
    rotations = rodrigues(pose.reshape(-1, 3)).view(batch, self.num_joints, 3, 3)
    local = torch.zeros(batch, self.num_joints, 4, 4, dtype=pose.dtype, device=pose.device)
    local[:, :, :3, :3] = rotations
    local[:, 0, :3, 3] = joints[:, 0]
    parents = self.parents
    local[:, 1:, :3, 3] = joints[:, 1:] - joints[:, parents[1:]]
    local[:, :, 3, 3] = 1
    chain = [local[:, 0]]
    for joint in range(1, self.num_joints):
      chain.append(chain[parents[joint]] @ local[:, joint])
    world = torch.stack(chain, 1)
    skinning = world.clone()
    skinning[:, :, :3, 3] = world[:, :, :3, 3] - torch.einsum('bjkl,bjl->bjk', world[:, :, :3, :3], joints)
    return rotations, skinning

  def forward(self, shape: torch.Tensor, expression: torch.Tensor, pose: torch.Tensor,
              vertex_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(B, K, 3) posed vertices (all, or `vertex_ids`). shape (S,) or (B, S); expression (B, E); pose (B, 3J)."""
    rotations, skinning = self.joints_and_transforms(shape, expression, pose)
    ids = slice(None) if vertex_ids is None else vertex_ids
    shaped = self._blend(self.v_template[ids], self.shapedirs[ids], shape, expression)
    eye = torch.eye(3, dtype=pose.dtype, device=pose.device)
    pose_feature = (rotations[:, 1:] - eye).reshape(pose.shape[0], -1)
    posed = shaped + torch.einsum('bp,vkp->bvk', pose_feature, self.posedirs[ids])
    blend = torch.einsum('vj,bjkl->bvkl', self.lbs_weights[ids], skinning)
    return torch.einsum('bvkl,bvl->bvk', blend[:, :, :3, :3], posed) + blend[:, :, :3, 3]

  def contour_rows(self, pose: torch.Tensor) -> torch.Tensor:
    """DECA's row of the dynamic contour embedding for each frame: by the yaw of global x neck rotation."""
    rotations = rodrigues(pose[:, :6].reshape(-1, 3)).view(-1, 2, 3, 3)
    yaw = torch.round(torch.clamp(yaw_degrees(rotations[:, 0] @ rotations[:, 1]), max=39)).long()
    rows = torch.where(yaw < 0, torch.where(yaw < -39, torch.full_like(yaw, 78), 39 - yaw), yaw)
    return rows.clamp(max=self.dynamic_faces.shape[0] - 1)

  def _keypoint_faces(self, pose: torch.Tensor):
    batch = pose.shape[0]
    static_faces = self.static_faces[None].expand(batch, -1)
    static_bary = self.static_bary[None].expand(batch, -1, -1)
    if self.contour == 'dynamic':
      rows = self.contour_rows(pose)
      contour_faces, contour_bary = self.dynamic_faces[rows], self.dynamic_bary[rows]
    elif self.contour == 'static':
      contour_faces = self.contour_faces[None].expand(batch, -1)
      contour_bary = self.contour_bary[None].expand(batch, -1, -1)
    else:  # no contour embedding: the first face as a placeholder, masked out by keypoint_mask
      contour_faces = torch.zeros(batch, NUM_CONTOUR, dtype=torch.long, device=pose.device)
      contour_bary = torch.zeros(batch, NUM_CONTOUR, 3, dtype=pose.dtype, device=pose.device)
    return torch.cat([contour_faces, static_faces], 1), torch.cat([contour_bary, static_bary], 1)

  def keypoints(self, shape: torch.Tensor, expression: torch.Tensor, pose: torch.Tensor) -> torch.Tensor:
    """(B, 70, 3): the 68 landmarks then the 2 iris centres; rows where keypoint_mask is False are meaningless."""
    batch = pose.shape[0]
    faces, bary = self._keypoint_faces(pose)
    corner_ids = self.faces[faces]  # (B, 68, 3)
    iris_ids = self.iris_vertices[None, :, None].expand(batch, -1, 3)
    ids = torch.cat([corner_ids, iris_ids], 1)
    unique, inverse = torch.unique(ids, return_inverse=True)
    vertices = self(shape, expression, pose, unique)  # (B, U, 3)
    corners = torch.gather(vertices, 1, inverse.view(batch, -1, 1).expand(-1, -1, 3)).view(batch, -1, 3, 3)
    weights = torch.cat([bary, torch.tensor([1., 0., 0.], dtype=bary.dtype, device=bary.device)
                         .expand(batch, 2, 3)], 1)
    return torch.einsum('blc,blck->blk', weights, corners)


def load_flame(path: str, trust_weight_pickles: bool = False, landmarks_path: Optional[str] = None,
               shape_components: Optional[int] = None) -> FlameLayer:
  """The FLAME layer of `--flame_model` (and `--flame_landmarks`); WeightsError naming the flag otherwise."""
  return FlameLayer(read_flame_files(path, trust_weight_pickles, landmarks_path, shape_components))


def split_pose(pose: np.ndarray) -> Dict[str, np.ndarray]:
  """FLAME's (T, 15) pose as named parts (GaussianAvatars' flame_param.npz names)."""
  parts, start = {}, 0
  for name, size in POSE_PARTS:
    parts[name] = pose[:, start:start + size]
    start += size
  return parts


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m beam_pipeline.recipes.avatar.flame',
                                   description=__doc__.split('\n')[0])
  commands = parser.add_subparsers(dest='command', required=True)
  conv = commands.add_parser('convert', help='Write the pickle-free .npz a run loads without --trust_weight_pickles.')
  conv.add_argument('paths', nargs='+', metavar='PATH',
                    help='generic_model.pkl [landmark_embedding.npy | flame_static_embedding.pkl] out.npz')
  conv.add_argument('--trust_weight_pickles', action='store_true', help='Read the pickles (restricted to arrays).')
  conv.add_argument('--shape_components', type=int, default=None,
                    help=f'Leading shapedirs components that are identity (FLAME: {FLAME_SHAPE_COMPONENTS}).')
  args = parser.parse_args(argv)
  if len(args.paths) not in (2, 3):
    parser.error('give the model, optionally the landmark embedding, and the output .npz')
  model, landmarks, out = args.paths[0], (args.paths[1] if len(args.paths) == 3 else None), args.paths[-1]
  try:
    data = convert(model, landmarks, args.trust_weight_pickles, args.shape_components)
  except WeightsError as error:
    print(f'error: {error}', file=sys.stderr)
    return 2
  write_atomic(out, data)
  print(f'wrote {out} ({len(data)} bytes)')
  return 0


if __name__ == '__main__':
  sys.exit(main())
