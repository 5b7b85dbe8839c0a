"""report.html: what a curator judges a run, and its filter thresholds, from.

Written next to the shards it describes, local or gs:// (everything is read and
written through Beam FileSystems), after a run or later with

    python -m beam_pipeline.report OUTPUT

- totals, and rejects by reason; for every reason a few rejected clips, each
  with its thumbnail (ScoreAndFilter writes them into report_media/rejects/)
  and the value it measured against the threshold it failed; those nearest
  the threshold play as short clips with their audio (the filter stage's
  previews, transforms/filters.NearestRejects);
- a few kept samples as short looping videos with their landmarks drawn (and
  their audio), and a contact sheet of more;
- folder recipes: their subjects or tubes (clips, frames), and for a few the
  files they hold and frames spread over them with their overlays;
- per score, kept and rejected clips against the threshold: dots when there
  are few clips, histograms otherwise, axes in plain numbers with units;
- a table of clips, kept and rejected, with every score each was measured on,
  that sorts on a click on a header.

Memory stays bounded by what is shown: index.jsonl and rejects.jsonl are
streamed (a few numbers per clip are kept, table rows up to TABLE_ROWS), and
only the shards holding the shown samples are opened, each only up to the
samples wanted from it. Fields a run did not compute show as "not computed".
"""
from __future__ import annotations

import argparse
import array
import collections
import dataclasses
import heapq
import html
import io
import itertools
import json
import os
import sys
import tarfile
import urllib.parse
import zlib
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import av
import cv2
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms.core.fileio import PARTIAL, iter_jsonl, read_bytes, write_atomic
from transforms.filters import REJECT_CLIP_S, REJECT_THUMBNAILS
from transforms.lib.preview import draw_points, preview_mp4 as clip_preview
from transforms.writers.shards import sample_key

REPORT = 'report.html'
MEDIA = 'report_media'
FIGURES = f'{MEDIA}/figures'
SAMPLE_VIDEOS = f'{MEDIA}/samples'
FOLDER_PICTURES = f'{MEDIA}/folders'
THUMB = 192  # contact sheet tiles
PREVIEW = 256  # kept-sample videos: side in pixels, seconds at most, how many
PREVIEW_S = 4.0
VIDEOS = 4
REJECTS_SHOWN = 6  # per reason: half nearest the threshold, the rest spread over the reason's clips
TABLE_ROWS = 5000
FOLDERS_LISTED = 200  # folder recipes: subjects / tubes in the table, and how many get pictures
FOLDERS_PICTURED = 4
FOLDER_FRAMES = 4  # frames per pictured folder, spread over it
TILE = 160
DOTS_BELOW = 20  # fewer clips than this: a dot per clip instead of a histogram
LANGUAGES_SHOWN = 8  # score distributions per language: the languages with most clips; the rest as one row
NO_LANGUAGE, OTHER_LANGUAGES = '(none)', '(other)'
NOT_COMPUTED = 'not computed'
KEPT_COLOUR, REJECTED_COLOUR = '#3b7dd8', '#d8453b'


@dataclasses.dataclass(frozen=True)
class Metric:
  """A per-clip score (a key of the sample json's `scores`) and the filter that rejects on it."""
  score: str
  label: str
  unit: str
  reason: str
  flag: str
  fails: str  # how the value compares with the threshold when the clip is rejected
  column: str = ''  # header in the clips table; '' keeps it out of the table
  magnitude: bool = False  # the filter compares |value| (the json keeps the sign)
  whole: bool = False  # counts (pixels, frames): whole-number ticks


METRICS = (
    Metric('duration', 'duration', 's', 'too_short', 'min_duration', '<', 'duration (s)'),
    Metric('source_face_px', 'face size in the source', 'px', 'face_too_small', 'min_face_px', '<',
           'face (source px)'),
    Metric('sharpness', 'face sharpness', 'variance of the Laplacian', 'blurry', 'min_sharpness', '<', 'sharpness'),
    Metric('max_abs_yaw', 'head yaw, largest |angle|', 'degrees', 'yaw_too_large', 'max_yaw', '>', '|yaw| max (°)'),
    Metric('max_abs_pitch', 'head pitch, largest |angle|', 'degrees', 'pitch_too_large', 'max_pitch', '>',
           '|pitch| max (°)'),
    Metric('sync_corr', 'mouth/audio correlation', 'Pearson r', 'av_sync_low', 'min_sync_corr', '<', 'sync corr (r)'),
    Metric('lse_c', 'SyncNet confidence (LSE-C)', 'distance', 'sync_conf_low', 'min_sync_conf', '<', 'SyncNet conf'),
    Metric('av_offset_frames', 'SyncNet AV offset, |offset|', 'frames at 25 fps', 'av_offset_large', 'max_av_offset',
           '>', 'AV offset', magnitude=True, whole=True),
    Metric('face_ratio', 'frames with a face', 'fraction of frames', 'face_ratio_low', 'min_face_ratio', '<'),
    Metric('source_resolution', 'source short side', 'px', 'low_resolution', 'min_resolution', '<', whole=True),
    Metric('eye_motion_var', 'eye motion variance', 'deg²', 'eye_motion_low', 'min_eye_motion_var', '≤'),
    Metric('speech_ratio', 'frames with speech (Silero VAD)', 'fraction of frames', 'no_speech', 'min_speech_ratio',
           '<'),
    Metric('face_score', 'face detector confidence', 'score', 'face_score_low', 'min_face_score', '<'),
    Metric('sync_lag_frames', 'audio/mouth lag, |lag|', 'frames', 'av_sync_offset', 'max_sync_lag', '>',
           magnitude=True, whole=True),
)
BY_REASON = {metric.reason: metric for metric in METRICS}
COLUMNS = [metric for metric in METRICS if metric.column]


# ----------------------------------------------------------------------------- reading an output

def read_jsonl(uri: str) -> List[dict]:
  return list(iter_jsonl(uri))


def read_json(uri: str) -> dict:
  if not FileSystems.exists(uri):
    return {}
  with FileSystems.open(uri, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
    return json.loads(handle.read())


def shard_samples(uri: str, wanted: Optional[Iterable[str]] = None) -> Iterator[Tuple[str, Dict[str, bytes]]]:
  """(key, {extension: bytes}) per sample of a tar shard (WebDataset's key rule: up to the first dot).

  With `wanted` keys, only those samples are read (the others' members are skipped, not read) and the
  shard is left as soon as all of them were seen.
  """
  missing = set(wanted) if wanted is not None else None
  with FileSystems.open(uri, mime_type='application/x-tar', compression_type=CompressionTypes.UNCOMPRESSED) as handle:
    with tarfile.open(fileobj=handle, mode='r:') as tar:
      key, members = None, {}
      for member in tar:
        if not member.isfile():
          continue
        name, _, ext = os.path.basename(member.name).partition('.')
        if name != key:
          if members:
            yield key, members
            if missing is not None:
              missing.discard(key)
              if not missing:
                return
          key, members = name, {}
        if missing is None or name in missing:
          members[ext] = tar.extractfile(member).read()
      if members:
        yield key, members


def load_npy(data: bytes) -> np.ndarray:
  return np.load(io.BytesIO(data), allow_pickle=False)


def flatten(record: dict, prefix: str = '') -> Dict[str, object]:
  """{'face.face_size': 212.0, ...}: nested metadata under dotted names."""
  out = {}
  for key, value in record.items():
    name = f'{prefix}{key}'
    if isinstance(value, dict):
      out.update(flatten(value, name + '.'))
    else:
      out[name] = value
  return out


def _reject_thumbnail_name(clip_id: str) -> str:
  """The same file, relative to the output (as the page links it)."""
  return f'{MEDIA}/{REJECT_THUMBNAILS}/{sample_key(clip_id)}.jpg'


def _number(value) -> Optional[float]:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  return float(value) if np.isfinite(value) else None


def _spread(clip_id: str) -> int:
  """A stable pseudo-random rank: picking the smallest spreads the picks over the run, the same each time."""
  return zlib.crc32(clip_id.encode('utf-8', 'surrogatepass'))


class Smallest:
  """The `k` items with the smallest keys offered, in memory for `k` items."""

  def __init__(self, k: int):
    self.k = k
    self.heap: list = []
    self.serial = itertools.count()

  def offer(self, key: float, item) -> None:
    entry = (-key, -next(self.serial), item)
    if len(self.heap) < self.k:
      heapq.heappush(self.heap, entry)
    elif self.k and entry > self.heap[0]:
      heapq.heapreplace(self.heap, entry)

  def items(self) -> list:
    return [item for _, _, item in sorted(self.heap, reverse=True)]


# ----------------------------------------------------------------------------- gathering

@dataclasses.dataclass
class ReasonFacts:
  """What the report shows about one reject reason."""
  count: int = 0
  stages: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  values: array.array = dataclasses.field(default_factory=lambda: array.array('d'))
  thresholds: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  nearest: Smallest = dataclasses.field(default_factory=lambda: Smallest(REJECTS_SHOWN // 2))
  spread: Smallest = dataclasses.field(default_factory=lambda: Smallest(REJECTS_SHOWN))

  def shown(self) -> List[dict]:
    """Rejects nearest the threshold first (those a threshold change would keep), then others."""
    picked = {r['id']: r for r in self.nearest.items()}
    for reject in self.spread.items():
      if len(picked) >= REJECTS_SHOWN:
        break
      picked.setdefault(reject['id'], reject)
    return list(picked.values())


@dataclasses.dataclass
class Facts:
  """What the page shows, gathered in one pass: numbers per score (8 bytes a clip), bounded picks."""
  stats: dict
  picks: Smallest  # kept samples to show
  kept: int = 0
  rejected: int = 0
  kept_values: Dict[str, array.array] = dataclasses.field(
      default_factory=lambda: collections.defaultdict(lambda: array.array('d')))
  reasons: Dict[str, ReasonFacts] = dataclasses.field(default_factory=lambda: collections.defaultdict(ReasonFacts))
  rows: Smallest = dataclasses.field(default_factory=lambda: Smallest(TABLE_ROWS))
  folders: 'Folders' = dataclasses.field(default_factory=lambda: Folders(FOLDERS_LISTED))
  # per manifest `language` ('' where none): kept clips' scores, and each filter reason's rejected values
  kept_by_language: Dict[str, Dict[str, array.array]] = dataclasses.field(
      default_factory=lambda: collections.defaultdict(lambda: collections.defaultdict(lambda: array.array('d'))))
  rejected_by_language: Dict[str, Dict[str, array.array]] = dataclasses.field(
      default_factory=lambda: collections.defaultdict(lambda: collections.defaultdict(lambda: array.array('d'))))

  def threshold(self, metric: Metric) -> Optional[float]:
    """This run's setting when stats.json records it, else the one most of its rejects name."""
    recorded = _number(self.stats.get('thresholds', {}).get(metric.flag))
    if recorded is not None:
      return recorded
    seen = self.reasons[metric.reason].thresholds if metric.reason in self.reasons else None
    return seen.most_common(1)[0][0] if seen else None


@dataclasses.dataclass
class Folder:
  """A folder recipe's unit as its index records describe it: a subject (nerf, avatar) or a tube (mmvox)."""
  name: str
  kind: str
  record: dict  # its first clip's record (a tube's only one)
  clips: int = 0
  frames: int = 0  # the frames its clips' records say it holds


def folder_kind(record: dict) -> Optional[str]:
  """'nerf', 'avatar' or 'mmvox' for a folder recipe's index record (by the fields its writer sets), else None."""
  if not record.get('folder'):
    return None
  if record.get('layout') == 'mmvox':
    return 'mmvox'
  frames = record.get('frames')
  if isinstance(frames, list) and len(frames) == 2:
    return 'nerf' if all(isinstance(f, int) for f in frames) else 'avatar'
  return None


def _frames_to(record: dict, kind: str) -> int:
  """How many frames the folder holds at least, by this record: nerf's [first, end), avatar's last file name."""
  if kind == 'nerf':
    return int(record['frames'][1])
  if kind == 'avatar':
    return int(os.path.splitext(record['frames'][1])[0]) + 1
  return int(record.get('num_frames') or 0)


class Folders:
  """The folders (subjects, tubes) of a folder recipe's output: how many, and the clips and frames of the `k`
  with the smallest spread rank (a stable choice over the run; a folder is followed from its first record,
  so its counts are whole); memory for `k` folders and a set of names."""

  def __init__(self, k: int):
    self.k, self.names, self.held, self.ranks = k, set(), {}, []

  def add(self, record: dict) -> None:
    kind = folder_kind(record)
    if kind is None:
      return
    name = record['folder']
    self.names.add(name)
    folder = self.held.get(name)
    if folder is None:
      rank = (_spread(name), name)
      if len(self.held) >= self.k:
        if not self.ranks or (-self.ranks[0][0], self.ranks[0][1]) <= rank:
          return
        _, dropped = heapq.heappop(self.ranks)
        del self.held[dropped]
      heapq.heappush(self.ranks, (-rank[0], name))
      folder = self.held[name] = Folder(name, kind, record)
    folder.clips += 1
    folder.frames = max(folder.frames, _frames_to(record, kind)) if kind != 'mmvox' else _frames_to(record, kind)

  def shown(self) -> List[Folder]:
    return sorted(self.held.values(), key=lambda folder: (_spread(folder.name), folder.name))


def _numbers(scores: dict) -> Dict[str, float]:
  return {name: number for name, number in ((name, _number(value)) for name, value in scores.items())
          if number is not None}


def _kept_row(record: dict) -> dict:
  values = _numbers(record.get('scores') or {})
  if 'duration' not in values and _number(record.get('duration')) is not None:
    values['duration'] = float(record['duration'])
  return {'id': record['id'], 'status': 'kept', 'detail': '', 'values': values, 'failed': ''}


def _reject_row(reject: dict) -> dict:
  """Every score a filter reject carries (rejects before the filter have none), and the one it failed on."""
  metric = BY_REASON.get(reject.get('reason'))
  values = _numbers(reject.get('scores') or {})
  if metric is not None and _number(reject.get('value')) is not None:
    values.setdefault(metric.score, _number(reject.get('value')))
  return {'id': reject['id'], 'status': reject.get('reason', '?'), 'detail': reject.get('detail', ''),
          'values': values, 'failed': metric.score if metric is not None else ''}


def gather(output: str, samples: int) -> Facts:
  """One streaming pass over index.jsonl and one over rejects.jsonl."""
  facts = Facts(read_json(FileSystems.join(output, 'stats.json')), Smallest(samples))
  for record in iter_jsonl(FileSystems.join(output, 'index.jsonl')):
    facts.kept += 1
    scores = record.get('scores') or {}
    by_language = facts.kept_by_language[str(record.get('language') or '')]
    for name, value in scores.items():
      number = _number(value)
      if number is not None:
        facts.kept_values[name].append(number)
        by_language[name].append(number)
    if 'duration' not in scores and _number(record.get('duration')) is not None:
      facts.kept_values['duration'].append(float(record['duration']))
      by_language['duration'].append(float(record['duration']))
    rank = _spread(record['id'])
    facts.rows.offer(rank, _kept_row(record))
    facts.folders.add(record)
    if record.get('shard') or record.get('file'):
      facts.picks.offer(rank, {k: record.get(k) for k in ('id', 'key', 'shard', 'file', 'duration', 'scores')})
  for reject in iter_jsonl(FileSystems.join(output, 'rejects.jsonl')):
    facts.rejected += 1
    reason = facts.reasons[reject.get('reason', '?')]
    reason.count += 1
    reason.stages[reject.get('stage', '?')] += 1
    value, threshold = _number(reject.get('value')), _number(reject.get('threshold'))
    if value is not None:
      reason.values.append(value)
      facts.rejected_by_language[str(reject.get('language') or '')][reject.get('reason', '?')].append(value)
    if threshold is not None:
      reason.thresholds[threshold] += 1
    if value is not None and threshold is not None:
      reason.nearest.offer(abs(value - threshold), reject)
    rank = _spread(reject['id'])
    reason.spread.offer(rank, reject)
    facts.rows.offer(rank, _reject_row(reject))
  return facts


# ----------------------------------------------------------------------------- pictures and videos

def middle_frame(mp4: bytes) -> Tuple[int, Optional[np.ndarray]]:
  """(index, RGB) of the clip's middle frame."""
  with av.open(io.BytesIO(mp4)) as container:
    stream = container.streams.video[0]
    target = (stream.frames or 0) // 2
    last = None
    for index, frame in enumerate(container.decode(stream)):
      last = (index, frame.to_ndarray(format='rgb24'))
      if index >= target:
        break
  return last if last is not None else (0, None)


def _landmark_points(members: Dict[str, bytes]) -> Optional[np.ndarray]:
  """(T, P, 2) landmarks in output pixels: the 68-point set where the sample has it (it reads better
  small), else the full mesh."""
  for name in ('lmk68.npy', 'landmarks.npy'):
    if name in members:
      return load_npy(members[name])[..., :2]
  return None


def thumbnail(key: str, members: Dict[str, bytes]) -> Optional[np.ndarray]:
  """A captioned thumbnail of the sample's middle frame with its landmarks drawn."""
  if 'mp4' not in members:
    return None
  index, image = middle_frame(members['mp4'])
  if image is None:
    return None
  image = np.ascontiguousarray(image)
  if 'landmarks.npy' in members:
    landmarks = load_npy(members['landmarks.npy'])
    if index < len(landmarks):
      draw_points(image, landmarks[index, :, :2], 1.0, max(1, image.shape[0] // 256))
  thumb = cv2.resize(image, (THUMB, THUMB), interpolation=cv2.INTER_AREA)
  cv2.rectangle(thumb, (0, THUMB - 18), (THUMB, THUMB), (0, 0, 0), -1)
  cv2.putText(thumb, key[:28], (4, THUMB - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
  return thumb


def contact_sheet(thumbs: Sequence[np.ndarray], columns: int = 4) -> np.ndarray:
  rows = max(1, -(-len(thumbs) // columns))
  sheet = np.full((rows * THUMB, min(columns, max(len(thumbs), 1)) * THUMB, 3), 32, np.uint8)
  for i, thumb in enumerate(thumbs):
    r, c = divmod(i, columns)
    sheet[r * THUMB:(r + 1) * THUMB, c * THUMB:(c + 1) * THUMB] = thumb
  return sheet


def png(image: np.ndarray) -> bytes:
  ok, data = cv2.imencode('.png', cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
  if not ok:
    raise ValueError('PNG encoding failed')
  return data.tobytes()


def preview_mp4(members: Dict[str, bytes], side: int = PREVIEW, seconds: float = PREVIEW_S) -> Optional[bytes]:
  """The first `seconds` of the sample, `side` pixels wide, its landmarks drawn on every frame, with its audio."""
  if 'mp4' not in members:
    return None
  return clip_preview(members['mp4'], members.get('wav'), side, seconds, _landmark_points(members))


# ----------------------------------------------------------------------------- figures

def plain(value: Optional[float]) -> str:
  """A number as people write it: no exponent, decimals by magnitude."""
  if value is None:
    return ''
  size = abs(value)
  digits = 0 if size >= 100 or float(value).is_integer() else 1 if size >= 10 else 2 if size >= 0.1 else 4
  return f'{value:,.{digits}f}'.replace(',', ' ')


def _figure_png(figure) -> bytes:
  import matplotlib.pyplot as plt
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png', dpi=110, bbox_inches='tight')
  plt.close(figure)
  return buffer.getvalue()


def _axis_range(values: np.ndarray, whole: bool) -> Tuple[float, float]:
  """The values' range, widened to at least 5 % of their size (4 for whole numbers, 1 around zero), so
  that clips of 107.40 and 107.45 px do not look far apart and equal values still get tick labels."""
  low, high = float(values.min()), float(values.max())
  least = max(0.05 * max(abs(low), abs(high)), 4.0 if whole else 0.0) or 1.0
  if high - low < least:
    middle = (low + high) / 2
    low, high = middle - least / 2, middle + least / 2
  return low, high


def score_figure(label: str, unit: str, kept: Sequence[float], rejected: Sequence[float],
                 threshold: Optional[float], flag: str, whole: bool = False):
  """Kept (blue) and rejected (red) clips along the score's axis, the threshold as a dashed line.

  Few clips: one dot per clip in two lanes; more: stacked histograms. Tick labels are plain numbers
  (no offset, no exponent); `whole`-number scores get whole-number ticks.
  """
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from matplotlib import ticker
  kept, rejected = np.asarray(kept, float), np.asarray(rejected, float)
  everything = np.concatenate([kept, rejected] + ([[threshold]] if threshold is not None else []))
  low, high = _axis_range(everything, whole)
  dots = len(kept) + len(rejected) < DOTS_BELOW
  figure, axis = plt.subplots(figsize=(4.8, 2.2 if dots else 3.0))
  if dots:
    for lane, values, colour, marker in ((1, kept, KEPT_COLOUR, 'o'), (0, rejected, REJECTED_COLOUR, 'X')):
      jitter = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else np.zeros(len(values))
      axis.scatter(values, lane + jitter, s=36, color=colour, marker=marker, alpha=0.85, linewidths=0)
    axis.set_yticks([0, 1], [f'rejected ({len(rejected)})', f'kept ({len(kept)})'])
    axis.set_ylim(-0.6, 1.6)
    margin = (high - low) * 0.05
    axis.set_xlim(low - margin, high + margin)
  else:
    edges = np.histogram_bin_edges(everything, bins=min(40, max(10, len(everything) // 5)), range=(low, high))
    axis.hist([kept, rejected], bins=edges, stacked=True, color=[KEPT_COLOUR, REJECTED_COLOUR],
              label=[f'kept ({len(kept)})', f'rejected ({len(rejected)})'])
    axis.set_ylabel('clips')
    axis.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    axis.legend(fontsize=8, frameon=False)
  if threshold is not None:
    axis.axvline(threshold, color='#222', linestyle='--', linewidth=1.2)
    axis.annotate(f'--{flag} {plain(threshold)}', (threshold, 1.0), xycoords=('data', 'axes fraction'),
                  xytext=(3, -11), textcoords='offset points', fontsize=8)
  formatter = ticker.ScalarFormatter(useOffset=False)
  formatter.set_scientific(False)
  axis.xaxis.set_major_formatter(formatter)
  if whole:
    axis.xaxis.set_major_locator(ticker.MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
  axis.set_xlabel(f'{label} ({unit})')
  axis.spines[['top', 'right']].set_visible(False)
  return figure


# ----------------------------------------------------------------------------- page

def _media_href(uri_or_name: str) -> str:
  return urllib.parse.quote(uri_or_name)


def _write_media(output: str, name: str, data: bytes) -> str:
  write_atomic(FileSystems.join(output, name), data)
  return _media_href(name)


def _picked_members(output: str, picks: Sequence[dict]) -> Iterator[Tuple[dict, str, Dict[str, bytes]]]:
  """(index record, key, members) of the picked samples, reading only their shards, each only up to the
  last sample wanted from it."""
  by_shard = collections.defaultdict(dict)
  for record in picks:
    if record.get('file'):  # hdtf's --layout=files: the members are files beside the mp4, named as in a tar
      key, base = record.get('key') or record['id'], FileSystems.join(output, record['file'])[:-len('.mp4')]
      matched = FileSystems.match([base + '.*'])[0].metadata_list
      yield record, key, {m.path[len(base) + 1:]: read_bytes(m.path) for m in matched if not m.path.endswith(PARTIAL)}
      continue
    by_shard[record['shard']][record.get('key') or record['id']] = record
  for shard, records in sorted(by_shard.items()):
    uri = FileSystems.join(output, shard)
    if FileSystems.exists(uri):
      for key, members in shard_samples(uri, records):
        yield records[key], key, members


def kept_samples(output: str, picks: Sequence[dict],
                 videos: int) -> Tuple[List[Tuple[dict, np.ndarray]], Dict[str, str]]:
  """(record, contact-sheet tile) of the picked samples, and {id: video href} of the first `videos`."""
  tiles, clips = {}, {}
  with_video = {record['id'] for record in picks[:videos]}
  for record, key, members in _picked_members(output, picks):
    tile = thumbnail(key, members)
    if tile is not None:
      tiles[record['id']] = tile
    if record['id'] in with_video:
      data = preview_mp4(members)
      if data:
        clips[record['id']] = _write_media(output, f'{SAMPLE_VIDEOS}/{key}.mp4', data)
  return [(r, tiles[r['id']]) for r in picks if r['id'] in tiles], clips


def sampled_shards(output: str, records: Iterable[dict],
                   count: int) -> Tuple[List[Tuple[str, np.ndarray]], np.ndarray]:
  """Tiles of `count` clips spread over `records`, and per-frame (yaw, pitch, roll) of those clips."""
  picks = Smallest(count)
  for record in records:
    if record.get('shard') or record.get('file'):
      picks.offer(_spread(record['id']), record)
  tiles, poses = {}, []
  for record, key, members in _picked_members(output, picks.items()):
    tile = thumbnail(key, members)
    if tile is not None:
      tiles[record['id']] = tile
    if 'pose.npy' in members:
      poses.append(load_npy(members['pose.npy']).reshape(-1, 3))
  pose = np.concatenate(poses) if poses else np.zeros((0, 3), np.float32)
  return [(r['id'], tiles[r['id']]) for r in picks.items() if r['id'] in tiles], pose[np.isfinite(pose).all(1)]


def _e(text) -> str:
  return html.escape(str(text))


def _measure(reject: dict) -> str:
  """'face sharpness <b>5.1</b> < 25 --min_sharpness' for a reject that carries its measurement; '' otherwise."""
  value, threshold = _number(reject.get('value')), _number(reject.get('threshold'))
  if value is None:
    return ''
  metric = BY_REASON.get(reject.get('reason'))
  if metric is None:
    return f'measured <b>{plain(value)}</b>' + (f', threshold {plain(threshold)}' if threshold is not None else '')
  against = f' {_e(metric.fails)} {plain(threshold)} <span class="flag">--{metric.flag}</span>' \
      if threshold is not None else ''
  return f'{_e(metric.label)} <b>{plain(value)}</b>{against}'


def _reject_card(output: str, reject: dict) -> str:
  """Its thumbnail; near the threshold, the filter stage's short preview with audio instead (thumbnail as poster)."""
  name = _reject_thumbnail_name(reject['id'])
  clip = name[:-len('.jpg')] + '.mp4'
  picture_exists = FileSystems.exists(FileSystems.join(output, name))
  if FileSystems.exists(FileSystems.join(output, clip)):
    poster = f' poster="{_media_href(name)}"' if picture_exists else ''
    picture = (f'<video src="{_media_href(clip)}"{poster} controls loop playsinline preload="metadata" '
               f'title="the first {REJECT_CLIP_S:g} s as rendered, landmarks drawn, with its audio"></video>')
  elif picture_exists:
    picture = f'<img src="{_media_href(name)}" alt="{_e(reject["id"])}" loading="lazy">'
  else:
    picture = f'<div class="nopic">no picture (rejected at the {_e(reject.get("stage", "?"))} stage)</div>'
  measure = _measure(reject)
  return (f'<div class="card">{picture}<div class="cid">{_e(reject["id"])}</div>'
          + (f'<div class="measure">{measure}</div>' if measure else '')
          + f'<div class="detail">{_e(str(reject.get("detail", ""))[:300])}</div></div>')


def _rule(metric: Metric, threshold: Optional[float]) -> str:
  """'keeps face sharpness ≥ 25 variance of the Laplacian (--min_sharpness)'."""
  keeps = {'<': '≥', '>': '≤', '≤': '>'}[metric.fails]
  flag = f'(<span class="flag">--{metric.flag}</span>)'
  if threshold is None:
    return f'rejects on {_e(metric.label)} {flag}'
  return f'keeps {_e(metric.label)} {keeps} {plain(threshold)} {_e(metric.unit)} {flag}'


def _rejects_html(output: str, facts: Facts) -> Tuple[str, str]:
  """(table of reasons, gallery of examples per reason)."""
  planned = facts.stats.get('planned') or 0
  rows, sections = [], []
  for reason, info in sorted(facts.reasons.items(), key=lambda item: (-item[1].count, item[0])):
    metric = BY_REASON.get(reason)
    anchor = f'reason-{_e(reason)}'
    share = f'{100 * info.count / planned:.1f} %' if planned else ''
    rule = _rule(metric, facts.threshold(metric)) if metric else ''
    stages = ', '.join(f'{_e(stage)}' for stage, _ in info.stages.most_common())
    rows.append(f'<tr><td><a href="#{anchor}">{_e(reason)}</a></td><td>{stages}</td><td class="n">{info.count}</td>'
                f'<td class="n">{share}</td><td>{rule}</td></tr>')
    shown = info.shown()
    order = 'nearest the threshold first' if info.nearest.items() else 'spread over the run'
    cards = [_reject_card(output, reject) for reject in shown]
    playing = sum('<video' in card for card in cards)
    order += f'; {playing} play{"s" if playing == 1 else ""} with the audio' if playing else ''
    sections.append(f'<section class="reason" id="{anchor}"><h3>{_e(reason)} <small>{info.count} '
                    f'clip{"s" if info.count != 1 else ""}; {len(shown)} shown, {order}</small></h3>'
                    + (f'<p class="rule">The filter {rule}.</p>' if rule else '')
                    + f'<div class="cards">{"".join(cards)}</div></section>')
  table = ('<table><thead><tr><th>reason</th><th>stage</th><th>clips</th><th>of planned</th><th>filter</th></tr>'
           f'</thead><tbody>{"".join(rows)}</tbody></table>') if rows else '<p>No rejects.</p>'
  return table, ''.join(sections)


def _figures_html(output: str, facts: Facts) -> str:
  blocks = []
  for metric in METRICS:
    kept = facts.kept_values.get(metric.score, [])
    if metric.magnitude:
      kept = [abs(value) for value in kept]
    rejected = facts.reasons[metric.reason].values if metric.reason in facts.reasons else []
    threshold = facts.threshold(metric)
    if not kept and not rejected:
      if metric.column:
        blocks.append(f'<figure><figcaption>{_e(metric.label)}</figcaption><p class="missing">{NOT_COMPUTED}</p>'
                      '</figure>')
      continue
    name = _write_media(output, f'{FIGURES}/{metric.score}.png',
                        _figure_png(score_figure(metric.label, metric.unit, kept, rejected, threshold, metric.flag,
                                                 metric.whole)))
    where = (f'dashed line: --{metric.flag} {plain(threshold)}' if threshold is not None
             else 'threshold not recorded (no clip failed it and stats.json does not name it)')
    blocks.append(f'<figure><figcaption>{_e(metric.label)}</figcaption><img src="{name}" alt="{_e(metric.label)}">'
                  f'<p>{len(kept)} kept, {len(rejected)} rejected as {_e(metric.reason)}; {where}</p></figure>')
  known = {metric.score for metric in METRICS}
  for score in sorted(set(facts.kept_values) - known):
    values = facts.kept_values[score]
    name = _write_media(output, f'{FIGURES}/{score}.png',
                        _figure_png(score_figure(score, 'as in the json', values, [], None, '')))
    blocks.append(f'<figure><figcaption>{_e(score)}</figcaption><img src="{name}" alt="{_e(score)}">'
                  f'<p>{len(values)} kept clips (no filter uses it)</p></figure>')
  return ''.join(blocks)


def language_figure(label: str, unit: str, rows: Sequence[Tuple[str, Sequence[float], Sequence[float]]],
                    threshold: Optional[float], flag: str, whole: bool = False):
  """One score's kept (blue) and rejected (red) clips, a row per language on a shared axis, the threshold dashed
  in every row: whether one threshold suits every language. Each row as `score_figure` draws its clips (dots
  when the language has few, stacked histograms on common bins otherwise), its median in its label."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  from matplotlib import ticker
  rows = [(name, np.asarray(kept, float), np.asarray(rejected, float)) for name, kept, rejected in rows]
  everything = np.concatenate([np.concatenate([k, r]) for _, k, r in rows] + (
      [[threshold]] if threshold is not None else []))
  low, high = _axis_range(everything, whole)
  edges = np.histogram_bin_edges(everything, bins=min(40, max(10, len(everything) // 5)), range=(low, high))
  figure, axes = plt.subplots(len(rows), 1, sharex=True, figsize=(4.8, 0.35 + 1.05 * len(rows)), squeeze=False)
  for axis, (name, kept, rejected) in zip(axes[:, 0], rows):
    both = np.concatenate([kept, rejected])
    axis.set_ylabel(f'{name}\n{len(kept)} kept, {len(rejected)} rej.\nmedian {plain(float(np.median(both)))}',
                    rotation=0, ha='right', va='center', fontsize=7)
    if len(both) < DOTS_BELOW:
      for lane, values, colour, marker in ((1, kept, KEPT_COLOUR, 'o'), (0, rejected, REJECTED_COLOUR, 'X')):
        jitter = np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else np.zeros(len(values))
        axis.scatter(values, lane + jitter, s=20, color=colour, marker=marker, alpha=0.85, linewidths=0)
      axis.set_yticks([])
      axis.set_ylim(-0.6, 1.6)
    else:
      axis.hist([kept, rejected], bins=edges, stacked=True, color=[KEPT_COLOUR, REJECTED_COLOUR])
      axis.yaxis.set_major_locator(ticker.MaxNLocator(nbins=2, integer=True))
      axis.tick_params(axis='y', labelsize=7)
    if threshold is not None:
      axis.axvline(threshold, color='#222', linestyle='--', linewidth=1.0)
    axis.spines[['top', 'right']].set_visible(False)
  margin = (high - low) * 0.05
  axes[0, 0].set_xlim(low - margin, high + margin)
  if threshold is not None:
    axes[0, 0].annotate(f'--{flag} {plain(threshold)}', (threshold, 1.0), xycoords=('data', 'axes fraction'),
                        xytext=(3, 2), textcoords='offset points', fontsize=8)
  formatter = ticker.ScalarFormatter(useOffset=False)
  formatter.set_scientific(False)
  axes[-1, 0].xaxis.set_major_formatter(formatter)
  if whole:
    axes[-1, 0].xaxis.set_major_locator(ticker.MaxNLocator(integer=True, steps=[1, 2, 5, 10]))
  axes[-1, 0].set_xlabel(f'{label} ({unit})')
  return figure


def _language_rows(facts: Facts) -> List[Tuple[str, List[str]]]:
  """(row label, the language codes it gathers): the LANGUAGES_SHOWN languages with most clips, then the rest
  as one row, then the clips without a language."""
  counts = collections.Counter()
  for language, scores in facts.kept_by_language.items():
    counts[language] += max((len(values) for values in scores.values()), default=0)
  for language, reasons in facts.rejected_by_language.items():
    counts[language] += sum(len(values) for values in reasons.values())
  named = sorted((language for language in counts if language), key=lambda language: (-counts[language], language))
  rows = [(language, [language]) for language in named[:LANGUAGES_SHOWN]]
  if named[LANGUAGES_SHOWN:]:
    rows.append((OTHER_LANGUAGES, named[LANGUAGES_SHOWN:]))
  if '' in counts:
    rows.append((NO_LANGUAGE, ['']))
  return rows


def _languages_html(output: str, facts: Facts) -> str:
  """The scores against the thresholds again, split by the manifest's `language` (when it names any)."""
  rows = _language_rows(facts)
  if not any(codes != [''] for _, codes in rows):
    return ''
  blocks = []
  known = {metric.score: metric for metric in METRICS}
  extra = sorted({score for scores in facts.kept_by_language.values() for score in scores} - set(known))
  for metric in list(METRICS) + [Metric(score, score, 'as in the json', '', '', '<') for score in extra]:
    lanes = []
    for name, codes in rows:
      kept = [v for code in codes for v in facts.kept_by_language.get(code, {}).get(metric.score, ())]
      kept = [abs(v) for v in kept] if metric.magnitude else kept
      rejected = [v for code in codes for v in facts.rejected_by_language.get(code, {}).get(metric.reason, ())]
      if kept or rejected:
        lanes.append((name, kept, rejected))
    if not lanes:
      continue
    threshold = facts.threshold(metric) if metric.reason else None
    name = _write_media(output, f'{FIGURES}/by_language/{metric.score}.png', _figure_png(language_figure(
        metric.label, metric.unit, lanes, threshold, metric.flag, metric.whole)))
    counts = ', '.join(f'{_e(lane)}: {len(kept)} kept, {len(rejected)} rejected' for lane, kept, rejected in lanes)
    blocks.append(f'<figure data-score="{_e(metric.score)}"><figcaption>{_e(metric.label)}</figcaption>'
                  f'<img src="{name}" alt="{_e(metric.label)} by language"><p>{counts}</p></figure>')
  return ('<h2>Scores by language</h2><p>The same scores, a row per language the manifest gives (<code>language'
          f'</code>; the {LANGUAGES_SHOWN} with most clips, then the others together): whether one threshold suits '
          'every language. Red: clips that filter rejected.</p>' + ''.join(blocks))


def _columns(rows: Sequence[dict]) -> List[Tuple[str, str, str]]:
  """(score, header, tooltip) of every score a shown clip has: the known ones in METRICS' order, then the rest."""
  seen = set(itertools.chain.from_iterable(row['values'] for row in rows))
  known = [(m.score, m.column or m.label, f'{m.score}: {m.label} ({m.unit}), filter --{m.flag}')
           for m in METRICS if m.score in seen]
  return known + [(name, name, name) for name in sorted(seen - {m.score for m in METRICS})]


def _table_html(facts: Facts) -> str:
  rows = sorted(facts.rows.items(), key=lambda row: row['id'])
  total = facts.kept + facts.rejected
  columns = _columns(rows)
  head = ''.join(f'<th data-type="num" data-score="{_e(score)}" title="{_e(tip)}">{_e(header)}</th>'
                 for score, header, tip in columns)
  body = []
  for row in rows:
    cells = []
    for score, _, _ in columns:
      value = row['values'].get(score)
      failed = ' failed' if score == row['failed'] else ''
      cells.append(f'<td class="n{failed}" data-v="{"" if value is None else value}">{plain(value)}</td>')
    status = 'kept' if row['status'] == 'kept' else 'rejected'
    body.append(f'<tr class="{status}"><td>{_e(row["id"])}</td><td title="{_e(row["detail"])}">'
                f'{_e(row["status"])}</td>{"".join(cells)}</tr>')
  note = (f'{len(rows)} of {total} clips, a sample spread over the run (the table stops at {TABLE_ROWS} rows).'
          if len(rows) < total else f'All {total} clips.')
  return (f'<p>{note} Every score a clip was measured on; a rejected clip\'s failed value is in red (clips '
          'rejected before scoring, e.g. without a face, have none). Click a header to sort.</p>'
          '<div class="scroll"><table class="sortable" id="clips"><thead><tr><th data-type="text">id</th>'
          f'<th data-type="text">kept / reason</th>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>')


SORT_SCRIPT = """
for (const table of document.querySelectorAll('table.sortable')) {
  const heads = [...table.tHead.rows[0].cells];
  heads.forEach((th, column) => th.addEventListener('click', () => {
    const ascending = th.getAttribute('aria-sort') !== 'ascending';
    heads.forEach(h => h.removeAttribute('aria-sort'));
    th.setAttribute('aria-sort', ascending ? 'ascending' : 'descending');
    const numeric = th.dataset.type === 'num';
    const value = row => numeric ? row.cells[column].dataset.v : row.cells[column].textContent;
    const rows = [...table.tBodies[0].rows].sort((a, b) => {
      const x = value(a), y = value(b);
      if (numeric && (x === '' || y === '')) return (x === '') - (y === '');  // blanks last
      const order = numeric ? x - y : x.localeCompare(y);
      return ascending ? order : -order;
    });
    table.tBodies[0].append(...rows);
  }));
}
"""

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1400px}
h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 7px;text-align:left;font-size:90%}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.flag{font-family:monospace;font-size:90%;color:#555}
.totals span{display:inline-block;margin-right:1.5em;font-size:120%}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{width:180px;border:1px solid #ddd;border-radius:4px;padding:6px;font-size:85%;background:#fafafa}
.card img,.card video{width:180px;height:180px;object-fit:cover;display:block;background:#333}
.nopic{color:#777;font-style:italic}
.cid{font-weight:bold;margin-top:4px;word-break:break-all}.measure{color:#a11;margin:2px 0}
.measure b{font-size:115%}.detail{color:#666;font-size:90%;word-break:break-word}
.reason h3 small{font-weight:normal;color:#666}.rule{margin:.2em 0 .6em}
figure{display:inline-block;vertical-align:top;margin:0 1.2em 1.2em 0}figcaption{font-weight:bold}
figure p{font-size:85%;color:#555;max-width:520px;margin:.2em 0}
.videos figure{width:256px}.videos video{width:256px;background:#000}
.missing{color:#a00}
.scroll{max-height:32em;overflow:auto;display:inline-block;border:1px solid #ccc}
.scroll th{position:sticky;top:0;background:#eee;cursor:pointer;user-select:none}
th[aria-sort=ascending]::after{content:' \\25B2'}th[aria-sort=descending]::after{content:' \\25BC'}
tr.rejected td:nth-child(2){color:#a11}td.failed{color:#a11;font-weight:bold}
.folder h3 small{font-weight:normal;color:#666}.files{font-size:85%;color:#444}.folder img{max-width:100%}
"""


# ----------------------------------------------------------------------------- folder recipes

# Where each folder recipe's writer puts a unit's frames (beam_pipeline/recipes/*/writer.py; README's layout
# tables). Spelled out here: importing the writers would load torch for a page.
NERF_PARTS = ('ori_imgs', 'parsing', 'gt_imgs', 'com_imgs', 'head_imgs', 'torso_imgs', 'depth')
MMVOX_EVERY, MMVOX_DRAWINGS = 4, 'draw/style1'  # masks and drawings of frames 0, 4, 8, ...
PALETTE = np.random.default_rng(7).integers(40, 256, (256, 3)).astype(np.uint8)  # parsing classes
PALETTE[0] = 0


def _image(uri: str) -> Optional[np.ndarray]:
  """RGB, RGBA or grey as stored; None when the file is not there."""
  if not FileSystems.exists(uri):
    return None
  image = cv2.imdecode(np.frombuffer(read_bytes(uri), np.uint8), cv2.IMREAD_UNCHANGED)
  if image is not None and image.ndim == 3:
    image = cv2.cvtColor(image, cv2.COLOR_BGRA2RGBA if image.shape[2] == 4 else cv2.COLOR_BGR2RGB)
  return image


def _on_checker(rgba: np.ndarray) -> np.ndarray:
  """RGBA over a grey checkerboard, so transparency shows."""
  height, width = rgba.shape[:2]
  squares = ((np.arange(height)[:, None] // 16 + np.arange(width)[None] // 16) % 2).astype(np.float32)
  board = (150 + 60 * squares)[..., None]
  alpha = rgba[..., 3:4].astype(np.float32) / 255
  return (rgba[..., :3] * alpha + board * (1 - alpha)).astype(np.uint8)


def _tile(image: Optional[np.ndarray], caption: str) -> np.ndarray:
  """A TILE-square picture with its caption; a dark tile saying 'missing' where the file is not there."""
  if image is None:
    tile = np.full((TILE, TILE, 3), 48, np.uint8)
    cv2.putText(tile, 'missing', (40, TILE // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (230, 90, 80), 1, cv2.LINE_AA)
  else:
    if image.ndim == 2:
      image = np.repeat(image[..., None], 3, 2)
    image = _on_checker(image) if image.shape[2] == 4 else image
    tile = cv2.resize(np.ascontiguousarray(image[..., :3]), (TILE, TILE), interpolation=cv2.INTER_AREA)
  cv2.rectangle(tile, (0, TILE - 16), (TILE, TILE), (0, 0, 0), -1)
  cv2.putText(tile, caption[:30], (3, TILE - 4), cv2.FONT_HERSHEY_SIMPLEX, 0.36, (255, 255, 255), 1, cv2.LINE_AA)
  return tile


def _overlay_labels(frame: Optional[np.ndarray], labels: Optional[np.ndarray]) -> Optional[np.ndarray]:
  """Parsing classes in colour, half over the frame (alone when the frame is missing)."""
  if labels is None:
    return None
  coloured = PALETTE[labels if labels.ndim == 2 else labels[..., 0]]
  if frame is None or frame.shape[:2] != labels.shape[:2]:
    return coloured
  return cv2.addWeighted(np.ascontiguousarray(frame[..., :3]), 0.5, coloured, 0.5, 0)


def _with_points(image: Optional[np.ndarray], points: Optional[np.ndarray]) -> Optional[np.ndarray]:
  if image is None or points is None:
    return image
  image = np.ascontiguousarray(image[..., :3]) if image.ndim == 3 and image.shape[2] == 4 else image.copy()
  draw_points(image, np.asarray(points, np.float32).reshape(-1, 2), 1.0, max(1, image.shape[0] // 256))
  return image


def _spread_frames(count: int, step: int = 1) -> List[int]:
  """Up to FOLDER_FRAMES frame numbers spread over `count` frames, multiples of `step`."""
  if count <= 0:
    return []
  return sorted({int(round(x / step)) * step for x in np.linspace(0, count - 1, FOLDER_FRAMES)} & set(
      range(0, count, step)))


def _nerf_rows(base: str, frames: List[int]) -> List[Tuple[str, List[np.ndarray]]]:
  rows = {'frame, 68 landmarks (ori_imgs/*.jpg, *.lms)': [], 'parsing over the frame (parsing/*.png)': [],
          'gt image (gt_imgs/*.jpg)': [], 'torso, RGBA (torso_imgs/*.png)': []}
  for i in frames:
    frame = _image(f'{base}/ori_imgs/{i}.jpg')
    lms = f'{base}/ori_imgs/{i}.lms'
    points = np.loadtxt(io.StringIO(read_bytes(lms).decode())) if FileSystems.exists(lms) else None
    tiles = (_with_points(frame, points), _overlay_labels(frame, _image(f'{base}/parsing/{i}.png')),
             _image(f'{base}/gt_imgs/{i}.jpg'), _image(f'{base}/torso_imgs/{i}.png'))
    for row, image in zip(rows.values(), tiles):
      row.append(_tile(image, f'frame {i}'))
  rows['background (bc.jpg)'] = [_tile(_image(f'{base}/bc.jpg'), 'bc.jpg')]
  return list(rows.items())


def _avatar_rows(base: str, frames: List[int]) -> List[Tuple[str, List[np.ndarray]]]:
  keypoints, irises = (json.loads(read_bytes(f'{base}/{name}')) if FileSystems.exists(f'{base}/{name}') else {}
                       for name in ('keypoint.json', 'iris.json'))
  rows = {'RGBA frame, 68 keypoints and irises (image/*.png)': [], 'alpha': []}
  for i in frames:
    name = f'{i:05d}.png'
    image = _image(f'{base}/image/{name}')
    drawn = _with_points(_with_points(image, keypoints.get(name)), irises.get(name))
    if image is not None and image.ndim == 3 and image.shape[2] == 4:
      drawn = np.dstack([drawn, image[..., 3]])  # keep the alpha: the tile shows it over a checkerboard
    rows['RGBA frame, 68 keypoints and irises (image/*.png)'].append(_tile(drawn, name))
    alpha = image[..., 3] if image is not None and image.ndim == 3 and image.shape[2] == 4 else None
    rows['alpha'].append(_tile(alpha, name))
  return list(rows.items())


def _mmvox_rows(output: str, key: str, frames: List[int], tube_format: str) -> List[Tuple[str, List[np.ndarray]]]:
  decoded = {}
  if tube_format == 'mp4' and FileSystems.exists(f'{output}/video/{key}.mp4'):
    with av.open(io.BytesIO(read_bytes(f'{output}/video/{key}.mp4'))) as container:
      for index, frame in enumerate(container.decode(video=0)):
        if index in frames:
          decoded[index] = frame.to_ndarray(format='rgb24')
        if index >= max(frames):
          break
  rows = {'frame (video/)': [], 'parsing (mask/)': [], f'drawing ({MMVOX_DRAWINGS}/)': []}
  for i in frames:
    name = f'{i:07d}.png'
    frame = decoded.get(i) if tube_format == 'mp4' else _image(f'{output}/video/{key}/{name}')
    tiles = (frame, _image(f'{output}/mask/{key}/{name}'), _image(f'{output}/{MMVOX_DRAWINGS}/{key}/{name}'))
    for row, image in zip(rows.values(), tiles):
      row.append(_tile(image, name))
  return list(rows.items())


def _listing(folder: str) -> List[str]:
  """The names of the files directly in `folder` (one listing), none when it is not there."""
  if not FileSystems.exists(folder):
    return []
  paths = [m.path for m in FileSystems.match([folder.rstrip('/') + '/*'])[0].metadata_list]
  return sorted(path.rstrip('/').rsplit('/', 1)[-1] for path in paths if not path.endswith(PARTIAL))


def _file_counts(base: str, folders: Sequence[str]) -> str:
  """'ori_imgs/: 50 jpg, 50 lms; ...': the files each folder (relative to `base`) holds, by extension."""
  parts = []
  for folder in folders:
    by_ext = collections.Counter(os.path.splitext(name)[1].lstrip('.') or 'file'
                                 for name in _listing(f'{base}/{folder}'))
    if by_ext:
      parts.append(f'{_e(folder)}/: ' + ', '.join(f'{n} {_e(ext)}' for ext, n in sorted(by_ext.items())))
  return '; '.join(parts)


def _folder_block(output: str, folder: Folder) -> str:
  """A pictured folder: its counts, files, frames spread over it with their overlays, and its audio."""
  base = f'{output}/{folder.name}'
  href = _media_href(folder.name)
  extra = ''
  if folder.kind == 'nerf':
    rows = _nerf_rows(base, _spread_frames(folder.frames))
    files = _file_counts(base, NERF_PARTS) + '; beside them: ' + ', '.join(
        _e(name) for name in _listing(base) if '.' in name)
    if FileSystems.exists(f'{base}/audio.wav'):
      extra = f'<audio controls preload="none" src="{href}/audio.wav"></audio>'
  elif folder.kind == 'avatar':
    rows = _avatar_rows(base, _spread_frames(folder.frames))
    files = _file_counts(base, ['image']) + '; beside them: ' + ', '.join(
        _e(name) for name in _listing(base) if '.' in name)
  else:
    tube_format = folder.record.get('tube_format', 'png')
    rows = _mmvox_rows(output, folder.name, _spread_frames(folder.frames, MMVOX_EVERY), tube_format)
    files = _file_counts(output, [f'{where}/{folder.name}' for where in ('video', 'mask', MMVOX_DRAWINGS)])
    if tube_format == 'mp4':
      extra = f'<video controls preload="metadata" src="video/{href}.mp4"></video>'
    captions = f'{output}/txt/{folder.name}.txt'
    if FileSystems.exists(captions):
      first = (read_bytes(captions).decode().splitlines() or [''])[0]
      extra += f'<p class="caption">first caption (txt/): {_e(first)}</p>'
  width = max(len(tiles) for _, tiles in rows)
  sheet = np.full((len(rows) * TILE, width * TILE, 3), 255, np.uint8)
  for r, (_, tiles) in enumerate(rows):
    for c, tile in enumerate(tiles):
      sheet[r * TILE:(r + 1) * TILE, c * TILE:(c + 1) * TILE] = tile
  name = _write_media(output, f'{FOLDER_PICTURES}/{sample_key(folder.name)}.png', png(sheet))
  legend = ' / '.join(_e(label) for label, _ in rows)
  return (f'<section class="folder" data-folder="{_e(folder.name)}"><h3>{_e(folder.name)} <small>{folder.clips} '
          f'clip{"s" if folder.clips != 1 else ""}, {folder.frames} frames</small></h3>'
          f'<p class="files">{files}</p><figure><img src="{name}" alt="{_e(folder.name)}"><figcaption>rows: '
          f'{legend}</figcaption></figure>{extra}</section>')


def _folders_html(output: str, facts: Facts) -> str:
  """Folder recipes: how many subjects or tubes, a table of them, and pictures of a few."""
  shown = facts.folders.shown()
  if not shown:
    return ''
  total = len(facts.folders.names)
  noun = ('tube' if shown[0].kind == 'mmvox' else 'subject') + ('s' if total != 1 else '')
  rows = ''.join(f'<tr><td>{_e(f.name)}</td><td>{_e(f.kind)}</td><td class="n" data-v="{f.clips}">{f.clips}</td>'
                 f'<td class="n" data-v="{f.frames}">{f.frames}</td></tr>' for f in sorted(shown, key=lambda f: f.name))
  note = f'{total} {noun}.' if len(shown) == total else f'{len(shown)} of {total} {noun}, spread over the run.'
  blocks = ''.join(_folder_block(output, folder) for folder in shown[:FOLDERS_PICTURED])
  heading = 'Tubes' if shown[0].kind == 'mmvox' else 'Subjects'
  return (f'<h2>{heading}</h2><p>{note} Frames by their index records; the pictures show '
          f'{FOLDER_FRAMES} frames spread over each of {min(len(shown), FOLDERS_PICTURED)} of them as written, '
          'with their overlays, and the files each folder holds.</p>'
          '<div class="scroll"><table class="sortable" id="folders"><thead><tr><th data-type="text">folder</th>'
          '<th data-type="text">recipe</th><th data-type="num">clips</th><th data-type="num">frames</th></tr></thead>'
          f'<tbody>{rows}</tbody></table></div>{blocks}')


def _samples_html(output: str, picks: List[dict], folders: str = '') -> str:
  """Kept samples of a shard (or hdtf files) output; a folder recipe's point to its subjects or tubes."""
  if not picks and folders:
    return '<p>This recipe writes folders, not samples: see the subjects or tubes below.</p>'
  tiles, videos = kept_samples(output, picks, VIDEOS)
  blocks = []
  for record, _ in tiles:
    if record['id'] not in videos:
      continue
    scores = record.get('scores') or {}
    bits = [f'{plain(_number(record.get("duration")))} s'] + [
        f'{m.column.split(" (")[0]} {plain(_number(scores.get(m.score)))}' for m in COLUMNS[1:]
        if _number(scores.get(m.score)) is not None]
    blocks.append(f'<figure><video src="{videos[record["id"]]}" controls loop muted autoplay playsinline '
                  f'preload="metadata"></video><figcaption>{_e(record["id"])}</figcaption>'
                  f'<p>{_e(", ".join(bits))}</p></figure>')
  sheet = ''
  if tiles:
    name = _write_media(output, f'{FIGURES}/contact_sheet.png', png(contact_sheet([tile for _, tile in tiles])))
    sheet = (f'<figure><figcaption>contact sheet</figcaption><img src="{name}" alt="contact sheet">'
             f'<p>middle frame of {len(tiles)} kept clips spread over the run, landmarks drawn</p></figure>')
  if not blocks and not sheet:
    return '<p>No kept samples.</p>'
  return (f'<p>{len(blocks)} kept clips (up to their first {PREVIEW_S:g} s), {PREVIEW} px, landmarks drawn, '
          f'with their audio (unmute to judge the sync).</p><div class="videos">{"".join(blocks)}</div>{sheet}')


def write_report(output: str, samples: int = 16) -> str:
  """Write report.html and its media (report_media/) into `output`; returns the page's URI."""
  output = output.rstrip('/')
  facts = gather(output, samples)
  stats = facts.stats
  picks = facts.picks.items()
  reasons_table, gallery = _rejects_html(output, facts)
  folders = _folders_html(output, facts)
  totals = ''.join(f'<span>{_e(name)} <b>{_e(stats[name])}</b></span>' for name in
                   ('planned', 'written', 'rejected', 'written_this_run', 'frames_written', 'balanced')
                   if name in stats) or '<span>no stats.json (an unfinished run?)</span>'
  raw = ''.join(f'<tr><th>{_e(k)}</th><td>{_e(json.dumps(v))}</td></tr>' for k, v in sorted(stats.items()))
  page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Run report: {_e(output)}</title><style>{STYLE}</style></head>
<body><h1>Run report</h1><p>{_e(output)}: {facts.kept} clips in the index, {facts.rejected} reject records.</p>
<p class="totals">{totals}</p><details><summary>stats.json</summary><table>{raw}</table></details>
<h2>Rejects by reason</h2>{reasons_table}{gallery}
<h2>Kept samples</h2>{_samples_html(output, picks, folders)}{folders}
<h2>Scores against the thresholds</h2>
<p>Blue: kept clips. Red: clips that filter rejected (a clip counts under the first filter it failed).</p>
{_figures_html(output, facts)}
{_languages_html(output, facts)}
<h2>Clips</h2>{_table_html(facts)}
<script>{SORT_SCRIPT}</script>
</body></html>
"""
  uri = FileSystems.join(output, REPORT)
  write_atomic(uri, page.encode())
  return uri


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog='python -m beam_pipeline.report',
      description='Write report.html (and report_media/) into a finished output, local or gs://: rejects by '
      'reason with thumbnails and measured values against the thresholds, kept samples as videos, score plots '
      'and a sortable table of clips.')
  parser.add_argument('output', help='The output directory of a run (holds stats.json, index.jsonl, rejects.jsonl).')
  parser.add_argument('--samples', type=int, default=16,
                      help=f'Kept samples in the contact sheet; the first {VIDEOS} are also shown as videos.')
  args = parser.parse_args(argv)
  output = args.output.rstrip('/')
  if not any(FileSystems.exists(FileSystems.join(output, name)) for name in ('stats.json', 'index.jsonl')):
    parser.error(f'{output} is not a finished output: it has neither stats.json nor index.jsonl')
  print(f'report: {write_report(output, args.samples)}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
