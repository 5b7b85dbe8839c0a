"""Flex-template entry point (FLEX_TEMPLATE_PYTHON_PY_FILE): submit the job, then return.

The Dataflow launcher VM runs this file with the template parameters as flags.
Unlike the CLI it must not wait for the job: waiting blocks the launch. The
options are checked and completed the same way (unknown flags, remote paths, run id,
work dir, the recipe the output was made by) and stale unfinished shards removed;
the job itself reads what earlier runs wrote.
"""
from __future__ import annotations

import logging
import sys
from typing import List, Optional

import apache_beam as beam
from apache_beam.runners.runner import PipelineResult

from beam_pipeline.__main__ import prepare
from beam_pipeline.pipeline import build_pipeline
from beam_pipeline.template_metadata import normalise_flags


def launch(argv: Optional[List[str]] = None) -> PipelineResult:
  """Build the job from template parameters and submit it; a `--dry_run` result carries the translated job."""
  options, opts = prepare(normalise_flags(list(argv or [])))
  p = beam.Pipeline(options=options)
  build_pipeline(p, opts)
  return p.run()


def main() -> None:
  logging.getLogger().setLevel(logging.INFO)
  argv = sys.argv[1:]
  result = launch(argv)
  job_id = getattr(result, 'job_id', None)
  print(f'submitted job {job_id()}' if callable(job_id) else f'job state: {result.state}')
  output = next((arg.split('=', 1)[1] for arg in argv if arg.startswith('--output=')), 'OUTPUT')
  print(f'when it has finished: python -m beam_pipeline.report {output}  (writes report.html)')


if __name__ == '__main__':
  main()
