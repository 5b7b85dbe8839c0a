"""The torch handler on small random weights: state dict and TorchScript, device choice, batching, safety."""
import os
import pickle

import numpy as np
import pytest

torch = pytest.importorskip('torch')

import apache_beam as beam  # noqa: E402
from apache_beam.ml.inference.base import RunInference  # noqa: E402
from apache_beam.testing.test_pipeline import TestPipeline  # noqa: E402
from apache_beam.testing.util import assert_that  # noqa: E402

from model_handlers.torch_handler import TorchModelHandler, pick_device  # noqa: E402


class TinyNet(torch.nn.Module):
  """A stand-in architecture a user would supply (e.g. a small audio or parsing head)."""

  def __init__(self, width: int = 6, classes: int = 3):
    super().__init__()
    self.layers = torch.nn.Sequential(torch.nn.Linear(width, 16), torch.nn.ReLU(), torch.nn.Linear(16, classes))

  def forward(self, x):
    return self.layers(x)


class _Planted:
  """Any class: a pickle that names it would run code on load."""


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
  root = tmp_path_factory.mktemp('torch')
  torch.manual_seed(3)
  net = TinyNet().eval()
  torch.save(net.state_dict(), root / 'tiny.pt')
  batch = torch.export.Dim.DYNAMIC
  torch.export.save(torch.export.export(net, (torch.zeros(4, 6),), dynamic_shapes=({0: batch},)),
                    str(root / 'tiny.pt2'))
  inputs = np.random.default_rng(0).normal(size=(7, 6)).astype(np.float32)
  with torch.no_grad():
    expected = net(torch.from_numpy(inputs)).numpy()
  return {'dir': root, 'inputs': inputs, 'expected': expected}


def _expect(weights):
  by_row = {row.tobytes(): expected for row, expected in zip(weights['inputs'], weights['expected'])}

  def check(found):
    assert sorted(key for key, _ in found) == sorted(by_row)
    for key, inference in found:
      np.testing.assert_allclose(inference, by_row[key], rtol=1e-5, atol=1e-6)
  return check


@pytest.mark.parametrize('kind', ['state_dict', 'exported'])
def test_user_weights_give_the_model_output(weights, kind):
  path = os.path.join(weights['dir'], 'tiny.pt' if kind == 'state_dict' else 'tiny.pt2')
  handler = TorchModelHandler(path, model_class=TinyNet if kind == 'state_dict' else None,
                              batch_sizes={'cpu': 2, 'cuda': 4})
  with TestPipeline() as p:
    results = (p | 'Inputs' >> beam.Create(list(weights['inputs']))
               | 'Infer' >> RunInference(handler)
               | 'Pair' >> beam.Map(lambda r: (r.example.tobytes(), r.inference)))
    assert_that(results, _expect(weights))


def test_device_is_chosen_on_the_worker(weights):
  handler = TorchModelHandler(os.path.join(weights['dir'], 'tiny.pt'), model_class=TinyNet,
                              batch_sizes={'cpu': 3, 'cuda': 32})
  assert handler.device is None  # nothing is decided when the graph is built
  assert handler.batch_elements_kwargs() == {'max_batch_size': 32}
  model = handler.load_model()
  assert handler.device.type == ('cuda' if torch.cuda.is_available() else 'cpu')
  assert next(model.parameters()).device.type == handler.device.type
  results = list(handler.run_inference(list(weights['inputs']), model))
  np.testing.assert_allclose(np.stack([r.inference for r in results]), weights['expected'], rtol=1e-5, atol=1e-6)
  assert pick_device('cpu').type == 'cpu'
  if not torch.cuda.is_available():
    with pytest.raises(RuntimeError, match='no usable CUDA'):
      pick_device('cuda')


def test_large_models_are_shared_per_machine(weights):
  path = os.path.join(weights['dir'], 'tiny.pt')
  assert not TorchModelHandler(path, model_class=TinyNet).share_model_across_processes()
  assert TorchModelHandler(path, model_class=TinyNet, large_model=True).share_model_across_processes()
  copies = TorchModelHandler(path, model_class=TinyNet, model_copies=2)
  assert copies.share_model_across_processes() and copies.model_copies() == 2
  with pytest.raises(ValueError):
    TorchModelHandler(path, device='tpu')


def test_weights_that_carry_code_are_refused(weights, tmp_path):
  state = TinyNet().state_dict()
  state['payload'] = _Planted()
  torch.save(state, tmp_path / 'planted.pt')
  handler = TorchModelHandler(str(tmp_path / 'planted.pt'), model_class=TinyNet)
  with pytest.raises(pickle.UnpicklingError):
    handler.load_model()
