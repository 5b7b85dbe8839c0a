"""Multimodal VoxCeleb's layout (MMVID's data/mmvoxceleb), one unit per face tube, for `--recipe=mmvox`.

  video/<id>/<NNNNNNN>.png     every frame of the tube, 256x256 (--tube_format=mp4: video/<id>.mp4)
  mask/<id>/<NNNNNNN>.png      colour face parsing (face-parsing.PyTorch's palette) of every 4th frame
  draw/style1/<id>/<NNNNNNN>.png  pencil drawing of every 4th frame (beam_pipeline/recipes/mmvox/sketch.py)
  label/<id>.txt               40 CelebA attributes, "0,1,..." (beam_pipeline/recipes/mmvox/attributes.py)
  txt/<id>.txt                 20 captions, one a line (beam_pipeline/recipes/mmvox/captions.py)
  mmvox_local.pkl              the loader cache MMVID's VoxDataset reads (see LoaderCache)

Frames, masks and drawings are made in the render pass (`MmvoxFrames`, after the face parsing) into per-clip
frame archives in the work dir; `WriteTube` lays a kept tube's archives out, writes its label and captions,
publishes the unit (published/<id>.jsonl) last, and only then deletes the tube's work-dir media.
"""
from __future__ import annotations

import pickle
from typing import Dict, Iterable, List, Optional, Tuple

import apache_beam as beam
import cv2
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from beam_pipeline.recipes.mmvox.attributes import from_file, infer_attributes, lookup
from beam_pipeline.recipes.mmvox.captions import captions
from beam_pipeline.recipes.mmvox.sketch import pencil_sketch
from transforms.analyzers import parsing
from transforms.core.elements import ClipTask
from transforms.core.fileio import delete_quietly, iter_jsonl, read_bytes, write_atomic
from transforms.core.frame_store import FrameArchive, archive_uri, read_frame_archive
from transforms.deadletter import DeadLetter
from transforms.frame_analysis import ClipPass, Frame, FrameAnalyzer, PassResult
from transforms.writers.folders import publish_unit, published_records, unit_indexes

STAGE = 'write'
LAYOUT = 'mmvox'
VIDEO, MASK, DRAW = 'mmvox_video', 'mmvox_mask', 'mmvox_draw'
EVERY = 4  # masks and drawings on frames 0, 4, 8, ...
DRAW_STYLE = 'style1'
PNG_LEVEL = 3  # zlib level: about 2x faster than the default 9 on 256 px frames for ~8 % more bytes
CACHE_NAME = 'mmvox_local.pkl'
CACHE_PROTOCOL = 4  # readable by every Python 3 MMVID runs on


def frame_name(index: int) -> str:
  return f'{index:07d}.png'


def png(image: np.ndarray) -> bytes:
  """PNG bytes of an RGB (H, W, 3) or grey (H, W) image; the same pixels always give the same bytes."""
  pixels = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
  ok, data = cv2.imencode('.png', pixels, [cv2.IMWRITE_PNG_COMPRESSION, PNG_LEVEL])
  if not ok:
    raise ValueError(f'could not encode a {image.shape} frame as PNG')
  return data.tobytes()


class _FramesPass(ClipPass):

  def __init__(self, work_dir: str, clip_id: str, num_frames: int, keep_frames: bool):
    names = ((VIDEO,) if keep_frames else ()) + (MASK, DRAW)
    self.archives = {name: FrameArchive(archive_uri(work_dir, clip_id, name)) for name in names}
    self.eyeglasses = np.full((num_frames,), np.nan, np.float32)

  def add(self, frames: List[Frame]) -> None:
    for frame in frames:
      name = frame_name(frame.index)
      if VIDEO in self.archives:
        self.archives[VIDEO].add(name, png(frame.image))
      if frame.index % EVERY:
        continue
      parsed = frame.found.get('parsing')
      if parsed is not None:
        self.archives[MASK].add(name, png(parsing.colorize(parsed)))
        if frame.index < len(self.eyeglasses):
          self.eyeglasses[frame.index] = float(np.mean(parsed == parsing.GLASSES))
      self.archives[DRAW].add(name, png(pencil_sketch(frame.image)))

  def finish(self, num_frames: int) -> PassResult:
    files = {name: archive.close() for name, archive in self.archives.items()}
    return PassResult({'eyeglasses_share': self.eyeglasses[:num_frames]}, 0, '', files)

  def abandon(self) -> None:
    for archive in self.archives.values():
      archive.discard()


class MmvoxFrames(FrameAnalyzer):
  """The tube's frames (png layout only), colour masks and drawings of every 4th frame into frame archives,
  and the share of eyeglasses pixels per parsed frame (array `eyeglasses_share`, for the labels). Goes after
  the parsing analyzers, whose `found['parsing']` it draws."""

  name = 'mmvox_frames'
  batch_size = 1

  def __init__(self, work_dir: str, keep_frames: bool = True):
    self.work_dir = work_dir
    self.keep_frames = keep_frames

  def setup(self) -> None:
    pass  # nothing to load: PNG encoding and the sketch are plain OpenCV

  def start(self, task: ClipTask, num_frames: int, size: int) -> ClipPass:
    return _FramesPass(self.work_dir, task.clip_id, num_frames, self.keep_frames)


def _join(output: str, *parts: str) -> str:
  return FileSystems.join(output, *parts)


class WriteTube(beam.DoFn):
  """Analysis of a kept tube -> its files in the layout, then published/<id>.jsonl, then its work-dir media
  deleted; yields the tube's index record (a retried bundle finds the tube published and its media gone: the
  published record again)."""

  def __init__(self, output: str, tube_format: str, attribute_table: Dict[str, Tuple[int, ...]],
               infer_eyeglasses: bool):
    self.output = output
    self.tube_format = tube_format
    self.attribute_table = attribute_table
    self.infer_eyeglasses = infer_eyeglasses
    self.tubes = Metrics.counter(STAGE, 'mmvox_tubes')
    self.inferred = Metrics.counter(STAGE, 'mmvox_labels_inferred')

  def published(self, analysis) -> Optional[List[dict]]:
    """The tube's record when some attempt published it (DeadLetter: a concurrent attempt)."""
    return published_records(self.output, analysis.clip.task.clip_id)

  def process(self, analysis):
    clip = analysis.clip
    task = clip.task
    key = task.clip_id
    files = clip.files
    published = published_records(self.output, key)
    if published is not None:  # a retried bundle: the tube's media went once it was published
      delete_quietly([clip.mp4_uri, *files.values()])
      yield from published
      return
    if self.tube_format == 'mp4':
      write_atomic(_join(self.output, 'video', key + '.mp4'), read_bytes(clip.mp4_uri))
      frames = clip.num_frames
    else:
      frames = self._expand(files[VIDEO], 'video', key)
    masks = self._expand(files[MASK], 'mask', key)
    drawings = self._expand(files[DRAW], 'draw', DRAW_STYLE, key)
    row = lookup(self.attribute_table, key, task.planned, task.source_id)
    if row is not None:
      labels = from_file(row)
    else:
      self.inferred.inc()
      labels = infer_attributes(analysis.arrays['blendshapes'],
                                analysis.arrays.get('eyeglasses_share') if self.infer_eyeglasses else None)
    write_atomic(_join(self.output, 'label', key + '.txt'), labels.text().encode())
    text = '\n'.join(captions(key, labels.values, labels.known))  # no final newline, as MMVID's make_text.py
    write_atomic(_join(self.output, 'txt', key + '.txt'), text.encode())
    record = {
        'id': key, 'planned_id': task.planned, 'source_id': task.source_id, 'num_frames': clip.num_frames,
        'fps': clip.fps, 'size': clip.size, 'start': round(task.start, 4), 'end': round(task.end, 4),
        'window': list(task.window), 'layout': LAYOUT, 'tube_format': self.tube_format, 'frames': frames,
        'masks': masks, 'drawings': drawings, 'labels': 'file' if row is not None else 'inferred',
        'inferred': list(labels.inferred), 'scores': analysis.scores,
    }
    published = publish_unit(self.output, key, [record])
    delete_quietly([clip.mp4_uri, *files.values()])
    self.tubes.inc()
    yield from published

  def _expand(self, archive: str, *folder: str) -> int:
    count = 0
    for name, data in read_frame_archive(archive):
      write_atomic(_join(self.output, *folder, name), data)
      count += 1
    return count


# ----------------------------------------------------------------------------- the loader cache

def cache_entry(record: dict) -> Tuple[str, int, str]:
  return record['id'], int(record['num_frames']), record.get('tube_format', 'png')


class LoaderCacheFn(beam.CombineFn):
  """(id, frames, format) of every tube -> one dict id -> (frames, format); small per tube, so the whole
  run's cache is a few MB even for VoxCeleb's ~20k tubes."""

  def create_accumulator(self):
    return {}

  def add_input(self, accumulator, entry):
    key, frames, tube_format = entry
    accumulator[key] = (frames, tube_format)
    return accumulator

  def merge_accumulators(self, accumulators):
    merged = {}
    for accumulator in accumulators:
      merged.update(accumulator)
    return merged

  def extract_output(self, accumulator):
    return accumulator


def loader_cache(root: str, tubes: Dict[str, Tuple[int, str]]) -> dict:
  """The dict MMVID's VoxDataset pickles (mmvid_pytorch/loader_ext.py): `keys`, and per key its caption
  file, its frame files (paths relative to the data root, in frame order) and its frame count. A tube
  written as mp4 lists its one mp4 (MMVID's own loader reads frames: use png for it)."""
  keys = sorted(tubes)
  videos = {}
  for key in keys:
    frames, tube_format = tubes[key]
    videos[key] = ([f'video/{key}.mp4'] if tube_format == 'mp4'
                   else [f'video/{key}/{frame_name(i)}' for i in range(frames)])
  return {'root': root, 'keys': keys, 'texts': {key: f'txt/{key}.txt' for key in keys}, 'videos': videos,
          'lengths': {key: tubes[key][0] for key in keys}}


def write_loader_cache(tubes: Dict[str, Tuple[int, str]], output: str) -> str:
  uri = _join(output, CACHE_NAME)
  write_atomic(uri, pickle.dumps(loader_cache(output, tubes), protocol=CACHE_PROTOCOL))
  return uri


def earlier_tubes(output: str) -> Iterable[dict]:
  """Index records of the mmvox tubes earlier runs published into `output` (the cache covers them too)."""
  for index in unit_indexes(output):
    for record in iter_jsonl(index):
      if record.get('layout') == LAYOUT:
        yield record


class WriteLayout(beam.PTransform):
  """Analyses of kept tubes -> {'records', 'rejects'}: each tube written and published, then the loader
  cache once from the records of this run and the earlier ones (a combine, not a pass over the output)."""

  def __init__(self, output: str, tube_format: str, attribute_table: Dict[str, Tuple[int, ...]],
               infer_eyeglasses: bool):
    super().__init__()
    self.output = output
    self.writer = WriteTube(output, tube_format, attribute_table, infer_eyeglasses)

  def expand(self, kept):
    written = kept | 'MmvoxWriteTubes' >> beam.ParDo(DeadLetter(self.writer, STAGE)).with_outputs(
        'rejects', main='records')
    earlier = (kept.pipeline
               | 'MmvoxOutputDir' >> beam.Create([self.output])
               | 'MmvoxEarlierTubes' >> beam.FlatMap(earlier_tubes))
    _ = ((written.records, earlier)
         | 'MmvoxAllTubes' >> beam.Flatten()
         | 'MmvoxCacheEntries' >> beam.Map(cache_entry)
         | 'MmvoxCombineCache' >> beam.CombineGlobally(LoaderCacheFn())
         | 'MmvoxWriteCache' >> beam.Map(write_loader_cache, self.output))
    return {'records': written.records, 'rejects': written.rejects}
