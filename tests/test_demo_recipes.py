"""The generated media's gaze (for MegActor's eye-motion filter) and the embedded demo of every recipe."""
import json
import os

import cv2
import numpy as np
import pytest

from beam_pipeline.demo import _EYES, VideoSpec, _background, _sprite, face_position, gaze, render_frame
from model_handlers.mediapipe_face import FaceLandmarkerModelHandler
from tests.helpers import read_jsonl, run_cli
from transforms.lib import features

CROP = 512


def face_crops(spec: VideoSpec):
  """Every frame's face, cut as the spine cuts it (a square 1.8 face widths wide: the landmarks span 90 sprite
  pixels) and resized to 512 (area interpolation, as the render's ffmpeg scale)."""
  background, sprite = _background(spec), _sprite(spec.face_scale)
  side = int(1.8 * 90 * spec.face_scale)
  crops = []
  for index in range(int(round(spec.duration * spec.fps))):
    t = index / spec.fps
    x, y = face_position(spec, t, sprite.shape)
    cx, cy = int(x + 165 * spec.face_scale), int(y + 124 * spec.face_scale)  # the face's centre in the sprite
    window = render_frame(spec, t, background, sprite)[cy - side // 2:cy + side // 2, cx - side // 2:cx + side // 2]
    crops.append(np.ascontiguousarray(cv2.resize(window, (CROP, CROP), interpolation=cv2.INTER_AREA)))
  return crops


@pytest.fixture(scope='module')
def measured():
  """Landmarks of a still-eyed and a looking-around clip (4 s at 30 fps, 12 of MegActor's samples each)."""
  handler = FaceLandmarkerModelHandler()
  pool = handler.load_model()
  out = {}
  for name, gaze_deg in (('still', 0.0), ('gaze', 25.0)):
    spec = VideoSpec(duration=4.0, audio=False, gaze_deg=gaze_deg)
    faces = pool.map(handler._infer, face_crops(spec), handler._failed)  # pylint: disable=protected-access
    assert all(len(face.landmarks) for face in faces), f'{name}: the landmarker lost the face'
    out[name] = (spec, np.stack([face.landmarks[0] for face in faces]),
                 np.stack([face.blendshapes[0] for face in faces]))
  pool.close()
  return out


def test_the_landmarker_sees_the_drawn_gaze(measured):
  _, still, still_shapes = measured['still']
  gaze_spec, looking, looking_shapes = measured['gaze']
  assert features.eye_motion_variance(still, still_shapes) < 0.5
  assert features.eye_motion_variance(looking, looking_shapes) > 6.0  # three times --min_eye_motion_var's default
  # The irises are seen where they were drawn: the measured gaze follows the drawn one.
  drawn = np.array([gaze(gaze_spec, index / gaze_spec.fps) for index in range(len(looking))])
  yaw, pitch = features.gaze_angles(looking)
  assert np.corrcoef(yaw, drawn[:, 0])[0, 1] > 0.9 and np.corrcoef(pitch, drawn[:, 1])[0, 1] > 0.5
  assert np.ptp(features.gaze_angles(still)[0]) < 2.0


def test_the_gaze_jumps_a_few_times_a_second_within_its_amplitude():
  spec = VideoSpec(duration=6.0, gaze_deg=25.0, seed=4)
  angles = np.array([gaze(spec, index / spec.fps) for index in range(int(spec.duration * spec.fps))])
  assert np.abs(angles[:, 0]).max() <= 25.0 and np.abs(angles[:, 1]).max() <= 12.5
  moving = (np.linalg.norm(np.diff(angles, axis=0), axis=1) > 1.0).astype(int)
  saccades = np.count_nonzero(np.diff(moving) == 1)
  assert 6 <= saccades <= 24 and moving.mean() < 0.3  # 1-4 jumps a second, still in between
  assert gaze(VideoSpec(duration=6.0), 1.0) == (0.0, 0.0)


def test_the_irises_stay_in_the_eye_openings():
  """Only pixels inside the (scaled, moved) eye openings change when the eyes look around."""
  for scale in (0.7, 2.0):
    still = VideoSpec(duration=2.0, width=900, height=800, audio=False, face_scale=scale)
    looking = VideoSpec(**{**still.__dict__, 'gaze_deg': 30.0})
    background, sprite = _background(still), _sprite(scale)
    for t in (0.2, 0.9, 1.6):
      changed = np.any(render_frame(still, t, background, sprite) != render_frame(looking, t, background, sprite), -1)
      x, y = face_position(still, t, sprite.shape)
      ys, xs = np.nonzero(changed)
      inside = np.zeros(len(xs), bool)
      for cx, cy, half_w, half_h, _ in _EYES:
        inside |= (np.abs(xs - x - cx * scale) <= (half_w + 1.5) * scale) & \
            (np.abs(ys - y - cy * scale) <= (half_h + 3) * scale)
      assert changed.sum() > 50 * scale * scale and inside.all()


# Written clips of each recipe's embedded demo (all kept: the demo is made for the recipe).
EXPECTED = {'hdtf': 2, 'nerf': 2, 'avatar': 2, 'megactor': 2, 'mmvox': 1}


@pytest.mark.parametrize('recipe', sorted(EXPECTED))
def test_the_embedded_demo_gives_clips_for_every_recipe(recipe, tmp_path):
  output = tmp_path / 'out'
  result = run_cli(f'--recipe={recipe}', f'--output={output}', '--no_report', '--no_progress')
  assert f'generated the {recipe} demo input' in result.stdout
  stats = json.load(open(output / 'stats.json'))
  assert stats['balanced'] and stats['written'] >= 1, (stats, read_jsonl(str(output / 'rejects.jsonl')))
  assert stats['written'] == EXPECTED[recipe] and stats['rejected'] == 0
  assert os.listdir(output / '_work' / 'demo_input')
  if recipe == 'megactor':  # its own input: frame folders whose eyes pass its eye-motion filter
    records = read_jsonl(str(output / 'index.jsonl'))
    assert sorted(r['source_id'] for r in records) == ['Clip_demo_P0', 'Clip_demo_P1']
    assert all(r['scores']['eye_motion_var'] > 2.0 for r in records)
