"""A manifest row's `language`: validated and normalised, carried to the clip's task and its resume inputs, and
report.html's score distributions split by it."""
import hashlib
import io
import json
import os
import re
import tarfile

import numpy as np
import pytest

from beam_pipeline import report
from transforms.core.elements import ClipSpec, MediaFile, ProbeInfo, Reject, Source
from transforms.plan import PlanClips
from transforms.resume import clip_inputs
from transforms.sources.manifest import language_tag, read_input


@pytest.mark.parametrize('given, tag', [('en', 'en'), (' EN_us ', 'en-US'), ('pt-br', 'pt-BR'),
                                        ('zh-hant-tw', 'zh-Hant-TW'), ('yue', 'yue'), ('es-419', 'es-419'),
                                        ('de-CH-x-Phonebk', 'de-CH-x-phonebk'), ('', ''), (None, '')])
def test_language_tags_are_normalised(given, tag):
  assert language_tag(given) == tag


def test_rows_with_a_bad_language_are_rejected_and_a_misspelt_field_is_named(tmp_path):
  rows = [{'id': 'a', 'url': 'https://example.com/a.mp4', 'language': 'fr_CA'},
          {'id': 'b', 'url': 'https://example.com/b.mp4', 'language': 'english'},
          {'id': 'c', 'url': 'https://example.com/c.mp4', 'language': 'en US'},
          {'id': 'd', 'url': 'https://example.com/d.mp4', 'language': 7},
          {'id': 'e', 'url': 'https://example.com/e.mp4', 'lang': 'en'},
          {'id': 'f', 'url': 'https://example.com/f.mp4'}]
  (tmp_path / 'm.jsonl').write_text('\n'.join(json.dumps(row) for row in rows) + '\n')
  items = list(read_input(str(tmp_path / 'm.jsonl')))
  sources = {s.source_id: s for s in items if isinstance(s, Source)}
  rejects = {r.id: r for r in items if isinstance(r, Reject)}
  assert {key: s.language for key, s in sources.items()} == {'a': 'fr-CA', 'f': ''}
  assert {key: r.reason for key, r in rejects.items()} == {'b': 'bad_language', 'c': 'bad_language',
                                                           'd': 'bad_language', 'e': 'unknown_field'}
  assert "language 'english' is not a BCP-47 language tag (e.g. en, en-US" in rejects['b'].detail
  assert "unknown field 'lang' (did you mean 'language'?)" in rejects['e'].detail


def test_csv_rows_and_archive_members_carry_their_language(tmp_path):
  (tmp_path / 'm.csv').write_text('id,url,language\nx,https://example.com/x.mp4,it\ny,https://example.com/y.mp4,\n')
  assert [(s.source_id, s.language) for s in read_input(str(tmp_path / 'm.csv'))] == [('x', 'it'), ('y', '')]
  with tarfile.open(tmp_path / 'talks.tar', 'w') as tar:
    for name, data in (('one.mp4', b'\0' * 64), ('two.mp4', b'\0' * 64), ('two.json', b'{"language": "ja"}')):
      member = tarfile.TarInfo(name)
      member.size = len(data)
      tar.addfile(member, io.BytesIO(data))
  (tmp_path / 'a.jsonl').write_text(json.dumps({'id': 'pack', 'url': str(tmp_path / 'talks.tar'), 'language': 'de'}))
  members = list(read_input(str(tmp_path / 'a.jsonl')))
  assert sorted((s.source_id, s.language) for s in members) == [('pack_one', 'de'), ('pack_two', 'ja')]


def test_the_language_is_decisive_only_when_given():
  """The sample's json records the language, so it decides the sample's inputs (a corrected language makes the
  clip again); a row without one keeps the inputs samples had before the field existed."""
  clip = ClipSpec('a_0', 0, 1.0, 3.0)
  plain = Source('a', 'https://example.com/a.mp4', (clip,))
  before = hashlib.sha1(json.dumps(['https://example.com/a.mp4', None, 1.0, 3.0, None, None, 'settings']).encode())
  assert clip_inputs(plain, clip, 'settings') == before.hexdigest()[:16]
  english = Source('a', 'https://example.com/a.mp4', (clip,), language='en')
  assert len({clip_inputs(s, clip, 'settings') for s in (plain, english, Source(**{**english.__dict__,
                                                                                    'language': 'en-GB'}))}) == 3


def test_the_planned_task_carries_the_language():
  info = ProbeInfo(duration=10.0, width=640, height=480, fps=25.0, has_audio=True, interlaced=False,
                   video_codec='h264', audio_rate=16000)
  source = Source('a', 'https://example.com/a.mp4', (ClipSpec('a_0', 0, 1.0, 3.0),), language='sw')
  (task,) = [t for t in PlanClips('auto', False, 1.0, 0).process((source, [MediaFile('/tmp/a.mp4', info)]))
             if not hasattr(t, 'tag')]
  assert task.language == 'sw' and task.clip_id == 'a_0'


def _output(root, rng) -> str:
  """An output whose kept clips and filter rejects come in three languages (and some without one): sharpness
  lower in `yue`, LSE-C lower in `ar`; rejects below the thresholds."""
  output = str(root / 'out')
  os.makedirs(output)
  records, rejects = [], []
  for language, count, sharp, conf in (('en', 40, 120.0, 6.0), ('yue', 25, 60.0, 5.0), ('ar', 6, 110.0, 3.8),
                                       ('', 5, 100.0, 5.5)):
    for i in range(count):
      records.append({'id': f'{language or "x"}_{i}', 'key': f'{language or "x"}_{i}', 'duration': 3.0,
                      'scores': {'sharpness': sharp + rng.normal(0, 10), 'lse_c': conf + rng.normal(0, 0.5),
                                 'lse_d': 7.0 + rng.normal(0, 0.3)}, **({'language': language} if language else {})})
    rejects.append({'id': f'{language or "x"}_blurry', 'stage': 'filter', 'reason': 'blurry', 'value': 12.0,
                    'threshold': 25.0, 'scores': {'sharpness': 12.0}, **({'language': language} if language else {})})
  rejects.append({'id': 'ar_sync', 'stage': 'filter', 'reason': 'sync_conf_low', 'value': 2.1, 'threshold': 3.0,
                  'language': 'ar'})
  with open(os.path.join(output, 'index.jsonl'), 'w') as handle:
    handle.writelines(json.dumps(r) + '\n' for r in records)
  with open(os.path.join(output, 'rejects.jsonl'), 'w') as handle:
    handle.writelines(json.dumps(r) + '\n' for r in rejects)
  with open(os.path.join(output, 'stats.json'), 'w') as handle:
    json.dump({'planned': len(records) + len(rejects), 'thresholds': {'min_sharpness': 25.0, 'min_sync_conf': 3.0}},
              handle)
  return output


def test_report_splits_the_score_distributions_by_language(tmp_path):
  output = _output(tmp_path, np.random.default_rng(0))
  page = open(report.write_report(output, samples=0)).read()
  section = page[page.index('<h2>Scores by language</h2>'):page.index('<h2>Clips</h2>')]
  figures = dict(re.findall(r'<figure data-score="([a-z_]+)">.*?<p>(.*?)</p></figure>', section))
  assert figures['sharpness'] == ('en: 40 kept, 1 rejected, yue: 25 kept, 1 rejected, ar: 6 kept, 1 rejected, '
                                  '(none): 5 kept, 1 rejected')
  assert figures['lse_c'] == ('en: 40 kept, 0 rejected, yue: 25 kept, 0 rejected, ar: 6 kept, 1 rejected, '
                              '(none): 5 kept, 0 rejected')
  assert 'lse_d' in figures  # a score no filter uses is split too
  for score in ('sharpness', 'lse_c', 'lse_d'):
    assert os.path.getsize(os.path.join(output, 'report_media', 'figures', 'by_language', f'{score}.png')) > 1000
  # without any language the section is left out
  os.remove(os.path.join(output, 'rejects.jsonl'))
  with open(os.path.join(output, 'index.jsonl'), 'w') as handle:
    handle.write(json.dumps({'id': 'a', 'scores': {'sharpness': 80.0}}) + '\n')
  assert 'Scores by language' not in open(report.write_report(output, samples=0)).read()


def test_language_figure_draws_a_row_per_language_with_the_threshold():
  rng = np.random.default_rng(1)
  rows = [('en', list(rng.normal(6, 1, 30)), [2.0, 2.5]), ('yue', list(rng.normal(4, 1, 8)), [1.0])]
  figure = report.language_figure('SyncNet confidence (LSE-C)', 'distance', rows, 3.0, 'min_sync_conf')
  en, yue = figure.axes
  assert len(en.patches) > 0 and not en.collections  # 32 clips: stacked histograms
  assert not yue.patches and len(yue.collections) == 2  # 9 clips: a dot each, kept and rejected lanes
  assert [line.get_xdata()[0] for axis in figure.axes for line in axis.lines] == [3.0, 3.0]
  assert en.get_ylabel().startswith('en\n30 kept, 2 rej.\nmedian ') and yue.get_ylabel().startswith('yue\n8 kept')
  assert yue.get_xlabel() == 'SyncNet confidence (LSE-C) (distance)' and en.get_xlim() == yue.get_xlim()
