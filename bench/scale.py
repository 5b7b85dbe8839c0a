"""Scale simulation: a manifest of 100 k rows through the real CLI, and a resume over a large output.

  python bench/scale.py [--rows 10000 30000 100000] [--clip_fraction 0.001] [--work bench/work/scale]
  python bench/scale.py stages --input=M --output=O [pipeline flags]   # time per transform of one run
  python bench/scale.py parse --rows 100000 1000000 [--before /tmp/before]   # the input parse, before/after

A script, not a test: it prints a table and writes a "Scale simulation" section into bench/results.md
(everything else there is kept). No figure is asserted on; the accounting of every run is checked.

Rows point at files that do not exist, so every clip is rejected `not_found` at download without any
network: what is measured is the pipeline's cost per planned clip (read, skip-done join, download stage,
run summary), not rendering. With `--clip_fraction`, that share of the rows points at one tiny generated
clip instead, which runs the whole job (probe, detect, render, landmarks, shards). The resume run fakes an
output holding many published shards and a rejects.jsonl of permanent rejects, and reruns the manifest
with --incremental over it; the job graph is sized for that output and for an empty one.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from typing import List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from run import machine, replace_section  # noqa: E402  (bench/run.py, beside this script)

HEADING = '## Scale simulation'
SAMPLE_EVERY_S = 0.2
# Reasons the fake earlier run rejected clips for good, with their stages (all in PERMANENT_REASONS).
PERMANENT = (('track', 'no_face'), ('download', 'download_corrupt'), ('plan', 'too_short'))
MIB = 1024 * 1024


# ----------------------------------------------------------------------------- machine and memory

def load() -> str:
  return ' '.join(f'{v:.1f}' for v in os.getloadavg())


def _children(pid: int) -> List[int]:
  """Children of every thread of `pid` (a child started by a thread is listed under that thread only)."""
  children = []
  try:
    for task in os.listdir(f'/proc/{pid}/task'):
      with open(f'/proc/{pid}/task/{task}/children') as handle:
        children += [int(child) for child in handle.read().split()]
  except OSError:
    pass
  return children


def _status_kb(pid: int, field: str) -> int:
  try:
    with open(f'/proc/{pid}/status') as handle:
      return next((int(line.split()[1]) for line in handle if line.startswith(field + ':')), 0)
  except OSError:
    return 0


class TreeRss(threading.Thread):
  """Sampled every SAMPLE_EVERY_S: the largest sum of VmRSS over a process and its descendants, its own
  VmHWM (peak), and the largest VmHWM of any descendant (an SDK worker of a multi_processing run, ffmpeg...)."""

  def __init__(self, pid: int):
    super().__init__(daemon=True)
    self.pid = pid
    self.peak_kb = 0
    self.main_peak_kb = 0
    self.child_peak_kb = 0
    self.largest_tree = 1
    self.stopped = threading.Event()

  def run(self):
    while not self.stopped.is_set():
      tree, frontier = [], [self.pid]
      while frontier:
        tree += frontier
        frontier = [child for pid in frontier for child in _children(pid)]
      self.peak_kb = max(self.peak_kb, sum(_status_kb(pid, 'VmRSS') for pid in tree))
      self.main_peak_kb = max(self.main_peak_kb, _status_kb(self.pid, 'VmHWM'))
      self.child_peak_kb = max([self.child_peak_kb] + [_status_kb(pid, 'VmHWM') for pid in tree[1:]])
      self.largest_tree = max(self.largest_tree, len(tree))
      self.stopped.wait(SAMPLE_EVERY_S)

  def stop(self) -> None:
    self.stopped.set()
    self.join()


# ----------------------------------------------------------------------------- workload

def write_manifest(path: str, rows: int, missing_dir: str, clip: Optional[str] = None, clip_every: int = 0) -> None:
  """`rows` JSONL rows `{id, url}`: a missing file each, or every `clip_every`-th row the tiny clip."""
  with open(path, 'w') as handle:
    for row in range(rows):
      url = clip if clip and clip_every and row % clip_every == 0 else os.path.join(missing_dir, f'{row:07d}.mp4')
      handle.write(json.dumps({'id': source_id(row), 'url': url}) + '\n')


def source_id(row: int) -> str:
  return f'src{row:07d}'


def clip_id(row: int) -> str:
  """The id the manifest parser gives the one whole-file clip of a row without `clips`."""
  return source_id(row) + '_0'


def tiny_clip(path: str) -> str:
  from beam_pipeline.demo import VideoSpec, write_video
  if not os.path.exists(path):
    write_video(path, VideoSpec(duration=1.2, width=160, height=120))
  return path


def planned_inputs_of(missing_dir: str):
  """row -> the inputs its clip is planned with by a run with the default options (transforms/resume.py): a
  permanent reject is carried only when it recorded these (transforms/incremental.py)."""
  from apache_beam.options.pipeline_options import PipelineOptions
  from beam_pipeline.options import TalkingFaceOptions
  from beam_pipeline.pipeline import decisive_settings
  from transforms.resume import planned_inputs
  from transforms.sources.manifest import source_from_record
  settings = decisive_settings(PipelineOptions([]).view_as(TalkingFaceOptions))

  def inputs(row: int) -> str:
    (source,) = source_from_record({'id': source_id(row), 'url': os.path.join(missing_dir, f'{row:07d}.mp4')}, row)
    ((_, digest),) = planned_inputs(source, settings)
    return digest
  return inputs


def fake_output(output: str, rows: int, written: int, carried: int, shard_size: int, template: dict,
                inputs_of) -> dict:
  """An output as earlier runs leave it: `written` published ids in shards of `shard_size` (index files
  and empty tars) and `carried` permanent rejects in rejects.jsonl, each with its row's inputs (`inputs_of`).

  Published: the manifest's first half, then ids of rows no longer in it; permanent rejects: the next
  quarter, then more gone rows. So a rerun of the manifest skips half, carries a quarter and tries a quarter.
  """
  shards = os.path.join(output, 'shards')
  os.makedirs(shards)
  in_manifest_written = min(written, rows // 2)
  written_rows = list(range(in_manifest_written)) + list(range(rows, rows + written - in_manifest_written))
  line_bytes = 0
  for first in range(0, len(written_rows), shard_size):
    name = f'shard-{first // shard_size:06d}'
    lines = []
    for row in written_rows[first:first + shard_size]:
      record = dict(template, id=clip_id(row), key=clip_id(row), planned_id=clip_id(row), source_id=source_id(row),
                    shard=f'shards/{name}.tar')
      lines.append(json.dumps(record, sort_keys=True) + '\n')
    text = ''.join(lines)
    line_bytes += len(text)
    with open(os.path.join(shards, name + '.jsonl'), 'w') as handle:
      handle.write(text)
    open(os.path.join(shards, name + '.tar'), 'wb').close()
  from transforms.core.elements import Reject
  from transforms.incremental import PERMANENT_REASONS
  transient = [reason for _, reason in PERMANENT if reason not in PERMANENT_REASONS]
  if transient:
    raise SystemExit(f'{transient} are no longer permanent reasons: pick others for the faked rejects')
  start = rows // 2
  in_manifest_carried = min(carried, rows - rows // 2 - rows // 4)
  carried_rows = list(range(start, start + in_manifest_carried))
  beyond = rows + written - in_manifest_written
  carried_rows += list(range(beyond, beyond + carried - in_manifest_carried))
  with open(os.path.join(output, 'rejects.jsonl'), 'w') as handle:
    for number, row in enumerate(carried_rows):
      stage, reason = PERMANENT[number % len(PERMANENT)]
      reject = Reject(clip_id(row), stage, reason, 'earlier run (simulated)', source_id(row), inputs=inputs_of(row))
      handle.write(json.dumps(reject.to_json(), sort_keys=True) + '\n')
  return {'written': written, 'shards': -(-written // shard_size), 'carried': carried,
          'skipped_written': in_manifest_written, 'skipped_carried': in_manifest_carried,
          'index_line_bytes': line_bytes // max(1, written)}


def index_template(output: Optional[str]) -> dict:
  """A real index record of a run that wrote samples (its ids are replaced), or the fields the resume
  reads plus the per-sample blendshape names, the largest part of a real record."""
  path = output and os.path.join(output, 'index.jsonl')
  if path and os.path.exists(path):
    with open(path) as handle:
      first = handle.readline()
    if first.strip():
      return json.loads(first)
  from model_handlers.mediapipe_face import BLENDSHAPE_NAMES
  return {'num_frames': 30, 'fps': 25.0, 'duration': 1.2, 'url': 'simulated', 'start': 0.0, 'end': 1.2,
          'blendshape_names': list(BLENDSHAPE_NAMES)}


# ----------------------------------------------------------------------------- runs

def run_cli(name: str, manifest: str, output: str, extra: Tuple[str, ...] = (), keep_output: bool = False) -> dict:
  """`python -m beam_pipeline` as a user runs it: wall and CPU time, peak RSS, its stats.json."""
  if not keep_output:
    shutil.rmtree(output, ignore_errors=True)
  command = [sys.executable, '-m', 'beam_pipeline', f'--input={manifest}', f'--output={output}', '--no_report',
             '--no_progress', *extra]
  print(f'{name}: {" ".join(command[1:])}', flush=True)
  os.makedirs(os.path.dirname(output), exist_ok=True)
  log_path = output.rstrip('/') + '.log'
  before = load()
  began = time.monotonic()
  with open(log_path, 'w') as log:
    process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    sampler = TreeRss(process.pid)
    sampler.start()
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
  wall = time.monotonic() - began
  sampler.stop()
  tree_mb = sampler.peak_kb // 1024
  if process.returncode:
    with open(log_path) as log:
      raise SystemExit(f'{name} failed ({process.returncode}):\n{log.read()[-4000:]}')
  with open(os.path.join(output, 'stats.json')) as handle:
    stats = json.load(handle)
  result = {'wall_s': round(wall, 2), 'cpu_s': round(usage.ru_utime + usage.ru_stime, 2),
            'max_rss_mb': usage.ru_maxrss // 1024, 'tree_rss_mb': tree_mb, 'processes': sampler.largest_tree,
            'main_hwm_mb': sampler.main_peak_kb // 1024, 'largest_child_mb': sampler.child_peak_kb // 1024,
            'load': [before, load()], 'stats': {k: v for k, v in stats.items() if k != 'unbalanced_examples'}}
  print(f'{name}: {result["wall_s"]} s wall, {result["cpu_s"]} s CPU, peak RSS {result["max_rss_mb"]} MiB '
        f'(tree {tree_mb} MiB), load {before} -> {result["load"][1]}', flush=True)
  return result


def check(name: str, stats: dict, **expected) -> None:
  """The accounting of a run: balanced, and the counts this workload must give."""
  wrong = {key: (stats.get(key), value) for key, value in expected.items() if stats.get(key) != value}
  if not stats.get('balanced') or wrong:
    raise SystemExit(f'{name}: accounting is off: balanced={stats.get("balanced")}, (got, expected): {wrong}')


def graph_size(manifest: str, output: str, extra: Tuple[str, ...] = ()) -> dict:
  """Serialized size of the job graph `build_pipeline` makes for this input and output, and build time."""
  import apache_beam as beam
  from beam_pipeline.__main__ import prepare
  from beam_pipeline.pipeline import build_pipeline
  began = time.monotonic()
  options, opts = prepare([f'--input={manifest}', f'--output={output}', '--run_id=graph', *extra])
  pipeline = beam.Pipeline(options=options)
  build_pipeline(pipeline, opts)
  proto = pipeline.to_runner_api()
  return {'bytes': proto.ByteSize(), 'transforms': len(proto.components.transforms),
          'build_s': round(time.monotonic() - began, 2)}


def run_stages(name: str, manifest: str, output: str, extra: Tuple[str, ...] = (), keep_output: bool = False,
               top: int = 8) -> dict:
  """`bench/scale.py stages` in a subprocess: milliseconds per transform (Beam's execution-time metrics)."""
  if not keep_output:
    shutil.rmtree(output, ignore_errors=True)
  command = [sys.executable, os.path.abspath(__file__), 'stages', f'--input={manifest}', f'--output={output}',
             '--no_report', '--no_progress', *extra]
  print(f'{name} (stages): {" ".join(command[2:])}', flush=True)
  done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
  if done.returncode:
    raise SystemExit(f'{name} stages failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}')
  result = json.loads(done.stdout.strip().splitlines()[-1])
  result['top'] = result['top'][:top]
  return result


def stages_main(argv: List[str]) -> None:
  """One run of the job in this process on Beam's FnApiRunner (what the CLI runs), then one JSON line:
  wall time, and milliseconds and input elements per transform, largest first."""
  import apache_beam as beam
  from apache_beam.metrics import monitoring_infos
  from apache_beam.runners.portability.fn_api_runner import FnApiRunner
  from apache_beam.transforms import environments
  from beam_pipeline.__main__ import prepare
  from beam_pipeline.pipeline import build_pipeline
  options, opts = prepare(argv)
  pipeline = beam.Pipeline(options=options)
  build_pipeline(pipeline, opts)
  proto = pipeline.to_runner_api(default_environment=environments.EmbeddedPythonEnvironment.default())
  began = time.monotonic()
  result = FnApiRunner().run_via_runner_api(proto, options)
  wall = time.monotonic() - began
  msecs, elements = collections.Counter(), {}
  for info in result.monitoring_infos():
    if info.urn == monitoring_infos.TOTAL_MSECS_URN:
      msecs[info.labels['PTRANSFORM']] += monitoring_infos.extract_counter_value(info)
    elif info.urn == monitoring_infos.ELEMENT_COUNT_URN:
      elements[info.labels['PCOLLECTION']] = monitoring_infos.extract_counter_value(info)
  inputs = {t.unique_name: sum(elements.get(p, 0) for p in t.inputs.values())
            for t in proto.components.transforms.values()}
  top = [[name, ms, inputs.get(name, 0)] for name, ms in msecs.most_common()]
  print(json.dumps({'wall_s': round(wall, 2), 'total_ms': sum(msecs.values()), 'top': top}))


# ----------------------------------------------------------------------------- report

def per_row(small: dict, large: dict, rows_small: int, rows_large: int) -> dict:
  """Marginal cost of one more row between two runs, and the fixed cost this implies."""
  rows = rows_large - rows_small
  wall_us = (large['wall_s'] - small['wall_s']) / rows * 1e6
  return {'wall_us': round(wall_us, 1), 'cpu_us': round((large['cpu_s'] - small['cpu_s']) / rows * 1e6, 1),
          'rss_kb': round((large['max_rss_mb'] - small['max_rss_mb']) * 1024 / rows, 2),
          'fixed_wall_s': round(small['wall_s'] - wall_us * rows_small / 1e6, 1)}


def table(results: dict) -> str:
  rows = []

  def run_row(label: str, run: dict) -> None:
    rows.append((label, f'{run["wall_s"]} s wall, {run["cpu_s"]} s CPU, peak RSS {run["max_rss_mb"]} MiB '
                        f'(tree {run["tree_rss_mb"]} MiB), load {run["load"][0].split()[0]} -> '
                        f'{run["load"][1].split()[0]}'))

  for rows_count, run in sorted(results['missing'].items(), key=lambda item: int(item[0])):
    run_row(f'{int(rows_count):,} rows, all missing files', run)
  for slope in results.get('per_row', []):
    rows.append((f'per row, {slope["between"]}',
                 f'{slope["wall_us"]} us wall, {slope["cpu_us"]} us CPU, {slope["rss_kb"]} KiB peak RSS; '
                 f'fixed cost ~{slope["fixed_wall_s"]} s'))
  multi = results.get('multi_processing')
  if multi:
    run = multi['run']
    rows.append((f'{multi["rows"]:,} rows, multi_processing, 1 worker',
                 f'{run["wall_s"]} s wall, {run["cpu_s"]} s CPU; peak RSS: runner process {run["main_hwm_mb"]} MiB, '
                 f'SDK worker {run["largest_child_mb"]} MiB'))
  clip = results.get('with_clip')
  if clip:
    run_row(f'{clip["rows"]:,} rows, {clip["clips"]} of them the tiny clip', clip['run'])
    stats = clip['run']['stats']
    rows.append(('  written / rejected', f'{stats["written"]} / {stats["rejected"]} '
                                         f'(+{clip["extra_s_per_clip"]} s wall per rendered clip)'))
  resume = results.get('resume')
  if resume:
    fake = resume['output']
    rows.append(('resume: output faked', f'{fake["written"]:,} published ids in {fake["shards"]:,} shards '
                                         f'({fake["index_line_bytes"]} B/index line), {fake["carried"]:,} permanent '
                                         f'rejects'))
    run_row(f'resume: {resume["rows"]:,} rows --incremental', resume['run'])
    stats = resume['run']['stats']
    rows.append(('  skipped written / carried / tried',
                 f'{stats["already_written"]:,} / {stats["carried_rejects"]:,} / '
                 f'{stats["planned"] - stats["already_written"] - stats["carried_rejects"]:,}'))
  graph = results.get('graph')
  if graph:
    for label, size in graph.items():
      rows.append((f'job graph: {label}', f'{size["bytes"]:,} B, {size["transforms"]} transforms, '
                                          f'built in {size["build_s"]} s'))
  for name, stages in results.get('stages', {}).items():
    top = ', '.join(f'{t[0]} {t[1] / 1000:.1f} s' for t in stages['top'][:5])
    rows.append((f'slowest transforms, {name}', f'{top} (of {stages["total_ms"] / 1000:.1f} s in transforms)'))
  width = max(len(r[0]) for r in rows)
  text = [f'| {"measure".ljust(width)} | value |', f'| {"-" * width} | --- |']
  text += [f'| {a.ljust(width)} | {b} |' for a, b in rows]
  return '\n'.join(text)


def write_section(path: str, results: dict, findings: List[str]) -> None:
  """Replace (or append) the section under HEADING; the rest of the file is kept as it is."""
  m = results['machine']
  command = ' '.join(['python bench/scale.py', *results['argv']])
  body = [
      HEADING, '',
      f'Measured {results["date"]} by `{command}` on {m["cpu"]}, {m["cores"]} cores, shared with other jobs: load '
      f'average (1/5/15 min) at the start {m["load"]}, at the end {results["load_after"]}. Every run is '
      '`python -m beam_pipeline --input=M --output=O --no_report --no_progress` (FnApiRunner, in-memory: one '
      'process, unless marked multi_processing) as a subprocess. Peak RSS: `ru_maxrss` from `wait4` of that '
      'process (its own peak, or a waited child\'s if larger); "tree": the largest sum of VmRSS over the process '
      'and its children; in the multi_processing row, VmHWM of the runner process and of its SDK worker; all '
      f'sampled every {SAMPLE_EVERY_S} s. Wall time includes about 2 s of imports.', '',
      table(results), '', *findings, '',
      '```json', json.dumps(results, indent=2, sort_keys=True), '```', '']
  replace_section(path, body[0], body)


def findings_of(results: dict) -> List[str]:
  """Plain statements derived from the figures (no thresholds): what grows with what."""
  out = []
  slopes = results.get('per_row', [])
  if slopes:
    spans = '; '.join(f'{slope["between"]}: {slope["wall_us"]} us wall and {slope["rss_kb"]} KiB peak RSS'
                      for slope in slopes)
    out.append(f'- Each further planned clip costs ({spans}) on the in-memory runner, where one process holds '
               'the data of every stage; a per-row cost that stays flat between intervals means linear growth.')
  multi, fresh = results.get('multi_processing'), results.get('missing', {}).get(
      str(results.get('multi_processing', {}).get('rows')))
  if multi and fresh:
    out.append(f'- Where the memory is ({multi["rows"]:,} rows): with one SDK worker process, the runner process '
               f'peaks at {multi["run"]["main_hwm_mb"]} MiB and the worker at {multi["run"]["largest_child_mb"]} '
               f'MiB; in memory, one process holds both: {fresh["max_rss_mb"]} MiB.')
  resume, fresh = results.get('resume'), results.get('missing', {}).get(str(results.get('resume', {}).get('rows')))
  if resume and fresh:
    fake = resume['output']
    out.append(f'- Resume over {fake["written"]:,} published ids and {fake["carried"]:,} permanent rejects: '
               f'{resume["run"]["wall_s"]} s wall, {resume["run"]["cpu_s"]} s CPU, against {fresh["wall_s"]} s and '
               f'{fresh["cpu_s"]} s for the same manifest on an empty output; peak RSS {resume["run"]["max_rss_mb"]} '
               f'vs {fresh["max_rss_mb"]} MiB.')
  for name, stages in results.get('stages', {}).items():
    first, ms, inputs = stages['top'][0]
    per_element = f', {ms * 1000 / inputs:.0f} us per input element' if inputs else ''
    out.append(f'- {name}: the costliest transform is {first}, {100 * ms / max(1, stages["total_ms"]):.0f} % '
               f'of the time spent in transforms{per_element}.')
  graph, resume = results.get('graph'), results.get('resume')
  if graph and resume:
    sizes = [size['bytes'] for size in graph.values()]
    ids = resume['output']['written'] + resume['output']['carried']
    out.append(f'- Job graph: {min(sizes):,} to {max(sizes):,} B (spread {max(sizes) - min(sizes):,} B) over an '
               f'empty output, the resume output and a 1-row manifest; the {ids:,} ids of the resume output '
               f'would take {ids * len(clip_id(0)):,} B as bare strings.')
  return out


# ----------------------------------------------------------------------------- the input parse

PARSE_HEADING = '## Input parse'


def _write_json(value, path: str) -> None:
  with open(path, 'w') as handle:
    json.dump(value, handle)


def _read_sources_run(manifest, spec: str, split_bytes: int, out: str, workers: int = 0) -> dict:
  """ReadSources alone on the FnApiRunner (what the CLI runs locally), in memory or with `workers` SDK worker
  processes: counts of its outputs."""
  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions
  from apache_beam.runners.portability.fn_api_runner import FnApiRunner
  flags = [f'--direct_num_workers={workers}', '--direct_running_mode=multi_processing'] if workers else []
  pipeline = beam.Pipeline(runner=FnApiRunner(), options=PipelineOptions(flags))
  read = pipeline | 'ReadSources' >> manifest.ReadSources(spec, **({'split_bytes': split_bytes} if split_bytes else {}))
  counts = [read[name] | f'Count{name}' >> beam.combiners.Count.Globally()
            | f'Name{name}' >> beam.Map(lambda count, name=name: (name, count))
            for name in ('sources', 'rejects', 'planned')]
  _ = counts | 'Counts' >> beam.Flatten() | 'ToDict' >> beam.combiners.ToDict() | 'Write' >> beam.Map(_write_json, out)
  pipeline.run().wait_until_finish()
  with open(out) as handle:
    return json.load(handle)


def _parse_step_run(manifest, spec: str, split_bytes: int) -> dict:
  """The parse step's own work in this process, no runner, outputs dropped: what the workers that parse do.

  Before: the one `_ParseInput` element that parses the whole input. After: every slice, one after another
  (counted, then parsed), as as many workers would; the peak RSS is then that of the largest slice."""
  if hasattr(manifest, '_ParseInput'):
    began = time.monotonic()
    outputs = sum(1 for _ in manifest._ParseInput('auto', {}).process(spec))
    return {'outputs': outputs, 'slices': 1, 'largest_slice_s': round(time.monotonic() - began, 2)}
  from transforms.sources import rows
  split = split_bytes or rows.SPLIT_BYTES
  pieces = [piece for listed in manifest.list_pieces(spec) for piece in rows.split_file(listed, split)]
  began = time.monotonic()
  counted = [rows.count_slice(piece) for piece in pieces]
  count_s = time.monotonic() - began
  parse = manifest._PlanPieces({})
  parse.setup()
  outputs, largest = 0, 0.0
  for piece in rows.number_slices((0, counted)):
    began = time.monotonic()
    outputs += sum(1 for _ in parse.process(piece))
    largest = max(largest, time.monotonic() - began)
  return {'outputs': outputs, 'slices': len(pieces), 'count_s': round(count_s, 2), 'largest_slice_s': round(largest, 2)}


def parse_run(argv: List[str]) -> None:
  """One measured parse (a subprocess of `parse`): one JSON line. --tree picks the code measured, e.g. a git
  worktree of an older commit for "before"."""
  parser = argparse.ArgumentParser()
  parser.add_argument('--tree', required=True)
  parser.add_argument('--input', required=True)
  parser.add_argument('--mode', choices=('pipeline', 'step'), required=True)
  parser.add_argument('--workers', type=int, default=0, help='SDK worker processes (0: in memory).')
  parser.add_argument('--split_bytes', type=int, default=0)
  parser.add_argument('--out', required=True)
  args = parser.parse_args(argv)
  sys.path.insert(0, os.path.abspath(args.tree))
  import apache_beam  # noqa: F401  (imported before the clock starts, like the manifest module)
  import transforms.sources.manifest as manifest
  if not os.path.abspath(manifest.__file__).startswith(os.path.abspath(args.tree) + os.sep):
    raise SystemExit(f'{manifest.__file__} is not from {args.tree}')
  rss_mb = _status_kb(os.getpid(), 'VmRSS') // 1024
  began = time.monotonic()
  if args.mode == 'pipeline':
    result = {'counts': _read_sources_run(manifest, args.input, args.split_bytes, args.out, args.workers)}
  else:
    result = _parse_step_run(manifest, args.input, args.split_bytes)
  result.update(run_s=round(time.monotonic() - began, 2), rss_after_imports_mb=rss_mb)
  print(json.dumps(result))


def wait_for_quiet(threshold: float, max_wait_s: float) -> None:
  """Wait (at most `max_wait_s`) for the 1-minute load average to drop under `threshold`."""
  deadline = time.monotonic() + max_wait_s
  while os.getloadavg()[0] >= threshold and time.monotonic() < deadline:
    time.sleep(10)


def parse_once(name: str, tree: str, manifest: str, mode: str, split_bytes: int, out: str, workers: int = 0) -> dict:
  command = [sys.executable, os.path.abspath(__file__), 'parse-run', f'--tree={tree}', f'--input={manifest}',
             f'--mode={mode}', f'--split_bytes={split_bytes}', f'--out={out}', f'--workers={workers}']
  before = load()
  with subprocess.Popen(command, cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
    sampler = TreeRss(process.pid)
    sampler.start()
    stdout, stderr = process.communicate()
    sampler.stop()
  if process.returncode:
    raise SystemExit(f'{name} failed ({process.returncode}):\n{stderr[-4000:]}')
  result = json.loads(stdout.strip().splitlines()[-1])
  result.update(peak_rss_mb=max(sampler.main_peak_kb, sampler.peak_kb) // 1024, load=[before, load()])
  if workers:
    result.update(runner_peak_rss_mb=sampler.main_peak_kb // 1024, worker_peak_rss_mb=sampler.child_peak_kb // 1024)
  print(f'{name}: {result}', flush=True)
  return result


def parse_table(results: dict) -> str:
  rows = []
  for count, runs in sorted(results['runs'].items(), key=lambda item: int(item[0])):
    for label, run in runs.items():
      rate = int(count) / run['run_s']
      slices = f', {run["slices"]} slice(s), largest {run["largest_slice_s"]} s' if 'slices' in run else ''
      if 'worker_peak_rss_mb' in run:
        slices = f' (runner {run["runner_peak_rss_mb"]} MiB, largest worker {run["worker_peak_rss_mb"]} MiB)'
      rows.append((f'{int(count):,} rows, {label}',
                   f'{rate:,.0f} rows/s ({run["run_s"]} s), peak RSS {run["peak_rss_mb"]} MiB '
                   f'({run["rss_after_imports_mb"]} MiB after imports){slices}, load {run["load"][0].split()[0]} -> '
                   f'{run["load"][1].split()[0]}'))
  width = max(len(r[0]) for r in rows)
  text = [f'| {"measure".ljust(width)} | value |', f'| {"-" * width} | --- |']
  return '\n'.join(text + [f'| {a.ljust(width)} | {b} |' for a, b in rows])


def write_parse_section(path: str, results: dict) -> None:
  """Replace (or append) the PARSE_HEADING section; the rest of the file is kept as it is."""
  m = results['machine']
  body = [
      PARSE_HEADING, '',
      f'Measured {results["date"]} by `python bench/scale.py {" ".join(results["argv"])}` on {m["cpu"]}, '
      f'{m["cores"]} cores, shared with other jobs: load average (1/5/15 min) at the start {m["load"]}, at the end '
      f'{results["load_after"]}; each run waited up to {results["max_wait_s"]} s for a 1-minute load under '
      f'{results["quiet_load"]}. Manifests of `{{id, url}}` JSONL rows ({results["bytes_per_row"]} B/row), every id '
      'unique. "before" is a git worktree of the commit before the spread read, "after" this tree, the same '
      'Python and Beam, runs alternated. **ReadSources**: the transform alone on the in-memory FnApiRunner (one '
      'process, as the CLI runs locally: it holds every stage\'s elements and shuffles), its outputs counted; '
      'rows/s over the pipeline run, imports excluded. **parse step**: the parse\'s own work in one process '
      'without a runner, outputs dropped: before, the one element that parses the whole input; after, every '
      'slice counted and parsed one after another (on a cluster, each on any worker), so its peak RSS is the '
      f'largest slice\'s (split size {results["split_bytes"] // MIB} MiB). Peak RSS: VmHWM of the process, '
      f'sampled every {SAMPLE_EVERY_S} s.', '',
      parse_table(results), '', *results.get('findings', []), '',
      '```json', json.dumps(results, indent=2, sort_keys=True), '```', '']
  replace_section(path, body[0], body)


def parse_main(argv: List[str]) -> dict:
  """`parse`: the input parse for each --rows, before (--before, a worktree of an older commit) and after."""
  parser = argparse.ArgumentParser(prog='bench/scale.py parse')
  parser.add_argument('--rows', type=int, nargs='+', default=[100000, 1000000])
  parser.add_argument('--before', default='', help='A git worktree of the commit to compare with.')
  parser.add_argument('--split_mb', type=float, default=0, help='Slice size (default: the code\'s own).')
  parser.add_argument('--modes', nargs='+', default=['step', 'pipeline'], choices=('step', 'pipeline'))
  parser.add_argument('--workers', type=int, default=0,
                      help='Also run ReadSources with this many SDK worker processes (multi_processing).')
  parser.add_argument('--quiet_load', type=float, default=1.0)
  parser.add_argument('--max_wait_s', type=float, default=300)
  parser.add_argument('--work', default=os.path.join(REPO, 'bench', 'work', 'parse'))
  parser.add_argument('--results', default=os.path.join(REPO, 'bench', 'results.md'))
  args = parser.parse_args(argv)
  sys.path.insert(0, REPO)
  from transforms.sources.rows import SPLIT_BYTES
  split_bytes = int(args.split_mb * MIB) or SPLIT_BYTES
  work = os.path.abspath(args.work)
  os.makedirs(work, exist_ok=True)
  trees = ([('before', os.path.abspath(args.before))] if args.before else []) + [('after', REPO)]
  results = {'date': time.strftime('%Y-%m-%d %H:%M %Z'), 'argv': ['parse', *argv], 'machine': machine(),
             'split_bytes': split_bytes, 'quiet_load': args.quiet_load, 'max_wait_s': args.max_wait_s, 'runs': {}}
  for rows in args.rows:
    manifest = os.path.join(work, f'parse-{rows}.jsonl')
    write_manifest(manifest, rows, os.path.join(work, 'missing'))
    results['bytes_per_row'] = os.path.getsize(manifest) // rows
    runs = results['runs'][str(rows)] = {}
    modes = [(mode, 0) for mode in args.modes] + ([('pipeline', args.workers)] if args.workers else [])
    for mode, workers in modes:
      for label, tree in trees:
        name = f'{label}, {"ReadSources" if mode == "pipeline" else "parse step"}'
        name += f', {workers} worker processes' if workers else ''
        wait_for_quiet(args.quiet_load, args.max_wait_s)
        run = parse_once(f'{rows} rows, {name}', tree, manifest, mode, split_bytes if label == 'after' else 0,
                         os.path.join(work, 'counts.json'), workers)
        if mode == 'pipeline' and run['counts'] != {'sources': rows, 'rejects': 0, 'planned': rows}:
          raise SystemExit(f'{name}: wrong counts {run["counts"]} for {rows} rows')
        runs[name] = run
  results['load_after'] = load()
  results['findings'] = parse_findings(results)
  print(parse_table(results))
  if args.results:
    write_parse_section(args.results, results)
    print(f'wrote the "{PARSE_HEADING[3:]}" section of {args.results}')
  return results


def parse_findings(results: dict) -> List[str]:
  """Plain ratios, after against before, from the figures."""
  out = []
  for count, runs in sorted(results['runs'].items(), key=lambda item: int(item[0])):
    for what in sorted({name.split(', ', 1)[1] for name in runs}, key=len):
      before, after = runs.get(f'before, {what}'), runs.get(f'after, {what}')
      if not (before and after):
        continue
      over = [run['peak_rss_mb'] - run['rss_after_imports_mb'] for run in (after, before)]
      over = '' if 'worker_peak_rss_mb' in after else f' ({over[0]} vs {over[1]} MiB over the imports)'
      out.append(f'- {int(count):,} rows, {what}: after runs at {before["run_s"] / after["run_s"]:.2f}x the rows/s of '
                 f'before; peak RSS {after["peak_rss_mb"]} vs {before["peak_rss_mb"]} MiB{over}.')
      if what == 'parse step' and after.get('slices', 1) > 1:
        out.append(f'- {int(count):,} rows: the parse\'s largest piece of work is one slice of {after["slices"]} '
                   f'({after["largest_slice_s"]} s, after counting all slices in {after["count_s"]} s) against the '
                   f'whole file ({before["run_s"]} s) before; with a worker per slice the parse takes about the '
                   'largest slice\'s time, and no worker holds more than a slice.')
  out.append('- ReadSources in one process (or two local worker processes) pays for what spreads it: the shuffles '
             'around the parse and the one keyed by clip id that settles duplicates (every clip goes through it; '
             'sources of several clips, none here, also meet a join), where the one-element parse kept a set in '
             'memory. The local runner holds every shuffled element in its own process, hence the larger peak there; '
             'on a cluster those shuffles are spread over workers too.')
  return out


# ----------------------------------------------------------------------------- main

def main(argv: Optional[List[str]] = None) -> dict:
  argv = sys.argv[1:] if argv is None else argv
  if argv[:1] == ['stages']:
    stages_main(argv[1:])
    return {}
  if argv[:1] == ['parse']:
    return parse_main(argv[1:])
  if argv[:1] == ['parse-run']:
    parse_run(argv[1:])
    return {}
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--rows', type=int, nargs='+', default=[10000, 30000, 100000],
                      help='Manifest lengths of the all-missing runs; the largest is also used below.')
  parser.add_argument('--clip_fraction', type=float, default=0.001,
                      help='Share of the largest manifest\'s rows that point at the tiny clip (0: no such run).')
  parser.add_argument('--written', type=int, default=None, help='Published ids in the faked output '
                                                                '(default: the largest row count).')
  parser.add_argument('--carried', type=int, default=None, help='Permanent rejects in the faked output\'s '
                                                                'rejects.jsonl (default: the largest row count).')
  parser.add_argument('--shard_size', type=int, default=100, help='Samples per faked shard.')
  parser.add_argument('--no_resume', action='store_true', help='Skip the resume run and the graph sizes.')
  parser.add_argument('--no_multi_processing', action='store_true',
                      help='Skip the run of the largest manifest with one SDK worker process.')
  parser.add_argument('--no_stages', action='store_true', help='Skip the per-transform timing runs.')
  parser.add_argument('--work', default=os.path.join(REPO, 'bench', 'work', 'scale'), help='Scratch folder.')
  parser.add_argument('--results', default=os.path.join(REPO, 'bench', 'results.md'),
                      help='Where the section goes (empty: print only).')
  args = parser.parse_args(argv)
  models = os.path.join(os.path.dirname(REPO), 'shared', 'models')
  if not os.environ.get('BEAM_PIPELINE_MODEL_DIR') and os.path.isdir(models):
    os.environ['BEAM_PIPELINE_MODEL_DIR'] = models
  work = os.path.abspath(args.work)
  os.makedirs(work, exist_ok=True)
  missing_dir = os.path.join(work, 'missing')  # never created: every url in it is missing
  largest = max(args.rows)
  results = {'date': time.strftime('%Y-%m-%d %H:%M %Z'), 'argv': argv, 'machine': machine(),
             'missing': {}, 'stages': {}}

  manifests = {}
  for rows in sorted(set(args.rows)):
    manifests[rows] = os.path.join(work, f'missing-{rows}.jsonl')
    write_manifest(manifests[rows], rows, missing_dir)
    run = run_cli(f'missing {rows}', manifests[rows], os.path.join(work, f'out-missing-{rows}'))
    check(f'missing {rows}', run['stats'], planned=rows, rejected=rows, written=0)
    results['missing'][str(rows)] = run
  counts = sorted(manifests)
  results['per_row'] = [dict(per_row(results['missing'][str(small)], results['missing'][str(large)], small, large),
                             between=f'{small:,} -> {large:,} rows') for small, large in zip(counts, counts[1:])]
  if not args.no_multi_processing:
    flags = ('--direct_running_mode=multi_processing', '--direct_num_workers=1')
    run = run_cli(f'missing {largest}, multi_processing', manifests[largest],
                  os.path.join(work, f'out-missing-{largest}-mp'), flags)
    check(f'missing {largest}, multi_processing', run['stats'], planned=largest, rejected=largest, written=0)
    results['multi_processing'] = {'rows': largest, 'flags': ' '.join(flags), 'run': run}
  if not args.no_stages:
    results['stages'][f'{largest:,} missing'] = run_stages('missing', manifests[largest],
                                                           os.path.join(work, 'stages-missing'))

  template_from = None
  if args.clip_fraction > 0:
    every = max(1, round(1 / args.clip_fraction))
    clips = -(-largest // every)
    manifest = os.path.join(work, f'clip-{largest}.jsonl')
    write_manifest(manifest, largest, missing_dir, tiny_clip(os.path.join(work, 'tiny.mp4')), every)
    output = os.path.join(work, f'out-clip-{largest}')
    run = run_cli(f'clip {largest}', manifest, output)
    check(f'clip {largest}', run['stats'], planned=largest)
    extra = (run['wall_s'] - results['missing'][str(largest)]['wall_s']) / clips
    results['with_clip'] = {'rows': largest, 'clips': clips, 'run': run, 'extra_s_per_clip': round(extra, 2)}
    template_from = output

  if not args.no_resume:
    written = largest if args.written is None else args.written
    carried = largest if args.carried is None else args.carried
    output = os.path.join(work, 'resume', 'out')  # 'resume' and 'empty0': graphs compared at equal path length
    shutil.rmtree(os.path.dirname(output), ignore_errors=True)
    fake = fake_output(output, largest, written, carried, args.shard_size, index_template(template_from),
                       planned_inputs_of(missing_dir))
    empty = os.path.join(work, 'empty0', 'out')
    shutil.rmtree(os.path.dirname(empty), ignore_errors=True)
    one_row = os.path.join(work, 'one-row.jsonl')
    write_manifest(one_row, 1, missing_dir)
    results['graph'] = {
        f'empty output, {largest:,} rows': graph_size(manifests[largest], empty),
        'empty output, 1 row': graph_size(one_row, empty),
        f'{written:,} written ids, {largest:,} rows': graph_size(manifests[largest], output),
        'empty output, --incremental': graph_size(manifests[largest], empty, ('--incremental',)),
        f'{written:,} written + {carried:,} rejects, --incremental': graph_size(manifests[largest], output,
                                                                              ('--incremental',)),
    }
    shutil.rmtree(os.path.dirname(empty), ignore_errors=True)
    saved = os.path.join(work, 'resume', 'saved')  # the faked output again for the stages run
    if not args.no_stages:
      shutil.copytree(output, saved)
    run = run_cli(f'resume {largest}', manifests[largest], output, ('--incremental',), keep_output=True)
    check(f'resume {largest}', run['stats'], planned=largest, already_written=fake['skipped_written'],
          carried_rejects=fake['skipped_carried'], written=fake['skipped_written'],
          rejected=largest - fake['skipped_written'])
    results['resume'] = {'rows': largest, 'output': fake, 'run': run}
    if not args.no_stages:
      results['stages'][f'resume {largest:,}'] = run_stages('resume', manifests[largest], saved, ('--incremental',),
                                                            keep_output=True)
      shutil.rmtree(saved)
  results['load_after'] = load()
  print(table(results))
  if args.results:
    write_section(args.results, results, findings_of(results))
    print(f'wrote the "{HEADING[3:]}" section of {args.results}')
  return results


if __name__ == '__main__':
  main()
