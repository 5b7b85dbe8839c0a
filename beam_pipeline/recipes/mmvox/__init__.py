"""`mmvox`: Multimodal VoxCeleb (MMVID) on Siarohin's video-preprocessing face tubes.

On the spine: the tube tracker (tubes.py) replaces the spine's tracker; the face parsing analyzers
(person segmentation + parsing) and `MmvoxFrames` (frames, colour masks, pencil drawings) follow the
landmarker in the render pass; the writer lays out one unit per tube (writer.py).

Defaults, as video-preprocessing: 256x256 at 25 fps, the detector on every frame (--detect_fps 25, as their
per-frame S3FD boxes), and every clip through the tube tracker (--crop_mode detect: a manifest's crop
window would skip it).
"""
from __future__ import annotations

import io
import itertools
import re

from apache_beam.io.filesystems import FileSystems

from beam_pipeline.recipes.base import Recipe
from beam_pipeline.recipes.mmvox.attributes import AttributeFileError, attribute_format, parse_row
from beam_pipeline.recipes.mmvox.tubes import TrackTubes, TubeRules
from beam_pipeline.recipes.mmvox.writer import MmvoxFrames, WriteLayout, WriteLoaderCaches, tube_files
from transforms.analyzers.parsing import parsing_analyzers
from transforms.core.layout import work_dir_of
from transforms.sampling import shot_detection

HEAD_LINES = 64  # enough to find an attribute file's header


def read_attributes(uri):
  """(uri, its AttributeFormat) for the workers, which read the rows themselves; the file is checked here,
  line by line without keeping it, so a bad one fails before any work."""
  if not uri:
    return None
  if not FileSystems.exists(uri):
    raise SystemExit(f'--attributes {uri} does not exist')
  try:
    with FileSystems.open(uri) as raw:
      lines = io.TextIOWrapper(raw, encoding='utf-8-sig')
      head = list(itertools.islice(lines, HEAD_LINES))
      layout = attribute_format(head, f'--attributes {uri}')
      for number, line in enumerate(itertools.chain(head, lines), 1):
        if number > layout.header_lines:
          parse_row(line, layout, f'--attributes {uri} line {number}')
  except (AttributeFileError, UnicodeDecodeError) as error:
    raise SystemExit(str(error)) from None
  return uri, layout


class Mmvox(Recipe):
  name = 'mmvox'
  layout = 'folders'
  defaults = {'size': 256, 'fps': 25.0, 'detect_fps': 25.0, 'crop_mode': 'detect'}

  def tracker(self, opts, detector):
    return TrackTubes(detector, TubeRules(min_frames=opts.min_frames, min_size=opts.min_tube_px), opts.fps,
                      opts.detect_fps, shot_detection(opts))

  def analyzers(self, opts, landmarker):
    return parsing_analyzers(opts) + [MmvoxFrames(work_dir_of(opts), keep_frames=opts.tube_format == 'png')]

  def write(self, kept, opts, work_dir: str):
    if re.fullmatch(r'[a-z][a-z0-9+.-]*://[^/]*/*', opts.output):
      raise SystemExit(f'--output {opts.output}: mmvox writes its loader caches beside the output folder '
                       '(<output>_local.pkl), so give a folder inside the bucket')
    # Glasses, earrings and hats only from a parsing that has the classes: BiSeNet's, not the offline one.
    return kept | 'MmvoxWriter' >> WriteLayout(opts.output, opts.tube_format, read_attributes(opts.attributes),
                                               infer_parsed=bool(opts.parsing_weights))

  def unit_files(self, output, records):
    return tube_files(output, records[0]['folder']) if records else []

  def after_output(self, settled, opts):
    _ = settled | 'MmvoxLoaderCaches' >> WriteLoaderCaches(opts.output)


RECIPE = Mmvox()
