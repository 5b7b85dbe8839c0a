"""Property-based fuzzing of the input parsers (stamps, ranges, manifest rows and files, HDTF tables)
and of the URL and archive-member policies.

Whatever the text, a parser returns sources and rejects with path-safe ids, or raises its own
ManifestError; it never crashes the pipeline with anything else.
"""
import json
import math
import os
import re
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from transforms.core.elements import Reject, Source
from transforms.lib.safety import InputPolicy, UnsafeInput, check_url, local_path, safe_member_name, scheme_of
from transforms.sources.manifest import (MAX_ID_LENGTH, ManifestError, _hdtf_set, parse_manifest, parse_range,
                                         parse_stamp, sanitize_id, source_from_record)

SAFE_ID = re.compile(r'^[A-Za-z0-9][A-Za-z0-9._-]*$')
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
stamp_text = st.one_of(st.text(max_size=20), st.from_regex(r'-?[0-9]{1,3}(:[0-9]{1,3}){0,3}(\.[0-9]{0,4})?',
                                                           fullmatch=True))
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=12), stamp_text),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=10)


def _check_items(items):
  for item in items:
    assert isinstance(item, (Source, Reject))
    if isinstance(item, Source):
      assert SAFE_ID.match(item.source_id) and item.clips
      for clip in item.clips:
        assert clip.clip_id.startswith(item.source_id + '_') and SAFE_ID.match(clip.clip_id)
        if clip.start is not None:
          assert 0 <= clip.start < clip.end < math.inf
    else:
      assert SAFE_ID.match(item.id) and item.reason and item.stage == 'manifest'


@FUZZ
@given(stamp_text)
def test_stamp_parser_returns_seconds_or_manifest_error(text):
  try:
    seconds = parse_stamp(text)
  except ManifestError as error:
    assert error.reason == 'bad_timestamp'
    return
  assert 0 <= seconds < math.inf


@FUZZ
@given(st.integers(0, 99), st.integers(0, 59), st.integers(0, 59), st.integers(0, 999))
def test_stamp_round_trip(hours, minutes, seconds, millis):
  text = f'{hours:02d}:{minutes:02d}:{seconds:02d}.{millis:03d}'
  assert math.isclose(parse_stamp(text), hours * 3600 + minutes * 60 + seconds + millis / 1000)


@FUZZ
@given(st.one_of(st.text(max_size=30), st.lists(json_values, max_size=3)))
def test_range_parser(value):
  try:
    start, end = parse_range(value)
  except ManifestError as error:
    assert error.reason in ('bad_timestamp', 'bad_range')
    return
  assert 0 <= start < end < math.inf


@FUZZ
@given(st.text(max_size=200))
def test_sanitized_ids_are_path_safe(raw):
  clean = sanitize_id(raw)
  assert SAFE_ID.match(clean) and len(clean) <= MAX_ID_LENGTH and '..' not in clean
  assert sanitize_id(clean) == clean  # stable: a rerun plans the same ids


@FUZZ
@given(st.dictionaries(st.sampled_from(['id', 'url', 'clips', 'crop', 'crop_ratio', 'height', 'x']), json_values,
                       max_size=6), st.integers(0, 1000))
def test_manifest_rows_never_crash(record, row):
  _check_items(list(source_from_record(record, row)))


@FUZZ
@given(st.dictionaries(st.sampled_from(['id', 'url', 'clips', 'crop']), st.text(max_size=30), min_size=1))
def test_text_fields_never_crash(record):
  """CSV gives every field as text."""
  _check_items(list(source_from_record(record, 0)))


@FUZZ
@given(st.lists(st.one_of(st.text(max_size=60), st.builds(json.dumps, st.dictionaries(
    st.sampled_from(['id', 'url', 'clips']), json_values, max_size=3))), max_size=8),
       st.sampled_from(['\n', '\r\n', '\r']), st.booleans(), st.sampled_from(['.jsonl', '.csv', '.json']))
def test_manifest_files_never_crash(lines, ending, bom, extension):
  text = ('\ufeff' if bom else '') + ending.join(lines)
  with tempfile.TemporaryDirectory() as folder:
    path = os.path.join(folder, 'm' + extension)
    with open(path, 'w', encoding='utf-8', errors='surrogatepass', newline='') as handle:
      handle.write(text)
    try:
      items = list(parse_manifest(path))
    except ValueError:
      assert extension == '.json'  # a broken JSON array is one whole-file error (reported as bad_manifest)
      return
  _check_items(items)


hdtf_field = st.one_of(stamp_text, st.from_regex(r'[A-Za-z0-9_./\x00-]{1,12}(\.mp4)?', fullmatch=True),
                       st.from_regex(r'[0-9:.]{1,9}-[0-9:.]{1,9}', fullmatch=True))


@FUZZ
@given(st.dictionaries(st.sampled_from(['video_url', 'resolution', 'annotion_time', 'crop_wh', 'crop_ratio']),
                       st.lists(st.lists(hdtf_field, min_size=1, max_size=6), max_size=5)))
def test_hdtf_tables_never_crash(tables):
  _check_items(list(_hdtf_set('SET', tables)))


@FUZZ
@given(st.text(alphabet=st.sampled_from('ab./\\\x00:C-'), max_size=30) | st.text(max_size=30))
def test_member_names_never_climb_out(name):
  safe = safe_member_name(name)
  if safe is not None:
    assert not safe.startswith('/') and '..' not in safe.split('/') and '\x00' not in safe
    assert os.path.normpath(os.path.join('/sandbox', safe)).startswith('/sandbox/')


@FUZZ
@given(st.text(max_size=60))
def test_url_policy_refuses_or_passes_cleanly(url):
  try:
    checked = check_url(url, InputPolicy(roots=('/srv/media',)))
  except UnsafeInput as error:
    assert error.reason in ('bad_url', 'scheme_not_allowed', 'path_not_allowed')
    return
  assert not checked.startswith('-') and checked == checked.strip()
  if scheme_of(checked) == 'file':
    assert local_path(checked, InputPolicy(roots=('/srv/media',))).startswith('/srv/media')
