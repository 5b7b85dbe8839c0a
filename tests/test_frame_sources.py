"""Frame folders (VFHQ layout) and WebDataset sample tars as inputs (transforms/sources/)."""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
import zipfile

import av
import cv2
import numpy as np
import pytest

from beam_pipeline.demo import VideoSpec, _background, _sprite, render_frame, write_video
from transforms.core.elements import Reject, Source
from transforms.lib.probe import probe_here
from transforms.lib.safety import InputPolicy
from transforms.sources.archives import is_frame_url, is_member_url
from transforms.sources.frames import FolderEncoder, FrameFolder, FrameFolderOptions
from transforms.sources.manifest import list_input, read_input

FPS = 30.0


def astronaut_frames(count: int, size: int = 256, seed: int = 0):
  """The demo's talking astronaut as RGB frames, `count` of them at 30 fps."""
  spec = VideoSpec(duration=count / FPS, fps=FPS, width=size, height=size, audio=False, face_scale=size / 400,
                   motion_px=size / 25, seed=seed)
  background, sprite = _background(spec), _sprite(spec.face_scale)
  return [render_frame(spec, index / FPS, background, sprite) for index in range(count)]


def png(image: np.ndarray) -> bytes:
  ok, data = cv2.imencode('.png', cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
  assert ok
  return data.tobytes()


def write_frame_zip(path: str, folders: dict) -> str:
  """A VFHQ-style zip: {folder name: [RGB frame or raw bytes, ...]} as `<folder>/<NNNNN>.png`."""
  with zipfile.ZipFile(path, 'w') as archive:
    for folder, frames in folders.items():
      for index, frame in enumerate(frames):
        archive.writestr(f'{folder}/{index:05d}.png', frame if isinstance(frame, bytes) else png(frame))
  return path


def decoded(uri: str):
  with av.open(uri) as container:
    return [frame.to_ndarray(format='rgb24') for frame in container.decode(video=0)]


@pytest.fixture(scope='module')
def frames():
  return astronaut_frames(60)


def test_frame_folders_become_lossless_videos_at_the_frame_rate(tmp_path, frames):
  archive = write_frame_zip(str(tmp_path / 'group124.zip'), {'Clip+abc+P0': frames, 'Clip+def+P1': frames[:45]})
  listed = list(list_input(archive, frames=FrameFolderOptions(fps=FPS)))
  assert [s.source_id for s in listed] == ['Clip_abc_P0', 'Clip_def_P1']
  assert all(is_member_url(s.url) for s in listed)  # nothing is read before the shuffle
  items = list(read_input(archive, work_dir=str(tmp_path / 'work'), frames=FrameFolderOptions(fps=FPS)))
  assert all(isinstance(item, Source) for item in items), items
  first, second = items
  assert first.clips[0].clip_id == 'Clip_abc_P0_0'
  info = probe_here(first.url)
  assert (info.width, info.height, info.fps, info.has_audio) == (256, 256, FPS, False)
  assert info.duration == pytest.approx(60 / FPS)
  video = decoded(first.url)
  assert len(video) == 60 and len(decoded(second.url)) == 45
  assert all(np.array_equal(got, want) for got, want in zip(video, frames))  # lossless


def test_frame_rate_comes_from_the_options(tmp_path, frames):
  archive = write_frame_zip(str(tmp_path / 'clips.zip'), {'a': frames[:50]})
  (source,) = read_input(archive, work_dir=str(tmp_path / 'work'), frames=FrameFolderOptions(fps=25.0))
  info = probe_here(source.url)
  assert info.fps == 25.0 and info.duration == pytest.approx(2.0)


def test_encoding_is_deterministic_and_not_repeated(tmp_path, frames):
  archive = write_frame_zip(str(tmp_path / 'clips.zip'), {'a': frames[:10]})
  (one,) = read_input(archive, work_dir=str(tmp_path / 'one'))
  (two,) = read_input(archive, work_dir=str(tmp_path / 'two'))
  with open(one.url, 'rb') as a, open(two.url, 'rb') as b:
    assert a.read() == b.read()  # a retried bundle rewrites the same bytes
  stamp = os.stat(one.url).st_mtime_ns
  (again,) = read_input(archive, work_dir=str(tmp_path / 'one'))
  assert again.url == one.url and os.stat(one.url).st_mtime_ns == stamp


def test_odd_sizes_lose_a_row_and_a_column(tmp_path, frames):
  odd = [frame[:255, :253] for frame in frames[:8]]
  archive = write_frame_zip(str(tmp_path / 'odd.zip'), {'odd': odd})
  (source,) = read_input(archive, work_dir=str(tmp_path / 'work'))
  video = decoded(source.url)
  assert video[0].shape == (254, 252, 3)
  assert np.array_equal(video[3], odd[3][:254, :252])


def test_bad_folders_are_rejected_with_reasons(tmp_path, frames):
  broken = png(frames[1])[:200]
  archive = write_frame_zip(str(tmp_path / 'bad.zip'), {
      'broken': [frames[0], broken, frames[2]],
      'mixed': [frames[0], cv2.resize(frames[1], (128, 128))],
      'single': [frames[0]],
      'good': frames[:4],
  })
  listed = {item.id if isinstance(item, Reject) else item.source_id: item
            for item in read_input(archive, work_dir=str(tmp_path / 'work'))}
  assert isinstance(listed['good'], Source)
  assert (listed['single'].reason, listed['single'].stage) == ('too_few_frames', 'manifest')
  broken_reject = next(r for r in listed.values() if isinstance(r, Reject) and r.source_id == 'broken')
  assert (broken_reject.id, broken_reject.reason) == ('broken_0', 'bad_frame')
  assert 'broken/00001.png' in broken_reject.detail
  mixed_reject = next(r for r in listed.values() if isinstance(r, Reject) and r.source_id == 'mixed')
  assert mixed_reject.reason == 'mixed_frame_sizes' and '128x128' in mixed_reject.detail
  assert not os.path.exists(tmp_path / 'work' / 'archives' / 'bad' / 'broken.mkv')


def test_frame_limits(tmp_path, frames):
  archive = write_frame_zip(str(tmp_path / 'big.zip'), {'long': frames[:5]})
  (too_many,) = list_input(archive, frames=FrameFolderOptions(max_frames=4))
  assert too_many.reason == 'too_many_frames'
  (source,) = list_input(archive, frames=FrameFolderOptions(max_pixels=100 * 100))
  (too_big,) = read_input(archive, work_dir=str(tmp_path / 'work'), frames=FrameFolderOptions(max_pixels=100 * 100))
  assert too_big.reason == 'too_many_pixels' and source.source_id == 'long'
  (over_budget,) = read_input(archive, work_dir=str(tmp_path / 'work2'), max_archive_mb=0.01)
  assert over_budget.reason == 'too_large'
  (member_cap,) = list_input(archive, max_member_mb=0.01)
  assert member_cap.reason == 'too_large'


def test_frame_folder_urls_are_checked(tmp_path, frames):
  archive = write_frame_zip(str(tmp_path / 'x.zip'), {'a': frames[:3]})
  (source,) = list_input(archive)
  folder = FrameFolder.from_url(source.url)
  assert folder.file == 'x/a.mkv' and folder.frames.count == 3 and len(folder.frames.load()) == 3
  assert folder.fps == FPS
  tampered = source.url.replace('file=x%2Fa.mkv', 'file=..%2Fa.mkv')
  with pytest.raises(ValueError):
    FrameFolder.from_url(tampered)
  manifest = tmp_path / 'm.jsonl'
  manifest.write_text(json.dumps({'id': 'x', 'url': source.url}) + '\n')
  (refused,) = list_input(str(manifest))
  assert refused.reason == 'bad_url'  # an input cannot name the listing's own urls


def test_frame_lists_go_to_a_listing_file_not_the_url(tmp_path, frames):
  listings = tmp_path / 'work' / 'frame_listings'
  options = FrameFolderOptions(listing_dir=str(listings))
  many = write_frame_zip(str(tmp_path / 'many.zip'), {'long': [b'\0'] * 3000, 'short': [b'\0'] * 3})
  long_source, short_source = list_input(many, frames=options)
  assert len(long_source.url) < 1000 and abs(len(long_source.url) - len(short_source.url)) < 50
  (listing,) = listings.iterdir()  # one file per archive, named by its content
  assert listing.name == hashlib.sha256(listing.read_bytes()).hexdigest() + '.jsonl'
  assert [len(json.loads(line)) for line in listing.read_text().splitlines()] == [3000, 3]
  stamp = listing.stat().st_mtime_ns
  again = list(list_input(many, frames=options))  # a retried listing: same urls, the file is not rewritten
  assert [s.url for s in again] == [long_source.url, short_source.url] and listing.stat().st_mtime_ns == stamp
  assert [f.name for f in FrameFolder.from_url(long_source.url).frames.load()][-1] == 'long/02999.png'

  archive = write_frame_zip(str(tmp_path / 'clips.zip'), {'a': frames[:6]})
  (source,) = read_input(archive, work_dir=str(tmp_path / 'work'), frames=options)
  assert all(np.array_equal(got, want) for got, want in zip(decoded(source.url), frames[:6]))


def test_a_changed_or_lost_listing_file_is_not_read_as_frames(tmp_path, frames):
  listings = tmp_path / 'frame_listings'
  archive = write_frame_zip(str(tmp_path / 'clips.zip'), {'a': frames[:4]})
  (source,) = list_input(archive, frames=FrameFolderOptions(listing_dir=str(listings)))
  encoder = FolderEncoder(str(tmp_path / 'work'))
  (listing,) = listings.iterdir()
  listing.write_bytes(listing.read_bytes().replace(b'a/00003.png', b'a/00002.png'))
  (reject,) = encoder.encode(source)
  assert reject.reason == 'bad_url' and 'not the one listed' in reject.detail
  listing.unlink()
  with pytest.raises(OSError):  # not the input's fault: raised, so the dead letter marks it transient
    list(encoder.encode(source))


def test_lone_images_and_images_beside_videos_are_not_frame_folders(tmp_path, frames):
  video = b'\0' * 64  # listing reads no video member
  with zipfile.ZipFile(tmp_path / 'videos.zip', 'w') as archive:
    archive.writestr('talks/a.mp4', video)
    archive.writestr('talks/a_thumb1.jpg', png(frames[0]))  # beside a video: a poster
    archive.writestr('talks/a_thumb2.jpg', png(frames[1]))
    archive.writestr('thumb1.jpg', png(frames[0]))  # a lone image in an archive of videos
    for index in range(3):
      archive.writestr(f'Clip+x/{index:05d}.png', png(frames[index]))  # a frame folder beside the videos
  items = list(list_input(str(tmp_path / 'videos.zip')))
  assert [(type(i).__name__, i.source_id) for i in items] == [('Source', 'talks_a'), ('Source', 'Clip_x')]
  assert is_frame_url(items[1].url) and not is_frame_url(items[0].url)
  with zipfile.ZipFile(tmp_path / 'images.zip', 'w') as archive:
    archive.writestr('Clip+y/00000.png', png(frames[0]))  # an archive of images only: a clip too short
  (reject,) = list_input(str(tmp_path / 'images.zip'))
  assert (reject.id, reject.reason) == ('Clip_y', 'too_few_frames')


# ----------------------------------------------------------------------------- WebDataset sample tars

def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


class _Marker:
  """Unpickling this writes a file: proof of whether a pickle was loaded."""

  def __init__(self, path):
    self.path = path

  def __reduce__(self):
    return (open, (self.path, 'w'))


def sample_tar(path: str, video: bytes, pyd_marker: str = '') -> str:
  """A packed dataset tar: `clip1` as this pipeline writes it, `clip2` as MegActor's scripts do."""
  array = io.BytesIO()
  np.save(array, np.zeros((3, 134, 2), np.float32))
  with tarfile.open(path, 'w') as tar:
    _add(tar, 'clip1.dwpose_result.npy', array.getvalue())
    _add(tar, 'clip1.json', json.dumps({'id': 'clip1', 'size': [256, 256], 'crop': {'mode': 'detect'}}).encode())
    _add(tar, 'clip1.mp4', video)
    _add(tar, 'clip1.mp4_styled', video)
    _add(tar, 'clip1.swapped.mp4', video)
    _add(tar, 'clip2.mp4', video)
    if pyd_marker:
      _add(tar, 'clip2.dwpose_result.pyd', pickle.dumps(_Marker(pyd_marker)))
    else:
      _add(tar, 'clip2.wav', b'RIFF')
  return path


def test_sample_tars_give_one_source_per_sample(tmp_path, frames):
  video = tmp_path / 'v.mp4'
  write_video(str(video), VideoSpec(duration=1.0, width=256, height=256, audio=False))
  archive = sample_tar(str(tmp_path / 'group1.tar'), video.read_bytes())
  items = list(read_input(archive, work_dir=str(tmp_path / 'work')))
  assert [(s.source_id, s.clips[0].clip_id) for s in items] == [('clip1', 'clip1_0'), ('clip2', 'clip2_0')]
  assert items[0].clips[0].crop == (0, 0, 256, 256)  # already cropped: the full frame, not a second crop
  assert items[1].clips[0].crop is None
  assert probe_here(items[0].url).width == 256


def test_pickled_sample_members_refuse_the_tar_and_are_never_loaded(tmp_path):
  marker = tmp_path / 'unpickled'
  archive = sample_tar(str(tmp_path / 'megactor.tar'), b'\0' * 64, pyd_marker=str(marker))
  (refused,) = list_input(archive)
  assert (refused.id, refused.reason) == ('megactor', 'pickle_refused')
  assert 'clip2.dwpose_result.pyd' in refused.detail and '--read_input_pickles' in refused.detail
  trusted = list(list_input(archive, policy=InputPolicy(read_input_pickles=True)))
  assert [s.source_id for s in trusted] == ['clip1', 'clip2']
  assert not marker.exists()  # neither listing loaded the pickle


def test_a_glob_of_sample_tars_is_one_input(tmp_path):
  video = write_video(str(tmp_path / 'v.mp4'), VideoSpec(duration=0.5, width=64, height=64, audio=False))
  with open(video, 'rb') as handle:
    data = handle.read()
  for name, key in (('group1.tar', 'a'), ('group2.tar', 'b')):
    with tarfile.open(tmp_path / name, 'w') as tar:
      _add(tar, f'{key}.mp4', data)
      _add(tar, f'{key}.mp4_styled', data)
  items = list(list_input(str(tmp_path / 'group*.tar')))
  assert [s.source_id for s in items] == ['a', 'b']
