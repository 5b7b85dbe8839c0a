"""Input parsing: HDTF annotation quirks, manifests in three formats, stamps, globs."""
import json

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from transforms.core.elements import ClipSpec, Reject, Source
from transforms.sources.manifest import (ManifestError, ReadSources, detect_format, parse_range, parse_stamp,
                                         read_input, sanitize_id)


def write_hdtf(root):
  """Annotation files with the quirks of the real ones."""
  (root / 'RD_video_url.txt').write_bytes(
      '\ufeffRadio11.mp4 https://www.youtube.com/watch?v=aaa  \r\n'
      'Radio12.mp4 https://www.youtube.com/watch?v=bbb\n'
      'NoAnno.mp4 https://www.youtube.com/watch?v=ccc'.encode('utf-8'))  # no final newline
  (root / 'RD_resolution.txt').write_text('Radio11.mp4 720 \nRadio12.mp4 0\n')
  (root / 'RD_annotion_time.txt').write_bytes(
      '\ufeffRadio11.mp4 00:30-01:00 01:30-02:15 \n'
      'Radio12.mp4 00:00:01.500-00:00:04.250 1:2:3:4-00:05\n'
      'Orphan.mp4 00:10-00:20'.encode('utf-8'))
  (root / 'RD_crop_wh.txt').write_text('Radio11_0.mp4 608 726 0 726\nRadio12_0.mp4 0 3000 0 3000 \n')
  (root / 'RD_crop_ratio.txt').write_text('Radio11_1.mp4 1.5\n')
  (root / 'WDA_video_url.txt').write_text('WDA_Kim_000.mp4 https://www.youtube.com/watch?v=ddd\n')
  (root / 'WDA_annotion_time.txt').write_text('WDA_Kim_000.mp4 00:05-00:09')
  return root


def test_hdtf_quirks(tmp_path):
  items = list(read_input(str(write_hdtf(tmp_path))))
  sources = {s.source_id: s for s in items if isinstance(s, Source)}
  rejects = {r.id: r for r in items if isinstance(r, Reject)}
  assert sources['Radio11'] == Source('Radio11', 'https://www.youtube.com/watch?v=aaa', (
      ClipSpec('Radio11_0', 0, 30.0, 60.0, (608, 0, 726, 726), None),
      ClipSpec('Radio11_1', 1, 90.0, 135.0, None, 1.5)), 720)
  # resolution 0 means unknown; a crop window larger than any frame is kept here and clamped later.
  assert sources['Radio12'].height is None
  assert sources['Radio12'].clips == (ClipSpec('Radio12_0', 0, 1.5, 4.25, (0, 0, 3000, 3000), None),)
  assert sources['WDA_Kim_000'].clips[0].clip_id == 'WDA_Kim_000_0'
  assert rejects['Radio12_1'].reason == 'bad_timestamp'
  assert rejects['Orphan_0'].reason == 'no_url'
  assert rejects['NoAnno'].reason == 'no_annotation'
  assert detect_format(str(tmp_path)) == 'hdtf'


@pytest.mark.parametrize('text,seconds', [
    ('00:30', 30.0), ('01:02:03', 3723.0), ('00:00:01.250', 1.25), ('12.5', 12.5), ('0', 0.0)])
def test_stamps(text, seconds):
  assert parse_stamp(text) == pytest.approx(seconds)


@pytest.mark.parametrize('text', ['', '1:2:3:4', 'ab:cd', '00:61', '-5', '1.5:00', '00:3x'])
def test_bad_stamps(text):
  with pytest.raises(ManifestError):
    parse_stamp(text)


def test_ranges():
  assert parse_range('00:30-01:00') == (30.0, 60.0)
  assert parse_range([1.5, '00:03']) == (1.5, 3.0)
  with pytest.raises(ManifestError) as error:
    parse_range('01:00-00:30')
  assert error.value.reason == 'bad_range'


def test_sanitize_id():
  assert sanitize_id('Radio11') == 'Radio11'
  assert sanitize_id('../../etc/passwd') == 'etc_passwd'
  assert '/' not in sanitize_id('a/b\x00c') and '\x00' not in sanitize_id('a/b\x00c')


def _rows():
  return [
      {'id': 'a', 'url': 'https://example.com/a.mp4', 'clips': [[0, 2], ['00:03', '00:05']], 'crop': [1, 2, 30, 40]},
      {'id': 'b', 'url': 'https://example.com/b.mp4', 'crop_ratio': 1.4},
      {'id': 'c', 'url': 'https://example.com/c.mp4', 'clips': [[5, 1]]},
  ]


def _check_manifest(items):
  sources = {s.source_id: s for s in items if isinstance(s, Source)}
  rejects = [r for r in items if isinstance(r, Reject)]
  assert sources['a'].clips == (ClipSpec('a_0', 0, 0.0, 2.0, (1, 2, 30, 40), None),
                                ClipSpec('a_1', 1, 3.0, 5.0, (1, 2, 30, 40), None))
  assert sources['b'].clips == (ClipSpec('b_0', 0, None, None, None, 1.4),)
  assert [(r.id, r.reason) for r in rejects] == [('c_0', 'bad_range')]


def test_manifest_jsonl(tmp_path):
  path = tmp_path / 'm.jsonl'
  path.write_text('\n'.join(json.dumps(r) for r in _rows()) + '\n')
  _check_manifest(list(read_input(str(path))))


def test_manifest_csv(tmp_path):
  import csv
  path = tmp_path / 'm.csv'
  with open(path, 'w', newline='') as handle:
    writer = csv.DictWriter(handle, ['id', 'url', 'clips', 'crop', 'crop_ratio'])
    writer.writeheader()
    for row in _rows():
      writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
  _check_manifest(list(read_input(str(path))))


def test_manifest_parquet(tmp_path):
  import pyarrow as pa
  import pyarrow.parquet as pq
  rows = [{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in _rows()]
  for row in rows:
    row.setdefault('crop_ratio', None)
  pq.write_table(pa.Table.from_pylist(rows), tmp_path / 'm.parquet')
  _check_manifest(list(read_input(str(tmp_path / 'm.parquet'))))


def test_glob(tmp_path):
  for name in ('x.mp4', 'y.mp4', 'z.txt'):
    (tmp_path / name).write_bytes(b'')
  sources = list(read_input(str(tmp_path / '*.mp4')))
  assert [(s.source_id, s.clips[0].clip_id) for s in sources] == [('x', 'x_0'), ('y', 'y_0')]


def test_read_sources_transform(tmp_path):
  """Planned ids cover every clip, already-written clips are skipped, duplicates are rejected."""
  path = tmp_path / 'm.jsonl'
  rows = _rows() + [{'id': 'b', 'url': 'https://example.com/b2.mp4'}]
  path.write_text('\n'.join(json.dumps(r) for r in rows))
  from transforms.resume import SkipDoneClips
  with TestPipeline() as p:
    read = p | ReadSources(str(path))
    todo = read['sources'] | SkipDoneClips(p | 'Done' >> beam.Create(['a_1']))
    assert_that(read['planned'], equal_to(['a_0', 'a_1', 'b_0', 'c_0', 'b_0']), label='planned')
    assert_that(todo | beam.Map(lambda s: (s.source_id, [c.clip_id for c in s.clips])),
                equal_to([('a', ['a_0']), ('b', ['b_0'])]), label='sources')
    assert_that(read['rejects'] | beam.Map(lambda r: (r.id, r.reason)),
                equal_to([('c_0', 'bad_range'), ('b_0', 'duplicate_id')]), label='rejects')


def test_hdtf_unsafe_names_and_overlapping_clips(tmp_path):
  (tmp_path / 'X_video_url.txt').write_text('ok.mp4 https://e.com/a\n../../etc.mp4 https://e.com/b\n')
  (tmp_path / 'X_annotion_time.txt').write_text(
      'ok.mp4 00:00-00:10 00:09-00:20 00:10-00:15 00:20-00:30\n../../etc.mp4 00:00-00:05\n')
  items = list(read_input(str(tmp_path)))
  # ok_2 only overlaps ok_1, which is itself rejected: against the kept ok_0 it merely touches.
  assert [c.clip_id for s in items if isinstance(s, Source) for c in s.clips] == ['ok_0', 'ok_2', 'ok_3']
  assert sorted((r.id, r.reason) for r in items if isinstance(r, Reject)) == [
      ('etc', 'unsafe_id'), ('ok_1', 'overlapping_clip')]


def test_csv_with_bom_and_mixed_line_endings(tmp_path):
  path = tmp_path / 'm.csv'
  path.write_bytes('\ufeffid,url,clips\r\na,https://e.com/a.mp4,"[[0, 2]]"\rb,https://e.com/b.mp4,\n'.encode())
  items = list(read_input(str(path)))
  assert [(s.source_id, s.clips[0].end) for s in items] == [('a', 2.0), ('b', None)]


@pytest.mark.parametrize('name,text,reason', [
    ('empty.jsonl', '\ufeff\r\n', 'empty_input'), ('broken.json', '[{"id": "a", "url": "u"},', 'bad_manifest')])
def test_whole_input_problems_leave_a_reject(tmp_path, name, text, reason):
  (tmp_path / name).write_text(text)
  with TestPipeline() as p:
    read = p | ReadSources(str(tmp_path / name))
    assert_that(read['rejects'] | beam.Map(lambda r: (r.id, r.reason)), equal_to([(name, reason)]), label='rejects')
    assert_that(read['planned'], equal_to([name]), label='planned')
