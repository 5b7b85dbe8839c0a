"""`hdtf`: HDTF-style clips packed as WebDataset shards (mp4, wav, per-frame arrays, json).

The spine as it is: the spine's tracker, the face landmarker only, and the shard writer.
"""
from __future__ import annotations

from beam_pipeline.recipes.base import Recipe
from transforms.writers.shards import write_shards


class Hdtf(Recipe):
  name = 'hdtf'

  def write(self, kept, opts, work_dir: str):
    return write_shards(kept, opts.output, work_dir, opts.shard_max_samples, opts.shard_max_mb, opts.shard_writers)


RECIPE = Hdtf()
