"""What a person sees after a run: the progress line, report.html (rendered in headless Chromium, over a
local and a gs:// output) and inspect."""
import contextlib
import html
import io
import http.server
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import types

import av
import cv2
import numpy as np
import pytest

from beam_pipeline import report
from beam_pipeline.demo import VideoSpec, write_video
from tests.helpers import REPO, background, free_port, read_jsonl, run_cli
from transforms import filters
from transforms.filters import Thresholds, failures
from transforms.writers.shards import sample_key


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """One small HDTF-style job: two talking clips, one clip without a face (a reject before rendering) and a
  turned head that --max_yaw rejects after rendering (a filter reject with a thumbnail and a measurement)."""
  root = tmp_path_factory.mktemp('report')
  write_video(str(root / 'talk.mp4'), VideoSpec(duration=4.5, seed=5))
  write_video(str(root / 'empty.mp4'), VideoSpec(duration=2.0, face=False, seed=6))
  write_video(str(root / 'turned.mp4'), VideoSpec(duration=2.5, seed=4, yaw_deg=75))
  annotations = root / 'HDTF'
  annotations.mkdir()
  (annotations / 'R_video_url.txt').write_text(
      f'talk.mp4 {root}/talk.mp4\nempty.mp4 {root}/empty.mp4\nturned.mp4 {root}/turned.mp4\n')
  (annotations / 'R_annotion_time.txt').write_text(
      'talk.mp4 00:00-00:02 00:02-00:04\nempty.mp4 00:00-00:01.5\nturned.mp4 00:00-00:02.5\n')
  output = root / 'out'
  result = run_cli(f'--input={annotations}', f'--output={output}', '--report_samples=4', '--max_yaw=20')
  return {'output': str(output), 'stdout': result.stdout, 'stderr': result.stderr}


# ----------------------------------------------------------------------------- headless Chromium

def chromium() -> str:
  for name in ('chromium', 'chromium-browser', 'google-chrome'):
    path = shutil.which(name)
    if path:
      return path
  raise AssertionError('headless Chromium is needed (make test installs it: apt-get install chromium)')


def in_chromium(page: str, probe: str):
  """Load `page` in headless Chromium, run the JS function body `probe` (async allowed) once the page has
  loaded, and return what it returns (JSON). A copy of the page beside it carries the probe."""
  with open(page) as handle:
    text = handle.read()
  script = ("<script>window.addEventListener('load', async () => { const result = await (async () => {"
            + probe + "})(); document.body.setAttribute('data-probe', JSON.stringify(result)); });</script>")
  checked = os.path.join(os.path.dirname(page), '_check_' + os.path.basename(page))
  with open(checked, 'w') as handle:
    handle.write(text.replace('</body>', script + '</body>'))
  profile = tempfile.mkdtemp(prefix='chromium-profile-')
  try:
    result = subprocess.run(
        [chromium(), '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync', '--mute-audio',
         f'--user-data-dir={profile}', '--virtual-time-budget=15000', '--dump-dom', 'file://' + checked],
        capture_output=True, text=True, timeout=120)
  finally:
    shutil.rmtree(profile, ignore_errors=True)
    os.unlink(checked)
  match = re.search(r'data-probe="([^"]*)"', result.stdout)
  assert match, f'the probe did not finish:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}'
  return json.loads(html.unescape(match.group(1)))


IMAGES = "return [...document.images].map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]);"
# A folder recipe's section: the run's totals, the heading and note above the table of folders, its rows, and
# each pictured folder (its name, title, files, first caption, and its picture's src and natural size).
FOLDERS = """
  const table = document.getElementById('folders');
  const note = table.parentElement.previousElementSibling;
  const text = (node, selector) => (node.querySelector(selector) || {}).textContent || '';
  return {totals: text(document, '.totals'), heading: note.previousElementSibling.textContent, note: note.textContent,
          rows: [...table.tBodies[0].rows].map(r => [...r.cells].map(c => c.textContent)),
          folders: [...document.querySelectorAll('section.folder')].map(f => {
            const img = f.querySelector('img');
            return {name: f.dataset.folder, title: text(f, 'h3'), files: text(f, '.files'), caption: text(f, '.caption'),
                    picture: [img.getAttribute('src'), img.naturalWidth, img.naturalHeight]}; })};
"""


def missing_tiles(sheet: np.ndarray) -> list:
  """(row, column) of the tiles of a folder's picture drawn as missing (report._tile: dark where no file was)."""
  tile = report.TILE
  return [(r, c) for r in range(sheet.shape[0] // tile) for c in range(sheet.shape[1] // tile)
          if (sheet[r * tile:(r + 1) * tile - 16, c * tile:(c + 1) * tile] == 48).all(-1).mean() > 0.9]


VIDEOS = """
  const videos = [...document.querySelectorAll('video')];
  await Promise.all(videos.map(v => v.readyState >= 1 ? null : new Promise(done => {
    v.addEventListener('loadedmetadata', done); v.addEventListener('error', done); setTimeout(done, 8000); })));
  return videos.map(v => [v.getAttribute('src'), v.readyState, v.videoWidth, v.duration, v.error && v.error.code]);
"""


def test_chromium_check_sees_a_broken_image(run, tmp_path):
  page = tmp_path / 'broken.html'
  shutil.copy(os.path.join(run['output'], report.FIGURES, 'max_abs_yaw.png'), tmp_path / 'good.png')
  (tmp_path / 'bad.png').write_bytes(b'not a png')
  page.write_text('<html><body><img src="good.png"><img src="bad.png"><img src="missing.png"></body></html>')
  assert [(src, width > 0) for src, _, width in in_chromium(str(page), IMAGES)] == [
      ('good.png', True), ('bad.png', False), ('missing.png', False)]


def test_every_image_and_video_of_the_report_loads_in_chromium(run):
  page = os.path.join(run['output'], report.REPORT)
  assert f'report: {page}' in run['stdout']
  images = in_chromium(page, IMAGES)
  names = {src.split('/')[-1] for src, _, _ in images}
  assert {'contact_sheet.png', 'duration.png', 'source_face_px.png', 'sharpness.png', 'max_abs_yaw.png',
          'max_abs_pitch.png', 'sync_corr.png'} <= names, names
  assert all(complete and width > 0 for _, complete, width in images), images
  videos = in_chromium(page, VIDEOS)
  samples = [v for v in videos if '/samples/' in v[0]]
  assert sorted(src.split('/')[-1] for src, *_ in samples) == ['talk_0.mp4', 'talk_1.mp4']
  assert all(ready >= 1 and width == report.PREVIEW and duration > 1.5 and error is None
             for _, ready, width, duration, error in samples), videos
  # The reject nearest --max_yaw plays (the filter stage's preview), its thumbnail as the poster.
  (reject,) = [v for v in videos if '/rejects/' in v[0]]
  assert reject[0] == f'report_media/rejects/{sample_key("turned_0")}.mp4' and reject[1] >= 1, reject
  assert reject[2] == filters.REJECT_CLIP_PX and reject[3] > 2.0 and reject[4] is None, reject


# ----------------------------------------------------------------------------- what it shows

def test_reject_gallery_shows_each_reason_with_its_value_against_the_threshold(run):
  rejects = {r['id']: r for r in read_jsonl(os.path.join(run['output'], 'rejects.jsonl'))}
  turned = rejects['turned_0']
  assert turned['reason'] == 'yaw_too_large' and turned['threshold'] == 20.0 and turned['value'] > 20.0
  assert f"|yaw| up to {turned['value']} deg" in turned['detail']
  assert rejects['empty_0']['reason'] == 'no_face' and rejects['empty_0']['value'] is None
  thumb = cv2.imread(os.path.join(run['output'], report.MEDIA, 'rejects', sample_key('turned_0') + '.jpg'))
  assert thumb is not None and min(thumb.shape[:2]) >= 64

  sections = in_chromium(os.path.join(run['output'], report.REPORT), """
    return [...document.querySelectorAll('section.reason')].map(s => ({
      reason: s.id, rule: (s.querySelector('.rule') || {}).textContent || '',
      cards: [...s.querySelectorAll('.card')].map(c => ({
        id: c.querySelector('.cid').textContent, measure: (c.querySelector('.measure') || {}).textContent || '',
        picture: c.querySelector('img') ? c.querySelector('img').naturalWidth : 0,
        clip: c.querySelector('video') ? c.querySelector('video').getAttribute('poster') : null}))}));""")
  by_reason = {section['reason']: section for section in sections}
  assert set(by_reason) == {'reason-yaw_too_large', 'reason-no_face'}
  yaw = by_reason['reason-yaw_too_large']
  assert 'keeps head yaw, largest |angle| ≤ 20 degrees (--max_yaw)' in yaw['rule']
  (card,) = yaw['cards']
  assert card['id'] == 'turned_0' and card['clip'] == f'report_media/rejects/{sample_key("turned_0")}.jpg'
  assert card['measure'] == f"head yaw, largest |angle| {report.plain(turned['value'])} > 20 --max_yaw"
  (card,) = by_reason['reason-no_face']['cards']
  assert card == {'id': 'empty_0', 'measure': '', 'picture': 0, 'clip': None}


def test_clips_table_sorts_when_a_header_is_clicked(run):
  clicks = in_chromium(os.path.join(run['output'], report.REPORT), """
    const table = document.getElementById('clips');
    const heads = [...table.tHead.rows[0].cells].map(th => th.textContent);
    const column = name => [...table.tBodies[0].rows].map(r => r.cells[heads.indexOf(name)].textContent);
    const order = name => { table.tHead.rows[0].cells[heads.indexOf(name)].click(); return column(name); };
    return {heads, ids: column('id'), yawUp: order('|yaw| max (°)'), yawDown: order('|yaw| max (°)'),
            statusUp: order('kept / reason')};""")
  assert clicks['heads'][:2] == ['id', 'kept / reason']
  assert clicks['ids'] == ['empty_0', 'talk_0', 'talk_1', 'turned_0']
  yaws = [float(v) for v in clicks['yawUp'] if v]
  assert len(yaws) == 3 and yaws == sorted(yaws) and clicks['yawUp'][-1] == ''  # no value: last
  assert [float(v) for v in clicks['yawDown'] if v] == sorted(yaws, reverse=True) and clicks['yawDown'][-1] == ''
  assert clicks['statusUp'] == ['kept', 'kept', 'no_face', 'yaw_too_large']


def test_clips_table_carries_every_score_of_every_clip(run):
  """Kept clips and filter rejects alike: a column per score measured, every cell filled (in Chromium)."""
  rejects = {r['id']: r for r in read_jsonl(os.path.join(run['output'], 'rejects.jsonl'))}
  index = {r['id']: r for r in read_jsonl(os.path.join(run['output'], 'index.jsonl'))}
  assert set(rejects['turned_0']['scores']) == set(index['talk_0']['scores']) and 'scores' not in rejects['empty_0']
  numeric = {name for record in (*index.values(), rejects['turned_0']) for name, value in record['scores'].items()
             if isinstance(value, (int, float)) and not isinstance(value, bool)}
  table = in_chromium(os.path.join(run['output'], report.REPORT), """
    const table = document.getElementById('clips');
    const heads = [...table.tHead.rows[0].cells];
    const scores = heads.slice(2).map(th => th.dataset.score);
    const values = () => Object.fromEntries([...table.tBodies[0].rows].map(r => [r.cells[0].textContent,
        [...r.cells].slice(2).map(c => c.dataset.v)]));
    const cells = values();
    heads[scores.indexOf('sharpness') + 2].click();
    const sharpUp = [...table.tBodies[0].rows].map(r => r.cells[0].textContent);
    const failed = [...table.querySelectorAll('td.failed')].map(c => [c.parentNode.cells[0].textContent,
        scores[c.cellIndex - 2]]);
    return {scores, cells, sharpUp, failed};""")
  assert set(table['scores']) == numeric, (table['scores'], numeric)
  for clip_id, record in (*index.items(), ('turned_0', rejects['turned_0'])):
    row = dict(zip(table['scores'], table['cells'][clip_id]))
    assert {name: float(row[name]) for name in numeric if record['scores'].get(name) is not None} == {
        name: float(value) for name, value in record['scores'].items() if name in numeric and value is not None}
  assert set(table['cells']['empty_0']) == {''}  # rejected before it was scored
  sharpness = {clip_id: record['scores']['sharpness'] for clip_id, record in (*index.items(),
                                                                            ('turned_0', rejects['turned_0']))}
  assert table['sharpUp'] == sorted(sharpness, key=sharpness.get) + ['empty_0']
  assert table['failed'] == [['turned_0', 'max_abs_yaw']]


def test_reject_nearest_its_threshold_is_a_short_clip_with_audio(run):
  clip = os.path.join(run['output'], report.MEDIA, 'rejects', sample_key('turned_0') + '.mp4')
  with av.open(clip) as container:
    assert [s.type for s in container.streams] == ['video', 'audio']
    frames = [f.to_ndarray(format='rgb24') for f in container.decode(video=0)]
  with av.open(clip) as container:
    sound = np.concatenate([f.to_ndarray().ravel() for f in container.decode(audio=0)])
  assert len(frames) >= 60 and frames[0].shape == (filters.REJECT_CLIP_PX, filters.REJECT_CLIP_PX, 3)
  assert sum(green_pixels(frame) > 50 for frame in frames) > 0.85 * len(frames)  # its landmarks (where found)
  assert len(sound) >= 16000 * 2.4 and np.abs(sound).max() > 0.01
  assert not os.path.exists(clip.replace(sample_key('turned_0'), sample_key('empty_0')))  # never rendered


def test_reject_clips_stay_bounded_to_the_nearest_per_reason(run, tmp_path):
  """Each worker keeps a preview for only its k rejects nearest the threshold, per reason."""
  record = read_jsonl(os.path.join(run['output'], 'index.jsonl'))[0]
  (_, members), = report.shard_samples(os.path.join(run['output'], record['shard']), [record['key']])
  source = tmp_path / 'rendered.mp4'
  source.write_bytes(members['mp4'])
  nearest = filters.NearestRejects(str(tmp_path / 'media'), k=2)
  for clip_id, reason, value in (('a', 'blurry', 20.0), ('b', 'blurry', 24.0), ('c', 'blurry', 10.0),
                                 ('d', 'blurry', 24.5), ('e', 'face_too_small', 10.0)):
    clip = types.SimpleNamespace(task=types.SimpleNamespace(clip_id=clip_id), mp4_uri=str(source),
                                 wav=members['wav'], arrays={})
    nearest.offer(clip, reason, value, 25.0 if reason == 'blurry' else 64.0)
  assert sorted(os.listdir(tmp_path / 'media' / filters.REJECT_THUMBNAILS)) == ['b.mp4', 'd.mp4', 'e.mp4']


def test_table_stops_at_its_row_limit_and_says_so(run, tmp_path, monkeypatch):
  output = tmp_path / 'out'
  shutil.copytree(run['output'], output, ignore=shutil.ignore_patterns('_work', 'report*'))
  monkeypatch.setattr(report, 'TABLE_ROWS', 2)
  page = open(report.write_report(str(output), samples=1)).read()
  table = page[page.index('id="clips"'):]
  assert '2 of 4 clips, a sample spread over the run (the table stops at 2 rows)' in page
  assert table.count('<tr class=') == 2


def green_pixels(image: np.ndarray) -> int:
  r, g, b = image[..., 0].astype(int), image[..., 1].astype(int), image[..., 2].astype(int)
  return int(((g > 180) & (g - r > 90) & (g - b > 60)).sum())


def test_kept_sample_videos_play_with_landmarks_and_audio(run):
  page = open(os.path.join(run['output'], report.REPORT)).read()
  sources = re.findall(r'<video src="(report_media/samples/[^"]+)"', page)
  assert len(sources) == 2
  index = {r['key']: r for r in read_jsonl(os.path.join(run['output'], 'index.jsonl'))}
  for source in sources:
    with av.open(os.path.join(run['output'], source)) as container:
      assert [s.type for s in container.streams] == ['video', 'audio']
      frames = [f.to_ndarray(format='rgb24') for f in container.decode(video=0)]
    assert len(frames) == 50 and frames[0].shape == (report.PREVIEW, report.PREVIEW, 3)
    # The drawn landmarks: green dots on every frame, which the sample's own frames do not have.
    record = index[os.path.basename(source)[:-len('.mp4')]]
    (_, members), = report.shard_samples(os.path.join(run['output'], record['shard']), [record['key']])
    with av.open(io.BytesIO(members['mp4'])) as container:
      assert max(green_pixels(f.to_ndarray(format='rgb24')) for f in container.decode(video=0)) < 10
    assert min(green_pixels(frame) for frame in frames) > 300, source
  with av.open(os.path.join(run['output'], 'report_media', 'samples', 'talk_0.mp4')) as container:
    assert container.streams.audio[0].codec_context.name == 'aac' and container.duration > 1.9e6


def tick_labels(figure) -> list:
  figure.canvas.draw()
  axis = figure.axes[0]
  low, high = axis.get_xlim()
  return [t.get_text() for t, x in zip(axis.get_xticklabels(), axis.get_xticks()) if low <= x <= high]


def test_histograms_read_in_plain_numbers_with_the_threshold_drawn():
  values = list(1_000_000 + np.arange(25) * 0.5)  # matplotlib's own axis would say "+1e6" and 0..12
  figure = report.score_figure('face size', 'px', values[:20], values[20:], 1_000_009.0, 'min_face_px')
  labels = tick_labels(figure)
  assert labels and all(re.fullmatch(r'\d+(\.\d+)?', label) for label in labels), labels
  assert all(940_000 <= float(label) <= 1_060_000 for label in labels), labels
  axis = figure.axes[0]
  assert axis.xaxis.get_offset_text().get_text() == '' and axis.get_xlabel() == 'face size (px)'
  assert [line.get_xdata()[0] for line in axis.lines] == [1_000_009.0]
  assert len(axis.patches) > 0 and not axis.collections  # 25 clips: histograms
  few = report.score_figure('yaw', 'degrees', [3.0, 4.5], [31.0], 20.0, 'max_yaw')
  assert not few.axes[0].patches and len(few.axes[0].collections) == 2  # 3 clips: a dot each, two lanes
  assert [t.get_text() for t in few.axes[0].get_yticklabels()] == ['rejected (1)', 'kept (2)']
  # Nearly equal values are not spread over the whole axis; equal whole numbers get whole-number ticks.
  assert len(set(tick_labels(report.score_figure('face', 'px', [107.40, 107.45], [], None, '')))) >= 3
  assert tick_labels(report.score_figure('lag', 'frames', [0, 0], [], None, '', whole=True)) == [
      '−2', '−1', '0', '1', '2']
  assert tick_labels(report.score_figure('short side', 'px', [480, 480], [], None, '', whole=True)) == [
      '470', '475', '480', '485', '490']
  assert tick_labels(report.score_figure('with a face', 'fraction', [1.0], [], None, '')) == [
      '0.98', '0.99', '1.00', '1.01', '1.02']
  assert [report.plain(v) for v in (1234567.0, 0.25, 12.345, 0.00012, 3.0)] == [
      '1 234 567', '0.25', '12.3', '0.0001', '3']


def test_failures_carry_the_measured_value_and_the_threshold():
  scores = {'face_ratio': 1.0, 'source_face_px': 40.0, 'source_resolution': 360, 'duration': 3.0,
            'sharpness': 80.0, 'max_abs_yaw': 50.5, 'max_abs_pitch': 3.0, 'eye_motion_var': 4.0, 'sync_corr': 0.6,
            'sync_lag_frames': -3}
  assert [(code, value, threshold) for code, _, value, threshold in
          failures(scores, Thresholds(max_yaw=45.0, max_sync_lag=2))] == [
      ('face_too_small', 40.0, 64.0), ('yaw_too_large', 50.5, 45.0), ('av_sync_offset', 3.0, 2.0)]


# ----------------------------------------------------------------------------- the command, over gs://

class TokenEndpoint(http.server.BaseHTTPRequestHandler):
  """The OAuth token endpoint of the offline credentials below: any request gets a token."""

  def log_message(self, *args):
    pass

  def do_POST(self):
    self.rfile.read(int(self.headers.get('Content-Length') or 0))
    body = json.dumps({'access_token': 'offline', 'expires_in': 3600, 'token_type': 'Bearer'}).encode()
    self.send_response(200)
    self.send_header('Content-Type', 'application/json')
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    self.wfile.write(body)


@contextlib.contextmanager
def gcs_emulator(tmp_path):
  """gcp-storage-emulator and an offline token endpoint, both on loopback; yields (env, bucket)."""
  port = free_port()
  tokens = http.server.ThreadingHTTPServer(('127.0.0.1', 0), TokenEndpoint)
  threading.Thread(target=tokens.serve_forever, daemon=True).start()
  try:
    with background([os.path.join(os.path.dirname(sys.executable), 'gcp-storage-emulator'), 'start',
                     f'--port={port}', '--host=127.0.0.1', '--default-bucket=reports', '--in-memory', '-q'], port):
      credentials = tmp_path / 'credentials.json'
      # Workforce-style user credentials: the one ADC type whose token endpoint can point at loopback. An
      # audience that names no workforce pool leaves google-auth no Google host to look its region up at.
      credentials.write_text(json.dumps({
          'type': 'external_account_authorized_user', 'client_id': 'offline', 'client_secret': 'offline',
          'audience': 'offline', 'refresh_token': 'offline',
          'token_url': f'http://127.0.0.1:{tokens.server_address[1]}/token'}))
      env = {'STORAGE_EMULATOR_HOST': f'http://127.0.0.1:{port}', 'GOOGLE_APPLICATION_CREDENTIALS': str(credentials),
             'GOOGLE_CLOUD_PROJECT': 'offline-test', 'NO_GCE_CHECK': 'true'}
      from google.auth.credentials import AnonymousCredentials
      from google.cloud import storage
      client = storage.Client(project='offline-test', credentials=AnonymousCredentials(),
                              client_options={'api_endpoint': f'http://127.0.0.1:{port}'})
      yield env, client.bucket('reports')
  finally:
    tokens.shutdown()
    tokens.server_close()


def test_report_command_writes_the_same_report_for_a_gcs_output(run, tmp_path):
  local = os.path.join(run['output'], report.REPORT)
  with gcs_emulator(tmp_path) as (env, bucket):
    for folder, _, names in os.walk(run['output']):
      for name in names:
        path = os.path.join(folder, name)
        relative = os.path.relpath(path, run['output'])
        if not relative.startswith(('_work', report.REPORT, report.MEDIA + '/figures', report.MEDIA + '/samples')):
          bucket.blob(f'run/{relative}').upload_from_filename(path)
    result = subprocess.run([sys.executable, '-m', 'beam_pipeline.report', 'gs://reports/run/', '--samples=4'],
                            cwd=REPO, env=dict(os.environ, **env), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == 'report: gs://reports/run/report.html'
    remote = bucket.blob('run/report.html').download_as_text()
    stored = {blob.name for blob in bucket.list_blobs(prefix='run/')}
  assert remote == open(local).read().replace(run['output'], 'gs://reports/run')
  linked = re.findall(r'(?:src)="(report_media/[^"]+)"', remote)
  assert len(linked) > 10 and {f'run/{name}' for name in linked} <= stored


def test_report_command_refuses_a_folder_that_is_no_output(tmp_path):
  result = subprocess.run([sys.executable, '-m', 'beam_pipeline.report', str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 2 and 'is not a finished output' in result.stderr
  assert not os.path.exists(tmp_path / report.REPORT)


# ----------------------------------------------------------------------------- progress and inspect

def test_progress_line_from_beam_metrics(run):
  """The run is on the local runner's default workers (every core: tests/test_local_workers.py); their metrics
  add up to the same line and summary as one worker's."""
  final = [line for line in run['stderr'].splitlines() if 'downloaded |' in line][-1]
  assert 'sources 3/3 downloaded' in final
  assert 'clips 4/4 done: 3 rendered, 2 written, 2 rejected' in final
  assert 'wrote 2 new clips (2 in total, 2 rejected of 4 planned)' in run['stdout']


def test_inspect_output_and_shard(run, tmp_path):
  out = subprocess.run([sys.executable, '-m', 'beam_pipeline.inspect_output', run['output'],
                        f'--preview={tmp_path}/out.png'], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  assert 'planned 4, written 2, rejected 2, balanced True' in out.stdout
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
