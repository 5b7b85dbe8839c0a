"""The bad-input corpus in ONE CLI run: every case lands in rejects.jsonl with its reason (or is
written, for odd-but-valid video), everything else in the same run is written, and stats.json adds up."""
import collections
import json
import os
import re

import numpy as np
import pytest

from tests import corpus
from tests.helpers import load_npy, media_server, read_jsonl, read_shards, request_log, run_cli

SAFE_NAME = re.compile(r'^[A-Za-z0-9._-]+$')


@pytest.fixture(scope='module')
def corpus_run(tmp_path_factory, media_dir):
  root = tmp_path_factory.mktemp('corpus')
  # --download_timeout_s=10: under the 15 s stall, and wide enough for yt-dlp's start on a loaded 2-core machine
  # (4 s made the 404 page through yt-dlp a download_timeout there).
  with media_server(str(root), stall_s=15) as server:
    manifest, expect = corpus.build(str(root), str(media_dir / 'talking.mp4'), server)
    output, work = root / 'out', root / 'work'
    result = run_cli(f'--input={manifest}', f'--output={output}', f'--work_dir={work}', f'--allowed_roots={root}',
                     '--allow_private_hosts', '--download_retries=1', '--download_timeout_s=10',
                     '--max_download_mb=2.5', '--max_duration_s=30', '--size=256', '--score_only', '--no_progress',
                     '--no_report')
    log = list(request_log(server))
  return {'root': root, 'output': str(output), 'work': str(work), 'expect': expect, 'stdout': result.stdout,
          'log': log}


def _outcomes(run):
  """{clip id: Counter of outcomes} from the run's index and rejects."""
  outcomes = collections.defaultdict(collections.Counter)
  for record in read_jsonl(os.path.join(run['output'], 'index.jsonl')):
    outcomes[record['id']][corpus.WRITTEN] += 1
  for reject in read_jsonl(os.path.join(run['output'], 'rejects.jsonl')):
    outcomes[reject['id']][reject['reason']] += 1
  return outcomes


def test_corpus_is_big_enough(corpus_run):
  assert len(corpus_run['expect']) >= 30
  reasons = {r for v in corpus_run['expect'].values() for r in (v if isinstance(v, list) else [v])}
  assert len(reasons - {corpus.WRITTEN}) >= 20


def test_every_case_gets_its_outcome(corpus_run):
  outcomes = _outcomes(corpus_run)
  wrong = {}
  for clip_id, wanted in corpus_run['expect'].items():
    wanted = collections.Counter(wanted if isinstance(wanted, list) else [wanted])
    if outcomes.get(clip_id) != wanted:
      wrong[clip_id] = (dict(wanted), dict(outcomes.get(clip_id, {})))
  assert not wrong, wrong
  assert set(outcomes) == set(corpus_run['expect'])  # nothing else appeared


def test_rejects_explain_themselves(corpus_run):
  for reject in read_jsonl(os.path.join(corpus_run['output'], 'rejects.jsonl')):
    assert reject['stage'] and reject['detail'], reject
    assert reject['reason'] != 'internal_error', reject  # every corpus case is a classified failure


def test_stats_add_up(corpus_run):
  stats = json.load(open(os.path.join(corpus_run['output'], 'stats.json')))
  expect = corpus_run['expect']
  flat = [r for v in expect.values() for r in (v if isinstance(v, list) else [v])]
  rejected = collections.Counter(r for r in flat if r != corpus.WRITTEN)
  assert stats['planned'] == len(flat)
  assert stats['written'] == flat.count(corpus.WRITTEN)
  assert stats['rejected'] == sum(rejected.values())
  assert stats['rejected_by_reason'] == dict(rejected)
  assert stats['written'] + stats['rejected'] == stats['planned'] and stats['balanced']


def test_written_samples_are_whole(corpus_run):
  samples = {s['__key__']: s for s in read_shards(corpus_run['output'])}
  written = sorted(k for k, v in corpus_run['expect'].items() if v == corpus.WRITTEN)
  assert sorted(samples) == written
  for key, sample in samples.items():
    meta = sample['json']
    assert meta['num_frames'] == round((meta['end'] - meta['start']) * 25), key
    assert load_npy(sample['landmarks.npy']).shape[0] == meta['num_frames']


def test_rotated_phone_video_comes_out_upright(corpus_run):
  """The display matrix is applied: on the output, the eyes sit above the mouth (MediaPipe mesh points)."""
  sample = {s['__key__']: s for s in read_shards(corpus_run['output'])}['rotated_0']
  assert sample['json']['source']['width'] == 640 and sample['json']['source']['height'] == 480
  landmarks = load_npy(sample['landmarks.npy'])
  eyes_y = np.nanmean(landmarks[:, [159, 386], 1])
  mouth_y = np.nanmean(landmarks[:, [13, 14], 1])
  eyes_x, mouth_x = np.nanmean(landmarks[:, [159, 386], 0]), np.nanmean(landmarks[:, [13, 14], 0])
  assert mouth_y - eyes_y > 20 and abs(mouth_x - eyes_x) < 15


def test_nothing_escapes_the_sandbox(corpus_run):
  root = corpus_run['root']
  assert not (root / 'PWNED').exists()  # the pickle was never loaded
  assert not os.path.exists('/tmp/pwned.mp4') and not os.path.exists('/tmp/x.mp4')
  for name in ('escape.mp4', 'zip_escape.mp4', 'absolute.mp4'):
    assert not (root / name).exists() and not (root.parent / name).exists()
  for base in (corpus_run['output'], corpus_run['work']):
    for folder, dirs, files in os.walk(base):
      assert os.path.realpath(folder).startswith(os.path.realpath(base))
      for name in dirs + files:
        assert SAFE_NAME.match(name), os.path.join(folder, name)
  members = os.listdir(os.path.join(corpus_run['work'], 'archives', 'tar'))
  assert members == ['tar_clips_good.mp4']


def test_stalled_server_costs_only_the_time_limit(corpus_run):
  stall = [path for _, path, _ in corpus_run['log'] if path.startswith('/stall/')]
  assert 1 <= len(stall) <= 2  # one try, at most one retry inside --download_timeout_s


def test_empty_manifest_is_accounted_and_fails_the_run(tmp_path):
  """Nothing to make is a mistake a scheduled run must not report as success: exit 1 with a message, after the
  manifest is accounted as one `empty_input` reject."""
  manifest = tmp_path / 'empty.jsonl'
  manifest.write_bytes(b'\xef\xbb\xbf\r\n\n')  # a BOM and blank lines, nothing else
  output = tmp_path / 'out'
  with pytest.raises(AssertionError, match=r'CLI failed \(1\)[\s\S]*holds no entries: nothing to make'):
    run_cli(f'--input={manifest}', f'--output={output}', '--no_progress', '--no_report')
  stats = json.load(open(output / 'stats.json'))
  rejects = read_jsonl(str(output / 'rejects.jsonl'))
  assert [(r['id'], r['reason']) for r in rejects] == [('empty.jsonl', 'empty_input')]
  assert stats['planned'] == 1 and stats['written'] == 0 and stats['balanced']
