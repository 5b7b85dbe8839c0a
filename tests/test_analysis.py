"""Per-frame analysis and quality filters on generated clips whose truth is known."""
import json
import os
import re

import apache_beam as beam
import cv2
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_pipeline.demo import VideoSpec, _sprite, write_video
from model_handlers.in_process import ModelError
from model_handlers.mediapipe_face import (BLENDSHAPE_NAMES, FaceDetectorModelHandler, FaceLandmarkerModelHandler,
                                           _mp_image)
from tests.helpers import REPO
from transforms.core.elements import ClipTask, MediaFile
from transforms.filters import ScoreAndFilter, Thresholds, failures
from transforms.frame_analysis import FaceLandmarks
from transforms.lib import features
from transforms.lib.probe import probe
from transforms.render import RenderClips
from transforms.track import DetectAndTrack

SPEECH = dict(duration=4.0, fps=25.0, irregular_speech=True)
CLIPS = {
    'sync': VideoSpec(**SPEECH),
    'late': VideoSpec(**SPEECH, sync_offset_frames=10),  # the audio comes 10 frames after the mouth
    'dub': VideoSpec(**SPEECH, sync_offset_frames=50),  # unrelated within the +-15 frame search
    'turn': VideoSpec(**SPEECH, yaw_deg=50, seed=2),  # head turns to ~28 degrees of measured yaw
    'blur': VideoSpec(**SPEECH, blur_sigma=4.0, seed=3),
    'small': VideoSpec(**SPEECH, face_scale=0.5, motion_px=10, seed=4),  # a ~55 px face
    'away': VideoSpec(duration=5.0, fps=25.0, irregular_speech=True, face_gone=(2.0, 3.0)),  # fixed window
}
# What the default filters with --max_sync_lag 3 --min_sync_corr 0.5 do with each clip (unrelated audio
# still correlates up to ~0.4 with the mouth at its best lag over a 4 s clip, in sync is ~0.75).
DEFAULT_OUTCOME = [('blur_0', 'blurry'), ('small_0', 'face_too_small'), ('away_0', 'face_ratio_low'),
                   ('dub_0', 'av_sync_low'), ('late_0', 'av_sync_offset')]


def _to_json(analysis):
  return json.dumps({'id': analysis.clip.task.clip_id, 'scores': analysis.scores,
                     'failed': [failed[0] for failed in analysis.failed], 'frames': analysis.clip.num_frames,
                     'iris': analysis.arrays['iris'].tolist(), 'lmk68': analysis.arrays['lmk68'][::10].tolist()})


@pytest.fixture(scope='module')
def analysed(tmp_path_factory):
  """One pipeline over every clip: track, render with the landmarks in the same pass, then ScoreAndFilter
  twice: --score_only (every score, written to a file) and the defaults with the sync filter tightened
  (checked with assert_that)."""
  root = tmp_path_factory.mktemp('analysis')
  tasks = []
  for name, spec in CLIPS.items():
    path = str(root / f'{name}.mp4')
    write_video(path, spec)
    window = (140, 40, 360, 360) if name == 'away' else None
    tasks.append(ClipTask(f'{name}_0', name, path, MediaFile(path, probe(path)), 0.0, spec.duration, window,
                          'fixed' if window else 'auto'))
  pipeline = TestPipeline()
  given = pipeline | beam.Create(tasks)
  detected = (given
              | 'NoWindow' >> beam.Filter(lambda t: t.window is None)
              | 'Track' >> DetectAndTrack(FaceDetectorModelHandler(max_faces=4), 1.8, 5.0, 0.4, 'largest', 0.48, 1.0))
  landmarks = FaceLandmarks(FaceLandmarkerModelHandler(max_faces=4))
  joined = ((given | 'Fixed' >> beam.Filter(lambda t: t.window is not None), detected['tasks'])
            | beam.Flatten()
            | 'Render' >> beam.ParDo(RenderClips(str(root / 'work'), 512, 25.0, 23, 'ultrafast',
                                                 analyzers=[landmarks])))
  scored = joined | 'ScoreOnly' >> beam.ParDo(ScoreAndFilter(Thresholds(score_only=True))).with_outputs(
      'rejects', main='kept')
  _ = scored.kept | beam.Map(_to_json) | beam.io.WriteToText(str(root / 'scores'), shard_name_template='')
  tightened = Thresholds(max_sync_lag=3, min_sync_corr=0.5)
  filtered = joined | 'Defaults' >> beam.ParDo(ScoreAndFilter(tightened)).with_outputs('rejects', main='kept')
  assert_that(filtered.kept | 'KeptIds' >> beam.Map(lambda a: a.clip.task.clip_id),
              equal_to(['sync_0', 'turn_0']), label='kept')
  assert_that(filtered.rejects | 'Reasons' >> beam.Map(lambda r: (r.id, r.reason)), equal_to(DEFAULT_OUTCOME),
              label='rejected')
  assert_that(scored.rejects, equal_to([]), label='score_only_rejects_nothing')
  pipeline.run()
  with open(root / 'scores') as handle:
    return {r['id'][:-2]: r for r in map(json.loads, handle)}


def _fails(record, **thresholds):
  return [failed[0] for failed in failures(record['scores'], Thresholds(**thresholds))]


def test_score_only_writes_every_clip_with_its_failed_filters(analysed):
  assert sorted(analysed) == sorted(CLIPS)
  for name, record in analysed.items():
    assert set(record['scores']) == {'source_face_px', 'face_ratio', 'source_resolution', 'duration', 'sharpness',
                                     'max_abs_yaw', 'max_abs_pitch', 'eye_motion_var', 'sync_corr',
                                     'sync_lag_frames', 'face_score'}
  assert analysed['blur']['failed'] == ['blurry'] and analysed['sync']['failed'] == []


def test_sync_score_and_lag_in_step_and_out_of_step(analysed):
  sync, late, dub = (analysed[k]['scores'] for k in ('sync', 'late', 'dub'))
  assert sync['sync_corr'] > 0.6 and abs(sync['sync_lag_frames']) <= 1
  assert late['sync_corr'] > 0.6 and abs(late['sync_lag_frames'] - 10) <= 1
  assert dub['sync_corr'] < 0.45
  assert _fails(analysed['sync'], max_sync_lag=3) == [] and _fails(analysed['late'], max_sync_lag=3) == [
      'av_sync_offset']
  assert _fails(analysed['dub'], min_sync_corr=0.5) == ['av_sync_low']
  assert _fails(analysed['late'], min_sync_corr=0.5) == []


def test_head_pose_limits(analysed):
  turn, sync = analysed['turn']['scores'], analysed['sync']['scores']
  assert turn['max_abs_yaw'] > 20 > 8 > sync['max_abs_yaw']
  assert _fails(analysed['turn'], max_yaw=20) == ['yaw_too_large'] and _fails(analysed['sync'], max_yaw=20) == []
  assert _fails(analysed['turn']) == []  # default --max_yaw 45
  assert 0 < sync['max_abs_pitch'] < 30  # the portrait looks slightly down
  assert _fails(analysed['sync'], max_pitch=sync['max_abs_pitch'] - 1) == ['pitch_too_large']


def test_blur_size_ratio_resolution_and_duration_filters(analysed):
  sync, blur = analysed['sync']['scores'], analysed['blur']['scores']
  assert blur['sharpness'] < 25 < 100 < sync['sharpness']
  assert analysed['small']['scores']['source_face_px'] < 64 < sync['source_face_px']
  assert _fails(analysed['small'])[0] == 'face_too_small'  # (upscaled that much it is blurry too)
  assert 'face_too_small' not in _fails(analysed['small'], min_face_px=40)
  assert 0.5 < analysed['away']['scores']['face_ratio'] < 0.8 and sync['face_ratio'] == 1.0
  assert _fails(analysed['sync'], min_resolution=720) == ['low_resolution'] and sync['source_resolution'] == 480
  assert _fails(analysed['sync'], min_duration=4.5) == ['too_short'] and sync['duration'] == 4.0


def test_eye_motion_rule_off_by_default_rejects_still_eyes(analysed):
  still = analysed['sync']
  assert still['scores']['eye_motion_var'] < 2.0
  assert _fails(still) == [] and _fails(still, eye_motion=True) == ['eye_motion_low']


@pytest.fixture(scope='module')
def portrait_face():
  handler = FaceLandmarkerModelHandler()
  pool = handler.load_model()
  image = np.ascontiguousarray(_sprite(1.0))
  raw = pool.map(lambda task, img: task.detect(_mp_image(img)), [image], handler._failed)[0]
  return raw, pool.map(handler._infer, [image], handler._failed)[0]  # pylint: disable=protected-access


def test_eye_motion_rule_keeps_moving_eyes(portrait_face):
  _, face = portrait_face
  still = np.repeat(face.landmarks[:1], 320, axis=0)
  moving = still.copy()
  shift = 4 * np.sin(np.arange(320) / 7.0)  # the irises look left and right, +-4 px in a ~20 px eye
  for iris in range(468, 478):
    moving[:, iris, 0] += shift
  open_eyes = np.zeros((320, len(BLENDSHAPE_NAMES)), np.float32)
  assert features.eye_motion_variance(still, open_eyes) < 1e-6
  assert features.eye_motion_variance(moving, open_eyes) > 50


def test_eye_motion_leaves_blinks_out(portrait_face):
  """A blink runs the iris's place between the closing lids to +-90 degrees: still eyes that blink every
  second read as moving eyes unless the blink frames (the eyeBlink blendshapes) are left out."""
  _, face = portrait_face
  blinking = np.repeat(face.landmarks[:1], 320, axis=0)
  closed = np.zeros(320, bool)
  closed[np.arange(320) % 30 < 3] = True  # a 3-frame blink every second at 30 fps
  for upper, lower in ((159, 145), (386, 374)):
    blinking[closed, upper, 1] = blinking[closed, lower, 1]
  blendshapes = np.zeros((320, len(BLENDSHAPE_NAMES)), np.float32)
  assert BLENDSHAPE_NAMES.index('eyeBlinkLeft') in features.EYE_BLINK
  assert BLENDSHAPE_NAMES.index('eyeBlinkRight') in features.EYE_BLINK
  assert features.eye_motion_variance(blinking, blendshapes) > 100  # the blinks, unmarked
  blendshapes[closed, BLENDSHAPE_NAMES.index('eyeBlinkLeft')] = 0.8
  assert features.eye_motion_variance(blinking, blendshapes) < 1e-6


def test_blendshape_names_iris_and_68_points(portrait_face, analysed):
  raw, face = portrait_face
  assert tuple(c.category_name for c in raw.face_blendshapes[0]) == BLENDSHAPE_NAMES
  packed = features.FaceArrays(1)
  packed.put(0, face, 0)
  arrays = packed.arrays(1)
  p = arrays['lmk68'][0]
  assert arrays['iris'].shape == (1, 2, 2) and p.shape == (68, 2)
  assert p[8, 1] == p[:17, 1].max()  # chin is the lowest jaw point
  assert p[0, 0] < p[8, 0] < p[16, 0] and p[36, 0] < p[39, 0] < p[42, 0] < p[45, 0]
  assert p[27:31, 1].tolist() == sorted(p[27:31, 1].tolist())  # nose bridge runs down
  assert p[48, 0] < p[51, 0] < p[54, 0] and p[51, 1] < p[57, 1] and p[62, 1] < p[66, 1]
  right_iris, left_iris = arrays['iris'][0]
  assert p[36, 0] < right_iris[0] < p[39, 0] and p[42, 0] < left_iris[0] < p[45, 0]
  sync = analysed['sync']
  assert np.array(sync['iris']).shape == (sync['frames'], 2, 2) and np.array(sync['lmk68']).shape[1:] == (68, 2)


def test_sharpness_of_a_face_box_drops_with_blur(portrait_face):
  _, face = portrait_face
  image = np.ascontiguousarray(_sprite(1.0))
  sharp = features.face_sharpness(image, face.boxes()[0])
  soft = features.face_sharpness(cv2.GaussianBlur(image, (0, 0), 3), face.boxes()[0])
  assert sharp > 50 and soft < sharp / 4


def test_a_frame_the_model_fails_on_is_a_model_error_and_its_batch_goes_on():
  """An empty frame makes MediaPipe's graph fail (and refuse every later frame): that frame is a ModelError,
  not "no face", and the good frames after it still get their faces from a fresh task."""
  from skimage import data
  good = data.astronaut()
  bad = np.zeros((0, 0, 3), np.uint8)
  for handler in (FaceDetectorModelHandler(), FaceLandmarkerModelHandler()):
    results = [r.inference for r in handler.run_inference([good, bad, good, good], handler.load_model())]
    assert isinstance(results[1], ModelError) and 'RuntimeError' in results[1].detail
    assert [r.num_faces for i, r in enumerate(results) if i != 1] == [1, 1, 1]


def test_a_clip_failing_every_filter_gets_the_first_code_of_the_readme_table():
  """README's filter table lists the reason codes in the order `failures` checks them; the first one names the
  reject, so the two must agree."""
  readme = open(os.path.join(REPO, 'README.md'), encoding='utf-8').read()
  table = readme[readme.index('| flag | default | reason code | what it checks |'):]
  table = table[:table.index('\n\n')]
  documented = [code for row in table.splitlines()[2:] if not row.startswith('| `--multi_face`')  # a tracker's
                for code in re.findall(r'`([a-z_]+)`', row.split('|')[3])]
  everything_wrong = {'face_ratio': 0.1, 'source_face_px': 10, 'source_resolution': 100, 'duration': 0.2,
                      'sharpness': 1.0, 'max_abs_yaw': 80.0, 'max_abs_pitch': 60.0, 'eye_motion_var': 0.0,
                      'speech_ratio': 0.0, 'face_score': 0.2, 'sync_corr': -0.5, 'sync_lag_frames': 12}
  thresholds = Thresholds(min_resolution=360, eye_motion=True, max_sync_lag=3, min_sync_corr=0.3, min_face_score=0.5)
  checked = [code for code, _, _, _ in failures(everything_wrong, thresholds)]
  # SyncNet's scores replace the offline sync filters (av_sync_*) with its own (sync_conf_low, av_offset_large)
  with_syncnet = [code for code, _, _, _ in failures(dict(everything_wrong, lse_c=0.5, av_offset_frames=-9),
                                                       thresholds)]
  assert sorted(set(checked) | set(with_syncnet), key=documented.index) == documented
  assert checked == [c for c in documented if c in checked] and with_syncnet == [c for c in documented
                                                                                 if c in with_syncnet]
