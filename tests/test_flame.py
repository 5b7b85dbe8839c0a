"""FLAME layer, loading rules and per-subject fitting, against a small model in the official files' format."""
import dataclasses
import json
import os
import pickle

import numpy as np
import pytest
import torch
from scipy.spatial.transform import Rotation

from beam_pipeline.recipes.avatar import flame, flame_fit
from model_handlers.weights import WeightsError
from tests import flame_synthetic

INTRINSICS = flame_fit.Intrinsics.for_size(512)


@pytest.fixture(scope='module')
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp('flame')
  model, embedding, iris = flame_synthetic.build()
  pkl = root / 'generic_model.pkl'
  pkl.write_bytes(flame_synthetic.official_pickle(model))
  npy = root / 'landmark_embedding.npy'
  npy.write_bytes(flame_synthetic.deca_embedding_npy(dict(embedding, iris_vertices=iris)))
  npz = flame_synthetic.write_npz(root / 'flame.npz', model, embedding, iris)
  return {'root': root, 'model': model, 'embedding': embedding, 'iris': iris, 'pkl': str(pkl), 'npy': str(npy),
          'npz': npz}


@pytest.fixture(scope='module')
def layer(files):
  return flame.load_flame(files['npz'])


def smooth_sequence(frames, seed=1):
  """Known parameters moving smoothly, as a talking head does over a few frames."""
  generator = torch.Generator().manual_seed(seed)
  time = torch.linspace(0, 1, frames)[:, None]

  def wave(count, amplitude):
    phase = torch.rand(count, generator=generator) * 6.28
    cycles = torch.rand(count, generator=generator) * 0.3 + 0.1
    return amplitude * torch.sin(6.28 * cycles * time + phase)
  shape = torch.randn(flame_synthetic.SHAPE, generator=generator) * 0.8
  expression = wave(flame_synthetic.EXPRESSION, 0.8)
  pose = torch.cat([wave(3, 0.15), wave(3, 0.03), wave(1, 0.1).abs() + 0.05, torch.zeros(frames, 2),
                    wave(6, 0.1)], 1)
  translation = torch.tensor([0.01, -0.02, 0.75]) + wave(3, 0.01)
  return shape, expression, pose, translation


def observe(layer, sequence):
  shape, expression, pose, translation = sequence
  pixels = flame_fit.project(layer.keypoints(shape, expression, pose), translation, INTRINSICS).numpy()
  return pixels[:, :68], pixels[:, 68:]


# ---------------------------------------------------------------- the layer against a plain numpy LBS

def reference_vertices(model, shape, expression, pose):
  """FLAME's formula written out for one frame: blendshapes, pose blendshapes, forward kinematics, skinning."""
  shapedirs = model['shapedirs']
  coefficients = np.zeros(shapedirs.shape[2])
  coefficients[:len(shape)] = shape
  coefficients[flame_synthetic.SHAPE:flame_synthetic.SHAPE + len(expression)] = expression
  shaped = model['v_template'] + shapedirs @ coefficients
  joints = model['J_regressor'] @ shaped
  rotations = Rotation.from_rotvec(pose.reshape(-1, 3)).as_matrix()
  feature = np.concatenate([(rotation - np.eye(3)).ravel() for rotation in rotations[1:]])
  posed = shaped + model['posedirs'] @ feature
  parents = [-1, 0, 1, 1, 1]
  world = []
  for joint, parent in enumerate(parents):
    local = np.eye(4)
    local[:3, :3] = rotations[joint]
    local[:3, 3] = joints[joint] - (joints[parent] if parent >= 0 else 0)
    world.append(local if parent < 0 else world[parent] @ local)
  result = np.zeros_like(posed)
  for joint, transform in enumerate(world):
    moved = (posed - joints[joint]) @ transform[:3, :3].T + transform[:3, 3]
    result += model['weights'][:, joint:joint + 1] * moved
  return result


def test_layer_matches_the_flame_formula(files, layer):
  shape = np.array([0.5, -1.0, 0.3])
  expression = np.array([1.0, -0.5])
  pose = np.array([0.1, -0.2, 0.05, 0.02, 0.1, 0.0, 0.3, 0.0, 0.0, 0.05, -0.1, 0.0, 0.05, -0.1, 0.0])
  expected = reference_vertices(files['model'], shape, expression, pose)
  as_tensor = lambda array: torch.tensor(array, dtype=torch.float32)  # noqa: E731
  got = layer(as_tensor(shape), as_tensor(expression)[None], as_tensor(pose)[None])[0].numpy()
  assert np.abs(got - expected).max() < 1e-5
  subset = torch.tensor([3, 200, 17, 249])
  assert np.abs(layer(as_tensor(shape), as_tensor(expression)[None], as_tensor(pose)[None], subset)[0].numpy()
                - expected[subset.numpy()]).max() < 1e-5


def test_keypoints_use_the_contour_row_of_the_head_yaw(files, layer):
  """Landmarks are barycentric points of the posed mesh; the contour row follows the yaw as in DECA."""
  embedding = files['embedding']
  for yaw_degrees, row in ((20.0, 20), (-20.0, 59), (0.0, 0)):
    pose = torch.zeros(1, 15)
    pose[0, 1] = np.deg2rad(yaw_degrees) / 2  # global and neck share the yaw
    pose[0, 4] = np.deg2rad(yaw_degrees) / 2
    shape, expression = torch.zeros(3), torch.zeros(1, 2)
    vertices = layer(shape, expression, pose)[0].numpy()
    faces = files['model']['f'].astype(int)
    contour = np.einsum('lc,lck->lk', embedding['dynamic_lmk_bary_coords'][row],
                        vertices[faces[embedding['dynamic_lmk_faces_idx'][row]]])
    static = np.einsum('lc,lck->lk', embedding['static_lmk_bary_coords'],
                       vertices[faces[embedding['static_lmk_faces_idx']]])
    keypoints = layer.keypoints(shape, expression, pose)[0].numpy()
    assert np.abs(keypoints[:68] - np.concatenate([contour, static])).max() < 1e-6
    assert np.abs(keypoints[68:] - vertices[files['iris']]).max() < 1e-6


# ---------------------------------------------------------------- loading rules

def test_pickle_is_refused_without_trust_pickle_and_nothing_runs(tmp_path, files):
  marker = tmp_path / 'payload_ran'

  class Payload:
    def __reduce__(self):
      return os.mkdir, (str(marker),)
  payload = pickle.dumps(dict(files['model'], weights_prior=Payload()), protocol=2)
  path = tmp_path / 'generic_model.pkl'
  path.write_bytes(payload)
  with pytest.raises(WeightsError) as refused:
    flame.load_flame(str(path), trust_weight_pickles=False, landmarks_path=files['npz'])
  assert '--flame_model' in str(refused.value) and '--trust_weight_pickles' in str(refused.value)
  assert not marker.exists()
  with pytest.raises(WeightsError) as restricted:  # trusted, yet only arrays are rebuilt
    flame.load_flame(str(path), trust_weight_pickles=True, landmarks_path=files['npz'])
  assert 'mkdir' in str(restricted.value)
  assert not marker.exists()
  pickle.loads(payload)  # the payload is live: a plain unpickler runs it
  assert marker.exists()


def test_pickled_landmark_embedding_needs_trust_pickle(files):
  with pytest.raises(WeightsError, match='--flame_landmarks.*--trust_weight_pickles'):
    flame.load_flame(files['npz'], trust_weight_pickles=False, landmarks_path=files['npy'])


def test_official_pickle_loads_with_trust_pickle_like_the_npz(files, layer):
  """chumpy shapedirs, scipy.sparse J_regressor and DECA's torch tensors are read as plain arrays."""
  trusted = flame.load_flame(files['pkl'], trust_weight_pickles=True, landmarks_path=files['npy'],
                             shape_components=flame_synthetic.SHAPE)
  assert trusted.contour == 'dynamic' and trusted.has_iris
  shape, expression, pose, _ = smooth_sequence(4)
  assert torch.allclose(trusted.keypoints(shape, expression, pose), layer.keypoints(shape, expression, pose),
                        atol=1e-6)


def test_converter_round_trip(files, layer, tmp_path, capsys):
  out = tmp_path / 'converted.npz'
  args = ['convert', files['pkl'], files['npy'], str(out), '--shape_components', str(flame_synthetic.SHAPE)]
  assert flame.main(args) == 2  # pickles need --trust_weight_pickles
  assert '--trust_weight_pickles' in capsys.readouterr().err and not out.exists()
  assert flame.main(args + ['--trust_weight_pickles']) == 0
  first = out.read_bytes()
  assert flame.main(args + ['--trust_weight_pickles']) == 0 and out.read_bytes() == first  # deterministic bytes
  converted = flame.load_flame(str(out))  # no pickle left: loads without trust
  assert converted.num_shape == flame_synthetic.SHAPE and converted.contour == 'dynamic'
  shape, expression, pose, _ = smooth_sequence(4)
  assert torch.allclose(converted.keypoints(shape, expression, pose), layer.keypoints(shape, expression, pose),
                        atol=1e-6)


def test_static_only_embedding_leaves_the_contour_out(files, tmp_path):
  """FLAME's flame_static_embedding.pkl: 51 points; the 17 contour points are masked, the fit uses the rest."""
  static = tmp_path / 'flame_static_embedding.pkl'
  embedding = files['embedding']
  static.write_bytes(pickle.dumps({'lmk_face_idx': embedding['static_lmk_faces_idx'],
                                   'lmk_b_coords': embedding['static_lmk_bary_coords']}, protocol=2))
  model = flame.load_flame(files['pkl'], trust_weight_pickles=True, landmarks_path=str(static),
                           shape_components=flame_synthetic.SHAPE)
  assert model.contour is None and not model.has_iris  # a 250-vertex model has no FLAME iris vertices
  assert model.keypoint_mask.sum() == 51


@pytest.mark.parametrize('change, message', [
    (lambda arrays: arrays.pop('posedirs'), "missing keys \\['posedirs'\\]"),
    (lambda arrays: arrays.update(posedirs=arrays['posedirs'][:, :, :27]), 'posedirs has shape'),
    (lambda arrays: arrays.update(static_lmk_faces_idx=arrays['static_lmk_faces_idx'] + 10 ** 6),
     'belongs to another model'),
    (lambda arrays: [arrays.pop(key) for key in list(arrays) if 'lmk' in key], '--flame_landmarks'),
])
def test_wrong_files_give_a_clear_error(files, tmp_path, change, message):
  with np.load(files['npz']) as archive:
    arrays = dict(archive)
  change(arrays)
  path = tmp_path / 'broken.npz'
  np.savez(path, **arrays)
  with pytest.raises(WeightsError, match=message):
    flame.load_flame(str(path))


def test_missing_model_names_the_flag(tmp_path):
  with pytest.raises(WeightsError, match='--flame_model'):
    flame.load_flame(str(tmp_path / 'nowhere.pkl'))


# ---------------------------------------------------------------- fitting

LIGHT = flame_fit.FitWeights(**{field.name: getattr(flame_fit.FitWeights(), field.name) * 0.001
                                for field in dataclasses.fields(flame_fit.FitWeights)
                                if field.name not in ('landmarks', 'iris')})


@pytest.fixture(autouse=True)
def one_thread():
  """These fits are small: intra-op threads only contend on the shared test machine's two cores."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def assert_recovered(fit, keypoints, iris):
  """Tolerance: the inner 51 landmarks and the irises within 0.5 px everywhere; over all 68, each frame's mean
  within 1 px and the median frame within 0.5 px (the contour row is picked by the yaw rounded to a degree,
  so a frame whose yaw sits on a half degree may take the neighbouring row, a few px away on the contour)."""
  inner = np.linalg.norm(fit.keypoints_2d[:, 17:68] - keypoints[:, 17:], axis=-1)
  assert np.nanmax(inner) < 0.5
  assert np.nanmax(fit.error_after) < 1.0 and np.nanmedian(fit.error_after) < 0.5
  if iris is not None:
    assert fit.iris_error.max() < 0.5


def test_fit_recovers_landmarks_from_known_parameters(layer):
  """Under light priors the fit reproduces the observations (from > 15 px before) and the head rotation."""
  sequence = smooth_sequence(8)
  keypoints, iris = observe(layer, sequence)
  fit = flame_fit.fit_flame(layer, keypoints, iris, INTRINSICS, rigid_iterations=100, iterations=500,
                            weights=LIGHT, device='cpu')
  assert fit.error_before.min() > 15
  assert_recovered(fit, keypoints, iris)
  refit = observe(layer, (torch.tensor(fit.shape), torch.tensor(fit.expression), torch.tensor(fit.pose),
                          torch.tensor(fit.translation)))
  assert np.abs(refit[0] - fit.keypoints_2d[:, :68]).max() < 1e-3  # the returned parameters give those points
  total = lambda pose: np.stack([Rotation.from_rotvec(pose[t, :3]) * Rotation.from_rotvec(pose[t, 3:6])  # noqa: E731
                                 for t in range(len(pose))])
  difference = [(a.inv() * b).magnitude() for a, b in zip(total(fit.pose), total(sequence[2].numpy()))]
  assert max(difference) < 0.03  # head rotation (global x neck), radians


def test_fit_with_default_priors_and_missing_frames(layer):
  """IMAvatar's priors bias the fit slightly; a frame without landmarks and no iris at all still fit."""
  keypoints, _ = observe(layer, smooth_sequence(8, seed=2))
  keypoints[3] = np.nan
  fit = flame_fit.fit_flame(layer, keypoints, None, INTRINSICS, rigid_iterations=100, iterations=500,
                            device='cpu')
  assert np.isnan(fit.error_after[3]) and np.isnan(fit.error_before[3]) and np.isnan(fit.iris_error).all()
  known = np.delete(fit.error_after, 3)
  assert known.max() < 1.0 and np.median(known) < 0.5 and np.nanmin(fit.error_before) > 15
  assert fit.expression.shape == (8, flame_synthetic.EXPRESSION) and fit.pose.shape == (8, 15)
  assert fit.translation.shape == (8, 3) and fit.shape.shape == (flame_synthetic.SHAPE,)


def test_seed_files_place_the_model_where_the_fit_does(layer):
  """tracked_params.json read as HRAvatar does (FLAME + translation, x 4, then diag(1, -1, -1) world_mat, then
  the intrinsics) and flame_params.json as IMAvatar's optimize.py writes it give the fit's own points."""
  sequence = smooth_sequence(6, seed=3)
  keypoints, iris = observe(layer, sequence)
  fit = flame_fit.fit_flame(layer, keypoints, iris, INTRINSICS, rigid_iterations=20, iterations=40,
                            weights=LIGHT, device='cpu')
  names = [f'{k:05d}.png' for k in range(6)]
  files = flame_fit.seed_files(fit, names, keypoints, iris, 512)
  assert files == flame_fit.seed_files(fit, names, keypoints, iris, 512)  # same fit, same bytes
  tracked = json.loads(files['tracked_params.json'])
  fx, fy, cx, cy = tracked['intrinsics']
  assert (fx, fy, cx, cy) == (INTRINSICS.fx, INTRINSICS.fy, INTRINSICS.cx, INTRINSICS.cy)
  shape = torch.tensor(tracked['shapecode'])[0]
  for k, name in enumerate(names):
    entry = tracked[name]
    points = layer.keypoints(shape, torch.tensor(entry['expcode']), torch.tensor(entry['fullposecode']))[0].numpy()
    scaled = (points + np.array(entry['translation'])) * 4
    w2c = np.diag([1.0, -1.0, -1.0, 1.0]) @ np.array(entry['world_mat'])
    camera = scaled @ w2c[:3, :3].T + w2c[:3, 3]
    pixels = camera[:, :2] / camera[:, 2:] * [fx, fy] + [cx, cy]
    np.testing.assert_allclose(pixels, fit.keypoints_2d[k], atol=1e-2)
  params = json.loads(files['flame_params.json'])
  assert [frame['file_path'] for frame in params['frames']] == ['./image/' + name for name in names]
  np.testing.assert_allclose(params['intrinsics'], [-fx / 512, fy / 512, cx / 512, cy / 512])
  np.testing.assert_allclose(np.array(params['frames'][2]['flame_keypoints']), fit.keypoints_2d[2] / 256 - 1,
                             atol=1e-5)
  assert np.array(params['frames'][0]['world_mat']).shape == (3, 4)
  assert np.array_equal(flame_fit.read_shape(files['flame_params.json']), fit.shape)


def test_fixed_shape_from_another_subject(layer):
  """--shape_from: the other subject's shape (its flame_params.json) is kept as is."""
  sequence = smooth_sequence(6, seed=3)
  keypoints, iris = observe(layer, sequence)
  true_shape = sequence[0].numpy()
  fixed = flame_fit.fit_flame(layer, keypoints, iris, INTRINSICS, shape=true_shape, rigid_iterations=100,
                              iterations=500, weights=LIGHT, device='cpu')
  assert fixed.shape_fixed and np.array_equal(fixed.shape, true_shape.astype(np.float32))
  assert_recovered(fixed, keypoints, iris)


def test_fit_rejects_badly_shaped_input(layer):
  with pytest.raises(ValueError, match='keypoints'):
    flame_fit.fit_flame(layer, np.zeros((3, 51, 2)), None, INTRINSICS, device='cpu')
  with pytest.raises(ValueError, match='shape'):
    flame_fit.fit_flame(layer, np.zeros((3, 68, 2)), None, INTRINSICS, shape=np.zeros(50), device='cpu')


def test_default_intrinsics_are_hravatars_scaled_to_the_frame():
  assert flame_fit.Intrinsics.for_size(512) == flame_fit.Intrinsics(1539.67462, 1508.93280, 261.442628, 253.231895)
  assert flame_fit.Intrinsics.for_size(256, cx=100.0) == flame_fit.Intrinsics(1539.67462 / 2, 1508.93280 / 2, 100.0,
                                                                              253.231895 / 2)
