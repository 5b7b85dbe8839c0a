"""One-pass rendering: frame-accurate cuts, fps resampling, deinterlacing, crop windows."""
from fractions import Fraction

import av
import numpy as np

from transforms.core.elements import ClipTask, MediaFile
from transforms.lib.geometry import fit_window, scale_window
from transforms.lib.probe import probe
from transforms.render import render


def write_counter_video(path, frames=90, fps=30, interlaced=False, gop=250):
  """Each frame shows its index as an 8-bit barcode, so the output shows which source frame it came from."""
  with av.open(str(path), 'w') as out:
    stream = out.add_stream('libx264', rate=fps)
    stream.width, stream.height, stream.pix_fmt = 320, 240, 'yuv420p'
    options = {'g': str(gop), 'crf': '10', 'preset': 'ultrafast'}
    if interlaced:
      options.update({'flags': '+ilme+ildct', 'x264-params': 'tff=1'})
      stream.codec_context.flags |= 0  # interlaced coding is set through the options above
    stream.options = options
    audio = out.add_stream('aac', rate=16000)
    audio.layout = 'mono'
    for index in range(frames):
      image = np.zeros((240, 320, 3), np.uint8)
      for bit in range(8):
        if index >> bit & 1:
          image[:, bit * 40:(bit + 1) * 40] = 255
      frame = av.VideoFrame.from_ndarray(image, format='rgb24')
      frame.pts, frame.time_base = index, Fraction(1, fps)
      out.mux(stream.encode(frame))
    out.mux(stream.encode())
    samples = np.zeros((1, 1024), np.float32)
    for block in range(frames * 16000 // fps // 1024):
      frame = av.AudioFrame.from_ndarray(samples, format='flt', layout='mono')
      frame.sample_rate, frame.pts, frame.time_base = 16000, block * 1024, Fraction(1, 16000)
      out.mux(audio.encode(frame))
    out.mux(audio.encode())
  return str(path)


def run_render(path, start, end, fps=25, size=128):
  info = probe(path)
  task = ClipTask('c_0', 'c', path, MediaFile(path, info), start, end, window=(0, 0, 320, 240))
  out_path = str(path) + '.out.mp4'
  frames, produced = [], None
  generator = render(task, out_path, size, fps, crf=18, preset='ultrafast')
  try:
    while True:
      frames.append(next(generator)[1])
  except StopIteration as done:
    produced, wav = done.value
  return info, frames, produced, wav, out_path


def source_index(image):
  stripes = image.reshape(image.shape[0], 8, -1, 3).mean(axis=(0, 2, 3))
  return sum(1 << bit for bit in range(8) if stripes[bit] > 127)


def test_cut_is_frame_accurate_not_keyframe_snapped(tmp_path):
  path = write_counter_video(tmp_path / 'counter.mp4')  # one keyframe for the whole file
  _, frames, produced, wav, _ = run_render(path, 1.0, 2.0, fps=30)
  assert produced == len(frames) == 30
  assert [source_index(f) for f in frames] == list(range(30, 60))


def test_fps_resampling_picks_nearest_source_frames(tmp_path):
  path = write_counter_video(tmp_path / 'counter.mp4')
  _, frames, produced, _, out_path = run_render(path, 0.4, 1.4, fps=25)
  assert produced == 25
  expected = [round((0.4 + k / 25) * 30) for k in range(25)]
  assert [source_index(f) for f in frames] == expected
  with av.open(out_path) as container:
    assert float(container.streams.video[0].average_rate) == 25
    assert sum(1 for _ in container.decode(video=0)) == 25


def test_audio_matches_video_length(tmp_path):
  path = write_counter_video(tmp_path / 'counter.mp4')
  _, _, produced, wav, out_path = run_render(path, 0.5, 2.5)
  assert produced == 50
  assert len(wav) - 44 == 2 * 16000 * 2  # 2 s of 16 kHz mono PCM
  with av.open(out_path) as container:
    audio = container.streams.audio[0]
    assert abs(float(audio.duration * audio.time_base) - 2.0) < 0.1


def test_interlaced_source_is_detected_and_deinterlaced(tmp_path):
  path = write_counter_video(tmp_path / 'interlaced.mp4', interlaced=True)
  info, frames, produced, _, _ = run_render(path, 0.0, 1.0)
  assert info.interlaced
  assert produced == 25 and frames[0].shape == (128, 128, 3)


def test_crop_window_scaling_and_fitting():
  assert scale_window((608, 0, 726, 726), 1080, 720) == (405, 0, 484, 484)
  assert scale_window((10, 20, 30, 40), None, 720) == (10, 20, 30, 40)
  # a window larger than the frame: the whole frame, the rest padding where the window hung over it
  assert fit_window((-10, -10, 3000, 3000), 640, 480) == ((0, 0, 640, 480), (10, 10, 2350, 2510))
  # over the corner: shifted back in, size kept; a 100x101 window becomes a 101-pixel square
  assert fit_window((600, 400, 100, 101), 640, 480) == ((539, 379, 101, 101), (0, 0, 0, 0))
  assert fit_window((1700, 100, 400, 400), 1920, 1080) == ((1520, 100, 400, 400), (0, 0, 0, 0))
  assert fit_window((700, 10, 50, 50), 640, 480) is None


def test_section_download_keeps_source_time(tmp_path):
  """A yt-dlp section starts near, not at, the requested time; the cut must still land on source frame 90."""
  from tests.helpers import media_server
  from transforms.core.elements import ClipSpec, Source
  from transforms.lib.safety import InputPolicy
  from transforms.plan import PlanClips
  from transforms.sources.download import DownloadSource
  served = tmp_path / 'served'
  served.mkdir()
  write_counter_video(served / 'counter.mp4', frames=150, gop=40)  # keyframes off the section start
  with media_server(str(served)) as url:
    source = Source('ctr', f'{url}/counter.mp4', (ClipSpec('ctr_0', 0, 3.0, 4.0, (0, 0, 320, 240)),))
    (downloaded,) = DownloadSource(str(tmp_path / 'work'), download_method='ytdlp',
                                   policy=InputPolicy(allow_private_hosts=True)).download(source)
  media = downloaded[1][0]
  assert media.offset > 0  # a section, not the whole file
  (task,) = list(PlanClips().process(downloaded))
  frames = []
  generator = render(task, str(tmp_path / 'out.mp4'), 128, 30, crf=18, preset='ultrafast')
  try:
    while True:
      frames.append(next(generator)[1])
  except StopIteration:
    pass
  assert [source_index(f) for f in frames] == list(range(90, 120))
