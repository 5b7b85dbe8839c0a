"""Person segmentation, the offline face parsing, and the BiSeNet handler for user-supplied weights."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from skimage import data

from beam_pipeline import demo
from model_handlers.face_parsing import BiSeNet, FaceParsingModelHandler, MEAN, STD
from model_handlers.mediapipe_face import FaceLandmarkerModelHandler
from model_handlers.mediapipe_segmentation import PersonSegmenterModelHandler
from model_handlers.weights import WeightsError
from transforms.analyzers import parsing
from transforms.frame_analysis import ClipPass, Frame, FrameAnalyzer, PassResult


def _infer(handler, model, images):
  return [result.inference for result in handler.run_inference(images, model)]


@pytest.fixture(scope='module')
def segmenter():
  handler = PersonSegmenterModelHandler()
  model = handler.load_model()
  yield handler, model
  model.close()


@pytest.fixture(scope='module')
def landmarker():
  handler = FaceLandmarkerModelHandler()
  model = handler.load_model()
  yield handler, model
  model.close()


@pytest.fixture(scope='module')
def astronaut(segmenter, landmarker):
  """skimage's astronaut photo, its face mesh (478, 3) and person probability."""
  image = data.astronaut()
  face = _infer(*landmarker, [image])[0]
  assert face.num_faces == 1
  return image, face.landmarks[0], _infer(*segmenter, [image])[0]


def _polygon_mask(shape, points):
  mask = np.zeros(shape, np.uint8)
  cv2.fillPoly(mask, [np.round(points).astype(np.int32)], 1)
  return mask.astype(bool)


def test_segmentation_covers_the_face_and_not_the_corners(segmenter, landmarker):
  spec = demo.VideoSpec()
  frame = demo.render_frame(spec, 0.0, demo._background(spec), demo._sprite(1.0))  # pylint: disable=protected-access
  person = _infer(*segmenter, [frame])[0]
  assert person.shape == frame.shape[:2] and person.dtype == np.float32
  assert 0.0 <= person.min() and person.max() <= 1.0
  landmarks = _infer(*landmarker, [frame])[0].landmarks[0]
  face = _polygon_mask(person.shape, landmarks[list(parsing.FACE_OVAL), :2])
  assert person[face].mean() > 0.9
  for corner in (person[:40, :40], person[:40, -40:], person[-40:, :40], person[-40:, -40:]):
    assert corner.max() < 0.5 and corner.mean() < 0.02


def test_face_mesh_polygons_follow_mediapipe_connections():
  from mediapipe.tasks.python.vision.face_landmarker import FaceLandmarksConnections as mesh

  def edges(connections):
    return {frozenset((c.start, c.end)) for c in connections}

  def chain(points, closed=False):
    pairs = list(zip(points, points[1:])) + ([(points[-1], points[0])] if closed else [])
    return {frozenset(pair) for pair in pairs}

  assert chain(parsing.FACE_OVAL, closed=True) == edges(mesh.FACE_LANDMARKS_FACE_OVAL)
  assert chain(parsing.LEFT_EYE_LOOP, closed=True) == edges(mesh.FACE_LANDMARKS_LEFT_EYE)
  assert chain(parsing.RIGHT_EYE_LOOP, closed=True) == edges(mesh.FACE_LANDMARKS_RIGHT_EYE)
  for loop, connections in ((parsing.LEFT_BROW_LOOP, mesh.FACE_LANDMARKS_LEFT_EYEBROW),
                            (parsing.RIGHT_BROW_LOOP, mesh.FACE_LANDMARKS_RIGHT_EYEBROW)):
    assert chain(loop[:5]) | chain(loop[5:]) == edges(connections)
  lips = (parsing.LIPS_OUTER_UPPER, parsing.LIPS_OUTER_LOWER, parsing.LIPS_INNER_UPPER, parsing.LIPS_INNER_LOWER)
  assert set().union(*map(chain, lips)) == edges(mesh.FACE_LANDMARKS_LIPS)
  assert set(parsing.NOSE_POINTS) == set().union(*edges(mesh.FACE_LANDMARKS_NOSE))


def test_parsing_from_landmarks_puts_classes_where_they_belong(astronaut):
  image, landmarks, person = astronaut
  result = parsing.parse_from_landmarks(landmarks, person, image.shape[:2])
  assert result.shape == image.shape[:2] and result.dtype == np.uint8
  xy = landmarks[:, :2]
  mouth_hull = cv2.dilate(_polygon_mask(result.shape, cv2.convexHull(
      xy[list(parsing.LIPS_OUTER_UPPER + parsing.LIPS_OUTER_LOWER)].astype(np.float32))[:, 0]).astype(np.uint8),
                          np.ones((3, 3), np.uint8)).astype(bool)
  lips = np.isin(result, (parsing.UPPER_LIP, parsing.LOWER_LIP))
  assert lips.sum() > 100 and not (lips & ~mouth_hull).any()
  assert (result == parsing.UPPER_LIP).nonzero()[0].mean() < (result == parsing.LOWER_LIP).nonzero()[0].mean()
  brows_y = xy[list(parsing.LEFT_BROW_LOOP + parsing.RIGHT_BROW_LOOP), 1].min()
  hair_rows = (result == parsing.HAIR).nonzero()[0]
  assert (hair_rows < brows_y).sum() > 1000
  top = xy[parsing.FOREHEAD]
  assert result[int(top[1]) - 8, int(top[0])] == parsing.HAIR  # the hair just above the forehead
  chin = xy[parsing.CHIN]
  assert result[int(chin[1]) + 10, int(chin[0])] == parsing.NECK
  assert result[int(chin[1]) + 120, int(chin[0]) - 100] == parsing.CLOTH
  for label in (parsing.SKIN, parsing.NOSE, parsing.MOUTH, parsing.LEFT_EYE, parsing.RIGHT_EYE,
                parsing.LEFT_BROW, parsing.RIGHT_BROW):
    assert (result == label).sum() > 20, parsing.CLASS_NAMES[label]
  # The subject's left eye is on the image's right.
  assert (result == parsing.LEFT_EYE).nonzero()[1].mean() > (result == parsing.RIGHT_EYE).nonzero()[1].mean()
  assert not person[:20, -20:].any() or (result[:20, -20:] == parsing.BACKGROUND).all()


def test_body_classes_are_the_rule_pixel_by_pixel_on_rolled_heads(astronaut):
  """Neck, cloth or hair of every person pixel outside the face, worked out per row and column, is the rule
  evaluated pixel by pixel, to the last bit, however the head is rolled."""
  image, landmarks, _ = astronaut
  shape = image.shape[:2]
  centre = np.array(shape[::-1], np.float64) / 2
  for angle in np.radians([0, 25, 90, 160, -70]):
    rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    rolled = np.array(landmarks, np.float64)
    rolled[:, :2] = (rolled[:, :2] - centre) @ rotation.T + centre
    result = parsing.parse_from_landmarks(rolled, np.ones(shape, np.float32), shape)
    assert not (result == parsing.BACKGROUND).any()  # the person is everywhere
    rows, cols = np.nonzero(np.isin(result, (parsing.NECK, parsing.CLOTH, parsing.HAIR)))
    xy = rolled[:, :2]
    chin = xy[parsing.CHIN]
    down = chin - xy[parsing.FOREHEAD]
    height = max(float(np.linalg.norm(down)), 1.0)
    down /= height
    across = np.array([-down[1], down[0]])
    oval = (xy[list(parsing.FACE_OVAL)] - chin) @ across
    width, axis = max(float(oval.max() - oval.min()), 1.0), (oval.max() + oval.min()) / 2
    x, y = cols.astype(np.float32) - chin[0], rows.astype(np.float32) - chin[1]
    below = (x * down[0] + y * down[1]) / height
    side = np.abs(x * across[0] + y * across[1] - axis) / width
    neck = (below > parsing.NECK_TOP) & (below < parsing.NECK_LENGTH) & (side < parsing.NECK_HALF_WIDTH)
    np.testing.assert_array_equal(result[rows, cols],
                                  np.where(neck, parsing.NECK, np.where(below > 0, parsing.CLOTH, parsing.HAIR)))


def test_parsing_without_a_face_or_a_person(astronaut):
  image, landmarks, person = astronaut
  no_face = parsing.parse_from_landmarks(None, person, image.shape[:2])
  assert set(np.unique(no_face)) == {parsing.BACKGROUND, parsing.CLOTH}
  assert ((no_face == parsing.CLOTH) == (person > parsing.PERSON_THRESHOLD)).all()
  face_only = parsing.parse_from_landmarks(landmarks, None, image.shape[0])
  assert not np.isin(face_only, (parsing.HAIR, parsing.NECK, parsing.CLOTH)).any()
  assert (face_only == parsing.SKIN).any()
  with pytest.raises(ValueError, match='person mask'):
    parsing.parse_from_landmarks(landmarks, person[:100], image.shape[:2])


def test_colorize_uses_the_face_parsing_colours():
  classes = np.arange(parsing.NUM_CLASSES, dtype=np.uint8).reshape(1, -1).repeat(2, 0)
  colours = parsing.colorize(classes)
  assert colours.shape == (2, parsing.NUM_CLASSES, 3) and colours.dtype == np.uint8
  assert tuple(colours[0, parsing.BACKGROUND]) == (255, 255, 255)
  assert tuple(colours[0, parsing.SKIN]) == (0, 0, 255)  # test.py's BGR (255, 0, 0)
  assert tuple(colours[1, parsing.HAIR]) == (85, 255, 255)
  assert len({tuple(c) for c in colours[0]}) == parsing.NUM_CLASSES
  with pytest.raises(ValueError):
    parsing.colorize(np.full((2, 2), parsing.NUM_CLASSES, np.uint8))


def test_foreground_drops_cloth_on_request():
  labels = np.array([[parsing.BACKGROUND, parsing.SKIN, parsing.CLOTH, parsing.HAIR]], np.uint8)
  assert parsing.foreground(labels).tolist() == [[False, True, True, True]]
  assert parsing.foreground(labels, drop_cloth=True).tolist() == [[False, True, False, True]]


# BiSeNet: the published state dict's names and shapes (checked against face-parsing.PyTorch's model.py).
PUBLISHED_KEYS = {
    'cp.resnet.conv1.weight': (64, 3, 7, 7),
    'cp.resnet.layer2.0.downsample.0.weight': (128, 64, 1, 1),
    'cp.resnet.layer4.1.bn2.running_var': (512,),
    'cp.arm16.conv.conv.weight': (128, 256, 3, 3),
    'cp.arm32.conv_atten.weight': (128, 128, 1, 1),
    'cp.conv_avg.conv.weight': (128, 512, 1, 1),
    'ffm.convblk.conv.weight': (256, 256, 1, 1),
    'ffm.conv1.weight': (64, 256, 1, 1),
    'conv_out.conv_out.weight': (19, 256, 1, 1),
    'conv_out16.conv.conv.weight': (64, 128, 3, 3),
    'conv_out32.conv_out.weight': (19, 64, 1, 1),
}


@pytest.fixture(scope='module')
def bisenet_weights(tmp_path_factory):
  """A randomly initialised BiSeNet saved as the published state dict and as TorchScript."""
  torch.manual_seed(0)
  model = BiSeNet(19).eval()
  for module in model.modules():  # non-trivial batch-norm statistics, so eval mode matters
    if isinstance(module, torch.nn.BatchNorm2d):
      module.running_mean.uniform_(-0.1, 0.1)
      module.running_var.uniform_(0.5, 1.5)
  root = tmp_path_factory.mktemp('bisenet')
  torch.save(model.state_dict(), root / '79999_iter.pth')
  torch.jit.save(torch.jit.trace(model, torch.zeros(1, 3, 64, 64), check_trace=False), root / 'bisenet.torchscript')
  return model, root


def test_bisenet_state_dict_has_the_published_names():
  state = BiSeNet(19).state_dict()
  assert len(state) == 191
  for key, shape in PUBLISHED_KEYS.items():
    assert tuple(state[key].shape) == shape, key


def _frames():
  rng = np.random.default_rng(0)
  return [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(2)] + [
      rng.integers(0, 256, (40, 90, 3), dtype=np.uint8)]


def test_bisenet_handler_runs_the_published_state_dict(bisenet_weights):
  model, root = bisenet_weights
  handler = FaceParsingModelHandler(str(root / '79999_iter.pth'), device='cpu', input_size=64)
  frames = _frames()
  maps = _infer(handler, handler.load_model(), frames)
  assert [m.shape for m in maps] == [f.shape[:2] for f in frames]
  assert all(m.dtype == np.uint8 and m.max() < 19 for m in maps)
  # At the model's input size, the map is the argmax of the first head on the normalised frame.
  tensor = torch.from_numpy(frames[0]).permute(2, 0, 1)[None].float() / 255
  tensor = (tensor - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
  with torch.no_grad():
    expected = model(tensor)[0].argmax(1)[0].numpy()
  assert (maps[0] == expected).all()
  assert len(np.unique(maps[0])) > 1


def test_bisenet_handler_runs_a_torchscript_export(bisenet_weights):
  _, root = bisenet_weights
  from_state = FaceParsingModelHandler(str(root / '79999_iter.pth'), device='cpu', input_size=64)
  scripted = FaceParsingModelHandler(str(root / 'bisenet.torchscript'), device='cpu', input_size=64)
  frames = _frames()
  expected = _infer(from_state, from_state.load_model(), frames)
  for got, want in zip(_infer(scripted, scripted.load_model(), frames), expected):
    assert (got == want).mean() > 0.99  # traced kernels may break an argmax tie differently


def test_bisenet_wrong_or_missing_weights_name_the_flag(tmp_path, bisenet_weights):
  model, _ = bisenet_weights
  with pytest.raises(WeightsError, match='--parsing_weights.*no such file'):
    FaceParsingModelHandler(str(tmp_path / 'missing.pth'), device='cpu').load_model()
  state = model.state_dict()
  del state['ffm.convblk.conv.weight']
  torch.save(state, tmp_path / 'missing_key.pth')
  with pytest.raises(WeightsError, match=r'--parsing_weights.*missing keys.*ffm\.convblk\.conv\.weight'):
    FaceParsingModelHandler(str(tmp_path / 'missing_key.pth'), device='cpu').load_model()
  torch.save(BiSeNet(18).state_dict(), tmp_path / 'eighteen.pth')
  with pytest.raises(WeightsError, match='--parsing_weights.*wrong shape'):
    FaceParsingModelHandler(str(tmp_path / 'eighteen.pth'), device='cpu').load_model()
  (tmp_path / 'text.pth').write_text('not weights')
  with pytest.raises(WeightsError, match='--parsing_weights.*not a torch state dict'):
    FaceParsingModelHandler(str(tmp_path / 'text.pth'), device='cpu').load_model()


# ----------------------------------------------------------------------------- in the render pass

class ParsingRecorder(FrameAnalyzer):
  """A recipe-side analyzer after the parsing ones: packs what they left in `found` into per-clip arrays
  (the person probability at the nose tip and in the top-left corner, the parsing's class histogram, lip
  pixels outside the mouth's landmarks), the way a recipe's analyzer reads them."""

  name = 'parsing_recorder'

  def setup(self) -> None:
    pass

  def start(self, task, num_frames, size):
    return _RecorderPass(num_frames)


class _RecorderPass(ClipPass):

  def __init__(self, num_frames):
    self.person = np.full((num_frames, 2), np.nan, np.float32)
    self.histograms = np.zeros((num_frames, parsing.NUM_CLASSES), np.int64)
    self.lips_outside_mouth = np.zeros(num_frames, np.int64)

  def add(self, frames):
    for frame in frames:
      person, labels = frame.found['person'], frame.found['parsing']
      assert person.shape == labels.shape == frame.image.shape[:2]
      self.histograms[frame.index] = np.bincount(labels.ravel(), minlength=parsing.NUM_CLASSES)
      if 'landmarks' in frame.found:
        xy = frame.found['landmarks'][:, :2]
        nose = np.round(xy[1]).astype(int)
        self.person[frame.index] = person[nose[1], nose[0]], person[:8, :8].max()
        hull = cv2.convexHull(xy[list(parsing.LIPS_OUTER_UPPER + parsing.LIPS_OUTER_LOWER)].astype(np.float32))
        mouth = cv2.dilate(_polygon_mask(labels.shape, hull[:, 0]).astype(np.uint8), np.ones((3, 3), np.uint8))
        self.lips_outside_mouth[frame.index] = (np.isin(labels, (parsing.UPPER_LIP, parsing.LOWER_LIP))
                                                & ~mouth.astype(bool)).sum()

  def finish(self, num_frames):
    return PassResult({'test_person': self.person[:num_frames], 'test_classes': self.histograms[:num_frames],
                       'test_lips_outside': self.lips_outside_mouth[:num_frames]}, 0)


def test_render_pass_segments_and_parses_every_frame(tmp_path):
  from argparse import Namespace
  from transforms.core.elements import ClipTask, MediaFile
  from transforms.frame_analysis import FaceLandmarks
  from transforms.lib.probe import probe
  from transforms.render import RenderClips
  path = str(tmp_path / 'talking.mp4')
  demo.write_video(path, demo.VideoSpec(duration=1.0, fps=25.0))
  task = ClipTask('t_0', 't', path, MediaFile(path, probe(path)), 0.0, 1.0, (160, 80, 320, 320), 'fixed')
  analyzers = parsing.parsing_analyzers(Namespace(model_dir=None, landmark_batch_size=8, parsing_weights=None))
  assert [type(a) for a in analyzers] == [parsing.PersonSegmentation, parsing.FaceParsing]
  render = RenderClips(str(tmp_path / 'work'), 256, 25.0, 28, 'ultrafast',
                       analyzers=[FaceLandmarks(FaceLandmarkerModelHandler())] + analyzers + [ParsingRecorder()])
  render.setup()
  (clip,) = list(render.process(task))
  assert clip.num_frames == 25 and clip.model_errors == 0
  person, classes = clip.arrays['test_person'], clip.arrays['test_classes']
  assert (person[:, 0] > 0.9).all() and (person[:, 1] < 0.5).all()  # the face, not the background
  for label in (parsing.SKIN, parsing.NOSE, parsing.UPPER_LIP, parsing.LOWER_LIP, parsing.HAIR, parsing.CLOTH):
    assert (classes[:, label] > 0).all(), parsing.CLASS_NAMES[label]
  assert (clip.arrays['test_lips_outside'] == 0).all()


def test_parsing_analyzers_check_the_weights_when_the_graph_is_built(tmp_path, bisenet_weights):
  from argparse import Namespace
  with pytest.raises(WeightsError, match='--parsing_weights'):
    parsing.parsing_analyzers(Namespace(model_dir=None, landmark_batch_size=8,
                                        parsing_weights=str(tmp_path / 'nope.pth')))
  _, root = bisenet_weights
  analyzers = parsing.parsing_analyzers(Namespace(model_dir=None, landmark_batch_size=8,
                                                  parsing_weights=str(root / '79999_iter.pth')))
  assert isinstance(analyzers[1].model.handler, FaceParsingModelHandler)


def test_bisenet_parsing_analyzer_fills_found(bisenet_weights):
  _, root = bisenet_weights
  analyzer = parsing.FaceParsing(FaceParsingModelHandler(str(root / '79999_iter.pth'), device='cpu',
                                                         input_size=64))
  analyzer.setup()
  frames = [Frame(i, image) for i, image in enumerate(_frames())]
  analysis = analyzer.start(None, len(frames), 64)
  analysis.add(frames)
  assert analysis.finish(len(frames)).model_errors == 0
  assert [f.found['parsing'].shape for f in frames] == [f.image.shape[:2] for f in frames]
