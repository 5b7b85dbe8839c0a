"""`python -m beam_pipeline`: run the job (or, with no --input, the embedded demo)."""
from __future__ import annotations

import argparse
import contextlib
import difflib
import glob
import hashlib
import json
import logging
import os
import signal
import sys
import time
import uuid
from typing import List, Optional, Tuple


def on_interrupt(*_) -> None:
  """Ctrl-C: one line and status 130. What finished is kept (published shards and units, rendered fragments
  in the work dir); the runner's threads would only add tracebacks, so the process ends at once."""
  print('\ninterrupted; rerun with the same --output to resume', file=sys.stderr, flush=True)
  os._exit(130)  # pylint: disable=protected-access


if __name__ == '__main__':  # before the imports below, which take seconds
  signal.signal(signal.SIGINT, on_interrupt)

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.options import pipeline_options
from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions, TestOptions, _BeamArgumentParser

from beam_pipeline import local_runner, native_log, progress
from beam_pipeline.options import TalkingFaceOptions
from beam_pipeline.pipeline import build_pipeline
from beam_pipeline.recipes import get_recipe
from beam_pipeline.recipes.base import apply_defaults
from model_handlers.weights import WeightsError
from transforms.crash_guard import CrashGuard
from transforms.core.fileio import iter_jsonl, remove_empty_dirs, write_atomic
from transforms.writers import shards as write
from transforms.writers.folders import clean_scratch, unit_indexes


DISTRIBUTED_RUNNERS = ('DataflowRunner', 'FlinkRunner', 'SparkRunner', 'PortableRunner')
# The local default: Beam's FnApiRunner, the engine DirectRunner runs batch jobs on (in-memory or
# --direct_running_mode=multi_processing), without DirectRunner's first attempt to download Prism. Its
# workers default to every core (beam_pipeline/local_runner.py).
LOCAL_RUNNER = 'FnApiRunner'


def new_run_id() -> str:
  return time.strftime('%Y%m%d-%H%M%S', time.gmtime()) + '-' + uuid.uuid4().hex[:6]


def _is_local(path: str) -> bool:
  return '://' not in path or path.startswith('file://')


def runs_elsewhere(options: PipelineOptions) -> bool:
  """Whether workers may run on other machines than this one (then local paths mean nothing to them).

  A portable job whose workers run inside this process (`--environment_type=LOOPBACK`) shares this disk.
  """
  runner = options.view_as(StandardOptions).runner
  name = runner if isinstance(runner, str) else type(runner).__name__
  if name not in DISTRIBUTED_RUNNERS:
    return False
  environment = (options.view_as(pipeline_options.PortableOptions).environment_type or '').upper()
  return name == 'DataflowRunner' or environment != 'LOOPBACK'


def refuse_local_paths(options: PipelineOptions, opts: TalkingFaceOptions) -> None:
  """Distributed workers cannot read or write this machine's disk: a local path would put clips on one
  worker's disk, shards on others, and the CLI would then find nothing. Say which flag to change."""
  if not runs_elsewhere(options):
    return
  runner = options.view_as(StandardOptions).runner
  for flag in ('input', 'output', 'work_dir'):
    value = getattr(opts, flag)
    if value and _is_local(value):
      raise SystemExit(f'--{flag}={value} is a local path, but {runner} runs workers on other machines: give a '
                       f'shared location (gs://bucket/...) for --{flag}, or run the portable runner with '
                       f'--environment_type=LOOPBACK to keep the workers on this machine.')


def default_work_dir(options: PipelineOptions, opts: TalkingFaceOptions) -> str:
  """Where downloads and rendered clips are cached when --work_dir is not given.

  Under a local output: `<output>/_work`. A remote output must not carry raw sources inside the dataset:
  a distributed job caches under `--temp_location` (clean it with a bucket lifecycle rule), a local
  runner under this machine's cache directory.
  """
  if opts.work_dir:
    return opts.work_dir
  if _is_local(opts.output):
    return FileSystems.join(opts.output, '_work')
  name = hashlib.sha1(opts.output.rstrip('/').encode()).hexdigest()[:12]
  if runs_elsewhere(options):
    temp = options.view_as(pipeline_options.GoogleCloudOptions).temp_location
    if not temp:
      raise SystemExit(f'--output={opts.output} is remote: give --work_dir (a shared location for downloads and '
                       'rendered clips, e.g. gs://bucket/work) or --temp_location to cache under.')
    return FileSystems.join(temp, 'talking_face_work', name)
  cache = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(cache, 'beam_pipeline', 'work', name)


def prepare(argv: Optional[List[str]] = None) -> Tuple[PipelineOptions, TalkingFaceOptions]:
  """Options checked and completed (runner, run id, work dir), and the output made ready.

  Shared by the CLI (which waits for the job) and the flex-template launcher (which must return once
  the job is submitted). What earlier runs wrote is not read here: the pipeline reads it itself. A
  `--dry_run` only builds the job graph: the output is neither read nor cleaned.
  """
  refuse_unknown_flags(argv if argv is not None else sys.argv[1:])
  options = PipelineOptions(argv)
  opts = options.view_as(TalkingFaceOptions)
  applied = apply_defaults(get_recipe(opts.recipe), opts, argv if argv is not None else sys.argv[1:])
  if opts.allow_silent and get_recipe(opts.recipe).silent:
    raise SystemExit(f'--allow_silent is refused: {get_recipe(opts.recipe).silent}')
  get_recipe(opts.recipe).output_layout(opts)  # --layout=files outside hdtf: a one-line error
  if applied:
    logging.info('recipe %s sets %s', opts.recipe, ', '.join(f'--{k}={v}' for k, v in sorted(applied.items())))
  if not options.view_as(StandardOptions).runner:
    options.view_as(StandardOptions).runner = LOCAL_RUNNER
  local_runner.use_all_cores(options, argv if argv is not None else sys.argv[1:])
  opts.run_id = opts.run_id or new_run_id()
  if not opts.input:
    if runs_elsewhere(options):
      raise SystemExit('the embedded demo runs on local runners only: give --input')
    from beam_pipeline.demo import write_demo_input
    opts.output = opts.output or os.path.abspath('demo_out')
    demo_dir = os.path.join(default_work_dir(options, opts), 'demo_input')
    opts.input = write_demo_input(demo_dir, opts.recipe)
    print(f'demo: generated the {opts.recipe} demo input in {demo_dir}')
  if not opts.output:
    raise SystemExit('--output is required with --input')
  refuse_local_paths(options, opts)
  opts.work_dir = default_work_dir(options, opts)
  if options.view_as(TestOptions).dry_run:
    return options, opts
  if not any(ch in opts.input for ch in '*?[') and not FileSystems.exists(opts.input):
    raise SystemExit(f'--input {opts.input} does not exist')
  if any(ch in opts.input for ch in '*?[') and not _glob_matches(opts.input):
    raise SystemExit(f'--input {opts.input} matches no file')
  if _is_local(opts.output):
    os.makedirs(opts.output, exist_ok=True)
  recipe = get_recipe(opts.recipe)
  bind_output(opts, recipe.output_layout(opts))
  write.clean_unfinished(opts.output, opts.stale_after_h * 3600)
  clean_scratch(opts.output, recipe.scratch_folders, opts.stale_after_h * 3600)  # what killed writers left
  return options, opts


def refuse_unknown_flags(argv: List[str]) -> None:
  """A flag neither this pipeline nor Beam knows exits 2 with the nearest known one: Beam itself would only
  warn and run without it (`--recipie=nerf` would make an hdtf dataset)."""
  parser = _BeamArgumentParser(allow_abbrev=False)
  for options_class in {str(cls): cls for cls in PipelineOptions.__subclasses__()}.values():
    options_class._add_argparse_args(parser)  # pylint: disable=protected-access
  _, unknown = parser.parse_known_args(argv)
  known = [flag for action in parser._actions for flag in action.option_strings]  # pylint: disable=protected-access
  if unknown:
    name = unknown[0].split('=', 1)[0]
    close = difflib.get_close_matches(name, known, n=1) if name.startswith('-') else []
    print(f'error: unknown {"flag" if name.startswith("-") else "argument"} {name}'
          + (f'; did you mean {close[0]}?' if close else '; see --help'), file=sys.stderr)
    raise SystemExit(2)


def _glob_matches(pattern: str) -> bool:
  if _is_local(pattern):
    return bool(glob.glob(pattern.replace('file://', '', 1)))
  try:
    return bool(FileSystems.match([pattern])[0].metadata_list)
  except Exception:  # pylint: disable=broad-except  # a bucket or folder that does not exist
    return False


OUTPUT_RECORD = 'output.json'  # what made the output: its recipe and layout (an output belongs to one recipe)


MEGACTOR_FIELDS = ('keypoints', 'styled', 'swapped')  # what megactor's shard records add to hdtf's


def made_by(record: dict, in_shard: bool) -> Tuple[str, str]:
  """(recipe, layout) an index record shows it was written by ('' for a recipe it does not tell)."""
  if in_shard:
    return ('megactor' if any(name in record for name in MEGACTOR_FIELDS) else 'hdtf'), 'shards'
  if record.get('file'):
    return 'hdtf', 'files'
  from beam_pipeline.report import folder_kind
  return folder_kind(record) or '', 'folders'


def told_by_records(output: str) -> Optional[Tuple[str, str, bool]]:
  """(recipe, layout, whether its samples carry `inputs`) by the first record the output published (a finished
  shard's index, else a folder unit's); None when it published none."""
  for indexes, in_shard in ((write.finished_shard_indexes(output), True), (unit_indexes(output), False)):
    for index in indexes:
      for record in iter_jsonl(index):
        return (*made_by(record, in_shard), bool(record.get('inputs')))
  return None


def bind_output(opts: TalkingFaceOptions, layout: str) -> None:
  """Refuse an output another recipe (or layout) made, with what to do; record this one's on a new output.

  An output from before output.json is adopted by the recipe its records show (and refused to any other): the
  record is written, and said in one line. Its samples carry no `inputs`, so a rerun keeps them as they are (it
  cannot tell whether their range, crop or options changed). Records that show no recipe are refused."""
  path = FileSystems.join(opts.output, OUTPUT_RECORD)
  told = None
  if FileSystems.exists(path):
    with FileSystems.open(path) as handle:
      bound = json.loads(handle.read())
  else:
    told = told_by_records(opts.output)
    bound = told and {'recipe': told[0], 'layout': told[1]}
  if told and not told[0]:
    raise SystemExit(f'--output={opts.output} holds {told[1]} from before outputs recorded their recipe, and its '
                     f'records do not show which recipe made them: give this run another --output, or write '
                     f'{{"recipe": "...", "layout": "{told[1]}"}} into {path}')
  if bound and (bound.get('recipe', opts.recipe) != opts.recipe or bound.get('layout', layout) != layout):
    made = f'--recipe={bound["recipe"]}' if 'recipe' in bound else 'another recipe'
    raise SystemExit(f'--output={opts.output} holds a dataset made by {made} ({bound.get("layout")}'
                     f'{", by its records: it has no " + OUTPUT_RECORD if told else ""}), not by '
                     f'--recipe={opts.recipe} ({layout}): give this run another --output, or rerun with the flags '
                     'that made it')
  if told:
    write_atomic(path, json.dumps({'recipe': opts.recipe, 'layout': layout, 'adopted_by': opts.run_id},
                                  sort_keys=True).encode())
    print(f'adopted {opts.output}: made before outputs recorded their recipe; its records show --recipe='
          f'{opts.recipe} ({layout}), now in {OUTPUT_RECORD}' + ('' if told[2] else
          '; its samples carry no inputs digest, so reruns keep them as they are (they cannot tell whether '
          'their range, crop or options changed): give another --output to make them again'))
  elif not bound or 'recipe' not in bound:
    write_atomic(path, json.dumps({'recipe': opts.recipe, 'layout': layout, 'first_run': opts.run_id},
                                  sort_keys=True).encode())


def run(argv: Optional[List[str]] = None) -> dict:
  options, opts = prepare(argv)
  local = not runs_elsewhere(options)
  line = progress.ProgressLine() if local and progress.wanted(options, opts.no_progress) else None
  with line or contextlib.nullcontext():
    p = beam.Pipeline(options=options)
    build_pipeline(p, opts, line and line.directory)
    result = p.run()
    if not line and not opts.no_progress and not options.view_as(TestOptions).dry_run:
      progress.follow(result)
    result.wait_until_finish()
    if line:
      line.finish(result)
  if options.view_as(TestOptions).dry_run:
    print(f'dry run: the {options.view_as(StandardOptions).runner} job was built, nothing ran')
    return {}
  CrashGuard(opts.work_dir, opts.run_id).clear()
  for folder in (opts.output, opts.work_dir):  # a finished run leaves no empty folder (scratch it emptied)
    remove_empty_dirs(folder)
  stats = report(opts.output, opts.incremental, opts.recipe, get_recipe(opts.recipe).output_layout(opts))
  if stats and (not stats['planned'] or stats['rejected_by_reason'].get('empty_input')):
    raise SystemExit(f'error: --input {opts.input} holds no entries: nothing to make')
  if stats and not opts.no_report:
    from beam_pipeline.report import write_report
    print(f'report: {write_report(opts.output, opts.report_samples)}')
  return stats


def report(output: str, incremental: bool = False, recipe: str = 'hdtf', layout: str = '') -> dict:
  path = FileSystems.join(output, 'stats.json')
  if not FileSystems.exists(path):
    return {}  # a remote runner still working (e.g. Dataflow without waiting)
  with FileSystems.open(path) as handle:
    stats = json.loads(handle.read())
  if stats.get('already_written'):
    print(f'resumed: {stats["already_written"]} clips already in {output} were skipped')
  if stats.get('reused'):
    print(f'resumed: {stats["reused"]} clips an interrupted run had made were packed without making them again')
  if stats.get('retired'):
    print(f'retired: {stats["retired"]} earlier samples (their clip changed, or left the input with --prune)')
  if stats.get('not_in_manifest'):
    print(f'{stats["not_in_manifest"]} clips in {output} are no longer in the input (stats.json '
          'not_in_manifest_examples); --prune retires them')
  if incremental and stats.get('carried_rejects'):
    print(f'incremental: {stats["carried_rejects"]} clips rejected for good by an earlier run were skipped')
  print(f'wrote {stats["written_this_run"]} new clips ({stats["written"]} in total, '
        f'{stats["rejected"]} rejected of {stats["planned"]} planned) to {output}')
  for reason, count in stats['rejected_by_reason'].items():
    print(f'  rejected {count} x {reason} (see rejects.jsonl)')
  layout = layout or get_recipe(recipe).layout
  where = {'shards': f'shards: {FileSystems.join(output, write.SHARDS)}/*.tar',
           'files': f'clips: {FileSystems.join(output, "clips")}/*.mp4 (and their sidecars)'}.get(
               layout, f'folders: {output} (one per subject or tube, listed in published/)')
  print(f'{where}  index: {FileSystems.join(output, "index.jsonl")}')
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
  # The local runner logs a worker's exception and then raises it: the raise is what main() reports (one line
  # for a weights flag to fix, else the traceback), so the log line would only say it twice.
  logging.getLogger('apache_beam.runners.common').setLevel(logging.CRITICAL)
  local_runner.quiet_worker_errors()  # the same for a worker thread's failure (several local workers)
  if {'-h', '--help'} & set(sys.argv[1:]):
    print_help()
    return
  try:
    run(sys.argv[1:])
  except KeyboardInterrupt:
    on_interrupt()
  except Exception as error:  # pylint: disable=broad-except
    message = weights_problem(error)
    if message is None:
      raise
    raise SystemExit(f'error: {message}') from None


def weights_problem(error: BaseException) -> Optional[str]:
  """The message of a WeightsError behind `error` (a weights flag to fix: it names the flag and says how), also
  when a worker raised it while loading the model and the runner re-raised it as its own error; else None."""
  seen, text = set(), str(error)
  while error is not None and id(error) not in seen:
    if isinstance(error, WeightsError):
      return str(error)
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  name = f'{WeightsError.__module__}.{WeightsError.__name__}: '  # a runner's error carries the worker's as text
  if name in text:
    return text.split(name, 1)[1].split(' [while running', 1)[0].splitlines()[0]
  return None


if __name__ == '__main__':
  main()
