"""`--recipe=mmvox`: attribute files and inference, drawings, the loader cache, and the layout end to end."""
import glob
import json
import os
import pickle
import re

import cv2
import numpy as np
import pytest

from beam_pipeline.demo import VideoSpec, write_video
from beam_pipeline.recipes.mmvox.attributes import (ATTRIBUTES, AttributeFileError, Labels, from_file, infer_attributes,
                                                    parse_attribute_file)
from beam_pipeline.recipes.mmvox.sketch import pencil_sketch
from beam_pipeline.recipes.mmvox.writer import CACHE_NAME, loader_cache
from model_handlers.mediapipe_face import BLENDSHAPE_NAMES
from tests.helpers import read_jsonl, run_cli

ACTIVE = ('Male', 'Smiling', 'Eyeglasses', 'No_Beard')


def _row(active=ACTIVE, low='-1'):
  return [('1' if name in active else low) for name in ATTRIBUTES]


def test_the_three_attribute_file_formats():
  expected = tuple(int(name in ACTIVE) for name in ATTRIBUTES)
  celeba = f'2\n{" ".join(ATTRIBUTES)}\nspeaker_a {" ".join(_row())}\nspeaker_b {" ".join(_row(()))}\n'
  assert parse_attribute_file(celeba) == {'speaker_a': expected, 'speaker_b': (0,) * 40}
  shuffled = list(reversed(ATTRIBUTES))
  csv = 'image_id,' + ','.join(shuffled) + '\nspeaker_a,' + ','.join(reversed(_row(low='0'))) + '\n'
  assert parse_attribute_file(csv) == {'speaker_a': expected}
  mmvid = 'speaker_a,Male,Smiling,Eyeglasses,No Beard\nspeaker_b\n'
  assert parse_attribute_file(mmvid) == {'speaker_a': expected, 'speaker_b': (0,) * 40}


def test_bad_attribute_files_say_where():
  with pytest.raises(AttributeFileError, match='line 3: 39 values'):
    parse_attribute_file(f'1\n{" ".join(ATTRIBUTES)}\nx {" ".join(_row()[:-1])}\n')
  with pytest.raises(AttributeFileError, match="'Tall' is not a CelebA attribute"):
    parse_attribute_file('x,Male,Tall\n')
  with pytest.raises(AttributeFileError, match="value '2'"):
    parse_attribute_file(f'1\n{" ".join(ATTRIBUTES)}\nx {" ".join(["2"] * 40)}\n')
  with pytest.raises(AttributeFileError, match='missing'):
    parse_attribute_file(f'1\n{" ".join(ATTRIBUTES[:-1])} Male\nx {" ".join(_row())}\n')


def _blendshapes(smile, jaw, frames=20):
  values = np.zeros((frames, len(BLENDSHAPE_NAMES)), np.float32)
  values[:, BLENDSHAPE_NAMES.index('mouthSmileLeft')] = smile
  values[:, BLENDSHAPE_NAMES.index('mouthSmileRight')] = smile
  values[:, BLENDSHAPE_NAMES.index('jawOpen')] = jaw
  values[::5] = np.nan  # frames without a face do not count
  return values


def test_inferred_labels_and_what_the_file_says():
  smiling = infer_attributes(_blendshapes(0.7, 0.2))
  assert smiling.values[ATTRIBUTES.index('Smiling')] == 1
  assert smiling.values[ATTRIBUTES.index('Mouth_Slightly_Open')] == 1
  assert smiling.inferred == ('Smiling', 'Mouth_Slightly_Open') and sum(smiling.known) == 2
  neutral = infer_attributes(_blendshapes(0.05, 0.02), eyeglasses_share=np.array([np.nan, 0.0, 0.0]))
  assert sum(neutral.values) == 0 and neutral.inferred == ('Smiling', 'Mouth_Slightly_Open', 'Eyeglasses')
  glasses = infer_attributes(_blendshapes(0.05, 0.02), eyeglasses_share=np.array([0.02, 0.015, np.nan]))
  assert glasses.values[ATTRIBUTES.index('Eyeglasses')] == 1
  first, second = smiling.text().splitlines()
  assert first.split(',') == [str(v) for v in smiling.values]
  assert 'inferred from the video: Smiling Mouth_Slightly_Open' in second and 'Young' in second
  # MMVID's loader reads `text.rstrip().split(',')` and compares each with '1': the note line leaves the 40
  # values' reading intact (it has no comma and only joins the always-unknown last value).
  fields = smiling.text().rstrip().split(',')
  assert [int(f == '1') for f in fields[:40]] == list(smiling.values) and ',' not in second
  given = from_file(tuple(int(name in ACTIVE) for name in ATTRIBUTES))
  assert given.text() == ','.join(str(int(name in ACTIVE)) for name in ATTRIBUTES) + '\n'
  assert isinstance(given, Labels) and all(given.known)


def test_pencil_sketch_is_dark_strokes_on_white_and_deterministic():
  from skimage import data
  frame = cv2.resize(data.astronaut(), (256, 256), interpolation=cv2.INTER_AREA)
  drawing = pencil_sketch(frame)
  assert drawing.shape == (256, 256) and drawing.dtype == np.uint8
  assert np.median(drawing) > 230 and (drawing < 128).mean() > 0.02  # mostly paper, with strokes
  assert np.array_equal(drawing, pencil_sketch(frame.copy()))
  assert (pencil_sketch(np.full((64, 64, 3), 90, np.uint8)) >= 250).all()  # a flat image has no strokes


def test_loader_cache_is_what_voxdataset_reads():
  cache = loader_cache('/data/mmvoxceleb', {'b_0': (3, 'png'), 'a_0': (2, 'png')})
  assert cache['keys'] == ['a_0', 'b_0']
  assert cache['texts'] == {'a_0': 'txt/a_0.txt', 'b_0': 'txt/b_0.txt'}
  assert cache['videos']['a_0'] == ['video/a_0/0000000.png', 'video/a_0/0000001.png']
  assert cache['lengths'] == {'a_0': 2, 'b_0': 3}


@pytest.fixture(scope='module')
def hd_clip(tmp_path_factory):
  """3 s of a 1080p talking head at 25 fps (75 frames >= --min_frames 64), the face box about 320 px."""
  root = tmp_path_factory.mktemp('mmvox')
  path = str(root / 'speaker.mp4')
  write_video(path, VideoSpec(duration=3.0, fps=25.0, width=1920, height=1080, face_scale=3.0, crf=35, seed=2))
  return path


def _files(root, *parts):
  return sorted(os.path.basename(p) for p in glob.glob(os.path.join(root, *parts, '*')))


def test_mmvox_layout_end_to_end(hd_clip, tmp_path):
  output = str(tmp_path / 'out')
  run_cli('--input', hd_clip, '--output', output, '--recipe', 'mmvox', '--no_report', '--no_progress')
  records = read_jsonl(os.path.join(output, 'index.jsonl'))
  assert [r['id'] for r in records] == ['speaker_0'] and read_jsonl(os.path.join(output, 'rejects.jsonl')) == []
  key, frames = 'speaker_0', records[0]['num_frames']
  assert frames == 75
  names = _files(output, 'video', key)
  assert names == [f'{i:07d}.png' for i in range(frames)]
  for name in (names[0], names[-1]):
    assert cv2.imread(os.path.join(output, 'video', key, name)).shape == (256, 256, 3)
  every_4th = [f'{i:07d}.png' for i in range(0, frames, 4)]
  assert _files(output, 'mask', key) == every_4th
  assert _files(output, 'draw', 'style1', key) == every_4th
  mask = cv2.imread(os.path.join(output, 'mask', key, every_4th[3]))[..., ::-1]
  from transforms.analyzers.parsing import PALETTE, SKIN
  assert mask.shape == (256, 256, 3) and (mask == PALETTE[SKIN]).all(-1).mean() > 0.1  # a face in the mask
  drawing = cv2.imread(os.path.join(output, 'draw', 'style1', key, every_4th[3]), cv2.IMREAD_UNCHANGED)
  assert drawing.shape == (256, 256) and np.median(drawing) > 200
  with open(os.path.join(output, 'txt', key + '.txt')) as handle:
    lines = handle.read().split('\n')
  assert len(lines) == 20 and all(lines)
  with open(os.path.join(output, 'label', key + '.txt')) as handle:
    label, note = handle.read().splitlines()
  assert len(label.split(',')) == 40 and set(label.split(',')) <= {'0', '1'} and note.startswith('# inferred')
  # The astronaut smiles: the one attribute a caption may state.
  assert label.split(',')[ATTRIBUTES.index('Smiling')] == '1' and all('smiling' in line for line in lines)
  with open(os.path.join(output, CACHE_NAME), 'rb') as handle:
    cache = pickle.load(handle)
  assert cache['keys'] == sorted(os.listdir(os.path.join(output, 'video'))) == [key]
  assert cache['lengths'] == {key: frames} and cache['texts'] == {key: f'txt/{key}.txt'}
  assert all(os.path.exists(os.path.join(output, path)) for path in cache['videos'][key])
  assert len(cache['videos'][key]) == len(names)
  published = read_jsonl(os.path.join(output, 'published', key + '.jsonl'))
  assert published[0]['masks'] == published[0]['drawings'] == len(every_4th)
  # The tube's work-dir media (rendered mp4, frame archives) went once it was published.
  assert not [p for p in glob.glob(os.path.join(output, '_work', '**', f'{key}*'), recursive=True)
              if os.path.isfile(p)]
  stats = json.load(open(os.path.join(output, 'stats.json')))
  assert stats['planned'] == 1


def test_mmvox_attribute_file_and_mp4_tubes(hd_clip, tmp_path):
  attributes = tmp_path / 'attributes.csv'
  attributes.write_text('id,' + ','.join(ATTRIBUTES) + '\nspeaker,' + ','.join(_row(low='0')) + '\n')
  output = str(tmp_path / 'out')
  run_cli('--input', hd_clip, '--output', output, '--recipe', 'mmvox', '--attributes', str(attributes),
          '--tube_format', 'mp4', '--no_report', '--no_progress')
  key = 'speaker_0'
  assert os.listdir(os.path.join(output, 'video')) == [key + '.mp4']
  with open(os.path.join(output, 'label', key + '.txt')) as handle:
    assert handle.read() == ','.join(_row(low='0')) + '\n'  # the source's row, nothing inferred
  with open(os.path.join(output, 'txt', key + '.txt')) as handle:
    text = handle.read().lower()
  assert 'eyeglasses' in text and 'smiling' in text and re.search(r'\b(he|man|male)\b', text)
  assert 'beard' not in text  # No_Beard is active
  with open(os.path.join(output, CACHE_NAME), 'rb') as handle:
    cache = pickle.load(handle)
  assert cache['videos'] == {key: [f'video/{key}.mp4']} and cache['lengths'] == {key: 75}
