"""A small FLAME model in the official files' format, for tests (the real one is licensed per user).

Same keys and layouts as `generic_model.pkl` (chumpy shapedirs, scipy.sparse J_regressor, uint32
kintree_table with FLAME's 5 joints, posedirs (V, 3, 36)) and as DECA's `landmark_embedding.npy` (a pickled
dict: static 51, dynamic (79, 17) contour rows with torch tensors, full 68). A head of ~250 vertices: a
skull sphere and two eyeballs whose front vertices are the iris centres.
"""
from __future__ import annotations

import contextlib
import pickle
import sys
import types

import numpy as np

SHAPE, EXPRESSION = 8, 6
UINT32_MAX = 4294967295


class _ChumpyCh:
  """Pickles as chumpy.ch.Ch with chumpy's state dict (the array under 'x'), as the official file does."""

  def __init__(self, x):
    self.x = x

  def __getstate__(self):
    return {'x': self.x, '_dirty_vars': set(), '_itr': None, '_depends_on_deps': {}}


@contextlib.contextmanager
def _as_chumpy():
  package, module = types.ModuleType('chumpy'), types.ModuleType('chumpy.ch')
  package.ch, module.Ch = module, _ChumpyCh
  saved = (_ChumpyCh.__module__, _ChumpyCh.__qualname__)
  _ChumpyCh.__module__, _ChumpyCh.__qualname__ = 'chumpy.ch', 'Ch'
  sys.modules.update({'chumpy': package, 'chumpy.ch': module})
  try:
    yield
  finally:
    _ChumpyCh.__module__, _ChumpyCh.__qualname__ = saved
    del sys.modules['chumpy'], sys.modules['chumpy.ch']


def _sphere(count, radius, centre):
  index = np.arange(count) + 0.5
  polar = np.arccos(1 - 2 * index / count)
  azimuth = np.pi * (1 + 5 ** 0.5) * index
  unit = np.stack([np.sin(polar) * np.sin(azimuth), np.cos(polar), np.sin(polar) * np.cos(azimuth)], 1)
  return unit * radius + np.asarray(centre), unit


def _hull_faces(points, offset):
  from scipy.spatial import ConvexHull
  return ConvexHull(points).simplices + offset


def _barycentric(points, triangles):
  """Barycentric coordinates of each point's projection onto its triangle's plane."""
  a, b, c = triangles[:, 0], triangles[:, 1], triangles[:, 2]
  v0, v1, v2 = b - a, c - a, points - a
  d00, d01, d11 = (v0 * v0).sum(1), (v0 * v1).sum(1), (v1 * v1).sum(1)
  d20, d21 = (v2 * v0).sum(1), (v2 * v1).sum(1)
  denominator = d00 * d11 - d01 * d01
  v = (d11 * d20 - d01 * d21) / denominator
  w = (d00 * d21 - d01 * d20) / denominator
  return np.stack([1 - v - w, v, w], 1)


def build(seed: int = 0):
  """(model dict as in generic_model.pkl with plain arrays, DECA-style embedding dict, iris vertex ids)."""
  rng = np.random.default_rng(seed)
  skull, skull_dir = _sphere(200, 0.09, (0.0, 0.0, 0.0))
  eye_centres = [(-0.032, 0.03, 0.07), (0.032, 0.03, 0.07)]  # subject's right (x < 0), then left
  eyes = [_sphere(25, 0.012, centre)[0] for centre in eye_centres]
  vertices = np.concatenate([skull] + eyes)
  skull_faces = _hull_faces(skull, 0)
  faces = np.concatenate([skull_faces, _hull_faces(eyes[0], 200), _hull_faces(eyes[1], 225)])
  count = len(vertices)
  # joints: global (root), neck, jaw, left eye, right eye as in FLAME's kintree
  joints = 5
  regressor = np.zeros((joints, count))
  below = np.argsort(skull[:, 1])[:20]
  regressor[0, below] = 1 / 20
  middle = np.argsort(np.abs(skull[:, 1] + 0.03))[:20]
  regressor[1, middle] = 1 / 20
  chin = np.argsort(np.linalg.norm(skull - (0.0, -0.06, 0.05), axis=1))[:10]
  regressor[2, chin] = 1 / 10
  regressor[3, 225:250] = 1 / 25
  regressor[4, 200:225] = 1 / 25
  weights = np.zeros((count, joints))
  jaw = (skull[:, 1] < -0.02) & (skull[:, 2] > 0)
  weights[:200, 1] = np.where(jaw, 0.3, 0.9)
  weights[:200, 2] = np.where(jaw, 0.7, 0.0)
  weights[:200, 0] = np.where(jaw, 0.0, 0.1)
  weights[200:225, 4] = 1
  weights[225:250, 3] = 1
  shapedirs = np.zeros((count, 3, SHAPE + EXPRESSION))
  shapedirs[:200] = rng.normal(0, 0.004, (200, 3, SHAPE + EXPRESSION))
  shapedirs[:200, :, SHAPE:] *= (skull_dir[:, 2:3, None] > 0)  # expressions move the face only
  posedirs = rng.normal(0, 0.001, (count, 3, (joints - 1) * 9))
  posedirs[:, :, 18:] = 0  # as in FLAME, eyeball rotations bring no pose correctives
  model = {
      'v_template': vertices, 'shapedirs': shapedirs, 'posedirs': posedirs, 'J_regressor': regressor,
      'weights': weights, 'f': faces.astype(np.uint32),
      'kintree_table': np.array([[UINT32_MAX, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.uint32),
      'bs_style': 'lbs', 'bs_type': 'lrotmin'}
  centroids = vertices[faces].mean(1)
  front = np.flatnonzero(centroids[:len(skull_faces), 2] > 0.03)
  static = rng.choice(front, 51, replace=False)
  bary = lambda n: (lambda w: w / w.sum(-1, keepdims=True))(rng.uniform(0.1, 1, (n, 3)))  # noqa: E731
  contour_bary = np.zeros((79, 17, 3))
  rows = []
  for row in range(79):  # DECA's rows: yaw 0..39 degrees, then -1..-39; the contour slides with the yaw
    yaw = np.deg2rad(row if row < 40 else 39 - row)
    azimuth = np.deg2rad(np.linspace(-80, 80, 17)) + yaw
    elevation = np.deg2rad(-10 - 40 * np.cos(np.linspace(-np.pi / 2, np.pi / 2, 17)))
    points = 0.09 * np.stack([np.sin(azimuth) * np.cos(elevation), np.sin(elevation),
                              np.cos(azimuth) * np.cos(elevation)], 1)
    nearest = np.argmin(np.linalg.norm(centroids[None, :len(skull_faces)] - points[:, None], axis=-1), 1)
    rows.append(nearest)
    contour_bary[row] = _barycentric(points, vertices[faces[nearest]])
  dynamic_faces = np.stack(rows)
  dynamic_bary = contour_bary
  static_bary = bary(51)
  embedding = {
      'static_lmk_faces_idx': static.astype(np.int64), 'static_lmk_bary_coords': static_bary,
      'dynamic_lmk_faces_idx': dynamic_faces, 'dynamic_lmk_bary_coords': dynamic_bary,
      'full_lmk_faces_idx': np.concatenate([dynamic_faces[0], static])[None],
      'full_lmk_bary_coords': np.concatenate([dynamic_bary[0], static_bary])[None]}
  iris = np.array([200 + np.argmax(eyes[0][:, 2]), 225 + np.argmax(eyes[1][:, 2])])
  return model, embedding, iris


def official_pickle(model) -> bytes:
  """The model pickled as the official file is: chumpy shapedirs, scipy.sparse J_regressor, protocol 2."""
  import scipy.sparse
  with _as_chumpy():
    return pickle.dumps(dict(model, shapedirs=_ChumpyCh(model['shapedirs']),
                             J_regressor=scipy.sparse.csc_matrix(model['J_regressor'])), protocol=2)


def deca_embedding_npy(embedding) -> bytes:
  """DECA's landmark_embedding.npy: a pickled dict in an .npy, the dynamic parts as torch tensors."""
  import io
  import torch
  data = dict(embedding, dynamic_lmk_faces_idx=torch.as_tensor(embedding['dynamic_lmk_faces_idx']),
              dynamic_lmk_bary_coords=torch.as_tensor(embedding['dynamic_lmk_bary_coords']))
  buffer = io.BytesIO()
  np.save(buffer, np.array(data, dtype=object), allow_pickle=True)
  return buffer.getvalue()


def write_npz(path, model, embedding, iris) -> str:
  """The converter's layout (what `python -m beam_pipeline.recipes.avatar.flame convert` writes) for this model."""
  arrays = {key: value for key, value in model.items() if not isinstance(value, str)}
  arrays.update({key: value for key, value in embedding.items() if not key.startswith('full_')})
  arrays['iris_vertices'] = iris
  arrays['shape_components'] = np.asarray(SHAPE)
  np.savez(path, **arrays)
  return str(path)
