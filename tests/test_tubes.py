"""Face tubes as video-preprocessing cuts them: IoU with the first box, cuts, 1024 frames, the three rejects."""
import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_pipeline.demo import VideoSpec, write_video
from beam_pipeline.recipes.mmvox.tubes import (CutTubes, TrackTubes, TubeRules, aspect_preserved_box, cut_tubes,
                                               tube_window)
from model_handlers.mediapipe_face import FaceDetectorModelHandler
from transforms.core.elements import ClipTask, FaceSamples, MediaFile, ProbeInfo
from transforms.lib.probe import probe

FPS = 25.0
WIDTH, HEIGHT = 1920, 1080
FACE = np.array([800, 300, 1100, 660], np.float64)  # 300 x 360 px


def _every_frame(duration, box_at):
  """Samples on every frame (detect_fps = fps); `box_at(t)` gives the face box or None."""
  samples = []
  for i in range(int(round(duration * FPS))):
    t = i / FPS
    box = box_at(t)
    samples.append((t, np.zeros((0, 4)) if box is None else np.array([box], np.float64)))
  return samples


def _judge(tube, rules=TubeRules()):
  return rules.judge(tube, FPS, WIDTH, HEIGHT)


def test_aspect_preserved_box_is_their_formula():
  # 100 x 200 box, increase 0.1: height grows 0.1 each side (20 px), width to the same 240 px.
  assert aspect_preserved_box((100, 100, 200, 300), 0.1) == (30, 80, 270, 320)
  window, outside = tube_window((100, 100, 200, 300), WIDTH, HEIGHT)
  assert window == (30, 80, 240, 240) and outside == (0, 0, 0, 0)
  assert tube_window((10, 100, 110, 300), WIDTH, HEIGHT)[1] == (60, 0, 0, 0)


def test_a_cut_makes_two_tubes_even_where_the_face_stays():
  samples = _every_frame(6.0, lambda t: FACE)
  tubes = cut_tubes(samples, (3.0,), 6.0, FPS)
  assert [(tube.start, tube.end) for tube in tubes] == [(0.0, 3.0), (3.0, 6.0)]
  assert [_judge(tube)[1] for tube in tubes] == ['', '']
  assert _judge(tubes[0])[0] == (734, 264, 432, 432)


def test_iou_is_with_the_first_box_not_the_last():
  # A slow drift: 12 px a frame keeps frame-to-frame IoU high, but the overlap with the tube's first box
  # falls under 0.25 after a while, and a new tube starts there.
  samples = _every_frame(6.0, lambda t: FACE + np.array([1, 0, 1, 0]) * 12 * t * FPS)
  tubes = cut_tubes(samples, (), 6.0, FPS)
  assert len(tubes) >= 2
  first = tubes[0]
  assert first.end == tubes[1].start
  assert all(a.end == b.start for a, b in zip(tubes, tubes[1:]))
  # 300 px wide boxes shifted by s overlap (300 - s) / (300 + s): exactly 0.25 at 180 px (frame 15, kept, as
  # their `< iou_with_initial`), below from frame 16.
  assert round(first.end * FPS) == 16


def test_long_tubes_are_cut_every_1024_frames():
  duration = 2100 / FPS
  tubes = cut_tubes(_every_frame(duration, lambda t: FACE), (), duration, FPS)
  assert [round((tube.end - tube.start) * FPS) for tube in tubes] == [1024, 1024, 52]
  assert [_judge(tube)[1] for tube in tubes] == ['', '', 'tube_too_short']


def test_each_rule_rejects_with_its_own_reason():
  short = cut_tubes(_every_frame(4.0, lambda t: FACE if 1.0 <= t < 3.0 else None), (), 4.0, FPS)
  assert [(round(s.start, 2), round(s.end, 2)) for s in short] == [(1.0, 3.0)]
  window, reason, detail = _judge(short[0])  # 50 frames
  assert window is None and reason == 'tube_too_short' and '50 frames' in detail
  assert _judge(short[0], TubeRules(min_frames=50))[1] == ''
  small = cut_tubes(_every_frame(4.0, lambda t: np.array([800, 300, 900, 420])), (), 4.0, FPS)
  window, reason, detail = _judge(small[0])
  assert window is None and reason == 'tube_too_small' and '120 source px' in detail
  edge = cut_tubes(_every_frame(4.0, lambda t: FACE + [1000, 0, 800, 0]), (), 4.0, FPS)  # right edge at 1900
  window, reason, detail = _judge(edge[0])
  assert window is None and reason == 'tube_out_of_frame'


def test_a_missing_face_ends_the_tube_and_the_largest_face_starts_one():
  other = np.array([100, 100, 400, 500], np.float64)

  def faces(t):
    return None if 2.0 <= t < 2.2 else FACE

  samples = _every_frame(5.0, faces)
  samples = [(t, np.concatenate([boxes, [other]]) if t >= 4.0 else boxes) for t, boxes in samples]
  tubes = cut_tubes(samples, (), 5.0, FPS)
  assert [(round(s.start, 2), round(s.end, 2)) for s in tubes] == [(0.0, 2.0), (2.2, 5.0)]
  assert np.allclose(tubes[1].boxes[-1], FACE)  # the tube keeps following its own face, not the larger one


def _task(clip_id='vox_0', duration=6.0):
  info = ProbeInfo(duration=duration, width=WIDTH, height=HEIGHT, fps=FPS, has_audio=True, interlaced=False,
                   video_codec='h264')
  return ClipTask(clip_id, 'vox', 'vox.mp4', MediaFile('vox.mp4', info), 0.0, duration)


def test_cut_tubes_dofn_names_pieces_and_accounts_for_the_planned_clip():
  scale = np.array([WIDTH, HEIGHT] * 2)
  boxes = [(t, b / scale) for t, b in _every_frame(8.0, lambda t: FACE if t < 7.0 else FACE + [600, 0, 600, 0])]
  found = FaceSamples(_task(duration=8.0), tuple(boxes), (3.0,))
  out = list(CutTubes(TubeRules(), FPS, FPS).process(found))
  tasks = [o for o in out if isinstance(o, ClipTask)]
  rejects = [o.value for o in out if not isinstance(o, ClipTask)]
  assert [(t.clip_id, t.planned, t.start, t.end, t.window) for t in tasks] == [
      ('vox_0_f0', 'vox_0', 0.0, 3.0, (734, 264, 432, 432)), ('vox_0_f3000', 'vox_0', 3.0, 7.0, (734, 264, 432, 432))]
  assert [(r.id, r.planned, r.reason) for r in rejects] == [('vox_0_f7000', 'vox_0', 'tube_too_short')]
  assert tasks[0].crop_mode == 'detect' and tasks[0].face_box == pytest.approx((0.1528, 0.0833, 0.8472, 0.9167),
                                                                               abs=1e-3)


def test_tubes_through_the_pipeline_with_the_detector(tmp_path):
  """A generated clip with a hard cut: the real detector and shot detection give two tubes."""
  path = str(tmp_path / 'cut.mp4')
  spec = VideoSpec(duration=4.0, fps=25.0, cut_at=2.0, seed=5)
  write_video(path, spec)
  task = ClipTask('cut_0', 'cut', path, MediaFile(path, probe(path)), 0.0, spec.duration)
  pipeline = TestPipeline()
  out = (pipeline | beam.Create([task])
         | TrackTubes(FaceDetectorModelHandler(max_faces=4), TubeRules(min_frames=40, min_size=64), 25.0, 25.0, 0.4))
  assert_that(out['tasks'] | beam.Map(lambda t: (t.clip_id, t.planned, round(t.start, 2), round(t.end, 2),
                                                 t.window[2] == t.window[3])),
              equal_to([('cut_0_f0', 'cut_0', 0.0, 2.0, True), ('cut_0_f2000', 'cut_0', 2.0, 4.0, True)]),
              label='tubes')
  assert_that(out['rejects'], equal_to([]), label='none')
  pipeline.run()
