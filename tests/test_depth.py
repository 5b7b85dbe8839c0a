"""Depth for the nerf recipe: DaGAN's depth.pth + encoder.pth (published keys) and TorchScript, in the render pass."""
import io
import os

import numpy as np
import pytest

torch = pytest.importorskip('torch')

from beam_pipeline.recipes.nerf import depth_model as dp  # noqa: E402
from model_handlers.weights import WeightsError  # noqa: E402
from transforms.core.frame_store import read_frame_archive  # noqa: E402


def _randomise(module):
  """Random weights and BatchNorm statistics, so a key loaded into the wrong place changes the output."""
  generator = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, tensor in module.state_dict().items():
      if tensor.dtype.is_floating_point:
        values = torch.rand(tensor.shape, generator=generator) * 0.2 + (0.9 if 'running_var' in name else -0.1)
        tensor.copy_(values)
  return module


@pytest.fixture(scope='module')
def dagan(tmp_path_factory):
  """A DaGAN weights folder as its repo ships depth/models/weights_19: encoder.pth as monodepth2 saves it
  (torchvision resnet18 keys under `encoder.`, the unused fc classifier, height/width/use_stereo)."""
  folder = tmp_path_factory.mktemp('dagan') / 'weights_19'
  folder.mkdir()
  model = _randomise(dp.DaGANDepth()).eval()
  encoder = dict(model.encoder.state_dict())
  encoder.update({'encoder.fc.weight': torch.zeros(1000, 512), 'encoder.fc.bias': torch.zeros(1000),
                  'height': 224, 'width': 224, 'use_stereo': False})
  torch.save(encoder, folder / 'encoder.pth')
  torch.save(model.decoder.state_dict(), folder / 'depth.pth')
  return str(folder), model


def _frames(count, size, seed=0):
  return list(np.random.default_rng(seed).integers(0, 256, (count, size, size, 3), dtype=np.uint8))


def test_published_key_names():
  decoder = dp.DepthDecoder().state_dict()
  assert len(decoder) == 28 and tuple(decoder['decoder.0.conv.conv.weight'].shape) == (256, 512, 3, 3)
  assert tuple(decoder['decoder.7.conv.conv.weight'].shape) == (32, 96, 3, 3)  # upconv (1, 1) with its skip
  assert tuple(decoder['decoder.13.conv.weight'].shape) == (1, 128, 3, 3)  # disparity head of scale 3
  encoder = dp.ResnetEncoder().state_dict()
  assert len(encoder) == 120  # torchvision resnet18's 122 less fc.weight and fc.bias
  assert tuple(encoder['encoder.layer2.0.downsample.0.weight'].shape) == (128, 64, 1, 1)


def test_dagan_weights_load_and_give_dagan_disparity(dagan):
  folder, model = dagan
  handler = dp.DepthHandler(folder, batch_sizes={'cpu': 1, 'cuda': 1})
  loaded = handler.load_model()
  frames = _frames(2, 256)
  maps = [r.inference for r in handler.run_inference(frames, loaded)]  # in batches of 1
  assert [m.shape for m in maps] == [(256, 256)] * 2 and all(m.dtype == np.float32 for m in maps)
  with torch.no_grad():  # at DaGAN's 256 x 256 nothing is resized: the map is ("disp", 0) itself
    expected = model(torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255)[:, 0].numpy()
  np.testing.assert_allclose(np.stack(maps), expected, atol=1e-5)
  assert 0 < expected.min() and expected.max() < 1 and expected.std() > 1e-4
  (small,) = [r.inference for r in handler.run_inference(_frames(1, 96), loaded)]  # resized to 256 and back
  assert small.shape == (96, 96)


class HalfDepth(torch.nn.Module):
  """A stand-in depth model: mean brightness at half resolution, (B, 1, H/2, W/2)."""

  def forward(self, image):
    return torch.nn.functional.avg_pool2d(image.mean(dim=1, keepdim=True), 2)


def test_torchscript_depth_model(half_depth):
  handler = dp.DepthHandler(half_depth)
  loaded = handler.load_model()
  frame = np.full((64, 64, 3), 51, np.uint8)
  frame[:, 32:] = 204
  (result,) = handler.run_inference([frame], loaded)
  assert result.inference.shape == (64, 64)
  np.testing.assert_allclose(result.inference[:, :30], 0.2, atol=1e-5)
  np.testing.assert_allclose(result.inference[:, 34:], 0.8, atol=1e-5)


def test_wrong_or_missing_depth_weights_name_the_flag(tmp_path, dagan):
  folder, model = dagan
  with pytest.raises(WeightsError, match='--depth.*not given'):
    dp.check_depth_weights(None)
  with pytest.raises(WeightsError, match='--depth.*no such file'):
    dp.DepthHandler(str(tmp_path / 'absent')).load_model()
  swapped = tmp_path / 'swapped'
  swapped.mkdir()
  torch.save(model.encoder.state_dict(), swapped / 'depth.pth')  # the encoder's weights as the decoder's
  torch.save(model.encoder.state_dict(), swapped / 'encoder.pth')
  with pytest.raises(WeightsError, match=r'--depth.*depth\.pth.*28 missing keys.*unexpected keys'):
    dp.DepthHandler(str(swapped)).load_model()
  (swapped / 'depth.pth').unlink()
  with pytest.raises(WeightsError, match='--depth.*no depth.pth'):
    dp.DepthHandler(str(swapped)).load_model()
  narrow = tmp_path / 'narrow'
  narrow.mkdir()
  torch.save(model.encoder.state_dict(), narrow / 'encoder.pth')
  decoder = dict(model.decoder.state_dict())
  decoder['decoder.10.conv.weight'] = torch.zeros(1, 8, 3, 3)
  torch.save(decoder, narrow / 'depth.pth')
  with pytest.raises(WeightsError, match=r'--depth.*wrong shape.*decoder\.10\.conv\.weight'):
    dp.DepthHandler(str(narrow)).load_model()
  state_file = tmp_path / 'state.pth'
  torch.save(model.decoder.state_dict(), state_file)
  with pytest.raises(WeightsError, match='--depth.*not a TorchScript'):
    dp.DepthHandler(str(state_file)).load_model()


class _Planted:
  """Any class: a pickle naming it would run code on load."""


def test_pickled_code_is_refused(tmp_path, dagan):
  folder, model = dagan
  planted = tmp_path / 'planted'
  planted.mkdir()
  torch.save(model.encoder.state_dict(), planted / 'encoder.pth')
  buffer = io.BytesIO()
  torch.save({'decoder.0.conv.conv.weight': _Planted()}, buffer)
  (planted / 'depth.pth').write_bytes(buffer.getvalue())
  with pytest.raises(WeightsError, match='--depth.*pickled code'):
    dp.DepthHandler(str(planted)).load_model()


def _task(clip_id):
  from transforms.core.elements import ClipTask, MediaFile
  return ClipTask(clip_id, 'subject', 'file:///subject.mp4', MediaFile('subject.mp4', None), 0.0, 1.0,
                  window=(0, 0, 64, 64))


@pytest.fixture(scope='module')
def half_depth(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('ts') / 'depth.ts')
  torch.jit.script(HalfDepth()).save(path)
  return path


def test_depth_maps_fill_the_clip_archive(tmp_path, half_depth):
  from beam_pipeline.recipes.nerf.depth import DepthMaps
  from model_handlers.in_process import ModelError
  from transforms.frame_analysis import Frame
  analyzer = DepthMaps(dp.DepthHandler(half_depth), str(tmp_path / 'work'))
  analyzer.setup()
  frames = [Frame(i, np.full((64, 64, 3), 40 * i, np.uint8)) for i in range(5)]
  blobs = []
  for _ in range(2):  # a retried bundle writes the same archive
    clip_pass = analyzer.start(_task('subject_0'), 5, 64)
    clip_pass.add(frames[:3])
    clip_pass.add(frames[3:])
    result = clip_pass.finish(5)
    clip_pass.abandon()
    blobs.append(open(result.files['depth'], 'rb').read())
  assert blobs[0] == blobs[1]
  assert result.model_errors == 0 and result.arrays == {}
  assert os.path.basename(result.files['depth']) == 'subject_0.depth.tar'
  members = list(read_frame_archive(result.files['depth']))
  assert [name for name, _ in members] == [f'{i}.npy' for i in range(5)]
  for i, (_, data) in enumerate(members):
    depth = np.load(io.BytesIO(data))
    assert depth.dtype == np.float16 and depth.shape == (64, 64)
    np.testing.assert_allclose(depth, 40 * i / 255, atol=1e-3)

  class Failing:  # the model failing on a frame leaves that frame out and counts it
    batch_size = 4

    def infer(self, images):
      return [ModelError('depth', 'boom')] + [np.zeros((64, 64), np.float32)] * (len(images) - 1)

  analyzer.model = Failing()
  clip_pass = analyzer.start(_task('subject_1'), 3, 64)
  clip_pass.add(frames[:3])
  result = clip_pass.finish(3)
  assert (result.model_errors, result.last_error) == (1, 'boom')
  assert [name for name, _ in read_frame_archive(result.files['depth'])] == ['1.npy', '2.npy']
  dropped = analyzer.start(_task('subject_2'), 3, 64)
  dropped.add(frames[:1])
  dropped.abandon()  # a pass that did not finish leaves nothing in the work dir
  assert not os.path.exists(os.path.join(str(tmp_path / 'work'), 'frames', 'subject_2.depth.tar'))


def test_depth_runs_in_the_render_pass(tmp_path, dagan):
  import apache_beam as beam
  from apache_beam.testing.test_pipeline import TestPipeline
  from apache_beam.testing.util import assert_that
  from beam_pipeline.demo import VideoSpec, write_video
  from beam_pipeline.recipes.nerf.depth import DepthMaps
  from transforms.core.elements import ClipTask, MediaFile
  from transforms.lib.probe import probe
  from transforms.render import RenderClips

  video = write_video(str(tmp_path / 'talk.mp4'), VideoSpec(duration=0.24, fps=25.0, width=160, height=120))
  task = ClipTask('talk_0', 'talk', video, MediaFile(video, probe(video)), 0.0, 0.24, window=(0, 0, 120, 120))
  work = str(tmp_path / 'work')
  analyzers = [DepthMaps(dp.DepthHandler(dagan[0]), work)]

  def check(clips):
    (clip,) = clips
    maps = [np.load(io.BytesIO(data)) for _, data in read_frame_archive(clip.files['depth'])]
    assert len(maps) == clip.num_frames == 6 and clip.model_errors == 0
    assert all(m.shape == (64, 64) and m.dtype == np.float16 for m in maps)

  with TestPipeline() as p:
    rendered = p | beam.Create([task]) | beam.ParDo(RenderClips(work, 64, 25.0, 23, 'ultrafast',
                                                                analyzers=analyzers))
    assert_that(rendered, check)
