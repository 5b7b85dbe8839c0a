"""Read the job's input into `Source` elements: HDTF annotation dirs, manifests, globs.

Parsing never raises on a bad line: a clip that cannot be planned becomes a
`Reject` with stage `manifest`, so every planned clip is accounted for.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
import re
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_pipeline.elements import ClipSpec, Reject, Source

STAGE = 'manifest'
HDTF_KINDS = ('video_url', 'resolution', 'annotion_time', 'crop_wh', 'crop_ratio')
VIDEO_EXTENSIONS = ('.mp4', '.mkv', '.webm', '.mov', '.avi', '.m4v', '.flv', '.ts', '.mpg', '.mpeg')
MANIFEST_EXTENSIONS = ('.csv', '.jsonl', '.json', '.parquet')
_ID_UNSAFE = re.compile(r'[^A-Za-z0-9._-]+')
MAX_ID_LENGTH = 120


class ManifestError(ValueError):
  """A manifest entry that cannot be planned; its message is the reject detail."""

  def __init__(self, reason: str, detail: str):
    super().__init__(detail)
    self.reason = reason


def sanitize_id(raw: str) -> str:
  """A path-safe id: letters, digits, '.', '_' and '-', no leading dots, bounded length."""
  text = _ID_UNSAFE.sub('_', str(raw).replace('\x00', ''))
  text = re.sub(r'_+', '_', re.sub(r'\.{2,}', '_', text)).strip('._')
  return text[:MAX_ID_LENGTH]


def parse_stamp(text: str) -> float:
  """Seconds from `SS(.f)`, `MM:SS(.f)` or `HH:MM:SS(.fff)`."""
  text = str(text).strip()
  if not text:
    raise ManifestError('bad_timestamp', 'empty time stamp')
  parts = text.split(':')
  if len(parts) > 3 or any(not re.fullmatch(r'\d+(\.\d+)?', p) for p in parts):
    raise ManifestError('bad_timestamp', f'malformed time stamp {text!r}')
  if any('.' in p for p in parts[:-1]):
    raise ManifestError('bad_timestamp', f'fraction before the seconds field in {text!r}')
  seconds = 0.0
  for part in parts:
    seconds = seconds * 60 + float(part)
  if len(parts) > 1 and any(float(p) >= 60 for p in parts[1:]):
    raise ManifestError('bad_timestamp', f'minutes or seconds >= 60 in {text!r}')
  return seconds


def parse_range(value: Union[str, Sequence]) -> Tuple[float, float]:
  """A clip range from `START-END` text or a `[start, end]` pair of seconds or stamps."""
  if isinstance(value, str):
    pieces = value.strip().split('-')
    if len(pieces) != 2:
      raise ManifestError('bad_timestamp', f'time range {value!r} is not START-END')
    start, end = (parse_stamp(p) for p in pieces)
  else:
    if len(value) != 2:
      raise ManifestError('bad_timestamp', f'time range {value!r} is not [start, end]')
    start, end = (_seconds(v) for v in value)
  if end <= start:
    raise ManifestError('bad_range', f'clip ends ({end:.3f}s) at or before it starts ({start:.3f}s)')
  return start, end


def _seconds(value) -> float:
  if isinstance(value, bool):
    raise ManifestError('bad_timestamp', f'time stamp {value!r} is not a number')
  if isinstance(value, (int, float)):
    if value != value or value < 0 or value in (float('inf'),):
      raise ManifestError('bad_timestamp', f'time stamp {value!r} is not a non-negative number')
    return float(value)
  return parse_stamp(str(value))


def _read_text(path: str) -> str:
  with FileSystems.open(path) as handle:
    return handle.read().decode('utf-8-sig', errors='replace')


def _lines(text: str) -> Iterator[List[str]]:
  """Whitespace-split fields of each non-empty line (BOM, CRLF and trailing spaces tolerated)."""
  for line in text.replace('\ufeff', '').splitlines():
    fields = line.split()
    if fields and not fields[0].startswith('#'):
      yield fields


def _stem(name: str) -> str:
  base = os.path.basename(name)
  for ext in VIDEO_EXTENSIONS:
    if base.lower().endswith(ext):
      return base[:-len(ext)]
  return base


# ----------------------------------------------------------------------------- HDTF

def hdtf_sets(directory: str) -> Dict[str, Dict[str, str]]:
  """{set name: {kind: path}} for every `{SET}_{kind}.txt` in an HDTF annotation dir."""
  sets: Dict[str, Dict[str, str]] = {}
  pattern = re.compile(r'^(?P<set>.+)_(?P<kind>%s)\.txt$' % '|'.join(HDTF_KINDS))
  for metadata in FileSystems.match([FileSystems.join(directory, '*.txt')])[0].metadata_list:
    match = pattern.match(os.path.basename(metadata.path))
    if match:
      sets.setdefault(match.group('set'), {})[match.group('kind')] = metadata.path
  return sets


def parse_hdtf(directory: str) -> Iterator[Union[Source, Reject]]:
  """Sources and rejects from an HDTF annotation directory (any set names)."""
  sets = hdtf_sets(directory)
  if not sets:
    raise FileNotFoundError(f'no {{SET}}_video_url.txt files in {directory}')
  for set_name in sorted(sets):
    files = sets[set_name]
    tables = {kind: list(_lines(_read_text(path))) for kind, path in files.items()}
    yield from _hdtf_set(set_name, tables)


def _hdtf_set(set_name: str, tables: Dict[str, List[List[str]]]) -> Iterator[Union[Source, Reject]]:
  urls: Dict[str, str] = {}
  for fields in tables.get('video_url', []):
    if len(fields) >= 2:
      urls.setdefault(_stem(fields[0]), fields[1])
  resolution = {}
  for fields in tables.get('resolution', []):
    if len(fields) >= 2 and re.fullmatch(r'\d+', fields[1]):
      resolution[_stem(fields[0])] = int(fields[1])
  crops = {}
  for fields in tables.get('crop_wh', []):
    if len(fields) >= 5 and all(re.fullmatch(r'-?\d+', f) for f in fields[1:5]):
      x, w, y, h = (int(f) for f in fields[1:5])  # HDTF order: x, width, y, height
      crops[_stem(fields[0])] = (x, y, w, h)
  ratios = {}
  for fields in tables.get('crop_ratio', []):
    try:
      ratios[_stem(fields[0])] = float(fields[1])
    except (IndexError, ValueError):
      continue
  annotated = set()
  for fields in tables.get('annotion_time', []):
    name = _stem(fields[0])
    annotated.add(name)
    source_id = sanitize_id(name)
    url = urls.get(name)
    clips, rejects = [], []
    for index, stamp in enumerate(fields[1:]):
      clip_id = f'{source_id}_{index}'
      try:
        start, end = parse_range(stamp)
      except ManifestError as error:
        rejects.append(Reject(clip_id, STAGE, error.reason, str(error), source_id))
        continue
      window = crops.get(f'{name}_{index}')
      if window is not None and (window[2] <= 0 or window[3] <= 0):
        rejects.append(Reject(clip_id, STAGE, 'bad_crop', f'crop window {window} has no area', source_id))
        continue
      clips.append(ClipSpec(clip_id, index, start, end, window, ratios.get(f'{name}_{index}')))
    if url is None:
      rejects.extend(Reject(c.clip_id, STAGE, 'no_url', f'{name} is not in {set_name}_video_url.txt', source_id)
                     for c in clips)
      clips = []
    yield from rejects
    if clips:
      height = resolution.get(name) or None  # 0 means "unknown" in HDTF's files
      yield Source(source_id, url, tuple(clips), height)
  for name in sorted(set(urls) - annotated):
    yield Reject(sanitize_id(name), STAGE, 'no_annotation',
                 f'{name} has a URL but no line in {set_name}_annotion_time.txt', sanitize_id(name))


# ----------------------------------------------------------------------------- manifests

def _records(path: str) -> Iterator[dict]:
  lower = path.lower()
  if lower.endswith('.parquet'):
    import pyarrow.parquet as pq
    with FileSystems.open(path) as handle:
      table = pq.read_table(io.BytesIO(handle.read()))
    yield from table.to_pylist()
  elif lower.endswith('.csv'):
    yield from csv.DictReader(io.StringIO(_read_text(path)))
  else:
    text = _read_text(path)
    if lower.endswith('.json') and text.lstrip().startswith('['):
      yield from json.loads(text)
      return
    for number, line in enumerate(text.splitlines(), 1):
      if line.strip():
        try:
          record = json.loads(line)
        except json.JSONDecodeError as error:
          record = {'__error__': f'line {number}: {error}'}
        yield record if isinstance(record, dict) else {'__error__': f'line {number} is not an object'}


def _maybe_json(value):
  if isinstance(value, str) and value.strip()[:1] in ('[', '{'):
    return json.loads(value)
  return value


def source_from_record(record: dict, row: int) -> Iterator[Union[Source, Reject]]:
  """One manifest row (`id`, `url`, optional `clips`, `crop`, `crop_ratio`, `height`)."""
  raw_id = record.get('id') or ''
  source_id = sanitize_id(raw_id) if raw_id else f'row{row}'
  if '__error__' in record:
    yield Reject(source_id, STAGE, 'bad_manifest_row', record['__error__'], source_id)
    return
  url = str(record.get('url') or '').strip()
  if not raw_id or not url:
    yield Reject(source_id, STAGE, 'bad_manifest_row', f'row {row} needs both id and url', source_id)
    return
  try:
    crop = _maybe_json(record.get('crop'))
    window = tuple(int(v) for v in crop) if crop not in (None, '') else None
    if window is not None and (len(window) != 4 or window[2] <= 0 or window[3] <= 0):
      raise ManifestError('bad_crop', f'crop {crop!r} is not [x, y, w, h] with positive size')
    ratio = record.get('crop_ratio')
    ratio = float(ratio) if ratio not in (None, '') else None
    height = record.get('height')
    height = int(height) if height not in (None, '') else None
    clips_value = _maybe_json(record.get('clips'))
  except (ValueError, TypeError) as error:
    yield Reject(source_id, STAGE, 'bad_manifest_row', f'row {row}: {error}', source_id)
    return
  except ManifestError as error:
    yield Reject(source_id, STAGE, error.reason, str(error), source_id)
    return
  if clips_value in (None, '', []):
    yield Source(source_id, url, (ClipSpec(f'{source_id}_0', 0, None, None, window, ratio),), height or None)
    return
  if isinstance(clips_value, str):
    clips_value = [c for c in re.split(r'[;\s]+', clips_value) if c]
  clips = []
  for index, value in enumerate(clips_value):
    clip_id = f'{source_id}_{index}'
    try:
      start, end = parse_range(value)
    except (ManifestError, TypeError) as error:
      reason = getattr(error, 'reason', 'bad_timestamp')
      yield Reject(clip_id, STAGE, reason, str(error), source_id)
      continue
    clips.append(ClipSpec(clip_id, index, start, end, window, ratio))
  if clips:
    yield Source(source_id, url, tuple(clips), height or None)


def parse_manifest(path: str) -> Iterator[Union[Source, Reject]]:
  for row, record in enumerate(_records(path)):
    yield from source_from_record(record, row)


# ----------------------------------------------------------------------------- globs

def parse_glob(pattern: str) -> Iterator[Source]:
  """Each matching video file is one source with one whole-video clip."""
  for metadata in sorted(FileSystems.match([pattern])[0].metadata_list, key=lambda m: m.path):
    source_id = sanitize_id(_stem(metadata.path))
    yield Source(source_id, metadata.path, (ClipSpec(f'{source_id}_0', 0),))


def detect_format(spec: str) -> str:
  """`hdtf`, `manifest` or `glob` for an `--input` value."""
  lower = spec.lower().rstrip('/')
  if lower.endswith(MANIFEST_EXTENSIONS):
    return 'manifest'
  if any(ch in spec for ch in '*?[') or lower.endswith(VIDEO_EXTENSIONS):
    return 'glob'
  return 'hdtf'


def read_input(spec: str, input_format: str = 'auto') -> Iterator[Union[Source, Reject]]:
  fmt = detect_format(spec) if input_format == 'auto' else input_format
  if fmt == 'hdtf':
    return parse_hdtf(spec)
  if fmt == 'manifest':
    return parse_manifest(spec)
  if fmt == 'glob':
    return parse_glob(spec)
  raise ValueError(f'unknown input format {input_format!r}')


class ReadSources(beam.PTransform):
  """Input spec -> `Source` elements (main) and `Reject`s (tag `rejects`).

  Sources already fully written in the output are dropped here (resume); their
  clip ids still count as planned. Sources are reshuffled so that downloads
  spread over workers instead of fusing onto the one that read the manifest.
  """

  def __init__(self, spec: str, input_format: str = 'auto', written_ids: Iterable[str] = ()):
    super().__init__()
    self.spec = spec
    self.input_format = input_format
    self.written_ids = frozenset(written_ids)

  def expand(self, pbegin):
    parsed = (
        pbegin
        | 'InputSpec' >> beam.Create([self.spec])
        | 'Parse' >> beam.ParDo(_ParseInput(self.input_format, self.written_ids)).with_outputs(
            'rejects', 'planned', main='sources'))
    sources = parsed.sources | 'Spread' >> beam.Reshuffle()
    return {'sources': sources, 'rejects': parsed.rejects, 'planned': parsed.planned}


class _ParseInput(beam.DoFn):

  def __init__(self, input_format: str, written_ids: frozenset):
    self.input_format = input_format
    self.written_ids = written_ids
    self.skipped = beam.metrics.Metrics.counter('manifest', 'clips_already_written')

  def process(self, spec):
    seen = set()
    for item in read_input(spec, self.input_format):
      if isinstance(item, Reject):
        yield beam.pvalue.TaggedOutput('planned', item.id)
        yield beam.pvalue.TaggedOutput('rejects', item)
        continue
      clips = []
      for clip in item.clips:
        yield beam.pvalue.TaggedOutput('planned', clip.clip_id)
        if clip.clip_id in seen:
          yield beam.pvalue.TaggedOutput('rejects', Reject(
              clip.clip_id, STAGE, 'duplicate_id', 'an earlier entry already plans this clip id',
              item.source_id))
          continue
        seen.add(clip.clip_id)
        if clip.clip_id in self.written_ids:
          self.skipped.inc()
        else:
          clips.append(clip)
      if clips:
        yield Source(item.source_id, item.url, tuple(clips), item.height)
