"""What an interrupted local run keeps: a run killed part-way, then rerun into the same output, against a fresh run.

  python bench/resume.py [--sources 2 --duration 40 --clips 4 --size 256 --kill_at 0.6]

A script, not a test (tests/test_rerun.py checks that a rerun after Ctrl-C reuses the clips and ends with the same
samples; this measures what it saves). It prints a table and writes a "Resume after a kill" section into
bench/results.md, keeping the rest of the file. Sources are generated under bench/work/resume/ (once).
- fresh: the CLI from scratch into an empty output, wall time from process start to exit;
- killed: the same job into another empty output, sent Ctrl-C (SIGINT) at `--kill_at` x the fresh run's time;
- rerun: the same command into the killed run's output, to the end: the figure to compare with fresh.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from typing import List

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench.run import crop_window, machine, replace_section, source_spec  # noqa: E402
from beam_pipeline.demo import write_video  # noqa: E402

HEADING = '## Resume after a kill'


def workload(root: str, sources: int, duration: float, clips: int) -> str:
  """`sources` generated talking videos (bench/run.py's), each planned as `clips` clips of equal length with a
  fixed crop window (as HDTF's crop_wh gives), in a JSONL manifest."""
  os.makedirs(root, exist_ok=True)
  rows = []
  for index in range(sources):
    path = os.path.join(root, f'talk{index}_{duration:g}s.mp4')
    spec = source_spec(index, duration)
    if not os.path.exists(path):
      write_video(path, spec)
    step = duration / clips
    ranges = [[round(n * step + 0.1, 2), round((n + 1) * step - 0.1, 2)] for n in range(clips)]
    rows.append({'id': f'talk{index}', 'url': path, 'clips': ranges, 'crop': list(crop_window(spec))})
  manifest = os.path.join(root, 'manifest.jsonl')
  with open(manifest, 'w') as handle:
    handle.writelines(json.dumps(row) + '\n' for row in rows)
  return manifest


# The CLI with Ctrl-C raising KeyboardInterrupt even where this process ignores SIGINT (it is inherited); set in the
# child's Python, not in a preexec_fn, which can deadlock a fork from a process with threads.
INTERRUPTIBLE_CLI = [sys.executable, '-c', 'import runpy, signal; '
                     'signal.signal(signal.SIGINT, signal.default_int_handler); '
                     'runpy.run_module("beam_pipeline", run_name="__main__", alter_sys=True)']


def command(manifest: str, output: str, extra: List[str]) -> List[str]:
  return [*INTERRUPTIBLE_CLI, f'--input={manifest}', f'--output={output}', '--no_progress',
          '--no_report', *extra]


def timed(args: List[str], kill_after: float = 0.0) -> dict:
  """Run the CLI; with `kill_after`, send it SIGINT after that many seconds."""
  start = time.monotonic()
  process = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  if kill_after:
    try:
      process.wait(timeout=kill_after)
    except subprocess.TimeoutExpired:
      process.send_signal(signal.SIGINT)
  out, err = process.communicate()
  return {'wall_s': round(time.monotonic() - start, 2), 'rc': process.returncode, 'stdout': out[-2000:],
          'stderr': err[-2000:]}


def samples(output: str) -> List[str]:
  with open(os.path.join(output, 'index.jsonl')) as handle:
    return sorted(json.loads(line)['id'] for line in handle if line.strip())


def work_files(output: str) -> int:
  folder = os.path.join(output, '_work', 'samples')
  return sum(1 for name in os.listdir(folder) if name.endswith('.ref.json')) if os.path.isdir(folder) else 0


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sources', type=int, default=2)
  parser.add_argument('--duration', type=float, default=40.0)
  parser.add_argument('--clips', type=int, default=4, help='clips per source')
  parser.add_argument('--size', type=int, default=256)
  parser.add_argument('--kill_at', type=float, default=0.6, help='fraction of the fresh run\'s wall time')
  parser.add_argument('--no_write', action='store_true', help='print only; leave results.md alone')
  args = parser.parse_args()
  root = os.path.join(REPO, 'bench', 'work', 'resume')
  manifest = workload(os.path.join(root, 'sources'), args.sources, args.duration, args.clips)
  extra = [f'--size={args.size}']
  load_before = machine()['load']
  runs = {}
  for name in ('fresh', 'killed'):
    shutil.rmtree(os.path.join(root, name), ignore_errors=True)
  runs['fresh'] = timed(command(manifest, os.path.join(root, 'fresh'), extra))
  assert runs['fresh']['rc'] == 0, runs['fresh']['stderr']
  killed = os.path.join(root, 'killed')
  runs['killed'] = timed(command(manifest, killed, extra), kill_after=args.kill_at * runs['fresh']['wall_s'])
  runs['killed']['fragments_left'] = work_files(killed)
  runs['rerun'] = timed(command(manifest, killed, extra))
  assert runs['rerun']['rc'] == 0, runs['rerun']['stderr']
  same = samples(os.path.join(root, 'fresh')) == samples(killed)
  ratio = runs['rerun']['wall_s'] / runs['fresh']['wall_s']
  rows = [('fresh run', runs['fresh']['wall_s'], ''),
          (f'killed (Ctrl-C at {args.kill_at:.0%})', runs['killed']['wall_s'],
           f'exit {runs["killed"]["rc"]}, {runs["killed"]["fragments_left"]} rendered clips kept in the work dir'),
          ('rerun to the end', runs['rerun']['wall_s'], f'{ratio:.2f} x fresh; same samples as fresh: {same}')]
  lines = [f'{args.sources} sources of {args.duration:.0f} s (bench/run.py\'s, 720p and 1080p), {args.clips} clips '
           f'each with a fixed crop, --size={args.size}, '
           f'the CLI\'s local runner. {datetime.date.today()}, {machine()["cpu"]}, {machine()["cores"]} cores, '
           f'load {load_before} before, {machine()["load"]} after.', '',
           '| run | wall s | |', '| --- | ---: | --- |']
  lines += [f'| {name} | {wall:.1f} | {note} |' for name, wall, note in rows]
  raw = {name: {k: v for k, v in run.items() if k not in ('stdout', 'stderr')} for name, run in runs.items()}
  lines += ['', '```json', json.dumps(raw, sort_keys=True), '```']
  print('\n'.join(lines))
  if not args.no_write:
    replace_section(os.path.join(REPO, 'bench', 'results.md'), HEADING, [HEADING, ''] + lines)


if __name__ == '__main__':
  main()
