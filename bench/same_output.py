"""Does this tree write what an older one wrote? A recipe's CLI run by both on the same sources, every file compared.

  python bench/same_output.py --before DIR [--recipes nerf,avatar,megactor,mmvox] [--bytes nerf] [--duration 8]

DIR is a copy of the older tree (e.g. `git archive HEAD | tar -x -C DIR`). Both trees run
`python -m beam_pipeline --input=<manifest> --recipe=R --no_progress --no_report` on bench/recipes.py's generated
1080p sources (`--sources`, `--duration`), each into its own output. Every file of the outputs' folders (subject and
tube folders; not the work dir, run logs or the run's own stats and index) is compared by sha256; an image whose
bytes differ is decoded, and counts as "same pixels" when every pixel and channel is equal. A recipe named in
`--bytes` must write byte-identical files; the others identical pixels (a different PNG setting is allowed). A
megactor run packs shards: their members are compared one by one. Exits 1 when a file differs.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
from typing import Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from bench.recipes import make_sources  # noqa: E402

RUN_FILES = {'stats.json', 'output.json', 'index.jsonl', 'rejects.jsonl', 'report.html'}  # the run's own
SKIPPED_DIRS = {'runs', 'published'}  # run logs; the units' index records (the run's own times and ids)
IMAGES = ('.png', '.jpg', '.jpeg')


def run(tree: str, recipe: str, manifest: str, output: str) -> None:
  shutil.rmtree(output, ignore_errors=True)
  argv = [sys.executable, '-m', 'beam_pipeline', f'--input={manifest}', f'--output={output}', f'--recipe={recipe}',
          '--no_progress', '--no_report']
  done = subprocess.run(argv, cwd=tree, capture_output=True, text=True)
  if done.returncode:
    raise SystemExit(f'{recipe} in {tree} failed:\n{done.stderr[-3000:]}')


def contents(output: str) -> Dict[str, bytes]:
  """Relative path -> bytes of every compared file; a tar's members as `<tar>/<member>`."""
  found = {}
  for folder, dirs, files in os.walk(output):
    relative = os.path.relpath(folder, output)
    if relative == '.':
      dirs[:] = [d for d in dirs if not d.startswith('_') and d not in SKIPPED_DIRS]
      files = [f for f in files if f not in RUN_FILES]
    for name in files:
      path = os.path.join(folder, name)
      key = os.path.normpath(os.path.join(relative, name))
      if name.endswith('.tar'):
        with tarfile.open(path) as tar:
          for member in tar.getmembers():
            if member.isfile():
              found[f'{key}/{member.name}'] = tar.extractfile(member).read()
      else:
        with open(path, 'rb') as handle:
          found[key] = handle.read()
  return found


def same_pixels(name: str, a: bytes, b: bytes) -> bool:
  import cv2
  import numpy as np
  if not name.lower().endswith(IMAGES):
    return False
  left, right = (cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED) for data in (a, b))
  return left is not None and right is not None and left.shape == right.shape and bool((left == right).all())


def compare(before: Dict[str, bytes], after: Dict[str, bytes]) -> dict:
  summary = {'files': len(after), 'identical': 0, 'same_pixels': 0, 'differ': [], 'only_before': [], 'only_after': [],
             'bytes_before': sum(map(len, before.values())), 'bytes_after': sum(map(len, after.values()))}
  for name in sorted(set(before) | set(after)):
    if name not in after:
      summary['only_before'].append(name)
    elif name not in before:
      summary['only_after'].append(name)
    elif hashlib.sha256(before[name]).digest() == hashlib.sha256(after[name]).digest():
      summary['identical'] += 1
    elif same_pixels(name, before[name], after[name]):
      summary['same_pixels'] += 1
    else:
      summary['differ'].append(name)
  return summary


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--before', required=True, help='a copy of the older tree')
  parser.add_argument('--recipes', default='nerf,avatar,megactor,mmvox')
  parser.add_argument('--bytes', default='nerf', help='recipes whose files must be byte-identical')
  parser.add_argument('--sources', type=int, default=1)
  parser.add_argument('--duration', type=float, default=8.0, help='seconds of each generated source')
  parser.add_argument('--work', default=os.path.join(REPO, 'bench', 'work', 'same_output'))
  args = parser.parse_args(argv)
  manifest = make_sources(os.path.join(args.work, f'sources_{args.duration:g}s'), args.sources, args.duration)
  strict = set(filter(None, args.bytes.split(',')))
  failed = False
  for recipe in filter(None, args.recipes.split(',')):
    outputs = {}
    for name, tree in (('before', os.path.abspath(args.before)), ('after', REPO)):
      outputs[name] = os.path.join(args.work, f'{recipe}_{name}')
      run(tree, recipe, manifest, outputs[name])
    summary = compare(contents(outputs['before']), contents(outputs['after']))
    bad = summary['differ'] + summary['only_before'] + summary['only_after']
    if recipe in strict and summary['same_pixels']:
      bad.append(f"{summary['same_pixels']} images with the same pixels but other bytes")
    failed |= bool(bad) or not summary['files']
    print(f"{recipe}: {summary['files']} files, {summary['identical']} byte-identical, {summary['same_pixels']} same "
          f"pixels in other bytes ({summary['bytes_before']} -> {summary['bytes_after']} bytes in all)"
          + (f'; DIFFERENT: {bad[:10]}' if bad else ''), flush=True)
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
