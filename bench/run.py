"""Benchmark the `hdtf` recipe against its floor, a seed-script baseline and 1 against N local workers.

  python bench/run.py [--sources 8] [--duration 60] [--work bench/work]
  python bench/run.py --skip baseline long_sources --worker_runs 2   # default, floor, 1 vs N workers (~9 min)

A script, not a test: it prints a table and writes bench/results.md. Every
figure comes from one run on this machine; the load average before and after
is recorded with it, because figures taken on a shared machine are noisy.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from fractions import Fraction
from typing import Dict, List, Optional, Tuple

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import av  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402

from apache_beam.options.pipeline_options import PipelineOptions  # noqa: E402

from beam_pipeline import local_runner  # noqa: E402
from beam_pipeline.demo import VideoSpec, write_video  # noqa: E402
from beam_pipeline.options import TalkingFaceOptions  # noqa: E402

SIZES = ((1280, 720, 1.4), (1920, 1080, 2.0))  # width, height, face scale; sources alternate
CLIP_S = 10.0
# The pipeline runs with its defaults; the floor and the baseline must do the same work.
_DEFAULTS = PipelineOptions([]).view_as(TalkingFaceOptions)
OUT_SIZE, OUT_FPS, CRF, PRESET = _DEFAULTS.size, _DEFAULTS.fps, _DEFAULTS.crf, _DEFAULTS.x264_preset
BATCH = _DEFAULTS.landmark_batch_size


# ----------------------------------------------------------------------------- workload

@dataclasses.dataclass(frozen=True)
class Clip:
  clip_id: str
  path: str
  start: float
  end: float
  window: Tuple[int, int, int, int]  # x, y, w, h


def source_spec(index: int, duration: float) -> VideoSpec:
  width, height, scale = SIZES[index % len(SIZES)]
  return VideoSpec(duration=duration, fps=30.0, width=width, height=height, face_scale=scale,
                   motion_px=0.04 * width, seed=index)


def crop_window(spec: VideoSpec) -> Tuple[int, int, int, int]:
  """A fixed square around the area the face drifts over (as HDTF's crop_wh gives one)."""
  face = max(300, 320) * spec.face_scale
  side = int(min(spec.height, 1.15 * face + 2 * spec.motion_px)) // 2 * 2
  return (spec.width - side) // 2, (spec.height - side) // 2, side, side


def clip_ranges(duration: float) -> List[Tuple[float, float]]:
  """Two 10 s clips: one near the start, one near the end (so longer sources mean deeper seeks)."""
  return [(5.0, 5.0 + CLIP_S), (duration - 5.0 - CLIP_S, duration - 5.0)]


def _generate(args) -> str:
  path, index, duration = args
  write_video(path + '.partial.mp4', source_spec(index, duration))
  os.replace(path + '.partial.mp4', path)  # an interrupted run leaves no half source in the cache
  return path


def _stamp(seconds: float) -> str:
  return f'{int(seconds // 60):02d}:{seconds % 60:04.1f}'


def make_workload(root: str, sources: int, duration: float, repeat: int = 1) -> Tuple[str, List[Clip]]:
  """Sources (cached) and an HDTF annotation dir; `repeat` > 1 concatenates each source that many times."""
  root = os.path.abspath(root)
  media = os.path.join(root, 'media')
  os.makedirs(media, exist_ok=True)
  base = [os.path.join(media, f'src{i}_{duration:g}s.mp4') for i in range(sources)]
  todo = [(p, i, duration) for i, p in enumerate(base) if not os.path.exists(p)]
  if todo:
    print(f'generating {len(todo)} sources of {duration:g} s ...', flush=True)
    with multiprocessing.Pool(min(len(todo), os.cpu_count() or 1)) as pool:
      pool.map(_generate, todo)
  paths = base
  if repeat > 1:
    paths = [p.replace('.mp4', f'_x{repeat}.mp4') for p in base]
    for src, dst in zip(base, paths):
      if not os.path.exists(dst):
        concat(src, dst, repeat)
  total = duration * repeat
  tag = f'{len(paths)}x{total:g}s'
  annotations = os.path.join(root, f'hdtf_{tag}')
  shutil.rmtree(annotations, ignore_errors=True)
  os.makedirs(annotations)
  clips, urls, times, crops, heights = [], [], [], [], []
  for i, path in enumerate(paths):
    spec = source_spec(i, total)
    name = f'src{i}'
    window = crop_window(spec)
    urls.append(f'{name}.mp4 {path}')
    heights.append(f'{name}.mp4 {spec.height}')
    ranges = clip_ranges(total)
    times.append(f'{name}.mp4 ' + ' '.join(f'{_stamp(a)}-{_stamp(b)}' for a, b in ranges))
    for k, (a, b) in enumerate(ranges):
      x, y, w, h = window
      crops.append(f'{name}_{k}.mp4 {x} {w} {y} {h}')  # HDTF order: x, width, y, height
      clips.append(Clip(f'{name}_{k}', path, a, b, window))
  for kind, lines in (('video_url', urls), ('resolution', heights), ('annotion_time', times), ('crop_wh', crops)):
    with open(os.path.join(annotations, f'BENCH_{kind}.txt'), 'w') as handle:
      handle.write('\n'.join(lines) + '\n')
  return annotations, clips


def ffmpeg() -> str:
  import imageio_ffmpeg
  return imageio_ffmpeg.get_ffmpeg_exe()


def concat(src: str, dst: str, times: int) -> None:
  """`times` copies of `src` back to back, without re-encoding."""
  listing = dst + '.txt'
  with open(listing, 'w') as handle:
    handle.write(''.join(f"file '{src}'\n" for _ in range(times)))
  subprocess.run([ffmpeg(), '-y', '-loglevel', 'error', '-f', 'concat', '-safe', '0', '-i', listing,
                  '-c', 'copy', dst + '.tmp.mp4'], check=True)
  os.replace(dst + '.tmp.mp4', dst)
  os.unlink(listing)


# ----------------------------------------------------------------------------- machine

def _load() -> float:
  """1-minute load average: how busy the (possibly shared) machine was around a measurement."""
  return round(os.getloadavg()[0], 1)


# ----------------------------------------------------------------------------- memory

class PeakRss(threading.Thread):
  """Polls /proc for the peak resident set (VmHWM) of a process and of its SDK worker children."""

  def __init__(self, pid: int, every_s: float = 0.25):
    super().__init__(daemon=True)
    self.pid, self.every_s = pid, every_s
    self.peaks: Dict[int, Tuple[str, int]] = {}
    self.stopped = threading.Event()

  def run(self):
    while not self.stopped.is_set():
      for pid in self._tree():
        hwm = _status_kb(pid, 'VmHWM')
        if hwm:
          role = 'worker' if 'sdk_worker_main' in _cmdline(pid) else ('main' if pid == self.pid else 'other')
          self.peaks[pid] = (role, max(hwm, self.peaks.get(pid, ('', 0))[1]))
      self.stopped.wait(self.every_s)

  def _tree(self) -> List[int]:
    parents = {}
    for entry in os.listdir('/proc'):
      if entry.isdigit():
        try:
          with open(f'/proc/{entry}/stat') as handle:
            parents[int(entry)] = int(handle.read().rsplit(')', 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
          continue
    tree, frontier = [self.pid], [self.pid]
    while frontier:
      frontier = [pid for pid, parent in parents.items() if parent in frontier]
      tree += frontier
    return tree

  def stop(self) -> Dict[str, int]:
    """Peak MiB per role: the main process and the largest SDK worker."""
    self.stopped.set()
    self.join()
    out: Dict[str, int] = {}
    for role, kb in self.peaks.values():
      out[role] = max(out.get(role, 0), kb // 1024)
    return out


def _status_kb(pid: int, field: str) -> int:
  try:
    with open(f'/proc/{pid}/status') as handle:
      for line in handle:
        if line.startswith(field + ':'):
          return int(line.split()[1])
  except OSError:
    pass
  return 0


def _cmdline(pid: int) -> str:
  try:
    with open(f'/proc/{pid}/cmdline', 'rb') as handle:
      return handle.read().replace(b'\0', b' ').decode(errors='replace')
  except OSError:
    return ''


# ----------------------------------------------------------------------------- ours

def run_pipeline(annotations: str, root: str, name: str, extra: List[str]) -> dict:
  """`python -m beam_pipeline` as a user runs it, timed, with peak RSS per process role."""
  output, work = os.path.join(root, 'runs', name, 'out'), os.path.join(root, 'runs', name, 'work')
  shutil.rmtree(os.path.join(root, 'runs', name), ignore_errors=True)
  command = [sys.executable, '-m', 'beam_pipeline', f'--input={annotations}', f'--output={output}',
             f'--work_dir={work}', *extra]
  print(f'{name}: {" ".join(command[1:])}', flush=True)
  load = _load()
  cpu_before = _children_cpu_s()
  began = time.monotonic()
  process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  rss = PeakRss(process.pid)
  rss.start()
  log, _ = process.communicate()
  wall = time.monotonic() - began
  cpu = _children_cpu_s() - cpu_before
  peaks = rss.stop()
  if process.returncode:
    raise SystemExit(f'{name} failed:\n{log[-4000:]}')
  with open(os.path.join(output, 'stats.json')) as handle:
    stats = json.load(handle)
  if not stats['balanced']:
    raise SystemExit(f'{name}: accounting does not add up: {stats}')
  if stats['rejected']:
    print(f'{name}: WARNING {stats["rejected"]} clips rejected ({stats["rejected_by_reason"]}): '
          'clips/s and frames/s count written clips only', flush=True)
  return {'wall_s': wall, 'cpu_s': cpu, 'clips': stats['written'], 'frames': stats['frames_written'],
          'rss_mb': peaks, 'rejected': stats['rejected_by_reason'], 'load': (load, _load())}


def _children_cpu_s() -> float:
  """User + system CPU of the waited children (an SDK worker process counts once its parent waited it): over
  a run, how many cores it kept busy, so 1 worker's own threads (landmarker, codecs) show."""
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


# ----------------------------------------------------------------------------- floor

def _landmarker():
  """The landmarker as the render pass calls it: the pipeline's handler settings, in a `SharedModel`
  (batches of `BATCH`, in the calling thread). A fresh one per measurement, as each pays its own start-up."""
  from beam_pipeline.pipeline import MAX_TRACKED_FACES
  from model_handlers.in_process import SharedModel
  from model_handlers.mediapipe_face import FaceLandmarkerModelHandler
  model = SharedModel(FaceLandmarkerModelHandler(model_dir=os.environ.get('BEAM_PIPELINE_MODEL_DIR'),
                                                 max_batch_size=BATCH, max_faces=MAX_TRACKED_FACES))
  model.setup()
  return model


def landmarks_and_sharpness(model, frames: List[np.ndarray], source_scale: float) -> int:
  """Landmarks of every frame and the sharpness of its largest face, as the render pass measures them.

  Returns the frames the model failed on (`ModelError`), so a broken model cannot pass for a fast one."""
  from model_handlers.in_process import ModelError
  from transforms.lib.features import face_sharpness
  failed = 0
  for image, face in zip(frames, model.infer(frames)):
    if isinstance(face, ModelError):
      failed += 1
    elif face.num_faces:
      face_sharpness(image, face.boxes()[0], source_scale)
  return failed


def _seek(container, t0: float) -> None:
  container.seek(max(0, int((t0 - 0.5) * av.time_base)), backward=True, any_frame=False)


def decode_only(clip: Clip) -> int:
  """Decode the clip's source frames (from the keyframe before it, as any seek must); no conversion."""
  count = 0
  with av.open(clip.path) as container:
    stream = container.streams.video[0]
    stream.thread_type = 'AUTO'
    _seek(container, clip.start)
    for frame in container.decode(stream):
      if frame.time >= clip.end:
        break
      count += frame.time >= clip.start
  return count


def output_frames(clip: Clip) -> Tuple[List[np.ndarray], np.ndarray, int]:
  """(RGB output frames, mono float audio, audio rate) for the clip: the floor's untimed inputs."""
  x, y, w, h = clip.window
  count = int(round((clip.end - clip.start) * OUT_FPS))
  frames: List[np.ndarray] = []
  with av.open(clip.path) as container:
    stream = container.streams.video[0]
    stream.thread_type = 'AUTO'
    _seek(container, clip.start)
    for frame in container.decode(stream):
      while len(frames) < count and frame.time + 0.5 / 30 >= clip.start + len(frames) / OUT_FPS:
        crop = frame.to_ndarray(format='rgb24')[y:y + h, x:x + w]
        frames.append(cv2.resize(crop, (OUT_SIZE, OUT_SIZE), interpolation=cv2.INTER_AREA))
      if len(frames) >= count:
        break
  with av.open(clip.path) as container:
    rate = container.streams.audio[0].rate
    resampler = av.AudioResampler(format='flt', layout='mono', rate=rate)
    _seek(container, clip.start)
    pieces = []
    for frame in container.decode(audio=0):
      if frame.time >= clip.end:
        break
      for out in resampler.resample(frame):
        pieces.append(out.to_ndarray().reshape(-1))
  audio = np.concatenate(pieces)[:int((clip.end - clip.start) * rate)].astype(np.float32)
  return frames, audio, rate


def encode_outputs(frames: List[np.ndarray], audio: np.ndarray, rate: int, path: str) -> None:
  """H.264 (the pipeline's crf and preset) + AAC mp4, and the 16 kHz wav, as the pipeline writes them."""
  fps = Fraction(OUT_FPS).limit_denominator(1001)
  with av.open(path, 'w', format='mp4', options={'movflags': '+faststart'}) as out:
    video = out.add_stream('libx264', rate=fps)
    video.width = video.height = OUT_SIZE
    video.pix_fmt = 'yuv420p'
    video.options = {'crf': str(CRF), 'preset': PRESET}
    sound = out.add_stream('aac', rate=rate)
    sound.layout = 'mono'
    for index, image in enumerate(frames):
      frame = av.VideoFrame.from_ndarray(image, format='rgb24')
      frame.pts, frame.time_base = index, 1 / fps
      out.mux(video.encode(frame))
    out.mux(video.encode(None))
    for offset in range(0, len(audio), 1024):
      frame = av.AudioFrame.from_ndarray(audio[None, offset:offset + 1024], format='flt', layout='mono')
      frame.sample_rate, frame.pts, frame.time_base = rate, offset, Fraction(1, rate)
      out.mux(sound.encode(frame))
    out.mux(sound.encode(None))
  wav = av.AudioResampler(format='s16', layout='mono', rate=16000)
  frame = av.AudioFrame.from_ndarray(audio[None, :], format='flt', layout='mono')
  frame.sample_rate = rate
  pcm = b''.join(p.to_ndarray().tobytes() for p in wav.resample(frame) + wav.resample(None))
  with open(path[:-4] + '.pcm', 'wb') as handle:
    handle.write(pcm)


def measure_floor(clips: List[Clip], scratch: str) -> dict:
  """Each part of the unavoidable work, measured alone and summed."""
  model = _landmarker()
  load = _load()
  parts = {'decode_s': 0.0, 'landmarks_s': 0.0, 'encode_s': 0.0}
  decoded = frames_out = failed = 0
  for clip in clips:
    began = time.monotonic()
    decoded += decode_only(clip)
    parts['decode_s'] += time.monotonic() - began
    frames, audio, rate = output_frames(clip)
    frames_out += len(frames)
    began = time.monotonic()
    failed += landmarks_and_sharpness(model, frames, clip.window[2] / OUT_SIZE)
    parts['landmarks_s'] += time.monotonic() - began
    began = time.monotonic()
    encode_outputs(frames, audio, rate, os.path.join(scratch, clip.clip_id + '.mp4'))
    parts['encode_s'] += time.monotonic() - began
  if failed:
    raise SystemExit(f'floor: the landmarker failed on {failed} of {frames_out} frames')
  parts['total_s'] = sum(parts.values())
  parts.update(source_frames=decoded, output_frames=frames_out, load=(load, _load()))
  return parts


# ----------------------------------------------------------------------------- baseline

def measure_baseline(clips: List[Clip], scratch: str) -> dict:
  """Seed-script style, one clip after another: ffmpeg cut+crop+resize to a temp mp4, then separate
  passes over that file for frames (jpg, as AD-NeRF's process_video.py), landmarks and audio."""
  from transforms.core.elements import FaceResult
  from transforms.lib.features import face_sharpness
  model = _landmarker()
  load = _load()
  began = time.monotonic()
  for clip in clips:
    folder = os.path.join(scratch, clip.clip_id)
    os.makedirs(os.path.join(folder, 'ori_imgs'), exist_ok=True)
    x, y, w, h = clip.window
    mp4 = os.path.join(folder, 'clip.mp4')
    subprocess.run([ffmpeg(), '-y', '-loglevel', 'error', '-ss', f'{clip.start:.3f}', '-i', clip.path,
                    '-t', f'{clip.end - clip.start:.3f}', '-vf',
                    f'crop={w}:{h}:{x}:{y},scale={OUT_SIZE}:{OUT_SIZE}:flags=area,fps={OUT_FPS:g}',
                    '-c:v', 'libx264', '-crf', str(CRF), '-preset', PRESET, '-pix_fmt', 'yuv420p',
                    '-c:a', 'aac', mp4], check=True)
    subprocess.run([ffmpeg(), '-y', '-loglevel', 'error', '-i', mp4, '-qmin', '1', '-q:v', '1',
                    '-start_number', '0', os.path.join(folder, 'ori_imgs', '%d.jpg')], check=True)
    names = sorted(os.listdir(os.path.join(folder, 'ori_imgs')), key=lambda n: int(n.split('.')[0]))
    landmarks = []
    for name in names:
      image = cv2.cvtColor(cv2.imread(os.path.join(folder, 'ori_imgs', name)), cv2.COLOR_BGR2RGB)
      face = model.infer([image])[0]  # a ModelError (the model failed on the frame) counts as no face
      found = isinstance(face, FaceResult) and face.num_faces
      landmarks.append(face.landmarks[0] if found else np.full((478, 3), np.nan, np.float32))
      if found:  # the pipeline measures it too (the floor and earlier baselines included it)
        face_sharpness(image, face.boxes()[0], w / OUT_SIZE)
    np.save(os.path.join(folder, 'landmarks.npy'), np.stack(landmarks))
    subprocess.run([ffmpeg(), '-y', '-loglevel', 'error', '-i', mp4, '-f', 'wav', '-ar', '16000', '-ac', '1',
                    os.path.join(folder, 'aud.wav')], check=True)
  wall = time.monotonic() - began
  return {'wall_s': wall, 'load': (load, _load())}


# ----------------------------------------------------------------------------- report

def machine() -> dict:
  try:
    with open('/proc/cpuinfo') as handle:
      model = next((l.split(':', 1)[1].strip() for l in handle if l.startswith('model name')), platform.machine())
  except OSError:
    model = platform.machine()
  return {'cpu': model, 'cores': os.cpu_count(), 'load': ' '.join(f'{v:.1f}' for v in os.getloadavg())}


def replace_section(path: str, heading: str, body: List[str]) -> None:
  """Replace (or append) the section of results.md under `heading` with `body` (its lines, the heading first);
  the rest of the file is kept as it is."""
  with open(path) as handle:
    text = handle.read()
  head, found, tail = text.partition('\n' + heading + '\n')
  after = ''
  if found:
    rest = tail.split('\n## ', 1)
    after = '\n## ' + rest[1] if len(rest) > 1 else ''
  with open(path, 'w') as handle:
    handle.write(head.rstrip('\n') + '\n\n' + '\n'.join(body).rstrip('\n') + '\n' + after)


def _span(values: List[int]) -> str:
  return f'{min(values)}' if min(values) == max(values) else f'{min(values)}-{max(values)}'


def _loads(part: dict) -> str:
  return ' (load {} -> {})'.format(*part['load']) if 'load' in part else ''


def table(results: dict) -> str:
  w = results['workload']
  ours, floor, base = results.get('ours'), results.get('floor'), results.get('baseline')
  rows = [('workload', f'{w["sources"]} sources ({w["sizes"]}), {w["duration"]:g} s at 30 fps, '
                       f'{w["clips"]} clips of {CLIP_S:g} s -> {OUT_SIZE}px {OUT_FPS:g} fps')]
  if ours:
    rows += [(f'ours, default local runner ({results["default_workers"]}): wall',
              f'{ours["wall_s"]:.1f} s{_loads(ours)}'),
             ('ours: clips/s', f'{ours["clips"] / ours["wall_s"]:.3f}'),
             ('ours: output frames/s', f'{ours["frames"] / ours["wall_s"]:.1f}'),
             ('ours: peak RSS (main process)', f'{ours["rss_mb"].get("main", 0)} MiB')]
  if floor:
    rows += [('floor: decode needed source frames', f'{floor["decode_s"]:.1f} s ({floor["source_frames"]} frames)'),
             ('floor: landmarker on every output frame',
              f'{floor["landmarks_s"]:.1f} s ({floor["output_frames"]} frames)'),
             ('floor: encode outputs (mp4 + wav)', f'{floor["encode_s"]:.1f} s'),
             ('floor: total', f'{floor["total_s"]:.1f} s{_loads(floor)}')]
    cores = results['cores_in_use']
    rows.append((f'floor / {cores} cores in use', f'{floor["total_s"] / cores:.1f} s'))
    if ours:
      rows.append(('end-to-end / floor', f'{ours["wall_s"] / floor["total_s"]:.2f}x'))
      rows.append((f'end-to-end / (floor / {cores} cores)', f'{ours["wall_s"] * cores / floor["total_s"]:.2f}x'))
  if base:
    rows.append(('baseline (sequential ffmpeg + jpg + landmarks + wav passes): wall',
                 f'{base["wall_s"]:.1f} s{_loads(base)}'))
    if ours:
      rows.append(('baseline / ours', f'{base["wall_s"] / ours["wall_s"]:.2f}x'))
  workers = results.get('workers', {})
  walls = {name: statistics.median(run['wall_s'] for run in runs) for name, runs in workers.items()}
  for name, runs in workers.items():
    rss = max(run['rss_mb'].get('worker') or run['rss_mb'].get('main', 0) for run in runs)
    spread = '' if len(runs) == 1 else ' median of {} ({:.1f}-{:.1f} s),'.format(
        len(runs), *(f(run['wall_s'] for run in runs) for f in (min, max)))
    loads = ', '.join('{}->{}'.format(*run['load']) for run in runs)
    rows.append((f'{name}: wall', f'{walls[name]:.1f} s,{spread} peak RSS per process {rss} MiB (load {loads})'))
    if all('cpu_s' in run for run in runs):
      cpu = statistics.median(run['cpu_s'] for run in runs)
      busy = statistics.median(run['cpu_s'] / run['wall_s'] for run in runs)
      rows.append((f'{name}: CPU', f'{cpu:.1f} s, {busy:.2f} cores busy on average'))
  for name in walls:
    if ONE_WORKER in walls and name != ONE_WORKER:
      rows.append((f'speed-up 1 worker -> {name}', f'{walls[ONE_WORKER] / walls[name]:.2f}x'))
  if ONE_WORKER in walls and ours:
    rows.append(('speed-up 1 worker -> default', f'{walls[ONE_WORKER] / ours["wall_s"]:.2f}x'))
  long = results.get('long_sources')
  if long:
    short_rss = [r['rss_mb'].get('worker', 0) for r in long['short']]
    long_rss = [r['rss_mb'].get('worker', 0) for r in long['long']]
    rows.append((f'peak RSS per worker (1 worker), {long["duration"]:g} s vs {long["repeat"]}x longer sources',
                 f'{_span(short_rss)} MiB vs {_span(long_rss)} MiB over {len(long_rss)} runs each '
                 f'(max {max(long_rss) - max(short_rss):+d} MiB)'))
  width = max(len(r[0]) for r in rows)
  text = [f'| {"measure".ljust(width)} | value |', f'| {"-" * width} | --- |']
  text += [f'| {a.ljust(width)} | {b} |' for a, b in rows]
  return '\n'.join(text)


KEPT_SECTION = '## Scale simulation'  # written by bench/scale.py; kept from this heading on


def kept_sections(path: str) -> str:
  """What other scripts wrote into `path` (from KEPT_SECTION on), to be written back unchanged."""
  try:
    with open(path) as handle:
      text = handle.read()
  except FileNotFoundError:
    return ''
  at = text.find('\n' + KEPT_SECTION)
  return text[at + 1:] if at >= 0 else ''


def write_results(path: str, results: dict) -> None:
  """Rewrites this script's part of `path` and keeps the sections other scripts wrote after it."""
  m = results['machine']
  body = [
      '# Benchmark results', '',
      f'Measured {results["date"]} by `python bench/run.py {results["argv"]}` on {m["cpu"]}, '
      f'{m["cores"]} cores. Load average (1/5/15 min) before: {m["load"]}; after: {results["load_after"]}.',
      '', table(results), '',
      'Floor: decoding exactly the clips\' source frames (from the keyframe a seek lands on), the face '
      f'landmarker on every output frame as the render pass calls it (SharedModel, batches of {BATCH}, with '
      'the face\'s sharpness) and encoding the outputs (H.264 crf 18 veryfast + '
      'AAC + 16 kHz wav), each timed alone in one process, summed; divided by the cores the default run uses, '
      'the wall time those cores could reach if the parts spread over them perfectly. Workers: the same job '
      'with 1 worker (in_memory) and with N (threads, then processes). Baseline: the seed scripts\' way, one clip '
      'after another: an ffmpeg subprocess cuts, crops and resizes to a temporary mp4, then separate passes '
      'extract jpg frames, run the landmarker on each jpg and extract the wav. Peak RSS is VmHWM from /proc.',
      '', '```json', json.dumps(results, indent=2, sort_keys=True), '```', '']
  kept = kept_sections(path)
  with open(path + '.tmp', 'w') as handle:
    handle.write('\n'.join(body) + ('\n' + kept if kept else ''))
  os.replace(path + '.tmp', path)


ONE_WORKER = '1 worker, in_memory'


def worker_runs(n: int) -> Dict[str, List[str]]:
  """The runs of the 1 vs N worker comparison: their names and the flags that make them."""
  return {ONE_WORKER: ['--direct_num_workers=1'],
          **{f'{n} workers, {mode}': [f'--direct_num_workers={n}', f'--direct_running_mode={mode}']
             for mode in ('multi_threading', 'multi_processing')}}


def main(argv: Optional[List[str]] = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--sources', type=int, default=8, help='How many sources (alternating 720p and 1080p).')
  parser.add_argument('--duration', type=float, default=60.0, help='Source length in seconds.')
  parser.add_argument('--long_repeat', type=int, default=4, help='How many times longer the long sources are.')
  parser.add_argument('--rss_runs', type=int, default=3,
                      help='Runs each of the short and the long sources for the peak RSS comparison.')
  parser.add_argument('--work', default=os.path.join(REPO, 'bench', 'work'), help='Cache of sources and runs.')
  parser.add_argument('--results', default=os.path.join(REPO, 'bench', 'results.md'), help='Where to write.')
  parser.add_argument('--skip', nargs='*', default=[],
                      choices=('ours', 'floor', 'baseline', 'workers', 'long_sources'),
                      help='Parts not to run.')
  parser.add_argument('--workers', type=int, default=local_runner.usable_cores(),
                      help='N of the 1 vs N worker comparison (default: the cores this process may use).')
  parser.add_argument('--worker_runs', type=int, default=1,
                      help='Runs of each worker setting, alternated; the table gives the median.')
  args = parser.parse_args(argv)
  shortest = 2 * CLIP_S + 10.0
  if args.duration < shortest:  # shorter, the two clips overlap and the pipeline rejects one of them
    parser.error(f'--duration must be at least {shortest:g} s (two {CLIP_S:g} s clips 5 s from each end)')
  models = os.path.join(os.path.dirname(REPO), 'shared', 'models')
  if not os.environ.get('BEAM_PIPELINE_MODEL_DIR') and os.path.isdir(models):
    os.environ['BEAM_PIPELINE_MODEL_DIR'] = models
  os.makedirs(args.work, exist_ok=True)
  annotations, clips = make_workload(args.work, args.sources, args.duration)
  default = local_runner.choose(local_runner.usable_cores(), local_runner.available_mib())
  results = {'date': time.strftime('%Y-%m-%d %H:%M %Z'), 'argv': ' '.join(argv if argv is not None else sys.argv[1:]),
             'machine': machine(), 'default_workers': '{} worker(s), {}'.format(*default),
             'cores_in_use': default[0],
             'workload': {'sources': args.sources, 'duration': args.duration, 'clips': len(clips),
                          'sizes': ', '.join(f'{sum(1 for i in range(args.sources) if i % 2 == k)}x{h}p'
                                             for k, (_, h, _) in enumerate(SIZES))}}
  scratch = tempfile.mkdtemp(prefix='bench-', dir=args.work)
  try:
    if 'ours' not in args.skip:
      results['ours'] = run_pipeline(annotations, args.work, 'ours', ['--no_progress', '--no_report'])
    if 'floor' not in args.skip:
      print('floor ...', flush=True)
      results['floor'] = measure_floor(clips, tempfile.mkdtemp(dir=scratch))
    if 'baseline' not in args.skip:
      print('baseline ...', flush=True)
      results['baseline'] = measure_baseline(clips, tempfile.mkdtemp(dir=scratch))
    if 'workers' not in args.skip:
      runs = worker_runs(args.workers)
      results['workers'] = {name: [] for name in runs}
      for _ in range(args.worker_runs):  # alternated, so a change in the machine's load hits each alike
        for name, flags in runs.items():
          results['workers'][name].append(run_pipeline(annotations, args.work, name.replace(' ', '_').replace(
              ',', ''), [*flags, '--no_progress', '--no_report']))
    if 'long_sources' not in args.skip:
      long_annotations, _ = make_workload(args.work, args.sources, args.duration, args.long_repeat)
      one_worker = ['--direct_running_mode=multi_processing', '--direct_num_workers=1', '--no_progress', '--no_report']
      runs = {'short': [], 'long': []}
      for _ in range(args.rss_runs):  # alternated, so a change in the machine's load hits both alike
        runs['short'].append(run_pipeline(annotations, args.work, 'rss_short', one_worker))
        runs['long'].append(run_pipeline(long_annotations, args.work, 'rss_long', one_worker))
      results['long_sources'] = dict(runs, repeat=args.long_repeat, duration=args.duration)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  results['load_after'] = ' '.join(f'{v:.1f}' for v in os.getloadavg())
  print(table(results))
  write_results(args.results, results)
  print(f'wrote {args.results}')
  return results


if __name__ == '__main__':
  main()
