"""The cheapest path for each output frame (issue 24): three A/Bs of the render pass, each against today's.

  python bench/render_paths.py [--sources 2] [--duration 60] [--reps 5] [--parts landmarker fps yuv render]

- landmarker: the face landmarker in VIDEO running mode (one task instance held for the clip, timestamps from
  the output frame index, so it tracks the face from the last frame's landmarks) against IMAGE mode as the
  render pass runs it (SharedModel, batches of 32), on the same RGB output frames; VIDEO mode with the
  pipeline's 4 faces and with 1.
- fps: the frame selection (30 -> 25 fps) before crop/scale/RGB, so dropped frames are never scaled or converted,
  two ways: the render pass's own nearest-frame selection on the decoded frames, and libavfilter's `fps` filter
  at the head of the graph; against today's order (every decoded frame filtered, the selection after).
- yuv: x264 fed the graph's yuv420p frames against today's RGB frames that x264's input conversion turns back
  into yuv420p, two ways: one scale to BT.601 limited-range yuv420p `split` to x264 and to an RGB conversion for
  the analyzers, and the crop `split` into today's scale to RGB and a second scale to yuv420p for x264.
- render: `render()` of transforms/render.py at `--before` (default HEAD) against this tree's, audio and all.

fps and yuv run the render pass's video path alone (decode, filter, select, encode, as `render()` does it), so
each change is measured by itself; render measures what the pipeline runs. Workload: bench/run.py's generated
sources (two 10 s clips each, a fixed crop window, 512 px, 25 fps) and the real clips in ../shared/real_clips
(whole, 512 px, no crop). Cost: CPU seconds of this process and its children (getrusage: every decoder,
encoder and MediaPipe thread) per output frame, the median of `--reps` runs of each variant, alternated;
wall time and the load average with them (the machine is shared). Quality: the RGB frames against today's
(identical, or PSNR and the landmarks of the largest face: per frame the mean distance of the 478 points in
output pixels), and the encoded mp4 decoded to RGB against today's (PSNR, size, frame types).
Each part writes its section of bench/results.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from fractions import Fraction
from typing import Callable, Dict, List, Optional

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import av  # noqa: E402
import numpy as np  # noqa: E402

from beam_pipeline.pipeline import MAX_TRACKED_FACES  # noqa: E402
from bench.run import BATCH, CRF, OUT_FPS, OUT_SIZE, PRESET, Clip, machine, make_workload, replace_section  # noqa: E402
from transforms.core.elements import ClipTask, MediaFile  # noqa: E402
from transforms.lib.probe import probe  # noqa: E402

REAL_CLIPS = os.path.join(os.path.dirname(REPO), 'shared', 'real_clips')
RESULTS = os.path.join(REPO, 'bench', 'results.md')
HEADINGS = {'landmarker': '## Landmarker VIDEO mode (A/B)', 'fps': '## fps before crop/scale (A/B)',
            'yuv': '## x264 fed yuv420p (A/B)', 'render': '## Render pass after the A/Bs'}
_AGAIN = (av.error.BlockingIOError, BlockingIOError, av.error.EOFError, EOFError)


def cpu_s() -> float:
  """CPU seconds of this process (all its threads) and its waited-for children."""
  own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
  return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def load() -> float:
  return round(os.getloadavg()[0], 1)


# ----------------------------------------------------------------------------- workload

@dataclasses.dataclass(frozen=True)
class Job:
  """A clip of the workload with its probe; `real` for ../shared/real_clips."""
  clip: Clip
  t0: float  # the clip's start on the decoded frames' clock (the container's start time added)
  info: object
  real: bool

  @property
  def count(self) -> int:
    return int(round((self.clip.end - self.clip.start) * OUT_FPS))

  def task(self) -> ClipTask:
    path = self.clip.path
    return ClipTask(self.clip.clip_id, self.clip.clip_id.rsplit('_', 1)[0], path, MediaFile(path, self.info),
                    self.clip.start, self.clip.end, window=self.clip.window)


def workload(work: str, sources: int, duration: float) -> List[Job]:
  _, clips = make_workload(work, sources, duration)
  if os.path.isdir(REAL_CLIPS):
    for name in sorted(os.listdir(REAL_CLIPS)):
      if name.endswith('.mp4'):
        path = os.path.join(REAL_CLIPS, name)
        info = probe(path)
        with av.open(path) as container:
          frames = sum(1 for _ in container.decode(video=0))
        end = (frames - 1) / info.fps  # the whole clip: its last output tick still has a source frame
        clips.append(Clip(name[:-4].replace('_', '-') + '_0', path, 0.0, end, (0, 0, info.width, info.height)))
  jobs = []
  for clip in clips:
    info = probe(clip.path)
    jobs.append(Job(clip, clip.start + (info.start_time or 0.0), info, clip.path.startswith(REAL_CLIPS)))
  return jobs


# ----------------------------------------------------------------------------- the video path, each way

class VideoPath:
  """Decode -> filter -> select -> encode of one clip's video, as `render()` does it, in one of these orders:

  `select`: 'after' (today: every decoded frame through crop/scale/RGB, the nearest-frame selection after),
  'before' (the selection on the decoded frames, only the picked ones filtered) or 'fps_filter' (libavfilter's
  `fps` at the head of the graph, the selection after it then takes every frame);
  `feed`: 'rgb' (today: x264 gets RGB, its input conversion makes yuv420p), 'yuv' (the graph scales to
  BT.601 limited-range yuv420p, `split`s it to x264 and to an RGB conversion for the analyzers) or 'yuv own
  scale' (the crop `split` into today's scale to RGB and a second scale to yuv420p for x264: today's RGB)."""

  def __init__(self, select: str = 'after', feed: str = 'rgb'):
    self.select, self.feed = select, feed

  @property
  def name(self) -> str:
    return f'select {self.select}, x264 fed {self.feed}'

  def _graph(self, stream, job: Job):
    x, y, w, h = job.clip.window
    graph = av.filter.Graph()
    chain = [graph.add_buffer(template=stream)]
    if self.select == 'fps_filter':
      chain.append(graph.add('fps', f'fps={OUT_FPS:g}:start_time={job.t0}:round=near'))
    chain.append(graph.add('crop', f'{w}:{h}:{x}:{y}'))
    yuv_sink = split = None
    if self.feed == 'yuv own scale':
      split, yuv_sink = graph.add('split', '2'), graph.add('buffersink')
      to_yuv = [split, graph.add('scale', f'{OUT_SIZE}:{OUT_SIZE}:flags=area:out_color_matrix=bt601:out_range=tv'),
                graph.add('format', 'yuv420p'), yuv_sink]
      for a, b in zip(to_yuv, to_yuv[1:]):
        a.link_to(b)
      chain += [split, graph.add('scale', f'{OUT_SIZE}:{OUT_SIZE}:flags=area')]
    elif self.feed == 'yuv':
      split, yuv_sink = graph.add('split', '2'), graph.add('buffersink')
      chain += [graph.add('scale', f'{OUT_SIZE}:{OUT_SIZE}:flags=area:out_color_matrix=bt601:out_range=tv'),
                graph.add('format', 'yuv420p'), split]
      split.link_to(yuv_sink, 0)
    else:
      chain.append(graph.add('scale', f'{OUT_SIZE}:{OUT_SIZE}:flags=area'))
    rgb_sink = graph.add('buffersink')
    chain += [graph.add('format', 'rgb24'), rgb_sink]
    for a, b in zip(chain, chain[1:]):
      a.link_to(b, 1 if a is split else 0)
    graph.configure()
    return graph, rgb_sink, yuv_sink

  def run(self, job: Job, out_path: str, keep: Optional[Callable] = None) -> int:
    """Render the clip's video to `out_path`; `keep(rgb)` sees every output frame. Returns the frames made."""
    from transforms.render import _FrameSelector
    rate = Fraction(OUT_FPS).limit_denominator(1001)
    produced = 0
    with av.open(job.clip.path) as source, av.open(out_path, 'w', format='mp4') as out:
      vin = source.streams.video[0]
      vin.thread_type = 'AUTO'
      source.seek(max(0, int((job.t0 - 0.5) * av.time_base)), backward=True, any_frame=False)
      vout = out.add_stream('libx264', rate=rate)
      vout.width = vout.height = OUT_SIZE
      vout.pix_fmt = 'yuv420p'
      vout.options = {'crf': str(CRF), 'preset': PRESET, 'a53cc': '0'}
      graph, rgb_sink, yuv_sink = self._graph(vin, job)
      interval = 1.0 / (job.info.fps or OUT_FPS)
      selector = _FrameSelector(job.t0, job.count, OUT_FPS, interval)
      last = [None, None]

      def filtered(frame):
        graph.push(frame)
        pulled = []
        while True:
          try:
            rgb = rgb_sink.pull()
          except _AGAIN:
            return pulled
          pulled.append((rgb.time, (rgb.to_ndarray(), yuv_sink.pull() if yuv_sink is not None else None)))

      def encode(picture):
        nonlocal produced
        rgb, frame = picture
        if keep is not None:
          keep(rgb)
        if frame is None:
          frame = av.VideoFrame.from_ndarray(rgb, format='rgb24')
        else:
          frame.pict_type = av.video.frame.PictureType.NONE
        frame.pts, frame.time_base = produced, 1 / rate
        out.mux(vout.encode(frame))
        produced += 1

      def picked(frame):
        if self.select != 'before':
          for ts, picture in filtered(frame):
            for chosen in selector.push(ts, picture):
              encode(chosen)
          return
        for chosen in selector.push(frame.time, frame):
          if last[0] is not chosen:  # a source frame picked for two ticks is filtered once
            last[:] = chosen, filtered(chosen)[0][1]
          encode(last[1])

      for frame in source.decode(vin):
        if frame.time is None or frame.time < job.t0 - 2 * interval:
          continue
        picked(frame)
        if selector.index >= job.count:
          break
      if selector.index < job.count:
        if self.select != 'before':
          for ts, picture in filtered(None):
            for chosen in selector.push(ts, picture):
              encode(chosen)
        for chosen in selector.flush():
          encode(chosen if self.select != 'before' else filtered(chosen)[0][1])
      out.mux(vout.encode(None))
    return produced


class RenderOf:
  """`render()` of a render.py (this tree's, or another revision's loaded from git): the pipeline's whole pass."""

  def __init__(self, name: str, module):
    self.name, self.module = name, module

  def run(self, job: Job, out_path: str, keep: Optional[Callable] = None) -> int:
    generator = self.module.render(job.task(), out_path, OUT_SIZE, OUT_FPS, CRF, PRESET)
    while True:
      try:
        _, image = next(generator)
      except StopIteration as done:
        return done.value[0]
      if keep is not None:
        keep(image)


def render_module_at(revision: str, scratch: str):
  """transforms/render.py as of `revision` (read with `git show`; the checkout is not touched), or None where
  it is the same as this tree's."""
  text = subprocess.run(['git', 'show', f'{revision}:transforms/render.py'], cwd=REPO, check=True,
                        capture_output=True, text=True).stdout
  with open(os.path.join(REPO, 'transforms', 'render.py')) as handle:
    if handle.read() == text:
      return None
  path = os.path.join(scratch, 'render_before.py')
  with open(path, 'w') as handle:
    handle.write(text)
  spec = importlib.util.spec_from_file_location('render_before', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# ----------------------------------------------------------------------------- the landmarker, each way

class Landmarker:
  """The pipeline's landmarker settings (4 faces, confidence 0.5), run IMAGE mode as the render pass does
  (SharedModel, batches of 32) or VIDEO mode with one task instance per clip (created before the clock starts;
  its creation is timed apart)."""

  def __init__(self, mode: str, faces: int = MAX_TRACKED_FACES):
    from model_handlers.mediapipe_face import FaceLandmarkerModelHandler
    self.mode, self.faces = mode, faces
    self.handler = FaceLandmarkerModelHandler(model_dir=os.environ.get('BEAM_PIPELINE_MODEL_DIR'),
                                              max_batch_size=BATCH, max_faces=faces)
    self.model = None

  @property
  def name(self) -> str:
    return f'{self.mode}, {self.faces} face' + ('s' if self.faces > 1 else '')

  def create(self):
    """What the clip needs before its first frame: nothing in IMAGE mode (the process's pool), a task in VIDEO."""
    if self.mode == 'IMAGE':
      if self.model is None:
        from model_handlers.in_process import SharedModel
        self.model = SharedModel(self.handler)
        self.model.setup()
      return None
    from model_handlers import mediapipe_tasks, registry
    tasks = mediapipe_tasks.tasks()
    vision = tasks.vision
    return vision.FaceLandmarker.create_from_options(vision.FaceLandmarkerOptions(
        base_options=tasks.BaseOptions(model_asset_path=registry.resolve('face_landmarker',
                                                                         os.environ.get('BEAM_PIPELINE_MODEL_DIR'))),
        running_mode=vision.RunningMode.VIDEO, num_faces=self.faces, min_face_detection_confidence=0.5,
        min_face_presence_confidence=0.5, min_tracking_confidence=0.5, output_face_blendshapes=True,
        output_facial_transformation_matrixes=True))

  def run(self, task, frames: List[np.ndarray]) -> List[Optional[np.ndarray]]:
    """The largest face's (478, 2) landmarks in output pixels per frame, None where none was found."""
    from model_handlers.mediapipe_face import _areas, _mp_image, to_face_result
    if task is None:
      faces = self.model.infer(frames)
    else:
      faces = []
      for index, image in enumerate(frames):
        found = task.detect_for_video(_mp_image(image), int(round(index * 1000 / OUT_FPS)))
        faces.append(to_face_result(found, image.shape[1], image.shape[0]))
    points = []
    for face in faces:
      order = np.argsort(-_areas(face.boxes())) if face.num_faces else []
      points.append(face.landmarks[order[0]][:, :2].copy() if len(order) else None)
    return points


def landmark_shift(before: List[Optional[np.ndarray]], after: List[Optional[np.ndarray]]) -> dict:
  """Per frame the mean distance of the points (output pixels) where both found the face; frames where one
  found it and the other did not."""
  shifts = [float(np.linalg.norm(a - b, axis=1).mean())
            for a, b in zip(before, after) if a is not None and b is not None]
  return {'frames': len(shifts), 'median_px': statistics.median(shifts) if shifts else None,
          'p95_px': float(np.percentile(shifts, 95)) if shifts else None, 'max_px': max(shifts) if shifts else None,
          'found_by_one_only': sum((a is None) != (b is None) for a, b in zip(before, after))}


# ----------------------------------------------------------------------------- quality of a variant's output

class Frames:
  """A clip's RGB output frames, kept to compare (one clip at a time: 250 frames of 512 px are 200 MB)."""

  def __init__(self):
    self.images: List[np.ndarray] = []

  def __call__(self, image: np.ndarray) -> None:
    self.images.append(image)

  def digest(self) -> str:
    return hashlib.sha256(b''.join(image.tobytes() for image in self.images)).hexdigest()


def psnr(mse: float) -> float:
  return 99.0 if mse <= 1e-10 else 10 * np.log10(255.0 ** 2 / mse)


def decoded(path: str):
  """The mp4's frames as a loader reads them (PyAV, rgb24 with its defaults), and whether each is a keyframe."""
  with av.open(path) as container:
    for frame in container.decode(video=0):
      yield frame.to_ndarray(format='rgb24'), bool(frame.key_frame)


def compare_mp4(today: str, other: str, reference: List[np.ndarray]) -> dict:
  """PSNR of `other` against `today` (both decoded), and of each against `reference` (today's RGB frames: the
  picture the pipeline meant to encode); sizes; keyframes (x264's own choice in both, none forced by the source's)."""
  sums = {'other_vs_today': 0.0, 'today_vs_frames': 0.0, 'other_vs_frames': 0.0}
  count, keys_today, keys_other = 0, [], []
  for (a, key_a), (b, key_b), frame in zip(decoded(today), decoded(other), reference):
    a, b, frame = a.astype(np.float32), b.astype(np.float32), frame.astype(np.float32)
    sums['other_vs_today'] += float(np.mean((a - b) ** 2))
    sums['today_vs_frames'] += float(np.mean((a - frame) ** 2))
    sums['other_vs_frames'] += float(np.mean((b - frame) ** 2))
    keys_today += [count] if key_a else []
    keys_other += [count] if key_b else []
    count += 1
  out = {f'psnr_{k}_db': round(psnr(v / max(count, 1)), 2) for k, v in sums.items()}
  out.update(frames=count, keyframes_today=keys_today, keyframes_other=keys_other, bytes_today=os.path.getsize(today),
             bytes_other=os.path.getsize(other))
  return out


def compare_frames(today: Frames, other: Frames, landmarks_today, landmarker: Landmarker) -> dict:
  """Identical RGB frames, or their PSNR and how far the landmarks moved."""
  same = sum(np.array_equal(a, b) for a, b in zip(today.images, other.images))
  out = {'frames': len(other.images), 'frames_today': len(today.images), 'identical_frames': same}
  if same < len(other.images) or len(other.images) != len(today.images):
    mse = [float(np.mean((a.astype(np.float32) - b) ** 2)) for a, b in zip(today.images, other.images)]
    out['psnr_rgb_db'] = round(psnr(statistics.mean(mse)), 2)
    out['min_psnr_rgb_db'] = round(psnr(max(mse)), 2)
    out['landmarks'] = landmark_shift(landmarks_today, landmarker.run(landmarker.create(), other.images))
  return out


# ----------------------------------------------------------------------------- timing

def timed(variants: List, jobs: List[Job], reps: int, scratch: str) -> Dict[str, dict]:
  """Each variant over every clip, `reps` times, alternated (the order reversed every other round)."""
  runs: Dict[str, List[dict]] = {v.name: [] for v in variants}
  out = os.path.join(scratch, 'timed.mp4')
  for rep in range(reps):
    for variant in (variants if rep % 2 == 0 else variants[::-1]):
      before, began, frames, load_before = cpu_s(), time.monotonic(), 0, load()
      for job in jobs:
        frames += variant.run(job, out)
      runs[variant.name].append({'cpu_s': cpu_s() - before, 'wall_s': time.monotonic() - began, 'frames': frames,
                                 'load': [load_before, load()]})
      print(f'  {variant.name}: {1000 * runs[variant.name][-1]["cpu_s"] / frames:.2f} ms CPU per frame '
            f'(load {load_before})', flush=True)
  return {name: summary(r) for name, r in runs.items()}


def summary(runs: List[dict]) -> dict:
  per_frame = [1000 * r['cpu_s'] / r['frames'] for r in runs]
  walls = [1000 * r['wall_s'] / r['frames'] for r in runs]
  return {'cpu_ms_per_frame': round(statistics.median(per_frame), 3), 'cpu_ms_runs': [round(v, 3) for v in per_frame],
          'wall_ms_per_frame': round(statistics.median(walls), 3), 'wall_ms_runs': [round(v, 3) for v in walls],
          'frames': runs[0]['frames'], 'loads': [r['load'] for r in runs]}


def change(base: dict, other: dict) -> str:
  return f'{100 * (other["cpu_ms_per_frame"] / base["cpu_ms_per_frame"] - 1):+.1f} %'


# ----------------------------------------------------------------------------- the parts

YUV = f'scale={OUT_SIZE}:{OUT_SIZE}:flags=area:out_color_matrix=bt601:out_range=tv,format=yuv420p'
STAGES = {  # what each way of feeding x264 pays per output frame after the crop (the decode and x264 aside)
    'crop -> RGB (today\'s RGB, both)': f'scale={OUT_SIZE}:{OUT_SIZE}:flags=area,format=rgb24',
    'crop -> yuv420p (x264\'s own scale)': YUV,
    'crop -> yuv420p -> RGB (one scale)': YUV + ',format=rgb24'}


def stage_costs(job: Job, frames: int = 100, reps: int = 5) -> Dict[str, float]:
  """CPU ms per frame of each filter chain in STAGES, and of today's RGB -> yuv420p before x264 (PyAV's
  `from_ndarray` and its encoder's conversion), on `frames` decoded frames of the clip; the median of `reps`."""
  from av.video.reformatter import VideoReformatter
  x, y, w, h = job.clip.window
  with av.open(job.clip.path) as container:
    stream = container.streams.video[0]
    container.seek(max(0, int((job.t0 - 0.5) * av.time_base)), backward=True, any_frame=False)
    decoded = [frame for _, frame in zip(range(frames), container.decode(stream))]
    runs: Dict[str, List[float]] = {name: [] for name in [*STAGES, 'RGB -> yuv420p (today, before x264)']}
    rgb = []
    for _ in range(reps):
      for name, chain in STAGES.items():
        graph = av.filter.Graph()
        links = [graph.add_buffer(template=stream), graph.add('crop', f'{w}:{h}:{x}:{y}')]
        links += [graph.add(*part.split('=', 1)) for part in chain.split(',')] + [graph.add('buffersink')]
        for a, b in zip(links, links[1:]):
          a.link_to(b)
        graph.configure()
        began = time.process_time()
        for frame in decoded:
          graph.push(frame)
          out = links[-1].pull().to_ndarray()
          if name.startswith('crop -> RGB') and len(rgb) < len(decoded):
            rgb.append(out)
        runs[name].append(1000 * (time.process_time() - began) / len(decoded))
      reformatter, began = VideoReformatter(), time.process_time()
      for image in rgb:
        reformatter.reformat(av.VideoFrame.from_ndarray(image, format='rgb24'), OUT_SIZE, OUT_SIZE, 'yuv420p')
      runs['RGB -> yuv420p (today, before x264)'].append(1000 * (time.process_time() - began) / len(rgb))
  return {name: round(statistics.median(values), 3) for name, values in runs.items()}


def path_parts(jobs: List[Job], reps: int, scratch: str, parts: List[str], render_before) -> Dict[str, dict]:
  """fps, yuv and render: per clip set (bench, real) the timings, then per clip the quality."""
  today = VideoPath()
  variants = {'fps': [VideoPath('before'), VideoPath('fps_filter')],
              'yuv': [VideoPath(feed='yuv'), VideoPath(feed='yuv own scale')]}
  chosen = [today] + [v for part in ('fps', 'yuv') if part in parts for v in variants[part]]
  renders = []
  if 'render' in parts and render_before is not None:
    import transforms.render as this_tree
    renders = [RenderOf('render() before', render_before), RenderOf('render() this tree', this_tree)]
  landmarker = Landmarker('IMAGE')
  results: Dict[str, dict] = {}
  for label, subset in (('bench', [j for j in jobs if not j.real]), ('real', [j for j in jobs if j.real])):
    if not subset:
      continue
    print(f'{label} clips: timing {len(chosen)} video paths x {reps} ...', flush=True)
    timings = timed(chosen, subset, reps, scratch) if len(chosen) > 1 else {}
    if renders:
      print(f'{label} clips: timing render() before and after x {reps} ...', flush=True)
      timings.update(timed(renders, subset, reps, scratch))
    quality: Dict[str, List[dict]] = {v.name: [] for v in chosen[1:] + renders[1:]}
    for job in subset:
      print(f'  quality: {job.clip.clip_id}', flush=True)
      base, base_mp4 = Frames(), os.path.join(scratch, 'today.mp4')
      today.run(job, base_mp4, base)
      base_landmarks = landmarker.run(landmarker.create(), base.images)
      pairs = [(v, today) for v in chosen[1:]] + ([(renders[1], renders[0])] if renders else [])
      for variant, reference in pairs:
        if reference is not today:  # render() before must make today's frames: checked, then compared as today's
          again = Frames()
          reference.run(job, base_mp4, again)
          if again.digest() != base.digest():
            raise SystemExit(f'{reference.name} does not make the frames the video path makes today on '
                             f'{job.clip.clip_id}: the comparison would mean nothing')
        other, other_mp4 = Frames(), os.path.join(scratch, 'other.mp4')
        variant.run(job, other_mp4, other)
        found = compare_frames(base, other, base_landmarks, landmarker)
        found.update(compare_mp4(base_mp4, other_mp4, base.images), clip=job.clip.clip_id)
        quality[variant.name].append(found)
    results[label] = {'timings': timings, 'quality': quality, 'clips': [j.clip.clip_id for j in subset]}
  return results


def landmarker_part(jobs: List[Job], reps: int, scratch: str) -> Dict[str, dict]:
  """IMAGE (today) against VIDEO with 4 and with 1 face, on today's RGB frames of each clip."""
  variants = [Landmarker('IMAGE'), Landmarker('VIDEO'), Landmarker('VIDEO', 1)]
  results: Dict[str, dict] = {}
  for label, subset in (('bench', [j for j in jobs if not j.real]), ('real', [j for j in jobs if j.real])):
    if not subset:
      continue
    runs = {v.name: [] for v in variants}
    landmarks = {v.name: [] for v in variants}
    creation = []
    for job in subset:
      print(f'  landmarker: {job.clip.clip_id}', flush=True)
      frames = Frames()
      VideoPath().run(job, os.path.join(scratch, 'today.mp4'), frames)
      for rep in range(reps):
        for variant in (variants if rep % 2 == 0 else variants[::-1]):
          before = cpu_s()
          task = variant.create()
          created = cpu_s()
          if task is not None:
            creation.append(created - before)
          load_before, began = load(), time.monotonic()
          points = variant.run(task, frames.images)
          runs[variant.name].append({'cpu_s': cpu_s() - created, 'wall_s': time.monotonic() - began,
                                     'frames': len(frames.images), 'load': [load_before, load()], 'rep': rep})
          if task is not None:
            task.close()
          if rep == 0:
            landmarks[variant.name] += points
    per_rep = {}
    for name, r in runs.items():  # one figure per repetition: every clip of the set, summed
      per_rep[name] = summary([{'cpu_s': sum(x['cpu_s'] for x in r if x['rep'] == k),
                                'wall_s': sum(x['wall_s'] for x in r if x['rep'] == k),
                                'frames': sum(x['frames'] for x in r if x['rep'] == k),
                                'load': [x['load'] for x in r if x['rep'] == k][0]} for k in range(reps)])
    today = variants[0].name
    results[label] = {'timings': per_rep, 'task_creation_cpu_ms': round(1000 * statistics.median(creation), 1),
                      'landmarks': {v.name: landmark_shift(landmarks[today], landmarks[v.name]) for v in variants[1:]},
                      'clips': [j.clip.clip_id for j in subset]}
  return results


# ----------------------------------------------------------------------------- report

def _px(shift: Optional[dict]) -> str:
  if not shift or shift.get('median_px') is None:
    return 'identical frames' if shift is None else 'no face in common'
  return (f'{shift["median_px"]:.3f} / {shift["p95_px"]:.3f} / {shift["max_px"]:.3f} px over {shift["frames"]} frames'
          f'{", found by one only: " + str(shift["found_by_one_only"]) if shift["found_by_one_only"] else ""}')


def _time(t: dict) -> str:
  return (f'{t["cpu_ms_per_frame"]:.2f} ms ({min(t["cpu_ms_runs"]):.2f}-{max(t["cpu_ms_runs"]):.2f}) | '
          f'{t["wall_ms_per_frame"]:.2f} ms | {", ".join("{}->{}".format(*l) for l in t["loads"])}')


def _merge_quality(rows: List[dict]) -> dict:
  """One line for a clip set: the worst of its clips (lowest PSNR, largest landmark shift)."""
  out = {'identical_frames': sum(r['identical_frames'] for r in rows), 'frames': sum(r['frames'] for r in rows),
         'frames_today': sum(r['frames_today'] for r in rows),
         'keyframes_today': sum(len(r['keyframes_today']) for r in rows),
         'keyframes_other': sum(len(r['keyframes_other']) for r in rows),
         'keyframes_match': all(r['keyframes_today'] == r['keyframes_other'] for r in rows),
         'bytes_today': sum(r['bytes_today'] for r in rows), 'bytes_other': sum(r['bytes_other'] for r in rows)}
  for key in ('psnr_rgb_db', 'min_psnr_rgb_db', 'psnr_other_vs_today_db', 'psnr_today_vs_frames_db',
              'psnr_other_vs_frames_db'):
    values = [r[key] for r in rows if key in r]
    if values:
      out[key] = min(values)
  shifts = [r['landmarks'] for r in rows if 'landmarks' in r and r['landmarks']['median_px'] is not None]
  if shifts:
    out['landmarks'] = {'median_px': max(s['median_px'] for s in shifts), 'p95_px': max(s['p95_px'] for s in shifts),
                        'max_px': max(s['max_px'] for s in shifts), 'frames': sum(s['frames'] for s in shifts),
                        'found_by_one_only': sum(s['found_by_one_only'] for s in shifts)}
  return out


def path_section(part: str, results: dict, today: str, names: List[str], header: List[str]) -> List[str]:
  lines = [HEADINGS[part], ''] + header + ['',
           '| clips | variant | CPU per output frame, median (range) | wall per frame | load | change | RGB frames '
           'vs today | landmarks vs today: median / p95 / max of per-frame mean shift | mp4 decoded: PSNR vs '
           'today; vs today\'s RGB frames (today\'s own) | mp4 bytes vs today; keyframes |',
           '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for label, found in results.items():
    base = found['timings'].get(today)
    if base:
      lines.append(f'| {label} ({len(found["clips"])}) | {today} (today) | {_time(base)} | | | | | |')
    for name in names:
      t = found['timings'].get(name)
      if not t:
        continue
      q = _merge_quality(found['quality'][name])
      frames = f'{q["identical_frames"]} of {q["frames"]} identical'
      if not q['identical_frames'] == q['frames'] == q['frames_today']:
        frames += f', PSNR {q["psnr_rgb_db"]:.1f} dB (worst frame {q["min_psnr_rgb_db"]:.1f})'
        frames += '' if q['frames'] == q['frames_today'] else f', today {q["frames_today"]} frames'
      mp4 = (f'{q["psnr_other_vs_today_db"]:.1f} dB; {q["psnr_other_vs_frames_db"]:.1f} dB '
             f'({q["psnr_today_vs_frames_db"]:.1f} dB)')
      keys = 'at the same frames' if q['keyframes_match'] else f'today {q["keyframes_today"]}'
      size = f'{q["bytes_other"] / q["bytes_today"]:.3f}x; keyframes {q["keyframes_other"]} ({keys})'
      lines.append(f'| {label} | {name} | {_time(t)} | {change(base, t)} | {frames} | {_px(q.get("landmarks"))} | '
                   f'{mp4} | {size} |')
  return lines


def write_section(heading_part: str, lines: List[str], raw: dict, results: str) -> None:
  """The table, then every raw figure: one JSON object per clip set."""
  print('\n'.join(lines))
  lines = lines + ['', '```json'] + [json.dumps({label: found}, sort_keys=True) for label, found in raw.items()] + [
      '```', '']
  if results:
    replace_section(results, HEADINGS[heading_part], lines)


def main(argv: Optional[List[str]] = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--sources', type=int, default=2, help='Generated sources (720p and 1080p alternating).')
  parser.add_argument('--duration', type=float, default=60.0, help='Source length in seconds (two 10 s clips each).')
  parser.add_argument('--reps', type=int, default=5, help='Runs of each variant for the CPU figures (median).')
  parser.add_argument('--landmarker_reps', type=int, default=3, help='Runs of each landmarker mode per clip.')
  parser.add_argument('--no_real', action='store_true', help='Leave out ../shared/real_clips.')
  parser.add_argument('--parts', nargs='*', default=['landmarker', 'fps', 'yuv', 'render'],
                      choices=('landmarker', 'fps', 'yuv', 'render'), help='Which A/Bs to run.')
  parser.add_argument('--before', default='HEAD', help='The revision whose render() the render part compares with.')
  parser.add_argument('--work', default=os.path.join(REPO, 'bench', 'work'), help='Cache of sources and scratch.')
  parser.add_argument('--results', default=RESULTS, help='Where to write the sections ("" prints only).')
  args = parser.parse_args(argv)
  models = os.path.join(os.path.dirname(REPO), 'shared', 'models')
  if not os.environ.get('BEAM_PIPELINE_MODEL_DIR') and os.path.isdir(models):
    os.environ['BEAM_PIPELINE_MODEL_DIR'] = models
  os.environ.setdefault('GLOG_minloglevel', '2')
  jobs = [j for j in workload(args.work, args.sources, args.duration) if not (args.no_real and j.real)]
  command = 'python bench/render_paths.py ' + ' '.join(argv if argv is not None else sys.argv[1:])
  os.makedirs(args.work, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix='render-paths-', dir=args.work) as scratch:
    m = machine()
    header = [f'`{command.strip()}` on {m["cpu"]}, {m["cores"]} cores, shared (load average before: {m["load"]}). '
              f'Workload: {sum(not j.real for j in jobs)} bench clips ({args.sources} generated sources of '
              f'{args.duration:g} s, two 10 s clips each, fixed crop window, 720p and 1080p) and '
              f'{sum(j.real for j in jobs)} real clips (../shared/real_clips, whole, 512 px), to {OUT_SIZE} px '
              f'{OUT_FPS:g} fps, x264 crf {CRF} {PRESET}. CPU: getrusage of the process and its children (all '
              f'threads) per output frame, median of the runs (range); wall likewise; load: 1-minute load average '
              f'before -> after each run.']
    if 'landmarker' in args.parts:
      found = landmarker_part(jobs, args.landmarker_reps, scratch)
      lines = [HEADINGS['landmarker'], ''] + header + [
          '', f'The same RGB output frames (today\'s) through the landmarker, {args.landmarker_reps} runs per '
          'clip, alternated. VIDEO: one task per clip (its creation timed apart), timestamps index x 40 ms.', '',
          '| clips | mode | CPU per output frame, median (range) | wall per frame | load | change | landmarks vs '
          'IMAGE: median / p95 / max of per-frame mean shift |', '| --- | --- | --- | --- | --- | --- | --- |']
      for label, r in found.items():
        today = Landmarker('IMAGE').name
        base = r['timings'][today]
        lines.append(f'| {label} ({len(r["clips"])}) | {today} (today) | {_time(base)} | | |')
        for name, shift in r['landmarks'].items():
          lines.append(f'| {label} | {name} | {_time(r["timings"][name])} | {change(base, r["timings"][name])} | '
                       f'{_px(shift)} |')
        lines.append(f'| {label} | VIDEO task creation, per clip | {r["task_creation_cpu_ms"]:.0f} ms CPU | | | | |')
      write_section('landmarker', lines, found, args.results)
    if any(part in args.parts for part in ('fps', 'yuv', 'render')):
      before = render_module_at(args.before, scratch) if 'render' in args.parts else None
      if 'render' in args.parts and before is None:
        print(f'render: transforms/render.py is the same as at {args.before}; nothing to compare', flush=True)
      found = path_parts(jobs, args.reps, scratch, args.parts, before)
      today = VideoPath().name
      for part, names in (('fps', [VideoPath('before').name, VideoPath('fps_filter').name]),
                          ('yuv', [VideoPath(feed='yuv').name, VideoPath(feed='yuv own scale').name])):
        if part in args.parts:
          raw = {label: {'timings': {k: v for k, v in r['timings'].items() if k in names + [today]},
                         'quality': {k: v for k, v in r['quality'].items() if k in names}, 'clips': r['clips']}
                 for label, r in found.items()}
          lines = path_section(part, raw, today, names, header)
          stages = {j.clip.clip_id: stage_costs(j) for j in jobs
                    if part == 'yuv' and not j.real and j.clip.clip_id.endswith('_0')}
          if stages:
            raw['stages'] = stages
            lines += ['', 'Where it goes: CPU ms per frame of each step after the crop, alone on 100 decoded frames of '
                      'each source\'s first clip (median of 5; `time.process_time`):', '',
                      '| clip (crop) | ' + ' | '.join(next(iter(stages.values()))) + ' |',
                      '| --- |' + ' --- |' * len(next(iter(stages.values())))]
            lines += [f'| {clip} ({next(j for j in jobs if j.clip.clip_id == clip).clip.window[2]} px) | '
                      + ' | '.join(f'{v:.2f}' for v in costs.values()) + ' |' for clip, costs in stages.items()]
          write_section(part, lines, raw, args.results)
      if before is not None:
        names = ['render() this tree']
        raw = {label: {'timings': {k: v for k, v in r['timings'].items() if k.startswith('render()')},
                       'quality': {k: v for k, v in r['quality'].items() if k in names}, 'clips': r['clips']}
               for label, r in found.items()}
        write_section('render', path_section('render', raw, 'render() before', names, header + [
            '', f'`render()` as the pipeline runs it (audio, wav and all), transforms/render.py at `{args.before}` '
            'against this tree\'s.']), raw, args.results)


if __name__ == '__main__':
  main()
