"""`--recipe=mmvox`: attribute files and inference, drawings, the loader cache, and the layout end to end."""
import glob
import json
import os
import pathlib
import pickle
import re

import cv2
import numpy as np
import pytest

from beam_pipeline.demo import VideoSpec, write_video
from beam_pipeline.recipes.mmvox.attributes import (ATTRIBUTES, AttributeFileError, Labels, from_file, infer_attributes,
                                                    parse_attribute_file)
from beam_pipeline.recipes.mmvox.sketch import pencil_sketch
from beam_pipeline.recipes.mmvox.writer import loader_cache, tube_key
from model_handlers.mediapipe_face import BLENDSHAPE_NAMES
from transforms.core.elements import ClipTask
from transforms.sources.manifest import source_from_record
from tests.helpers import REPO, leftovers, read_jsonl, run_cli

ACTIVE = ('Male', 'Smiling', 'Eyeglasses', 'No_Beard')


def _row(active=ACTIVE, low='-1'):
  return [('1' if name in active else low) for name in ATTRIBUTES]


def _bits(active=ACTIVE):
  return ''.join(str(int(name in active)) for name in ATTRIBUTES)


def test_the_three_attribute_file_formats():
  expected = _bits()
  celeba = f'2\n{" ".join(ATTRIBUTES)}\nspeaker_a {" ".join(_row())}\nspeaker_b {" ".join(_row(()))}\n'
  assert parse_attribute_file(celeba) == {'speaker_a': expected, 'speaker_b': '0' * 40}
  shuffled = list(reversed(ATTRIBUTES))
  csv = 'image_id,' + ','.join(shuffled) + '\nspeaker_a,' + ','.join(reversed(_row(low='0'))) + '\n'
  assert parse_attribute_file(csv) == {'speaker_a': expected}
  mmvid = '\ufeffspeaker_a,Male,Smiling,Eyeglasses,No Beard\r\nspeaker_b\n'
  assert parse_attribute_file(mmvid) == {'speaker_a': expected, 'speaker_b': '0' * 40}


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


def _hair(share, lab, frames=20):
  rows = np.full((frames, 4), np.nan, np.float32)
  rows[::4] = [share, *lab]  # parsed frames only
  return rows


def test_inferred_labels_and_their_sidecar():
  smiling = infer_attributes(_blendshapes(0.7, 0.2))
  assert smiling.values[ATTRIBUTES.index('Smiling')] == 1
  assert smiling.values[ATTRIBUTES.index('Mouth_Slightly_Open')] == 1
  assert smiling.inferred == ('Smiling', 'Mouth_Slightly_Open') and sum(smiling.known) == 2
  shares = {'Eyeglasses': np.array([np.nan, 0.02, 0.015]), 'Wearing_Earrings': np.array([0.0, 0.0, np.nan]),
            'Wearing_Hat': np.array([0.05, 0.06, 0.0])}
  seen = infer_attributes(_blendshapes(0.05, 0.02), _hair(0.12, (18.0, 2.0, 3.0)), shares)
  active = {name for name, value in zip(ATTRIBUTES, seen.values) if value}
  assert active == {'Black_Hair', 'Eyeglasses', 'Wearing_Hat'}
  assert set(seen.inferred) == {'Smiling', 'Mouth_Slightly_Open', 'Black_Hair', 'Blond_Hair', 'Brown_Hair',
                                'Gray_Hair', 'Eyeglasses', 'Wearing_Earrings', 'Wearing_Hat'}
  # Hair colour from the median CIELAB of the hair pixels; too little hair showing says nothing.
  for lab, colour in (((62.0, 4.0, 24.0), 'Blond_Hair'), ((40.0, 8.0, 14.0), 'Brown_Hair'),
                      ((66.0, 1.0, 3.0), 'Gray_Hair')):
    labels = infer_attributes(_blendshapes(0.0, 0.0), _hair(0.1, lab))
    assert {name for name, value in zip(ATTRIBUTES, labels.values) if value} == {colour}
  assert 'Black_Hair' not in infer_attributes(_blendshapes(0.0, 0.0), _hair(0.01, (18.0, 2.0, 3.0))).inferred
  # MMVID's one line (make_label.py: no newline); the flags go to the sidecar.
  assert smiling.text() == ','.join(str(v) for v in smiling.values)
  assert smiling.text().rstrip().split(',') == [str(v) for v in smiling.values]
  flags = smiling.flags()
  assert flags['inferred'] == ['Smiling', 'Mouth_Slightly_Open'] and len(flags['unknown']) == 38
  given = from_file(_bits())
  assert given.text() == ','.join(_bits()) and given.flags() == {'inferred': [], 'unknown': []}
  assert isinstance(given, Labels) and all(given.known)


def test_manifest_origin_names_mmvid_keys():
  row = {'id': 'u1', 'url': 'a.mp4', 'speaker': 'id10001', 'video': '1zcIwhmdeo4', 'utterance': '00001.txt'}
  source, = source_from_record(row, 0)
  assert source.origin == ('id10001', '1zcIwhmdeo4', '00001')
  reject, = source_from_record({'id': 'u2', 'url': 'a.mp4', 'speaker': 'id10001'}, 1)
  assert reject.reason == 'bad_manifest_row' and "'video', 'utterance'" in reject.detail
  task = _tube_task('u1_0_f2000', 'u1', 'u1_0', source.origin)
  assert tube_key(task) == 'id10001#1zcIwhmdeo4#00001.txt#000_f2000.mp4'
  assert tube_key(_tube_task('u1_0', 'u1', '', source.origin)) == 'id10001#1zcIwhmdeo4#00001.txt#000.mp4'
  assert tube_key(_tube_task('talk_1_f40', 'talk', 'talk_1')) == 'talk#001#f40'
  assert tube_key(_tube_task('talk_0', 'talk', '')) == 'talk#000#000'


def _tube_task(clip_id, source_id, planned_id, origin=()):
  return ClipTask(clip_id, source_id, 'a.mp4', None, 0.0, 1.0, planned_id=planned_id, origin=origin)


def test_pencil_sketch_is_dark_strokes_on_white_and_deterministic():
  from skimage import data
  frame = cv2.resize(data.astronaut(), (256, 256), interpolation=cv2.INTER_AREA)
  drawing = pencil_sketch(frame)
  assert drawing.shape == (256, 256) and drawing.dtype == np.uint8
  assert np.median(drawing) > 230 and (drawing < 128).mean() > 0.02  # mostly paper, with strokes
  assert np.array_equal(drawing, pencil_sketch(frame.copy()))
  assert (pencil_sketch(np.full((64, 64, 3), 90, np.uint8)) >= 250).all()  # a flat image has no strokes


def test_loader_cache_is_what_voxdataset_reads():
  cache = loader_cache('/data/mmvoxceleb', {'b#0#000': (3, 'png', ()), 'a#0#000': (2, 'png', (20,))})
  assert cache['keys'] == ['a#0#000', 'b#0#000']
  assert cache['texts'] == {'a#0#000': 'txt/a#0#000.txt', 'b#0#000': 'txt/b#0#000.txt'}
  assert cache['videos']['a#0#000'] == ['video/a#0#000/0000000.png', 'video/a#0#000/0000001.png']
  assert cache['lengths'] == {'a#0#000': 2, 'b#0#000': 3}


@pytest.fixture(scope='module')
def hd_clip(tmp_path_factory):
  """3 s of a 1080p talking head at 25 fps with a hard cut at 1.5 s (two tubes of 38 and 37 frames), the face
  box about 320 px."""
  root = tmp_path_factory.mktemp('mmvox')
  path = str(root / 'speaker.mp4')
  write_video(path, VideoSpec(duration=3.0, fps=25.0, width=1920, height=1080, face_scale=3.0, crf=35, seed=2,
                              cut_at=1.5))
  return path


def _manifest(path, rows):
  path.write_text(''.join(json.dumps(row) + '\n' for row in rows))
  return str(path)


def _files(root, *parts):
  return sorted(os.path.basename(p) for p in glob.glob(os.path.join(root, *parts, '*')))


def read_like_voxdataset(folder):
  """Every file MMVID's VoxDataset (mmvid_pytorch/loader_ext.py) opens for `folder`, read as it reads them:
  the cache and the attribute index beside the folder, then per key the label (`rstrip().split(',')`), the
  captions (non-empty lines), every frame, and the mask, drawing and video folders its modes list and open
  (another tube of the speaker's group for the image+mask / draw+mask modes)."""
  from PIL import Image
  path = pathlib.Path(folder)
  with open(path.parent / (path.name + '_local.pkl'), 'rb') as handle:
    cache = pickle.load(handle)
  with open(path.parent / (path.name + '_attr_dict_vox2.pkl'), 'rb') as handle:
    index = pickle.load(handle)
  tubes = {}
  for key in cache['keys']:
    label = (path / cache['texts'][key].replace('txt/', 'label/')).read_text().rstrip().split(',')
    captions = [line for line in (path / cache['texts'][key]).read_text().split('\n') if line]
    sizes = {Image.open(path / frame).size for frame in cache['videos'][key]}
    group = index['pid']['#'.join(key.split('#')[:2])]
    shown = {}
    for folder_name, tube in (('mask', key), ('draw/style1', key), ('video', group[-1]), ('mask', group[-1])):
      names = os.listdir(path / folder_name / tube)
      shown[folder_name] = Image.open(path / folder_name / tube / names[0]).size
    tubes[key] = {'label': label, 'captions': captions, 'sizes': sizes, 'length': cache['lengths'][key],
                  'frames': len(cache['videos'][key]), 'group': group, 'shown': shown}
  return tubes, index


@pytest.fixture(scope='module')
def mmvox_run(hd_clip, tmp_path_factory):
  """The HD clip as one VoxCeleb utterance through `--recipe=mmvox` (png tubes), with its report."""
  root = tmp_path_factory.mktemp('mmvox_run')
  speaker = {'speaker': 'id10001', 'video': '1zcIwhmdeo4', 'utterance': '00001'}
  manifest = _manifest(root / 'vox.jsonl', [dict(id='utt1', url=hd_clip, **speaker)])
  output = str(root / 'mmvoxceleb')
  run_cli('--input', manifest, '--output', output, '--recipe', 'mmvox', '--min_frames', '25', '--no_progress')
  return output


TUBE_KEYS = ['id10001#1zcIwhmdeo4#00001.txt#000_f0.mp4', 'id10001#1zcIwhmdeo4#00001.txt#000_f1520.mp4']


def test_mmvox_layout_end_to_end(mmvox_run):
  output = mmvox_run
  records = read_jsonl(os.path.join(output, 'index.jsonl'))
  keys = TUBE_KEYS
  assert sorted(r['folder'] for r in records) == keys and read_jsonl(os.path.join(output, 'rejects.jsonl')) == []
  assert sorted(r['id'] for r in records) == ['utt1_0_f0', 'utt1_0_f1520']
  tubes, index = read_like_voxdataset(output)
  assert sorted(tubes) == keys == sorted(os.listdir(os.path.join(output, 'video')))
  # MMVID's speaker grouping: both tubes of the speaker's video in one group, so the image+mask modes draw
  # the appearance frame from the other tube.
  assert index['pid'] == {'id10001#1zcIwhmdeo4': keys}
  key = keys[0]
  tube = tubes[key]
  frames = tube['length']
  assert tube['frames'] == frames == 38 and tube['sizes'] == {(256, 256)}
  assert tube['shown'] == {'mask': (256, 256), 'draw/style1': (256, 256), 'video': (256, 256)}
  every_4th = [f'{i:07d}.png' for i in range(0, frames, 4)]
  assert _files(output, 'mask', key) == every_4th and _files(output, 'draw', 'style1', key) == every_4th
  mask = cv2.imread(os.path.join(output, 'mask', key, every_4th[3]))[..., ::-1]
  from transforms.analyzers.parsing import PALETTE, SKIN
  assert (mask == PALETTE[SKIN]).all(-1).mean() > 0.1  # a face in the mask
  drawing = cv2.imread(os.path.join(output, 'draw', 'style1', key, every_4th[3]), cv2.IMREAD_UNCHANGED)
  assert drawing.shape == (256, 256) and np.median(drawing) > 200
  # One label line of 40 values; which were inferred goes beside it. The astronaut smiles, with brown hair.
  assert len(tube['label']) == 40 and set(tube['label']) <= {'0', '1'}
  assert open(os.path.join(output, 'label', key + '.txt')).read().count('\n') == 0
  said = {name for name, value in zip(ATTRIBUTES, tube['label']) if value == '1'}
  assert said == {'Smiling', 'Brown_Hair'} and index['cat1'][ATTRIBUTES.index('Smiling')] == keys
  flags = json.load(open(os.path.join(output, 'label', key + '.json')))
  assert {'Smiling', 'Brown_Hair', 'Black_Hair'} <= set(flags['inferred']) and 'Male' in flags['unknown']
  assert len(tube['captions']) == 20 and all('smiling' in line and 'brown hair' in line for line in tube['captions'])
  # The tube's work-dir media (rendered mp4, frame archives) went once it was published.
  assert not [p for p in glob.glob(os.path.join(output, '_work', '**', 'utt1*'), recursive=True) if os.path.isfile(p)]
  assert json.load(open(os.path.join(output, 'stats.json')))['planned'] == 1
  assert leftovers(output) == []  # no beam-temp-* or emptied folder (the work dir inside)


def test_report_shows_each_tube_with_its_frames_masks_and_drawings(mmvox_run):
  """report.html of an mmvox output, in Chromium: the run's counts, one table row per tube, and per tube its
  files, its first caption and a picture of its frames, masks and drawings (each loads; no tile missing)."""
  from beam_pipeline import report
  from tests.test_report import FOLDERS, IMAGES, in_chromium, missing_tiles
  output = mmvox_run
  page = os.path.join(output, report.REPORT)
  stats = json.load(open(os.path.join(output, 'stats.json')))
  shown = in_chromium(page, FOLDERS)
  assert f"written {stats['written']}" in shown['totals'] and 'balanced True' in shown['totals']
  lengths = {key: len(_files(output, 'video', key)) for key in TUBE_KEYS}
  assert lengths == {TUBE_KEYS[0]: 38, TUBE_KEYS[1]: 37}
  assert shown['heading'] == 'Tubes' and shown['note'].startswith('2 tubes.')
  assert shown['rows'] == [[key, 'mmvox', '1', str(lengths[key])] for key in TUBE_KEYS]
  for key, folder in zip(TUBE_KEYS, sorted(shown['folders'], key=lambda f: f['name'])):
    every_4th = -(-lengths[key] // 4)
    assert folder['title'] == f'{key} 1 clip, {lengths[key]} frames'
    assert folder['files'] == (f'video/{key}/: {lengths[key]} png; mask/{key}/: {every_4th} png; '
                               f'draw/style1/{key}/: {every_4th} png')
    with open(os.path.join(output, 'txt', key + '.txt')) as handle:
      assert folder['caption'] == 'first caption (txt/): ' + handle.read().splitlines()[0]
    assert folder['picture'][1:] == [report.FOLDER_FRAMES * report.TILE, 3 * report.TILE]  # frame, mask, drawing
    sheet = cv2.imread(os.path.join(output, folder['picture'][0]))
    assert not missing_tiles(sheet), folder['picture'][0]
  images = in_chromium(page, IMAGES)
  assert images and all(complete and width > 0 for _, complete, width in images), images


def test_mmvox_attribute_file_mp4_tubes_and_real_footage(hd_clip, tmp_path):
  """--attributes labels the generated speaker (read by the workers); a real clip without a row gets its
  hair colour said. The report plays each mp4 tube ('#' in its name)."""
  real = os.path.join(os.path.dirname(REPO), 'shared', 'real_clips', 'talk_glasses_512.mp4')
  manifest = _manifest(tmp_path / 'in.jsonl', [{'id': 'speaker', 'url': hd_clip}, {'id': 'glasses', 'url': real}])
  attributes = tmp_path / 'attributes.csv'
  attributes.write_text('id,' + ','.join(ATTRIBUTES) + '\nspeaker,' + ','.join(_row(low='0')) + '\n')
  output = str(tmp_path / 'out')
  run_cli('--input', manifest, '--output', output, '--recipe', 'mmvox', '--attributes', str(attributes),
          '--tube_format', 'mp4', '--min_frames', '25', '--min_tube_px', '100', '--no_progress')
  keys = ['glasses#000#000', 'speaker#000#f0', 'speaker#000#f1520']
  assert sorted(os.listdir(os.path.join(output, 'video'))) == [key + '.mp4' for key in keys]
  with open(os.path.join(output, 'label', keys[1] + '.txt')) as handle:
    assert handle.read() == ','.join(_row(low='0'))  # the source's row, nothing inferred
  assert json.load(open(os.path.join(output, 'label', keys[1] + '.json'))) == {'inferred': [], 'unknown': []}
  with open(os.path.join(output, 'txt', keys[1] + '.txt')) as handle:
    text = handle.read().lower()
  assert 'eyeglasses' in text and 'smiling' in text and re.search(r'\b(he|man|male)\b', text)
  assert 'beard' not in text  # No_Beard is active
  with open(os.path.join(output, 'txt', keys[0] + '.txt')) as handle:
    assert all('black hair' in line for line in handle.read().split('\n'))  # she has; nothing else is known
  with open(output + '_local.pkl', 'rb') as handle:
    cache = pickle.load(handle)
  assert cache['videos'][keys[1]] == [f'video/{keys[1]}.mp4'] and cache['lengths'][keys[1]] == 38
  from tests.test_report import VIDEOS, in_chromium
  videos = in_chromium(os.path.join(output, 'report.html'), VIDEOS)
  assert sorted(src for src, *_ in videos) == [f'video/{key.replace("#", "%23")}.mp4' for key in keys]
  assert all(ready >= 1 and width == 256 and duration > 1 and error is None
             for _, ready, width, duration, error in videos), videos


def test_attributes_stay_out_of_the_job_graph(tmp_path):
  """100 k attribute rows are read by the workers: the job graph grows by the read, not by the table."""
  import apache_beam as beam
  from beam_pipeline.recipes.mmvox import read_attributes
  from beam_pipeline.recipes.mmvox.writer import WriteLayout
  path = tmp_path / 'attributes.txt'
  path.write_text(''.join(f'id{i:05d}#v{i}#00001.txt#000.mp4,{ATTRIBUTES[i % 40]},Male\n' for i in range(100_000)))

  def graph_bytes(attributes):
    pipeline = beam.Pipeline()
    _ = pipeline | beam.Create([]) | WriteLayout(str(tmp_path / 'out'), 'png', attributes, False)
    return len(pipeline.to_runner_api().SerializeToString())

  assert graph_bytes(read_attributes(str(path))) - graph_bytes(None) < 20_000  # pickled, the table was 0.4-1.3 MB
  with open(path, 'a') as handle:
    handle.write('late,Male,Tall\n')
  with pytest.raises(SystemExit, match="line 100001: 'Tall' is not a CelebA attribute"):  # checked before the run
    read_attributes(str(path))
