"""Fetch each source into the work dir once, probe it, and hand on its URI.

Direct media URLs (http/https with a video extension) are streamed with a size
and time bound and resumed with Range requests; other web pages go through
yt-dlp, run as a child process with an argument list (the URL after `--`) so
that the time limit can kill it and the ffmpeg it starts; gs:// and local
files are read in place. Every URL passes the scheme allowlist and local paths
the allowed roots first. A download that does not decode is rejected with the
probe's reason (`download_corrupt`, `no_video`, `too_many_pixels`, ...) for
every clip of the source.
"""
from __future__ import annotations

import http.client
import json
import logging
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import List, Optional, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from beam_pipeline.elements import MediaFile, Reject, Source
from transforms.fileio import put_file, write_atomic
from transforms.manifest import VIDEO_EXTENSIONS
from transforms.probe import ProbeError, probe
from transforms.safety import InputPolicy, UnsafeInput, check_url, local_path, scheme_of

STAGE = 'download'
CHUNK = 1 << 20
MAX_REDIRECTS = 5


class DownloadError(Exception):

  def __init__(self, reason: str, detail: str, retryable: bool = False):
    super().__init__(detail)
    self.reason = reason
    self.retryable = retryable


def classify(url: str) -> str:
  """`local`, `gcs`, `http` (direct media file) or `ytdlp` (a page yt-dlp understands)."""
  scheme = scheme_of(url)
  if scheme == 'file':
    return 'local'
  if scheme == 'gs':
    return 'gcs'
  if scheme in ('http', 'https'):
    path = urllib.parse.urlsplit(url).path.lower()
    return 'http' if path.endswith(VIDEO_EXTENSIONS) else 'ytdlp'
  raise DownloadError('scheme_not_allowed', f'URL scheme {scheme!r} is not supported')


class _Redirects(urllib.request.HTTPRedirectHandler):
  """Follow at most MAX_REDIRECTS hops, and only to http(s): never ftp:// or file://."""
  max_redirections = MAX_REDIRECTS

  def redirect_request(self, req, fp, code, msg, headers, newurl):
    if urllib.parse.urlsplit(newurl).scheme.lower() not in ('http', 'https'):
      raise DownloadError('scheme_not_allowed', f'{req.full_url} redirects to {newurl[:200]}, not http(s)')
    return super().redirect_request(req, fp, code, msg, headers, newurl)


_OPENER = urllib.request.build_opener(_Redirects())


def _is_timeout(error: BaseException) -> bool:
  return isinstance(error, TimeoutError) or isinstance(getattr(error, 'reason', None), TimeoutError)


def http_download(url: str, dest: str, max_bytes: int, timeout_s: float, deadline: float) -> None:
  """Stream `url` into `dest`, resuming a partial file with a Range request.

  Socket reads time out after `timeout_s` (or what is left before `deadline`), and the
  deadline is checked after every receive (read1), so a server that stalls or drips
  bytes cannot hold the worker past it.
  """
  have = os.path.getsize(dest) if os.path.exists(dest) else 0
  # Spaces and non-ASCII in real-world URLs are percent-encoded; existing %XX escapes stay as they are.
  request = urllib.request.Request(urllib.parse.quote(url, safe=":/?#[]@!$&'()*+,;=%~"),
                                   headers={'User-Agent': 'beam-pipeline/1'})
  if have:
    request.add_header('Range', f'bytes={have}-')
  left = deadline - time.monotonic()
  if left <= 0:
    raise DownloadError('download_timeout', f'{url} did not finish within the time limit')
  wait = max(0.1, min(timeout_s, left))
  try:
    response = _OPENER.open(request, timeout=wait)
  except urllib.error.HTTPError as error:
    if error.code == 416 and have:
      return  # already complete
    if 300 <= error.code < 400:
      raise DownloadError('too_many_redirects', f'{url}: {error.code} {error.msg}'[:500])
    raise DownloadError('http_error', f'HTTP {error.code} for {url}', retryable=error.code >= 500 or error.code == 429)
  except (urllib.error.URLError, OSError) as error:
    if _is_timeout(error):
      raise DownloadError('download_timeout', f'{url}: no answer within {wait:.1f}s', retryable=True)
    raise DownloadError('unreachable', f'{url}: {getattr(error, "reason", error)}', retryable=True)
  with response:
    resumed = have and response.status == 206
    mode = 'ab' if resumed else 'wb'
    size = have if resumed else 0
    length = response.headers.get('Content-Length')
    if length and size + int(length) > max_bytes:
      raise DownloadError('too_large', f'{url} is {size + int(length)} bytes, over the {max_bytes}-byte limit')
    with open(dest, mode) as out:
      while True:
        if time.monotonic() > deadline:
          raise DownloadError('download_timeout', f'{url} did not finish within the time limit', retryable=True)
        try:
          block = response.read1(CHUNK)
        except (OSError, urllib.error.URLError, http.client.HTTPException) as error:
          if _is_timeout(error):
            raise DownloadError('download_timeout', f'{url}: stalled for {wait:.1f}s', retryable=True)
          raise DownloadError('unreachable', f'{url}: read failed: {error}', retryable=True)
        if not block:
          break
        size += len(block)
        if size > max_bytes:
          raise DownloadError('too_large', f'{url} exceeds the {max_bytes}-byte limit')
        out.write(block)
    if length and size < (have if resumed else 0) + int(length):
      raise DownloadError('unreachable', f'{url}: connection closed early ({size} bytes)', retryable=True)


def _ffmpeg_location() -> List[str]:
  """yt-dlp's section download needs ffmpeg; imageio-ffmpeg's binary stands in when none is on PATH."""
  if shutil.which('ffmpeg'):
    return []
  import imageio_ffmpeg
  return ['--ffmpeg-location', imageio_ffmpeg.get_ffmpeg_exe()]


def _ytdlp_error(message: str) -> DownloadError:
  """yt-dlp's last error line as a reject reason (transient ones retryable)."""
  if 'timed out' in message:
    return DownloadError('download_timeout', message[:500], retryable=True)
  if any(text in message for text in ('Connection refused', 'Failed to resolve', 'Name or service not known',
                                      'Connection reset', 'No route to host')):
    return DownloadError('unreachable', message[:500], retryable=True)
  if 'HTTP Error' in message:
    transient = 'HTTP Error 5' in message or 'HTTP Error 429' in message
    return DownloadError('http_error', message[:500], retryable=transient)
  return DownloadError('ytdlp_error', message[:500])


def _kill_group(process: subprocess.Popen) -> None:
  try:
    os.killpg(process.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass
  process.communicate()


def ytdlp_download(url: str, dest_stem: str, height: Optional[int], section: Optional[Tuple[float, float]],
                   max_bytes: int, timeout_s: float, deadline: float) -> str:
  """Download with yt-dlp; returns the written file. `section` fetches only that time range.

  yt-dlp runs as a child process in its own session: at the deadline the whole
  group (yt-dlp and the ffmpeg it starts) is killed, which no in-process hook can do.
  """
  left = deadline - time.monotonic()
  if left <= 0:
    raise DownloadError('download_timeout', f'{url} did not finish within the time limit')
  fmt = (f'bv*[height<={height}]+ba/b[height<={height}]/bv*+ba/b' if height else 'bv*+ba/b')
  args = [sys.executable, '-m', 'yt_dlp', '--ignore-config', '--no-cache-dir', '--no-playlist', '--no-progress',
          '--no-warnings', '--force-overwrites', '--no-mtime', '-f', fmt, '-o', dest_stem + '.%(ext)s',
          '--merge-output-format', 'mp4', '--max-filesize', str(max_bytes), '--socket-timeout', f'{timeout_s:g}',
          '--retries', '2', '--print', 'after_move:filepath', '--no-simulate', *_ffmpeg_location()]
  if section is not None:
    args += ['--download-sections', f'*{section[0]:.3f}-{section[1]:.3f}']
  args += ['--', url]
  process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
  try:
    out, err = process.communicate(timeout=min(left, 1e6))  # poll() overflows on larger values
  except subprocess.TimeoutExpired:
    _kill_group(process)
    raise DownloadError('download_timeout', f'{url}: yt-dlp did not finish within the time limit', retryable=True)
  if process.returncode != 0:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    raise _ytdlp_error(lines[-1] if lines else f'yt-dlp exited with {process.returncode}')
  files = [line.strip() for line in out.splitlines() if line.strip()]
  if not files or not os.path.exists(files[-1]):
    raise DownloadError('ytdlp_error', f'yt-dlp wrote no file for {url}')
  if os.path.getsize(files[-1]) > max_bytes:
    raise DownloadError('too_large', f'{url} exceeds the {max_bytes}-byte limit')
  return files[-1]


class DownloadSource(beam.DoFn):
  """Source -> (source, [MediaFile]) with everything cached under `work_dir/sources/<id>/`.

  Rejects (tag `rejects`) name every clip of a source that could not be fetched,
  was refused by the input policy, or does not probe as usable video.
  """

  def __init__(self, work_dir: str, max_download_mb: float = 2048, timeout_s: float = 600,
               retries: int = 3, download_sections: bool = True, section_margin_s: float = 2.0,
               default_height: Optional[int] = None, download_method: str = 'auto',
               policy: InputPolicy = InputPolicy(), max_pixels: int = 0, probe_timeout_s: float = 60.0):
    self.work_dir = work_dir
    self.max_bytes = int(max_download_mb * 1024 * 1024)
    self.timeout_s = timeout_s
    self.retries = retries
    self.download_sections = download_sections
    self.section_margin_s = section_margin_s
    self.default_height = default_height
    self.download_method = download_method
    self.policy = policy
    self.max_pixels = max_pixels
    self.probe_timeout_s = probe_timeout_s
    self.downloaded = Metrics.counter(STAGE, 'sources_downloaded')
    self.cached = Metrics.counter(STAGE, 'sources_cached')
    self.failed = Metrics.counter(STAGE, 'sources_failed')
    self.retried = Metrics.counter(STAGE, 'retries')
    self.bytes = Metrics.counter(STAGE, 'bytes')

  def process(self, source: Source):
    try:
      media = self._fetch(source)
    except (DownloadError, UnsafeInput, ProbeError) as error:
      self.failed.inc()
      stage = 'probe' if isinstance(error, ProbeError) else STAGE
      for clip in source.clips:
        yield beam.pvalue.TaggedOutput('rejects', Reject(clip.clip_id, stage, error.reason, str(error)[:500],
                                                         source.source_id))
      return
    yield source, media

  # -- helpers

  def _probe(self, uri: str):
    return probe(uri, self.max_pixels, self.probe_timeout_s)

  def _fetch(self, source: Source) -> List[MediaFile]:
    url = check_url(source.url, self.policy)
    method = classify(url) if self.download_method == 'auto' else self.download_method
    if method in ('http', 'ytdlp') and scheme_of(url) not in ('http', 'https'):
      raise DownloadError('bad_url', f'--download_method {method} cannot fetch {url[:200]}')
    if method == 'local':
      path = local_path(url, self.policy)
      if not os.path.exists(path):
        raise DownloadError('not_found', f'{path} does not exist')
      if not stat.S_ISREG(os.stat(path).st_mode):
        raise DownloadError('not_a_file', f'{path} is not a regular file')
      return [MediaFile(path, self._probe(path))]
    if method == 'gcs':
      if not FileSystems.exists(url):
        raise DownloadError('not_found', f'{url} does not exist')
      return [MediaFile(url, self._probe(url))]
    folder = FileSystems.join(self.work_dir, 'sources', source.source_id)
    if method == 'ytdlp' and self.download_sections and all(c.start is not None for c in source.clips):
      return [self._cached(folder, f'{source.source_id}.{c.index}', source, url,
                           section=(max(0.0, c.start - self.section_margin_s), c.end + self.section_margin_s))
              for c in source.clips]
    return [self._cached(folder, source.source_id, source, url, section=None, method=method)]

  def _cached(self, folder: str, stem: str, source: Source, url: str, section, method: str = 'ytdlp') -> MediaFile:
    marker = FileSystems.join(folder, stem + '.json')
    if FileSystems.exists(marker):
      with FileSystems.open(marker) as handle:
        record = json.loads(handle.read())
      if record.get('url') == url and FileSystems.exists(record['uri']):
        self.cached.inc()
        return MediaFile(record['uri'], self._probe(record['uri']), record.get('offset', 0.0))
    local = tempfile.mkdtemp(prefix='dl-')
    try:
      path = self._with_retries(source, url, os.path.join(local, stem), section, method)
      try:
        info = self._probe(path)
      except ProbeError as error:
        raise ProbeError(error.reason, f'{url}: {error} ({os.path.getsize(path)} bytes)')
      ext = os.path.splitext(path)[1] or '.mp4'
      uri = FileSystems.join(folder, stem + ext)
      put_file(path, uri)
      self.bytes.inc(os.path.getsize(path))
      offset = section[0] if section else 0.0
      write_atomic(marker, json.dumps({'uri': uri, 'url': url, 'offset': offset}).encode())
      self.downloaded.inc()
      return MediaFile(uri, info, offset)
    finally:
      shutil.rmtree(local, ignore_errors=True)

  def _with_retries(self, source: Source, url: str, stem: str, section, method: str) -> str:
    deadline = time.monotonic() + self.timeout_s
    height = source.height or self.default_height
    for attempt in range(self.retries + 1):
      try:
        if method == 'http':
          dest = stem + (os.path.splitext(urllib.parse.urlsplit(url).path)[1] or '.mp4')
          http_download(url, dest, self.max_bytes, min(60.0, self.timeout_s), deadline)
          return dest
        return ytdlp_download(url, stem, height, section, self.max_bytes, min(60.0, self.timeout_s), deadline)
      except DownloadError as error:
        if not error.retryable or attempt == self.retries or time.monotonic() > deadline:
          raise
        self.retried.inc()
        delay = min(30.0, 0.5 * 2 ** attempt) * (0.5 + random.random())
        logging.info('retrying %s in %.1fs after: %s', url, delay, error)
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
    raise AssertionError('unreachable')
