"""Scale-out paths, offline: the same job on three runners, gs:// through a local GCS emulator,
a run killed mid-way and resumed with --incremental, Dataflow translation, the flex template, the image."""
from __future__ import annotations

import hashlib
import http.client
import http.server
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.parse

import apache_beam
import pytest

from beam_pipeline.demo import VideoSpec, write_video
from tests.helpers import REPO, background, free_port, read_jsonl, read_shards

pytestmark = pytest.mark.timeout(600)

QUIET = ('--no_report', '--no_progress')
SMALL = ('--size=128', '--shard_max_samples=1', '--fps=15')
BUCKET = 'talking-face-test'


def cli(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
  result = subprocess.run([sys.executable, '-m', 'beam_pipeline', *args, *QUIET], cwd=REPO,
                          env=dict(os.environ, **(env or {})), capture_output=True, text=True, timeout=timeout)
  assert result.returncode == 0, f'{result.stdout[-3000:]}\n{result.stderr[-6000:]}'
  return result


def sample_set(samples, unlike=('shard',)) -> dict:
  """key -> digest of every payload; json without the fields named `unlike` (the shard name is random)."""
  result = {}
  for sample in samples:
    digests = {}
    for name, value in sample.items():
      if name.startswith('__'):
        continue
      if name == 'json':
        value = json.dumps({k: v for k, v in value.items() if k not in unlike}, sort_keys=True).encode()
      digests[name] = hashlib.sha256(value).hexdigest()
    assert sample['__key__'] not in result, f'duplicate sample {sample["__key__"]}'
    result[sample['__key__']] = digests
  return result


@pytest.fixture(scope='module')
def clips(tmp_path_factory):
  """Three short talking clips and one without a face (a permanent reject)."""
  root = tmp_path_factory.mktemp('scale_src')
  for name, seed in (('alpha', 0), ('bravo', 5), ('charlie', 7)):
    write_video(str(root / f'{name}.mp4'), VideoSpec(duration=1.6, width=480, height=360, fps=15.0, seed=seed))
  write_video(str(root / 'empty.mp4'), VideoSpec(duration=1.6, width=480, height=360, fps=15.0, face=False, seed=9))
  return root


@pytest.fixture(scope='module')
def clean_run(clips, tmp_path_factory):
  output = tmp_path_factory.mktemp('clean') / 'out'
  cli(f'--input={clips}/*.mp4', f'--output={output}', *SMALL)
  return output


def test_clean_run_accounting(clean_run):
  stats = json.load(open(clean_run / 'stats.json'))
  assert sorted(sample_set(read_shards(str(clean_run)))) == ['alpha_0', 'bravo_0', 'charlie_0']
  assert [(r['id'], r['reason']) for r in read_jsonl(str(clean_run / 'rejects.jsonl'))] == [('empty_0', 'no_face')]
  assert stats['planned'] == 4 and stats['balanced']


# ----------------------------------------------------------------------------- runners

@pytest.fixture(scope='module')
def job_service():
  """Beam's local portable job service (the offline stand-in for a Flink job server)."""
  port = free_port()
  with background([sys.executable, '-m', 'apache_beam.runners.portability.local_job_service_main',
                   f'--port={port}'], port):
    yield f'localhost:{port}'


@pytest.mark.parametrize('runner_args', [
    ('--direct_running_mode=multi_processing', '--direct_num_workers=2'),
    ('--runner=PortableRunner', '--environment_type=LOOPBACK'),
], ids=['direct-multiprocessing', 'portable-loopback'])
def test_runners_write_identical_samples(runner_args, clips, clean_run, tmp_path, request):
  if 'PortableRunner' in ''.join(runner_args):
    runner_args += (f'--job_endpoint={request.getfixturevalue("job_service")}',)
  output = tmp_path / 'out'
  cli(f'--input={clips}/*.mp4', f'--output={output}', *SMALL, *runner_args)
  assert sample_set(read_shards(str(output))) == sample_set(read_shards(str(clean_run)))
  assert read_jsonl(str(output / 'rejects.jsonl')) == read_jsonl(str(clean_run / 'rejects.jsonl'))


# ----------------------------------------------------------------------------- GCS

class GcsGate(http.server.BaseHTTPRequestHandler):
  """Loopback front of the GCS emulator: forwards every request, answers OAuth token requests
  (so clients authenticate at once, offline), and once `freeze_after` shard tars were uploaded
  holds every further request (from the next tar's upload on), like a worker that stops mid-write
  before it is killed."""
  protocol_version = 'HTTP/1.1'

  def log_message(self, *args):
    pass

  def _body(self) -> bytes:
    if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
      data = b''
      while True:
        size = int(self.rfile.readline().split(b';')[0], 16)
        chunk = self.rfile.read(size)
        self.rfile.readline()
        if not size:
          return data
        data += chunk
    return self.rfile.read(int(self.headers.get('Content-Length') or 0))

  def _reply(self, status: int, headers, data: bytes):
    self.send_response(status)
    for key, value in headers:
      if key.lower() not in ('transfer-encoding', 'connection', 'content-length'):
        self.send_header(key, value)
    self.send_header('Content-Length', str(len(data)))
    self.end_headers()
    self.wfile.write(data)

  def _forward(self):
    body = self._body()
    gate = self.server
    gate.requests.append(urllib.parse.unquote(self.path))
    if self.path.startswith('/token'):
      token = json.dumps({'access_token': 'offline', 'expires_in': 3600, 'token_type': 'Bearer'}).encode()
      return self._reply(200, [('Content-Type', 'application/json')], token)
    # A shard tar is one upload, named in the body of the request that starts it: `{"name": ".../x.tar"}`.
    if gate.freeze_after and re.search(r'"name": "[^"]*/shards/[^"/]+\.tar"', body.decode('latin-1')):
      gate.published += 1
      if gate.published > gate.freeze_after:
        gate.frozen.set()
    if gate.frozen.is_set():
      gate.held.set()
      gate.release.wait(120)
      self.close_connection = True
      return
    upstream = http.client.HTTPConnection('127.0.0.1', gate.upstream_port, timeout=60)
    headers = {k: v for k, v in self.headers.items() if k.lower() not in ('host', 'connection', 'transfer-encoding',
                                                                          'content-length')}
    upstream.request(self.command, self.path, body=body, headers=headers)
    response = upstream.getresponse()
    self._reply(response.status, response.getheaders(), response.read())
    upstream.close()

  do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward


class _GateServer(http.server.ThreadingHTTPServer):
  daemon_threads = True

  def handle_error(self, request, client_address):
    pass  # the killed run resets its held connections; that is the point


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
  """gcp-storage-emulator (in memory) behind the gate; yields the env a pipeline process needs."""
  port = free_port()
  with background([os.path.join(os.path.dirname(sys.executable), 'gcp-storage-emulator'), 'start',
                   f'--port={port}', '--host=127.0.0.1', f'--default-bucket={BUCKET}', '--in-memory', '-q'], port):
    gate = _GateServer(('127.0.0.1', 0), GcsGate)
    gate.upstream_port, gate.freeze_after, gate.published, gate.requests = port, 0, 0, []
    gate.frozen, gate.held, gate.release = threading.Event(), threading.Event(), threading.Event()
    thread = threading.Thread(target=gate.serve_forever, daemon=True)
    thread.start()
    url = f'http://127.0.0.1:{gate.server_address[1]}'
    credentials = tmp_path_factory.mktemp('adc') / 'credentials.json'
    # Workforce-style user credentials: the one ADC type whose token endpoint can point at loopback.
    credentials.write_text(json.dumps({
        'type': 'external_account_authorized_user', 'client_id': 'offline', 'client_secret': 'offline',
        'audience': 'offline',  # a workforce-pool audience makes google-auth look up iamcredentials.googleapis.com
        'refresh_token': 'offline', 'token_url': f'{url}/token'}))
    env = {'STORAGE_EMULATOR_HOST': url, 'GOOGLE_APPLICATION_CREDENTIALS': str(credentials),
           'GOOGLE_CLOUD_PROJECT': 'offline-test', 'NO_GCE_CHECK': 'true'}
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage
    client = storage.Client(project='offline-test', credentials=AnonymousCredentials(),
                            client_options={'api_endpoint': f'http://127.0.0.1:{port}'})
    try:
      yield {'env': env, 'gate': gate, 'bucket': client.bucket(BUCKET)}
    finally:
      gate.release.set()
      gate.shutdown()
      gate.server_close()


def test_gcs_run_killed_mid_way_then_resumed_incrementally(gcs, clips, clean_run, tmp_path):
  bucket, gate = gcs['bucket'], gcs['gate']
  for path in sorted(clips.glob('*.mp4')):
    bucket.blob(f'in/{path.name}').upload_from_filename(str(path))
  # A work dir of this test's own: the default one is keyed by the output's URL, which every run of this test
  # shares, so a killed run of an earlier session would leave it fragments to pack.
  args = [sys.executable, '-m', 'beam_pipeline', f'--input=gs://{BUCKET}/in/*.mp4', f'--output=gs://{BUCKET}/out',
          f'--work_dir={tmp_path / "work"}', *SMALL, *QUIET, '--incremental']
  env = dict(os.environ, **gcs['env'])

  gate.freeze_after = 1
  killed = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)

  def tars():
    return [b.name for b in bucket.list_blobs(prefix='out/shards/') if b.name.endswith('.tar')]

  try:
    deadline = time.monotonic() + 120
    # Held: no second tar can start. Two writers upload at once, so the first tar's bytes (sent straight to the
    # emulator, at the address its upload session gave) may still be on their way: the kill waits for them.
    while not (gate.held.is_set() and tars()):
      assert killed.poll() is None and time.monotonic() < deadline, 'the run ended before its second shard'
      time.sleep(0.2)
  finally:
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait(30)
  gate.freeze_after = 0
  gate.frozen.clear()
  gate.release.set()
  left = sorted(b.name for b in bucket.list_blobs(prefix='out/shards/'))
  assert len([n for n in left if n.endswith('.tar')]) == 1, left
  assert len([n for n in left if n.endswith('.jsonl')]) == 2, left  # the kill landed between index and tar
  assert not bucket.blob('out/stats.json').exists()

  gate.requests.clear()
  resumed = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-6000:]
  assert 'resumed: 1 clips' in resumed.stdout
  assert any('empty.mp4' in r for r in gate.requests)  # no earlier verdict yet: the clip is examined

  local = tmp_path / 'fetched'
  for blob in bucket.list_blobs(prefix='out/'):
    if '/_work/' not in blob.name and '/beam-temp-' not in blob.name:
      target = local / blob.name[len('out/'):]
      target.parent.mkdir(parents=True, exist_ok=True)
      blob.download_to_filename(str(target))
  names = sorted(os.listdir(local / 'shards'))
  assert not [n for n in names if n.endswith('.partial')], names
  # Three single-sample shards and their indexes. The killed run's orphan index is not cleaned (younger than
  # --stale_after_h: it could belong to a job still writing); the rerun batches the same sample again, which
  # gives the same shard name, so it rewrites that index and publishes the tar beside it.
  assert len([n for n in names if n.endswith('.tar')]) == 3 and len(names) == 6, names
  def by_file_name(samples):  # `inputs` digests the URL too
    return [dict(s, json={**s['json'], 'url': os.path.basename(s['json']['url']), 'inputs': ''}) for s in samples]
  # The same bytes as the clean local run; only the source URL's folder differs.
  assert sample_set(by_file_name(read_shards(str(local)))) == sample_set(by_file_name(read_shards(str(clean_run))))
  assert [(r['id'], r['reason']) for r in read_jsonl(str(local / 'rejects.jsonl'))] == [('empty_0', 'no_face')]
  index = read_jsonl(str(local / 'index.jsonl'))
  assert sorted(r['id'] for r in index) == ['alpha_0', 'bravo_0', 'charlie_0']
  stats = json.load(open(local / 'stats.json'))
  assert stats['balanced'] and stats['written'] == 3 and stats['written_this_run'] == 2

  # A scheduled rerun: nothing new, and the face-less clip is not even opened again.
  gate.requests.clear()
  again = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert again.returncode == 0, again.stderr[-6000:]
  assert 'incremental: 1 clips rejected for good' in again.stdout
  assert gate.requests and not [r for r in gate.requests if 'empty.mp4' in r]
  stats = json.loads(bucket.blob('out/stats.json').download_as_bytes())
  assert stats['written_this_run'] == 0 and stats['rejected_by_reason'] == {'no_face': 1} and stats['balanced']


def test_incremental_retries_transient_rejects(clean_run, tmp_path, clips):
  """Only permanent reasons are carried: a timed-out clip is processed again."""
  output = tmp_path / 'out'
  shutil.copytree(clean_run, output)
  rejects = read_jsonl(str(output / 'rejects.jsonl'))
  for shard in (output / 'shards').glob('*'):
    if 'alpha_0' in shard.read_bytes().decode('latin-1'):
      shard.unlink()
  rejects.append({'id': 'alpha_0', 'stage': 'render', 'reason': 'render_timeout', 'detail': '', 'source_id': 'alpha'})
  (output / 'rejects.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rejects))
  result = cli(f'--input={clips}/*.mp4', f'--output={output}', *SMALL, '--incremental')
  assert 'incremental: 1 clips rejected for good' in result.stdout
  stats = json.load(open(output / 'stats.json'))
  assert stats['written_this_run'] == 1 and stats['written'] == 3 and stats['rejected_by_reason'] == {'no_face': 1}
  assert sample_set(read_shards(str(output))) == sample_set(read_shards(str(clean_run)))


def test_incremental_carries_a_reject_only_for_the_inputs_it_recorded(clean_run, tmp_path, clips):
  """A permanent reject records its clip's inputs and is carried only while the clip is planned with them: the
  same clip as before is skipped; a clip whose range changed, and one whose reject predates inputs, are tried
  again (and their new rejects record the inputs)."""
  output = tmp_path / 'out'
  shutil.copytree(clean_run, output)
  rejects = read_jsonl(str(output / 'rejects.jsonl'))
  (earlier,) = rejects
  assert earlier['id'] == 'empty_0' and len(earlier['inputs']) == 16
  unrecorded = {k: v for k, v in earlier.items() if k != 'inputs'}
  rejects += [dict(earlier, id='blank_0', planned_id='blank_0', source_id='blank'),  # judged on the whole video
              dict(unrecorded, id='old_0', planned_id='old_0', source_id='old')]
  (output / 'rejects.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in rejects))
  video = str(clips / 'empty.mp4')
  manifest = tmp_path / 'faceless.jsonl'
  manifest.write_text(''.join(json.dumps(row) + '\n' for row in (
      {'id': 'empty', 'url': video}, {'id': 'blank', 'url': video, 'clips': [[0.0, 1.5]]},
      {'id': 'old', 'url': video})))
  result = cli(f'--input={manifest}', f'--output={output}', *SMALL, '--incremental')
  assert 'incremental: 1 clips rejected for good by an earlier run were skipped' in result.stdout
  stats = json.load(open(output / 'stats.json'))
  assert stats['carried_rejects'] == 1 and stats['rejected_by_reason'] == {'no_face': 3} and stats['balanced']
  now = {r['id']: r for r in read_jsonl(str(output / 'rejects.jsonl'))}
  assert now['empty_0'] == earlier  # carried as it was
  assert now['old_0']['inputs'] == earlier['inputs']  # the same clip: tried again, its inputs now recorded
  assert len(now['blank_0']['inputs']) == 16 and now['blank_0']['inputs'] != earlier['inputs']


# ----------------------------------------------------------------------------- Dataflow

IMAGE = 'us-central1-docker.pkg.dev/demo-project/talking-face/worker:0.1.0'
GPU = 'worker_accelerator=type:nvidia-l4;count:1;install-nvidia-driver'


def test_dataflow_dry_run_carries_the_flex_template_options(monkeypatch):
  """The launcher translates the job without contacting Google; the environment Dataflow would receive
  is rebuilt from the translated job exactly as DataflowApplicationClient.create_job_description does."""
  monkeypatch.setenv('NO_GCE_CHECK', 'true')
  from apache_beam.runners.dataflow.internal import apiclient
  from beam_pipeline.launcher import launch
  result = launch([
      '--runner=DataflowRunner', '--dry_run=True', '--project=demo-project', '--region=us-central1',
      '--temp_location=gs://demo-bucket/tmp', '--input=gs://demo-bucket/hdtf/', '--output=gs://demo-bucket/out',
      f'--sdk_container_image={IMAGE}', f'--dataflow_service_options={GPU}', '--machine_type=g2-standard-8',
      '--experiments=use_runner_v2', '--max_num_workers=8', '--disk_size_gb=100', '--incremental=true',
      '--allow_silent=false'])
  environment = apiclient.Environment([], result.job.options, '8', 'gs://demo-bucket/tmp/pipeline.pb',
                                      result.job.proto_pipeline).proto
  environment = json.loads(type(environment).to_json(environment))
  assert environment['serviceOptions'] == [GPU]
  assert 'use_runner_v2' in environment['experiments']
  pool = environment['workerPools'][0]
  assert (pool['machineType'], pool['diskSizeGb'], pool['autoscalingSettings']['maxNumWorkers']) == (
      'g2-standard-8', 100, 8)
  assert [image['containerImage'] for image in pool['sdkHarnessContainerImages']] == [IMAGE]
  flags = environment['sdkPipelineOptions']['options']
  assert flags['incremental'] is True and flags['allow_silent'] is False
  assert (flags['input'], flags['output']) == ('gs://demo-bucket/hdtf/', 'gs://demo-bucket/out')
  top = {t.unique_name for t in result.job.proto_pipeline.components.transforms.values()}
  assert {'ReadSources', 'ReadPublished', 'SkipDone', 'Download', 'Render', 'WriteShards', 'WriteRunSummary',
          'CarryRejects'} <= top


def test_launcher_file_submits_without_waiting(tmp_path):
  """Run the way the flex-template launcher runs it: the file, with parameters as --name=value."""
  env = dict(os.environ, NO_GCE_CHECK='true', PYTHONSAFEPATH='1', PYTHONPATH=REPO)
  result = subprocess.run(
      [sys.executable, os.path.join(REPO, 'beam_pipeline', 'launcher.py'), '--runner=DataflowRunner',
       '--dry_run=True', '--project=demo-project', '--region=us-central1', '--temp_location=gs://demo-bucket/tmp',
       '--input=gs://demo-bucket/hdtf/', '--output=gs://demo-bucket/out', f'--sdk_container_image={IMAGE}',
       '--incremental=true'], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-4000:]
  assert 'job state: DONE' in result.stdout  # a dry run's result; a real launch prints the job id


# ----------------------------------------------------------------------------- flex template and image

def test_metadata_matches_the_options():
  from beam_pipeline import template_metadata
  from apache_beam.options.pipeline_options import PipelineOptions
  with open(os.path.join(REPO, 'templates', 'metadata.json')) as handle:
    checked_in = json.load(handle)
  assert checked_in == template_metadata.metadata(), \
      'templates/metadata.json is stale: make template-metadata'
  ours = {a.dest: a for a in template_metadata._actions()}  # pylint: disable=protected-access
  beam = PipelineOptions([]).get_all_options(retain_unknown_options=False)
  names = [p['name'] for p in checked_in['parameters']]
  assert len(names) == len(set(names))
  assert set(ours) <= set(names)  # every option of ours is a parameter
  for parameter in checked_in['parameters']:
    assert parameter['name'] in ours or parameter['name'] in beam, parameter['name']
    assert parameter['label'] and parameter['helpText']
    action = ours.get(parameter['name'])
    for regex in parameter.get('regexes', []):
      pattern = re.compile(regex)
      if action is not None and action.default not in (None, False):
        assert pattern.fullmatch(str(action.default)), (parameter['name'], action.default)
  required = {p['name'] for p in checked_in['parameters'] if not p['isOptional']}
  assert required == {'input', 'output'}


def test_help_lists_our_flags_and_the_runner_flags():
  result = subprocess.run([sys.executable, '-m', 'beam_pipeline', '--help'], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
  assert result.returncode == 0, result.stderr[-3000:]
  from beam_pipeline import template_metadata
  ours = {a.dest for a in template_metadata._actions()}  # pylint: disable=protected-access
  listed = set(re.findall(r'--(\w+)', result.stdout))
  assert ours <= listed, ours - listed
  assert {'runner', 'direct_num_workers', 'job_endpoint', 'environment_type', 'flink_master',
          'sdk_container_image', 'dataflow_service_options', 'project', 'region'} <= listed


def test_template_booleans_reach_argparse():
  from beam_pipeline.options import TalkingFaceOptions
  from beam_pipeline.template_metadata import normalise_flags
  from apache_beam.options.pipeline_options import PipelineOptions
  on = PipelineOptions(normalise_flags(['--input=gs://b/x', '--incremental=true', '--allow_silent=false']))
  assert on.view_as(TalkingFaceOptions).incremental is True
  assert on.view_as(TalkingFaceOptions).allow_silent is False
  assert normalise_flags(['--output=gs://b/true', '--fps=25']) == ['--output=gs://b/true', '--fps=25']
  assert normalise_flags(['--incremental', 'false', '--allow_silent', 'true', '--input', 'true']) == [
      '--allow_silent', '--input', 'true']
  assert normalise_flags(['--incremental']) == ['--incremental']


def test_dockerfile_lints_clean_and_pins_what_workers_need():
  dockerfile = os.path.join(REPO, 'Dockerfile')
  hadolint = os.path.join(os.path.dirname(sys.executable), 'hadolint')
  result = subprocess.run([hadolint if os.path.exists(hadolint) else 'hadolint', '--failure-threshold=info',
                           dockerfile], capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stdout + result.stderr
  text = open(dockerfile).read()
  version = re.search(r'^ARG BEAM_VERSION=(\S+)$', text, re.M).group(1)
  assert version == apache_beam.__version__
  python = re.search(r'^ARG PYTHON_VERSION=(\d+)\.(\d+)\.\d+$', text, re.M).groups()
  assert f'FROM apache/beam_python{python[0]}.{python[1]}_sdk:${{BEAM_VERSION}}' in text
  for image in re.findall(r'^FROM (\S+)', text, re.M):
    assert re.search(r':[\w.${}-]+$', image) and not image.endswith(':latest'), image
  assert 'COPY --from=beam_sdk /opt/apache/beam /opt/apache/beam' in text
  assert text.rstrip().endswith('ENTRYPOINT ["/opt/apache/beam/boot"]')
  assert 'RUN python -m model_handlers.registry' in text
  launcher = re.search(r'FLEX_TEMPLATE_PYTHON_PY_FILE=/template/(\S+)', text).group(1)
  assert os.path.isfile(os.path.join(REPO, launcher)) and 'PYTHONSAFEPATH=1' in text
  with open(os.path.join(REPO, '.dockerignore')) as handle:
    kept = {line.rstrip('/') for line in handle.read().split() if line.startswith('!')}
  for copied in re.findall(r'^COPY (?!--from)(\S+) ', text, re.M):
    assert os.path.exists(os.path.join(REPO, copied)) and '!' + copied.rstrip('/') in kept, copied
