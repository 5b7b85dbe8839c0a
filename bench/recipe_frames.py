"""The recipes' per-frame extras, each part timed alone in one process: CPU ms per output frame.

  python bench/recipe_frames.py [--frames 100] [--runs 3] [--before DIR [--rounds 2]] [--profile 8]

What `nerf`, `avatar`, `megactor` and `mmvox` add to hdtf's per-frame work (decode, crop, landmarker, encode),
run on the same frames through the recipes' own code, each part alone: the person segmentation and the
offline face parsing (nerf, avatar, mmvox), each recipe's frame analyzer in the render pass (`NerfFrames`,
`AvatarFrames`, `MmvoxFrames`), nerf's subject writer (stage, bc.jpg, every per-frame file, audio features),
the avatar and mmvox writers' per-frame copies, and megactor's styled copy (decode, OpenCV style, x264).
The frames: the first `--frames` of a generated 1080p talking source (bench/recipes.py's), cropped around the
face as each recipe crops (nerf 3.0 x the face box, avatar 2.2, megactor the spine's 1.8, mmvox its tube),
at each recipe's size; the landmarker runs once, untimed, so the parts see what it found.

CPU time (time.process_time: every thread of the process, MediaPipe's included), not wall: the cores are
shared. Each part runs `--runs` times; the median. `--before DIR` (a copy of an older tree, e.g.
`git archive HEAD | tar -x -C DIR`) measures that tree's code too, in alternating child processes, and the
table gives both. `--profile N`: each part once more under cProfile (process time), its N costliest functions.
Writes the "## Recipes' per-frame extras" section of bench/results.md (`--results=` to write nothing).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional, Union

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HEADING = "## Recipes' per-frame extras"
RECIPES = ('nerf', 'avatar', 'megactor', 'mmvox')
# (output side, crop: the face box's longest side x this, or 'tube' for mmvox's tube window, frame rate)
CROPS = {'nerf': (512, 3.0, 25.0), 'avatar': (512, 2.2, 30.0), 'megactor': (512, 1.8, 30.0),
         'mmvox': (256, 'tube', 25.0)}


# ----------------------------------------------------------------------------- frames (untimed)

def source_frames(root: str, count: int):
  """The first `count` frames (RGB) of bench/recipes.py's first generated 1080p source."""
  import av
  from bench.recipes import make_sources
  make_sources(root, 1, max(4.0, count / 25.0 + 1))
  frames = []
  with av.open(os.path.join(root, 'talk0.mp4')) as container:
    for frame in container.decode(video=0):
      frames.append(frame.to_ndarray(format='rgb24'))
      if len(frames) == count:
        break
  if len(frames) < count:
    raise SystemExit(f'{root}/talk0.mp4 has {len(frames)} frames, not {count}: remove it to make a longer one')
  return frames


def crop_frames(frames, face_box, recipe: str):
  """The frames cropped to `recipe`'s square around `face_box` (x0, y0, x1, y1 source px), at its size."""
  import cv2
  import numpy as np
  from transforms.lib.geometry import square_window
  size, scale, _ = CROPS[recipe]
  height, width = frames[0].shape[:2]
  if scale == 'tube':
    from beam_pipeline.recipes.mmvox.tubes import tube_window
    (x, y, side, _), _ = tube_window(face_box, width, height)
    x, y = max(x, 0), max(y, 0)
    side = min(side, width - x, height - y)
  else:
    x, y, side, _ = square_window(face_box, scale, width, height)
  return [cv2.resize(np.ascontiguousarray(f[y:y + side, x:x + side]), (size, size), interpolation=cv2.INTER_AREA)
          for f in frames], (x, y, side, side)


class Setup:
  """What every part needs: the frames per recipe with the landmarker's findings, a clip task and arrays."""

  def __init__(self, root: str, count: int):
    import numpy as np
    from model_handlers.in_process import SharedModel
    from model_handlers.mediapipe_face import FaceLandmarkerModelHandler
    from transforms.core.elements import ClipTask
    from transforms.frame_analysis import FaceLandmarks, Frame
    model_dir = os.environ.get('BEAM_PIPELINE_MODEL_DIR')
    self.model_dir = model_dir
    self.root = root
    source = source_frames(os.path.join(root, 'source'), count)
    probe = SharedModel(FaceLandmarkerModelHandler(model_dir=model_dir, max_batch_size=1))
    probe.setup()
    points = probe.infer([source[0]])[0].landmarks[0][:, :2]
    face_box = (*points.min(0), *points.max(0))
    landmarks = FaceLandmarks(FaceLandmarkerModelHandler(model_dir=model_dir, max_batch_size=32))
    landmarks.setup()
    self.frames, self.found, self.tasks, self.arrays = {}, {}, {}, {}
    for recipe in RECIPES:
      images, window = crop_frames(source, face_box, recipe)
      size, _, fps = CROPS[recipe]
      task = ClipTask(f'bench{recipe}_0', f'bench{recipe}', '', None, 0.0, len(images) / fps, window=window,
                      crop_mode='detect', face_box=None)
      clip_pass = landmarks.start(task, len(images), size)
      frames = [Frame(i, image) for i, image in enumerate(images)]
      for first in range(0, len(frames), 32):
        clip_pass.add(frames[first:first + 32])
      self.frames[recipe] = images
      self.found[recipe] = [dict(frame.found) for frame in frames]
      self.tasks[recipe] = task
      self.arrays[recipe] = clip_pass.finish(len(images)).arrays
      if not np.isfinite(self.arrays[recipe]['lmk68']).all():
        raise SystemExit(f'the landmarker missed the face on some {recipe} frames: the parts would not see one')

  def fresh(self, recipe: str):
    """The recipe's frames as the render pass hands them to the analyzers after the landmarker."""
    from transforms.frame_analysis import Frame
    return [Frame(i, image, dict(found)) for i, (image, found) in
            enumerate(zip(self.frames[recipe], self.found[recipe]))]


# ----------------------------------------------------------------------------- the parts (timed)

def run_pass(analyzer, task, frames, size: int, batch: int):
  clip_pass = analyzer.start(task, len(frames), size)
  for first in range(0, len(frames), batch):
    clip_pass.add(frames[first:first + batch])
  return clip_pass.finish(len(frames))


def parts(setup: Setup, recipe: str, work: str) -> Dict[str, Union[Callable[[], None], tuple]]:
  """name -> a function that runs the part once (each run on fresh copies of what it reads), or (prepare, run):
  `prepare()` untimed before each run, its result handed to `run`."""
  from transforms.analyzers.parsing import FaceParsing, PersonSegmentation
  from model_handlers.mediapipe_segmentation import PersonSegmenterModelHandler
  size, _, fps = CROPS[recipe]
  task = setup.tasks[recipe]
  segmenter = PersonSegmentation(PersonSegmenterModelHandler(model_dir=setup.model_dir, max_batch_size=32))
  segmenter.setup()
  parser = FaceParsing(None)
  parsed = setup.fresh(recipe)  # the frames with `person` and `parsing`, for the parts that read them
  run_pass(segmenter, task, parsed, size, 32)
  run_pass(parser, task, parsed, size, 32)

  def with_parsing(*leave_out: str):
    from transforms.frame_analysis import Frame
    return [Frame(f.index, f.image, {k: v for k, v in f.found.items() if k not in leave_out}) for f in parsed]

  out: Dict[str, Union[Callable[[], None], tuple]] = {}
  if recipe != 'megactor':
    out['segmentation'] = lambda: run_pass(segmenter, task, setup.fresh(recipe), size, 32)
    out['parsing'] = lambda: run_pass(parser, task, with_parsing('parsing'), size, 32)
  if recipe == 'nerf':
    from beam_pipeline.recipes.nerf.writer import NerfFrames
    analyzer = NerfFrames(work, fps)
    out['nerf_frames'] = lambda: run_pass(analyzer, task, with_parsing(), size, 32)
    # The writer consumes the clip's archive, so each run gets a fresh one, made untimed.
    out['nerf_writer'] = (lambda: fresh_output(os.path.join(work, 'out_nerf'), run_pass(analyzer, task, with_parsing(),
                                                                                          size, 32)),
                          lambda result: nerf_writer(setup, result, work))
  elif recipe == 'avatar':
    from beam_pipeline.recipes.avatar.frames import ARCHIVE, AvatarFrames
    analyzer = AvatarFrames(work, None, drop_cloth=True)
    out['avatar_frames'] = lambda: run_pass(analyzer, task, with_parsing(), size, 32)
    archive = run_pass(analyzer, task, with_parsing(), size, 32).files[ARCHIVE]
    out['avatar_writer'] = lambda: lay_out(archive, os.path.join(work, 'out_avatar', 'image'))
  elif recipe == 'mmvox':
    from beam_pipeline.recipes.mmvox.writer import MmvoxFrames
    analyzer = MmvoxFrames(work, keep_frames=True)
    out['mmvox_frames'] = lambda: run_pass(analyzer, task, with_parsing(), size, 32)
    files = run_pass(analyzer, task, with_parsing(), size, 32).files
    out['mmvox_writer'] = lambda: [lay_out(uri, os.path.join(work, 'out_mmvox', name)) for name, uri in files.items()]
  elif recipe == 'megactor':
    clip = encode_clip(setup.frames[recipe], fps, os.path.join(work, 'megactor_clip.mp4'))
    out['styled_copy'] = lambda: styled_copy(clip, os.path.join(work, 'styled.mp4'))
  return out


def fresh_output(folder: str, result):
  """`result`, once `folder` (an earlier run's output) is gone: its removal is not the part's cost."""
  shutil.rmtree(folder, ignore_errors=True)
  return result


def lay_out(archive: str, folder: str) -> None:
  """What the avatar and mmvox writers do per frame: each archive member to its own file, atomically."""
  from transforms.core.fileio import write_atomic
  from transforms.core.frame_store import read_frame_archive
  for name, data in read_frame_archive(archive):
    write_atomic(os.path.join(folder, name), data)


def nerf_writer(setup: Setup, result, work: str) -> None:
  """nerf's writer on the clip: StageNerfClip, MergeBackgrounds (bc.jpg) and WriteSubject, as the pipeline
  runs them (default flags: mel audio features, AD-NeRF's split)."""
  from beam_pipeline.recipes.nerf.writer import MergeBackgrounds, StageNerfClip, WriteSubject
  from transforms.core.elements import RenderedClip
  from transforms.filters import Analysis
  from transforms.render import silent_wav
  task = setup.tasks['nerf']
  size, _, fps = CROPS['nerf']
  count = len(setup.frames['nerf'])
  mp4 = os.path.join(work, 'nerf_clip.mp4')
  open(mp4, 'wb').close()
  arrays = dict(setup.arrays['nerf'], **result.arrays)
  clip = RenderedClip(task, mp4, silent_wav(count / fps), count, fps, size, arrays, files=result.files)
  staged = list(StageNerfClip(work).process(Analysis(clip, arrays, {}, {}, [])))
  nerf_clip, background = staged[0][1], staged[1].value[1]
  merge = MergeBackgrounds()
  bc = merge.extract_output(merge.add_input(merge.create_accumulator(), background))
  writer = WriteSubject(os.path.join(work, 'out_nerf'), 'mel', None, None)
  writer.setup()
  records = list(writer.process((task.source_id, {'clips': [nerf_clip], 'bc': [bc], 'failed': []})))
  if len(records) != 1 or not isinstance(records[0], dict):
    raise SystemExit(f'the nerf writer did not write the subject: {records}')


def encode_clip(frames, fps: float, path: str) -> str:
  """The clip's mp4 as the render pass encodes it (H.264 crf 18 veryfast)."""
  import av
  from fractions import Fraction
  rate = Fraction(fps).limit_denominator(1001)
  with av.open(path, 'w', format='mp4') as out:
    video = out.add_stream('libx264', rate=rate)
    video.width = video.height = frames[0].shape[0]
    video.pix_fmt = 'yuv420p'
    video.options = {'crf': '18', 'preset': 'veryfast'}
    for index, image in enumerate(frames):
      frame = av.VideoFrame.from_ndarray(image, format='rgb24')
      frame.pts, frame.time_base = index, 1 / rate
      out.mux(video.encode(frame))
    out.mux(video.encode(None))
  return path


def styled_copy(clip: str, out: str) -> None:
  """megactor's `mp4_styled` with its default style (OpenCV), as MakeCopies makes it."""
  from beam_pipeline.recipes.megactor.stylize import OpenCVStyler, stylize_clip
  styler = OpenCVStyler()
  styler.setup()
  stylize_clip(clip, out, styler.for_clip('bench_0'))


# ----------------------------------------------------------------------------- measuring

def measure(recipes: List[str], count: int, runs: int, profile: int, root: str) -> dict:
  """{recipe: {part: {'cpu_ms_per_frame': median, 'runs': [...], 'profile': text}}} for this process's code."""
  setup = Setup(root, count)
  results: Dict[str, dict] = {}
  for recipe in recipes:
    work = tempfile.mkdtemp(prefix=f'bench-{recipe}-', dir=root)
    try:
      results[recipe] = {}
      for name, part in parts(setup, recipe, work).items():
        prepare, run = part if isinstance(part, tuple) else (lambda: None, lambda _: part())
        run(prepare())  # warm: first-call costs (imports, model graphs) are not per frame
        times = []
        for _ in range(runs):
          ready = prepare()
          began = time.process_time()
          run(ready)
          times.append((time.process_time() - began) * 1000 / count)
        entry = {'cpu_ms_per_frame': round(statistics.median(times), 2), 'runs': [round(t, 2) for t in times]}
        if profile:
          ready = prepare()
          entry['profile'] = profiled(lambda: run(ready), profile)
        results[recipe][name] = entry
        print(f'{recipe} {name}: {entry["cpu_ms_per_frame"]} ms/frame {entry["runs"]}', file=sys.stderr, flush=True)
    finally:
      shutil.rmtree(work, ignore_errors=True)
  return results


def profiled(part: Callable[[], None], top: int) -> str:
  profiler = cProfile.Profile(time.process_time)
  profiler.enable()
  part()
  profiler.disable()
  text = io.StringIO()
  stats = pstats.Stats(profiler, stream=text)
  stats.sort_stats('tottime').print_stats(top)
  lines = [line for line in text.getvalue().splitlines() if line.strip()]
  start = next(i for i, line in enumerate(lines) if 'ncalls' in line)
  return '\n'.join(lines[start:])


def child(tree: str, args) -> dict:
  """`measure` in a fresh process running `tree`'s code (this script, that tree first on the path)."""
  argv = [sys.executable, os.path.abspath(__file__), '--child', tree, '--frames', str(args.frames), '--runs',
          str(args.runs), '--recipes', args.recipes, '--work', args.work, '--profile', str(args.profile)]
  done = subprocess.run(argv, capture_output=True, text=True, cwd=tree)
  if done.returncode:
    raise SystemExit(f'measuring {tree} failed:\n{done.stderr[-3000:]}')
  sys.stderr.write(done.stderr)
  return json.loads(done.stdout)


def table(trees: Dict[str, dict], recipes: List[str]) -> List[str]:
  names = list(trees)
  head = '| recipe | part | ' + ' | '.join(f'{name}: CPU ms/frame (runs)' for name in names) + (
      ' | after / before |' if len(names) == 2 else ' |')
  rows = [head, '|' + ' --- |' * (2 + len(names) + (len(names) == 2))]
  for recipe in recipes:
    parts_ = list(trees[names[-1]][recipe])
    totals = {name: 0.0 for name in names}
    for part in parts_:
      cells = []
      for name in names:
        entry = trees[name][recipe].get(part)
        cells.append(f"{entry['cpu_ms_per_frame']:.1f} ({', '.join(f'{t:.1f}' for t in entry['runs'])})"
                     if entry else '-')
        totals[name] += entry['cpu_ms_per_frame'] if entry else 0.0
      ratio = ''
      if len(names) == 2:
        a, b = (trees[name][recipe].get(part) for name in names)
        ratio = f" {b['cpu_ms_per_frame'] / a['cpu_ms_per_frame']:.2f}x |" if a and b else ' - |'
      rows.append(f'| `{recipe}` | {part} | ' + ' | '.join(cells) + ' |' + ratio)
    total_ratio = f' **{totals[names[1]] / totals[names[0]]:.2f}x** |' if len(names) == 2 else ''
    rows.append(f'| `{recipe}` | **all extras** | ' + ' | '.join(f'**{totals[n]:.1f}**' for n in names) + ' |'
                + total_ratio)
  return rows


def main(argv: Optional[List[str]] = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--frames', type=int, default=100, help='output frames per recipe')
  parser.add_argument('--runs', type=int, default=3, help='timed runs of each part (the median is reported)')
  parser.add_argument('--recipes', default=','.join(RECIPES))
  parser.add_argument('--before', default='', help='a copy of an older tree to measure too (alternating)')
  parser.add_argument('--rounds', type=int, default=1, help='with --before: alternations of before and after')
  parser.add_argument('--profile', type=int, default=0, help='print each part\'s N costliest functions (cProfile)')
  parser.add_argument('--work', default=os.path.join(REPO, 'bench', 'work', 'recipe_frames'))
  parser.add_argument('--results', default=os.path.join(REPO, 'bench', 'results.md'), help="'' writes nothing")
  parser.add_argument('--child', default='', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  recipes = [r for r in args.recipes.split(',') if r]
  os.makedirs(args.work, exist_ok=True)
  if args.child:
    sys.path.insert(0, args.child)
    print(json.dumps(measure(recipes, args.frames, args.runs, args.profile, os.path.abspath(args.work))))
    return {}
  trees = ([('before', os.path.abspath(args.before))] if args.before else []) + [('after', REPO)]
  load = [round(os.getloadavg()[0], 1)]
  measured: Dict[str, List[dict]] = {name: [] for name, _ in trees}
  for _ in range(args.rounds if args.before else 1):
    for name, tree in trees:
      measured[name].append(child(tree, args))
  load.append(round(os.getloadavg()[0], 1))
  merged = {name: merge_rounds(rounds) for name, rounds in measured.items()}
  if args.profile:
    for name, result in merged.items():
      for recipe in recipes:
        for part, entry in result[recipe].items():
          print(f'\n### {name} {recipe} {part}\n{entry.pop("profile", "")}')
  sys.path.insert(0, REPO)
  from bench.run import machine, replace_section
  info = machine()
  rows = table(merged, recipes)
  print('\n'.join(rows))
  if args.results:
    when = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    body = [HEADING, '', f'Measured {when} by `python bench/recipe_frames.py '
            f'{" ".join(argv if argv is not None else sys.argv[1:])}` on {info["cpu"]}, {info["cores"]} cores, load '
            f'{load[0]} -> {load[1]}: CPU ms per output frame (time.process_time, all threads), median of '
            f'{args.runs * (args.rounds if args.before else 1)} runs of {args.frames} frames; each part alone in one '
            'process (see the script\'s docstring).' + (' "before": the tree given by --before, "after": this one, '
                                                       'in alternating processes.' if args.before else ''), '']
    body += rows + ['', '```json', json.dumps({'load': load, 'frames': args.frames, 'results': merged}, sort_keys=True),
                    '```']
    replace_section(args.results, HEADING, body)
  return merged


def merge_rounds(rounds: List[dict]) -> dict:
  """Every round's runs of a part together; the median over all of them."""
  merged: Dict[str, dict] = {}
  for result in rounds:
    for recipe, recipe_parts in result.items():
      for part, entry in recipe_parts.items():
        into = merged.setdefault(recipe, {}).setdefault(part, {'runs': []})
        into['runs'] += entry['runs']
        if 'profile' in entry:
          into['profile'] = entry['profile']
  for recipe_parts in merged.values():
    for entry in recipe_parts.values():
      entry['cpu_ms_per_frame'] = round(statistics.median(entry['runs']), 2)
  return merged


if __name__ == '__main__':
  main()
