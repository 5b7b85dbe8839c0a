"""What each recipe costs on top of the spine: every recipe's CLI on the same generated sources.

  python bench/recipes.py [--sources 2] [--duration 20] [--work bench/work/recipes]

A script, not a test: it prints a table and replaces the "## Recipes" section of bench/results.md. Each recipe
runs with its defaults and offline models (no user weights: those need a GPU machine to be worth timing);
`hdtf` is the spine alone, so `recipe / hdtf` is the price of the recipe's extra per-frame work and writer.
Figures from one run on a shared machine are noisy: the load average is recorded with each.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from beam_pipeline.demo import VideoSpec, write_video  # noqa: E402
from bench.run import _load, machine  # noqa: E402

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


def run_recipe(recipe: str, manifest: str, root: str) -> dict:
  output = os.path.join(root, f'out_{recipe}')
  shutil.rmtree(output, ignore_errors=True)
  argv = [sys.executable, '-m', 'beam_pipeline', f'--input={manifest}', f'--output={output}',
          f'--recipe={recipe}', '--no_progress', '--no_report']
  before = _load()
  started = time.monotonic()
  done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
  wall = time.monotonic() - started
  if done.returncode:
    raise SystemExit(f'{recipe} failed:\n{done.stderr[-3000:]}')
  with open(os.path.join(output, 'stats.json')) as handle:
    stats = json.load(handle)
  frames = 0
  with open(os.path.join(output, 'index.jsonl')) as handle:
    for line in handle:
      frames += json.loads(line).get('num_frames', 0)
  size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(output) for f in files)
  return {'wall_s': wall, 'frames': frames, 'written': stats['written'], 'rejected': stats['rejected'],
          'output_mib': size / 2 ** 20, 'load': [before, _load()]}


def table(results: Dict[str, dict]) -> str:
  base = results['hdtf']['wall_s'] / max(results['hdtf']['frames'], 1)
  rows = ['| recipe | clips written | output frames | wall | frames/s | s per frame vs hdtf | output | load before -> after |',
          '| --- | --- | --- | --- | --- | --- | --- | --- |']
  for recipe, r in results.items():
    per_frame = r['wall_s'] / max(r['frames'], 1)
    rows.append(f"| `{recipe}` | {r['written']} | {r['frames']} | {r['wall_s']:.1f} s | "
                f"{r['frames'] / r['wall_s']:.1f} | {per_frame / base:.2f}x | {r['output_mib']:.0f} MiB | "
                f"{r['load'][0]:.1f} -> {r['load'][1]:.1f} |")
  return '\n'.join(rows)


def write_section(path: str, text: str) -> None:
  """Replace this script's section of results.md, keeping the other scripts' sections."""
  existing = open(path).read() if os.path.exists(path) else '# Benchmark results\n'
  head, _, rest = existing.partition(SECTION)
  tail = rest[rest.find('\n## '):] if '\n## ' in rest else ''
  with open(path, 'w') as out:
    out.write(head.rstrip('\n') + '\n\n' + text.rstrip('\n') + '\n' + tail)


def main(argv: Optional[List[str]] = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sources', type=int, default=2)
  parser.add_argument('--duration', type=float, default=20.0)
  parser.add_argument('--work', default=os.path.join(REPO, 'bench', 'work', 'recipes'))
  parser.add_argument('--recipes', default=','.join(RECIPES))
  args = parser.parse_args(argv)
  manifest = make_sources(os.path.join(args.work, 'sources'), args.sources, args.duration)
  results = {}
  for recipe in ['hdtf'] + [r for r in args.recipes.split(',') if r != 'hdtf']:
    results[recipe] = run_recipe(recipe, manifest, args.work)
    print(recipe, json.dumps(results[recipe]), flush=True)
  info = machine()
  text = (f'{SECTION}\n\nMeasured {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())} by `python bench/recipes.py '
          f'{" ".join(argv or sys.argv[1:])}` on {info["cpu"]}, {info["cores"]} cores: {args.sources} generated 1080p '
          f'sources of {args.duration:.0f} s (25 fps, one whole-video clip each), every recipe with its defaults and '
          f'offline models, one CLI process each (FnApiRunner in-memory; the wall includes about 4 s of start-up).\n\n'
          + table(results) + '\n')
  print(text)
  write_section(os.path.join(REPO, 'bench', 'results.md'), text)
  return results


if __name__ == '__main__':
  main()
