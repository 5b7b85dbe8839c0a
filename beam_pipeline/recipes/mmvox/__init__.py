"""`mmvox`: Multimodal VoxCeleb (MMVID) on Siarohin's video-preprocessing face tubes.

On the spine: the tube tracker (tubes.py) replaces the spine's tracker; the face parsing analyzers
(person segmentation + parsing) and `MmvoxFrames` (frames, colour masks, pencil drawings) follow the
landmarker in the render pass; the writer lays out one unit per tube (writer.py).

Defaults, as video-preprocessing: 256x256 at 25 fps, the detector on every frame (--detect_fps 25, as their
per-frame S3FD boxes), and every clip through the tube tracker (--crop_mode detect: a manifest's crop
window would skip it).
"""
from __future__ import annotations

from apache_beam.io.filesystems import FileSystems

from beam_pipeline.recipes.base import Recipe
from beam_pipeline.recipes.mmvox.attributes import parse_attribute_file
from beam_pipeline.recipes.mmvox.tubes import TrackTubes, TubeRules
from beam_pipeline.recipes.mmvox.writer import MmvoxFrames, WriteLayout
from transforms.analyzers.parsing import parsing_analyzers
from transforms.core.fileio import read_bytes
from transforms.core.layout import work_dir_of


def read_attributes(uri):
  """The --attributes table (beam_pipeline/recipes/mmvox/attributes.py), read when the graph is built: a bad file fails
  before any work."""
  if not uri:
    return {}
  if not FileSystems.exists(uri):
    raise SystemExit(f'--attributes {uri} does not exist')
  return parse_attribute_file(read_bytes(uri).decode('utf-8-sig'), f'--attributes {uri}')


class Mmvox(Recipe):
  name = 'mmvox'
  layout = 'folders'
  defaults = {'size': 256, 'fps': 25.0, 'detect_fps': 25.0, 'crop_mode': 'detect'}

  def tracker(self, opts, detector):
    return TrackTubes(detector, TubeRules(min_frames=opts.min_frames, min_size=opts.min_tube_px), opts.fps,
                      opts.detect_fps, opts.shot_threshold)

  def analyzers(self, opts, landmarker):
    return parsing_analyzers(opts) + [MmvoxFrames(work_dir_of(opts), keep_frames=opts.tube_format == 'png')]

  def write(self, kept, opts, work_dir: str):
    # Eyeglasses only from a parsing that has the class: BiSeNet's; the offline parsing cannot see glasses.
    return kept | 'MmvoxWriter' >> WriteLayout(opts.output, opts.tube_format, read_attributes(opts.attributes),
                                               infer_eyeglasses=bool(opts.parsing_weights))


RECIPE = Mmvox()
