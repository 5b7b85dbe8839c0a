"""`--recipe=megactor` end to end through the CLI: VFHQ-style frame folders in, MegActor's samples out."""
from __future__ import annotations

import glob
import json
import os
import pickle
import sys
import tarfile

import apache_beam as beam
import imageio.v3 as iio
import numpy as np
import pytest

from beam_pipeline.demo import VideoSpec, write_frame_folders, write_video
from beam_pipeline.recipes.megactor.dwpose import WholeBody, stack_results, to_openpose
from beam_pipeline.recipes.megactor.faceswap import FaceSwap
from beam_pipeline.recipes.megactor.stylize import OpenCVStyler
from beam_pipeline.recipes.megactor.writer import MakeCopies, clip_keypoints, pyd_members, style_key
from tests.helpers import leftovers, load_npy, read_jsonl, read_shards, run_cli
from tests.test_dwpose import ANCHORS, constant_graph, expected_region, person, plant, simcc_for
from tests.test_frame_sources import _add, _Marker, astronaut_frames, png, write_frame_zip
from transforms.core.elements import ClipTask, MediaFile, ProbeInfo, RenderedClip
from transforms.filters import Analysis
from transforms.lib.pickles import load_restricted

FACE = slice(24, 92)
BASE = ('--recipe=megactor', '--size=256', '--no_progress', '--no_report')
# The generated astronaut's eyes do not move unless given `gaze_deg`: MegActor's eye-motion filter (on in this
# recipe) would reject it.
COMMON = BASE + ('--min_eye_motion_var=0',)
KEYPOINT_PICKLES = ('dwpose_result', 'dwpose_score', 'faces_bbox', 'exist_face_frame_index')
V1_VIDEO_LENGTH, V1_LUMA = 16, 5.0  # face_dataset.py (v1): its default video_length and luma threshold
SIGMA_STRIDE, SIGMA_LENGTH = 2, 8  # configs/train/megactor-sigma/train_stage1.yaml: frame_stride, video_length


def read_like_v1(sample):
  """face_dataset.py of MegActor's v1 training scripts (VideosIterableDataset): the mp4, then mp4_styled and
  swapped.mp4 where present, as undecoded webdataset bytes through imageio's pyav plugin, frames darker than
  its luma threshold dropped; it then cuts the same frame indices from each."""
  decoded = []
  for name in ('mp4', 'mp4_styled', 'swapped.mp4'):
    if name in sample:
      frames = iio.imopen(sample[name], 'r', plugin='pyav').read(index=...)
      decoded.append(frames[[frame.mean() > V1_LUMA for frame in frames]])
  return decoded


def keypoint_pickles(sample):
  """The four keypoint `.pyd` members, checked for the types MegActor's scripts pickle: lists of one entry a
  frame, (people, 134, 2) and (people, 134) float32 arrays, (4,) float32 face boxes, bools. Read with
  load_restricted: this is our own output (MegActor's loaders call pickle.loads on the same bytes)."""
  points, scores, boxes, flags = (load_restricted(sample[f'{name}.pyd']) for name in KEYPOINT_PICKLES)
  frames = sample['json']['num_frames']
  assert all(type(value) is list and len(value) == frames for value in (points, scores, boxes, flags))
  for people, score, box in zip(points, scores, boxes):
    assert people.dtype == score.dtype == box.dtype == np.float32 and len(people) >= 1
    assert people.shape == (len(people), 134, 2) and score.shape == (len(people), 134) and box.shape == (4,)
  assert all(type(flag) is bool for flag in flags)
  return points, scores, boxes, flags


def read_like_sigma(sample):
  """_preprocess.py get_compact_frames (the Sigma configs' decode function): every member it opens, as it opens
  them, and the arrays it hands the crop functions (person 0 read as `candidates[i, 0, j]`); None where no run
  of flagged frames is long enough (it skips the sample)."""
  points, scores, boxes, flags = keypoint_pickles(sample)
  audio = load_restricted(sample['audio_frames.pyd']).reshape(-1)  # our own output, as above
  rate, fps = float(sample['sample_rate.str']), float(sample['fps.str'])
  runs, run = [], []
  for index, valid in enumerate(flags + [False]):
    if valid:
      run.append(index)
    else:
      runs, run = runs + [run], []
  runs = [run for run in runs if len(run) > SIGMA_STRIDE * SIGMA_LENGTH]
  if not runs:
    return None
  clip = runs[0][:SIGMA_STRIDE * SIGMA_LENGTH:SIGMA_STRIDE]
  return {'candidates': np.array([points[i] for i in clip]), 'subsets': np.array([scores[i] for i in clip]),
          'faces_bbox': np.array([boxes[runs[0][0]]] + [boxes[i] for i in clip]), 'audio': audio,
          'sample_rate': rate, 'fps': fps}


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
  assert leftovers(megactor_run['output']) == []  # no beam-temp-* or emptied folder (the work dir inside)
  for sample in samples:
    meta = sample['json']
    frames = meta['num_frames']
    assert meta['fps'] == 30.0 and frames == {'Clip_abc_P0_0': 60, 'Clip_def_P1_0': 48}[sample['__key__']]
    assert {'mp4', 'mp4_styled', 'fps.str', *(f'{name}.pyd' for name in KEYPOINT_PICKLES)} <= set(sample)
    assert float(sample['fps.str']) == 30.0 and not any(name.endswith('.npy') and 'dwpose' in name for name in sample)
    # Frame folders have no sound: no audio members (Sigma trains on clips with audio only).
    assert 'audio_frames.pyd' not in sample and 'sample_rate.str' not in sample
    assert 'swapped.mp4' not in sample and meta['swapped'] is None and 'faceswap_cmd' in meta['swapped_why']
    assert meta['keypoints']['source'] == 'face_landmarker' and meta['keypoints']['members'] == 'pyd'
    people, people_scores, boxes, flags = keypoint_pickles(sample)
    assert all(len(p) == 1 for p in people)  # the face landmarker's one face
    points, scores, boxes = np.stack(people)[:, 0], np.stack(people_scores)[:, 0], np.stack(boxes)
    seen = scores[:, FACE].min(1) > 0
    assert seen.mean() > 0.9 and not scores[:, :24].any() and not scores[:, 92:].any()
    assert flags == seen.tolist()  # Sigma trains on the frames whose face was seen
    face = points[seen, FACE]
    low, high = boxes[seen, None, :2], boxes[seen, None, 2:]
    assert (face >= low - 1e-3).all() and (face <= high + 1e-3).all()  # face points inside the face box
    assert (boxes[seen, 2:] - boxes[seen, :2] > 20).all()
    mp4, styled = read_like_v1(sample)
    assert mp4.shape == styled.shape == (frames, 256, 256, 3) and frames >= V1_VIDEO_LENGTH
    assert not np.array_equal(mp4, styled)
  (listing,) = glob.glob(os.path.join(megactor_run['output'], '_work', 'frame_listings', '*.jsonl'))
  assert [len(json.loads(line)) for line in open(listing)] == [60, 48]  # the frame lists, out of the source urls


def test_reprocessing_the_tars_gives_the_same_keypoints(megactor_run, tmp_path):
  """Our own shards hold `.pyd` members, so re-processing them needs --read_input_pickles (the pickles are still
  not loaded: the keypoints are recomputed); written here as .npy (--megactor_members=npy)."""
  tars = sorted(glob.glob(os.path.join(megactor_run['output'], 'shards', '*.tar')))
  output = tmp_path / 'again'
  run_cli(f'--input={tars[0]}', f'--output={output}', '--read_input_pickles', '--megactor_members=npy', *COMMON)
  first = {s['json']['id']: s for s in megactor_run['samples']}
  again = read_shards(str(output))
  assert sorted(s['json']['source_id'] for s in again) == sorted(first)  # sample key -> source id
  for sample in again:
    before = first[sample['json']['source_id']]
    assert sample['json']['crop']['window'] == [0, 0, 256, 256]  # the full frame: not cropped twice
    assert sample['json']['keypoints']['members'] == 'npy' and not any(name.endswith('.pyd') for name in sample)
    people, people_scores, _, _ = keypoint_pickles(before)
    old, new = np.stack(people)[:, 0], load_npy(sample['dwpose_result.npy'])
    assert new.shape == old.shape and load_npy(sample['faces_bbox.npy']).shape == (len(new), 4)
    both = (np.stack(people_scores)[:, 0, FACE].min(1) > 0) & (load_npy(sample['dwpose_score.npy'])[:, FACE].min(1) > 0)
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
  raw = np.zeros((ANCHORS, 85), np.float32)
  plant(raw, 32, (280, 260), (240, 360), 0.9, person())
  detector = constant_graph(folder / 'yolox_l.onnx', 'images', [1, 3, 640, 640], {'output': raw[None]})
  pose = constant_graph(folder / 'dw-ll_ucoco_384.onnx', 'input', [1, 3, 384, 288],
                        {'simcc_x': simcc_x, 'simcc_y': simcc_y})
  points, scores = to_openpose(decoded, peaks)
  return detector, pose, points, scores


def test_dwpose_onnx_faceswap_and_audio_read_by_v1_and_sigma(tmp_path):
  """Two talking videos with sound through DWPose's graphs and a face-swap command; each sample read the way
  MegActor v1's VideosIterableDataset and Sigma's get_compact_frames read it."""
  for name, seed in (('xyz', 2), ('uvw', 3)):
    write_video(str(tmp_path / 'videos' / f'{name}.mp4'),
                VideoSpec(duration=1.2, width=256, height=256, face_scale=256 / 400, motion_px=256 / 25, seed=seed))
  detector, pose, planted_points, planted_scores = dwpose_graphs(tmp_path)
  script = tmp_path / 'swap.py'
  script.write_text(FACESWAP_SCRIPT)
  faces = tmp_path / 'faces'
  faces.mkdir()
  (faces / 'face1.png').write_bytes(png(astronaut_frames(1)[0]))
  output = tmp_path / 'out'
  run_cli(f'--input={tmp_path}/videos/*.mp4', f'--output={output}', *COMMON, f'--dwpose_detector={detector}',
          f'--dwpose_model={pose}', f'--faceswap_cmd={sys.executable} {script} --source {{source}} '
          '--target {target} --output {output}', f'--source_images={faces}')
  samples = read_shards(str(output))
  assert sorted(s['__key__'] for s in samples) == ['uvw_0', 'xyz_0']
  assert (planted_scores > 0.3).all() and (np.abs(planted_points) > 1).all()  # every point planted, none at 0
  for sample in samples:
    meta = sample['json']
    frames = meta['num_frames']
    assert meta['keypoints']['source'] == 'dwpose' and meta['keypoints']['most_people'] == 1
    assert meta['swapped'] == {'member': 'swapped.mp4', 'source_image': 'face1.png'}
    assert sample['swapped.mp4'] == sample['mp4']  # the script copies its target
    videos = read_like_v1(sample)
    assert len(videos) == 3 and {v.shape for v in videos} == {(frames, 256, 256, 3)} and frames >= V1_VIDEO_LENGTH

    read = read_like_sigma(sample)
    assert read is not None  # every frame has one person with its face seen
    # Every frame went through both ONNX graphs: all 134 points (body, feet, face, hands) where planted.
    assert read['candidates'].shape == (SIGMA_LENGTH, 1, 134, 2) and read['subsets'].shape == (SIGMA_LENGTH, 1, 134)
    np.testing.assert_allclose(read['candidates'][:, 0], np.broadcast_to(planted_points, (SIGMA_LENGTH, 134, 2)),
                               atol=1e-3)
    np.testing.assert_allclose(read['subsets'][:, 0], np.broadcast_to(planted_scores, (SIGMA_LENGTH, 134)), atol=1e-6)
    boxes, face = read['faces_bbox'], read['candidates'][:, 0, FACE]
    assert boxes.shape == (SIGMA_LENGTH + 1, 4) and boxes.dtype == np.float32  # the reference frame's box first
    np.testing.assert_allclose(boxes[1:], np.concatenate([face.min(1), face.max(1)], 1), atol=1e-4)
    assert (boxes[:, 2:] - boxes[:, :2] > 10).all() and (boxes >= 0).all() and (boxes <= 256).all()
    # The audio: the clip's 16 kHz mono waveform, as long as the video.
    audio, rate, fps = read['audio'], read['sample_rate'], read['fps']
    assert audio.dtype == np.float32 and audio.ndim == 1 and (rate, fps) == (16000.0, 30.0)
    assert abs(len(audio) / rate - frames / fps) < 1 / fps and np.abs(audio).max() > 0.01


def rendered_clip(work):
  """A silent 0.5 s rendered clip `c_0` in the work dir."""
  mp4 = write_video(str(work / 'clips' / 'c_0.mp4'), VideoSpec(duration=0.5, width=128, height=128, audio=False))
  info = ProbeInfo(0.5, 128, 128, 30.0, False, False, 'h264')
  task = ClipTask('c_0', 'c', mp4, MediaFile(mp4, info), 0.0, 0.5, (0, 0, 128, 128))
  return RenderedClip(task, mp4, b'', 15, 30.0, 128)


def test_a_failing_face_swap_rejects_the_clip_and_removes_its_files(tmp_path):
  work = tmp_path / 'work'
  clip = rendered_clip(work)
  mp4 = clip.mp4_uri
  script = tmp_path / 'swap.py'
  script.write_text(FACESWAP_SCRIPT)
  (tmp_path / 'face.png').write_bytes(png(astronaut_frames(1)[0]))
  swap = FaceSwap(f'{sys.executable} {script} --fail --source {{source}} --target {{target}} --output {{output}}',
                  str(tmp_path / 'face.png'), timeout_s=30)
  copies = MakeCopies(str(work), OpenCVStyler(), style_key('opencv'), swap)
  copies.setup()
  (out,) = copies.process(Analysis(clip, {}, {}, {}, []))
  assert isinstance(out, beam.pvalue.TaggedOutput) and out.tag == 'rejects'
  assert (out.value.id, out.value.stage, out.value.reason) == ('c_0', 'megactor', 'faceswap_failed')
  assert 'no face found' in out.value.detail
  assert not os.path.exists(mp4) and not os.path.exists(copies.target('c_0', 'mp4_styled'))


def test_a_styled_copy_is_reused_only_under_the_same_style(tmp_path):
  """The work dir's styled copy is found again by a rerun with the same --style (not restyled), never by one
  with another style or prompt; the swapped copy's name changes with the swap command."""
  work = tmp_path / 'work'
  clip = rendered_clip(work)

  def styled(styler, key):
    copies = MakeCopies(str(work), styler, key)
    copies.setup()
    (out,) = copies.process(Analysis(clip, {}, {}, {}, []))
    return out.clip.files['mp4_styled']

  opencv = styled(OpenCVStyler(), style_key('opencv'))
  made = open(opencv, 'rb').read(), os.stat(opencv).st_mtime_ns
  # Same style: the copy is reused as it is (a differently tuned styler would have made other bytes).
  assert styled(OpenCVStyler(levels=3), style_key('opencv', 'a prompt opencv ignores')) == opencv
  assert (open(opencv, 'rb').read(), os.stat(opencv).st_mtime_ns) == made
  # Another style or prompt: a copy of its own, made again; the first is left as it was.
  sdxl_a, sdxl_b = style_key('sdxl_turbo', 'anime'), style_key('sdxl_turbo', 'oil painting')
  assert len({style_key('opencv'), sdxl_a, sdxl_b}) == 3
  other = styled(OpenCVStyler(levels=3), sdxl_a)
  assert other != opencv and open(other, 'rb').read() != made[0] and open(opencv, 'rb').read() == made[0]
  face = tmp_path / 'face.png'
  face.write_bytes(png(astronaut_frames(1)[0]))
  swaps = [MakeCopies(str(work), OpenCVStyler(), style_key('opencv'), FaceSwap(f'{tool} {{source}} {{target}} '
                                                                               '{output}', str(face)))
           for tool in ('swap_a', 'swap_b')]
  assert swaps[0].target('c_0', 'swapped.mp4') != swaps[1].target('c_0', 'swapped.mp4')


def body(people, face_seen=68):
  """A DWPose frame result of `people` people, the first with `face_seen` face points scoring 0.9."""
  rng = np.random.default_rng(people)
  points = rng.uniform(10, 200, (people, 134, 2)).astype(np.float32)
  scores = np.zeros((people, 134), np.float32)
  scores[:, 24:24 + face_seen] = 0.9
  return WholeBody(points, scores, np.zeros((people, 4), np.float32), True)


def test_every_person_is_pickled_per_frame_and_sigma_flags_frames_of_one_face(tmp_path):
  """The pass's results to the `.pyd` members: a frame with two people keeps both (the handler orders them,
  largest first: tests/test_dwpose.py); Sigma's flags are set only on frames of one person with 60 or more face
  points seen; a frame the model failed on is one person of zeros."""
  results = [body(1), body(2), body(1, face_seen=59), None, body(1)]
  clip = rendered_clip(tmp_path / 'work')
  keypoints = clip_keypoints(stack_results(results))
  sample = {'json': {'num_frames': 5}, **pyd_members(keypoints, clip)}
  points, scores, boxes, flags = keypoint_pickles(sample)
  assert [len(p) for p in points] == [1, 2, 1, 1, 1]
  np.testing.assert_array_equal(points[1], results[1].keypoints)
  np.testing.assert_array_equal(scores[1], results[1].scores)
  assert not points[3].any() and not scores[3].any() and not boxes[3].any()
  assert flags == [True, False, False, False, True]
  face = results[1].keypoints[0, FACE]
  np.testing.assert_allclose(boxes[1], [*face.min(0), *face.max(0)])  # person 0's face
  assert float(sample['fps.str']) == 30.0 and 'audio_frames.pyd' not in sample  # a silent clip
