"""Read the job's input into `Source` elements: HDTF annotation dirs, manifests, globs.

Parsing never raises on a bad line: a clip that cannot be planned becomes a
`Reject` with stage `manifest`, so every planned clip is accounted for. Ids
that would climb out of a folder are refused; others are sanitised. Tar and
zip inputs are only listed here: each member video becomes a Source whose url
names the member, and `transforms.sources.unpack.UnpackMembers` unpacks it after the
shuffle. Members that are pickles are never loaded unless the user trusts them.
In the pipeline (`ReadSources`) no worker reads the whole input: globs are listed
file by file, large manifests parsed in slices (transforms/sources/rows.py) and
duplicate clip ids settled by a shuffle (transforms/sources/duplicates.py).
"""
from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import os
import re
import tarfile
import zipfile
from typing import BinaryIO, Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems

from transforms.core.elements import ClipSpec, ReasonError, Reject, Source
from transforms.lib.pickles import load_restricted
from transforms.lib.probe import VIDEO_EXTENSIONS
from transforms.lib.safety import (InputPolicy, UnsafeInput, check_url, local_path, safe_member_name, scheme_of,
                                   unsafe_id_reason)
from transforms.sources.archives import (MEMBER_SCHEME, MIB, TAR, TAR_STREAM, UNPACK_ERRORS, ZIP, ArchiveMember,
                                         Unpacker, is_member_url)
from transforms.sources.duplicates import DropDuplicateClips
from transforms.sources.frames import FrameFolderOptions, FrameFolders, ListedFolder
from transforms.sources.megactor_tars import SampleTar
from transforms.sources.rows import (ARCHIVE, HDTF, SPLIT_BYTES, VIDEO, WHOLE, Piece, count_slice, jsonl_record,
                                     normalize_newlines, number_slices, slice_records, split_file)
from transforms.sources.unpack import unpack_in_process

STAGE = 'manifest'
HDTF_KINDS = ('video_url', 'resolution', 'annotion_time', 'crop_wh', 'crop_ratio')
MANIFEST_EXTENSIONS = ('.csv', '.jsonl', '.json', '.parquet')
ARCHIVE_EXTENSIONS = ('.tar', '.tar.gz', '.tgz', '.tar.bz2', '.tar.xz', '.zip')
PICKLE_EXTENSIONS = ('.pkl', '.pickle')
COMPRESSED_MAGIC = (b'\x1f\x8b', b'BZh', b'\xfd7zXZ\x00')  # gzip, bzip2, xz: a tar in one cannot seek
RESERVED = f'URLs of scheme {MEMBER_SCHEME}: name listed archive members; an input cannot give one'
MAX_SIDECAR_BYTES = 1 << 20  # a <stem>.json / .pkl metadata record is read whole into memory
_ID_UNSAFE = re.compile(r'[^A-Za-z0-9._-]+')
MAX_ID_LENGTH = 120
OVERLAP_TOLERANCE_S = 0.04  # one 25 fps frame: touching clips are fine, overlapping ones duplicate data
ORIGIN_FIELDS = ('speaker', 'video', 'utterance')  # VoxCeleb's identity of a row (Source.origin: mmvox's ids)
# Every field a manifest row (or an archive member's sidecar) may carry: the one list of known fields.
MANIFEST_FIELDS = ('id', 'url', 'clips', 'crop', 'crop_ratio', 'height') + ORIGIN_FIELDS + ('language',)
# A BCP-47 language tag as datasets write them: a 2-3 letter ISO 639 language (the 5-8 letter ones RFC 5646 keeps
# for registration are none, and would let `english` through), then subtags of 1-8 letters or digits (script,
# region, variants, extensions), `-` or `_` between them; at most 35 characters (RFC 5646 4.4.1)
_LANGUAGE_TAG = re.compile(r'[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{1,8})*')


class ManifestError(ReasonError, ValueError):
  """A manifest entry that cannot be planned; its message is the reject detail."""


def sanitize_id(raw: str) -> str:
  """A path-safe id: letters, digits, '.', '_' and '-', no leading dots, bounded length.

  An id with nothing usable left (e.g. all non-Latin) gets a stable hash-based fallback.
  """
  text = _ID_UNSAFE.sub('_', str(raw).replace('\x00', ''))
  text = re.sub(r'_+', '_', re.sub(r'\.{2,}', '_', text)).strip('._-')[:MAX_ID_LENGTH].rstrip('._-')
  return text or 'id_' + hashlib.sha1(str(raw).encode('utf-8', 'surrogatepass')).hexdigest()[:10]


def parse_stamp(text: str) -> float:
  """Seconds from `SS(.f)`, `MM:SS(.f)` or `HH:MM:SS(.fff)`."""
  text = str(text).strip()
  if not text:
    raise ManifestError('bad_timestamp', 'empty time stamp')
  parts = text.split(':')
  if len(parts) > 3 or any(not re.fullmatch(r'[0-9]+(\.[0-9]+)?', p) for p in parts):
    raise ManifestError('bad_timestamp', f'malformed time stamp {text!r}')
  if any('.' in p for p in parts[:-1]):
    raise ManifestError('bad_timestamp', f'fraction before the seconds field in {text!r}')
  seconds = 0.0
  for part in parts:
    seconds = seconds * 60 + float(part)
  if seconds == float('inf'):
    raise ManifestError('bad_timestamp', f'time stamp {text[:40]!r} is out of range')
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


def drop_overlaps(clips: Sequence[ClipSpec], source_id: str) -> Tuple[List[ClipSpec], List[Reject]]:
  """Keep clips in order; a clip overlapping a kept one by more than a frame is rejected (duplicate data)."""
  kept, rejects = [], []
  for clip in clips:
    if clip.start is not None and clip.end is not None:
      other = next((k for k in kept if k.start is not None and k.end is not None and
                    min(clip.end, k.end) - max(clip.start, k.start) > OVERLAP_TOLERANCE_S), None)
      if other is not None:
        rejects.append(Reject(clip.clip_id, STAGE, 'overlapping_clip',
                              f'{clip.start:.3f}-{clip.end:.3f}s overlaps {other.clip_id} '
                              f'({other.start:.3f}-{other.end:.3f}s)', source_id))
        continue
    kept.append(clip)
  return kept, rejects


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
    unsafe = unsafe_id_reason(fields[0])
    if unsafe:
      yield Reject(source_id, STAGE, 'unsafe_id', f'video name {fields[0][:80]!r} {unsafe}', source_id)
      continue
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
    clips, overlapping = drop_overlaps(clips, source_id)
    rejects.extend(overlapping)
    if url is None or is_member_url(url):
      reason, why = ('no_url', f'{name} is not in {set_name}_video_url.txt') if url is None else ('bad_url', RESERVED)
      rejects.extend(Reject(c.clip_id, STAGE, reason, why, source_id) for c in clips)
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
  """A manifest's records in file order, the whole file at once (large ones are sliced: transforms/sources/rows.py)."""
  lower = path.lower()
  if lower.endswith('.parquet'):
    import pyarrow.parquet as pq
    with FileSystems.open(path) as handle:
      table = pq.read_table(io.BytesIO(handle.read()))
    yield from table.to_pylist()
  elif lower.endswith('.csv'):
    yield from csv.DictReader(io.StringIO(normalize_newlines(_read_text(path))))  # mixed line endings
  else:
    text = _read_text(path)
    if lower.endswith('.json') and text.lstrip().startswith('['):
      for number, record in enumerate(json.loads(text)):
        yield record if isinstance(record, dict) else {'__error__': f'item {number} is not an object'}
      return
    for number, line in enumerate(text.splitlines(), 1):
      if line.strip():
        yield jsonl_record(line, number)


def _maybe_json(value):
  if isinstance(value, str) and value.strip()[:1] in ('[', '{'):
    return json.loads(value)
  return value


def _clip_options(record: dict) -> Tuple[Optional[tuple], Optional[float], Optional[int], object]:
  """crop window, crop ratio, height and the raw clips value of a manifest record (or sidecar)."""
  crop = _maybe_json(record.get('crop'))
  window = tuple(int(v) for v in crop) if crop not in (None, '') else None
  if window is not None and (len(window) != 4 or window[2] <= 0 or window[3] <= 0):
    raise ManifestError('bad_crop', f'crop {crop!r} is not [x, y, w, h] with positive size')
  ratio = record.get('crop_ratio')
  ratio = float(ratio) if ratio not in (None, '') else None
  if ratio is not None and not 0 < ratio < float('inf'):
    raise ManifestError('bad_crop', f'crop_ratio {ratio!r} is not a positive number')
  height = record.get('height')
  height = int(height) if height not in (None, '') else None
  return window, ratio, height, _maybe_json(record.get('clips'))


def _clips_of(source_id: str, record: dict) -> Iterator[Union[ClipSpec, Reject, Tuple[str, object]]]:
  """ClipSpecs and clip rejects for one record; ('height', h) first. Raises ManifestError/ValueError/TypeError."""
  window, ratio, height, clips_value = _clip_options(record)
  yield 'height', height
  if clips_value in (None, '', []):
    yield ClipSpec(f'{source_id}_0', 0, None, None, window, ratio)
    return
  if isinstance(clips_value, str):
    clips_value = [c for c in re.split(r'[;\s]+', clips_value) if c]
  if not isinstance(clips_value, (list, tuple)):
    raise ManifestError('bad_timestamp', f'clips {str(clips_value)[:80]!r} is not a list of [start, end]')
  clips, rejects = [], []
  for index, value in enumerate(clips_value):
    clip_id = f'{source_id}_{index}'
    try:
      start, end = parse_range(value)
    except (ManifestError, TypeError, ValueError) as error:
      rejects.append(Reject(clip_id, STAGE, getattr(error, 'reason', 'bad_timestamp'), str(error)[:300], source_id))
      continue
    clips.append(ClipSpec(clip_id, index, start, end, window, ratio))
  clips, overlapping = drop_overlaps(clips, source_id)
  yield from rejects + overlapping
  yield from clips


def source_from_record(record: dict, row: int, context: Optional['_ArchiveContext'] = None
                       ) -> Iterator[Union[Source, Reject]]:
  """One manifest row (`id`, `url`, optional `clips`, `crop`, `crop_ratio`, `height`, `language`, and `speaker`,
  `video`, `utterance` together: VoxCeleb's identity, which names mmvox's tubes).

  A `url` naming a tar or zip of videos (local or gs://) expands into one source per
  member video, `<id>_<member>`, with this row's clips and crop.
  """
  raw_id = record.get('id') if isinstance(record, dict) else None
  raw_id = '' if raw_id is None else str(raw_id)
  source_id = sanitize_id(raw_id) if raw_id.strip() else f'row{row}'
  if not isinstance(record, dict) or '__error__' in record:
    detail = record.get('__error__') if isinstance(record, dict) else f'row {row} is not an object'
    yield Reject(source_id, STAGE, 'bad_manifest_row', str(detail)[:300], source_id)
    return
  unknown = [name for name in record if name not in MANIFEST_FIELDS]
  if unknown:  # a misspelt field would otherwise be dropped silently (`clip` for `clips`: the whole video)
    yield Reject(source_id, STAGE, 'unknown_field', f'row {row}: {unknown_fields(unknown)}'[:300], source_id)
    return
  url = str(record.get('url') or '').strip()
  if not raw_id.strip() or not url:
    yield Reject(source_id, STAGE, 'bad_manifest_row', f'row {row} needs both id and url', source_id)
    return
  unsafe = unsafe_id_reason(raw_id)
  if unsafe:
    yield Reject(source_id, STAGE, 'unsafe_id', f'id {raw_id[:80]!r} {unsafe}', source_id)
    return
  if is_member_url(url):
    yield Reject(source_id, STAGE, 'bad_url', f'row {row}: {RESERVED}', source_id)
    return
  if url.lower().endswith(ARCHIVE_EXTENSIONS) and context is not None:
    yield from context.expand(url, source_id + '_', record)
    return
  try:
    items = list(_clips_of(source_id, record))
    origin = _origin(record)
    language = language_tag(record.get('language'))
  except (ValueError, TypeError) as error:
    reason = getattr(error, 'reason', 'bad_manifest_row')
    yield Reject(source_id, STAGE, reason, f'row {row}: {error}'[:300], source_id)
    return
  (_, height), clips = items[0], [c for c in items[1:] if isinstance(c, ClipSpec)]
  yield from (r for r in items[1:] if isinstance(r, Reject))
  if clips:
    yield Source(source_id, url, tuple(clips), height or None, origin, language)


def unknown_fields(names) -> str:
  """`unknown field 'clip' (did you mean 'clips'?)` for each name that is not a manifest field."""
  said = []
  for name in names:
    if name is None:  # csv.DictReader: more values than the header names
      said.append('more values than the header has columns')
      continue
    close = difflib.get_close_matches(str(name), MANIFEST_FIELDS, n=1)
    said.append(f'unknown field {str(name)[:40]!r}' + (f' (did you mean {close[0]!r}?)' if close else ''))
  return '; '.join(said) + f'; the fields are {", ".join(MANIFEST_FIELDS)}'


def language_tag(value) -> str:
  """A row's `language`, BCP-47's case conventions applied (`EN_us` -> `en-US`, `zh-hant` -> `zh-Hant`); '' when
  not given. Anything else that is not a tag (`english`, `en US`, a number) is a `bad_language` ManifestError: the
  reports split the score distributions by this code, so a misspelt one would make a language of its own."""
  if value is None or (isinstance(value, str) and not value.strip()):
    return ''
  text = value.strip() if isinstance(value, str) else None
  if text is None or len(text) > 35 or not _LANGUAGE_TAG.fullmatch(text):
    raise ManifestError('bad_language', f'language {str(value)[:40]!r} is not a BCP-47 language tag (e.g. en, en-US, '
                        'pt-BR, zh-Hant, yue)')
  first, *rest = text.replace('_', '-').split('-')
  subtags, private = [first.lower()], False
  for subtag in rest:  # after a singleton (x-, u-, ...) no case rule applies: lower case, as RFC 5646 recommends
    private = private or len(subtag) == 1
    subtags.append(subtag.lower() if private else subtag.title() if len(subtag) == 4 and subtag.isalpha()
                   else subtag.upper() if len(subtag) == 2 and subtag.isalpha() else subtag.lower())
  return '-'.join(subtags)


def _origin(record: dict) -> Tuple[str, ...]:
  """(speaker, video, utterance) of a row that names all three, path-safe; () when it names none."""
  values = [str(record.get(name) or '').strip() for name in ORIGIN_FIELDS]
  if not any(values):
    return ()
  if not all(values):
    missing = [name for name, value in zip(ORIGIN_FIELDS, values) if not value]
    raise ManifestError('bad_manifest_row', f'speaker, video and utterance go together; {missing} missing')
  speaker, video, utterance = values
  utterance = utterance[:-len('.txt')] if utterance.lower().endswith('.txt') else utterance  # VoxCeleb's 00001.txt
  return tuple(sanitize_id(value) for value in (speaker, video, utterance))


def parse_manifest(path: str, context: Optional['_ArchiveContext'] = None) -> Iterator[Union[Source, Reject]]:
  for row, record in enumerate(_records(path)):
    yield from source_from_record(record, row, context)


# ----------------------------------------------------------------------------- archives

def _is_pickle(name: str, head: bytes) -> bool:
  """By name or by content: protocol 2+ pickles start with 0x80 and the protocol number."""
  return name.lower().endswith(PICKLE_EXTENSIONS) or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _plain_data(value):
  """Arrays in a pickled record as lists, so a pickled sidecar reads like its JSON twin."""
  if isinstance(value, np.ndarray):
    return value.tolist()
  if isinstance(value, dict):
    return {key: _plain_data(item) for key, item in value.items()}
  if isinstance(value, (list, tuple)):
    return [_plain_data(item) for item in value]
  return value


class _SequentialReader:
  """read(n): the member's next n bytes, from one stream opened on first use (a tar stream cannot go back)."""

  def __init__(self, open_member: Callable[[], BinaryIO]):
    self.open_member = open_member
    self.stream = None

  def __call__(self, size: int) -> bytes:
    if self.stream is None:
      self.stream = self.open_member()
    return self.stream.read(size)


class _Listed(NamedTuple):
  """One archive member as the listing sees it; `read(n)` works only until the next member is listed."""
  name: str
  size: int
  regular: bool
  encrypted: bool
  where: dict  # ArchiveMember fields: kind, offset (and zip's method, compressed_size, crc, flags)
  read: Callable[[int], bytes]


class _ArchiveContext:
  """Lists tar/zip members; no video member is read. Each becomes a Source whose url names the member.

  Members whose names are absolute or climb out (`../`), links and devices are
  refused (`unsafe_member`); pickles are refused (`pickle_refused`) unless
  `policy.read_input_pickles`, when a `<stem>.pkl` beside `<stem>.mp4` may carry its
  clips like a `<stem>.json` sidecar does. Every member is size-bounded. A member
  video's url (transforms.sources.unpack.ArchiveMember) says where it sits and that it
  unpacks to `work_dir/archives/<archive id>/<member id><ext>`; `UnpackMembers`
  unpacks it after the shuffle. A compressed tar is read once here, in order.
  Folders of numbered images become one source each (transforms/sources/frames.py); a WebDataset
  sample tar gives one source per sample's `mp4` (transforms/sources/megactor_tars.py).
  """

  def __init__(self, policy: InputPolicy, max_member_bytes: int, frames: Optional[FrameFolderOptions] = None):
    self.policy = policy
    self.max_member_bytes = max_member_bytes
    self.frames = frames or FrameFolderOptions()  # frame folders: transforms/sources/frames.py

  def expand(self, url: str, prefix: str, defaults: dict) -> Iterator[Union[Source, Reject]]:
    archive_id = sanitize_id(prefix.rstrip('_') or _archive_stem(url))
    try:
      url = check_url(url, self.policy)
      if scheme_of(url) not in ('file', 'gs'):
        raise UnsafeInput('bad_url', f'{url[:200]}: archives are read from local or gs:// paths only')
      path = local_path(url, self.policy) if scheme_of(url) == 'file' else url
      listed_count, rejects, sidecars, videos = self._classify(path, prefix, archive_id)
    except UnsafeInput as error:
      yield Reject(archive_id, STAGE, error.reason, str(error)[:300], archive_id)
      return
    except UNPACK_ERRORS as error:
      yield Reject(archive_id, STAGE, 'bad_archive', f'{url[:200]}: {error}'[:300], archive_id)
      return
    yield from rejects
    if not listed_count:
      yield Reject(archive_id, STAGE, 'empty_input', f'{url[:200]} holds no members', archive_id)
    seen = set()
    before = 0  # listed sizes of the members planned so far: their share of --max_archive_mb
    for safe, member_id, listed in videos:
      if member_id in seen:
        yield Reject(member_id, STAGE, 'duplicate_id', f'member {safe} has the same sanitised id as another',
                     archive_id)
        continue
      seen.add(member_id)
      record = dict(defaults)
      record.update(sidecars.get(os.path.splitext(safe)[0]) or {})
      try:
        items = list(_clips_of(member_id, record))
        language = language_tag(record.get('language'))
      except (ValueError, TypeError) as error:
        yield Reject(member_id, STAGE, getattr(error, 'reason', 'bad_manifest_row'), str(error)[:300], archive_id)
        continue
      clips = [c for c in items[1:] if isinstance(c, ClipSpec)]
      yield from (r for r in items[1:] if isinstance(r, Reject))
      if clips:
        if isinstance(listed, ListedFolder):  # frame folder: encoded to a video after the shuffle (sources/frames.py)
          media_url = listed.url(url, before, f'{archive_id}/{member_id}.mkv', self.frames)
        else:
          media_url = ArchiveMember(archive=url, name=listed.name, size=listed.size, before=before,
                                    file=f'{archive_id}/{member_id}{os.path.splitext(safe)[1].lower()}',
                                    **listed.where).url
        before += listed.size
        yield Source(member_id, media_url, tuple(clips), items[0][1] or None, language=language)

  def _classify(self, path: str, prefix: str, archive_id: str):
    """(members listed, member rejects, {stem: sidecar record}, [(safe name, member id, _Listed)] of videos).

    Raises on an archive that does not list to its end: then nothing of it is planned.
    """
    rejects: List[Reject] = []
    sidecars: Dict[str, dict] = {}
    videos = []
    count = 0
    # Input layouts beyond member videos (transforms/sources/): frame folders and WebDataset sample tars.
    frames, samples = FrameFolders(self.frames, self.max_member_bytes), SampleTar(VIDEO_EXTENSIONS)
    for count, listed in enumerate(self._members(path), 1):
      safe = safe_member_name(listed.name)
      if safe is not None and (frames.take(safe, listed) or samples.take(safe, listed)):
        continue
      member_ref = sanitize_id(prefix + (safe or listed.name))  # rejects name the member, extension and all
      if safe is None or not listed.regular:
        why = 'is not a regular file' if safe is not None else 'is absolute or climbs out of the archive'
        rejects.append(Reject(member_ref, STAGE, 'unsafe_member', f'member {listed.name[:120]!r} {why}', archive_id))
        continue
      lower = safe.lower()
      if listed.encrypted:
        rejects.append(Reject(member_ref, STAGE, 'bad_archive', f'member {safe} is encrypted', archive_id))
      elif listed.size > self.max_member_bytes:
        rejects.append(Reject(member_ref, STAGE, 'too_large', f'member {safe} is {listed.size} bytes, over the '
                              f'limit', archive_id))
      elif lower.endswith(VIDEO_EXTENSIONS):
        videos.append((safe, sanitize_id(prefix + os.path.splitext(safe)[0]), listed))
      else:
        head, is_json = listed.read(2), lower.endswith('.json')
        if not is_json and not _is_pickle(safe, head):
          continue  # text, images...: not ours to read
        if not is_json and not self.policy.read_input_pickles:
          rejects.append(Reject(member_ref, STAGE, 'pickle_refused',
                                f'member {safe} is a pickle; it is never loaded without --read_input_pickles',
                                archive_id))
          continue
        try:
          sidecars[os.path.splitext(safe)[0]] = self._sidecar(listed, head, pickled=not is_json)
        except ManifestError as error:
          rejects.append(Reject(member_ref, STAGE, error.reason, f'member {safe}: {error}'[:300], archive_id))
    if samples.is_sample_tar(videos):
      videos, sidecars, refused = samples.restrict(videos, sidecars, self.policy.read_input_pickles, path, archive_id)
      rejects.extend(refused)
    elif not self.policy.read_input_pickles:
      rejects.extend(Reject(sanitize_id(prefix + name), STAGE, 'pickle_refused', f'member {name} is a pickle; it is '
                            'never loaded without --read_input_pickles', archive_id) for name in samples.pickled)
    for found in frames.listed(prefix, archive_id, sanitize_id):
      if isinstance(found, Reject):
        rejects.append(found)
      else:
        videos.append(found)
    return count, rejects, sidecars, videos

  @staticmethod
  def _members(path: str) -> Iterator[_Listed]:
    """Members in archive order. Zips: the central directory. Uncompressed tars: headers, seeking over
    the data. Compressed tars: one sequential pass (members are read while they are current)."""
    with FileSystems.open(path, mime_type='application/octet-stream', compression_type='uncompressed') as handle:
      if path.lower().endswith('.zip'):
        archive = zipfile.ZipFile(handle)  # pylint: disable=consider-using-with  # closed with its handle
        for info in archive.infolist():
          if info.is_dir():
            continue
          is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
          where = {'kind': ZIP, 'offset': info.header_offset, 'method': info.compress_type,
                   'compressed_size': info.compress_size, 'crc': info.CRC, 'flags': info.flag_bits}
          yield _Listed(info.filename, info.file_size, not is_link, bool(info.flag_bits & 0x1), where,
                        _SequentialReader(lambda info=info: archive.open(info)))
        return
      compressed = handle.read(8).startswith(COMPRESSED_MAGIC)
      handle.seek(0)
      kind = TAR_STREAM if compressed else TAR
      with tarfile.open(fileobj=handle, mode='r|*' if compressed else 'r:') as archive:
        for info in archive:
          if info.isdir():
            continue
          yield _Listed(info.name, info.size, info.isreg(), False, {'kind': kind, 'offset': info.offset_data},
                        _SequentialReader(lambda info=info: archive.extractfile(info)))

  @staticmethod
  def _sidecar(listed: _Listed, head: bytes, pickled: bool) -> dict:
    """A member's metadata record (clips, crop, ...): JSON, or with --read_input_pickles a pickle, read by the
    restricted unpickler (plain data and arrays; a pickle naming any other global is a bad_sidecar)."""
    if listed.size > MAX_SIDECAR_BYTES:
      raise ManifestError('bad_sidecar', f'metadata is {listed.size} bytes, over {MAX_SIDECAR_BYTES}')
    try:
      data = head + listed.read(listed.size - len(head))
      value = _plain_data(load_restricted(data)) if pickled else json.loads(data.decode('utf-8-sig'))
    except Exception as error:  # pylint: disable=broad-except  # unpickling can raise anything
      raise ManifestError('bad_sidecar', f'unreadable metadata: {type(error).__name__}: {error}') from error
    if not isinstance(value, dict):
      raise ManifestError('bad_sidecar', f'metadata is a {type(value).__name__}, not a record')
    return value


def _archive_stem(path: str) -> str:
  base = os.path.basename(path.rstrip('/'))
  for ext in ARCHIVE_EXTENSIONS:
    if base.lower().endswith(ext):
      return base[:-len(ext)]
  return base


# ----------------------------------------------------------------------------- globs

def video_source(path: str) -> Source:
  """A video file as a source with one whole-video clip."""
  source_id = sanitize_id(_stem(path))
  return Source(source_id, path, (ClipSpec(f'{source_id}_0', 0),))


def parse_glob(pattern: str) -> Iterator[Source]:
  """Each matching video file is one source with one whole-video clip."""
  for path in _matching(pattern):
    yield video_source(path)


def _is_glob(spec: str) -> bool:
  return any(ch in spec for ch in '*?[')


def _matching(pattern: str) -> List[str]:
  return sorted(m.path for m in FileSystems.match([pattern])[0].metadata_list)


def detect_format(spec: str) -> str:
  """`hdtf`, `manifest`, `archive` or `glob` for an `--input` value."""
  lower = spec.lower().rstrip('/')
  if lower.endswith(MANIFEST_EXTENSIONS):
    return 'manifest'
  if lower.endswith(ARCHIVE_EXTENSIONS):
    return 'archive'
  if _is_glob(spec) or lower.endswith(VIDEO_EXTENSIONS):
    return 'glob'
  return 'hdtf'


def list_input(spec: str, input_format: str = 'auto', policy: InputPolicy = InputPolicy(),
               max_member_mb: float = 4096, frames: Optional[FrameFolderOptions] = None
               ) -> Iterator[Union[Source, Reject]]:
  """Sources and rejects of an input, lazily, in one process. Archives are listed, not unpacked: see
  `read_input`. `frames` fixes the frame rate and limits of frame folders (transforms/sources/frames.py).
  A glob of manifests or archives is read file after file, in path order."""
  fmt = detect_format(spec) if input_format == 'auto' else input_format
  context = _ArchiveContext(policy, int(max_member_mb * MIB), frames)
  if fmt == 'hdtf':
    return parse_hdtf(spec)
  if fmt == 'manifest':
    if _is_glob(spec):
      return (item for path in _matching(spec) for item in parse_manifest(path, context))
    return parse_manifest(spec, context)
  if fmt == 'glob':
    return parse_glob(spec)
  if fmt == 'archive':
    if _is_glob(spec):  # a glob of archives, e.g. a packed dataset's tars to re-process
      return (item for path in _matching(spec) for item in context.expand(path, '', {}))
    return context.expand(spec, '', {})
  raise ValueError(f'unknown input format {input_format!r}')


def read_input(spec: str, input_format: str = 'auto', work_dir: Optional[str] = None,
               policy: InputPolicy = InputPolicy(), max_member_mb: float = 4096, max_archive_mb: float = 65536,
               frames: Optional[FrameFolderOptions] = None) -> Iterator[Union[Source, Reject]]:
  """`list_input`, with archive members unpacked (frame folders encoded) in this process into `work_dir`
  when one is given.

  For tools and tests; the pipeline lists in its parse step and unpacks after a shuffle (`ReadSources`).
  """
  items = list_input(spec, input_format, policy, max_member_mb, frames)
  if not work_dir:
    return items
  return unpack_in_process(items, Unpacker(work_dir, policy, int(max_member_mb * MIB), int(max_archive_mb * MIB)))


# ----------------------------------------------------------------------------- the pipeline's read

STOP_ERRORS = (ValueError, UnicodeDecodeError, KeyError, csv.Error)  # a parse that raises these stops there
Position = Tuple[int, ...]


def list_pieces(spec: str, input_format: str = 'auto') -> Iterator[Piece]:
  """The files of an input, one piece each, from names and sizes alone: nothing is opened here.

  A glob gives one piece per matching file, numbered in path order (the order duplicates are settled in);
  an HDTF annotation dir or a single archive is one piece.
  """
  fmt = detect_format(spec) if input_format == 'auto' else input_format
  if fmt == 'hdtf' or (fmt == 'archive' and not _is_glob(spec)):
    yield Piece(HDTF if fmt == 'hdtf' else ARCHIVE, spec, 0)
    return
  if fmt not in ('manifest', 'glob', 'archive'):
    raise ValueError(f'unknown input format {input_format!r}')
  kind = {'manifest': WHOLE, 'glob': VIDEO, 'archive': ARCHIVE}[fmt]
  listed = sorted(FileSystems.match([spec])[0].metadata_list, key=lambda m: m.path)
  if fmt == 'manifest' and not _is_glob(spec):
    if not listed:
      raise FileNotFoundError(f'{spec} does not exist')
    yield Piece(WHOLE, spec, 0, listed[0].size_in_bytes)
    return
  for number, metadata in enumerate(listed):
    yield Piece(kind, metadata.path, number, metadata.size_in_bytes)


class ArchiveRow(NamedTuple):
  """A manifest row whose url is an archive, listed by a later step so that one worker does not list every
  archive a manifest names; its members take the row's position."""
  url: str
  prefix: str
  defaults: dict
  position: Position = ()


class _ArchivesLater:
  """Stands in for the archive context while rows are parsed: a row naming an archive becomes an ArchiveRow."""

  @staticmethod
  def expand(url: str, prefix: str, defaults: dict) -> Iterator[ArchiveRow]:
    yield ArchiveRow(url, prefix, defaults)


def _numbered(position: Position, items: Iterator) -> Iterator[Tuple[Position, object]]:
  return ((position + (number,), item) for number, item in enumerate(items))


def _row_items(file: int, records: Iterator[Tuple[int, dict]]) -> Iterator[Tuple[Position, object]]:
  later = _ArchivesLater()
  for row, record in records:
    yield from _numbered((file, row), source_from_record(record, row, later))


class _PlanPieces(beam.DoFn):
  """A piece of the input, or an archive a manifest row names -> (position, Source), Rejects and planned ids,
  the ArchiveRows of its rows (listed by the next step) and how many entries it found.

  Row rules are those of `source_from_record`. An error that stops a parse (a broken JSON array or parquet
  file, a CSV over the csv module's limits) rejects the rest of the piece `bad_manifest`; what came before
  stays planned, as in a whole-file parse.
  """

  def __init__(self, read_options: dict):
    self.read_options = read_options
    self.context = None

  def setup(self):
    options = self.read_options
    self.context = _ArchiveContext(options.get('policy') or InputPolicy(),
                                   int(options.get('max_member_mb', 4096) * MIB), options.get('frames'))

  def process(self, piece: Union[Piece, ArchiveRow]):
    items = self._items(piece)
    found = 0
    while True:
      try:
        position, item = next(items)
      except StopIteration:
        break
      except STOP_ERRORS as error:
        name = piece.url if isinstance(piece, ArchiveRow) else piece.path
        where = f'{name} (slice {piece.part})' if isinstance(piece, Piece) and piece.kind != WHOLE else name
        file_id = sanitize_id(os.path.basename(name.rstrip('/')) or 'input')
        position, items = (), iter(())
        item = Reject(file_id, STAGE, 'bad_manifest', f'{where}: parsing stopped after {found} entries: {error}'[:500],
                      file_id)
      if isinstance(item, ArchiveRow):
        yield beam.pvalue.TaggedOutput('archives', item._replace(position=position))
        continue
      found += 1
      if isinstance(item, Reject):
        yield beam.pvalue.TaggedOutput('planned', item.id)
        yield beam.pvalue.TaggedOutput('rejects', item)
        continue
      for clip in item.clips:
        yield beam.pvalue.TaggedOutput('planned', clip.clip_id)
      yield position, item
    yield beam.pvalue.TaggedOutput('found', found)

  def _items(self, piece: Union[Piece, ArchiveRow]) -> Iterator[Tuple[Position, object]]:
    if isinstance(piece, ArchiveRow):
      return _numbered(piece.position, self.context.expand(piece.url, piece.prefix, piece.defaults))
    if piece.kind == HDTF:
      return _numbered((piece.file,), parse_hdtf(piece.path))
    if piece.kind == ARCHIVE:
      return _numbered((piece.file,), self.context.expand(piece.path, '', {}))
    if piece.kind == VIDEO:
      return iter([((piece.file, 0), video_source(piece.path))])
    return _row_items(piece.file, enumerate(_records(piece.path)) if piece.kind == WHOLE else slice_records(piece))


def _empty_input(found: int, spec: str) -> Iterator[Reject]:
  if not found:
    input_id = sanitize_id(os.path.basename(spec.rstrip('/')) or 'input')
    yield Reject(input_id, STAGE, 'empty_input', f'{spec} holds no entries', input_id)


class NumberSlices(beam.PTransform):
  """Pieces -> the same, slices counted on their own and then numbered as a whole-file parse numbers rows
  (one small element per slice meets the others of its file); a file that cannot be sliced, whole."""

  def expand(self, pieces):
    return (pieces
            | 'CountSlices' >> beam.Map(count_slice)
            | 'ByFile' >> beam.Map(lambda counted: (counted[0].file, counted))
            | 'GatherFiles' >> beam.GroupByKey()
            | 'Number' >> beam.FlatMap(number_slices))


class ReadSources(beam.PTransform):
  """Input spec -> {'sources': Sources, 'rejects': Rejects, 'planned': planned ids}.

  The input is parsed on many workers: a glob becomes one element per file before any file is opened, a
  manifest over `split_bytes` becomes slices (byte ranges of lines, runs of parquet row groups), and the
  archives that manifest rows name are listed after a shuffle of their own. A clip id planned twice keeps its
  earliest entry (file order, then row) and every later one is rejected `duplicate_id`, found by a shuffle
  keyed by clip id (transforms/sources/duplicates.py). Every clip the input plans is listed, already written
  or not: the pipeline skips done clips afterwards (transforms/resume.py). An input that holds nothing, or
  stops parsing half-way, leaves a reject that says so. Archives are only listed here; their members are
  unpacked later (transforms/sources/unpack.UnpackMembers), and only those of clips still to do.
  """

  def __init__(self, spec: str, input_format: str = 'auto', policy: InputPolicy = InputPolicy(),
               max_member_mb: float = 4096, frames: Optional[FrameFolderOptions] = None,
               split_bytes: int = SPLIT_BYTES):
    super().__init__()
    self.spec = spec
    self.input_format = input_format
    self.read_options = {'policy': policy, 'max_member_mb': max_member_mb, 'frames': frames}
    self.split_bytes = split_bytes

  def expand(self, pbegin):
    pieces = (pbegin
              | 'InputSpec' >> beam.Create([self.spec])
              | 'ListFiles' >> beam.FlatMap(list_pieces, self.input_format)
              | 'SpreadFiles' >> beam.Reshuffle()
              | 'SplitFiles' >> beam.FlatMap(split_file, self.split_bytes)
              | 'SpreadSlices' >> beam.Reshuffle()
              | 'NumberSlices' >> NumberSlices()
              | 'SpreadPieces' >> beam.Reshuffle())
    outputs = ('archives', 'rejects', 'planned', 'found')
    parsed = pieces | 'Parse' >> beam.ParDo(_PlanPieces(self.read_options)).with_outputs(*outputs, main='sources')
    listed = (parsed.archives
              | 'SpreadArchives' >> beam.Reshuffle()
              | 'ListArchives' >> beam.ParDo(_PlanPieces(self.read_options)).with_outputs(*outputs, main='sources'))
    unique = (parsed.sources, listed.sources) | 'DropDuplicates' >> DropDuplicateClips()
    empty = ((parsed.found, listed.found)
             | 'Found' >> beam.Flatten()
             | 'CountFound' >> beam.CombineGlobally(sum)
             | 'IfEmpty' >> beam.FlatMap(_empty_input, self.spec))
    rejects = (parsed.rejects, listed.rejects, unique['rejects'], empty) | 'AllRejects' >> beam.Flatten()
    planned = ((parsed.planned, listed.planned, empty | 'EmptyPlanned' >> beam.Map(lambda reject: reject.id))
               | 'AllPlanned' >> beam.Flatten())
    return {'sources': unique['sources'], 'rejects': rejects, 'planned': planned}
