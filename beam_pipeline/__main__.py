"""`python -m beam_pipeline`: run the job (or, with no --input, the embedded demo)."""
from __future__ import annotations

import json
import logging
import os
import sys
from typing import List, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions

from beam_pipeline.options import TalkingFaceOptions
from beam_pipeline.pipeline import build_pipeline, work_dir_of
from transforms import write


def run(argv: Optional[List[str]] = None) -> dict:
  options = PipelineOptions(argv)
  opts = options.view_as(TalkingFaceOptions)
  if not opts.input:
    from beam_pipeline.demo import write_demo_input
    opts.output = opts.output or os.path.abspath('demo_out')
    demo_dir = os.path.join(work_dir_of(opts), 'demo_input')
    opts.input = write_demo_input(demo_dir)
    print(f'demo: generated a talking clip and manifest in {demo_dir}')
  if not opts.output:
    raise SystemExit('--output is required with --input')
  if not options.view_as(StandardOptions).runner:
    options.view_as(StandardOptions).runner = 'DirectRunner'
  if '://' not in opts.output:
    os.makedirs(opts.output, exist_ok=True)
  write.clean_unfinished(opts.output)
  done = write.written_ids(opts.output)
  if done:
    print(f'resuming: {len(done)} clips already in {opts.output} are skipped')
  with beam.Pipeline(options=options) as p:
    build_pipeline(p, opts, done)
  return report(opts.output)


def report(output: str) -> dict:
  path = FileSystems.join(output, 'stats.json')
  if not FileSystems.exists(path):
    return {}  # a remote runner still working (e.g. Dataflow without waiting)
  with FileSystems.open(path) as handle:
    stats = json.loads(handle.read())
  print(f'wrote {stats["written_this_run"]} new clips ({stats["written"]} in total, '
        f'{stats["rejected"]} rejected of {stats["planned"]} planned) to {output}')
  for reason, count in stats['rejected_by_reason'].items():
    print(f'  rejected {count} x {reason} (see rejects.jsonl)')
  print(f'shards: {FileSystems.join(output, write.SHARDS)}/*.tar  index: {FileSystems.join(output, "index.jsonl")}')
  return stats


def main() -> None:
  logging.getLogger().setLevel(logging.WARNING)
  run(sys.argv[1:])


if __name__ == '__main__':
  main()
