"""DWPose handler on small ONNX graphs with the official input/output names and shapes, built here."""
import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from beam_pipeline.recipes.megactor import dwpose
from model_handlers.in_process import SharedModel
from model_handlers.weights import WeightsError

ANCHORS = 80 * 80 + 40 * 40 + 20 * 20
HEIGHT, WIDTH = 360, 480  # letterbox ratio 640 / 480 = 4 / 3
RATIO = 4 / 3


def constant_graph(path, input_name, input_shape, outputs):
  """An ONNX model whose outputs are the given arrays (plus 0 x the input's mean, so the input is used)."""
  nodes = [helper.make_node('ReduceMean', [input_name], ['mean'], keepdims=0),
           helper.make_node('Mul', ['mean', 'zero'], ['nothing'])]
  initializers = [numpy_helper.from_array(np.zeros((), np.float32), 'zero')]
  graph_outputs = []
  for name, value in outputs.items():
    initializers.append(numpy_helper.from_array(value.astype(np.float32), name + '_value'))
    nodes.append(helper.make_node('Add', [name + '_value', 'nothing'], [name]))
    graph_outputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, list(value.shape)))
  graph = helper.make_graph(nodes, 'g', [helper.make_tensor_value_info(input_name, TensorProto.FLOAT, input_shape)],
                            graph_outputs, initializers)
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid('', 17)])
  model.ir_version = 8
  onnx.checker.check_model(model)
  onnx.save(model, str(path))
  return str(path)


def plant(raw, stride, centre, size, objectness, class_scores):
  """Write a YOLOX raw prediction for a box of `size` centred at `centre` (letterboxed pixels)."""
  first = {8: 0, 16: 80 * 80, 32: 80 * 80 + 40 * 40}[stride]
  cells = 640 // stride
  cell = np.floor(np.asarray(centre) / stride).astype(int)
  row = first + cell[1] * cells + cell[0]
  raw[row, :2] = np.asarray(centre) / stride - cell
  raw[row, 2:4] = np.log(np.asarray(size) / stride)
  raw[row, 4] = objectness
  raw[row, 5:] = class_scores
  return row


def person(score=0.95):
  scores = np.zeros(80, np.float32)
  scores[0] = score
  return scores


def detector_output():
  """Boxes in letterboxed pixels: the large person, a duplicate NMS must drop, a smaller person, a non-person."""
  raw = np.zeros((ANCHORS, 85), np.float32)
  plant(raw, 32, (280, 260), (240, 360), 0.9, person())  # source box (120, 60, 300, 330)
  plant(raw, 16, (284, 262), (236, 352), 0.8, person(0.9))  # overlaps the first: suppressed
  plant(raw, 8, (580, 100), (40, 80), 0.9, person())  # a small person at source (420, 45, 450, 105)
  other = np.zeros(80, np.float32)
  other[5] = 0.99
  plant(raw, 16, (100, 400), (100, 100), 0.99, other)  # a bus: not a person
  return raw


def source_box(centre, size):
  return (np.array([*np.subtract(centre, np.divide(size, 2)), *np.add(centre, np.divide(size, 2))]) / RATIO)


def test_letterbox_scales_to_fit_top_left_and_pads_114():
  image = np.full((HEIGHT, WIDTH, 3), 7, np.uint8)
  tensor, ratio = dwpose.letterbox(image)
  assert tensor.shape == (3, 640, 640) and tensor.dtype == np.float32 and ratio == pytest.approx(RATIO)
  assert (tensor[:, :480, :] == 7).all() and (tensor[:, 480:, :] == 114).all()


def test_person_boxes_decode_grid_nms_and_class():
  boxes = dwpose.person_boxes(detector_output(), RATIO)
  assert boxes.shape == (2, 4)
  np.testing.assert_allclose(boxes[0], source_box((280, 260), (240, 360)), atol=1e-3)
  np.testing.assert_allclose(boxes[1], source_box((580, 100), (40, 80)), atol=1e-3)
  low = np.zeros((ANCHORS, 85), np.float32)
  plant(low, 32, (280, 260), (240, 360), 0.5, person(0.5))  # 0.25 passes the 0.1 NMS gate, not the 0.3 keep
  assert dwpose.person_boxes(low, RATIO).shape == (0, 4)


def expected_region(box):
  """Centre and scale computed by hand from DWPose's rules: pad 1.25, then widen to 288:384."""
  x0, y0, x1, y1 = box
  width, height = (x1 - x0) * 1.25, (y1 - y0) * 1.25
  if width > height * 0.75:
    height = width / 0.75
  else:
    width = height * 0.75
  return np.array([(x0 + x1) / 2, (y0 + y1) / 2]), np.array([width, height])


def simcc_for(points_px, centre, scale, rng):
  """SimCC outputs (1, 133, 576), (1, 133, 768) peaking at the bins of the given source-pixel points."""
  simcc_x = rng.uniform(0, 0.05, (1, 133, 576)).astype(np.float32)
  simcc_y = rng.uniform(0, 0.05, (1, 133, 768)).astype(np.float32)
  corner = centre - scale / 2
  bins = np.round((points_px - corner) / scale * np.array([288, 384]) * 2).astype(int)
  peaks = rng.uniform(0.4, 0.95, (133, 2)).astype(np.float32)
  simcc_x[0, np.arange(133), bins[:, 0]] = peaks[:, 0]
  simcc_y[0, np.arange(133), bins[:, 1]] = peaks[:, 1]
  decoded = bins / 2 / np.array([288, 384]) * scale + corner
  return simcc_x, simcc_y, decoded, peaks.min(1)


@pytest.fixture
def planted(tmp_path):
  """Official-shaped detector and pose graphs; the pose graph's peaks put each of the 133 points at a chosen
  source pixel inside the large person's box."""
  rng = np.random.default_rng(3)
  box = source_box((280, 260), (240, 360))
  centre, scale = expected_region(box)
  points = rng.uniform(box[:2], box[2:], (133, 2))
  simcc_x, simcc_y, decoded, scores = simcc_for(points, centre, scale, rng)
  simcc_x[0, 100], simcc_y[0, 100] = -0.2, -0.1  # no positive peak: DWPose puts the point at bin -1
  detector = constant_graph(tmp_path / 'yolox_l.onnx', 'images', [1, 3, 640, 640],
                            {'output': detector_output()[None]})
  pose = constant_graph(tmp_path / 'dw-ll_ucoco_384.onnx', 'input', [1, 3, 384, 288],
                        {'simcc_x': simcc_x, 'simcc_y': simcc_y})
  return detector, pose, decoded, scores, centre, scale


def test_handler_puts_points_where_planted_in_source_pixels(planted):
  detector, pose, decoded, scores, centre, scale = planted
  handler = dwpose.DWPoseHandler(detector, pose, device='cpu', batch_size=4)
  frames = [np.full((HEIGHT, WIDTH, 3), 100 + k, np.uint8) for k in range(3)]
  results = list(handler.run_inference(frames, handler.load_model()))
  assert len(results) == 3
  body = results[1].inference
  # Both people the detector found, the larger first (the detector lists the small one's box second too).
  assert body.detected and body.keypoints.shape == (2, 134, 2) and body.scores.shape == (2, 134)
  large, small = source_box((280, 260), (240, 360)), source_box((580, 100), (40, 80))
  np.testing.assert_allclose(body.person_boxes, [large, small], atol=1e-3)
  mmpose_points, mmpose_scores = decoded.copy(), scores.copy()
  mmpose_points[100] = -0.5 / np.array([288, 384]) * scale + centre - scale / 2
  mmpose_scores[100] = -0.2  # the smaller peak
  expected_points, expected_scores = dwpose.to_openpose(mmpose_points.astype(np.float32), mmpose_scores)
  np.testing.assert_allclose(body.keypoints[0], expected_points, atol=1e-3)
  np.testing.assert_allclose(body.scores, [expected_scores] * 2, atol=1e-6)  # the graph gives both the same peaks
  # face points (mmpose 23-90) land at 24-91, each within half a SimCC bin of where it was planted
  np.testing.assert_allclose(body.keypoints[0, dwpose.FACE], decoded[23:91], atol=1e-3)
  # the same bins read in the small person's region: its points, scaled into that region
  small_centre, small_scale = expected_region(small)
  in_small = (decoded - (centre - scale / 2)) / scale * small_scale + small_centre - small_scale / 2
  np.testing.assert_allclose(body.keypoints[1, dwpose.FACE], in_small[23:91], atol=1e-3)
  face = body.keypoints[0, dwpose.FACE]
  assert ((face >= large[:2] - 1) & (face <= large[2:] + 1)).all()


def test_no_person_reads_the_whole_frame(tmp_path):
  rng = np.random.default_rng(0)
  box = np.array([0, 0, WIDTH, HEIGHT], np.float64)
  centre, scale = expected_region(box)
  simcc_x, simcc_y, decoded, _ = simcc_for(rng.uniform((10, 10), (470, 350), (133, 2)), centre, scale, rng)
  detector = constant_graph(tmp_path / 'd.onnx', 'images', [1, 3, 640, 640],
                            {'output': np.zeros((1, ANCHORS, 85), np.float32)})
  pose = constant_graph(tmp_path / 'p.onnx', 'input', [1, 3, 384, 288], {'simcc_x': simcc_x, 'simcc_y': simcc_y})
  handler = dwpose.DWPoseHandler(detector, pose, device='cpu')
  body = list(handler.run_inference([np.zeros((HEIGHT, WIDTH, 3), np.uint8)], handler.load_model()))[0].inference
  assert not body.detected and body.keypoints.shape == (1, 134, 2)
  np.testing.assert_allclose(body.person_boxes, [box])
  np.testing.assert_allclose(body.keypoints[0, dwpose.FACE], decoded[23:91], atol=1e-3)


def test_pose_input_warp_is_the_inverse_of_the_decoding():
  """A bright pixel in the frame lands in the model input where the decoder maps back to that pixel."""
  image = np.zeros((HEIGHT, WIDTH, 3), np.uint8)
  image[150, 200] = 255
  centre, scale = expected_region((120, 60, 300, 330))
  tensor = dwpose.pose_input(image, centre, scale, (288, 384))
  assert tensor.shape == (3, 384, 288)
  row, col = np.unravel_index(tensor[0].argmax(), tensor[0].shape)
  simcc_x = np.zeros((1, 576), np.float32)
  simcc_y = np.zeros((1, 768), np.float32)
  simcc_x[0, col * 2], simcc_y[0, row * 2] = 1, 1
  point, _ = dwpose.decode_simcc(simcc_x, simcc_y, centre, scale, (288, 384))
  assert np.abs(point[0] - (200, 150)).max() < scale[0] / 288  # within one input pixel
  normalised = (0 - dwpose.PIXEL_MEAN) / dwpose.PIXEL_STD
  np.testing.assert_allclose(tensor[:, 0, 0], normalised, atol=1e-5)


def test_dynamic_batch_pose_graph_runs_frames_together_through_shared_model(tmp_path, planted):
  detector, _, decoded, _, _, _ = planted
  rng = np.random.default_rng(1)
  centre, scale = expected_region(source_box((280, 260), (240, 360)))
  points = rng.uniform((130, 70), (290, 320), (133, 2))
  simcc_x, simcc_y, decoded, _ = simcc_for(points, centre, scale, rng)
  # 5 frames of 2 people: the pose graph gets all 10 crops in one call
  batch_x, batch_y = np.repeat(simcc_x, 10, 0), np.repeat(simcc_y, 10, 0)
  pose = constant_graph(tmp_path / 'p.onnx', 'input', ['batch', 3, 384, 288], {'simcc_x': batch_x, 'simcc_y': batch_y})
  handler = dwpose.DWPoseHandler(detector, pose, device='cpu', batch_size=5)
  model = SharedModel(handler)
  model.setup()
  results = model.infer([np.zeros((HEIGHT, WIDTH, 3), np.uint8)] * 5)
  assert len(results) == 5
  arrays = dwpose.stack_results(results[:4] + [None])  # the last frame as if the model had failed on it
  assert arrays['dwpose_result'].shape == (5, 2, 134, 2) and arrays['dwpose_score'].shape == (5, 2, 134)
  assert list(arrays['dwpose_people']) == [2, 2, 2, 2, 1]
  np.testing.assert_allclose(arrays['dwpose_result'][:4, 0, dwpose.FACE], np.repeat(decoded[None, 23:91], 4, 0),
                             atol=1e-3)
  assert not arrays['dwpose_result'][4].any() and not arrays['dwpose_score'][4].any()


def test_openpose_layout():
  points = np.stack([np.arange(133), np.arange(133) + 1000], -1).astype(np.float32)[None]
  scores = np.full((1, 133), 0.9, np.float32)
  scores[0, 6] = 0.2  # right shoulder unseen: the neck's score is 0
  out, out_scores = dwpose.to_openpose(points, scores)
  assert out.shape == (1, 134, 2) and out_scores.shape == (1, 134)
  mmpose_x = out[0, :, 0]
  np.testing.assert_array_equal(out[0, 1], (points[0, 5] + points[0, 6]) / 2)  # neck
  assert out_scores[0, 1] == 0
  # OpenPose body order: nose, neck, R shoulder/elbow/wrist, L shoulder/elbow/wrist, R hip/knee/ankle,
  # L hip/knee/ankle, R eye, L eye, R ear, L ear
  assert list(mmpose_x[[0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]) == \
      [0, 6, 8, 10, 5, 7, 9, 12, 14, 16, 11, 13, 15, 2, 1, 4, 3]
  assert out_scores[0, 2] == pytest.approx(0.2)
  np.testing.assert_array_equal(mmpose_x[18:24], np.arange(17, 23))  # feet
  np.testing.assert_array_equal(mmpose_x[24:92], np.arange(23, 91))  # face
  np.testing.assert_array_equal(mmpose_x[92:134], np.arange(91, 133))  # hands
  scores[0, 6] = 0.9
  assert dwpose.to_openpose(points, scores)[1][0, 1] == 1


def test_face_only_keypoints_and_box():
  rng = np.random.default_rng(2)
  lmk68 = rng.uniform(50, 200, (4, 68, 2)).astype(np.float32)
  lmk68[2] = np.nan
  keypoints, scores = dwpose.face_only_keypoints(lmk68)
  assert keypoints.shape == (4, 134, 2) and scores.shape == (4, 134)
  np.testing.assert_array_equal(keypoints[:, 24:92][[0, 1, 3]], lmk68[[0, 1, 3]])
  assert (scores[[0, 1, 3], 24:92] == 1).all() and (scores[2] == 0).all() and (keypoints[2] == 0).all()
  assert (scores[:, :24] == 0).all() and (scores[:, 92:] == 0).all() and (keypoints[:, 92:] == 0).all()
  boxes = dwpose.faces_bbox(keypoints, scores)
  np.testing.assert_allclose(boxes[0], [*lmk68[0].min(0), *lmk68[0].max(0)])
  assert (boxes[2] == 0).all()
  with pytest.raises(ValueError):
    dwpose.face_only_keypoints(np.zeros((3, 478, 2)))


def test_missing_and_wrong_weights_name_the_flag(tmp_path, planted):
  detector, pose = planted[:2]
  with pytest.raises(WeightsError, match='--dwpose_detector'):
    dwpose.DWPoseHandler(str(tmp_path / 'none.onnx'), pose).load_model()
  with pytest.raises(WeightsError, match='--dwpose_model'):
    dwpose.DWPoseHandler(detector, None).load_model()
  garbage = tmp_path / 'garbage.onnx'
  garbage.write_bytes(b'not a model')
  with pytest.raises(WeightsError, match='--dwpose_model.*not an ONNX model'):
    dwpose.DWPoseHandler(detector, str(garbage)).load_model()
  with pytest.raises(WeightsError, match='--dwpose_detector.*yolox_l.onnx'):
    dwpose.DWPoseHandler(pose, pose).load_model()  # the files swapped
  with pytest.raises(WeightsError, match='--dwpose_model.*dw-ll_ucoco_384.onnx'):
    dwpose.DWPoseHandler(detector, detector).load_model()


def test_warp_matches_three_point_affine_of_dwpose():
  """DWPose builds its warp from three point pairs (centre, a point above it, a third at a right angle)."""
  rng = np.random.default_rng(5)
  image = rng.integers(0, 255, (HEIGHT, WIDTH, 3), np.uint8)
  centre, scale = expected_region((120, 60, 300, 330))

  def three_points(middle, half_width):
    above = middle + [0, -half_width]
    direction = middle - above
    return np.float32([middle, above, above + [-direction[1], direction[0]]])

  src, dst = three_points(centre, scale[0] / 2), three_points(np.array([144, 192]), 144)
  warped = cv2.warpAffine(image, cv2.getAffineTransform(src, dst), (288, 384), flags=cv2.INTER_LINEAR)
  expected = ((warped - dwpose.PIXEL_MEAN) / dwpose.PIXEL_STD).transpose(2, 0, 1)
  np.testing.assert_allclose(dwpose.pose_input(image, centre, scale, (288, 384)), expected, atol=0.05)
