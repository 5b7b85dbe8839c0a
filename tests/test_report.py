"""What a person sees: the progress line, report.html (rendered in headless Chromium) and inspect."""
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

import apache_beam as beam
import cv2
import pytest
from apache_beam.metrics.metric import MetricsFilter

from beam_pipeline import progress, report
from beam_pipeline.demo import VideoSpec, write_video
from tests.helpers import REPO, run_cli


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """One small HDTF-style job: two talking clips and one clip without a face (a reject)."""
  root = tmp_path_factory.mktemp('report')
  write_video(str(root / 'talk.mp4'), VideoSpec(duration=4.5, seed=5))
  write_video(str(root / 'empty.mp4'), VideoSpec(duration=2.0, face=False, seed=6))
  annotations = root / 'HDTF'
  annotations.mkdir()
  (annotations / 'R_video_url.txt').write_text(f'talk.mp4 {root}/talk.mp4\nempty.mp4 {root}/empty.mp4\n')
  (annotations / 'R_annotion_time.txt').write_text('talk.mp4 00:00-00:02 00:02-00:04\nempty.mp4 00:00-00:01.5\n')
  output = root / 'out'
  result = run_cli(f'--input={annotations}', f'--output={output}', '--report_samples=4')
  return {'output': str(output), 'stdout': result.stdout, 'stderr': result.stderr}


def chromium() -> str:
  for name in ('chromium', 'chromium-browser', 'google-chrome'):
    path = shutil.which(name)
    if path:
      return path
  raise AssertionError('headless Chromium is needed (make test installs it: apt-get install chromium)')


def image_states(page: str) -> list:
  """[(src, complete, naturalWidth)] of every <img> once the page has loaded in headless Chromium.

  A copy of the page beside it gets a script that records the images' state on `load`.
  """
  with open(page) as handle:
    text = handle.read()
  probe = ("<script>window.addEventListener('load', () => { document.body.setAttribute('data-images', "
           "JSON.stringify([...document.images].map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]))); "
           "});</script>")
  checked = os.path.join(os.path.dirname(page), '_check_' + os.path.basename(page))
  with open(checked, 'w') as handle:
    handle.write(text.replace('</body>', probe + '</body>'))
  profile = tempfile.mkdtemp(prefix='chromium-profile-')
  try:
    result = subprocess.run(
        [chromium(), '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync',
         f'--user-data-dir={profile}', '--virtual-time-budget=10000', '--dump-dom', 'file://' + checked],
        capture_output=True, text=True, timeout=90)
  finally:
    shutil.rmtree(profile, ignore_errors=True)
    os.unlink(checked)
  match = re.search(r'data-images="([^"]*)"', result.stdout)
  assert match, f'no load marker in the DOM:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}'
  return json.loads(match.group(1).replace('&quot;', '"'))


def test_progress_line_from_beam_metrics(run):
  final = [line for line in run['stderr'].splitlines() if 'downloaded |' in line][-1]
  assert 'sources 2/2 downloaded' in final
  assert 'clips 3/3 done: 2 rendered, 2 written, 1 rejected' in final


def test_progress_side_channel_counts_live():
  """CountEvents feeds both the live files and Beam counters; the line reads the files while running."""
  stream = io.StringIO()
  with progress.ProgressLine(already=1, stream=stream, interval_s=0.05) as line:
    with beam.Pipeline() as p:
      ids = p | beam.Create(['a', 'b', 'c', 'd'])
      progress.watch({'planned': ids, 'rendered': ids | beam.Filter(lambda x: x != 'd')}, line.directory)
    assert line.counts()['planned'] == 4 and line.counts()['rendered'] == 3
    counters = {c.key.metric.name: c.committed
                for c in p.result.metrics().query(MetricsFilter().with_namespace('progress'))['counters']}
    assert counters == {'planned': 4, 'rendered': 3}
    line.finish(p.result)
  assert stream.getvalue().splitlines()[-1].endswith('clips 3/3 done (+1 from earlier runs): 3 rendered, '
                                                     '0 written, 0 rejected | finishing')
  assert progress.format_line({'planned': 10, 'rendered': 2, 'rejected': 2}, 0, 40.0).endswith('ETA 0:01:00')


def test_report_images_load_in_chromium(run):
  page = os.path.join(run['output'], report.REPORT)
  assert f'report: {page}' in run['stdout']
  states = image_states(page)
  names = {os.path.basename(src) for src, _, _ in states}
  assert {'contact_sheet.png', 'duration.png', 'face_size.png', 'pitch.png', 'rejects_by_reason.png',
          'yaw.png'} <= names, names
  assert all(complete and width > 0 for _, complete, width in states), states
  text = open(page).read()
  assert ('sync_score.png' in text) != ('not computed' in text)  # a sync panel, or it says why not
  sheet = cv2.imread(os.path.join(run['output'], report.FIGURES, 'contact_sheet.png'))
  assert sheet.shape[:2] == (report.THUMB, 2 * report.THUMB)  # the two written clips


def test_chromium_check_sees_a_broken_image(run, tmp_path):
  page = tmp_path / 'broken.html'
  shutil.copy(os.path.join(run['output'], report.FIGURES, 'yaw.png'), tmp_path / 'good.png')
  (tmp_path / 'bad.png').write_bytes(b'not a png')
  page.write_text('<html><body><img src="good.png"><img src="bad.png"><img src="missing.png"></body></html>')
  assert [(src, width > 0) for src, _, width in image_states(str(page))] == [
      ('good.png', True), ('bad.png', False), ('missing.png', False)]


def test_numeric_field_finds_nested_metadata():
  records = [{'id': 'a', 'sync': {'score': 0.8, 'offset': 2}, 'face': {'face_size': 200, 'source_face_size': 900}},
             {'id': 'b', 'sync': {'score': 0.4, 'offset': 0}, 'face': {'face_size': 180}}]
  assert report.numeric_field(records, ['sync'], prefer=['score'], exclude=['offset'])[0] == 'sync.score'
  field, values = report.numeric_field(records, ['face_size'], exclude=['source'])
  assert field == 'face.face_size' and list(values) == [200, 180]
  assert report.numeric_field([{'id': 'c'}], ['sync'])[0] is None


def test_inspect_output_and_shard(run, tmp_path):
  out = subprocess.run([sys.executable, '-m', 'beam_pipeline.inspect_output', run['output'],
                        f'--preview={tmp_path}/out.png'], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert 'planned 3, written 2, rejected 1, balanced True' in out.stdout
  assert 'rejected 1 x no_face' in out.stdout and 'index: 2 clips' in out.stdout
  assert cv2.imread(f'{tmp_path}/out.png').shape[:2] == (report.THUMB, 2 * report.THUMB)
  shard = sorted(os.path.join(run['output'], 'shards', n) for n in os.listdir(os.path.join(run['output'], 'shards'))
                 if n.endswith('.tar'))[0]
  out = subprocess.run([sys.executable, '-m', 'beam_pipeline.inspect_output', shard,
                        f'--preview={tmp_path}/shard.png'], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert re.search(r'talk_0: 50 frames, 2.0 s', out.stdout), out.stdout
  assert 'mp4 x' in out.stdout and os.path.getsize(f'{tmp_path}/shard.png') > 1000
  bad = subprocess.run([sys.executable, '-m', 'beam_pipeline.inspect_output', str(tmp_path)], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
  assert bad.returncode == 2 and 'neither a .tar shard nor an output directory' in bad.stderr
