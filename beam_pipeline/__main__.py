"""`python -m beam_pipeline`: run the job (or, with no --input, the embedded demo)."""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from typing import List, Optional, Set, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options import pipeline_options
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions, TestOptions

from beam_pipeline import progress
from beam_pipeline import native_log
from beam_pipeline.options import TalkingFaceOptions
from beam_pipeline.pipeline import build_pipeline, work_dir_of
from transforms import incremental, write


def prepare(argv: Optional[List[str]] = None) -> Tuple[PipelineOptions, TalkingFaceOptions, Set[str], List]:
  """Options, output made ready (unfinished shards removed), and what this run skips.

  Shared by the CLI (which waits for the job) and the flex-template launcher
  (which must return once the job is submitted). A `--dry_run` only builds the
  job graph: the output is neither read nor cleaned.
  """
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
  if options.view_as(TestOptions).dry_run:
    return options, opts, set(), []
  if not any(ch in opts.input for ch in '*?[') and not FileSystems.exists(opts.input):
    raise SystemExit(f'--input {opts.input} does not exist')
  if '://' not in opts.output:
    os.makedirs(opts.output, exist_ok=True)
  write.clean_unfinished(opts.output)
  done = write.written_ids(opts.output)
  if done:
    print(f'resuming: {len(done)} clips already in {opts.output} are skipped')
  carried = incremental.earlier_rejects(opts.output) if opts.incremental else []
  if carried:
    print(f'incremental: {len(carried)} clips rejected for good by an earlier run are skipped')
  return options, opts, done, carried


def run(argv: Optional[List[str]] = None) -> dict:
  options, opts, done, carried = prepare(argv)
  line = progress.ProgressLine(len(done)) if progress.wanted(options, opts.no_progress) else None
  with line or contextlib.nullcontext():
    with beam.Pipeline(options=options) as p:
      build_pipeline(p, opts, done, line and line.directory, carried_rejects=carried)
    if line:
      line.finish(p.result)
  if options.view_as(TestOptions).dry_run:
    print(f'dry run: the {options.view_as(StandardOptions).runner} job was built, nothing ran')
    return {}
  stats = report(opts.output)
  if stats and not opts.no_report:
    from beam_pipeline.report import write_report
    print(f'report: {write_report(opts.output, opts.report_samples)}')
  return stats


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


# Beam's own flags a user of this pipeline sets: runner choice, workers, Dataflow, portable/Flink.
BEAM_HELP = (pipeline_options.StandardOptions, pipeline_options.DirectOptions, pipeline_options.PortableOptions,
             pipeline_options.FlinkRunnerOptions, pipeline_options.GoogleCloudOptions,
             pipeline_options.WorkerOptions, pipeline_options.SetupOptions)


def print_help() -> None:
  """PipelineOptions swallows --help (its parser knows no flags), so list ours and Beam's here."""
  parser = argparse.ArgumentParser(prog='python -m beam_pipeline', description=__doc__, allow_abbrev=False,
                                   conflict_handler='resolve')
  TalkingFaceOptions._add_argparse_args(parser)  # pylint: disable=protected-access
  for options_class in BEAM_HELP:
    group = parser.add_argument_group(f'Beam {options_class.__name__}')
    options_class._add_argparse_args(group)  # pylint: disable=protected-access
  parser.print_help()


def main() -> None:
  native_log.filter_native_stderr()
  logging.getLogger().setLevel(logging.WARNING)
  if {'-h', '--help'} & set(sys.argv[1:]):
    print_help()
    return
  run(sys.argv[1:])


if __name__ == '__main__':
  main()
