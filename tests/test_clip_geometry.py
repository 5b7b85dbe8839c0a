"""Crop geometry, clip length and clip bounds: the face keeps its aspect, the clip says how long it is,
and no clip is longer than --max_clip_s."""
import io
import wave
from fractions import Fraction

import av
import numpy as np
import pytest

from transforms.core.elements import ClipSpec, ClipTask, MediaFile, ProbeInfo, Reject, RenderedClip, Source
from transforms.lib.probe import probe
from transforms.plan import PlanClips
from transforms.render import RenderClips, render

GREY = 128


def write_disc_video(path, width, height, centre, radius, seconds=1.0, fps=25, audio_s=None):
  """A white disc (the 'face') on grey; audio (a 440 Hz tone) lasts `audio_s` seconds (default: as the video)."""
  yy, xx = np.mgrid[:height, :width]
  image = np.full((height, width, 3), GREY, np.uint8)
  image[(xx - centre[0]) ** 2 + (yy - centre[1]) ** 2 <= radius ** 2] = 255
  frames = int(round(seconds * fps))
  with av.open(str(path), 'w') as out:
    video = out.add_stream('libx264', rate=fps)
    video.width, video.height, video.pix_fmt = width, height, 'yuv420p'
    video.options = {'crf': '10', 'preset': 'ultrafast'}
    audio = out.add_stream('aac', rate=16000)
    audio.layout = 'mono'
    for index in range(frames):
      frame = av.VideoFrame.from_ndarray(image, format='rgb24')
      frame.pts, frame.time_base = index, Fraction(1, fps)
      out.mux(video.encode(frame))
    out.mux(video.encode())
    samples = int((seconds if audio_s is None else audio_s) * 16000)
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(samples) / 16000)).astype(np.float32)
    for first in range(0, samples, 1024):
      frame = av.AudioFrame.from_ndarray(tone[None, first:first + 1024], format='flt', layout='mono')
      frame.sample_rate, frame.pts, frame.time_base = 16000, first, Fraction(1, 16000)
      out.mux(audio.encode(frame))
    out.mux(audio.encode())
  return str(path)


def rendered_frames(task, out_path, size=128, fps=25):
  generator = render(task, out_path, size, fps, crf=18, preset='ultrafast')
  frames = []
  try:
    while True:
      frames.append(next(generator)[1])
  except StopIteration as done:
    produced, wav = done.value
  return frames, produced, wav


def planned_task(path, crop=None, crop_mode='auto', height=None):
  media = MediaFile(path, probe(path))
  (task,) = list(PlanClips(crop_mode=crop_mode, min_duration=0.2).process(
      (Source('s', path, (ClipSpec('s_0', 0, 0.0, 0.4, crop),), height), [media])))
  return task


def disc_aspect(image):
  """Width over height of the white disc's bounding box."""
  ys, xs = np.nonzero(image.min(axis=2) > 200)
  return (xs.max() - xs.min() + 1) / (ys.max() - ys.min() + 1)


def test_edge_window_is_shifted_into_the_frame_not_stretched(tmp_path):
  """(560, 40, 160, 160) in a 640-wide frame used to become 80x160 and be stretched 2x across."""
  path = write_disc_video(tmp_path / 'edge.mp4', 640, 360, centre=(600, 120), radius=30)
  task = planned_task(path, crop=(560, 40, 160, 160))
  assert task.window == (480, 40, 160, 160) and task.padding == (0, 0, 0, 0)
  frames, _, _ = rendered_frames(task, str(tmp_path / 'out.mp4'))
  assert disc_aspect(frames[0]) == pytest.approx(1.0, abs=0.05)
  assert frames[0][64, 2].mean() == pytest.approx(GREY, abs=8)  # picture, not padding, at the left edge


def face_proportion(image, landmarker, model) -> float:
  """Eye-corner distance over the eyes-to-mouth distance: 1.33x wider if the face is stretched 1.33x across."""
  (found,) = [r.inference for r in landmarker.run_inference([image], model)]
  points = found.landmarks[0, :, :2]
  eyes = np.linalg.norm(points[33] - points[263])
  mouth = (points[13] + points[14]) / 2
  return float(eyes / np.linalg.norm((points[33] + points[263]) / 2 - mouth))


def test_edge_window_keeps_the_face_proportions_in_the_landmarks(tmp_path):
  """A real face near the right edge, an HDTF-style window hanging 50 px off it: the landmarks of the output
  have the source face's proportions (the old clamp made the window 150x200 and stretched the face 1.33x)."""
  from beam_pipeline.demo import VideoSpec, write_video
  from model_handlers.mediapipe_face import FaceLandmarkerModelHandler
  demo = write_video(str(tmp_path / 'demo.mp4'), VideoSpec(duration=0.4, width=640, height=480, motion_px=0))
  with av.open(demo) as container:  # the face spans x 281-371: keep columns 0-379, so it sits at the edge
    images = [np.ascontiguousarray(f.to_ndarray(format='rgb24')[:, :380]) for f in container.decode(video=0)]
  path = str(tmp_path / 'edge_face.mp4')
  with av.open(path, 'w') as out:
    video = out.add_stream('libx264', rate=25)
    video.width, video.height, video.pix_fmt = 380, 480, 'yuv420p'
    audio = out.add_stream('aac', rate=16000)
    audio.layout = 'mono'
    for index, image in enumerate(images):
      frame = av.VideoFrame.from_ndarray(image, format='rgb24')
      frame.pts, frame.time_base = index, Fraction(1, 25)
      out.mux(video.encode(frame))
    out.mux(video.encode())
    silence = av.AudioFrame.from_ndarray(np.zeros((1, 6400), np.float32), format='flt', layout='mono')
    silence.sample_rate, silence.pts, silence.time_base = 16000, 0, Fraction(1, 16000)
    out.mux(audio.encode(silence))
    out.mux(audio.encode())
  task = planned_task(path, crop=(230, 110, 200, 200))
  assert task.window == (180, 110, 200, 200)
  frames, _, _ = rendered_frames(task, str(tmp_path / 'out.mp4'), size=256)
  landmarker = FaceLandmarkerModelHandler()
  model = landmarker.load_model()
  source = face_proportion(images[0], landmarker, model)
  assert face_proportion(frames[0], landmarker, model) == pytest.approx(source, rel=0.05)


def test_window_taller_than_the_frame_is_padded_black(tmp_path):
  """Only what cannot fit is padding: the window keeps its size and position where the frame allows."""
  path = write_disc_video(tmp_path / 'tall.mp4', 640, 360, centre=(400, 180), radius=40)
  task = planned_task(path, crop=(200, -100, 500, 500))
  assert task.window == (140, 0, 500, 360) and task.padding == (0, 100, 0, 40)
  assert task.square_side == 500
  frames, _, _ = rendered_frames(task, str(tmp_path / 'out.mp4'))
  image = frames[0].astype(int)
  top, bottom = round(100 / 500 * 128), round(40 / 500 * 128)
  assert image[:top - 1].max() < 20 and image[128 - bottom + 1:].max() < 20  # black bars
  assert image[top + 1:128 - bottom - 1, 2].mean() == pytest.approx(GREY, abs=8)
  assert disc_aspect(frames[0]) == pytest.approx(1.0, abs=0.05)


def test_fixed_mode_full_frame_is_letterboxed_not_squashed(tmp_path):
  path = write_disc_video(tmp_path / 'wide.mp4', 640, 360, centre=(320, 180), radius=60)
  task = planned_task(path, crop_mode='fixed')
  assert task.crop_mode == 'full'
  assert task.window == (0, 0, 640, 360) and task.padding == (0, 140, 0, 140)
  frames, _, _ = rendered_frames(task, str(tmp_path / 'out.mp4'))
  image = frames[0].astype(int)
  bar = round(140 / 640 * 128)
  assert image[:bar - 1].max() < 20 and image[128 - bar + 1:].max() < 20
  assert image[64, 2].mean() == pytest.approx(GREY, abs=8)
  assert disc_aspect(frames[0]) == pytest.approx(1.0, abs=0.05)


def test_window_off_the_frame_is_rejected():
  info = ProbeInfo(duration=10, width=640, height=360, fps=25, has_audio=True, interlaced=False, video_codec='h264')
  source = Source('s', 'x.mp4', (ClipSpec('s_0', 0, 0.0, 2.0, (700, 10, 50, 50)),))
  (reject,) = [r.value for r in PlanClips().process((source, [MediaFile('x.mp4', info)]))]
  assert reject.reason == 'bad_crop'


# ----------------------------------------------------------------------------- produced length

def wav_samples(wav: bytes) -> int:
  with wave.open(io.BytesIO(wav)) as handle:
    return handle.getnframes()


def decoded_audio_seconds(path) -> float:
  with av.open(path) as container:
    stream = container.streams.audio[0]
    return sum(frame.samples for frame in container.decode(stream)) / stream.rate


def test_short_clip_audio_and_end_follow_the_frames_produced(tmp_path):
  """The video runs out 5% before the planned end while the audio goes on: everything ends with the video."""
  path = write_disc_video(tmp_path / 'short.mp4', 320, 240, centre=(160, 120), radius=40, seconds=3.0,
                          audio_s=4.0)
  info = probe(path)
  task = ClipTask('s_0', 's', path, MediaFile(path, info), 0.5, 3.13, window=(40, 0, 240, 240))
  fn = RenderClips(str(tmp_path / 'work'), 128, 25.0, 18, 'ultrafast')
  fn.setup()
  outputs = list(fn.process(task))
  (rendered,) = [o for o in outputs if isinstance(o, RenderedClip)]
  planned = round((3.13 - 0.5) * 25)
  assert planned * 0.9 <= rendered.num_frames < planned - 1  # short, within the accepted 10 %
  video_s = rendered.num_frames / 25
  assert rendered.task.end == pytest.approx(0.5 + video_s)
  assert wav_samples(rendered.wav) == round(video_s * 16000)
  assert decoded_audio_seconds(rendered.mp4_uri) == pytest.approx(video_s, abs=1024 / 16000)


# ----------------------------------------------------------------------------- clip bounds

def long_source(duration, clips):
  info = ProbeInfo(duration=duration, width=640, height=360, fps=25, has_audio=True, interlaced=False,
                   video_codec='h264')
  return Source('long', 'long.mp4', clips), [MediaFile('long.mp4', info)]


def split(duration, clips, **options):
  outputs = list(PlanClips(**options).process(long_source(duration, clips)))
  tasks = [o for o in outputs if isinstance(o, ClipTask)]
  rejects = [o.value for o in outputs if isinstance(getattr(o, 'value', None), Reject)]
  return tasks, rejects


def test_whole_video_clip_is_cut_into_bounded_pieces():
  tasks, rejects = split(700.0, (ClipSpec('long', 0),), max_clip_s=300)
  assert not rejects
  assert [t.clip_id for t in tasks] == ['long_s0', 'long_s233333', 'long_s466667']
  assert {t.planned_id for t in tasks} == {'long'}
  assert [(t.start, t.end) for t in tasks] == [(0.0, 233.333), (233.333, 466.667), (466.667, 700.0)]
  assert all('.' not in t.clip_id for t in tasks)


def test_clips_within_the_limit_or_with_the_limit_off_stay_whole():
  tasks, _ = split(700.0, (ClipSpec('a', 0, 10.0, 310.0),), max_clip_s=300)
  assert [(t.clip_id, t.planned_id) for t in tasks] == [('a', '')]
  tasks, _ = split(700.0, (ClipSpec('long', 0),), max_clip_s=0)
  assert [(t.clip_id, t.start, t.end) for t in tasks] == [('long', 0.0, 700.0)]


def test_a_tail_too_short_to_keep_is_rejected_against_its_planned_clip():
  """Even pieces would be under --min_duration here, so pieces are --max_clip_s long and the tail is too short."""
  tasks, rejects = split(100.0, (ClipSpec('c', 0, 10.0, 12.5),), max_clip_s=2.0, min_duration=1.5)
  assert [(t.clip_id, t.planned_id, t.start, t.end) for t in tasks] == [('c_s10000', 'c', 10.0, 12.0)]
  (reject,) = rejects
  assert (reject.id, reject.planned_id, reject.reason) == ('c_s12000', 'c', 'too_short')
