"""Folder recipes off the local disk: mmvox with gs:// input and output (a local GCS emulator), run twice into
the same output; nerf (a CombinePerKey of backgrounds and a CoGroupByKey per subject) through PortableRunner
on Beam's local job service with LOOPBACK workers."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import wave

import cv2
import numpy as np
import pytest

from beam_pipeline.demo import VideoSpec, write_video
from tests.helpers import REPO, background, free_port, read_jsonl
# The loopback GCS emulator behind its OAuth-answering gate, shared with test_scale_out (pytest gives this
# module its own instance).
from tests.test_scale_out import BUCKET, gcs  # noqa: F401  pylint: disable=unused-import

pytestmark = pytest.mark.timeout(300)

QUIET = ('--no_report', '--no_progress')
RUN_FILES = ('index.jsonl', 'rejects.jsonl', 'stats.json', 'output.json')  # and each run's copies: runs/<id>/


def cli(*args, env=None) -> subprocess.CompletedProcess:
  result = subprocess.run([sys.executable, '-m', 'beam_pipeline', *args, *QUIET], cwd=REPO,
                          env=dict(os.environ, **(env or {})), capture_output=True, text=True, timeout=240)
  assert result.returncode == 0, f'{result.stdout[-3000:]}\n{result.stderr[-6000:]}'
  return result


# ----------------------------------------------------------------------------- mmvox on gs://

MMVOX_FRAMES = 40  # 1.6 s at 25 fps: one tube, above --min_frames 16
MMVOX = ('--recipe=mmvox', '--size=128', '--min_frames=16', '--min_tube_px=64', '--tube_format=mp4')


def _blobs(bucket, prefix: str) -> dict:
  """name below `prefix` -> blob, without the work dir."""
  return {blob.name[len(prefix):]: blob for blob in bucket.list_blobs(prefix=prefix)
          if not blob.name[len(prefix):].startswith('_work/')}


def test_mmvox_tube_on_gcs_is_published_last_and_not_rewritten(gcs, tmp_path):
  bucket = gcs['bucket']
  video = tmp_path / 'speaker.mp4'
  write_video(str(video), VideoSpec(duration=MMVOX_FRAMES / 25, fps=25.0, width=640, height=480, face_scale=2.0,
                                    seed=2))
  bucket.blob('mmvox-in/speaker.mp4').upload_from_filename(str(video))
  output = f'gs://{BUCKET}/mmvox'
  args = (f'--input=gs://{BUCKET}/mmvox-in/speaker.mp4', f'--output={output}', *MMVOX)
  cli(*args, env=gcs['env'])

  key = 'speaker#000#000'  # MMVID's <source>#<clip>#<tube>
  blobs = _blobs(bucket, 'mmvox/')
  every_4th = [f'{i:07d}.png' for i in range(0, MMVOX_FRAMES, 4)]
  unit = {f'video/{key}.mp4', f'label/{key}.txt', f'label/{key}.json', f'txt/{key}.txt',
          *(f'mask/{key}/{name}' for name in every_4th), *(f'draw/style1/{key}/{name}' for name in every_4th)}
  published_name = 'published/speaker~000~000.jsonl'  # '#' read back from GCS is fragile: '~' there
  assert {name for name in blobs if not name.startswith('runs/')} == unit | {published_name, *RUN_FILES}, sorted(blobs)
  # The unit's index is its last file: a reader that sees it sees every file of the tube.
  marker = blobs[published_name]
  assert all(blobs[name].updated <= marker.updated for name in unit)
  # The tube's work-dir media (rendered mp4, frame archives) went once it was published.
  assert not [b.name for b in bucket.list_blobs(prefix='mmvox/_work/') if key in b.name]

  published = [json.loads(line) for line in marker.download_as_text().splitlines()]
  assert [(r['id'], r['folder'], r['num_frames'], r['masks'], r['drawings']) for r in published] == [
      ('speaker_0', key, MMVOX_FRAMES, len(every_4th), len(every_4th))]
  index = [json.loads(line) for line in blobs['index.jsonl'].download_as_text().splitlines()]
  assert index == published and blobs['rejects.jsonl'].download_as_bytes() == b''
  stats = json.loads(blobs['stats.json'].download_as_bytes())
  assert (stats['planned'], stats['written'], stats['written_this_run'], stats['already_written'],
          stats['frames_written'], stats['index_lines'], stats['balanced']) == (1, 1, 1, 0, MMVOX_FRAMES, 1, True)
  cache = pickle.loads(bucket.blob('mmvox_local.pkl').download_as_bytes())  # beside the folder, as MMVID looks
  assert cache['root'] == output and cache['keys'] == [key] and cache['videos'] == {key: [f'video/{key}.mp4']}
  assert len(bucket.blob(f'mmvox/txt/{key}.txt').download_as_text().split('\n')) == 20  # a fresh blob: quoted
  # The object id ends in its generation (the emulator lists `generation` itself only once it was read).
  written = {name: blobs[name].id for name in unit | {published_name}}

  # The same job again into the same output: the tube counts as written and not one of its files is rewritten.
  again = cli(*args, env=gcs['env'])
  assert f'resumed: 1 clips already in {output} were skipped' in again.stdout
  blobs = _blobs(bucket, 'mmvox/')
  assert {name: blobs[name].id for name in written} == written
  stats = json.loads(blobs['stats.json'].download_as_bytes())
  assert (stats['planned'], stats['written'], stats['written_this_run'], stats['already_written'],
          stats['balanced']) == (1, 1, 0, 1, True)
  assert [json.loads(line) for line in blobs['index.jsonl'].download_as_text().splitlines()] == published
  # The loader cache of the rerun still lists the tube, from the published index of the first run.
  assert pickle.loads(bucket.blob('mmvox_local.pkl').download_as_bytes())['keys'] == [key]


# ----------------------------------------------------------------------------- nerf on PortableRunner

@pytest.fixture(scope='module')
def job_service(tmp_path_factory):
  """Beam's local portable job service -> (endpoint, its log): the log shows the jobs it ran."""
  log = tmp_path_factory.mktemp('job_service') / 'service.log'
  port = free_port()
  with background([sys.executable, '-m', 'apache_beam.runners.portability.local_job_service_main',
                   f'--port={port}'], port, log_path=str(log)):
    yield f'localhost:{port}', log


def test_nerf_subject_through_portable_runner(job_service, tmp_path):
  """Two clips of one talker (60 frames at 25 fps) meet in one subject folder, numbered in time order."""
  video = str(tmp_path / 'talker.mp4')
  write_video(video, VideoSpec(duration=2.4, width=480, height=360, fps=25.0, seed=4, motion_px=8.0))
  manifest = tmp_path / 'videos.jsonl'
  manifest.write_text(json.dumps({'id': 'talker', 'url': video, 'clips': [[1.2, 2.4], [0.0, 1.2]]}) + '\n')
  output = tmp_path / 'out'
  endpoint, service_log = job_service
  cli(f'--input={manifest}', f'--output={output}', '--recipe=nerf', '--size=128', '--runner=PortableRunner',
      '--environment_type=LOOPBACK', f'--job_endpoint={endpoint}')
  assert 'with state DONE' in service_log.read_text()  # the job service ran it, not an in-process runner

  stats = json.load(open(output / 'stats.json'))
  assert (stats['planned'], stats['written'], stats['rejected'], stats['balanced']) == (2, 2, 0, True), stats
  assert read_jsonl(str(output / 'rejects.jsonl')) == []
  published = read_jsonl(str(output / 'published' / 'talker.jsonl'))
  assert sorted(read_jsonl(str(output / 'index.jsonl')), key=lambda r: r['id']) == sorted(
      published, key=lambda r: r['id'])
  assert [(r['start'], r['folder']) for r in published] == [(0.0, 'talker'), (1.2, 'talker')]
  first, second = (r['frames'] for r in published)
  frames = second[1]
  assert first[0] == 0 and first[1] == second[0] and frames == stats['frames_written'] == 60
  assert len({json.dumps(r['crop']) for r in published}) == 1  # one window for the subject

  subject = output / 'talker'
  assert sorted(os.listdir(subject)) == [
      'au.csv', 'audio.wav', 'audio_mel.npy', 'bc.jpg', 'camera_poses.json', 'com_imgs', 'face_mesh.json',
      'face_poses.json', 'gt_imgs', 'head_imgs', 'ori_imgs', 'parsing', 'torso_imgs', 'transforms_train.json',
      'transforms_val.json']
  for folder, suffix in (('ori_imgs', 'jpg'), ('parsing', 'png'), ('gt_imgs', 'jpg'), ('torso_imgs', 'png'),
                         ('head_imgs', 'jpg'), ('com_imgs', 'jpg')):
    assert sorted(os.listdir(subject / folder)) == sorted(
        [f'{i}.{suffix}' for i in range(frames)] + ([f'{i}.lms' for i in range(frames)] if folder == 'ori_imgs'
                                                    else [])), folder
  assert cv2.imread(str(subject / 'bc.jpg')).shape == (128, 128, 3)
  assert np.load(subject / 'audio_mel.npy').shape == (frames, 16, 80)
  with wave.open(str(subject / 'audio.wav')) as audio:
    assert (audio.getframerate(), audio.getnframes()) == (16000, frames * 16000 // 25)
  mesh = json.load(open(subject / 'face_mesh.json'))
  assert [f['img_id'] for f in mesh['frames']] == list(range(frames))
  train, val = (json.load(open(subject / f'transforms_{name}.json')) for name in ('train', 'val'))
  assert sorted(f['img_id'] for f in train['frames'] + val['frames']) == list(range(frames))
  assert [f['img_id'] for f in val['frames']] == list(range(54, 60))  # AD-NeRF's split: the last 1/11
  # Work-dir media of both clips went once the subject was published.
  assert not [name for _, _, names in os.walk(output / '_work') for name in names]


# ----------------------------------------------------------------------------- user weights on gs://

WEIGHTS_CHILD = r'''
import sys, numpy as np
from beam_pipeline.recipes.nerf.audio_features import HubertHandler, check_hubert_dir
from beam_pipeline.recipes.nerf.depth_model import DepthHandler, check_depth_weights
from model_handlers.weights import WeightsError
hubert_uri, depth_uri, missing_uri, faces_uri = sys.argv[1:5]
from model_handlers.weights import local_copy
from beam_pipeline.recipes.megactor.faceswap import find_source_images
(face,) = find_source_images(faces_uri)
assert face == faces_uri + 'a.png', face
assert open(local_copy(face, '--source_images', 'a face image'), 'rb').read() == b'not really a png'

check_hubert_dir(hubert_uri), check_depth_weights(depth_uri)
try:
  check_depth_weights(missing_uri)
  raise SystemExit('a missing gs:// folder passed the check')
except WeightsError as error:
  assert '--depth' in str(error), error
hubert = HubertHandler(hubert_uri)
features = next(iter(hubert.run_inference([np.zeros(16000, np.float32)], hubert.load_model()))).inference
depth = DepthHandler(depth_uri)
disparity = next(iter(depth.run_inference([np.zeros((64, 64, 3), np.uint8)], depth.load_model()))).inference
print('OK', features.shape, disparity.shape, hubert.local_dir)
'''


def test_user_weights_load_from_gcs(gcs, tmp_path):
  """A distributed worker has no copy of the launching machine's disk: weights folders (and face-swap source
  images) given as gs:// are checked in the bucket when the graph is built and copied once per machine when
  the model loads."""
  torch = pytest.importorskip('torch')
  transformers = pytest.importorskip('transformers')
  from beam_pipeline.recipes.nerf import depth_model as dp
  bucket = gcs['bucket']
  torch.manual_seed(0)
  hubert = tmp_path / 'hubert'
  transformers.HubertModel(transformers.HubertConfig(
      hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, conv_dim=(16,) * 7,
      num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)).save_pretrained(str(hubert))
  dagan = tmp_path / 'dagan'
  dagan.mkdir()
  model = dp.DaGANDepth()
  torch.save(model.encoder.state_dict(), dagan / 'encoder.pth')
  torch.save(model.decoder.state_dict(), dagan / 'depth.pth')
  for folder in (hubert, dagan):
    for path in folder.iterdir():
      bucket.blob(f'weights/{folder.name}/{path.name}').upload_from_filename(str(path))
  bucket.blob('faces/a.png').upload_from_string(b'not really a png')
  bucket.blob('faces/notes.txt').upload_from_string(b'not an image')
  env = dict(os.environ, **gcs['env'], TMPDIR=str(tmp_path / 'worker_tmp'))
  os.makedirs(env['TMPDIR'])
  result = subprocess.run([sys.executable, '-c', WEIGHTS_CHILD, f'gs://{BUCKET}/weights/hubert',
                           f'gs://{BUCKET}/weights/dagan', f'gs://{BUCKET}/weights/nothing',
                           f'gs://{BUCKET}/faces/'],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
  assert result.returncode == 0, result.stderr[-4000:]
  last = result.stdout.strip().splitlines()[-1]
  assert last.startswith('OK (49, 32) (64, 64)'), last
  local = last.split()[-1]
  assert local.startswith(env['TMPDIR']) and sorted(os.listdir(local)) == sorted(p.name for p in hubert.iterdir())
