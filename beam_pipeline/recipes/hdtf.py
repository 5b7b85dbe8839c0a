"""`hdtf`: HDTF-style clips packed as WebDataset shards (mp4, wav, per-frame arrays, json).

The spine as it is: the spine's tracker, the face landmarker only, and the shard writer.
"""
from __future__ import annotations

import apache_beam as beam

from beam_pipeline.recipes.base import Recipe
from transforms.deadletter import DeadLetter
from transforms.write import AssembleSample, WriteShards


def write_shards(kept, opts, work_dir: str, assemble: AssembleSample = None):
  """Analysis -> tar fragments -> published shards; the writer other shard recipes build on."""
  samples = (kept | 'AssembleSample' >> beam.ParDo(DeadLetter(assemble or AssembleSample(work_dir), 'assemble'))
             .with_outputs('rejects', main='refs'))
  written = samples.refs | 'WriteShards' >> WriteShards(opts.output, opts.shard_max_samples, opts.shard_max_mb,
                                                        opts.shard_writers)
  rejects = (samples.rejects, written['rejects']) | 'WriterRejects' >> beam.Flatten()
  return {'records': written['records'], 'rejects': rejects}


class Hdtf(Recipe):
  name = 'hdtf'

  def write(self, kept, opts, work_dir: str):
    return write_shards(kept, opts, work_dir)


RECIPE = Hdtf()
