"""One crop window per subject: the union of the tracked windows (nerf), the earliest clip's first-frame box
(avatar), and the grouping that gives every clip of a subject the same window."""
from __future__ import annotations

import numpy as np
import pytest
from apache_beam.pvalue import TaggedOutput

from transforms.core.elements import ClipTask, MediaFile, ProbeInfo
from transforms.deadletter import DeadLetter
from transforms.lib.geometry import fit_window
from transforms.subject_window import UnionOfWindows, face_box_in_source, union_window


def _media(width: int = 640, height: int = 480, uri: str = 'talker.mp4') -> MediaFile:
  return MediaFile(uri, ProbeInfo(4.0, width, height, 25.0, True, False, 'h264'))


def _tracked(clip_id: str, start: float, window, face_box, source_id: str = 'talker', path=(),
             media: MediaFile = None) -> ClipTask:
  return ClipTask(clip_id, source_id, 'file://talker.mp4', media or _media(), start, start + 1.0, window, 'detect',
                  face_box=face_box, path=path, planned_id=source_id + '_planned')


def test_union_of_tracked_windows_for_every_clip_with_face_boxes_moved():
  """Two clips whose faces sit at different places: both get the square around both windows, and each clip's
  face keeps its place in the source (its face box re-expressed in the new window)."""
  late = _tracked('talker_1', 1.0, (300, 120, 160, 160), (0.3, 0.3, 0.7, 0.7))
  early = _tracked('talker_0', 0.0, (100, 100, 140, 140), (0.25, 0.2, 0.75, 0.8))
  out = list(UnionOfWindows().process((('talker', 640, 480), [late, early])))
  assert [task.clip_id for task in out] == ['talker_0', 'talker_1']  # earliest first
  assert {task.window for task in out} == {(100, 10, 360, 360)}  # union (100, 100)-(460, 280), squared on its centre
  assert {task.padding for task in out} == {(0, 0, 0, 0)}
  for before, after in zip((early, late), out):
    np.testing.assert_allclose(face_box_in_source(after), face_box_in_source(before), atol=0.05)
    assert after.path == () and after.crop_mode == 'detect' and after.planned_id == before.planned_id
    assert 'one window for the subject\'s 2 clip(s)' in after.notes[-1]
  np.testing.assert_allclose(face_box_in_source(early), (135, 128, 205, 212))
  assert out[0].face_box == (round(35 / 360, 4), round(118 / 360, 4), round(105 / 360, 4), round(202 / 360, 4))


def test_union_wider_than_the_frame_is_padded_square():
  """Faces at both ends of a wide frame: the square is taller than the frame, so the frame's full height is
  cropped and black padding makes it square (plan.fit_window), rather than cutting a face off."""
  media = _media(800, 450)
  left = _tracked('wide_0', 0.0, (0, 100, 300, 300), (0.3, 0.3, 0.7, 0.7), media=media)
  right = _tracked('wide_1', 1.0, (500, 120, 300, 300), (0.3, 0.3, 0.7, 0.7), media=media)
  out = list(UnionOfWindows().process((('talker', 800, 450), [left, right])))
  # The union (0, 100)-(800, 420): an 800 px square centred on it spans rows -140..660 of a 450 row frame.
  assert {(task.window, task.padding) for task in out} == {((0, 0, 800, 450), (0, 140, 0, 210))}
  assert fit_window(union_window([left, right]), 800, 450) == ((0, 0, 800, 450), (0, 140, 0, 210))
  assert all(task.square_side == 800 for task in out)
  for before, after in zip((left, right), out):  # the face box counts from the padded square's corner
    np.testing.assert_allclose(face_box_in_source(after), face_box_in_source(before), atol=0.1)


def test_follow_paths_are_covered_and_dropped():
  """--crop_follow: the window went along a path; the subject's one window holds every place it went."""
  path = ((0.0, 100, 100), (0.5, 140, 110), (1.0, 180, 100))
  task = _tracked('follow', 0.0, (100, 100, 120, 120), (0.3, 0.3, 0.7, 0.7), path=path)
  assert union_window([task]) == (100, 100, 200, 130)
  (out,) = UnionOfWindows().process((('talker', 640, 480), [task]))
  assert out.window == (100, 65, 200, 200) and out.path == ()  # squared on the union's centre
  np.testing.assert_allclose(face_box_in_source(out), face_box_in_source(task), atol=0.05)


def test_a_lone_clip_keeps_its_window_untouched():
  task = _tracked('alone', 0.0, (100, 100, 140, 140), (0.25, 0.2, 0.75, 0.8))
  assert list(UnionOfWindows().process((('talker', 640, 480), [task]))) == [task]


def test_an_error_rejects_every_clip_of_the_subject_with_its_planned_id():
  good = _tracked('talker_0', 0.0, (100, 100, 140, 140), (0.25, 0.2, 0.75, 0.8))
  broken = _tracked('talker_1', 1.0, None, None)
  out = list(DeadLetter(UnionOfWindows(), 'track').process((('talker', 640, 480), [good, broken])))
  assert all(isinstance(o, TaggedOutput) and o.tag == 'rejects' for o in out)
  assert sorted((o.value.id, o.value.reason, o.value.planned_id) for o in out) == [
      ('talker_0', 'internal_error', 'talker_planned'), ('talker_1', 'internal_error', 'talker_planned')]


def test_one_window_per_subject_in_a_pipeline():
  """Grouped by subject (and frame size): each subject's clips share a window; other subjects keep theirs."""
  import apache_beam as beam
  from apache_beam.testing.test_pipeline import TestPipeline
  from apache_beam.testing.util import assert_that, equal_to
  from transforms.subject_window import OneWindowPerSubject
  tasks = [_tracked('a_0', 0.0, (100, 100, 140, 140), (0.25, 0.2, 0.75, 0.8), 'a'),
           _tracked('a_1', 1.0, (300, 120, 160, 160), (0.3, 0.3, 0.7, 0.7), 'a'),
           _tracked('a_2', 2.0, (200, 200, 100, 100), (0.3, 0.3, 0.7, 0.7), 'a'),
           _tracked('b_0', 0.0, (10, 10, 100, 100), (0.3, 0.3, 0.7, 0.7), 'b')]
  with TestPipeline() as pipeline:
    out = pipeline | beam.Create(tasks) | OneWindowPerSubject(UnionOfWindows())
    assert_that(out['tasks'] | 'Windows' >> beam.Map(lambda task: (task.clip_id, task.window)), equal_to([
        ('a_0', (100, 20, 360, 360)), ('a_1', (100, 20, 360, 360)), ('a_2', (100, 20, 360, 360)),
        ('b_0', (10, 10, 100, 100))]))
    assert_that(out['rejects'], equal_to([]), label='NoRejects')


# ----------------------------------------------------------------------------- avatar: the earliest first frame

@pytest.fixture(scope='module')
def first_frame(tmp_path_factory):
  """EarliestFirstFrame with the real face landmarker, and a maker of clips of generated videos."""
  from beam_pipeline.demo import VideoSpec, write_video
  from beam_pipeline.recipes.avatar.track import EarliestFirstFrame
  from model_handlers.mediapipe_face import FaceLandmarkerModelHandler
  from transforms.lib.probe import probe_here
  root = tmp_path_factory.mktemp('subject_window')
  choose = EarliestFirstFrame(FaceLandmarkerModelHandler(max_faces=4, max_batch_size=1), 2.2)
  choose.setup()
  videos = {}

  def clip(video: str, spec, start: float) -> ClipTask:
    if video not in videos:
      path = str(root / f'{video}.mp4')
      write_video(path, spec)
      videos[video] = MediaFile(path, probe_here(path))
    return ClipTask(f'{video}_{int(start)}', video, 'file://' + video, videos[video], start, start + 1.0,
                    planned_id=f'{video}_{int(start)}')

  return choose, clip, VideoSpec


def test_avatar_window_is_the_earliest_clips_first_frame_box(first_frame):
  """A face that moves 100 px between the clips' first frames: each first frame gives its own box, and every
  clip of the subject gets the earliest's, with its face box and face size."""
  choose, clip, spec = first_frame
  moving = spec(duration=2.0, fps=25.0, motion_px=100.0, seed=6)
  early, late = clip('moving', moving, 0.0), clip('moving', moving, 1.0)
  own_early, own_late = choose.first_frame_box(early), choose.first_frame_box(late)
  assert own_late.window[0] - own_early.window[0] > 60  # the boxes differ: the face moved right
  out = list(choose.process((('moving', 640, 480), [late, early])))
  assert [task.clip_id for task in out] == ['moving_0', 'moving_1']
  for task in out:
    assert (task.window, task.padding, task.face_box) == (own_early.window, own_early.padding, own_early.face_box)
    assert task.crop_mode == 'first_frame' and dict(task.face_stats)['source_face_px'] == own_early.face_px
    assert 'of the first frame of moving_0, the subject\'s earliest clip' in task.notes[-1]


def test_avatar_box_from_the_next_clip_when_the_first_frame_has_no_face(first_frame):
  choose, clip, spec = first_frame
  away = spec(duration=2.0, fps=25.0, motion_px=0.0, seed=6, face_gone=(0.0, 0.5))  # out of frame at 0 s
  early, late = clip('away', away, 0.0), clip('away', away, 1.0)
  assert choose.first_frame_box(early)[0] == 'no_face'
  out = list(choose.process((('away', 640, 480), [early, late])))
  assert {task.window for task in out} == {choose.first_frame_box(late).window}
  assert 'earliest clip whose first frame gave one (away_0: no_face)' in out[0].notes[-1]


def test_avatar_clips_rejected_with_their_own_reasons_when_no_first_frame_has_a_face(first_frame):
  choose, clip, spec = first_frame
  empty = spec(duration=2.0, fps=25.0, face=False, seed=1)
  out = list(choose.process((('empty', 640, 480), [clip('empty', empty, 1.0), clip('empty', empty, 0.0)])))
  assert [(o.tag, o.value.id, o.value.reason, o.value.planned_id) for o in out] == [
      ('rejects', 'empty_0', 'no_face', 'empty_0'), ('rejects', 'empty_1', 'no_face', 'empty_1')]
  assert 'first frame of empty_1' in out[1].value.detail


def test_avatar_small_face_in_a_wide_frame_found_through_the_detector(first_frame, tmp_path):
  """A face about 190 px across (its 68 points) in a 1080p frame: the landmarker's short-range detector misses it on the whole frame; the
  full-range detector finds it and the landmarker runs on a square around it, its points mapped back."""
  from beam_pipeline.recipes.avatar.track import EarliestFirstFrame
  from model_handlers.mediapipe_face import FaceDetectorModelHandler, FaceLandmarkerModelHandler
  plain, clip, spec = first_frame
  wide = spec(duration=1.0, fps=25.0, width=1920, height=1080, face_scale=2.0, motion_px=0.0, seed=3)
  task = clip('wide', wide, 0.0)
  assert plain.first_frame_box(task)[0] == 'no_face'
  with_detector = EarliestFirstFrame(FaceLandmarkerModelHandler(max_faces=4, max_batch_size=1), 2.2,
                                     FaceDetectorModelHandler(max_faces=4, max_batch_size=1))
  with_detector.setup()
  box = with_detector.first_frame_box(task)
  x, y, w, h = box.window
  assert 150 < box.face_px < 250  # the face's 68-point extent in source pixels
  assert 700 < x + w / 2 < 1220 and 250 < y + h / 2 < 800  # the demo face sits near the frame's middle
  assert w == h and w > 2 * box.face_px
