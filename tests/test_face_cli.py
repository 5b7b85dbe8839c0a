"""The real CLI with face tracking: split clips, piece rejects, exact accounting, per-frame arrays, resume."""
import json
import os
import re

import numpy as np
import pytest

from beam_pipeline.demo import VideoSpec, write_video
from tests.helpers import load_npy, read_jsonl, read_shards, run_cli


@pytest.fixture(scope='module')
def split_run(tmp_path_factory):
  root = tmp_path_factory.mktemp('faces')
  write_video(str(root / 'two.mp4'), VideoSpec(duration=3.0, fps=25.0, width=960, second_face_scale=0.7, seed=4))
  write_video(str(root / 'gone.mp4'), VideoSpec(duration=6.0, fps=25.0, face_gone=(2.5, 3.5), seed=6))
  write_video(str(root / 'brief.mp4'), VideoSpec(duration=3.0, fps=25.0, face_gone=(1.2, 2.0), seed=7))
  manifest = root / 'faces.jsonl'
  manifest.write_text(''.join(json.dumps({'id': name, 'url': str(root / f'{name}.mp4')}) + '\n'
                              for name in ('two', 'gone', 'brief')))
  output = root / 'out'
  # In-step speech correlates ~0.75-0.9 with its mouth, a silent face ~0.3 (chance): 0.5 tells them apart.
  args = (f'--input={manifest}', f'--output={output}', '--multi_face=split', '--crop_follow=0.5',
          '--min_sync_corr=0.5', '--no_progress', '--no_report')
  run_cli(*args)
  return {'output': str(output), 'args': args}


def test_split_pieces_are_accounted_once_per_planned_clip(split_run):
  out = split_run['output']
  stats = json.load(open(os.path.join(out, 'stats.json')))
  index = read_jsonl(os.path.join(out, 'index.jsonl'))
  rejects = read_jsonl(os.path.join(out, 'rejects.jsonl'))
  # Piece ids are the piece's start in the clip, in ms; the two faces of two_0 start together (left, right).
  later = sorted(r['start'] for r in index if r['planned_id'] == 'gone_0')[-1]
  assert later >= 3.5 and {(r['id'], r['planned_id']) for r in index} == {
      ('two_0_f0_0', 'two_0'), ('gone_0_f0', 'gone_0'), (f'gone_0_f{round(later * 1000)}', 'gone_0')}
  # The silent listener's mouth does not follow the speech. Both pieces of brief_0 are too short: the face
  # is away from 1.2 s to 2.0 s and slides back in within 0.4 s.
  (back,) = [r['id'] for r in rejects if r['planned_id'] == 'brief_0' and r['id'] != 'brief_0_f0']
  assert 2000 <= int(re.fullmatch(r'brief_0_f(\d+)', back).group(1)) <= 2400
  assert {(r['id'], r['planned_id'], r['reason']) for r in rejects} == {
      ('brief_0_f0', 'brief_0', 'too_short'), (back, 'brief_0', 'too_short'), ('two_0_f0_1', 'two_0', 'av_sync_low')}
  assert (stats['planned'], stats['written'], stats['rejected'], stats['samples'], stats['pieces_rejected']) == (
      3, 2, 1, 3, 3)
  assert stats['balanced'] and stats['written_this_run'] == 2


def test_samples_carry_every_array_score_and_a_following_window(split_run):
  samples = {s['__key__']: s for s in read_shards(split_run['output'])}
  for key, sample in samples.items():
    meta = sample['json']
    frames = meta['num_frames']
    assert load_npy(sample['iris.npy']).shape == (frames, 2, 2)
    assert load_npy(sample['lmk68.npy']).shape == (frames, 68, 2)
    assert load_npy(sample['blendshapes.npy']).shape == (frames, 52) and len(meta['blendshape_names']) == 52
    assert meta['failed'] == [] and meta['scores']['sync_corr'] > 0.3
    assert len(meta['crop']['follow']) >= 5
    # The window follows the drifting face: it stays near the middle of every output frame.
    lmk = load_npy(sample['lmk68.npy'])
    centres = np.nanmean(lmk, axis=1)
    assert np.all(np.abs(np.nanmedian(centres, 0) - 256) < 40), (key, np.nanmedian(centres, 0))
  later = [key for key in samples if key.startswith('gone_0_f') and key != 'gone_0_f0']
  assert samples['gone_0_f0']['json']['end'] <= 2.5 and samples[later[0]]['json']['start'] >= 3.5


def test_rerun_of_split_clips_writes_no_duplicates(split_run):
  out = split_run['output']
  shards = sorted(os.listdir(os.path.join(out, 'shards')))
  result = run_cli(*split_run['args'])
  stats = json.load(open(os.path.join(out, 'stats.json')))
  assert sorted(os.listdir(os.path.join(out, 'shards'))) == shards
  assert stats['written_this_run'] == 0 and stats['written'] == 2 and stats['samples'] == 3 and stats['balanced']
  assert stats['rejected'] == 1 and stats['pieces_rejected'] == 3  # split clips are tracked again, not duplicated
  assert 'resumed: 2 clips' in result.stdout  # planned clips (3 samples: one clip was split in two)
