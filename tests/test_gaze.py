"""MegActor's gaze model (--l2cs_weights): L2CS-Net loaded as a state dict in the published key layout."""
import numpy as np
import pytest
import torch

from beam_pipeline.recipes.megactor.l2cs import FLAG, L2CS, L2CSModelHandler, face_input, load_l2cs
from model_handlers.weights import WeightsError
from transforms.lib import features


@pytest.fixture(scope='module')
def resnet50_weights(tmp_path_factory):
  """Random values in the gaze360 file's layout (ResNet-50, two 90-bin heads, the vestigial fc_finetune),
  built once: about 95 MB."""
  torch.manual_seed(0)
  state = L2CS().state_dict()
  path = str(tmp_path_factory.mktemp('l2cs') / 'L2CSNet_gaze360.pkl')
  torch.save(state, path)
  return path, state


def test_random_weights_in_the_published_layout_load_and_give_degrees(resnet50_weights):
  path, state = resnet50_weights
  # The published names and shapes (Ahmednull/L2CS-Net l2cs/model.py: torchvision's Bottleneck blocks).
  assert tuple(state['fc_yaw_gaze.weight'].shape) == (90, 2048) == tuple(state['fc_pitch_gaze.weight'].shape)
  assert tuple(state['fc_finetune.weight'].shape) == (3, 2051)
  assert {'layer1.0.downsample.0.weight', 'layer3.5.conv3.weight', 'layer4.2.bn3.running_var'} <= set(state)
  assert len(state) == 318 + 6  # torchvision's ResNet-50 without its fc (318 tensors), and the three heads
  handler = L2CSModelHandler(path, device='cpu')
  model = handler.load_model()
  face = np.random.default_rng(0).integers(0, 255, (256, 256, 3), np.uint8)
  (result,) = [r.inference for r in handler.run_inference([face_input(face, np.array([40, 40, 220, 220]))], model)]
  assert result.shape == (2,) and np.all(np.abs(result) <= 180)


def test_a_wrong_state_dict_fails_naming_the_flag(tmp_path, resnet50_weights):
  _, state = resnet50_weights
  wrong = str(tmp_path / 'other.pth')
  torch.save({'netcnnlip.0.weight': torch.zeros(3)}, wrong)
  with pytest.raises(WeightsError, match=FLAG + '.*not an L2CS-Net state dict'):
    load_l2cs(wrong, torch.device('cpu'))
  bins = dict(state, **{'fc_yaw_gaze.weight': torch.zeros(91, 2048), 'fc_yaw_gaze.bias': torch.zeros(91)})
  torch.save(bins, wrong)
  with pytest.raises(WeightsError, match=FLAG + '.*wrong shape'):
    load_l2cs(wrong, torch.device('cpu'))


def test_a_gaze_model_stands_in_for_the_iris_landmarks():
  landmarks = np.zeros((320, 478, 3), np.float32)
  open_eyes = np.zeros((320, 52), np.float32)
  looking = np.stack([10 * np.sin(np.arange(320) / 7.0), np.zeros(320)], 1).astype(np.float32)
  assert features.eye_motion_variance(landmarks, open_eyes, looking) > 5  # |yaw| swinging 0-10 degrees
  assert features.eye_motion_variance(landmarks, open_eyes, np.zeros((320, 2), np.float32)) == 0.0
