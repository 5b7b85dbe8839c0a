"""`--recipe=megactor` end to end through the CLI: VFHQ-style frame folders in, MegActor's samples out."""
from __future__ import annotations

import glob
import json
import os
import pickle
import sys
import tarfile

import apache_beam as beam
import numpy as np
import pytest

from beam_pipeline.demo import VideoSpec, write_frame_folders, write_video
from beam_pipeline.recipes.megactor.dwpose import to_openpose
from beam_pipeline.recipes.megactor.faceswap import FaceSwap
from beam_pipeline.recipes.megactor.stylize import OpenCVStyler
from beam_pipeline.recipes.megactor.writer import MakeCopies, copy_uri
from tests.helpers import load_npy, read_jsonl, read_shards, run_cli
from tests.test_dwpose import constant_graph, detector_output, expected_region, simcc_for
from tests.test_frame_sources import _add, _Marker, astronaut_frames, png, write_frame_zip
from transforms.core.elements import ClipTask, MediaFile, ProbeInfo, RenderedClip
from transforms.filters import Analysis

FACE = slice(24, 92)
BASE = ('--recipe=megactor', '--size=256', '--no_progress', '--no_report')
# The generated astronaut's eyes do not move unless given `gaze_deg`: MegActor's eye-motion filter (on in this
# recipe) would reject it.
COMMON = BASE + ('--min_eye_motion_var=0',)


@pytest.fixture(scope='module')
def megactor_run(tmp_path_factory):
  root = tmp_path_factory.mktemp('megactor')
  archive = write_frame_zip(str(root / 'group124.zip'), {'Clip+abc+P0': astronaut_frames(60),
                                                         'Clip+def+P1': astronaut_frames(48, seed=1)})
  output = root / 'out'
  run_cli(f'--input={archive}', f'--output={output}', *COMMON)
  return {'root': root, 'output': str(output), 'samples': read_shards(str(output))}


def test_samples_hold_megactor_members(megactor_run):
  samples = megactor_run['samples']
  assert sorted(s['__key__'] for s in samples) == ['Clip_abc_P0_0', 'Clip_def_P1_0']
  stats = json.load(open(os.path.join(megactor_run['output'], 'stats.json')))
  assert stats['balanced'] and stats['written'] == 2
  for sample in samples:
    meta = sample['json']
    frames = meta['num_frames']
    assert meta['fps'] == 30.0 and frames == {'Clip_abc_P0_0': 60, 'Clip_def_P1_0': 48}[sample['__key__']]
    assert {'mp4', 'mp4_styled', 'dwpose_result.npy', 'dwpose_score.npy', 'faces_bbox.npy'} <= set(sample)
    assert not any(name.endswith('.pyd') for name in sample)
    assert 'swapped.mp4' not in sample and meta['swapped'] is None and 'faceswap_cmd' in meta['swapped_why']
    assert meta['keypoints']['source'] == 'face_landmarker'
    points, scores = load_npy(sample['dwpose_result.npy']), load_npy(sample['dwpose_score.npy'])
    boxes = load_npy(sample['faces_bbox.npy'])
    assert points.shape == (frames, 134, 2) and scores.shape == (frames, 134) and boxes.shape == (frames, 4)
    assert points.dtype == scores.dtype == boxes.dtype == np.float32
    seen = scores[:, FACE].min(1) > 0
    assert seen.mean() > 0.9 and not scores[:, :24].any() and not scores[:, 92:].any()
    face = points[seen, FACE]
    low, high = boxes[seen, None, :2], boxes[seen, None, 2:]
    assert (face >= low - 1e-3).all() and (face <= high + 1e-3).all()  # face points inside the face box
    assert (boxes[seen, 2:] - boxes[seen, :2] > 20).all()
    assert sample['mp4_styled'][4:8] == b'ftyp' and sample['mp4_styled'] != sample['mp4']
  (listing,) = glob.glob(os.path.join(megactor_run['output'], '_work', 'frame_listings', '*.jsonl'))
  assert [len(json.loads(line)) for line in open(listing)] == [60, 48]  # the frame lists, out of the source urls
  tars = glob.glob(os.path.join(megactor_run['output'], 'shards', '*.tar'))
  assert tars and not any(name.endswith('.pyd') for tar in tars for name in tarfile.open(tar).getnames())


def test_reprocessing_the_tars_gives_the_same_keypoints(megactor_run, tmp_path):
  tars = sorted(glob.glob(os.path.join(megactor_run['output'], 'shards', '*.tar')))
  output = tmp_path / 'again'
  run_cli(f'--input={tars[0]}', f'--output={output}', *COMMON)
  first = {s['json']['id']: s for s in megactor_run['samples']}
  again = read_shards(str(output))
  assert sorted(s['json']['source_id'] for s in again) == sorted(first)  # sample key -> source id
  for sample in again:
    before = first[sample['json']['source_id']]
    assert sample['json']['crop']['window'] == [0, 0, 256, 256]  # the full frame: not cropped twice
    old, new = load_npy(before['dwpose_result.npy']), load_npy(sample['dwpose_result.npy'])
    assert new.shape == old.shape
    both = (load_npy(before['dwpose_score.npy'])[:, FACE].min(1) > 0) & \
        (load_npy(sample['dwpose_score.npy'])[:, FACE].min(1) > 0)
    assert both.mean() > 0.9
    assert np.median(np.abs(new[both, FACE] - old[both, FACE])) < 1.0  # pixels, after one more H.264 pass


@pytest.fixture(scope='module')
def pyd_runs(megactor_run):
  """A produced shard rewritten as MegActor's 2.generate_dwpose leaves it (a `.pyd` pickle beside the mp4), run
  once as is and once with --read_input_pickles; the trusted run keeps the recipe's eye-motion filter (no
  --min_eye_motion_var=0)."""
  root = megactor_run['root']
  tar_path = sorted(glob.glob(os.path.join(megactor_run['output'], 'shards', '*.tar')))[0]
  marker = root / 'unpickled'
  packed = root / 'group124_dwpose.tar'
  keys = set()
  with tarfile.open(tar_path) as source, tarfile.open(packed, 'w') as target:
    for member in source.getmembers():
      if member.name.endswith(('.mp4', '.json')):
        target.addfile(member, source.extractfile(member))
        keys.add(member.name.split('.', 1)[0])
    _add(target, f'{min(keys)}.dwpose_result.pyd', pickle.dumps(_Marker(str(marker))))
  refused, trusted = root / 'refused', root / 'trusted'
  run_cli(f'--input={packed}', f'--output={refused}', *COMMON)
  run_cli(f'--input={packed}', f'--output={trusted}', '--read_input_pickles', *BASE)
  return {'refused': refused, 'trusted': trusted, 'keys': keys, 'marker': marker}


def test_a_tar_with_pyd_members_is_refused_and_never_unpickled(pyd_runs):
  (reject,) = read_jsonl(str(pyd_runs['refused'] / 'rejects.jsonl'))
  assert (reject['id'], reject['reason']) == ('group124_dwpose', 'pickle_refused')
  assert read_shards(str(pyd_runs['refused'])) == []
  # With --read_input_pickles the tar is read: each sample's mp4 is rendered and scored (the filter below rejects
  # them), and the pickle is still never loaded.
  rejects = read_jsonl(str(pyd_runs['trusted'] / 'rejects.jsonl'))
  assert sorted(r['source_id'] for r in rejects) == sorted(pyd_runs['keys'])
  assert not pyd_runs['marker'].exists()


def test_the_eye_motion_filter_is_on_by_default(pyd_runs):
  """Without --min_eye_motion_var=0 the generated astronaut, whose eyes never move, fails MegActor's curation."""
  rejects = read_jsonl(str(pyd_runs['trusted'] / 'rejects.jsonl'))
  assert sorted(r['id'] for r in rejects) == sorted(f'{key}_0' for key in pyd_runs['keys'])
  assert {(r['stage'], r['reason'], r['threshold']) for r in rejects} == {('filter', 'eye_motion_low', 2.0)}
  assert all(r['value'] is not None and r['value'] <= 2.0 for r in rejects)
  assert read_shards(str(pyd_runs['trusted'])) == []


def test_the_eye_motion_filter_keeps_eyes_that_look_around(tmp_path):
  """The default filter on two folders of the same talking astronaut: the one whose irises look around
  (`gaze_deg`) is kept, the one with still eyes is rejected."""
  def spec(gaze_deg):
    return VideoSpec(duration=2.0, fps=30.0, width=256, height=256, audio=False, face_scale=256 / 400,
                     motion_px=256 / 25, gaze_deg=gaze_deg)
  archive = write_frame_folders(str(tmp_path / 'group7.zip'), {'Clip+gaze+P0': spec(25.0), 'Clip+still+P0': spec(0.0)})
  output = tmp_path / 'out'
  run_cli(f'--input={archive}', f'--output={output}', *BASE)
  (sample,) = read_shards(str(output))
  assert sample['__key__'] == 'Clip_gaze_P0_0' and sample['json']['scores']['eye_motion_var'] > 2.0
  (reject,) = read_jsonl(str(output / 'rejects.jsonl'))
  assert (reject['id'], reject['reason'], reject['threshold']) == ('Clip_still_P0_0', 'eye_motion_low', 2.0)
  assert reject['value'] <= 2.0


FACESWAP_SCRIPT = '''
import argparse, shutil
parser = argparse.ArgumentParser()
parser.add_argument('--source')
parser.add_argument('--target')
parser.add_argument('--output')
parser.add_argument('--fail', action='store_true')
args = parser.parse_args()
if args.fail:
  raise SystemExit('no face found in ' + args.source)
shutil.copyfile(args.target, args.output)
'''


def dwpose_graphs(folder):
  """Official-shaped DWPose ONNX graphs (tests/test_dwpose.py): the detector finds one person in a 256 px frame
  (letterboxed x2.5), the pose model puts each of its 133 points at a chosen pixel inside that person's box.
  Also returns the (134, 2) points and (134,) scores the ONNX path must give on every frame."""
  rng = np.random.default_rng(5)
  box = np.array([280 - 120, 260 - 180, 280 + 120, 260 + 180]) / 2.5
  centre, scale = expected_region(box)
  simcc_x, simcc_y, decoded, peaks = simcc_for(rng.uniform(box[:2], box[2:], (133, 2)), centre, scale, rng)
  detector = constant_graph(folder / 'yolox_l.onnx', 'images', [1, 3, 640, 640], {'output': detector_output()[None]})
  pose = constant_graph(folder / 'dw-ll_ucoco_384.onnx', 'input', [1, 3, 384, 288],
                        {'simcc_x': simcc_x, 'simcc_y': simcc_y})
  points, scores = to_openpose(decoded, peaks)
  return detector, pose, points, scores


def test_dwpose_onnx_and_faceswap_through_the_cli(tmp_path):
  archive = write_frame_zip(str(tmp_path / 'group9.zip'), {'Clip+xyz+P0': astronaut_frames(32, seed=2),
                                                           'Clip+uvw+P1': astronaut_frames(32, seed=3)})
  detector, pose, planted_points, planted_scores = dwpose_graphs(tmp_path)
  script = tmp_path / 'swap.py'
  script.write_text(FACESWAP_SCRIPT)
  faces = tmp_path / 'faces'
  faces.mkdir()
  (faces / 'face1.png').write_bytes(png(astronaut_frames(1)[0]))
  output = tmp_path / 'out'
  run_cli(f'--input={archive}', f'--output={output}', *COMMON, f'--dwpose_detector={detector}',
          f'--dwpose_model={pose}', f'--faceswap_cmd={sys.executable} {script} --source {{source}} '
          '--target {target} --output {output}', f'--source_images={faces}')
  samples = read_shards(str(output))
  assert sorted(s['__key__'] for s in samples) == ['Clip_uvw_P1_0', 'Clip_xyz_P0_0']
  assert (planted_scores > 0.3).all() and (np.abs(planted_points) > 1).all()  # every point planted, none at 0
  for sample in samples:
    meta = sample['json']
    assert meta['keypoints']['source'] == 'dwpose'
    assert meta['swapped'] == {'member': 'swapped.mp4', 'source_image': 'face1.png'}
    assert sample['swapped.mp4'] == sample['mp4']  # the script copies its target
    points, scores = load_npy(sample['dwpose_result.npy']), load_npy(sample['dwpose_score.npy'])
    boxes = load_npy(sample['faces_bbox.npy'])
    assert points.shape == (32, 134, 2) and scores.shape == (32, 134) and boxes.shape == (32, 4)
    # Every frame went through both ONNX graphs: all 134 points (body, feet, face, hands) where planted.
    np.testing.assert_allclose(points, np.broadcast_to(planted_points, points.shape), atol=1e-3)
    np.testing.assert_allclose(scores, np.broadcast_to(planted_scores, scores.shape), atol=1e-6)
    face = points[:, FACE]
    np.testing.assert_allclose(boxes, np.concatenate([face.min(1), face.max(1)], 1), atol=1e-4)
    assert (face >= boxes[:, None, :2] - 1e-3).all() and (face <= boxes[:, None, 2:] + 1e-3).all()
    assert (boxes[:, 2:] - boxes[:, :2] > 10).all() and (boxes >= 0).all() and (boxes <= 256).all()


def test_a_failing_face_swap_rejects_the_clip_and_removes_its_files(tmp_path):
  work = tmp_path / 'work'
  mp4 = write_video(str(work / 'clips' / 'c_0.mp4'), VideoSpec(duration=0.5, width=128, height=128, audio=False))
  info = ProbeInfo(0.5, 128, 128, 30.0, False, False, 'h264')
  task = ClipTask('c_0', 'c', mp4, MediaFile(mp4, info), 0.0, 0.5, (0, 0, 128, 128))
  clip = RenderedClip(task, mp4, b'', 15, 30.0, 128)
  script = tmp_path / 'swap.py'
  script.write_text(FACESWAP_SCRIPT)
  (tmp_path / 'face.png').write_bytes(png(astronaut_frames(1)[0]))
  swap = FaceSwap(f'{sys.executable} {script} --fail --source {{source}} --target {{target}} --output {{output}}',
                  str(tmp_path / 'face.png'), timeout_s=30)
  copies = MakeCopies(str(work), OpenCVStyler(), swap)
  copies.setup()
  (out,) = copies.process(Analysis(clip, {}, {}, {}, []))
  assert isinstance(out, beam.pvalue.TaggedOutput) and out.tag == 'rejects'
  assert (out.value.id, out.value.stage, out.value.reason) == ('c_0', 'megactor', 'faceswap_failed')
  assert 'no face found' in out.value.detail
  assert not os.path.exists(mp4) and not os.path.exists(copy_uri(str(work), 'c_0', 'mp4_styled'))
