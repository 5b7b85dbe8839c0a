"""What each recipe costs on top of the spine: every recipe's CLI on the same generated sources.

  python bench/recipes.py [--sources 2] [--duration 20] [--runs 3] [--before DIR] [--work bench/work/recipes]

A script, not a test: it prints a table and replaces the "## Recipes" section of bench/results.md. Each recipe
runs with its defaults and offline models (no user weights: those need a GPU machine to be worth timing);
`hdtf` is the spine alone, so `recipe / hdtf` is the price of the recipe's extra per-frame work and writer.
Measured: the CPU time of each CLI process and its children (user + system, which the shared cores do not
inflate as they do the wall time), the median of `--runs`; `--before DIR` (a copy of an older tree) runs that
tree's CLI too, alternating with this one's, for a before/after table. bench/recipe_frames.py times the parts.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from beam_pipeline.demo import VideoSpec, write_video  # noqa: E402
from bench.run import _load, machine, replace_section  # noqa: E402

RECIPES = ('hdtf', 'nerf', 'avatar', 'megactor', 'mmvox')
SECTION = '## Recipes'


def make_sources(root: str, sources: int, duration: float) -> str:
  """1080p talking clips (a face large enough for mmvox's 256 px tubes), with little head motion (HRAvatar's
  first-frame box must keep holding the face) and eyes that look around (MegActor's eye-motion filter, on by
  default, keeps only such clips), and a manifest of one whole-video clip each."""
  os.makedirs(root, exist_ok=True)
  lines = []
  for index in range(sources):
    path = os.path.join(root, f'talk{index}.mp4')
    if not os.path.exists(path):
      write_video(path, VideoSpec(duration=duration, fps=25.0, width=1920, height=1080, face_scale=2.5,
                                  motion_px=8.0, gaze_deg=25.0, seed=index))
    lines.append(json.dumps({'id': f'talk{index}', 'url': path}))
  manifest = os.path.join(root, 'sources.jsonl')
  with open(manifest, 'w') as out:
    out.write('\n'.join(lines) + '\n')
  return manifest


def run_recipe(recipe: str, manifest: str, root: str, tree: str = REPO) -> dict:
  """One CLI run of `recipe` with `tree`'s code, into a fresh output."""
  output = os.path.join(root, f'out_{recipe}')
  shutil.rmtree(output, ignore_errors=True)
  argv = [sys.executable, '-m', 'beam_pipeline', f'--input={manifest}', f'--output={output}',
          f'--recipe={recipe}', '--no_progress', '--no_report']
  before = _load()
  started, cpu_before = time.monotonic(), _children_cpu()
  done = subprocess.run(argv, cwd=tree, capture_output=True, text=True)
  wall, cpu = time.monotonic() - started, _children_cpu() - cpu_before
  if done.returncode:
    raise SystemExit(f'{recipe} failed:\n{done.stderr[-3000:]}')
  with open(os.path.join(output, 'stats.json')) as handle:
    stats = json.load(handle)
  frames = 0
  with open(os.path.join(output, 'index.jsonl')) as handle:
    for line in handle:
      frames += json.loads(line).get('num_frames', 0)
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(output) for f in files)
  return {'wall_s': wall, 'cpu_s': cpu, 'frames': frames, 'written': stats['written'], 'rejected': stats['rejected'],
          'output_mib': size / 2 ** 20, 'load': [before, _load()]}


def _children_cpu() -> float:
  """User + system CPU seconds of the finished children (and theirs): the figure the shared cores do not inflate."""
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def median_run(runs: List[dict]) -> dict:
  """The run of median CPU time, with every run's CPU and wall seconds (the spread)."""
  chosen = sorted(runs, key=lambda r: r['cpu_s'])[len(runs) // 2]
  return dict(chosen, cpu_runs_s=[round(r['cpu_s'], 2) for r in runs],
              wall_runs_s=[round(r['wall_s'], 1) for r in runs],
              cpu_median_s=statistics.median(r['cpu_s'] for r in runs))


def cpu_ms(r: dict) -> float:
  return 1000 * r['cpu_median_s'] / max(r['frames'], 1)


def table(trees: Dict[str, Dict[str, dict]]) -> str:
  """One row per recipe: per tree, CPU ms per output frame (median, every run) and against hdtf's; the last tree's
  wall, frames and output."""
  names = list(trees)
  last = trees[names[-1]]
  head = '| recipe | clips written | output frames | ' + ' | '.join(
      f'{name}: CPU ms/frame (runs) | {name}: vs hdtf' for name in names) + (
      ' | after / before' if len(names) == 2 else '') + ' | wall (runs) | output | load before -> after |'
  rows = [head, '|' + ' --- |' * (head.count('|') - 1)]
  for recipe, r in last.items():
    cells = []
    for name in names:
      mine = trees[name][recipe]
      spread = ', '.join(f'{1000 * c / max(mine["frames"], 1):.0f}' for c in mine['cpu_runs_s'])
      cells.append(f'{cpu_ms(mine):.1f} ({spread}) | {cpu_ms(mine) / cpu_ms(trees[name]["hdtf"]):.2f}x')
    ratio = f' | {cpu_ms(r) / cpu_ms(trees[names[0]][recipe]):.2f}x' if len(names) == 2 else ''
    rows.append(f"| `{recipe}` | {r['written']} | {r['frames']} | " + ' | '.join(cells) + ratio +
                f" | {', '.join(f'{w:.0f}' for w in r['wall_runs_s'])} s | {r['output_mib']:.0f} MiB | "
                f"{r['load'][0]:.1f} -> {r['load'][1]:.1f} |")
  return '\n'.join(rows)


def main(argv: Optional[List[str]] = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sources', type=int, default=2)
  parser.add_argument('--duration', type=float, default=20.0)
  parser.add_argument('--work', default=os.path.join(REPO, 'bench', 'work', 'recipes'))
  parser.add_argument('--recipes', default=','.join(RECIPES))
  parser.add_argument('--runs', type=int, default=3, help='CLI runs of each recipe (and tree): the median')
  parser.add_argument('--before', default='', help='a copy of an older tree to run too, alternating with this one')
  args = parser.parse_args(argv)
  manifest = make_sources(os.path.join(args.work, 'sources'), args.sources, args.duration)
  trees = [('before', os.path.abspath(args.before)), ('after', REPO)] if args.before else [('ours', REPO)]
  recipes = ['hdtf'] + [r for r in args.recipes.split(',') if r != 'hdtf']
  runs: Dict[str, Dict[str, List[dict]]] = {name: {recipe: [] for recipe in recipes} for name, _ in trees}
  for _ in range(args.runs):
    for recipe in recipes:
      for name, tree in trees:
        result = run_recipe(recipe, manifest, args.work, tree)
        runs[name][recipe].append(result)
        print(name, recipe, json.dumps(result), flush=True)
  results = {name: {recipe: median_run(rs) for recipe, rs in by_recipe.items()} for name, by_recipe in runs.items()}
  info = machine()
  text = (f'{SECTION}\n\nMeasured {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())} by `python bench/recipes.py '
          f'{" ".join(argv if argv is not None else sys.argv[1:])}` on {info["cpu"]}, {info["cores"]} cores: '
          f'{args.sources} generated 1080p sources of {args.duration:.0f} s (25 fps, one whole-video clip each), every '
          'recipe with its defaults and offline models, one CLI process each (its local runner; the wall includes '
          'about 4 s of start-up). CPU: user + system seconds of the process and its children, median of '
          f'{args.runs} runs'
          + (' of each tree, alternating ("before": the tree given by --before)' if args.before else '')
          + '; per output frame (megactor writes 30 fps: 1.2x the frames).\n\n' + table(results) + '\n\n```json\n'
          + json.dumps({name: {recipe: runs_ for recipe, runs_ in by.items()} for name, by in runs.items()},
                       sort_keys=True) + '\n```\n')
  print(text)
  replace_section(os.path.join(REPO, 'bench', 'results.md'), SECTION, text.split('\n'))
  return results


if __name__ == '__main__':
  main()
