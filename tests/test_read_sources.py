"""ReadSources spread over workers: globs listed one element per file without opening any, large manifests
parsed in slices, duplicates settled by a shuffle keyed by clip id. Each spread read must give what one worker
reading the input from start to end gives (`_sequential`, the parse as it was: `list_input` in order and a
set of the ids seen), whatever the slice size."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import tarfile

import apache_beam as beam
import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transforms.core.elements import ClipSpec, Reject, Source
from transforms.sources.duplicates import DUPLICATE, DropDuplicateClips
from transforms.sources.manifest import ReadSources, _records, list_input, list_pieces, sanitize_id
from transforms.sources.rows import (ARCHIVE, CSV, LINES, PARQUET, VIDEO, WHOLE, Piece, count_slice, number_slices,
                                     slice_bytes, slice_records, split_file)

HUGE = 1 << 40  # a split size no test file reaches: every manifest parsed whole


def _pipeline():
  """In this process, so that a patched FileSystems.open is the one the steps call."""
  return TestPipeline(runner=FnApiRunner())


def _sequential(spec):
  """(sources, rejects, planned ids) as the single-worker parse gave them: entries in input order, the first
  to plan a clip id keeps it, a parse that stops leaves `bad_manifest`, nothing at all `empty_input`."""
  seen, sources, rejects, planned, count = set(), [], [], [], 0
  items = list_input(spec)
  while True:
    try:
      item = next(items)
    except StopIteration:
      break
    except (ValueError, KeyError, csv.Error):
      input_id = sanitize_id(os.path.basename(spec))
      item, items = Reject(input_id, 'manifest', 'bad_manifest', '', input_id), iter(())
    count += 1
    if isinstance(item, Reject):
      planned.append(item.id)
      rejects.append(item)
      continue
    clips = []
    for clip in item.clips:
      planned.append(clip.clip_id)
      if clip.clip_id in seen:
        rejects.append(Reject(clip.clip_id, 'manifest', 'duplicate_id', DUPLICATE, item.source_id))
      else:
        seen.add(clip.clip_id)
        clips.append(clip)
    if clips:
      sources.append(dataclasses.replace(item, clips=tuple(clips)))
  if not count:
    input_id = sanitize_id(os.path.basename(spec))
    planned.append(input_id)
    rejects.append(Reject(input_id, 'manifest', 'empty_input', f'{spec} holds no entries', input_id))
  return sources, rejects, planned


def _reject_fields(reject):
  """A reject as compared here: a stopped parse names where it stopped in its own words."""
  return (reject.id, reject.stage, reject.reason, '' if reject.reason == 'bad_manifest' else reject.detail,
          reject.source_id)


def _expect_sequential(read, spec, expected=None):
  """Asserts that `read` (ReadSources' outputs) holds what `_sequential` gives; returns that."""
  sources, rejects, planned = expected or _sequential(spec)
  assert_that(read['sources'], equal_to(sources), label='sources')
  assert_that(read['rejects'] | 'RejectFields' >> beam.Map(_reject_fields),
              equal_to(list(map(_reject_fields, rejects))), label='rejects')
  assert_that(read['planned'], equal_to(planned), label='planned')
  return sources, rejects, planned


def _slices(path, split_bytes):
  return list(split_file(Piece(WHOLE, str(path), 0, os.path.getsize(path)), split_bytes))


def _tar(path, names):
  with tarfile.open(path, 'w') as tar:
    for name in names:
      data = name.encode() * 20
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
  return str(path)


@pytest.fixture
def no_open(monkeypatch):
  """FileSystems.open fails: a step that reads any file breaks the pipeline."""
  def refuse(path, *args, **kwargs):
    raise AssertionError(f'{path} was opened')
  monkeypatch.setattr(FileSystems, 'open', refuse)


@pytest.fixture
def opened(monkeypatch):
  """The paths FileSystems.open is called with, one entry per call (the real open runs)."""
  calls = []
  real_open = FileSystems.open

  def counting(path, *args, **kwargs):
    calls.append(path)
    return real_open(path, *args, **kwargs)
  monkeypatch.setattr(FileSystems, 'open', counting)
  return calls


# ----------------------------------------------------------------------------- globs

def test_a_glob_becomes_one_piece_per_file_before_any_file_is_opened(tmp_path, no_open):
  for name in ('b.mp4', 'a.mp4', 'c.mp4', 'notes.txt'):
    (tmp_path / name).write_bytes(b'not a video')
  for name in ('x.tar', 'y.tar'):
    (tmp_path / name).write_bytes(b'not a tar')
  videos = [str(tmp_path / name) for name in ('a.mp4', 'b.mp4', 'c.mp4')]
  with _pipeline() as p:
    listed = {fmt: (p | f'Spec{fmt}' >> beam.Create([str(tmp_path / pattern)])
                    | f'List{fmt}' >> beam.FlatMap(list_pieces, fmt))
              for fmt, pattern in (('glob', '*.mp4'), ('archive', '*.tar'))}
    assert_that(listed['glob'] | beam.Map(lambda piece: (piece.kind, piece.path, piece.file)),
                equal_to([(VIDEO, path, number) for number, path in enumerate(videos)]), label='videos')
    assert_that(listed['archive'] | 'Archives' >> beam.Map(lambda piece: (piece.kind, piece.path, piece.size)),
                equal_to([(ARCHIVE, str(tmp_path / 'x.tar'), 9), (ARCHIVE, str(tmp_path / 'y.tar'), 9)]),
                label='archives')


def test_a_video_glob_is_read_without_opening_a_video(tmp_path, no_open):
  for name in ('talk one.mp4', 'talk-2.mkv', 'b.mp4'):
    (tmp_path / name).write_bytes(b'')
  spec = str(tmp_path / '*')
  with _pipeline() as p:
    sources, rejects, _ = _expect_sequential(p | ReadSources(spec, split_bytes=1), spec)
  assert sorted(s.source_id for s in sources) == ['b', 'talk-2', 'talk_one'] and not rejects


def test_a_glob_of_archives_lists_each_archive_once_and_the_earliest_keeps_an_id(tmp_path, opened):
  paths = [_tar(tmp_path / 'a.tar', ['talk.mp4', 'one.mp4']), _tar(tmp_path / 'b.tar', ['two.mp4']),
           _tar(tmp_path / 'c.tar', ['talk.mp4', 'three.mp4'])]
  spec = str(tmp_path / '*.tar')
  sources, rejects, planned = _sequential(spec)
  opened.clear()
  with _pipeline() as p:
    _expect_sequential(p | ReadSources(spec), spec, (sources, rejects, planned))
  assert sorted(opened) == paths  # listed once each, by the step after the shuffle; nothing unpacked
  assert [(r.id, r.reason, r.source_id) for r in rejects] == [('talk_0', 'duplicate_id', 'talk')]
  assert sorted(s.source_id for s in sources) == ['one', 'talk', 'three', 'two']
  (talk,) = [s.url for s in sources if s.source_id == 'talk']
  assert 'a.tar' in talk and 'c.tar' not in talk  # the first archive's member
  assert sorted(planned) == ['one_0', 'talk_0', 'talk_0', 'three_0', 'two_0']


def test_an_empty_glob_leaves_empty_input(tmp_path):
  spec = str(tmp_path / '*.mp4')
  with _pipeline() as p:
    _, rejects, _ = _expect_sequential(p | ReadSources(spec), spec)
  assert [r.reason for r in rejects] == ['empty_input']


# ----------------------------------------------------------------------------- manifests in slices

def _rows(archive):
  """Rows with every rule a row has: clips, crops, bad ranges and stamps, unsafe and missing ids, unusable
  lines, archive rows, and clip ids planned again near the end (whole rows and single clips)."""
  rows = []
  for number in range(60):
    row = {'id': f'talk{number:03d}', 'url': f'https://example.com/{number}.mp4'}
    if number % 3 == 0:
      row['clips'] = [[0, 2], ['00:03', '00:05']]
    if number % 7 == 0:
      row['crop'] = [1, 2, 30, 40]
    if number % 11 == 0:
      row['clips'] = [[5, 1], 'x-y', [1, 3]]  # bad range, bad stamp, one good clip
    rows.append(row)
  rows[10] = '{"id": "broken", "url": '  # not JSON: a bad row in the middle
  rows[20] = {'url': 'https://example.com/no-id.mp4'}  # named row<N> by its position
  rows[25] = {'id': '../../etc/passwd', 'url': 'https://example.com/p.mp4'}
  rows[30] = {'id': 'pack', 'url': archive}
  rows[31] = {'id': 'Ünïcode name', 'url': 'https://example.com/u.mp4', 'clips': [[0, 1], [0.5, 2]]}  # overlap
  rows += [{'id': 'talk003', 'url': 'https://example.com/again.mp4'},  # talk003_0 again: rejected
           {'id': 'talk006', 'url': 'https://example.com/more.mp4', 'clips': [[0, 1], [1, 2], [2, 3]]},  # keeps _2
           {'id': 'pack', 'url': archive},  # every member again
           {'id': 'late', 'url': 'https://example.com/late.mp4'}, {'id': '', 'url': 'https://example.com/x.mp4'}]
  return rows


def _write_lines(path, rows):
  """JSONL with CRLF, blank and white-space lines, a BOM and a line that is not an object."""
  lines = [row if isinstance(row, str) else json.dumps(row, ensure_ascii=False) for row in rows]
  lines[40:40] = ['', '   ', '[1, 2]']
  path.write_bytes(('\ufeff' + '\r\n'.join(lines) + '\n').encode('utf-8'))


def _write_csv(path, rows):
  """CSV with a header, quoted commas (JSON lists) and mixed line ends."""
  out = io.StringIO()
  writer = csv.DictWriter(out, ['id', 'url', 'clips', 'crop'], lineterminator='\r\n')
  writer.writeheader()
  for row in rows:
    if isinstance(row, str):
      row = {'id': 'broken', 'url': 'https://example.com/b.mp4', 'clips': '[[0, 2], [3'}  # clips that do not parse
    writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
  text = out.getvalue().replace('\r\n', '\n', 5).replace('\r\n', '\r', 3)  # \n and lone \r ends too
  path.write_bytes(text.encode('utf-8'))


@pytest.mark.parametrize('name', ['m.jsonl', 'm.json', 'm.csv'])
def test_a_manifest_in_slices_plans_what_the_whole_file_plans(tmp_path, name):
  archive = _tar(tmp_path / 'pack.tar', ['a.mp4', 'b.mp4'])
  path = tmp_path / name
  (_write_csv if name.endswith('.csv') else _write_lines)(path, _rows(archive))
  slices = _slices(path, 211)
  assert len(slices) > 10 and {piece.kind for piece in slices} == {CSV if name.endswith('.csv') else LINES}
  for split_bytes in (211, HUGE):
    with _pipeline() as p:
      sources, rejects, planned = _expect_sequential(p | ReadSources(str(path), split_bytes=split_bytes), str(path))
  by_reason = {}
  for reject in rejects:
    by_reason.setdefault(reject.reason, []).append(reject.id)
  assert sorted(by_reason['duplicate_id']) == ['pack_a_0', 'pack_b_0', 'talk003_0', 'talk006_0', 'talk006_1']
  assert 'row20' in by_reason['bad_manifest_row'] and 'etc_passwd' in by_reason['unsafe_id']
  assert {'pack_a', 'pack_b', 'late', 'talk006'} <= {s.source_id for s in sources}
  assert [s.clips for s in sources if s.url.endswith('more.mp4')] == [(ClipSpec('talk006_2', 2, 2.0, 3.0),)]
  records = list(_records(str(path)))
  assert f'row{len(records) - 1}' in planned and records[-1]['id'] == ''  # numbered past bad and blank lines


def test_csv_with_a_quoted_line_break_is_parsed_whole(tmp_path):
  path = tmp_path / 'm.csv'
  rows = [f'v{n},https://example.com/{n}.mp4,"[[0, 1], [2, 3]]"' for n in range(40)]
  rows[20] = 'v20,https://example.com/20.mp4,"[[0, 1],\n [2, 3]]"'  # the clips field runs over a line end
  path.write_text('id,url,clips\n' + '\n'.join(rows) + '\n')
  slices = _slices(path, 128)
  numbered = list(number_slices((0, [count_slice(piece) for piece in slices])))
  assert len(slices) > 5 and [piece.kind for piece in numbered] == [WHOLE]
  with _pipeline() as p:
    sources, _, _ = _expect_sequential(p | ReadSources(str(path), split_bytes=128), str(path))
  assert [len(s.clips) for s in sources] == [2] * 40


def test_duplicates_across_manifest_files_keep_the_first_file(tmp_path):
  (tmp_path / 'a.jsonl').write_text(''.join(json.dumps({'id': f'v{n}', 'url': f'a{n}'}) + '\n' for n in range(30)))
  (tmp_path / 'b.jsonl').write_text(''.join(json.dumps({'id': f'v{n}', 'url': f'b{n}'}) + '\n' for n in range(25, 50)))
  spec = str(tmp_path / '*.jsonl')
  with _pipeline() as p:
    sources, rejects, planned = _expect_sequential(p | ReadSources(spec, split_bytes=100), spec)
  assert sorted(r.id for r in rejects) == [f'v{n}_0' for n in range(25, 30)]
  assert {s.url for s in sources if s.source_id in ('v25', 'v29')} == {'a25', 'a29'} and len(planned) == 55


def test_parquet_in_row_groups_plans_what_the_whole_file_plans(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  rows = [{'id': f'v{n % 45}' if n != 17 else None, 'url': f'https://example.com/{n}.mp4',
           'clips': json.dumps([[0, 1], [n % 4, n % 4 + 2]]) if n % 2 else None, 'height': 720 if n % 3 else None}
          for n in range(60)]
  path = tmp_path / 'm.parquet'
  pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=8)
  slices = _slices(path, 1)
  assert [(piece.kind, piece.start, piece.first_row) for piece in slices] == [
      (PARQUET, group, group * 8) for group in range(8)]
  with _pipeline() as p:
    _, rejects, _ = _expect_sequential(p | ReadSources(str(path), split_bytes=1), str(path))
  assert sorted(r.id for r in rejects if r.reason == 'duplicate_id') == sorted(f'v{n}_0' for n in range(15))
  assert [r.id for r in rejects if r.reason == 'bad_manifest_row'] == ['row17']


@pytest.mark.parametrize('text,reason', [('[{"id": "a", "url": "u"}, {"id": "b", "url": "v"}]' + ' ' * 300, None),
                                         ('[{"id": "a", "url": "u"},' + ' ' * 300, 'bad_manifest'),
                                         ('\ufeff\r\n' + ' \n' * 200, 'empty_input')])
def test_json_arrays_stay_whole_and_whole_file_problems_leave_a_reject(tmp_path, text, reason):
  path = tmp_path / 'm.json'
  path.write_text(text)
  slices = _slices(path, 64)
  assert [piece.kind for piece in slices] == [WHOLE] if text.startswith('[') else len(slices) > 5
  with _pipeline() as p:
    _, rejects, _ = _expect_sequential(p | ReadSources(str(path), split_bytes=64), str(path))
  assert [r.reason for r in rejects] == ([reason] if reason else [])


# ----------------------------------------------------------------------------- duplicates

def test_the_earliest_position_keeps_a_clip_whatever_the_element_order():
  """Positions decide, not source ids (named against their order here) nor the order elements arrive in."""
  def source(source_id, *clip_ids):
    return Source(source_id, f'https://example.com/{source_id}', tuple(ClipSpec(c, i) for i, c in enumerate(clip_ids)))
  positioned = [((1, 5, 0), source('alpha', 'x_0', 'y_0')), ((0, 9, 0), source('zulu', 'x_0')),
                ((1, 5, 1, 0), source('beta', 'y_0', 'z_0')), ((0, 2, 0), source('yankee', 'z_0', 'w_0'))]
  for order in (positioned, positioned[::-1]):
    with _pipeline() as p:
      result = p | beam.Create(order) | DropDuplicateClips()
      alpha = Source('alpha', 'https://example.com/alpha', (ClipSpec('y_0', 1),))  # rebuilt with the clip it kept
      assert_that(result['sources'], equal_to([source('zulu', 'x_0'), alpha, source('yankee', 'z_0', 'w_0')]),
                  label='sources')
      assert_that(result['rejects'] | beam.Map(lambda r: (r.id, r.source_id)),
                  equal_to([('x_0', 'alpha'), ('y_0', 'beta'), ('z_0', 'beta')]), label='rejects')


# ----------------------------------------------------------------------------- slices, on any text

LINE = st.text(st.sampled_from(['a', ' ', '"', ',', '{', '}', 'é', '\u2028', '\r', '\x85', '\t']), max_size=12)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(lines=st.lists(LINE, max_size=30), ending=st.sampled_from(['\n', '\r\n']), bom=st.booleans(),
       last=st.booleans(), split_bytes=st.integers(1, 40))
def test_slices_cover_every_line_once_and_number_rows_as_the_whole_file(tmp_path, lines, ending, bom, last,
                                                                       split_bytes):
  """Any line lengths, line ends (\\r, U+2028 and U+0085 split JSONL lines too), blank lines and split size:
  the slices' bytes add up to the file, and their records (numbered from the counts) are the whole file's."""
  text = ('\ufeff' if bom else '') + ending.join(json.dumps({'id': line}) if n % 2 else line
                                                 for n, line in enumerate(lines)) + (ending if last else '')
  path = tmp_path / 'm.jsonl'
  path.write_bytes(text.encode('utf-8'))
  slices = _slices(path, split_bytes)
  if len(slices) == 1:
    assert slices[0].kind == WHOLE
    return
  assert b''.join(slice_bytes(piece) for piece in slices) == path.read_bytes()
  numbered = list(number_slices((0, [count_slice(piece) for piece in slices])))
  assert [row for piece in numbered for row in slice_records(piece)] == list(enumerate(_records(str(path))))
