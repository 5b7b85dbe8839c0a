"""Styled copies: the OpenCV cartoon filter and the SDXL-Turbo handler on a tiny random diffusers pipeline."""
import json
from fractions import Fraction

import av
import cv2
import numpy as np
import pytest
from skimage import data

from beam_pipeline.recipes.megactor import stylize
from model_handlers.weights import WeightsError

SIZE = 64  # the tiny pipeline runs at 64 x 64 (the handler's default is SDXL-Turbo's 512)


def moving_clip(frames=12, motion=0.0, noise=3.0, side=128, seed=0):
  """The astronaut portrait drifting by `motion` px per frame, with camera noise."""
  rng = np.random.default_rng(seed)
  base = cv2.resize(data.astronaut(), (side, side), interpolation=cv2.INTER_AREA)
  out = []
  for t in range(frames):
    shift = np.float32([[1, 0, motion * t], [0, 1, 0.6 * motion * t]])
    frame = cv2.warpAffine(base, shift, (side, side), borderMode=cv2.BORDER_REFLECT).astype(np.float32)
    out.append(np.clip(frame + rng.normal(0, noise, frame.shape), 0, 255).astype(np.uint8))
  return out


def write_mp4(path, frames, fps=25):
  with av.open(str(path), 'w', format='mp4') as out:
    video = out.add_stream('libx264', rate=fps)
    video.width, video.height = frames[0].shape[1], frames[0].shape[0]
    video.pix_fmt = 'yuv420p'
    for index, image in enumerate(frames):
      frame = av.VideoFrame.from_ndarray(image, format='rgb24')
      frame.pts, frame.time_base = index, Fraction(1, fps)
      out.mux(video.encode(frame))
    out.mux(video.encode(None))
  return str(path)


def read_mp4(path):
  with av.open(str(path)) as container:
    stream = container.streams.video[0]
    return [f.to_ndarray(format='rgb24') for f in container.decode(stream)], stream.average_rate


# ---------------------------------------------------------------- OpenCV

def test_opencv_styler_is_deterministic_and_keeps_the_frame_shape():
  frames = moving_clip(frames=4, motion=1)
  styler = stylize.OpenCVStyler()
  first, second = styler.for_clip('a')(frames), styler.for_clip('a')(frames)
  assert all(f.shape == (128, 128, 3) and f.dtype == np.uint8 for f in first)
  assert all(np.array_equal(a, b) for a, b in zip(first, second))
  assert np.abs(first[0].astype(float) - frames[0]).mean() > 5  # it changed the look


def test_opencv_styler_flickers_less_than_the_plain_filter_and_follows_motion():
  styler = stylize.OpenCVStyler()
  still = moving_clip(motion=0)
  plain = [np.clip(np.round(styler.style(f)), 0, 255).astype(np.uint8) for f in still]
  steady = styler.for_clip('still')(still)
  # camera noise only: the per-frame filter flickers, the blended one much less
  assert stylize.flicker(steady) < 0.5 * stylize.flicker(plain)
  moving = moving_clip(motion=2)
  plain = [np.clip(np.round(styler.style(f)), 0, 255).astype(np.uint8) for f in moving]
  steady = styler.for_clip('moving')(moving)
  # a moving picture is not smeared: each styled frame stays close to that frame's own filter output
  lag = np.mean([np.abs(a.astype(float) - b).mean() for a, b in zip(steady, plain)])
  assert lag < 0.2 * stylize.flicker(plain)


def test_stylize_clip_writes_h264_of_the_same_size_rate_and_length(tmp_path):
  frames = moving_clip(frames=20, motion=1, side=96)
  source = write_mp4(tmp_path / 'in.mp4', frames, fps=30)
  out = tmp_path / 'styled.mp4'
  count = stylize.stylize_clip(open(source, 'rb').read(), str(out), stylize.OpenCVStyler().for_clip('c'), chunk=7)
  styled, rate = read_mp4(out)
  assert count == len(styled) == 20 and rate == 30 and styled[0].shape == (96, 96, 3)
  with av.open(str(out)) as container:
    assert container.streams.video[0].codec_context.name == 'h264'
  assert not (tmp_path / 'styled.mp4.partial').exists()
  again = tmp_path / 'again.mp4'
  stylize.stylize_clip(source, str(again), stylize.OpenCVStyler().for_clip('c'), chunk=7)
  assert again.read_bytes() == out.read_bytes()  # a retried clip rewrites the same bytes


def test_stylize_clip_failure_leaves_no_file(tmp_path):
  source = write_mp4(tmp_path / 'in.mp4', moving_clip(frames=3, side=64))

  def failing(frames):
    raise stylize.StyleFailed('model down')

  with pytest.raises(stylize.StyleFailed):
    stylize.stylize_clip(source, str(tmp_path / 'out.mp4'), failing)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['in.mp4']


# ---------------------------------------------------------------- SDXL-Turbo

@pytest.fixture(scope='module')
def tiny_sdxl(tmp_path_factory):
  """A randomly initialised SDXL img2img pipeline with SDXL's components and config keys, saved like
  stabilityai/sdxl-turbo (save_pretrained), small enough to run on the CPU in a fraction of a second."""
  import torch
  from diffusers import (AutoencoderKL, EulerAncestralDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                         UNet2DConditionModel)
  from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
  root = tmp_path_factory.mktemp('sdxl')
  torch.manual_seed(0)
  unet = UNet2DConditionModel(
      block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
      down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D'), up_block_types=('CrossAttnUpBlock2D', 'UpBlock2D'),
      attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type='text_time',
      addition_time_embed_dim=8, transformer_layers_per_block=(1, 1), norm_num_groups=8,
      projection_class_embeddings_input_dim=80,  # 6 time ids x 8 + the pooled text embedding (32)
      cross_attention_dim=64)  # both text encoders' hidden states side by side (32 + 32)
  vae = AutoencoderKL(block_out_channels=[4, 4, 4, 4], in_channels=3, out_channels=3, latent_channels=4,
                      down_block_types=['DownEncoderBlock2D'] * 4, up_block_types=['UpDecoderBlock2D'] * 4,
                      sample_size=SIZE, norm_num_groups=2, layers_per_block=1)
  config = CLIPTextConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1, hidden_size=32, intermediate_size=37,
                          num_attention_heads=4, num_hidden_layers=2, vocab_size=100, projection_dim=32,
                          hidden_act='gelu', layer_norm_eps=1e-05)
  letters = 'abcdefghijklmnopqrstuvwxyz'
  vocab = {'<|startoftext|>': 0, '!': 1, '<|endoftext|>': 2}
  vocab.update({token: len(vocab) + k for k, token in enumerate(list(letters) + [c + '</w>' for c in letters])})
  (root / 'vocab.json').write_text(json.dumps(vocab))
  (root / 'merges.txt').write_text('#version: 0.2\n')
  tokenizer = CLIPTokenizer(str(root / 'vocab.json'), str(root / 'merges.txt'), model_max_length=77)
  pipe = StableDiffusionXLImg2ImgPipeline(
      vae=vae, text_encoder=CLIPTextModel(config), text_encoder_2=CLIPTextModelWithProjection(config),
      tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
      scheduler=EulerAncestralDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear',
                                                timestep_spacing='trailing'),
      requires_aesthetics_score=False, force_zeros_for_empty_prompt=True)
  pipe.save_pretrained(str(root / 'sdxl-turbo'))
  return str(root / 'sdxl-turbo')


def test_sdxl_handler_loads_the_folder_and_styles_batches_with_the_clip_seed(tiny_sdxl):
  handler = stylize.SdxlTurboHandler(tiny_sdxl, size=SIZE, device='cpu', batch_sizes={'cpu': 2})
  pipe = handler.load_model()
  assert type(pipe).__name__ == 'StableDiffusionXLImg2ImgPipeline'
  calls = []

  def counting(**kwargs):
    calls.append((len(kwargs['image']), kwargs['strength'], kwargs['num_inference_steps'], kwargs['guidance_scale']))
    return pipe(**kwargs)

  frames = moving_clip(frames=3, side=48)
  requests = [stylize.StyleRequest('clip-a', f) for f in frames] + [stylize.StyleRequest('clip-b', frames[0])]
  results = list(handler.run_inference(requests, counting))
  assert calls == [(2, 0.5, 2, 0.0), (2, 0.5, 2, 0.0)]  # 4 frames in batches of 2, SDXL-Turbo's settings
  assert [r.example for r in results] == requests
  styled = [r.inference for r in results]
  assert all(s.shape == (48, 48, 3) and s.dtype == np.uint8 for s in styled)
  assert np.abs(styled[0].astype(float) - frames[0]).mean() > 1  # the pipeline did change the picture
  # the seed comes from the clip id: the same frame in clip b comes out differently...
  assert np.abs(styled[3].astype(float) - styled[0]).mean() > 1
  # ...and clip a's frame comes out the same whatever shares its batch (each frame has its own generator)
  alone = list(handler.run_inference([requests[0], requests[0]], pipe))[1].inference
  assert np.abs(alone.astype(float) - styled[0]).mean() < 1


def test_diffusion_styler_through_shared_model_and_stylize_clip(tiny_sdxl, tmp_path):
  handler = stylize.SdxlTurboHandler(tiny_sdxl, size=SIZE, device='cpu')
  styler = stylize.DiffusionStyler(handler)
  styler.setup()
  source = write_mp4(tmp_path / 'in.mp4', moving_clip(frames=5, side=64))
  count = stylize.stylize_clip(source, str(tmp_path / 'styled.mp4'), styler.for_clip('clip'), chunk=3)
  styled, _ = read_mp4(tmp_path / 'styled.mp4')
  assert count == len(styled) == 5 and styled[0].shape == (64, 64, 3)


def test_sdxl_weights_errors_name_the_flag(tmp_path, tiny_sdxl):
  with pytest.raises(WeightsError, match='--sdxl_model.*not given'):
    stylize.make_styler('sdxl_turbo', None)
  with pytest.raises(WeightsError, match='--sdxl_model.*no such file'):
    stylize.make_styler('sdxl_turbo', str(tmp_path / 'missing'))
  with pytest.raises(WeightsError, match='--sdxl_model.*model_index.json'):
    stylize.make_styler('sdxl_turbo', str(tmp_path))
  broken = tmp_path / 'broken'
  broken.mkdir()
  (broken / 'model_index.json').write_text(open(f'{tiny_sdxl}/model_index.json').read())
  with pytest.raises(WeightsError, match='--sdxl_model.*not a diffusers img2img pipeline'):
    stylize.SdxlTurboHandler(str(broken), device='cpu').load_model()
  assert isinstance(stylize.make_styler('opencv'), stylize.OpenCVStyler)
  assert isinstance(stylize.make_styler('sdxl_turbo', tiny_sdxl), stylize.DiffusionStyler)
  with pytest.raises(ValueError, match='strength'):
    stylize.SdxlTurboHandler(tiny_sdxl, strength=0.4, steps=2)


def test_clip_seed_is_stable_and_differs_by_clip():
  assert stylize.clip_seed('clip-a') == stylize.clip_seed('clip-a') != stylize.clip_seed('clip-b')
  assert 0 <= stylize.clip_seed('clip-a') < 2 ** 63
