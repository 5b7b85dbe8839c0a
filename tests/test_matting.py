"""The RobustVideoMatting handler on a small TorchScript module with the official call signature: the recurrent
state is carried in frame order within a clip and never across clips; bad weights name --matting_weights."""
from typing import List, Optional

import numpy as np
import pytest

torch = pytest.importorskip('torch')

from beam_pipeline.recipes.avatar.matting import MattingChunk, MattingModelHandler, MattingSession  # noqa: E402
from model_handlers.in_process import SharedModel  # noqa: E402
from model_handlers.weights import WeightsError  # noqa: E402

STEP = 0.25  # what the tiny model's state grows by per frame


class CountingMatte(torch.nn.Module):
  """RVM's call, `fgr, pha, r1, r2, r3, r4 = model(src, r1, r2, r3, r4, downsample_ratio)` on (B, T, 3, H, W):
  r1 counts the frames seen so far (times STEP) and each frame's alpha is its red channel times that count, so
  an alpha shows both the frame's own pixels and where it stands in the clip."""

  step: float

  def __init__(self):
    super().__init__()
    self.step = STEP

  def forward(self, src: torch.Tensor, r1: Optional[torch.Tensor] = None, r2: Optional[torch.Tensor] = None,
              r3: Optional[torch.Tensor] = None, r4: Optional[torch.Tensor] = None,
              downsample_ratio: float = 1.0) -> List[torch.Tensor]:
    count = r1 if r1 is not None else torch.zeros(src.shape[0], 1, 1, 1, dtype=src.dtype, device=src.device)
    phas = []
    for t in range(src.shape[1]):
      count = count + self.step
      phas.append((src[:, t, 0:1] * count).clamp(0.0, 1.0))
    pha = torch.stack(phas, 1)
    rest = torch.zeros_like(count)
    return [src, pha, count, rest, rest, rest]


class NotMatting(torch.nn.Module):
  def forward(self, src: torch.Tensor) -> torch.Tensor:
    return src.mean()


@pytest.fixture(scope='module')
def exports(tmp_path_factory):
  root = tmp_path_factory.mktemp('rvm')
  torch.jit.script(CountingMatte()).save(str(root / 'rvm_mobilenetv3_fp32.torchscript'))
  torch.jit.script(NotMatting()).save(str(root / 'other.torchscript'))
  torch.save({'weight': torch.zeros(3)}, str(root / 'rvm_mobilenetv3.pth'))
  return root


def _session(path) -> MattingSession:
  model = SharedModel(MattingModelHandler(str(path), device='cpu'))
  model.setup()
  return MattingSession(model)


def _frames(count: int, seed: int) -> List[np.ndarray]:
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (24, 32, 3), dtype=np.uint8) for _ in range(count)]


def _expected(frames: List[np.ndarray]) -> List[np.ndarray]:
  return [np.clip(frame[..., 0] / 255.0 * STEP * (k + 1), 0, 1) for k, frame in enumerate(frames)]


def test_state_is_carried_in_frame_order_across_batches(exports):
  frames = _frames(11, seed=1)  # more than one chunk (4 frames on the CPU), and batches that split chunks
  session = _session(exports / 'rvm_mobilenetv3_fp32.torchscript')
  alphas = session.matte(frames[:3]) + session.matte(frames[3:10]) + session.matte(frames[10:])
  assert len(alphas) == 11 and alphas[0].shape == (24, 32) and alphas[0].dtype == np.float32
  for found, expected in zip(alphas, _expected(frames)):
    np.testing.assert_allclose(found, expected, atol=1e-6)
  # In another order, the same frame gets another alpha: the model saw a different history.
  backwards = _session(exports / 'rvm_mobilenetv3_fp32.torchscript').matte(frames[::-1])
  assert not np.allclose(backwards[-1], alphas[0])
  np.testing.assert_allclose(backwards[-1], _expected(frames[::-1])[-1], atol=1e-6)


def test_clips_do_not_share_state(exports):
  path = exports / 'rvm_mobilenetv3_fp32.torchscript'
  first, second = _session(path), _session(path)  # the same process-wide model, one session per clip
  a, b = _frames(6, seed=2), _frames(5, seed=3)
  found_a = first.matte(a[:3])
  found_b = second.matte(b[:2])
  found_a += first.matte(a[3:])
  found_b += second.matte(b[2:])
  for found, expected in zip(found_a + found_b, _expected(a) + _expected(b)):
    np.testing.assert_allclose(found, expected, atol=1e-6)


def test_a_chunk_with_a_state_continues_from_it(exports):
  handler = MattingModelHandler(str(exports / 'rvm_mobilenetv3_fp32.torchscript'), device='cpu')
  model = handler.load_model()
  frames = np.stack(_frames(4, seed=4))
  first = next(iter(handler.run_inference([MattingChunk(frames[:2])], model))).inference
  later = next(iter(handler.run_inference([MattingChunk(frames[2:], first.state)], model))).inference
  fresh = next(iter(handler.run_inference([MattingChunk(frames[2:])], model))).inference
  np.testing.assert_allclose(later.alpha, np.stack(_expected(list(frames))[2:]), atol=1e-6)
  assert not np.allclose(later.alpha, fresh.alpha)


@pytest.mark.parametrize('name, problem', [
    ('missing.torchscript', 'no such file'),
    ('rvm_mobilenetv3.pth', 'not a TorchScript archive'),
    ('other.torchscript', 'does not work as a RobustVideoMatting'),
])
def test_bad_weights_name_the_flag(exports, name, problem):
  with pytest.raises(WeightsError, match=problem) as error:
    MattingModelHandler(str(exports / name), device='cpu').load_model()
  assert '--matting_weights' in str(error.value)
