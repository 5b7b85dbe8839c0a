"""Download paths against a loopback server that behaves like a real media host."""
import os
import shutil
import subprocess
import time

import apache_beam as beam
import imageio_ffmpeg
import pytest

from tests.download_server import download_server
from tests.helpers import media_server
from transforms.core.elements import ClipSpec, Source
from transforms.lib.probe import probe
from transforms.lib.safety import InputPolicy
from transforms.sources.download import DownloadError, DownloadSource, http_download, ytdlp_download

LOOPBACK = InputPolicy(allow_private_hosts=True)  # these tests serve on 127.0.0.1


def _rejects(outputs):
  return [(o.value.id, o.value.stage, o.value.reason) for o in outputs if isinstance(o, beam.pvalue.TaggedOutput)]


def _served(outputs):
  return [o for o in outputs if not isinstance(o, beam.pvalue.TaggedOutput)]


@pytest.fixture(scope='module')
def hosted(tmp_path_factory, media_dir):
  """talking.mp4, three of it in a row (long.mp4), an HLS rendition of it (VOD, and the same playlist
  without its end as a live stream), and a page embedding two videos."""
  root = tmp_path_factory.mktemp('hosted')
  shutil.copy(media_dir / 'talking.mp4', root / 'talking.mp4')
  (root / 'hls').mkdir()
  subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), '-loglevel', 'error', '-i', str(root / 'talking.mp4'),
                  '-c:v', 'libx264', '-preset', 'ultrafast', '-g', '25', '-sc_threshold', '0', '-c:a', 'aac',
                  '-f', 'hls', '-hls_time', '1', '-hls_list_size', '0', '-hls_segment_filename',
                  str(root / 'hls' / 'seg%03d.ts'), str(root / 'hls' / 'vod.m3u8')], check=True)
  subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), '-loglevel', 'error', '-stream_loop', '2', '-i',
                  str(root / 'talking.mp4'), '-c', 'copy', str(root / 'long.mp4')], check=True)
  playlist = (root / 'hls' / 'vod.m3u8').read_text()
  (root / 'hls' / 'live.m3u8').write_text(playlist.replace('#EXT-X-ENDLIST\n', ''))
  (root / 'two.html').write_text('<html><body><video src="talking.mp4"></video>'
                                 '<video src="hls/vod.m3u8"></video></body></html>')
  return root


def test_http_resumes_with_range(tmp_path, media_dir):
  original = (media_dir / 'talking.mp4').read_bytes()
  dest = tmp_path / 'part.mp4'
  dest.write_bytes(original[:100000])  # a download cut off earlier
  with media_server(str(media_dir)) as url:
    http_download(f'{url}/talking.mp4', str(dest), max_bytes=10**9, timeout_s=10, deadline=1e18, policy=LOOPBACK)
  assert dest.read_bytes() == original


def test_http_size_limit(tmp_path, server):
  with pytest.raises(DownloadError) as error:
    http_download(f'{server}/talking.mp4', str(tmp_path / 'x.mp4'), max_bytes=1000, timeout_s=10, deadline=1e18,
                  policy=LOOPBACK)
  assert error.value.reason == 'too_large'


def test_ytdlp_fetches_only_the_section(tmp_path, server, media_dir):
  path = ytdlp_download(f'{server}/talking.mp4', str(tmp_path / 'sec'), None, (2.0, 5.0), 10**9, 10, 1e18,
                       policy=LOOPBACK)
  info = probe(path)
  assert info.has_audio and 2.5 <= info.duration <= 4.5
  assert os.path.getsize(path) < os.path.getsize(media_dir / 'talking.mp4')


def test_section_download_without_range_support_is_a_corrupt_reject(tmp_path, server):
  """yt-dlp 'succeeds' with a 261-byte stub when the server ignores Range; the probe must catch it."""
  source = Source('s', f'{server}/norange/talking.mp4', (ClipSpec('s_0', 0, 2.0, 5.0),))
  fn = DownloadSource(str(tmp_path), download_method='ytdlp', retries=0, timeout_s=60, policy=LOOPBACK)
  out = fn.download(source)
  assert _rejects(out) == [('s_0', 'probe', 'download_corrupt')]
  assert 'bytes' in out[0].value.detail


def test_download_is_cached_by_what_was_asked(tmp_path, server):
  source = Source('cached', f'{server}/talking.mp4', (ClipSpec('cached_0', 0),))
  fn = DownloadSource(str(tmp_path), policy=LOOPBACK)
  (_, first), = fn.download(source)
  mtime = os.path.getmtime(first[0].uri)
  (_, second), = fn.download(source)
  assert second[0].uri == first[0].uri and os.path.getmtime(second[0].uri) == mtime


def test_section_cache_key_follows_the_range_and_height(tmp_path, server):
  """An edited time range or height downloads again; the old file is never reused for it."""
  fn = DownloadSource(str(tmp_path), download_method='ytdlp', section_margin_s=0.0, policy=LOOPBACK)

  def fetch(start, end, height=None):
    (_, (media,)), = fn.download(Source('sec', f'{server}/talking.mp4', (ClipSpec('sec_0', 0, start, end),), height))
    return media

  first = fetch(1.0, 3.0)
  moved = fetch(4.0, 7.0)
  assert moved.uri != first.uri and moved.offset == 4.0 and probe(moved.uri).duration > 2.5
  taller = fetch(1.0, 3.0, height=360)
  assert taller.uri not in (first.uri, moved.uri)
  again = fetch(1.0, 3.0)
  assert again.uri == first.uri and os.path.getmtime(again.uri) == os.path.getmtime(first.uri)


def test_one_failed_section_rejects_only_its_clip(tmp_path, hosted):
  """The HLS metadata knows the video is 8 s long: a clip starting at 20 s is `clip_past_end` before any
  download, the clip before it is still fetched and handed on alone."""
  with download_server(str(hosted)) as server:
    clips = (ClipSpec('hls_0', 0, 1.0, 3.0), ClipSpec('hls_1', 1, 20.0, 22.0))
    source = Source('hls', f'{server.url}/hls/vod.m3u8', clips)
    out = DownloadSource(str(tmp_path), policy=LOOPBACK).download(source)
  assert _rejects(out) == [('hls_1', 'download', 'clip_past_end')]
  (kept, media), = _served(out)
  assert [c.clip_id for c in kept.clips] == ['hls_0'] and len(media) == 1 and media[0].offset == 0.0


def test_playlists_and_live_streams_are_refused(tmp_path, hosted):
  with download_server(str(hosted)) as server:
    fn = DownloadSource(str(tmp_path), policy=LOOPBACK)
    page = fn.download(Source('page', f'{server.url}/two.html', (ClipSpec('page_0', 0, 0.0, 2.0),)))
    live = fn.download(Source('live', f'{server.url}/hls/live.m3u8', (ClipSpec('live_0', 0, 0.0, 2.0),)))
    vod = fn.download(Source('vod', f'{server.url}/hls/vod.m3u8', (ClipSpec('vod_0', 0, 0.0, 2.0),)))
  assert _rejects(page) == [('page_0', 'download', 'playlist_refused')] and '2 videos' in page[0].value.detail
  assert _rejects(live) == [('live_0', 'download', 'live_refused')]
  assert _rejects(vod) == [] and len(_served(vod)) == 1


def test_size_limit_holds_for_hls_and_section_downloads(tmp_path, hosted):
  """yt-dlp's --max-filesize bounds each HLS fragment, not their sum, and not section downloads at all:
  the child is killed once its output folder outgrows the limit, long before the dripping server
  (160 KB/s) would have sent everything (HLS: 1.6 MB in 1 s fragments under the limit; section: 1.9 MB)."""
  with download_server(str(hosted)) as server:
    for name, url, section, limit in (('hls', f'{server.url}/drip/hls/vod.m3u8', None, 400_000),
                                      ('section', f'{server.url}/drip/long.mp4', (0.0, 20.0), 100_000)):
      assert max(p.stat().st_size for p in (hosted / 'hls').glob('*.ts')) < 400_000
      folder = tmp_path / name
      folder.mkdir()
      with pytest.raises(DownloadError) as error:
        ytdlp_download(url, str(folder / 'x'), None, section, limit, 10, time.monotonic() + 60, policy=LOOPBACK)
      # 'grew past' comes only from the watcher that kills the child while it still runs: the download was cut
      assert error.value.reason == 'too_large' and 'grew past' in str(error.value), (name, error.value)


def test_time_limit_covers_every_section(tmp_path, hosted):
  """Four sections from a server that answers each request after 2 s, with a 4 s limit for the whole source:
  at 4 s the download stops, and every section not done by then is rejected at once (a limit per section would
  take 2 s for the metadata and at least 4 x 2 s more)."""
  with download_server(str(hosted)) as server:
    clips = tuple(ClipSpec(f'slow_{k}', k, 1.6 * k, 1.6 * k + 1.2) for k in range(4))
    started = time.monotonic()
    out = DownloadSource(str(tmp_path), download_method='ytdlp', timeout_s=4, retries=0, section_margin_s=0.0,
                         policy=LOOPBACK).download(Source('slow', f'{server.url}/delay/2/talking.mp4', clips))
    elapsed = time.monotonic() - started
  rejects = _rejects(out)
  assert rejects and {reason for _, _, reason in rejects} == {'download_timeout'}, rejects
  assert elapsed < 9, (out, elapsed)  # the limit is 4 s; sections one after another would pass 10 s


def test_body_cut_short_without_length_is_transient(tmp_path, media_dir):
  """No Content-Length and a closed connection look like a complete body; when the file then does not
  decode, the reason is `truncated` (retried by --incremental), not `download_corrupt`."""
  (tmp_path / 'srv').mkdir()
  shutil.copy(media_dir / 'talking.mp4', tmp_path / 'srv' / 'talking.mp4')
  (tmp_path / 'srv' / 'junk.mp4').write_bytes(os.urandom(50_000))
  with download_server(str(tmp_path / 'srv')) as server:
    fn = DownloadSource(str(tmp_path / 'work'), retries=0, policy=LOOPBACK)
    cut = fn.download(Source('cut', f'{server.url}/nolength/talking.mp4', (ClipSpec('cut_0', 0),)))
    junk = fn.download(Source('junk', f'{server.url}/junk.mp4', (ClipSpec('junk_0', 0),)))
  assert _rejects(cut) == [('cut_0', 'download', 'truncated')] and 'Content-Length' in cut[0].value.detail
  assert _rejects(junk) == [('junk_0', 'probe', 'download_corrupt')]  # whole (by its length) and still not video


def test_retry_after_is_honoured_within_the_time_limit(tmp_path, media_dir):
  """429 with Retry-After: 2 waits 2 s (the first back-off alone would be at most 0.75 s); a Retry-After
  past the download time limit gives up at once."""
  (tmp_path / 'srv').mkdir()
  shutil.copy(media_dir / 'talking.mp4', tmp_path / 'srv' / 'talking.mp4')
  with download_server(str(tmp_path / 'srv')) as server:
    fn = DownloadSource(str(tmp_path / 'work'), retries=2, timeout_s=30, policy=LOOPBACK)
    fn.download(Source('a', f'{server.url}/retry_after/2/talking.mp4', (ClipSpec('a_0', 0),)))
    times = [at for at, path, _ in server.requests]
    started = time.monotonic()
    late = DownloadSource(str(tmp_path / 'work'), retries=2, timeout_s=30, policy=LOOPBACK).download(
        Source('b', f'{server.url}/retry_after/3600/talking.mp4', (ClipSpec('b_0', 0),)))
    gave_up = time.monotonic() - started
    asked = [path for _, path, _ in server.requests if '/retry_after/3600/' in path]
  assert len(times) == 2 and times[1] - times[0] >= 2.0
  assert _rejects(late) == [('b_0', 'download', 'http_error')]
  # Given up at once: one request, no retry, well inside the 30 s limit it would otherwise wait out.
  assert 'retry after 3600s' in late[0].value.detail and len(asked) == 1 and gave_up < 20


def test_cookies_file_must_exist(tmp_path):
  with pytest.raises(ValueError, match='--cookies'):
    DownloadSource(str(tmp_path), cookies=str(tmp_path / 'missing.txt'))


def test_cookies_and_proxy_reach_ytdlp_as_arguments(tmp_path, hosted):
  """yt-dlp gets --cookies (a private copy: yt-dlp writes cookies back), and its connections (ffmpeg's for
  the section too) go through the host filter on to --proxy; the proxy here is the loopback server itself,
  which is asked for the page on port 9 and sees the cookie."""
  cookies = tmp_path / 'cookies.txt'
  cookies.write_text('# Netscape HTTP Cookie File\n127.0.0.1\tFALSE\t/\tFALSE\t0\tsession\tsecret\n')
  before = cookies.read_bytes()
  with download_server(str(hosted)) as server:
    fn = DownloadSource(str(tmp_path / 'work'), download_method='ytdlp', retries=0, cookies=str(cookies),
                        proxy=server.url, policy=LOOPBACK)
    out = fn.download(Source('p', 'http://127.0.0.1:9/talking.mp4', (ClipSpec('p_0', 0, 1.0, 3.0),)))
    paths = [path for _, path, _ in server.requests]
    sent = list(server.cookies)
  assert _served(out), out
  assert paths and all(path == '/talking.mp4' for path in paths)  # asked of the proxy, never port 9
  assert 'session=secret' in sent and cookies.read_bytes() == before


def test_missing_local_file_is_rejected(tmp_path):
  out = DownloadSource(str(tmp_path)).download(Source('gone', str(tmp_path / 'gone.mp4'), (ClipSpec('gone_0', 0),)))
  assert _rejects(out) == [('gone_0', 'download', 'not_found')]
