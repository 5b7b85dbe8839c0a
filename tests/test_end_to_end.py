"""The real CLI on generated talking clips, from a loopback HTTP server and local files."""
import io
import json
import os
import shutil

import av
import numpy as np
import pytest

from tests.helpers import leftovers, load_npy, read_jsonl, read_shards, run_cli


@pytest.fixture(scope='module')
def hdtf_run(tmp_path_factory, media_dir, server):
  """One HDTF-style job: fixed and auto crops, http and local sources, three kinds of bad clip."""
  root = tmp_path_factory.mktemp('hdtf')
  annotations = root / 'HDTF_dataset'
  annotations.mkdir()
  (annotations / 'TST_video_url.txt').write_text(
      f'talk.mp4 {server}/talking.mp4\nhd.mp4 {server}/talking_hd.mp4\n'
      f'noface.mp4 {server}/noface.mp4\nsilent.mp4 {media_dir}/silent.mp4\n')
  (annotations / 'TST_resolution.txt').write_text('talk.mp4 480\nhd.mp4 0\n')
  (annotations / 'TST_annotion_time.txt').write_text(
      'talk.mp4 00:00.5-00:03.5 00:04-00:07.5 00:20-00:25\nhd.mp4 00:00-00:03\n'
      'noface.mp4 00:00-00:03\nsilent.mp4 00:00-00:03\n')
  # HDTF order x, width, y, height: a window around where the generated face drifts.
  (annotations / 'TST_crop_wh.txt').write_text('talk_0.mp4 160 320 50 320\n')
  output, work = root / 'out', root / 'work'
  result = run_cli(f'--input={annotations}', f'--output={output}', f'--work_dir={work}', '--shard_max_samples=2',
                   '--allow_private_hosts')
  return {'output': str(output), 'work': str(work), 'annotations': str(annotations), 'stdout': result.stdout}


def test_accounting(hdtf_run):
  stats = json.load(open(os.path.join(hdtf_run['output'], 'stats.json')))
  index = read_jsonl(os.path.join(hdtf_run['output'], 'index.jsonl'))
  rejects = read_jsonl(os.path.join(hdtf_run['output'], 'rejects.jsonl'))
  assert sorted(r['id'] for r in index) == ['hd_0', 'talk_0', 'talk_1']
  assert {r['id']: r['reason'] for r in rejects} == {
      'talk_2': 'clip_past_end', 'noface_0': 'no_face', 'silent_0': 'no_audio'}
  assert all(r['stage'] and r['detail'] for r in rejects)
  assert stats['planned'] == 6 and stats['written'] == 3 and stats['rejected'] == 3
  assert stats['written'] + stats['rejected'] == stats['planned'] and stats['balanced']
  assert 'wrote 3 new clips' in hdtf_run['stdout']
  assert leftovers(hdtf_run['output'], hdtf_run['work']) == []  # no beam-temp-* or emptied folder


def test_shards_as_training_data(hdtf_run):
  samples = read_shards(hdtf_run['output'])
  assert sorted(s['__key__'] for s in samples) == ['hd_0', 'talk_0', 'talk_1']
  assert len(os.listdir(os.path.join(hdtf_run['output'], 'shards'))) == 4  # 2 shards + their indexes
  for sample in samples:
    meta = sample['json']
    with av.open(io.BytesIO(sample['mp4'])) as container:
      video = container.streams.video[0]
      assert (video.codec_context.name, video.width, video.height) == ('h264', 512, 512)
      assert video.codec_context.pix_fmt == 'yuv420p'
      assert float(video.average_rate) == 25.0
      assert [a.codec_context.name for a in container.streams.audio] == ['aac']
      frames = sum(1 for _ in container.decode(video=0))
    assert frames == meta['num_frames'] == round((meta['end'] - meta['start']) * 25)
    landmarks = load_npy(sample['landmarks.npy'])
    assert landmarks.shape == (frames, 478, 3) and landmarks.dtype == np.float32
    assert load_npy(sample['bbox.npy']).shape == (frames, 4)
    assert load_npy(sample['pose.npy']).shape == (frames, 3)
    with av.open(io.BytesIO(sample['wav'])) as wav:
      stream = wav.streams.audio[0]
      assert (stream.rate, stream.channels) == (16000, 1)
    assert abs(len(sample['wav']) - 44 - 2 * 16000 * frames / 25) <= 4
    assert meta['face']['face_ratio'] > 0.95


def test_crop_modes_and_centring(hdtf_run):
  by_id = {s['__key__']: s for s in read_shards(hdtf_run['output'])}
  fixed = by_id['talk_0']['json']['crop']
  assert fixed['mode'] == 'fixed' and fixed['window'] == [160, 50, 320, 320]
  for clip_id in ('talk_1', 'hd_0'):
    meta = by_id[clip_id]['json']
    assert meta['crop']['mode'] == 'detect'
    landmarks = load_npy(by_id[clip_id]['landmarks.npy'])
    centre = np.nanmean(landmarks[:, :, :2].reshape(-1, 2), axis=0)
    assert np.all(np.abs(centre - 256) < 40), centre  # the face sits in the middle of the crop
    assert 0.25 < meta['face']['face_size'] / 512 < 0.75


def test_rerun_writes_nothing_new(hdtf_run):
  shards_before = sorted(os.listdir(os.path.join(hdtf_run['output'], 'shards')))
  result = run_cli(f'--input={hdtf_run["annotations"]}', f'--output={hdtf_run["output"]}',
                   f'--work_dir={hdtf_run["work"]}', '--allow_private_hosts')
  stats = json.load(open(os.path.join(hdtf_run['output'], 'stats.json')))
  assert sorted(os.listdir(os.path.join(hdtf_run['output'], 'shards'))) == shards_before
  assert stats['written_this_run'] == 0 and stats['written'] == 3 and stats['balanced']
  assert 'resumed: 3 clips' in result.stdout


def test_glob_of_local_files(tmp_path, media_dir):
  shutil.copy(media_dir / 'talking.mp4', tmp_path / 'clipA.mp4')
  output = tmp_path / 'out'
  run_cli(f'--input={tmp_path}/*.mp4', f'--output={output}', '--size=128')  # what is read, not how large
  samples = read_shards(str(output))
  assert [s['__key__'] for s in samples] == ['clipA_0']
  assert samples[0]['json']['num_frames'] == 200  # the whole 8 s video at 25 fps


def test_dotted_and_long_ids_read_back_as_distinct_complete_samples(tmp_path, media_dir):
  """webdataset splits member names at the first dot: `interview.part1_0` must not merge with
  `interview.part2_0`, and a 120-character id must not break the tar."""
  import webdataset as wds
  long_id = 'speaker' + 'x' * 113
  rows = [{'id': name, 'url': str(media_dir / 'talking.mp4'), 'clips': [[start, start + 2]]}
          for name, start in (('interview.part1', 0), ('interview.part2', 2), (long_id, 4))]
  manifest = tmp_path / 'in.jsonl'
  manifest.write_text(''.join(json.dumps(row) + '\n' for row in rows))
  output = tmp_path / 'out'
  run_cli(f'--input={manifest}', f'--output={output}', '--size=128')
  tars = sorted(str(p) for p in (output / 'shards').glob('*.tar'))
  samples = list(wds.WebDataset(tars, shardshuffle=False))
  by_id = {json.loads(s['json'])['id']: s for s in samples}
  assert sorted(by_id) == sorted(['interview.part1_0', 'interview.part2_0', long_id + '_0'])
  for clip_id, sample in by_id.items():
    assert {'mp4', 'wav', 'json', 'landmarks.npy', 'pose.npy'} <= set(sample), (clip_id, sorted(sample))
    assert json.loads(sample['json'])['key'] == sample['__key__'] and '.' not in sample['__key__']
    assert load_npy(sample['landmarks.npy']).shape[0] == json.loads(sample['json'])['num_frames']
  assert sorted(r['id'] for r in read_jsonl(str(output / 'index.jsonl'))) == sorted(by_id)
