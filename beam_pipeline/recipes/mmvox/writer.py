"""Multimodal VoxCeleb's layout (MMVID's data/mmvoxceleb), one unit per face tube, for `--recipe=mmvox`.

  video/<key>/<NNNNNNN>.png     every frame of the tube, 256x256 (--tube_format=mp4: video/<key>.mp4)
  mask/<key>/<NNNNNNN>.png      colour face parsing (face-parsing.PyTorch's palette) of every 4th frame
  draw/style1/<key>/<NNNNNNN>.png  pencil drawing of every 4th frame (beam_pipeline/recipes/mmvox/sketch.py)
  label/<key>.txt               40 CelebA attributes, one line "0,1,..." (beam_pipeline/recipes/mmvox/attributes.py)
  label/<key>.json              which of them were inferred from the video and which are unknown
  txt/<key>.txt                 20 captions, one a line (beam_pipeline/recipes/mmvox/captions.py)
  <output>_local.pkl            beside the folder: the loader cache MMVID's VoxDataset reads (`loader_cache`)
  <output>_attr_dict_vox2.pkl   beside the folder: VoxDataset's speaker groups and attribute index

Keys are MMVID's (`tube_key`: VoxCeleb's `<speaker>#<video>#<utterance>.txt#000.mp4` or
`<source>#<clip>#<tube>`), so its speaker grouping finds a tube's siblings. Frames, masks and drawings are
made in the render pass (`MmvoxFrames`, after the face parsing) into per-clip frame archives in the work
dir; `WriteTube` lays a kept tube's archives out, writes its label and captions, publishes the unit
(published/<key, '~' for '#'>.jsonl) last, and only then deletes the tube's work-dir media.
"""
from __future__ import annotations

import json
import pickle
from typing import Dict, Iterable, List, Optional, Tuple

import apache_beam as beam
import cv2
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from beam_pipeline.recipes.mmvox.attributes import AttributeFormat, from_file, infer_attributes, lookup, parse_row
from beam_pipeline.recipes.mmvox.captions import captions
from beam_pipeline.recipes.mmvox.sketch import pencil_sketch
from transforms.analyzers import parsing
from transforms.core.elements import ClipTask, Reject
from transforms.core.fileio import delete_quietly, iter_jsonl, read_bytes, write_atomic
from transforms.core.frame_store import FrameArchive, archive_uri, read_frame_archive
from transforms.deadletter import DeadLetter
from transforms.frame_analysis import ClipPass, Frame, FrameAnalyzer, PassResult
from transforms.writers.folders import (
    UnitFiles, existing, publish_unit, published_records, same_version, unit_indexes, unpublish)

STAGE = 'write'
LAYOUT = 'mmvox'
VIDEO, MASK, DRAW = 'mmvox_video', 'mmvox_mask', 'mmvox_draw'
EVERY = 4  # masks and drawings on frames 0, 4, 8, ...
DRAW_STYLE = 'style1'
# PNG settings (lossless either way: the same pixels), by bench/recipe_frames.py on 256 px tubes. Frames: zlib level 2
# with the Paeth filter on every row, 1.8x faster than level 3 with libpng's per-row filter choice for 3 % more bytes
# (level 9: 16x the time for 8 % fewer). Masks and drawings (flat colours, grey strokes): OpenCV's default (level 1,
# the Sub filter, run-length matches), 2.5x faster than level 3 and smaller.
PNG_PHOTO = (cv2.IMWRITE_PNG_COMPRESSION, 2, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_PAETH)
PNG_FLAT = ()
# BiSeNet classes whose share of a parsed frame says an attribute (attributes.PARSED_AT); the offline
# parsing never gives them.
PARSED_CLASSES = {'Eyeglasses': parsing.GLASSES, 'Wearing_Earrings': parsing.EARRING, 'Wearing_Hat': parsing.HAT}
CACHE_SUFFIX = '_local.pkl'  # VoxDataset's default cache: <folder>_local.pkl beside the folder
ATTRIBUTE_INDEX_SUFFIX = '_attr_dict_vox2.pkl'
FLAGS_SUFFIX = '.json'  # label/<key>.json beside label/<key>.txt: which labels were inferred, which unknown
CACHE_PROTOCOL = 4  # readable by every Python 3 MMVID runs on


def frame_name(index: int) -> str:
  return f'{index:07d}.png'


def hair_measure(rgb: np.ndarray, parsed: np.ndarray) -> Tuple[float, float, float, float]:
  """(share of the frame parsed as hair, median CIELAB L (0-100), a, b of those pixels); NaN colour without
  hair."""
  hair = parsed == parsing.HAIR
  if not hair.any():
    return 0.0, np.nan, np.nan, np.nan
  lab = cv2.cvtColor(rgb.astype(np.float32) / 255.0, cv2.COLOR_RGB2LAB)[hair]
  lightness, a, b = np.median(lab, axis=0)
  return float(hair.mean()), float(lightness), float(a), float(b)


def png(image: np.ndarray, settings=PNG_PHOTO) -> bytes:
  """PNG bytes of an RGB (H, W, 3) or grey (H, W) image; the same pixels always give the same bytes."""
  pixels = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if image.ndim == 3 else image
  ok, data = cv2.imencode('.png', pixels, list(settings))
  if not ok:
    raise ValueError(f'could not encode a {image.shape} frame as PNG')
  return data.tobytes()


class _FramesPass(ClipPass):

  def __init__(self, work_dir: str, clip_id: str, num_frames: int, keep_frames: bool):
    names = ((VIDEO,) if keep_frames else ()) + (MASK, DRAW)
    self.archives = {name: FrameArchive(archive_uri(work_dir, clip_id, name)) for name in names}
    self.hair = np.full((num_frames, 4), np.nan, np.float32)
    self.shares = np.full((num_frames, len(PARSED_CLASSES)), np.nan, np.float32)

  def add(self, frames: List[Frame]) -> None:
    for frame in frames:
      name = frame_name(frame.index)
      if VIDEO in self.archives:
        self.archives[VIDEO].add(name, png(frame.image))
      if frame.index % EVERY:
        continue
      parsed = frame.found.get('parsing')
      if parsed is not None:
        self.archives[MASK].add(name, png(parsing.colorize(parsed), PNG_FLAT))
        if frame.index < len(self.hair):
          self.hair[frame.index] = hair_measure(frame.image, parsed)
          self.shares[frame.index] = [np.mean(parsed == label) for label in PARSED_CLASSES.values()]
      self.archives[DRAW].add(name, png(pencil_sketch(frame.image), PNG_FLAT))

  def finish(self, num_frames: int) -> PassResult:
    files = {name: archive.close() for name, archive in self.archives.items()}
    return PassResult({'hair': self.hair[:num_frames], 'parsed_shares': self.shares[:num_frames]}, 0, '', files)

  def abandon(self) -> None:
    for archive in self.archives.values():
      archive.discard()


class MmvoxFrames(FrameAnalyzer):
  """The tube's frames (png layout only), colour masks and drawings of every 4th frame into frame archives,
  and per parsed frame what the labels infer from (arrays `hair`: hair share and colour, `parsed_shares`: the
  shares of PARSED_CLASSES). Goes after the parsing analyzers, whose `found['parsing']` it draws."""

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


def tube_key(task: ClipTask) -> str:
  """MMVID's key of a tube (its folder and file names), whose first two '#' fields are the group VoxDataset
  draws another tube of the same speaker from: VoxCeleb's `<speaker>#<video>#<utterance>.txt#<NNN>.mp4` when
  the manifest names them, else `<source>#<clip>#<tube>`. NNN is the clip's number in its manifest row; a
  clip cut into several tubes (or --max_clip_s pieces) adds the spine's piece suffix (`_f<start ms>`), which
  does not change when a tube earlier in the clip is found or lost."""
  prefix = task.source_id + '_'
  rest = task.clip_id[len(prefix):] if task.clip_id.startswith(prefix) else task.clip_id
  clip, _, piece = rest.partition('_')
  clip = clip.zfill(3) if clip.isdigit() else clip
  if task.origin:
    speaker, video, utterance = task.origin
    return f'{speaker}#{video}#{utterance}.txt#{clip}{"_" + piece if piece else ""}.mp4'
  return f'{task.source_id}#{clip}#{piece or "000"}'


def unit_name(key: str) -> str:
  """The tube's published/<unit>.jsonl name: its key with '~' for '#' (a '#' in an object name is read back
  wrongly by some GCS tools, and the spine reads these files back; no key has a '~')."""
  return key.replace('#', '~')


class WriteTube(beam.DoFn):
  """Analysis of a kept tube -> its files in the layout, then published/<unit_name>.jsonl, then its work-dir media
  deleted; yields the tube's index record (a retried bundle finds the tube published and its media gone: the
  published record again; a tube an earlier run published before its clip changed is unpublished, written over,
  what it had and this version has not deleted, and published again: transforms/writers/folders.py). The
  attribute table is a side input (`table`: key -> 40 '0'/'1' characters)."""

  def __init__(self, output: str, tube_format: str, infer_parsed: bool):
    self.output = output
    self.tube_format = tube_format
    self.infer_parsed = infer_parsed
    self.tubes = Metrics.counter(STAGE, 'mmvox_tubes')
    self.inferred = Metrics.counter(STAGE, 'mmvox_labels_inferred')

  def published(self, analysis) -> Optional[List[dict]]:
    """The tube's record when some attempt published it from the same inputs (DeadLetter: a concurrent
    attempt)."""
    task = analysis.clip.task
    records = published_records(self.output, unit_name(tube_key(task)))
    return records if same_version(records, [(task.clip_id, task.inputs)]) else None

  def process(self, analysis, table=None):
    clip = analysis.clip
    task = clip.task
    key = tube_key(task)
    files = clip.files
    published = published_records(self.output, unit_name(key))
    if published and published[0].get('id') != task.clip_id:  # two manifest rows name the same utterance
      delete_quietly([clip.mp4_uri, *files.values()])
      yield beam.pvalue.TaggedOutput('rejects', Reject(
          task.clip_id, STAGE, 'duplicate_key', f'{key} is already {published[0].get("id")}\'s (speaker, video and '
          'utterance must name one manifest row)', task.source_id, planned_id=task.planned_id))
      return
    if same_version(published, [(task.clip_id, task.inputs)]):  # a retry: the media went at the publish
      delete_quietly([clip.mp4_uri, *files.values()])
      yield from published
      return
    if published is not None:  # the tube's clip changed since a run published it: made again over it
      unpublish(self.output, unit_name(key), published)
    written = UnitFiles(self.output)
    if self.tube_format == 'mp4':
      write_atomic(written.uri('video', key + '.mp4'), read_bytes(clip.mp4_uri))
      frames = clip.num_frames
    else:
      frames = self._expand(written, files[VIDEO], 'video', key)
    masks = self._expand(written, files[MASK], 'mask', key)
    drawings = self._expand(written, files[DRAW], 'draw', DRAW_STYLE, key)
    row = lookup(table or {}, key, task.clip_id, task.planned, task.source_id)
    if row is not None:
      labels = from_file(row)
    else:
      self.inferred.inc()
      shares = analysis.arrays.get('parsed_shares')
      parsed = ({name: shares[:, column] for column, name in enumerate(PARSED_CLASSES)}
                if self.infer_parsed and shares is not None else None)
      labels = infer_attributes(analysis.arrays['blendshapes'], analysis.arrays.get('hair'), parsed)
    write_atomic(written.uri('label', key + '.txt'), labels.text().encode())
    write_atomic(written.uri('label', key + FLAGS_SUFFIX), json.dumps(labels.flags(), sort_keys=True).encode())
    text = '\n'.join(captions(key, labels.values, labels.known))  # no final newline, as MMVID's make_text.py
    write_atomic(written.uri('txt', key + '.txt'), text.encode())
    record = {
        'id': task.clip_id, 'planned_id': task.planned, 'source_id': task.source_id, 'num_frames': clip.num_frames,
        'fps': clip.fps, 'size': clip.size, 'start': round(task.start, 4), 'end': round(task.end, 4),
        'window': list(task.window), 'layout': LAYOUT, 'tube_format': self.tube_format, 'frames': frames,
        'masks': masks, 'drawings': drawings, 'labels': 'file' if row is not None else 'inferred',
        'inferred': list(labels.inferred), 'active': [i for i, value in enumerate(labels.values) if value],
        'scores': analysis.scores, 'inputs': task.inputs, **({'language': task.language} if task.language else {}),
    }
    written.drop_others(tube_files(self.output, key))  # frames past the new count, the other tube format's
    published = publish_unit(self.output, unit_name(key), [record], folder=key)
    delete_quietly([clip.mp4_uri, *files.values()])
    self.tubes.inc()
    yield from published

  @staticmethod
  def _expand(written: UnitFiles, archive: str, *folder: str) -> int:
    count = 0
    for name, data in read_frame_archive(archive):
      write_atomic(written.uri(*folder, name), data)
      count += 1
    return count


def tube_files(output: str, key: str) -> List[str]:
  """Every file of tube `key` in the layout, its video first (what VoxDataset's cache lists)."""
  single = [_join(output, 'video', key + '.mp4'), _join(output, 'label', key + '.txt'),
            _join(output, 'label', key + FLAGS_SUFFIX), _join(output, 'txt', key + '.txt')]
  folders = (('video', key), ('mask', key), ('draw', DRAW_STYLE, key))
  found = existing([_join(output, *folder, '*') for folder in folders])
  return [uri for uri in single[:1] if FileSystems.exists(uri)] + found + [
      uri for uri in single[1:] if FileSystems.exists(uri)]


# ----------------------------------------------------------------------------- the loader caches

def cache_uri(output: str, suffix: str = CACHE_SUFFIX) -> str:
  """`<output>_local.pkl` (or `_attr_dict_vox2.pkl`) beside the output folder, where VoxDataset looks."""
  return output.rstrip('/') + suffix


def cache_entry(record: dict) -> Tuple[str, Tuple[int, str, Tuple[int, ...]]]:
  """(key, (frames, format, active attributes)) of a tube's index record: all the caches need of it."""
  return record['folder'], (int(record['num_frames']), record.get('tube_format', 'png'),
                            tuple(record.get('active', ())))


class LoaderCacheFn(beam.CombineFn):
  """(key, (frames, format, active attributes)) of every tube -> one dict of them: ids, lengths and a few
  attribute indexes per tube (frame paths are only spelled out when the cache is written), so the whole run's
  accumulator is a few MB even for VoxCeleb's ~20k tubes."""

  def create_accumulator(self):
    return {}

  def add_input(self, accumulator, entry):
    key, value = entry
    accumulator[key] = value
    return accumulator

  def merge_accumulators(self, accumulators):
    merged = {}
    for accumulator in accumulators:
      merged.update(accumulator)
    return merged

  def extract_output(self, accumulator):
    return accumulator


def loader_cache(root: str, tubes: Dict[str, tuple]) -> dict:
  """The dict MMVID's VoxDataset pickles (mmvid_pytorch/loader_ext.py): `keys`, and per key its caption
  file, its frame files (paths relative to the data root, in frame order) and its frame count. A tube
  written as mp4 lists its one mp4 (MMVID's own loader reads frames: use png for it)."""
  keys = sorted(tubes)
  videos = {}
  for key in keys:
    frames, tube_format = tubes[key][:2]
    videos[key] = ([f'video/{key}.mp4'] if tube_format == 'mp4'
                   else [f'video/{key}/{frame_name(i)}' for i in range(frames)])
  return {'root': root, 'keys': keys, 'texts': {key: f'txt/{key}.txt' for key in keys}, 'videos': videos,
          'lengths': {key: tubes[key][0] for key in keys}}


def attribute_index(tubes: Dict[str, tuple]) -> dict:
  """The dict VoxDataset builds once and keeps beside the folder (`<folder>_attr_dict_vox2.pkl`): `pid`, its
  speaker groups (`'#'.join(key.split('#')[:2])`), and `cat1`, attribute index -> keys where it is 1. Written
  here so that a run adding tubes never leaves a stale one (MMVID would fail on a key it lacks)."""
  groups: Dict[str, List[str]] = {}
  active: Dict[int, List[str]] = {}
  for key in sorted(tubes):
    groups.setdefault('#'.join(key.split('#')[:2]), []).append(key)
    for index in tubes[key][2]:
      active.setdefault(index, []).append(key)
  return {'pid': groups, 'attr': {}, 'cat1': active}


def write_loader_cache(tubes: Dict[str, tuple], output: str) -> str:
  uri = cache_uri(output)
  write_atomic(cache_uri(output, ATTRIBUTE_INDEX_SUFFIX), pickle.dumps(attribute_index(tubes),
                                                                        protocol=CACHE_PROTOCOL))
  write_atomic(uri, pickle.dumps(loader_cache(output, tubes), protocol=CACHE_PROTOCOL))
  return uri


def earlier_tubes(output: str) -> Iterable[dict]:
  """Index records of the mmvox tubes published into `output`."""
  for index in unit_indexes(output):
    for record in iter_jsonl(index):
      if record.get('layout') == LAYOUT:
        yield record


def attribute_rows(line: str, layout: AttributeFormat, uri: str) -> Iterable[Tuple[str, str]]:
  row = parse_row(line, layout, f'--attributes {uri}')
  if row is not None:
    yield row


class WriteLayout(beam.PTransform):
  """Analyses of kept tubes -> {'records', 'rejects'}: each tube written and published (the loader caches come
  once the run's tubes are published or retired: `WriteLoaderCaches`). The --attributes table is read from its
  file by the workers (a side input), never held in the job graph."""

  def __init__(self, output: str, tube_format: str, attributes: Optional[Tuple[str, AttributeFormat]],
               infer_parsed: bool):
    super().__init__()
    self.output = output
    self.attributes = attributes
    self.writer = WriteTube(output, tube_format, infer_parsed)

  def expand(self, kept):
    pipeline = kept.pipeline
    if self.attributes:
      uri, layout = self.attributes
      rows = (pipeline
              | 'MmvoxReadAttributes' >> beam.io.ReadFromText(uri, skip_header_lines=layout.header_lines)
              | 'MmvoxParseAttributes' >> beam.FlatMap(attribute_rows, layout, uri))
    else:
      rows = pipeline | 'MmvoxNoAttributes' >> beam.Create([])
    written = kept | 'MmvoxWriteTubes' >> beam.ParDo(DeadLetter(self.writer, STAGE), table=beam.pvalue.AsDict(
        rows)).with_outputs('rejects', main='records')
    return {'records': written.records, 'rejects': written.rejects}


class WriteLoaderCaches(beam.PTransform):
  """`settled` (one element once every tube of the run is published or retired) -> the loader caches, from the
  index records of every tube the output holds then (a combine, not a pass over the frames): a tube a rerun
  retired is not listed, one it made again is listed as it is now."""

  def __init__(self, output: str):
    super().__init__()
    self.output = output

  def expand(self, settled):
    return (settled.pipeline
            | 'MmvoxOutputDir' >> beam.Create([self.output])
            | 'MmvoxTubes' >> beam.FlatMap(lambda output, _: earlier_tubes(output), beam.pvalue.AsSingleton(settled))
            | 'MmvoxCacheEntries' >> beam.Map(cache_entry)
            | 'MmvoxCombineCache' >> beam.CombineGlobally(LoaderCacheFn())
            | 'MmvoxWriteCache' >> beam.Map(write_loader_cache, self.output))
