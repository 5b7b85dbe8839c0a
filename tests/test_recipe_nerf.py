"""The `nerf` recipe: AD-NeRF's per-frame formats (pure helpers) and one subject folder end to end."""
from __future__ import annotations

import csv
import glob
import json
import os
import wave

import cv2
import numpy as np
import pytest

from beam_pipeline.recipes.nerf import frames as nf
from tests.helpers import read_jsonl


def _person(size: int, centre_x: int, radius: int = 8) -> np.ndarray:
  """A label map with a round 'head' (skin) at `centre_x` over a 'torso' (cloth) block."""
  labels = np.zeros((size, size), np.uint8)
  yy, xx = np.mgrid[0:size, 0:size]
  labels[(yy - size // 3) ** 2 + (xx - centre_x) ** 2 <= radius ** 2] = 1
  labels[size // 3 + radius:, max(0, centre_x - radius):centre_x + radius] = 16
  return labels


def test_lms_text_is_adnerf_savetxt_format():
  points = np.arange(136, dtype=np.float64).reshape(68, 2) / 3
  text = nf.lms_text(points).decode()
  lines = text.splitlines()
  assert len(lines) == 68 and lines[1] == '0.666667 1.000000'
  np.testing.assert_allclose(nf.read_lms(text.encode()), points, atol=1e-6)


def test_background_merges_in_any_order_as_one_pass():
  size, rng = 48, np.random.default_rng(0)
  frames = []
  for i, centre in enumerate([10, 14, 18, 22, 26, 30, 34, 38]):
    labels = _person(size, centre)
    frames.append((rng.integers(0, 255, (size, size, 3), dtype=np.uint8), labels, i * 0.04))
  one_pass = nf.Background.empty(size)
  for image, labels, t in frames:
    one_pass.add(image, nf.foreground_distance(labels), t)
  parts = []
  for chunk in (frames[5:], frames[:2], frames[2:5]):  # clips arrive in any order
    part = nf.Background.empty(size)
    for image, labels, t in chunk:
      part.add(image, nf.foreground_distance(labels), t)
    parts.append(part)
  merged = nf.Background.empty(size)
  for part in (parts[1], parts[2], parts[0]):
    merged.merge(part)
  np.testing.assert_array_equal(merged.colour, one_pass.colour)
  np.testing.assert_array_equal(merged.time, one_pass.time)
  # As np.argmax over the stacked distances: the first frame where the pixel is farthest from the person.
  distances = np.stack([nf.foreground_distance(labels) for _, labels, _ in frames])
  first_max = np.argmax(distances, 0)
  expected = np.stack([image for image, _, _ in frames])[first_max, np.arange(size)[:, None], np.arange(size)]
  np.testing.assert_array_equal(one_pass.colour, expected)


def test_background_image_fills_never_free_pixels_from_nearest():
  size = 32
  image = np.full((size, size, 3), 200, np.uint8)
  labels = np.zeros((size, size), np.uint8)
  labels[:, :10] = 1  # the left third is always the person
  image[:, 10:] = (0, 100, 0)
  background = nf.Background.empty(size)
  background.add(image, nf.foreground_distance(labels), 0.0)
  bc = background.image()
  # Columns farther than 5 px from the person keep their colour; nearer ones take the nearest such column's.
  assert (bc[:, 16:] == (0, 100, 0)).all() and (bc[:, :16] == (0, 100, 0)).all()


def test_foreground_distance_is_scipys_exact_transform():
  """OpenCV's transform rounded in float32 gives scipy's exact distances bit for bit (so ties between frames stay
  ties), up to the largest frame that path takes (diagonal under 2048 px), farthest corners included."""
  from scipy import ndimage
  rng = np.random.default_rng(3)
  for size in (48, 512, 1448):
    labels = np.zeros((size, size), np.uint8)
    for _ in range(4):
      cv2.circle(labels, tuple(int(v) for v in rng.integers(0, size, 2)), int(rng.integers(1, size // 8 + 2)), 1, -1)
    labels[rng.random((size, size)) < 0.0005] = 16  # scattered pixels: many different distances
    lone = np.zeros((size, size), np.uint8)
    lone[0, 0] = 1  # distances up to the whole diagonal
    for case in (labels, lone):
      np.testing.assert_array_equal(nf.foreground_distance(case),
                                    ndimage.distance_transform_edt(case == 0).astype(np.float32))


def test_blurring_the_filled_box_is_blurring_the_frame():
  """torso_image blurs only the box of the filled neck: the same pixels as blurring the whole frame, also where the
  box meets the frame's edges."""
  rng = np.random.default_rng(4)
  image = rng.integers(0, 256, (96, 80, 3), dtype=np.uint8)
  full = cv2.GaussianBlur(image, (5, 5), nf.FILL_BLUR_SIGMA)
  for x, y, w, h in ((0, 0, 10, 7), (40, 30, 12, 20), (70, 85, 10, 11), (1, 60, 78, 3)):
    where = np.zeros(image.shape[:2], bool)
    where[y:y + h, x:x + w] = rng.random((h, w)) < 0.7
    blurred = image.copy()
    nf._blur_into(blurred, where)  # pylint: disable=protected-access
    np.testing.assert_array_equal(blurred, np.where(where[..., None], full, image))


def test_gt_and_torso_images():
  size = 512  # AD-NeRF's frame size, where its fill lengths hold as they are
  labels = _person(size, 256, radius=80)  # head rows 90-250, torso below from row 250
  labels[250:266, 232:280] = 14  # a neck between head and torso
  image = np.full((size, size, 3), 90, np.uint8)
  bc = np.full((size, size, 3), 7, np.uint8)
  gt = nf.gt_image(image, labels, bc)
  assert (gt[labels == 0] == 7).all() and (gt[labels > 0] == 90).all()
  torso = nf.torso_image(gt, labels, bc)
  assert torso.shape == (size, size, 4)
  alpha = torso[..., 3]
  assert (alpha[labels == 16] == 255).all() and (alpha[labels == 14] == 255).all()
  # The head is gone, except where the torso's top (8 rows) and the neck's (52 rows) are carried up under it.
  rows, cols = np.mgrid[0:size, 0:size]
  head_away_from_fills = (labels == 1) & ((rows < 195) | ((rows < 240) & ((cols < 232) | (cols >= 280))))
  assert head_away_from_fills.any() and (alpha[head_away_from_fills] == 0).all()
  assert (alpha[200:250, 236:276] == 255).all()  # neck filled upwards, darkening row by row
  assert torso[205, 256, 0] < torso[245, 256, 0] <= 90


def test_split_ids_last_eleventh_or_every_nth_to_val():
  assert nf.split_ids(range(50)) == {'train': list(range(45)), 'val': list(range(45, 50))}  # AD-NeRF's: int(n*10/11)
  split = nf.split_ids(range(50), 11)
  assert split['val'] == [10, 21, 32, 43] and len(split['train']) == 46
  assert nf.split_ids(range(5), 0) == {'train': [0, 1, 2, 3, 4], 'val': []}


def test_camera_pose_inverts_face_pose_and_keeps_projection():
  size = 256
  yaw = np.radians(20)
  face = np.eye(4)
  face[:3, :3] = [[np.cos(yaw), 0, np.sin(yaw)], [0, 1, 0], [-np.sin(yaw), 0, np.cos(yaw)]]
  face[:3, 3] = (3.0, -2.0, -40.0)  # cm, in front of MediaPipe's camera (which looks down -z)
  focal = float(size)
  pose = nf.camera_pose(face, size, focal)
  np.testing.assert_allclose(pose[:3, :3] @ pose[:3, :3].T, np.eye(3), atol=1e-9)
  # The head's origin projects through (focal, centre) where MediaPipe's camera saw it.
  head_in_camera = np.linalg.inv(pose) @ np.array([0, 0, 0, 1.0])
  u = size / 2 + focal * head_in_camera[0] / -head_in_camera[2]
  expected_u = size / 2 + nf.mediapipe_focal(size) * 3.0 / 40.0
  assert u == pytest.approx(expected_u)
  assert pose[2, 3] > 0  # the camera sits in front of the face (+z in the head's frame)


def test_frame_aligned_pcm_keeps_frames_on_their_samples():
  pcm = np.ones(16000, np.float32)
  assert len(nf.frame_aligned_pcm(pcm, 0, 30, 25.0, 16000)) == 19200  # padded
  assert len(nf.frame_aligned_pcm(pcm, 3, 10, 30.0, 16000)) == 5333  # round(13 * 533.3) - round(3 * 533.3)


def test_a_published_subject_is_not_rewritten(tmp_path):
  """A retried bundle finds its subject published and gives the same records; a clip the published subject
  lacks, come alone (its published clips unchanged), is rejected (adding it would renumber published frames).
  The clips' work files go either way."""
  from beam_pipeline.recipes.nerf.writer import NerfClip, WriteSubject
  from transforms.core.elements import ClipTask, MediaFile, ProbeInfo
  from transforms.writers.folders import publish_unit
  media = MediaFile('talker.mp4', ProbeInfo(2.0, 64, 64, 25.0, True, False, 'h264'))
  leftovers = []

  def clip(index: int) -> NerfClip:
    leftovers.append(tmp_path / f'work{index}')
    leftovers[-1].write_bytes(b'media')
    task = ClipTask(f'talker_{index}', 'talker', 'talker.mp4', media, float(index), index + 1.0)
    return NerfClip(task, 25, 25.0, 64, '', '', '', (str(leftovers[-1]),), {})

  output = str(tmp_path / 'out')
  publish_unit(output, 'talker', [{'id': 'talker_0', 'planned_id': 'talker_0', 'num_frames': 25}])
  results = list(WriteSubject(output, 'mel', None, 11).process(('talker', {'clips': [clip(1)], 'bc': [b'']})))
  assert [(r.value.id, r.value.reason) for r in results] == [('talker_1', 'subject_exists')]
  retried = list(WriteSubject(output, 'mel', None, 11).process(('talker', {'clips': [clip(0)], 'bc': [b'']})))
  assert [r['id'] for r in retried] == ['talker_0']
  assert not any(path.exists() for path in leftovers)
  # A clip of an unpublished subject failed staging: the others wait for the run that makes the whole subject.
  held = list(WriteSubject(output, 'mel', None, 11).process(('other', {'clips': [clip(3)], 'bc': [b''],
                                                                       'failed': ['other_2 (internal_error)']})))
  assert [(r.value.id, r.value.reason) for r in held] == [('talker_3', 'subject_incomplete')]
  assert not leftovers[-1].exists() and not (tmp_path / 'out' / 'other').exists()


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope='module')
def nerf_run(tmp_path_factory):
  """Two clips of one generated talking video through `--recipe=nerf` at 128 px, with a TorchScript depth
  model: one subject folder."""
  import torch
  from beam_pipeline.demo import VideoSpec, write_video
  from tests.helpers import run_cli

  class GreyDepth(torch.nn.Module):
    def forward(self, images):
      return images.mean(1, keepdim=True)

  root = tmp_path_factory.mktemp('nerf')
  depth = str(root / 'depth.pt')
  torch.jit.script(GreyDepth()).save(depth)
  video = str(root / 'talker.mp4')
  write_video(video, VideoSpec(duration=2.6, fps=25.0, seed=4))
  manifest = root / 'videos.jsonl'
  manifest.write_text(json.dumps({'id': 'talker', 'url': video, 'clips': [[1.2, 2.4], [0.0, 1.2]]}) + '\n')
  output, work = root / 'out', root / 'work'
  run_cli(f'--input={manifest}', f'--output={output}', f'--work_dir={work}', '--recipe=nerf', '--size=128',
          f'--depth={depth}', '--no_progress')
  return {'folder': str(output / 'talker'), 'output': str(output), 'work': str(work)}


HUBERT_HIDDEN = 32  # the tiny HuBERT's hidden size: the last axis of aud_hu.npy


def _tiny_hubert(folder) -> str:
  """A small random HuBERT saved as facebook/hubert-large-ls960-ft is (HubertForCTC, save_pretrained)."""
  import torch
  import transformers
  torch.manual_seed(0)
  config = transformers.HubertConfig(hidden_size=HUBERT_HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, conv_dim=(16,) * 7, num_conv_pos_embeddings=16,
                                     num_conv_pos_embedding_groups=4, vocab_size=12, feat_extract_norm='layer',
                                     do_stable_layer_norm=True)
  transformers.HubertForCTC(config).save_pretrained(str(folder))
  (folder / 'preprocessor_config.json').write_text(json.dumps({'do_normalize': True, 'sampling_rate': 16000}))
  return str(folder)


def _stripes_parsing(path) -> str:
  """A TorchScript module with BiSeNet's call (normalised (B, 3, 512, 512) -> (logits (B, 19, 512, 512), and
  two auxiliary outputs)) whose logits mark thirds of the frame: background left, skin middle, cloth right."""
  import torch

  class Stripes(torch.nn.Module):
    def forward(self, x: torch.Tensor):
      logits = torch.zeros(x.shape[0], 19, x.shape[2], x.shape[3], dtype=x.dtype, device=x.device)
      third = x.shape[3] // 3
      logits[:, 0, :, :third] = 1.0
      logits[:, 1, :, third:2 * third] = 1.0
      logits[:, 16, :, 2 * third:] = 1.0
      return logits, logits, logits

  torch.jit.script(Stripes()).save(str(path))
  return str(path)


@pytest.fixture(scope='module')
def nerf_weights_run(tmp_path_factory):
  """One clip through `--recipe=nerf` with the user-weights handlers in the pipeline: the three trainers' audio
  features at once (HuBERT and wav2vec2 CTC from tiny save_pretrained folders, DeepSpeech from a tiny frozen graph
  with its tensor names), BiSeNet parsing from a TorchScript export, and the interleaved split asked for."""
  from beam_pipeline.demo import VideoSpec, write_video
  from tests.helpers import run_cli
  from tests.test_audio_features import tiny_deepspeech_graph, tiny_wav2vec
  root = tmp_path_factory.mktemp('nerf_weights')
  hubert = _tiny_hubert(root / 'hubert-tiny')
  wav2vec = tiny_wav2vec(root / 'wav2vec-tiny')
  deepspeech = tiny_deepspeech_graph(root / 'output_graph.pb')
  parsing = _stripes_parsing(root / 'bisenet.torchscript')
  video = str(root / 'speaker.mp4')
  write_video(video, VideoSpec(duration=2.0, fps=25.0, seed=8))
  manifest = root / 'videos.jsonl'
  manifest.write_text(json.dumps({'id': 'speaker', 'url': video}) + '\n')
  output, work = root / 'out', root / 'work'
  run_cli(f'--input={manifest}', f'--output={output}', f'--work_dir={work}', '--recipe=nerf', '--size=128',
          '--audio_features=hubert,wav2vec,deepspeech', f'--hubert_model={hubert}', f'--wav2vec_model={wav2vec}',
          f'--deepspeech_model={deepspeech}', f'--parsing_weights={parsing}', '--val_every=11', '--no_report',
          '--no_progress')
  return {'folder': str(output / 'speaker'), 'output': str(output), 'hubert': hubert, 'wav2vec': wav2vec,
          'deepspeech': deepspeech}


def test_audio_features_come_from_the_users_models(nerf_weights_run):
  from beam_pipeline.recipes.nerf import audio_features as af
  from model_handlers.in_process import SharedModel
  folder = nerf_weights_run['folder']
  (record,) = read_jsonl(os.path.join(nerf_weights_run['output'], 'index.jsonl'))
  n = record['num_frames']
  assert n == 50 and not os.path.exists(os.path.join(folder, 'audio_mel.npy'))
  with wave.open(os.path.join(folder, 'audio.wav')) as audio:
    pcm = np.frombuffer(audio.readframes(audio.getnframes()), '<i2').astype(np.float32) / 32768.0
  for kind, handler in (('hubert', af.HubertHandler), ('wav2vec', af.Wav2VecHandler),
                        ('deepspeech', af.DeepSpeechHandler)):
    model = SharedModel(handler(nerf_weights_run[kind]))
    model.setup()
    for name, expected in af.trainer_files(kind, pcm, n, 25.0, model).items():
      written = np.load(os.path.join(folder, name))
      assert written.dtype == np.float32 and written.shape == expected.shape, name
      np.testing.assert_allclose(written, expected, atol=1e-4, err_msg=name)


# What each trainer's loader opens, read here the way it reads it (its --asr_model picks the audio file and the
# width its AudioNet is built for: 'esperanto' -> aud_eo.npy, 44; 'deepspeech' -> aud_ds.npy, 29; ER-NeRF's
# 'hubert' -> aud_hu.npy, 1024 for hubert-large, here the tiny model's width).
RAD_NERF = {'cpierse/wav2vec2-large-xlsr-53-esperanto': ('aud_eo.npy', 44), 'deepspeech': ('aud_ds.npy', 29)}
ER_NERF = dict(RAD_NERF, hubert=('aud_hu.npy', HUBERT_HIDDEN))


def _split(folder: str, name: str) -> dict:
  with open(os.path.join(folder, f'transforms_{name}.json')) as handle:
    return json.load(handle)


def _radnerf_style_frames(folder: str, asr_models: dict, blink: bool) -> None:
  """RAD-NeRF's / ER-NeRF's NeRFDataset on train and val: H and W from cx, cy; per frame gt_imgs/<id>.jpg,
  torso_imgs/<id>.png (RGBA), ori_imgs/<id>.lms (68 x 2), the audio row min(aud_id, N - 1) of the file the
  --asr_model names, permuted to (channels, steps); ER-NeRF also au.csv's ' AU45_r' at img_id; and bc.jpg."""
  for split in ('train', 'val'):
    meta = _split(folder, split)
    height, width = int(meta['cy']) * 2, int(meta['cx']) * 2
    assert meta['focal_len'] > 0 and meta['frames']
    blinks = _au45(folder) if blink else None
    for asr_model, (name, channels) in asr_models.items():
      features = np.load(os.path.join(folder, name))
      assert features.ndim == 3 and features.dtype == np.float32, (asr_model, features.shape)
      features = features.transpose(0, 2, 1)  # the loaders' permute(0, 2, 1): (N, channels, steps)
      assert features.shape[1] == channels, (asr_model, features.shape)
      for frame in meta['frames']:
        assert features[min(frame['aud_id'], len(features) - 1)].shape[0] == channels
    for frame in meta['frames']:
      image = cv2.imread(os.path.join(folder, 'gt_imgs', f'{frame["img_id"]}.jpg'), cv2.IMREAD_UNCHANGED)
      torso = cv2.imread(os.path.join(folder, 'torso_imgs', f'{frame["img_id"]}.png'), cv2.IMREAD_UNCHANGED)
      assert image.shape == (height, width, 3) and torso.shape == (height, width, 4)
      assert np.loadtxt(os.path.join(folder, 'ori_imgs', f'{frame["img_id"]}.lms')).shape == (68, 2)
      assert np.array(frame['transform_matrix'], np.float32).shape == (4, 4)
      if blink:
        assert 0 <= blinks[frame['img_id']] <= 5
  assert cv2.imread(os.path.join(folder, 'bc.jpg'), cv2.IMREAD_UNCHANGED).shape[:2] == (height, width)


def test_rad_nerf_opens_every_file(nerf_weights_run):
  _radnerf_style_frames(nerf_weights_run['folder'], RAD_NERF, blink=False)


def test_er_nerf_opens_every_file(nerf_weights_run):
  folder = nerf_weights_run['folder']
  _radnerf_style_frames(folder, ER_NERF, blink=True)
  assert np.load(os.path.join(folder, 'aud_hu.npy')).shape == (50, 2, HUBERT_HIDDEN)  # two 20 ms steps a frame


def test_ad_nerf_opens_every_file(nerf_weights_run):
  """AD-NeRF's load_audface_data (HeadNeRF and TorsoNeRF): aud.npy (N, 16, 29) at min(aud_id, N - 1), per frame
  head_imgs/ (HeadNeRF) and com_imgs/ (TorsoNeRF) jpgs and an int32 face_rect, bc.jpg for H and W, focal_len, cx,
  cy; near and far for its config. Asked for with --val_every=11, the split interleaves."""
  folder = nerf_weights_run['folder']
  features = np.load(os.path.join(folder, 'aud.npy'))
  assert features.shape == (50, 16, 29)
  np.testing.assert_array_equal(features, np.load(os.path.join(folder, 'aud_ds.npy')))
  height, width = cv2.imread(os.path.join(folder, 'bc.jpg')).shape[:2]
  for split in ('train', 'val'):
    meta = _split(folder, split)
    assert 0 < meta['near'] < meta['far'] and float(meta['focal_len']) and float(meta['cx']) and float(meta['cy'])
    for frame in meta['frames']:
      assert features[min(frame['aud_id'], len(features) - 1)].astype(np.float32).shape == (16, 29)
      for images in ('head_imgs', 'com_imgs'):
        assert cv2.imread(os.path.join(folder, images, f'{frame["img_id"]}.jpg')).shape == (height, width, 3)
      x, y, w, h = np.array(frame['face_rect'], dtype=np.int32)
      assert 0 <= x and 0 <= y and x + w < width and y + h < height and w > 0 and h > 0
  assert [f['img_id'] for f in _split(folder, 'val')['frames']] == [10, 21, 32, 43]


def test_dataset_reads_hubert_pairs_as_windows(nerf_weights_run):
  from beam_pipeline.recipes.nerf.dataset import NerfSubjectDataset
  with pytest.raises(ValueError, match='3 kinds'):
    NerfSubjectDataset(nerf_weights_run['folder'])
  item = NerfSubjectDataset(nerf_weights_run['folder'], audio_kind='hubert')[5]
  pairs = np.load(os.path.join(nerf_weights_run['folder'], 'aud_hu.npy'))
  assert tuple(item['audio'].shape) == (16, HUBERT_HIDDEN)
  np.testing.assert_array_equal(item['audio'].numpy()[8:10], pairs[5])  # frame 5's own steps at the centre


def test_parsing_comes_from_the_users_bisenet(nerf_weights_run):
  """Every parsing map holds the tiny model's thirds (512 px logits resized to the frame), not the offline
  parsing's face classes."""
  pngs = _files(nerf_weights_run['folder'], 'parsing', 'png')
  assert len(pngs) == 50
  for path in pngs[::7]:
    labels = cv2.imread(path, cv2.IMREAD_UNCHANGED)
    assert set(np.unique(labels)) == {0, 1, 16}, path
    assert (labels[:, :40] == 0).all() and (labels[:, 45:82] == 1).all() and (labels[:, 88:] == 16).all(), path


def _files(folder: str, sub: str, ext: str) -> list:
  return sorted(glob.glob(os.path.join(folder, sub, '*.' + ext)), key=lambda p: int(os.path.basename(p).split('.')[0]))


def _au45(folder: str) -> list:
  """au.csv's ' AU45_r' column, by row, as ER-NeRF reads it (pandas keeps OpenFace's leading spaces in names)."""
  with open(os.path.join(folder, 'au.csv'), newline='') as handle:
    return [float(row[' AU45_r']) for row in csv.DictReader(handle)]


def test_subject_folder_has_every_file(nerf_run):
  folder, n = nerf_run['folder'], 60  # 2 x 1.2 s at 25 fps
  for sub, ext in (('ori_imgs', 'jpg'), ('ori_imgs', 'lms'), ('parsing', 'png'), ('gt_imgs', 'jpg'),
                   ('torso_imgs', 'png')):
    assert [int(os.path.basename(p).split('.')[0]) for p in _files(folder, sub, ext)] == list(range(n)), (sub, ext)
  assert cv2.imread(os.path.join(folder, 'ori_imgs', '0.jpg')).shape == (128, 128, 3)
  assert cv2.imread(os.path.join(folder, 'torso_imgs', '0.png'), cv2.IMREAD_UNCHANGED).shape == (128, 128, 4)
  labels = cv2.imread(os.path.join(folder, 'parsing', '0.png'), cv2.IMREAD_UNCHANGED)
  assert labels.shape == (128, 128) and labels.max() < 19
  assert nf.read_lms(open(os.path.join(folder, 'ori_imgs', '0.lms'), 'rb').read()).shape == (68, 2)
  assert cv2.imread(os.path.join(folder, 'bc.jpg')).shape == (128, 128, 3)
  depths = _files(folder, 'depth', 'npy')
  assert len(depths) == n
  depth, image = np.load(depths[7]), cv2.imread(os.path.join(folder, 'ori_imgs', '7.jpg'))
  assert depth.shape == (128, 128) and depth.dtype == np.float16
  assert abs(float(depth.mean()) - image.mean() / 255) < 0.02  # frame 7's own map (the model: mean grey)
  with wave.open(os.path.join(folder, 'audio.wav')) as audio:
    assert (audio.getframerate(), audio.getnchannels()) == (16000, 1)
    assert audio.getnframes() == n * 16000 // 25
  assert np.load(os.path.join(folder, 'audio_mel.npy')).shape == (n, 16, 80)
  mesh = json.load(open(os.path.join(folder, 'face_mesh.json')))['frames']
  assert len(mesh) == n and all(np.shape(f['landmarks']) == (478, 3) for f in mesh)
  poses = json.load(open(os.path.join(folder, 'face_poses.json')))['frames']
  cameras = json.load(open(os.path.join(folder, 'camera_poses.json')))
  assert len(poses) == len(cameras['frames']) == n and cameras['focal_len'] == 128.0
  for face, camera in zip(poses, cameras['frames']):
    assert np.shape(face['matrix']) == np.shape(camera['transform_matrix']) == (4, 4)
  train = json.load(open(os.path.join(folder, 'transforms_train.json')))
  val = json.load(open(os.path.join(folder, 'transforms_val.json')))
  assert (train['focal_len'], train['cx'], train['cy']) == (128.0, 64.0, 64.0)
  assert sorted(f['img_id'] for f in train['frames'] + val['frames']) == list(range(n))
  assert [f['img_id'] for f in val['frames']] == list(range(54, 60))  # AD-NeRF's split: the last 1/11
  assert all(f['aud_id'] == f['img_id'] and len(f['face_rect']) == 4 for f in train['frames'])
  # AD-NeRF's near and far: the head's mean distance from the camera -0.2 and +0.4.
  depth = -np.mean([np.linalg.inv(f['transform_matrix'])[2, 3] for f in train['frames'] + val['frames']])
  assert 0.2 < depth < 3.0 and (train['near'], train['far']) == (val['near'], val['far'])
  assert (train['near'], train['far']) == pytest.approx((depth - 0.2, depth + 0.4), abs=1e-5)
  for i in (0, 33):  # AD-NeRF's com_imgs (= gt_imgs) and head_imgs (the head over bc.jpg)
    assert open(os.path.join(folder, 'com_imgs', f'{i}.jpg'), 'rb').read() == open(
        os.path.join(folder, 'gt_imgs', f'{i}.jpg'), 'rb').read()
    head = cv2.imread(os.path.join(folder, 'head_imgs', f'{i}.jpg')).astype(np.float64)
    labels = cv2.imread(os.path.join(folder, 'parsing', f'{i}.png'), cv2.IMREAD_UNCHANGED)
    bc = cv2.imread(os.path.join(folder, 'bc.jpg')).astype(np.float64)
    in_head = np.isin(labels, nf.HEAD_CLASSES)
    outside = cv2.erode((~in_head).view(np.uint8), np.ones((5, 5), np.uint8)).view(bool)  # away from jpeg edges
    assert np.abs(head - bc)[outside].mean() < 3 and np.abs(head - bc)[in_head].mean() > 10
  blinks = _au45(folder)
  assert len(blinks) == n and all(0 <= value <= 5 for value in blinks)


def test_clips_numbered_in_time_order_and_accounted(nerf_run):
  records = read_jsonl(os.path.join(nerf_run['output'], 'index.jsonl'))
  assert sorted((r['id'], r['frames']) for r in records) == [('talker_0', [30, 60]), ('talker_1', [0, 30])]
  # The face moves between the clips, yet the subject has one framing (transforms/subject_window.py).
  windows = {(tuple(r['crop']['window']), tuple(r['crop']['padding'])) for r in records}
  assert len(windows) == 1 and {r['crop']['mode'] for r in records} == {'detect'}
  (x, y, w, h), _ = windows.pop()
  assert w == h and x >= 0 and y >= 0 and x + w <= 640 and y + h <= 480
  assert {r['folder'] for r in records} == {'talker'}
  stats = json.load(open(os.path.join(nerf_run['output'], 'stats.json')))
  assert stats['written'] == 2 and stats['balanced']
  assert not glob.glob(os.path.join(nerf_run['work'], 'frames', '*'))  # the clips' archives are gone
  assert not glob.glob(os.path.join(nerf_run['work'], 'clips', '*.mp4'))
  from tests.helpers import leftovers
  assert leftovers(nerf_run['output'], nerf_run['work']) == []  # no beam-temp-* or emptied folder


def test_report_shows_the_subject_with_its_frames(nerf_run):
  """report.html of a folder recipe: the subject, its clips and frames, its files, pictures of its frames."""
  from beam_pipeline import report
  from tests.test_report import IMAGES, in_chromium
  page = os.path.join(nerf_run['output'], report.REPORT)
  shown = in_chromium(page, """
    const table = document.getElementById('folders');
    const folder = document.querySelector('section.folder');
    return {rows: [...table.tBodies[0].rows].map(r => [...r.cells].map(c => c.textContent)),
            heading: folder.querySelector('h3').textContent, files: folder.querySelector('.files').textContent,
            audio: folder.querySelector('audio').getAttribute('src')};""")
  assert shown['rows'] == [['talker', 'nerf', '2', '60']]
  assert shown['heading'] == 'talker 2 clips, 60 frames' and shown['audio'] == 'talker/audio.wav'
  for counted in ('ori_imgs/: 60 jpg, 60 lms', 'parsing/: 60 png', 'gt_imgs/: 60 jpg', 'torso_imgs/: 60 png',
                  'depth/: 60 npy', 'bc.jpg', 'transforms_train.json'):
    assert counted in shown['files'], shown['files']
  assert 'No kept samples.' not in open(page).read()
  images = {src: width for src, _, width in in_chromium(page, IMAGES)}
  sheet = cv2.imread(os.path.join(nerf_run['output'], report.FOLDER_PICTURES, 'talker.png'))
  assert images[f'{report.FOLDER_PICTURES}/talker.png'] == sheet.shape[1] == report.FOLDER_FRAMES * report.TILE
  assert sheet.shape[0] == 5 * report.TILE  # frame + landmarks, parsing, gt, torso; bc.jpg
  assert (sheet[:report.TILE, :report.TILE] != 48).any() and sheet[4 * report.TILE:, report.TILE:].min() == 255


def test_parsing_follows_the_face(nerf_run):
  folder = nerf_run['folder']
  for i in (0, 25, 45):
    labels = cv2.imread(os.path.join(folder, 'parsing', f'{i}.png'), cv2.IMREAD_UNCHANGED)
    lms = nf.read_lms(open(os.path.join(folder, 'ori_imgs', f'{i}.lms'), 'rb').read())
    ys, xs = np.nonzero((labels == 12) | (labels == 13))
    mouth = lms[48:60]
    assert len(ys)
    inside = ((xs >= mouth[:, 0].min() - 2) & (xs <= mouth[:, 0].max() + 2) &
              (ys >= mouth[:, 1].min() - 2) & (ys <= mouth[:, 1].max() + 2))
    assert inside.mean() > 0.95, (i, inside.mean())
    hair_ys, _ = np.nonzero(labels == 17)
    assert len(hair_ys) and np.median(hair_ys) < lms[17:27, 1].mean(), i


def test_background_holds_no_face(nerf_run):
  """At the face's mean position (covered by the face on every frame), bc.jpg holds background filled in from
  nearby, not skin: its colour is far from the skin's, which itself barely changes from frame to frame."""
  folder = nerf_run['folder']
  bc = cv2.imread(os.path.join(folder, 'bc.jpg')).astype(np.float64)
  centres, skins = [], []
  for i in range(0, 60, 5):
    lms = nf.read_lms(open(os.path.join(folder, 'ori_imgs', f'{i}.lms'), 'rb').read())
    centres.append(lms[[30, 36, 45]].mean(0))  # nose tip and eye corners: the middle of the face
    image = cv2.imread(os.path.join(folder, 'ori_imgs', f'{i}.jpg')).astype(np.float64)
    labels = cv2.imread(os.path.join(folder, 'parsing', f'{i}.png'), cv2.IMREAD_UNCHANGED)
    skins.append(np.median(image[labels == 1], 0))
  x, y = np.round(np.mean(centres, 0)).astype(int)
  skin = np.median(skins, 0)
  spread = max(np.linalg.norm(colour - skin) for colour in skins)
  there = bc[y - 2:y + 3, x - 2:x + 3].reshape(-1, 3).mean(0)
  assert np.linalg.norm(there - skin) > max(40.0, 4 * spread), (there, skin, spread)


def test_dataset_loads_a_batch(nerf_run):
  from torch.utils.data import DataLoader
  from beam_pipeline.recipes.nerf.dataset import NerfSubjectDataset
  train = NerfSubjectDataset(nerf_run['folder'], 'train')
  assert len(train) + len(NerfSubjectDataset(nerf_run['folder'], 'val')) == 60
  batch = next(iter(DataLoader(train, batch_size=4, shuffle=False)))
  assert batch['image'].shape == (4, 3, 128, 128) and batch['torso'].shape == (4, 4, 128, 128)
  assert batch['pose'].shape == (4, 4, 4) and batch['audio'].shape == (4, 16, 80)
  assert batch['parsing'].shape == (4, 128, 128) and batch['index'].tolist() == [0, 1, 2, 3]
  assert float(batch['image'].max()) <= 1.0 and train.focal == 128.0


# ----------------------------------------------------------------------------- a subject is one unit

def test_stale_files_of_an_unpublished_attempt_go(tmp_path):
  """What the writer does not write goes before it publishes: frames past the count, `.lms` of frames that have no
  face now, depth maps and audio features this attempt does not make; another attempt's scratch file stays."""
  from transforms.writers.folders import UnitFiles, tree
  folder = tmp_path / 'talker'
  names = ['ori_imgs/0.jpg', 'ori_imgs/0.lms', 'ori_imgs/1.jpg', 'ori_imgs/1.lms', 'ori_imgs/2.jpg', 'ori_imgs/2.lms',
           'gt_imgs/2.jpg', 'torso_imgs/3.png', 'depth/0.npy', 'aud_hu.npy', 'bc.jpg',
           'bc.jpg.0123456789ab.partial']
  for name in names:
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(b'x')
  written = UnitFiles(str(folder))
  kept = ['bc.jpg', 'gt_imgs/2.jpg', 'ori_imgs/0.jpg', 'ori_imgs/0.lms', 'ori_imgs/1.jpg', 'ori_imgs/2.jpg',
          'ori_imgs/2.lms']
  for name in kept:
    written.uri(*name.split('/'))
  written.drop_others(tree(str(folder)))
  left = sorted(str(p.relative_to(folder)) for p in folder.rglob('*') if p.is_file())
  assert left == sorted(kept + ['bc.jpg.0123456789ab.partial'])
  assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ['gt_imgs', 'ori_imgs']  # emptied folders go


def _hdtf_two_windows(root, video: str) -> str:
  """An HDTF input: `talker` with two clips (1.2 s each), each with its own fixed window (crop_wh: x, w, y, h)."""
  annotations = root / 'HDTF_dataset'
  annotations.mkdir()
  (annotations / 'TST_video_url.txt').write_text(f'talker.mp4 {video}\n')
  (annotations / 'TST_annotion_time.txt').write_text('talker.mp4 00:01.2-00:02.4 00:00-00:01.2\n')
  (annotations / 'TST_crop_wh.txt').write_text('talker_0.mp4 160 300 40 300\ntalker_1.mp4 220 300 80 300\n')
  return str(annotations)


def _crash_marker(work, run_id: str, clip_id: str) -> None:
  """What two worker deaths with `clip_id` in flight leave (transforms/crash_guard.py): the run rejects the clip
  `decoder_crash`, a failure a later run retries."""
  death = {'host': 'worker', 'pid': 1, 'alone': True, 'beside': []}
  marker = work / 'markers' / run_id / clip_id
  marker.parent.mkdir(parents=True)
  marker.write_text(json.dumps(dict(death, clip_id=clip_id, beat=0.0, deaths=[death])))


@pytest.fixture(scope='module')
def nerf_reruns(tmp_path_factory):
  """The HDTF input with two fixed windows through `--recipe=nerf` twice: first while talker_0's decoder crashes,
  then (after an attempt that never published left files in the subject folder) with nothing failing."""
  from beam_pipeline.demo import VideoSpec, write_video
  from tests.helpers import run_cli
  root = tmp_path_factory.mktemp('nerf_reruns')
  video = str(root / 'talker.mp4')
  write_video(video, VideoSpec(duration=2.6, fps=25.0, seed=4))
  annotations = _hdtf_two_windows(root, video)
  output, work = root / 'out', root / 'work'
  args = (f'--input={annotations}', f'--output={output}', f'--work_dir={work}', '--recipe=nerf', '--size=128',
          '--no_report', '--no_progress')
  _crash_marker(work, 'crashed', 'talker_0')
  run_cli(*args, '--run_id=crashed')
  first = {'rejects': read_jsonl(str(output / 'rejects.jsonl')), 'published': os.listdir(output / 'published')
           if os.path.isdir(output / 'published') else [], 'folder': sorted(os.listdir(output)),
           'stats': json.load(open(output / 'stats.json'))}
  for stale in ('ori_imgs/60.jpg', 'ori_imgs/61.lms', 'gt_imgs/60.jpg', 'parsing/75.png', 'depth/3.npy'):
    (output / 'talker' / stale).parent.mkdir(parents=True, exist_ok=True)
    (output / 'talker' / stale).write_bytes(b'stale')
  run_cli(*args, '--run_id=after')
  return {'first': first, 'output': str(output), 'folder': str(output / 'talker'), 'args': args,
          'times': os.path.join(annotations, 'TST_annotion_time.txt')}


def test_a_subject_waits_for_a_clip_that_failed_in_passing(nerf_reruns):
  """talker_0 crashed its decoder: talker_1 came through, yet the subject is not written without talker_0 (it
  could never take it later); both wait for the next run, which makes the whole subject."""
  first = nerf_reruns['first']
  assert sorted((r['id'], r['reason']) for r in first['rejects']) == [('talker_0', 'decoder_crash'),
                                                                       ('talker_1', 'subject_incomplete')]
  assert first['published'] == [] and 'talker' not in first['folder'] and first['stats']['balanced']
  records = read_jsonl(os.path.join(nerf_reruns['output'], 'index.jsonl'))
  assert sorted((r['id'], r['frames']) for r in records) == [('talker_0', [30, 60]), ('talker_1', [0, 30])]
  assert read_jsonl(os.path.join(nerf_reruns['output'], 'rejects.jsonl')) == []


def test_two_fixed_windows_give_one_framing(nerf_reruns):
  """HDTF's per-clip windows (160, 40, 300, 300) and (220, 80, 300, 300): both clips get their union (160, 40, 360,
  340), made square about its centre."""
  records = read_jsonl(os.path.join(nerf_reruns['output'], 'index.jsonl'))
  assert {(tuple(r['crop']['window']), tuple(r['crop']['padding'])) for r in records} == {
      ((160, 30, 360, 360), (0, 0, 0, 0))}
  assert {r['crop']['mode'] for r in records} == {'fixed'}


def test_no_stale_file_of_an_unpublished_attempt(nerf_reruns):
  folder = nerf_reruns['folder']
  for sub, ext in (('ori_imgs', 'jpg'), ('ori_imgs', 'lms'), ('parsing', 'png'), ('gt_imgs', 'jpg')):
    assert [int(os.path.basename(p).split('.')[0]) for p in _files(folder, sub, ext)] == list(range(60)), (sub, ext)
  assert not glob.glob(os.path.join(folder, 'depth', '*'))  # the attempt had --depth, this run not


def _subject_state(output: str) -> dict:
  folder = os.path.join(output, 'talker')
  return {'stats': json.load(open(os.path.join(output, 'stats.json'))),
          'index': sorted((r['id'], r['frames'], r['inputs']) for r in read_jsonl(os.path.join(output, 'index.jsonl'))),
          'published': read_jsonl(os.path.join(output, 'published', 'talker.jsonl')),
          'frames': {(sub, ext): [int(os.path.basename(p).split('.')[0]) for p in _files(folder, sub, ext)]
                     for sub, ext in (('ori_imgs', 'jpg'), ('parsing', 'png'), ('gt_imgs', 'jpg'),
                                      ('torso_imgs', 'png'))},
          'split': sorted(f['img_id'] for name in ('train', 'val') for f in _split(folder, name)['frames'])}


@pytest.fixture(scope='module')
def nerf_edited(nerf_reruns):
  """After the runs above: talker_1's range cut to 1.0 s (00:00-00:01.0), then talker_1 gone from the input, run
  with --prune. Each time the subject, whose frames are numbered over both clips, is made again whole."""
  from tests.helpers import run_cli
  before = _subject_state(nerf_reruns['output'])
  with open(nerf_reruns['times'], 'w') as handle:
    handle.write('talker.mp4 00:01.2-00:02.4 00:00-00:01.0\n')
  run_cli(*nerf_reruns['args'], '--run_id=edited')
  edited = _subject_state(nerf_reruns['output'])
  with open(nerf_reruns['times'], 'w') as handle:
    handle.write('talker.mp4 00:01.2-00:02.4\n')
  run_cli(*nerf_reruns['args'], '--prune', '--run_id=pruned')
  return before, edited, _subject_state(nerf_reruns['output'])


def test_an_edited_clip_makes_its_subject_again_whole(nerf_edited):
  before, edited, _ = nerf_edited
  stats = edited['stats']
  assert (stats['written_this_run'], stats['already_written'], stats['retired'], stats['rejected']) == (2, 0, 1, 0)
  assert stats['balanced'] and stats['frames_written'] == 55
  (old_0, old_1), (new_0, new_1) = before['index'], edited['index']
  assert new_0[:2] == ('talker_0', [25, 55]) and new_0[2] == old_0[2]  # re-numbered, its inputs unchanged
  assert new_1[:2] == ('talker_1', [0, 25]) and new_1[2] != old_1[2]
  assert sorted((r['id'], r['inputs']) for r in edited['published']) == [new_0[::2], new_1[::2]]
  assert all(frames == list(range(55)) for frames in edited['frames'].values())  # 55-59 of the old version gone
  assert edited['split'] == list(range(55))


def test_a_pruned_clip_leaves_its_subject_made_again_without_it(nerf_edited):
  _, edited, pruned = nerf_edited
  stats = pruned['stats']
  assert (stats['planned'], stats['written_this_run'], stats['retired'], stats['not_in_manifest']) == (1, 1, 1, 0)
  assert stats['balanced'] and [row[:2] for row in pruned['index']] == [('talker_0', [0, 30])]
  assert pruned['index'][0][2] == edited['index'][0][2]
  assert all(frames == list(range(30)) for frames in pruned['frames'].values())
