"""What holds the GIL: why N worker threads do not give N times the frames.

  python bench/gil.py [--sources 4] [--duration 30] [--rate 50]

Runs the `bench/run.py` workload (hdtf, cached sources) with `py-spy record --gil` attached (pip install py-spy),
once with 1 worker and once with `--workers` threads. py-spy samples `--rate` times a second and keeps a
sample only where a thread holds the GIL, so the samples over rate x wall are the share of the run's wall time
the GIL was held: with threads that share cannot overlap, and 1 / share bounds what threads can reach. The
functions that hold it most are listed (the innermost frame, and the first frame of this project's code).
Rewrites its section "## What holds the GIL" of bench/results.md.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'bench'))
sys.path.insert(0, REPO)

import run as bench_run  # noqa: E402

HEADING = '## What holds the GIL'
OURS = ('beam_pipeline/', 'transforms/', 'model_handlers/')  # py-spy names this project's files from its root


def profile(annotations: str, work: str, name: str, flags: List[str], rate: int) -> dict:
  """One pipeline run under py-spy: wall, CPU, and the GIL-holding samples by frame."""
  out = os.path.join(work, 'runs', name)
  shutil.rmtree(out, ignore_errors=True)
  os.makedirs(out)
  raw = os.path.join(out, 'gil.txt')
  command = [sys.executable, '-m', 'beam_pipeline', f'--input={annotations}', f'--output={out}/out',
             f'--work_dir={out}/work', '--no_progress', '--no_report', *flags]
  print(f'{name}: {" ".join(command[1:])}', flush=True)
  load = bench_run._load()  # pylint: disable=protected-access
  began = time.monotonic()
  pipeline = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  spy = subprocess.Popen([shutil.which('py-spy'), 'record', '--gil', '--nonblocking', '--rate', str(rate),
                          '--format', 'raw', '--output', raw, '--pid', str(pipeline.pid)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  errors = pipeline.stderr.read()
  _, status, usage = os.wait4(pipeline.pid, 0)
  wall = time.monotonic() - began
  spy.wait(60)
  if status:
    raise SystemExit(f'{name} failed:\n{errors[-3000:].decode(errors="replace")}')
  leaves, ours, held = collections.Counter(), collections.Counter(), 0
  with open(raw) as handle:
    for line in handle:
      stack, _, count = line.rstrip('\n').rpartition(' ')
      frames, count = stack.split(';'), int(count)
      held += count
      leaves[frames[-1]] += count
      own = next((f for f in reversed(frames) if f.rpartition(' (')[2].startswith(OURS)), '(outside this project)')
      ours[own] += count
  return {'wall_s': wall, 'cpu_s': usage.ru_utime + usage.ru_stime, 'gil_samples': held, 'rate': rate,
          'gil_share': held / (rate * wall), 'load': (load, bench_run._load()),  # pylint: disable=protected-access
          'top_leaves': leaves.most_common(12), 'top_ours': ours.most_common(12)}


def _short(frame: str) -> str:
  return frame.replace(REPO + '/', '').replace(sys.prefix + '/', '')


def section(results: Dict[str, dict], argv: str) -> List[str]:
  lines = [HEADING, '', f'Measured {time.strftime("%Y-%m-%d %H:%M %Z")} by `python bench/gil.py {argv}` on '
           f'{bench_run.machine()["cpu"]}, {os.cpu_count()} cores. py-spy {results["py_spy"]} samples '
           'non-blocking; a sample counts where a thread holds the GIL. GIL share: held samples / (rate x wall).',
           '', '| run | wall | CPU (cores busy) | GIL held | bound for threads (1 / GIL share) | load |',
           '| --- | --- | --- | --- | --- | --- |']
  for name, r in results['runs'].items():
    lines.append(f'| {name} | {r["wall_s"]:.1f} s | {r["cpu_s"]:.1f} s ({r["cpu_s"] / r["wall_s"]:.2f}) | '
                 f'{100 * r["gil_share"]:.0f} % of wall | {1 / max(r["gil_share"], 1e-9):.2f}x | '
                 '{} -> {} |'.format(*r['load']))
  for name, r in results['runs'].items():
    total = max(r['gil_samples'], 1)
    lines += ['', f'{name}: where the GIL is held (share of held samples)', '',
              '| innermost frame | share | | first frame of this project | share |', '| --- | --- | --- | --- | --- |']
    for (leaf, a), (own, b) in zip(r['top_leaves'], r['top_ours']):
      lines.append(f'| `{_short(leaf)}` | {100 * a / total:.1f} % | | `{_short(own)}` | {100 * b / total:.1f} % |')
  one = results['runs'].get('1 worker, in_memory')
  if one:
    busy = one['cpu_s'] / one['wall_s']
    lines += ['', f'1 worker already keeps {busy:.2f} cores busy (the landmarker\'s, the codecs\' and x264\'s own '
              f'threads): on {os.cpu_count()} cores, N workers can be at most {os.cpu_count() / busy:.2f}x faster '
              'than 1, whatever holds the GIL.']
  lines += ['', '```json', json.dumps(results, indent=1, sort_keys=True), '```', '']
  return lines


def main(argv: Optional[List[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--sources', type=int, default=4, help='How many sources (alternating 720p and 1080p).')
  parser.add_argument('--duration', type=float, default=30.0, help='Source length in seconds.')
  parser.add_argument('--workers', type=int, default=2, help='Threads of the threaded run.')
  parser.add_argument('--rate', type=int, default=50, help='py-spy samples per second.')
  parser.add_argument('--work', default=os.path.join(REPO, 'bench', 'work'), help='Cache of sources and runs.')
  parser.add_argument('--results', default=os.path.join(REPO, 'bench', 'results.md'), help='Where to write.')
  args = parser.parse_args(argv)
  if not shutil.which('py-spy'):
    raise SystemExit('py-spy is not installed: pip install py-spy')
  models = os.path.join(os.path.dirname(REPO), 'shared', 'models')
  if not os.environ.get('BEAM_PIPELINE_MODEL_DIR') and os.path.isdir(models):
    os.environ['BEAM_PIPELINE_MODEL_DIR'] = models
  annotations, _ = bench_run.make_workload(args.work, args.sources, args.duration)
  version = subprocess.run([shutil.which('py-spy'), '--version'], capture_output=True, text=True, check=True)
  results = {'py_spy': version.stdout.split()[-1], 'runs': {}}
  for name, flags in (('1 worker, in_memory', ['--direct_num_workers=1']),
                      (f'{args.workers} workers, multi_threading',
                       [f'--direct_num_workers={args.workers}', '--direct_running_mode=multi_threading'])):
    results['runs'][name] = profile(annotations, args.work, name.replace(' ', '_').replace(',', ''), flags,
                                    args.rate)
  lines = section(results, ' '.join(argv if argv is not None else sys.argv[1:]))
  print('\n'.join(lines[:-4]))
  bench_run.replace_section(args.results, HEADING, lines)
  print(f'wrote {args.results}')


if __name__ == '__main__':
  main()
