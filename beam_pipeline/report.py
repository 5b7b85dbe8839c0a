"""report.html: what a curator judges a run, and its filter thresholds, from.

Written next to the shards it describes, local or gs:// (everything is read and
written through Beam FileSystems), after a run or later with

    python -m beam_pipeline.report OUTPUT

- totals, and rejects by reason; for every reason a few rejected clips, each
  with its thumbnail (ScoreAndFilter writes them into report_media/rejects/)
  and the value it measured against the threshold it failed;
- a few kept samples as short looping videos with their landmarks drawn (and
  their audio), and a contact sheet of more;
- per score, kept and rejected clips against the threshold: dots when there
  are few clips, histograms otherwise, axes in plain numbers with units;
- a table of clips, kept and rejected, that sorts on a click on a header.

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
import tempfile
import urllib.parse
import zlib
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import av
import cv2
import numpy as np
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms.core.fileio import iter_jsonl, write_atomic
from transforms.filters import REJECT_THUMBNAILS
from transforms.lib.features import wav_samples
from transforms.writers.shards import sample_key

REPORT = 'report.html'
MEDIA = 'report_media'
FIGURES = f'{MEDIA}/figures'
SAMPLE_VIDEOS = f'{MEDIA}/samples'
THUMB = 192  # contact sheet tiles
PREVIEW = 256  # kept-sample videos: side in pixels, seconds at most, how many
PREVIEW_S = 4.0
VIDEOS = 4
REJECTS_SHOWN = 6  # per reason: half nearest the threshold, the rest spread over the reason's clips
TABLE_ROWS = 5000
DOTS_BELOW = 20  # fewer clips than this: a dot per clip instead of a histogram
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
    Metric('face_ratio', 'frames with a face', 'fraction of frames', 'face_ratio_low', 'min_face_ratio', '<'),
    Metric('source_resolution', 'source short side', 'px', 'low_resolution', 'min_resolution', '<', whole=True),
    Metric('eye_motion_var', 'eye motion variance', 'px²', 'eye_motion_low', 'min_eye_motion_var', '≤'),
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

  def threshold(self, metric: Metric) -> Optional[float]:
    """This run's setting when stats.json records it, else the one most of its rejects name."""
    recorded = _number(self.stats.get('thresholds', {}).get(metric.flag))
    if recorded is not None:
      return recorded
    seen = self.reasons[metric.reason].thresholds if metric.reason in self.reasons else None
    return seen.most_common(1)[0][0] if seen else None


def _kept_row(record: dict) -> dict:
  scores = record.get('scores') or {}
  values = {m.score: _number(scores.get(m.score)) for m in COLUMNS}
  if values['duration'] is None:
    values['duration'] = _number(record.get('duration'))
  return {'id': record['id'], 'status': 'kept', 'detail': '', 'values': values}


def _reject_row(reject: dict) -> dict:
  metric = BY_REASON.get(reject.get('reason'))
  values = {m.score: None for m in COLUMNS}
  if metric is not None and metric.column:
    values[metric.score] = _number(reject.get('value'))
  return {'id': reject['id'], 'status': reject.get('reason', '?'), 'detail': reject.get('detail', ''),
          'values': values}


def gather(output: str, samples: int) -> Facts:
  """One streaming pass over index.jsonl and one over rejects.jsonl."""
  facts = Facts(read_json(FileSystems.join(output, 'stats.json')), Smallest(samples))
  for record in iter_jsonl(FileSystems.join(output, 'index.jsonl')):
    facts.kept += 1
    scores = record.get('scores') or {}
    for name, value in scores.items():
      number = _number(value)
      if number is not None:
        facts.kept_values[name].append(number)
    if 'duration' not in scores and _number(record.get('duration')) is not None:
      facts.kept_values['duration'].append(float(record['duration']))
    rank = _spread(record['id'])
    facts.rows.offer(rank, _kept_row(record))
    if record.get('shard'):
      facts.picks.offer(rank, {k: record.get(k) for k in ('id', 'key', 'shard', 'duration', 'scores')})
  for reject in iter_jsonl(FileSystems.join(output, 'rejects.jsonl')):
    facts.rejected += 1
    reason = facts.reasons[reject.get('reason', '?')]
    reason.count += 1
    reason.stages[reject.get('stage', '?')] += 1
    value, threshold = _number(reject.get('value')), _number(reject.get('threshold'))
    if value is not None:
      reason.values.append(value)
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


def _draw_points(image: np.ndarray, points: np.ndarray, scale: float, radius: int) -> None:
  for x, y in points[np.isfinite(points).all(1)] * scale:
    cv2.circle(image, (int(round(x)), int(round(y))), radius, (40, 255, 80), -1, cv2.LINE_AA)


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
      _draw_points(image, landmarks[index, :, :2], 1.0, max(1, image.shape[0] // 256))
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
  """The first `seconds` of the sample, `side` pixels wide, its landmarks drawn on every frame, with its
  audio: H.264 + AAC in an mp4 that browsers play inline (moov atom first, hence a file, not a buffer)."""
  if 'mp4' not in members:
    return None
  points = _landmark_points(members)
  images = []
  with av.open(io.BytesIO(members['mp4'])) as source:
    stream = source.streams.video[0]
    rate = stream.average_rate or 25
    width = stream.codec_context.width
    height = int(round(side * stream.codec_context.height / width / 2)) * 2
    for index, frame in enumerate(source.decode(stream)):
      if index >= seconds * rate:
        break
      image = cv2.resize(frame.to_ndarray(format='rgb24'), (side, height), interpolation=cv2.INTER_AREA)
      if points is not None and index < len(points):
        _draw_points(image, points[index], side / width, 2)
      images.append(image)
  if not images:
    return None
  with tempfile.TemporaryDirectory(prefix='report-') as scratch:
    path = os.path.join(scratch, 'preview.mp4')
    with av.open(path, 'w', options={'movflags': '+faststart'}) as out:
      video = out.add_stream('libx264', rate=rate, options={'crf': '30', 'preset': 'veryfast'})
      video.width, video.height, video.pix_fmt = side, height, 'yuv420p'
      audio = None
      if 'wav' in members:
        samples, sample_rate = wav_samples(members['wav'])
        audio = out.add_stream('aac', rate=sample_rate, layout='mono')
      for image in images:
        out.mux(video.encode(av.VideoFrame.from_ndarray(image, format='rgb24')))
      out.mux(video.encode())
      if audio is not None:
        sound = samples[:int(round(len(images) / float(rate) * sample_rate))].astype(np.float32)
        chunk = audio.codec_context.frame_size or 1024
        for start in range(0, len(sound), chunk):
          block = av.AudioFrame.from_ndarray(sound[None, start:start + chunk], format='flt', layout='mono')
          block.sample_rate, block.pts = sample_rate, start
          out.mux(audio.encode(block))
        out.mux(audio.encode())
    with open(path, 'rb') as handle:
      return handle.read()


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
    if record.get('shard'):
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
  name = _reject_thumbnail_name(reject['id'])
  if FileSystems.exists(FileSystems.join(output, name)):
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
    cards = ''.join(_reject_card(output, reject) for reject in shown)
    sections.append(f'<section class="reason" id="{anchor}"><h3>{_e(reason)} <small>{info.count} '
                    f'clip{"s" if info.count != 1 else ""}; {len(shown)} shown, {order}</small></h3>'
                    + (f'<p class="rule">The filter {rule}.</p>' if rule else '')
                    + f'<div class="cards">{cards}</div></section>')
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


def _table_html(facts: Facts) -> str:
  rows = sorted(facts.rows.items(), key=lambda row: row['id'])
  total = facts.kept + facts.rejected
  head = ''.join(f'<th data-type="num">{_e(m.column)}</th>' for m in COLUMNS)
  body = []
  for row in rows:
    cells = ''.join(f'<td class="n" data-v="{"" if row["values"][m.score] is None else row["values"][m.score]}">'
                    f'{plain(row["values"][m.score])}</td>' for m in COLUMNS)
    status = 'kept' if row['status'] == 'kept' else 'rejected'
    body.append(f'<tr class="{status}"><td>{_e(row["id"])}</td><td title="{_e(row["detail"])}">'
                f'{_e(row["status"])}</td>{cells}</tr>')
  note = (f'{len(rows)} of {total} clips, a sample spread over the run (the table stops at {TABLE_ROWS} rows).'
          if len(rows) < total else f'All {total} clips.')
  return (f'<p>{note} Click a header to sort; rejected clips show the value they failed on.</p>'
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
.card img{width:180px;height:180px;object-fit:cover;display:block;background:#333}
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
tr.rejected td:nth-child(2){color:#a11}
"""


def _samples_html(output: str, picks: List[dict]) -> str:
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
  totals = ''.join(f'<span>{_e(name)} <b>{_e(stats[name])}</b></span>' for name in
                   ('planned', 'written', 'rejected', 'written_this_run', 'frames_written', 'balanced')
                   if name in stats) or '<span>no stats.json (an unfinished run?)</span>'
  raw = ''.join(f'<tr><th>{_e(k)}</th><td>{_e(json.dumps(v))}</td></tr>' for k, v in sorted(stats.items()))
  page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Run report: {_e(output)}</title><style>{STYLE}</style></head>
<body><h1>Run report</h1><p>{_e(output)}: {facts.kept} clips in the index, {facts.rejected} reject records.</p>
<p class="totals">{totals}</p><details><summary>stats.json</summary><table>{raw}</table></details>
<h2>Rejects by reason</h2>{reasons_table}{gallery}
<h2>Kept samples</h2>{_samples_html(output, picks)}
<h2>Scores against the thresholds</h2>
<p>Blue: kept clips. Red: clips that filter rejected (a clip counts under the first filter it failed).</p>
{_figures_html(output, facts)}
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
