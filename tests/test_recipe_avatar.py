"""The `avatar` recipe: HRAvatar's crop geometry, and one subject folder end to end through the CLI."""
from __future__ import annotations

import glob
import json
import os

import cv2
import numpy as np
import pytest

from beam_pipeline.recipes.avatar import face_frames
from beam_pipeline.recipes.avatar.crop import hravatar_box, hravatar_window
from beam_pipeline.recipes.avatar.writer import iris_json, keypoint_json
from tests import flame_synthetic
from tests.helpers import leftovers, read_jsonl
from transforms.lib.geometry import box_in_square


def _face(x0: float, y0: float, x1: float, y1: float) -> np.ndarray:
  """68 points spanning the box (x0, y0)-(x1, y1)."""
  rng = np.random.default_rng(0)
  points = np.stack([rng.uniform(x0, x1, 68), rng.uniform(y0, y1, 68)], 1)
  points[0], points[1] = (x0, y0), (x1, y1)
  return points


def test_box_is_hravatars():
  points = _face(200, 100, 300, 220)  # 100 wide, 120 high
  left, top, side = hravatar_box(points, 2.2)
  assert side == 264  # 2.2 x 2 x the larger half-extent (60)
  assert left + side // 2 == 250  # the middle of the x-extent
  assert top + side // 2 == 124  # 0.8 ymin + 0.2 ymax: nearer the brows than the chin
  assert hravatar_box(_face(0, 0, 101, 33), 1.0)[2] == 100  # even sides (101 -> 100)


def test_window_clamped_not_shifted():
  window, padding = hravatar_window(_face(200, 100, 300, 220), 2.2, 640, 480)
  _, top, _ = hravatar_box(_face(200, 100, 300, 220), 2.2)
  # The box pokes 8 px above the frame: clamped there, not shifted, and padded back to a square around it.
  assert top == -8
  assert window == (118, 0, 264, 256) and padding == (0, 4, 0, 4)


def test_window_clamped_at_frame_edges_keeps_even_sides_and_pads_square():
  points = _face(560, 380, 640, 480)  # a face in the bottom-right corner
  window, padding = hravatar_window(points, 2.2, 640, 480)
  x, y, w, h = window
  assert x + w <= 640 and y + h <= 480 and w % 2 == 0 and h % 2 == 0
  left, top, right, bottom = padding
  assert w + left + right == h + top + bottom  # square once padded
  assert left == right and top == bottom  # padded around its centre, as HRAvatar's squarefiy
  assert hravatar_window(_face(700, 500, 800, 600), 1.0, 640, 480) is None  # misses the frame


def test_face_box_is_relative_to_the_padded_square():
  points = _face(200, 100, 300, 220)
  window, padding = hravatar_window(points, 2.2, 640, 480)
  x0, y0, x1, y1 = box_in_square(points, window, padding)
  side = 264  # the square's origin is (118, -4): the window's corner less the 4 px of padding on top
  assert (x0, x1) == (round(82 / side, 4), round(182 / side, 4))
  assert (y0, y1) == (round(104 / side, 4), round(224 / side, 4))


def test_keypoint_and_iris_json_layout():
  lmk68 = np.arange(2 * 68 * 2, dtype=np.float32).reshape(2, 68, 2)
  iris = np.array([[[10, 11], [20, 21]], [[1, 2], [3, 4]]], np.float32)
  names = ['00000.png', '00001.png']
  keypoints = json.loads(keypoint_json(names, lmk68))
  assert all(np.shape(keypoints[name]) == (68, 2) for name in names)
  # IMAvatar's iris.py order: the image-right iris first, as a flat [x, y, x, y].
  assert json.loads(iris_json(names, iris)) == {'00000.png': [20.0, 21.0, 10.0, 11.0], '00001.png': [3., 4., 1., 2.]}
  lmk68[1, 3, 0] = np.nan  # HRAvatar's fit fails on a null: a frame without a face never gets this far
  with pytest.raises(ValueError, match='no face'):
    keypoint_json(names, lmk68)


def _track(count: int, faceless=(), outside=()):
  """(T, 68, 2) and (T, 2, 2) points drifting right 1 px a frame inside a 100 x 100 picture; NaN on `faceless`
  frames, pushed past the right edge on `outside` frames."""
  lmk68 = np.tile(_face(30, 30, 60, 70), (count, 1, 1)) + np.arange(count)[:, None, None] * [1.0, 0.0]
  iris = lmk68[:, [36, 45]].copy()
  lmk68[list(outside), :, 0] += 60
  lmk68[list(faceless)], iris[list(faceless)] = np.nan, np.nan
  return lmk68, iris


def test_short_faceless_gap_is_filled_from_its_neighbours():
  lmk68, iris = _track(12, faceless=(4, 5, 6))
  chosen = face_frames.select(lmk68, iris, (0, 0, 100, 100), max_gap=3)
  assert chosen.keep.all() and chosen.filled == 3 and chosen.dropped == {} and chosen.joined.all()
  truth = _track(12)[0]
  np.testing.assert_allclose(chosen.lmk68, truth, atol=1e-4)  # the drift is linear: interpolation finds it
  assert np.isfinite(chosen.iris).all() and chosen.runs() == [[0, 11]]


def test_long_gaps_edges_and_a_face_outside_the_picture_are_cut_out():
  lmk68, iris = _track(16, faceless=(0, 5, 6, 7, 8), outside=(12, 13))
  chosen = face_frames.select(lmk68, iris, (0, 0, 100, 100), max_gap=3)
  assert chosen.runs() == [[1, 4], [9, 11], [14, 15]]
  assert chosen.dropped == {'no_face': 5, 'face_outside_crop': 2} and chosen.filled == 0
  assert chosen.lmk68.shape == (9, 68, 2) and np.isfinite(chosen.lmk68).all()
  assert chosen.joined.tolist() == [True, True, True, False, True, True, False, True]
  # A gap next to a frame whose face is outside is not bridged: its neighbour is no anchor.
  lmk68, iris = _track(8, faceless=(3,), outside=(4,))
  assert face_frames.select(lmk68, iris, (0, 0, 100, 100), max_gap=3).runs() == [[0, 2], [5, 7]]
  assert face_frames.max_gap_frames(30.0) == 6 and face_frames.max_gap_frames(25.0) == 5


def _task(clip_id: str):
  from transforms.core.elements import ClipTask, MediaFile, ProbeInfo
  info = ProbeInfo(duration=1.0, width=64, height=64, fps=25.0, has_audio=True, interlaced=False, video_codec='h264')
  return ClipTask(clip_id, 'subject', 'file://clip.mp4', MediaFile('clip.mp4', info), 0.0, 1.0)


def _frames_with_parsing(count: int, person: float = 1.0):
  """Frames whose parsing is background on the left half, skin top right and cloth bottom right."""
  from transforms.frame_analysis import Frame
  rng = np.random.default_rng(7)
  parsing = np.zeros((32, 32), np.uint8)
  parsing[:16, 16:], parsing[16:, 16:] = 1, 16
  return [Frame(k, rng.integers(0, 256, (32, 32, 3), dtype=np.uint8),
                {'parsing': parsing, 'person': np.full((32, 32), person, np.float32)}) for k in range(count)]


def _archive_alphas(uri: str):
  from transforms.core.frame_store import read_frame_archive
  found = []
  for name, data in read_frame_archive(uri):
    rgba = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    found.append((name, rgba[..., 3].astype(np.float32) / 255, rgba[..., 2::-1]))
  return found


@pytest.mark.parametrize('drop_cloth', [False, True])
def test_avatar_frames_alpha_is_person_matte_times_parsing_foreground(tmp_path, drop_cloth):
  from beam_pipeline.recipes.avatar.frames import ARCHIVE, AvatarFrames
  analyzer = AvatarFrames(str(tmp_path), None, drop_cloth)
  analyzer.setup()
  frames = _frames_with_parsing(3, person=0.6)
  clip = analyzer.start(_task('seg'), 3, 32)
  clip.add(frames)
  result = clip.finish(3)
  written = _archive_alphas(result.files[ARCHIVE])
  assert [name for name, _, _ in written] == ['image/00000.png', 'image/00001.png', 'image/00002.png']
  for frame, (_, alpha, rgb) in zip(frames, written):
    assert (alpha[:, :16] == 0).all() and np.allclose(alpha[:16, 16:], 0.6, atol=1 / 255)
    assert np.allclose(alpha[16:, 16:], 0 if drop_cloth else 0.6, atol=1 / 255)
    np.testing.assert_allclose(rgb, np.rint(frame.image * alpha[..., None]), atol=1)  # premultiplied
  np.testing.assert_allclose(result.arrays['alpha_coverage'], 0.6 * (0.25 if drop_cloth else 0.5), atol=1e-2)


def test_padding_is_not_the_person(tmp_path):
  """Where the HRAvatar box ran past the frame, the black padding band gets alpha 0 whatever the matte says."""
  import dataclasses
  from beam_pipeline.recipes.avatar.frames import ARCHIVE, AvatarFrames
  analyzer = AvatarFrames(str(tmp_path), None)
  task = dataclasses.replace(_task('pad'), window=(0, 0, 64, 48), padding=(0, 8, 0, 8))  # 4 px bands at 32 px
  clip = analyzer.start(task, 1, 32)
  frames = _frames_with_parsing(1)
  frames[0].found['parsing'][:] = 1  # the parsing and the matte call every pixel the person
  clip.add(frames)
  (_, alpha, _), = _archive_alphas(clip.finish(1).files[ARCHIVE])
  assert (alpha[:4] == 0).all() and (alpha[28:] == 0).all() and (alpha[4:28] == 1).all()


def test_avatar_frames_carry_the_matting_state_through_the_clip(tmp_path):
  torch = pytest.importorskip('torch')
  from beam_pipeline.recipes.avatar.frames import ARCHIVE, AvatarFrames
  from beam_pipeline.recipes.avatar.matting import MattingModelHandler
  from tests.test_matting import STEP, CountingMatte
  weights = tmp_path / 'rvm_mobilenetv3_fp32.torchscript'
  torch.jit.script(CountingMatte()).save(str(weights))
  analyzer = AvatarFrames(str(tmp_path), MattingModelHandler(str(weights), device='cpu'), drop_cloth=True)
  analyzer.setup()
  frames = _frames_with_parsing(7, person=0.0)  # the segmentation's mask is not used when RVM runs
  clip = analyzer.start(_task('rvm'), 7, 32)
  clip.add(frames[:5])
  clip.add(frames[5:])
  written = _archive_alphas(clip.finish(7).files[ARCHIVE])
  for k, (frame, (_, alpha, _)) in enumerate(zip(frames, written)):
    matte = np.clip(frame.image[..., 0] / 255 * STEP * (k + 1), 0, 1)
    np.testing.assert_allclose(alpha[:16, 16:], matte[:16, 16:], atol=1 / 255 + 1e-6)
    assert (alpha[:, :16] == 0).all() and (alpha[16:] == 0).all()


def test_an_abandoned_pass_leaves_no_archive(tmp_path):
  from beam_pipeline.recipes.avatar.frames import AvatarFrames
  clip = AvatarFrames(str(tmp_path), None).start(_task('gone'), 2, 32)
  clip.add(_frames_with_parsing(2))
  clip.abandon()
  assert not glob.glob(str(tmp_path / 'frames' / '*'))


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope='module')
def avatar_run(tmp_path_factory):
  """Two clips of one generated talking video through `--recipe=avatar` with HRAvatar's defaults (512 px, 30 fps),
  with a FLAME fit (a small synthetic model in the converter's .npz layout, few steps). The head moves little, as
  in the videos HRAvatar crops with one box, until it slides out of the frame to the right at the end of the
  later clip (gone from 2.2 s): those frames leave the box, then have no face. The input is HDTF's, each clip with
  its own fixed window (crop_wh), and a frame past the subject's end waits in its folder, left by an attempt that
  never published."""
  from beam_pipeline.demo import VideoSpec, write_video
  from tests.helpers import run_cli
  root = tmp_path_factory.mktemp('avatar')
  flame = flame_synthetic.write_npz(root / 'flame.npz', *flame_synthetic.build())
  video = str(root / 'talker.mp4')
  write_video(video, VideoSpec(duration=2.4, fps=25.0, seed=5, motion_px=8.0, face_gone=(2.2, 2.6)))
  manifest = root / 'HDTF_dataset'
  manifest.mkdir()
  (manifest / 'TST_video_url.txt').write_text(f'talker.mp4 {video}\n')
  (manifest / 'TST_annotion_time.txt').write_text('talker.mp4 00:01.2-00:02.4 00:00-00:01.2\n')
  (manifest / 'TST_crop_wh.txt').write_text('talker_0.mp4 160 300 40 300\ntalker_1.mp4 220 300 80 300\n')
  output, work = root / 'out', root / 'work'
  (output / 'talker' / 'image').mkdir(parents=True)
  (output / 'talker' / 'image' / '00099.png').write_bytes(b'stale')
  run_cli(f'--input={manifest}', f'--output={output}', f'--work_dir={work}', '--recipe=avatar', '--no_progress',
          f'--flame_model={flame}', '--flame_iterations=40', '--min_face_ratio=0.5')
  records = {r['id']: r for r in read_jsonl(os.path.join(output, 'index.jsonl'))}
  count = 36 + records['talker_0']['avatar_frames']['kept']  # talker_1 (0-1.2 s) keeps its 36 frames
  return {'folder': str(output / 'talker'), 'output': str(output), 'work': str(work), 'records': records,
          'count': count, 'flame': flame}


def test_subject_folder_holds_rgba_frames_keypoints_and_irises(avatar_run):
  folder, count = avatar_run['folder'], avatar_run['count']
  frames = sorted(glob.glob(os.path.join(folder, 'image', '*.png')))
  assert [os.path.basename(p) for p in frames] == [f'{i:05d}.png' for i in range(count)]
  keypoints = json.load(open(os.path.join(folder, 'keypoint.json')))
  irises = json.load(open(os.path.join(folder, 'iris.json')))
  assert sorted(keypoints) == sorted(irises) == [os.path.basename(p) for p in frames]
  assert all(np.shape(points) == (68, 2) for points in keypoints.values())
  assert all(np.shape(centres) == (4,) for centres in irises.values())
  for name in ('00000.png', '00030.png', f'{count - 1:05d}.png'):
    rgba = cv2.imread(os.path.join(folder, 'image', name), cv2.IMREAD_UNCHANGED)
    assert rgba.shape == (512, 512, 4) and rgba.dtype == np.uint8
    alpha = rgba[..., 3].astype(np.float32) / 255
    points = np.array(keypoints[name])
    (x0, y0), (x1, y1) = points.min(0).astype(int), points.max(0).astype(int)
    assert 0 <= x0 < x1 <= 512 and 0 <= y0 < y1 <= 512, name
    assert alpha[y0:y1, x0:x1].mean() > 0.9, name  # the face is in the matte
    for corner in (alpha[:24, :24], alpha[:24, -24:]):  # background above the shoulders
      assert corner.max() == 0, name
    # Premultiplied: no colour where alpha is 0, and colour never brighter than alpha allows.
    assert (rgba[..., :3][alpha == 0] == 0).all()
    assert (rgba[..., :3].max(axis=2) <= rgba[..., 3]).all()
    iris = np.array(irises[name]).reshape(2, 2)
    assert iris[0, 0] > iris[1, 0]  # the image-right iris first
    assert (x0 <= iris[:, 0]).all() and (iris[:, 0] <= x1).all() and (y0 <= iris[:, 1]).all()


def test_one_record_per_clip_and_media_cleaned(avatar_run):
  records, count = list(avatar_run['records'].values()), avatar_run['count']
  assert sorted((r['id'], r['frames']) for r in records) == [('talker_0', ['00036.png', f'{count - 1:05d}.png']),
                                                              ('talker_1', ['00000.png', '00035.png'])]
  assert {r['folder'] for r in records} == {'talker'} and {r['crop']['mode'] for r in records} == {'first_frame'}
  # One HRAvatar box for the subject, from its earliest clip's first frame (transforms/subject_window.py).
  assert len({(tuple(r['crop']['window']), tuple(r['crop']['padding'])) for r in records}) == 1
  assert all('of the first frame of talker_1, the subject\'s earliest clip' in ' '.join(r['notes']) for r in records)
  # HDTF gave each clip its own window: the subject's framing is still the HRAvatar box.
  assert all('(fixed) is not used: one HRAvatar box frames the subject' in ' '.join(r['notes']) for r in records)
  stats = json.load(open(os.path.join(avatar_run['output'], 'stats.json')))
  assert stats['written'] == 2 and stats['balanced']
  assert not glob.glob(os.path.join(avatar_run['work'], 'frames', '*'))
  assert not glob.glob(os.path.join(avatar_run['work'], 'clips', '*.mp4'))
  assert leftovers(avatar_run['output'], avatar_run['work']) == []  # no beam-temp-* or emptied folder


def test_report_shows_the_subject_with_its_frames_and_mattes(avatar_run):
  """report.html of an avatar output, in Chromium: the run's counts, the subject's row, its files, and a picture of
  frames spread over it (RGBA over a checkerboard with keypoints and irises; the alpha below) that loads whole."""
  from beam_pipeline import report
  from tests.test_report import FOLDERS, IMAGES, in_chromium, missing_tiles
  page, count = os.path.join(avatar_run['output'], report.REPORT), avatar_run['count']
  shown = in_chromium(page, FOLDERS)
  assert 'written 2' in shown['totals'] and 'balanced True' in shown['totals']
  assert shown['heading'] == 'Subjects' and shown['note'].startswith('1 subject.')
  assert shown['rows'] == [['talker', 'avatar', '2', str(count)]]
  (folder,) = shown['folders']
  assert folder['title'] == f'talker 2 clips, {count} frames'
  assert folder['files'].startswith(f'image/: {count} png; beside them: ')
  for name in ('flame_params.json', 'iris.json', 'keypoint.json', 'tracked_params.json'):
    assert name in folder['files'], folder['files']
  assert folder['picture'] == [f'{report.FOLDER_PICTURES}/talker.png', report.FOLDER_FRAMES * report.TILE,
                               2 * report.TILE]  # the RGBA frames, their alpha
  sheet = cv2.imread(os.path.join(avatar_run['output'], folder['picture'][0]))
  assert not missing_tiles(sheet)
  alpha = sheet[report.TILE:2 * report.TILE - 16, :report.TILE, 0]  # the first frame's matte: person and background
  assert (alpha > 200).mean() > 0.1 and (alpha < 50).mean() > 0.1
  images = in_chromium(page, IMAGES)
  assert images and all(complete and width > 0 for _, complete, width in images), images


def test_frames_whose_face_leaves_the_box_are_cut_out(avatar_run):
  """The head slides out of the first-frame box at the end of talker_0: those frames are cut (the landmarker
  loses the face as it crosses the box's edge: `no_face`; points outside the picture would be
  `face_outside_crop`, see the unit tests above), counted in the clip's record; the rest of the clip stays."""
  kept, whole = avatar_run['records']['talker_0']['avatar_frames'], avatar_run['records']['talker_1']['avatar_frames']
  assert whole == {'kept': 36, 'runs': [[0, 35]], 'dropped': {}, 'filled_in': 0, 'max_gap_frames': 6}
  assert kept['runs'] == [[0, kept['kept'] - 1]] and 12 <= kept['kept'] <= 30  # the face is in until about 2 s
  assert set(kept['dropped']) <= {'face_outside_crop', 'no_face'} and sum(kept['dropped'].values()) >= 6
  assert kept['kept'] + sum(kept['dropped'].values()) == 36


def test_folder_reads_as_hravatars_tracked_data(avatar_run):
  """The subject folder read the way HRAvatar's TrackedData (scene/data_loader.py) and its optimize.py read it:
  every image has its params under its file name, nothing more; n_shape / n_expr slice the codes."""
  folder, count = avatar_run['folder'], avatar_run['count']
  n_shape, n_expr = 100, 50  # HRAvatar's training defaults
  images = sorted(glob.glob(os.path.join(folder, 'image', '*.png')))
  tracked = json.load(open(os.path.join(folder, 'tracked_params.json')))
  assert tracked['intrinsics'] == [1539.67462, 1508.93280, 261.442628, 253.231895]  # HRAvatar's, at 512
  fx, fy, cx, cy = tracked['intrinsics']
  assert 0.3 < 2 * np.arctan2(cx, fx) < 0.4  # its field of view
  shapecode = np.array(tracked['shapecode'], np.float32)[:, :n_shape]
  assert shapecode.shape == (1, flame_synthetic.SHAPE) and np.isfinite(shapecode).all()
  assert np.shape(tracked['world_mat']) == (4, 4)
  keys = set(tracked) - {'world_mat', 'intrinsics', 'shapecode'}
  assert keys == {os.path.basename(path) for path in images} and len(keys) == count
  for path in images:
    name = os.path.basename(path)
    entry = tracked[name.split('.')[0] if name.split('.')[0] in tracked else name]
    assert 'eyelids' not in entry  # the seed's scripts fit without --with_eyelid
    assert np.shape(entry['translation']) == (1, 3) and np.shape(entry['fullposecode']) == (1, 15)
    assert np.array(entry['expcode'], np.float32)[:, :n_expr].shape == (1, flame_synthetic.EXPRESSION)
    w2c = np.diag([1, -1, -1, 1]).astype(np.float32) @ np.array(entry['world_mat'], np.float32)
    assert w2c[3].tolist() == [0, 0, 0, 1] and np.isfinite(w2c).all()
    assert w2c[2, 3] > 1  # the head in front of the camera, in FLAME x 4 units
  # optimize.py's own inputs: keypoints and irises for every image (no null), each iris pair as (2, 2).
  keypoints = json.load(open(os.path.join(folder, 'keypoint.json')))
  irises = json.load(open(os.path.join(folder, 'iris.json')))
  assert set(keypoints) == set(irises) == keys
  assert all(np.array(irises[k], np.float32).reshape(2, 2).shape == (2, 2) for k in keys)
  params = json.load(open(os.path.join(folder, 'flame_params.json')))
  assert [frame['file_path'] for frame in params['frames']] == ['./image/' + os.path.basename(p) for p in images]
  assert len(params['shape_params']) == flame_synthetic.SHAPE
  errors = json.load(open(os.path.join(folder, 'flame_error.json')))
  assert set(errors['frames']) == keys
  assert errors['mean_after_px'] < errors['mean_before_px']  # the fit moved the model towards the keypoints
  assert not os.path.exists(os.path.join(folder, 'flame_params.npz'))


def test_shape_from_reads_the_subjects_flame_params(avatar_run, tmp_path):
  """--shape_from takes the shape_params of another subject's flame_params.json, as the seed's optimize.py; a
  folder without one is a one-line error naming the flag, before any work."""
  from beam_pipeline.recipes.avatar.writer import SubjectFlameFit
  from model_handlers.weights import WeightsError
  fit = SubjectFlameFit(avatar_run['flame'], None, False, 512, None, None, None, None, avatar_run['folder'])
  params = json.load(open(os.path.join(avatar_run['folder'], 'flame_params.json')))
  assert fit.fixed_shape().tolist() == np.float32(params['shape_params']).tolist()
  with pytest.raises(WeightsError, match='^--shape_from .*flame_params.json'):
    SubjectFlameFit(avatar_run['flame'], None, False, 512, None, None, None, None, str(tmp_path)).fixed_shape()


@pytest.fixture(scope='module')
def matting_run(tmp_path_factory):
  """One clip through `--recipe=avatar` with `--matting_weights`: a TorchScript module with RVM's official call
  whose matte is 1 on the left half of each frame and 0 on the right."""
  torch = pytest.importorskip('torch')
  from typing import List, Optional
  from beam_pipeline.demo import VideoSpec, write_video
  from tests.helpers import run_cli

  class LeftHalfMatte(torch.nn.Module):
    def forward(self, src: torch.Tensor, r1: Optional[torch.Tensor] = None, r2: Optional[torch.Tensor] = None,
                r3: Optional[torch.Tensor] = None, r4: Optional[torch.Tensor] = None,
                downsample_ratio: float = 1.0) -> List[torch.Tensor]:
      pha = torch.zeros_like(src[:, :, :1])
      pha[..., :src.shape[-1] // 2] = 1.0
      state = torch.zeros(src.shape[0], 1, 1, 1, dtype=src.dtype, device=src.device)
      return [src, pha, state, state, state, state]

  root = tmp_path_factory.mktemp('avatar_rvm')
  weights = root / 'rvm_mobilenetv3_fp32.torchscript'
  torch.jit.script(LeftHalfMatte()).save(str(weights))
  video = str(root / 'talker.mp4')
  write_video(video, VideoSpec(duration=1.6, fps=25.0, seed=5, motion_px=8.0))
  manifest = root / 'videos.jsonl'
  manifest.write_text(json.dumps({'id': 'talker', 'url': video}) + '\n')
  output = root / 'out'
  run_cli(f'--input={manifest}', f'--output={output}', f'--work_dir={root / "work"}', '--recipe=avatar',
          '--size=256', f'--matting_weights={weights}', '--no_report', '--no_progress')
  return str(output / 'talker')


def test_alpha_follows_the_users_matting_model(matting_run):
  frames = sorted(glob.glob(os.path.join(matting_run, 'image', '*.png')))
  assert len(frames) == 48  # 1.6 s at HRAvatar's 30 fps
  keypoints = json.load(open(os.path.join(matting_run, 'keypoint.json')))
  for path in frames[::6]:
    rgba = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    assert rgba.shape == (256, 256, 4), path
    alpha = rgba[..., 3]
    assert (alpha[:, 128:] == 0).all() and (rgba[:, 128:, :3] == 0).all(), path  # the matte's right half
    points = np.array(keypoints[os.path.basename(path)])
    (x0, y0), (_, y1) = points.min(0).astype(int), points.max(0).astype(int)
    assert x0 < 120, path  # the face reaches into the left half, where the matte keeps it
    assert alpha[y0:y1, x0:124].mean() > 0.9 * 255, path
