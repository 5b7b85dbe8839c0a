"""Download paths against a loopback server that behaves like a real media host."""
import os

import pytest

from beam_pipeline.elements import ClipSpec, Reject, Source
from transforms.download import DownloadError, DownloadSource, http_download, ytdlp_download
from transforms.probe import probe
from tests.helpers import media_server


def test_http_resumes_with_range(tmp_path, media_dir):
  original = (media_dir / 'talking.mp4').read_bytes()
  dest = tmp_path / 'part.mp4'
  dest.write_bytes(original[:100000])  # a download cut off earlier
  with media_server(str(media_dir)) as url:
    http_download(f'{url}/talking.mp4', str(dest), max_bytes=10**9, timeout_s=10, deadline=1e18)
  assert dest.read_bytes() == original


def test_http_size_limit(tmp_path, server):
  with pytest.raises(DownloadError) as error:
    http_download(f'{server}/talking.mp4', str(tmp_path / 'x.mp4'), max_bytes=1000, timeout_s=10, deadline=1e18)
  assert error.value.reason == 'too_large'


def test_ytdlp_fetches_only_the_section(tmp_path, server, media_dir):
  path = ytdlp_download(f'{server}/talking.mp4', str(tmp_path / 'sec'), None, (2.0, 5.0), 10**9, 10, 1e18)
  info = probe(path)
  assert info.has_audio and 2.5 <= info.duration <= 4.5
  assert os.path.getsize(path) < os.path.getsize(media_dir / 'talking.mp4')


def test_section_download_without_range_support_is_a_corrupt_reject(tmp_path, server):
  """yt-dlp 'succeeds' with a 261-byte stub when the server ignores Range; the probe must catch it."""
  source = Source('s', f'{server}/norange/talking.mp4', (ClipSpec('s_0', 0, 2.0, 5.0),))
  out = list(DownloadSource(str(tmp_path), download_method='ytdlp', retries=0, timeout_s=60).process(source))
  assert [(o.value.id, o.value.reason) for o in out] == [('s_0', 'download_corrupt')]
  assert 'bytes' in out[0].value.detail


def test_download_is_cached_by_source_id(tmp_path, server):
  source = Source('cached', f'{server}/talking.mp4', (ClipSpec('cached_0', 0),))
  fn = DownloadSource(str(tmp_path))
  (_, first), = list(fn.process(source))
  mtime = os.path.getmtime(first[0].uri)
  (_, second), = list(fn.process(source))
  assert second[0].uri == first[0].uri and os.path.getmtime(second[0].uri) == mtime


def test_missing_local_file_is_rejected(tmp_path):
  out = list(DownloadSource(str(tmp_path)).process(Source('gone', str(tmp_path / 'gone.mp4'), (ClipSpec('gone_0', 0),))))
  assert [(o.value.id, o.value.reason) for o in out] == [('gone_0', 'not_found')]
