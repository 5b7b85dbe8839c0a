"""Stylised copies of a clip (MegActor's `mp4_styled`): an OpenCV cartoon filter, or SDXL-Turbo img2img.

MegActor made its styled copies with SDXL-Turbo img2img per frame (512x512, strength 0.5, a fixed seed) to
teach the model to ignore appearance. `--style=sdxl_turbo` does that from a user-supplied local diffusers
folder, on the GPU when there is one; its default (`opencv`) needs no weights and runs anywhere.

Both keep the clip steady over time, since a flickering copy teaches the model flicker:
- OpenCV: a deterministic filter (edge-preserving smoothing, a fixed colour quantisation, soft dark edges;
  no per-frame randomness), blended with the previous styled frame where the input did not change (camera
  noise and codec grain would otherwise make quantisation boundaries flip from frame to frame).
- SDXL-Turbo: the same seed for every frame of a clip (from the clip id), so every frame starts from the same
  noise; the seed is the same on every run, so a retried clip is styled the same.

`stylize_clip` decodes a clip's mp4 and writes the styled H.264 mp4 the writer packs as `mp4_styled`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from fractions import Fraction
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Union

import av
import cv2
import numpy as np
from apache_beam.ml.inference.base import ModelHandler, PredictionResult

from model_handlers.in_process import ModelError, SharedModel
from model_handlers.torch_handler import pick_device
from model_handlers.weights import WeightsError, local_copy, require_files

# MegActor's style_transfer.py prompt.
DEFAULT_PROMPT = ('A high-resolution anime-style portrait of a person with the same facial expression, same mouth '
                  'movements and pose as the original photo, emphasizing fine details and smooth lines, with vibrant '
                  'colors')
SIZE, STRENGTH, STEPS, GUIDANCE = 512, 0.5, 2, 0.0  # SDXL-Turbo img2img wants strength x steps >= 1, no guidance
SDXL_FLAG = '--sdxl_model'
DEFAULT_BATCH_SIZES = {'cuda': 8, 'cpu': 2}
CHUNK_FRAMES = 16  # frames decoded before they are handed to the styler

ClipStyle = Callable[[List[np.ndarray]], List[np.ndarray]]  # a clip's frames, in order, in chunks -> styled


class StyleFailed(RuntimeError):
  """The style model failed on a clip's frames (reject reason style_failed)."""


def clip_seed(clip_id: str) -> int:
  """The clip's diffusion seed: from its id, so every run styles a clip the same way."""
  return int.from_bytes(hashlib.sha256(clip_id.encode()).digest()[:8], 'big') % (2 ** 63)


# ---------------------------------------------------------------- OpenCV

_CHANNEL_MEAN = np.full((1, 3), 1 / 3, np.float32)  # cv2.transform: (H, W, 3) -> their mean, (H, W)


class OpenCVStyler:
  """Cartoon look from OpenCV filters; `for_clip` gives a clip's stateful styling function (frames in order)."""

  def __init__(self, sigma_s: float = 60, sigma_r: float = 0.4, levels: int = 8, edge_strength: float = 0.7,
               keep: float = 0.85, still_px: float = 8.0):
    self.sigma_s, self.sigma_r = sigma_s, sigma_r
    step = 256.0 / levels
    self.levels = (np.floor(np.arange(256) / step) * step + step / 2).astype(np.float32)  # 0-255 -> its level
    self.edge_strength = edge_strength
    self.keep = keep  # most of the previous styled frame kept where nothing moved
    self.still_px = still_px  # input change (mean abs, blurred) at which the previous frame's weight falls to 1/e

  def setup(self) -> None:
    """Nothing to load (the same call as the diffusion styler's)."""

  def style(self, image: np.ndarray) -> np.ndarray:
    """One frame, float32: smoothed, quantised to fixed colour levels, darkened along edges."""
    # Gastal & Oliveira's recursive domain transform, as cv2.edgePreservingFilter(RECURS_FILTER) runs it (sigma_r
    # there is on a 0-1 scale), in ximgproc's implementation: a few times faster, the same picture to within a grey
    # level on a handful of pixels.
    smooth = cv2.ximgproc.dtFilter(image, image, self.sigma_s, self.sigma_r * 255, mode=cv2.ximgproc.DTF_RF,
                                   numIters=3)
    grey = cv2.cvtColor(smooth, cv2.COLOR_RGB2GRAY)
    edges = cv2.magnitude(cv2.Sobel(grey, cv2.CV_32F, 1, 0, ksize=3), cv2.Sobel(grey, cv2.CV_32F, 0, 1, ksize=3))
    shade = np.minimum(edges, 200, out=edges)  # in place from here: full-frame temporaries cost page faults
    shade *= self.edge_strength
    shade /= 200
    np.subtract(1, shade, out=shade)
    styled = cv2.LUT(smooth, self.levels)
    styled *= shade[..., None]
    return styled

  def for_clip(self, clip_id: str) -> ClipStyle:
    previous: Dict[str, Optional[np.ndarray]] = {'input': None, 'styled': None}

    def style_frames(frames: List[np.ndarray]) -> List[np.ndarray]:
      out = []
      for frame in frames:
        styled = self.style(frame)
        if previous['styled'] is not None and previous['input'].shape == frame.shape:
          change = cv2.transform(cv2.absdiff(frame, previous['input']).astype(np.float32), _CHANNEL_MEAN)
          weight = cv2.GaussianBlur(change, (0, 0), 2)  # keep x exp(-(blur / still_px)^2), in place
          weight /= self.still_px
          np.square(weight, out=weight)
          np.negative(weight, out=weight)
          np.exp(weight, out=weight)
          weight *= self.keep
          pull = np.subtract(previous['styled'], styled)
          pull *= weight[..., None]
          styled += pull
        previous['input'], previous['styled'] = frame, styled
        rounded = np.rint(styled)
        out.append(np.clip(rounded, 0, 255, out=rounded).astype(np.uint8))
      return out

    return style_frames


# ---------------------------------------------------------------- SDXL-Turbo

@dataclasses.dataclass(frozen=True)
class StyleRequest:
  """One frame to style, with the clip it belongs to (which fixes its seed)."""
  clip_id: str
  image: np.ndarray  # RGB uint8 (H, W, 3)


class SdxlTurboHandler(ModelHandler[StyleRequest, PredictionResult, Any]):
  """StyleRequest -> PredictionResult(request, styled RGB uint8 frame of the request's size).

  A diffusers img2img pipeline from a local folder (`local_files_only`, nothing downloads), fp16 on CUDA and
  fp32 on the CPU. Frames go through at `size` x `size` in batches (8 on CUDA, 2 on the CPU); each frame's
  generator is seeded from its clip id.
  """

  model_name = 'sdxl_turbo'

  def __init__(self, model_dir: str, prompt: Optional[str] = None, size: int = SIZE, strength: float = STRENGTH,
               steps: int = STEPS, device: str = 'auto', batch_sizes: Optional[Dict[str, int]] = None):
    super().__init__()
    if strength * steps < 1:
      raise ValueError(f'strength {strength} x steps {steps} < 1: img2img would run no denoising step')
    self._model_dir, self._prompt = model_dir, prompt or DEFAULT_PROMPT
    self._size, self._strength, self._steps = size, strength, steps
    self._device_name = device
    self._batch_sizes = dict(DEFAULT_BATCH_SIZES, **(batch_sizes or {}))
    self.device = None

  def load_model(self):
    import torch
    from diffusers import AutoPipelineForImage2Image
    check_model_dir(self._model_dir)
    local = local_copy(self._model_dir, SDXL_FLAG, 'a diffusers SDXL-Turbo folder')  # gs://: once per machine
    self.device = pick_device(self._device_name)
    dtype = torch.float16 if self.device.type == 'cuda' else torch.float32
    try:
      pipe = AutoPipelineForImage2Image.from_pretrained(local, torch_dtype=dtype, local_files_only=True)
    except Exception as error:  # pylint: disable=broad-except  # diffusers/transformers raise many kinds here
      raise WeightsError(SDXL_FLAG, self._model_dir, f'not a diffusers img2img pipeline folder: '
                         f'{type(error).__name__}: {str(error)[:300]}') from error
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(self.device)

  def run_inference(self, batch: Sequence[StyleRequest], model,
                    inference_args: Optional[Dict[str, Any]] = None) -> Iterable[PredictionResult]:
    import torch
    from PIL import Image
    if self.device is None:  # loaded in another process
        self.device = pick_device(self._device_name)
    step = self._batch_sizes[self.device.type]
    results = []
    for first in range(0, len(batch), step):
      chunk = batch[first:first + step]
      images = [Image.fromarray(cv2.resize(np.asarray(r.image), (self._size, self._size),
                                           interpolation=cv2.INTER_AREA)) for r in chunk]
      generators = [torch.Generator('cpu').manual_seed(clip_seed(r.clip_id)) for r in chunk]
      with torch.inference_mode():
        styled = model(prompt=[self._prompt] * len(chunk), image=images, strength=self._strength,
                       num_inference_steps=self._steps, guidance_scale=GUIDANCE, generator=generators,
                       output_type='np').images
      for request, image in zip(chunk, styled):
        height, width = request.image.shape[:2]
        pixels = np.clip(np.round(np.asarray(image, np.float32) * 255), 0, 255).astype(np.uint8)
        results.append(PredictionResult(request, cv2.resize(pixels, (width, height), interpolation=cv2.INTER_CUBIC)))
    return results

  def get_num_bytes(self, batch: Sequence[StyleRequest]) -> int:
    return sum(r.image.nbytes for r in batch)

  def batch_elements_kwargs(self) -> Dict[str, Any]:
    return {'max_batch_size': max(self._batch_sizes.values())}

  def get_metrics_namespace(self) -> str:
    return 'stylize'


def check_model_dir(model_dir: Optional[str]) -> str:
  """`model_dir` (local or gs://) when it is a diffusers pipeline folder; else a WeightsError naming
  --sdxl_model."""
  what = 'a diffusers SDXL-Turbo folder (model_index.json, unet/, vae/, text encoders, tokenizers, scheduler)'
  return require_files(model_dir, ('model_index.json',), SDXL_FLAG, what)


class DiffusionStyler:
  """The SDXL-Turbo handler behind the same `setup` / `for_clip` calls as OpenCVStyler (one model per process)."""

  def __init__(self, handler: SdxlTurboHandler):
    self._model = SharedModel(handler)

  def setup(self) -> None:
    self._model.setup()

  def for_clip(self, clip_id: str) -> ClipStyle:
    def style_frames(frames: List[np.ndarray]) -> List[np.ndarray]:
      results = self._model.infer([StyleRequest(clip_id, frame) for frame in frames])
      failed = [r for r in results if isinstance(r, ModelError)]
      if failed:
        raise StyleFailed(f'{len(failed)} of {len(frames)} frames: {failed[-1].detail}')
      return results

    return style_frames


def make_styler(style: str, sdxl_model: Optional[str] = None, prompt: Optional[str] = None,
                device: str = 'auto') -> Union[OpenCVStyler, DiffusionStyler]:
  """The styler `--style` asks for; checks --sdxl_model when the graph is built, so a typo fails early."""
  if style == 'opencv':
    return OpenCVStyler()
  if style == 'sdxl_turbo':
    check_model_dir(sdxl_model)
    return DiffusionStyler(SdxlTurboHandler(sdxl_model, prompt=prompt, device=device))
  raise ValueError(f'--style {style!r} is not one of opencv, sdxl_turbo')


# ---------------------------------------------------------------- a clip

def stylize_clip(source: Union[bytes, str], out_path: str, style_frames: ClipStyle, crf: int = 18,
                 preset: str = 'veryfast', chunk: int = CHUNK_FRAMES) -> int:
  """Decode `source` (mp4 bytes or a local path), style its frames in order, write an H.264 mp4 (video only,
  same size and frame rate) to `out_path` (written under a temporary name, then renamed); the frame count.

  Raises StyleFailed when the style model fails.
  """
  partial = out_path + '.partial'
  try:
    produced = _restyle(source, partial, style_frames, crf, preset, chunk)
  except BaseException:
    if os.path.exists(partial):
      os.unlink(partial)
    raise
  os.replace(partial, out_path)
  return produced


def _restyle(source: Union[bytes, str], out_path: str, style_frames: ClipStyle, crf: int, preset: str,
             chunk: int) -> int:
  produced = 0
  with av.open(io.BytesIO(source) if isinstance(source, bytes) else source) as container:
    stream = container.streams.video[0]
    rate = Fraction(stream.average_rate or stream.guessed_rate or 25).limit_denominator(1001)
    with av.open(out_path, 'w', format='mp4', options={'movflags': '+faststart'}) as out:
      video = out.add_stream('libx264', rate=rate)
      video.width, video.height = stream.codec_context.width, stream.codec_context.height
      video.pix_fmt = 'yuv420p'
      # x264's macroblock tree made the same frames encode to different bytes from run to run here; without
      # it a retried clip rewrites the same file.
      video.options = {'crf': str(crf), 'preset': preset, 'x264-params': 'mbtree=0'}

      def encode(frames: List[np.ndarray]) -> None:
        nonlocal produced
        for image in style_frames(frames):
          frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format='rgb24')
          frame.pts, frame.time_base = produced, 1 / rate
          out.mux(video.encode(frame))
          produced += 1

      pending: List[np.ndarray] = []
      for frame in container.decode(stream):
        pending.append(frame.to_ndarray(format='rgb24'))
        if len(pending) == chunk:
          encode(pending)
          pending = []
      if pending:
        encode(pending)
      out.mux(video.encode(None))
  return produced


def flicker(frames: Sequence[np.ndarray]) -> float:
  """Mean absolute difference between consecutive frames (0-255 scale): how much a clip flickers or moves."""
  if len(frames) < 2:
    return 0.0
  return float(np.mean([np.abs(frames[k].astype(np.float32) - frames[k - 1]).mean() for k in range(1, len(frames))]))
