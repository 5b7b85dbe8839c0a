"""Face tracking on sampled detector frames: IoU tracks, gaps, shot cuts, --multi_face, stable windows."""
import dataclasses

import numpy as np
import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_pipeline.demo import VideoSpec, write_video
from model_handlers.mediapipe_face import FaceDetectorModelHandler
from transforms.core.elements import ClipTask, FaceSamples, MediaFile
from transforms.lib.geometry import follow_crop
from transforms.lib.probe import probe
from transforms.sampling import ShotCuts
from transforms.track import DetectAndTrack, Track, TrackFaces, choose_tracks, follow_path, piece_ids, track_faces

FACE = np.array([100, 100, 200, 220], np.float32)


def _samples(times, *faces_at):
  """Detector samples at `times`; each face is (box, set of times it is seen at)."""
  return [(t, np.array([box for box, seen in faces_at if t in seen], np.float32).reshape(-1, 4)) for t in times]


def test_gap_up_to_max_gap_is_bridged_longer_splits():
  times = [round(0.2 * i, 1) for i in range(20)]
  one_miss = _samples(times, (FACE, set(times) - {1.0}))
  assert len(track_faces(one_miss, (), 4.0, 0.2, max_gap_s=0.48)) == 1
  gone = set(times) - {1.6, 1.8, 2.0, 2.2}  # missing 0.8 s
  tracks = track_faces(_samples(times, (FACE, gone)), (), 4.0, 0.2, max_gap_s=0.48)
  assert [(tr.start, tr.end) for tr in tracks] == [(0.0, pytest.approx(1.5)), (pytest.approx(2.3), 4.0)]
  assert len(track_faces(_samples(times, (FACE, gone)), (), 4.0, 0.2, max_gap_s=1.0)) == 1


def test_shot_cut_splits_even_where_the_face_stays():
  times = [round(0.2 * i, 1) for i in range(20)]
  tracks = track_faces(_samples(times, (FACE, set(times))), (2.1,), 4.0, 0.2, max_gap_s=0.48)
  assert [(tr.start, tr.end) for tr in tracks] == [(0.0, 2.1), (2.1, 4.0)]


def test_two_faces_two_tracks_and_the_policies():
  times = [round(0.2 * i, 1) for i in range(10)]
  small = FACE + np.array([300, 0, 260, -40], np.float32)  # 60 x 80 px to the right
  tracks = track_faces(_samples(times, (FACE, set(times)), (small, set(times[3:]))), (), 2.0, 0.2, 0.48)
  assert sorted(round(tr.size()) for tr in tracks) == [80, 120]
  assert len(choose_tracks(tracks, 'split')[0]) == 2
  kept, refused = choose_tracks(tracks, 'largest')
  assert [round(tr.size()) for tr in kept] == [120] and refused is None
  kept, refused = choose_tracks(tracks, 'reject')
  assert kept == [] and 'two faces' in refused
  # Faces one after the other (no overlap) are not "several faces" under any policy.
  before = [tr for tr in tracks if tr.size() > 100][0]
  after = Track([3.0], [small], start=2.0, end=4.0)
  assert len(choose_tracks([before, after], 'reject')[0]) == 2


def test_piece_ids_come_from_the_time_range_not_the_order():
  right = FACE + np.array([300, 0, 300, 0], np.float32)
  first, second, third = (Track([t], [FACE], start=t, end=t + 1.5) for t in (0.0, 3.9, 6.1234))
  beside = Track([3.9], [right], start=3.9, end=5.0)
  assert piece_ids('talk_0', [first, second, third]) == ['talk_0_f0', 'talk_0_f3900', 'talk_0_f6123']
  # A rerun that loses (or gains) an earlier piece names the others the same.
  assert piece_ids('talk_0', [second, third]) == ['talk_0_f3900', 'talk_0_f6123']
  # Faces on screen together start together: numbered left to right, whatever order they come in.
  assert piece_ids('talk_0', [beside, second]) == ['talk_0_f3900_1', 'talk_0_f3900_0']
  assert piece_ids('talk_0', [second]) == ['talk_0']  # a single piece keeps the planned id
  assert piece_ids('a.b_0', [first, third]) == ['a.b_0_f0', 'a.b_0_f6123']  # no dot of its own


def test_follow_path_is_smooth_and_crop_has_output_size():
  times = [0.2 * i for i in range(30)]
  rng = np.random.default_rng(0)
  boxes = [FACE + np.array([10 * i, 0, 10 * i, 0]) + rng.normal(0, 6, 4) for i in range(30)]
  track = Track(times, boxes, start=0.0, end=6.0)
  path = follow_path(track, 200, 0.5, 1280, 720)
  lefts = np.array([p[1] for p in path])
  raw = np.array([(b[0] + b[2]) / 2 for b in boxes])
  assert np.any(np.diff(raw) < 0)  # the detections jitter back and forth...
  assert np.all(np.diff(lefts) >= 0) and lefts[-1] - lefts[0] > 200  # ...the window glides along the drift
  frame = np.zeros((720, 1280, 3), np.uint8)
  assert follow_crop(frame, path, 200, 1.3, 512).shape == (512, 512, 3)


@pytest.fixture(scope='module')
def clips(tmp_path_factory):
  """Known-truth sources at 25 fps: face leaves 2.5-3.5 s, two faces, a hard cut at 2.4 s."""
  root = tmp_path_factory.mktemp('track')
  specs = {
      'gone': VideoSpec(duration=6.0, fps=25.0, face_gone=(2.5, 3.5)),
      'two': VideoSpec(duration=3.0, fps=25.0, width=960, second_face_scale=0.7, seed=4),
      'cut': VideoSpec(duration=4.8, fps=25.0, cut_at=2.4, seed=5),
  }
  tasks = {}
  for name, spec in specs.items():
    path = str(root / f'{name}.mp4')
    write_video(path, spec)
    tasks[name] = ClipTask(f'{name}_0', name, path, MediaFile(path, probe(path)), 0.0, spec.duration)
  return tasks


def _track(tasks, multi_face='largest', max_gap_s=0.48, min_duration=1.0, shot_threshold=0.4, crop_follow_s=0.0):
  """A TestPipeline with DetectAndTrack over `tasks`: (pipeline, its outputs tasks/rejects/pieces)."""
  pipeline = TestPipeline()
  out = (pipeline
         | beam.Create(tasks)
         | 'Track' >> DetectAndTrack(FaceDetectorModelHandler(max_faces=4), 1.8, 5.0, shot_threshold, multi_face,
                                     max_gap_s, min_duration, crop_follow_s))
  return pipeline, out


def _span(task):
  return task.clip_id, task.planned, round(task.start, 1), round(task.end, 1)


def test_face_leaving_the_frame_splits_the_clip(clips):
  pipeline, out = _track([clips['gone']])
  # Piece ids come from the start time in ms, not the order (a rerun names them the same).
  assert_that(out['tasks'] | beam.Map(_span), equal_to([('gone_0_f0', 'gone_0', 0.0, 2.1),
                                                         ('gone_0_f3900', 'gone_0', 3.9, 6.0)]), label='pieces')
  assert_that(out['rejects'], equal_to([]), label='none')
  pipeline.run()


def test_max_gap_bridges_or_splits_and_min_duration_rejects_pieces(clips):
  pipeline, out = _track([clips['gone']], max_gap_s=2.0, min_duration=2.5)
  # Bridged: one piece with the planned id over the whole clip, the face away for 1.6 s < 2 s.
  assert_that(out['tasks'] | beam.Map(_span), equal_to([('gone_0', 'gone_0', 0.0, 6.0)]), label='bridged')
  pipeline.run()
  pipeline, out = _track([clips['gone']], min_duration=2.5)
  assert_that(out['tasks'], equal_to([]), label='kept')
  assert_that(out['rejects'] | beam.Map(lambda r: (r.id, r.planned_id, r.stage, r.reason)),
              equal_to([('gone_0_f0', 'gone_0', 'track', 'too_short'),
                        ('gone_0_f3900', 'gone_0', 'track', 'too_short')]), label='short')
  pipeline.run()


@pytest.mark.parametrize('policy,expected,reject', [
    ('largest', ['two_0'], []),
    ('split', ['two_0_f0_0', 'two_0_f0_1'], []),  # both start at 0: numbered left to right
    ('reject', [], [('two_0', 'multiple_faces')]),
])
def test_two_faces(clips, policy, expected, reject):
  pipeline, out = _track([clips['two']], multi_face=policy)
  assert_that(out['tasks'] | beam.Map(lambda t: t.clip_id), equal_to(expected), label='ids')
  assert_that(out['rejects'] | beam.Map(lambda r: (r.id, r.reason)), equal_to(reject), label='rejects')
  # The big speaker is on the left (x < 480 of 960); the listener's window is smaller, on the right.
  assert_that(out['tasks'] | beam.Map(lambda t: (t.clip_id, t.window[0] + t.window[2] / 2 < 480, t.window[2] > 250)),
              equal_to([(i, i != 'two_0_f0_1', i != 'two_0_f0_1') for i in expected]), label='windows')
  pipeline.run()


def test_shot_change_splits_the_clip(clips):
  pipeline, out = _track([clips['cut']])
  assert_that(out['tasks'] | beam.Map(_span), equal_to([('cut_0_f0', 'cut_0', 0.0, 2.4),
                                                         ('cut_0_f2400', 'cut_0', 2.4, 4.8)]), label='cut')
  pipeline.run()


def test_shot_cuts_only_on_hard_changes():
  rng = np.random.default_rng(1)
  base = rng.integers(0, 255, (36, 64, 3), np.uint8)
  shots = ShotCuts(0.4)
  for i in range(20):  # a slow fade and a drifting patch: gradual, never a cut
    frame = np.clip(base.astype(int) + 3 * i, 0, 255).astype(np.uint8)
    frame[10:20, i:i + 10] = 255
    shots.push(i / 25, frame)
  assert shots.cuts == []
  shots.push(20 / 25, np.full((36, 64, 3), (230, 120, 40), np.uint8))  # another room
  assert shots.cuts == [0.8]


def test_windows_are_fixed_per_track_or_follow_with_crop_follow(clips):
  pipeline, out = _track([clips['two']], crop_follow_s=0.4)
  assert_that(out['tasks'] | beam.Map(lambda t: (len(t.path) >= 10, t.window[:2] == t.path[0][1:],
                                                 t.path[-1][0] <= 3.0)), equal_to([(True, True, True)]))
  pipeline.run()


def test_pieces_of_a_clip_cut_at_planning_account_against_the_planned_clip(clips):
  """A long clip cut at planning (`_s<ms>`, planned id set) split again by tracking: every piece, kept or
  rejected, names the clip that was planned."""
  task = dataclasses.replace(clips['gone'], clip_id='gone_0_s0', planned_id='gone_0')
  times = [round(0.2 * i, 1) for i in range(30)]
  frame = np.array([640, 480] * 2, np.float32)
  samples = _samples(times, (FACE / frame, {t for t in times if not 2.0 <= t <= 3.4}))
  out = list(TrackFaces(1.8, max_gap_s=0.48, min_duration=2.0).process(FaceSamples(task, tuple(samples), ())))
  tasks = [o for o in out if isinstance(o, ClipTask)]
  tagged = [(o.tag, o.value) for o in out if not isinstance(o, ClipTask)]
  assert [(t.clip_id, t.planned_id) for t in tasks] == [('gone_0_s0_f3500', 'gone_0')]
  assert [(tag, v.id, v.planned_id, v.reason) for tag, v in tagged if tag == 'rejects'] == [
      ('rejects', 'gone_0_s0_f0', 'gone_0', 'too_short')]
