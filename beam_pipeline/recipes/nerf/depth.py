"""Per-frame depth maps in the render pass (`--depth`), kept in a per-clip frame archive for the nerf writer.

Each output frame's map (model_handlers/depth.DepthHandler: DaGAN's disparity in (0, 1), or a TorchScript
model's output, at the frame's size) is stored as `<frame index>.npy`, float16 H x W: half the bytes of
float32, and DaGAN's sigmoid output needs no more than float16's 3 significant digits. The archive waits in
the work dir under `PassResult.files['depth']` until the clip is kept; a frame the model failed on has no
member (and counts as a model error).
"""
from __future__ import annotations

import io

import numpy as np
from apache_beam.ml.inference.base import ModelHandler

from model_handlers.in_process import SharedModel
from transforms.core.elements import ClipTask
from transforms.core.frame_store import FrameArchive, archive_uri
from transforms.frame_analysis import ClipPass, Frame, ModelAnalyzer, ModelPass, PassResult

ARCHIVE = 'depth'  # archive name and PassResult.files key
DTYPE = np.float16


def npy_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, array, allow_pickle=False)
  return buffer.getvalue()


class _DepthPass(ModelPass):

  def __init__(self, model: SharedModel, archive: FrameArchive):
    super().__init__(model)
    self.archive = archive

  def take(self, frame: Frame, depth) -> None:
    self.archive.add(f'{frame.index}.npy', npy_bytes(np.asarray(depth, np.float32).astype(DTYPE)))

  def finish(self, num_frames: int) -> PassResult:
    return self.result(files={ARCHIVE: self.archive.close()})

  def abandon(self) -> None:
    self.archive.discard()


class DepthMaps(ModelAnalyzer):
  """Depth of every output frame into the clip's `depth` frame archive (`<i>.npy`, float16 H x W)."""

  name = 'depth'

  def __init__(self, handler: ModelHandler, work_dir: str):
    super().__init__(handler)
    self.work_dir = work_dir

  @classmethod
  def from_options(cls, opts, work_dir: str) -> 'DepthMaps':
    """The analyzer for `--depth`; a missing or wrong path fails here, when the graph is built."""
    from beam_pipeline.recipes.nerf.depth_model import DepthHandler, check_depth_weights
    return cls(DepthHandler(check_depth_weights(opts.depth)), work_dir)

  def start(self, task: ClipTask, num_frames: int, size: int) -> ClipPass:
    return _DepthPass(self.model, FrameArchive(archive_uri(self.work_dir, task.clip_id, ARCHIVE)))
