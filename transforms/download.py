"""Fetch each source into the work dir once, probe it, and hand on its URI.

Direct media URLs (http/https with a video extension) are streamed with a size
and time bound and resumed with Range requests; other web pages go through
yt-dlp (as a library), which fetches only the clips' time ranges when asked;
gs:// and local files are read in place. A download that does not decode is a
`download_corrupt` reject for every clip of the source.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Iterator, List, Optional, Sequence, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from beam_pipeline.elements import MediaFile, Reject, Source
from transforms.fileio import put_file, write_atomic
from transforms.manifest import VIDEO_EXTENSIONS
from transforms.probe import ProbeError, probe

STAGE = 'download'
CHUNK = 1 << 20


class DownloadError(Exception):

  def __init__(self, reason: str, detail: str, retryable: bool = False):
    super().__init__(detail)
    self.reason = reason
    self.retryable = retryable


@contextlib.contextmanager
def ffmpeg_on_path():
  """yt-dlp's section download looks for `ffmpeg` on PATH only; imageio-ffmpeg's binary has another name."""
  if shutil.which('ffmpeg'):
    yield
    return
  import imageio_ffmpeg
  directory = tempfile.mkdtemp(prefix='ffmpeg-bin-')
  os.symlink(imageio_ffmpeg.get_ffmpeg_exe(), os.path.join(directory, 'ffmpeg'))
  old = os.environ.get('PATH', '')
  os.environ['PATH'] = directory + os.pathsep + old
  try:
    yield
  finally:
    os.environ['PATH'] = old
    shutil.rmtree(directory, ignore_errors=True)


def classify(url: str) -> str:
  """`local`, `gcs`, `http` (direct media file) or `ytdlp` (a page yt-dlp understands)."""
  scheme = urllib.parse.urlsplit(url).scheme.lower()
  if scheme in ('', 'file'):
    return 'local'
  if scheme == 'gs':
    return 'gcs'
  if scheme in ('http', 'https'):
    path = urllib.parse.urlsplit(url).path.lower()
    return 'http' if path.endswith(VIDEO_EXTENSIONS) else 'ytdlp'
  raise DownloadError('bad_url', f'URL scheme {scheme!r} is not allowed')


def http_download(url: str, dest: str, max_bytes: int, timeout_s: float, deadline: float) -> None:
  """Stream `url` into `dest`, resuming a partial file with a Range request."""
  have = os.path.getsize(dest) if os.path.exists(dest) else 0
  request = urllib.request.Request(url, headers={'User-Agent': 'beam-pipeline/1'})
  if have:
    request.add_header('Range', f'bytes={have}-')
  try:
    response = urllib.request.urlopen(request, timeout=timeout_s)
  except urllib.error.HTTPError as error:
    if error.code == 416 and have:
      return  # already complete
    raise DownloadError('http_error', f'HTTP {error.code} for {url}', retryable=error.code >= 500 or error.code == 429)
  except (urllib.error.URLError, OSError) as error:
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
          block = response.read(CHUNK)
        except (OSError, urllib.error.URLError) as error:
          raise DownloadError('unreachable', f'{url}: read failed: {error}', retryable=True)
        if not block:
          break
        size += len(block)
        if size > max_bytes:
          raise DownloadError('too_large', f'{url} exceeds the {max_bytes}-byte limit')
        out.write(block)
    if length and size < (have if resumed else 0) + int(length):
      raise DownloadError('unreachable', f'{url}: connection closed early ({size} bytes)', retryable=True)


def ytdlp_download(url: str, dest_stem: str, height: Optional[int], section: Optional[Tuple[float, float]],
                   max_bytes: int, timeout_s: float, deadline: float) -> str:
  """Download with yt-dlp; returns the written file. `section` fetches only that time range."""
  import yt_dlp
  from yt_dlp.utils import download_range_func

  def watchdog(status):
    if time.monotonic() > deadline:
      raise DownloadError('download_timeout', f'{url} did not finish within the time limit', retryable=True)

  fmt = (f'bv*[height<={height}]+ba/b[height<={height}]/bv*+ba/b' if height else 'bv*+ba/b')
  options = {
      'format': fmt,
      'outtmpl': dest_stem + '.%(ext)s',
      'merge_output_format': 'mp4',
      'max_filesize': max_bytes,
      'socket_timeout': timeout_s,
      'retries': 2,
      'quiet': True,
      'no_warnings': True,
      'noprogress': True,
      'noplaylist': True,
      'progress_hooks': [watchdog],
      'overwrites': True,
  }
  if section is not None:
    options['download_ranges'] = download_range_func(None, [section])
    options['force_keyframes_at_cuts'] = False
  with ffmpeg_on_path():
    try:
      with yt_dlp.YoutubeDL(options) as ydl:
        info = ydl.extract_info(url, download=True)
    except DownloadError:
      raise
    except Exception as error:  # yt-dlp raises its own DownloadError/ExtractorError types
      message = str(error)
      retryable = any(code in message for code in ('HTTP Error 5', 'timed out', 'Connection', 'HTTP Error 429'))
      raise DownloadError('http_error' if 'HTTP Error' in message else 'ytdlp_error', message[:500],
                          retryable=retryable)
  files = [d.get('filepath') for d in (info.get('requested_downloads') or []) if d.get('filepath')]
  if not files or not os.path.exists(files[0]):
    raise DownloadError('ytdlp_error', f'yt-dlp wrote no file for {url}')
  if os.path.getsize(files[0]) > max_bytes:
    raise DownloadError('too_large', f'{url} exceeds the {max_bytes}-byte limit')
  return files[0]


class DownloadSource(beam.DoFn):
  """Source -> (source, [MediaFile]) with everything cached under `work_dir/sources/<id>/`.

  Rejects (tag `rejects`) name every clip of a source that could not be fetched.
  """

  def __init__(self, work_dir: str, max_download_mb: float = 2048, timeout_s: float = 600,
               retries: int = 3, download_sections: bool = True, section_margin_s: float = 2.0,
               default_height: Optional[int] = None, download_method: str = 'auto'):
    self.work_dir = work_dir
    self.max_bytes = int(max_download_mb * 1024 * 1024)
    self.timeout_s = timeout_s
    self.retries = retries
    self.download_sections = download_sections
    self.section_margin_s = section_margin_s
    self.default_height = default_height
    self.download_method = download_method
    self.downloaded = Metrics.counter(STAGE, 'sources_downloaded')
    self.cached = Metrics.counter(STAGE, 'sources_cached')
    self.failed = Metrics.counter(STAGE, 'sources_failed')
    self.bytes = Metrics.counter(STAGE, 'bytes')

  def process(self, source: Source):
    try:
      media = self._fetch(source)
    except DownloadError as error:
      self.failed.inc()
      for clip in source.clips:
        yield beam.pvalue.TaggedOutput('rejects', Reject(clip.clip_id, STAGE, error.reason, str(error),
                                                         source.source_id))
      return
    yield source, media

  # -- helpers

  def _fetch(self, source: Source) -> List[MediaFile]:
    method = classify(source.url) if self.download_method == 'auto' else self.download_method
    if method in ('local', 'gcs'):
      uri = source.url[len('file://'):] if source.url.startswith('file://') else source.url
      if not FileSystems.exists(uri):
        raise DownloadError('not_found', f'{uri} does not exist')
      try:
        return [MediaFile(uri, probe(uri))]
      except ProbeError as error:
        raise DownloadError('download_corrupt', f'{uri}: {error}')
    folder = FileSystems.join(self.work_dir, 'sources', source.source_id)
    if method == 'ytdlp' and self.download_sections and all(c.start is not None for c in source.clips):
      return [self._cached(folder, f'{source.source_id}.{c.index}', source,
                           section=(max(0.0, c.start - self.section_margin_s), c.end + self.section_margin_s))
              for c in source.clips]
    return [self._cached(folder, source.source_id, source, section=None, method=method)]

  def _cached(self, folder: str, stem: str, source: Source, section, method: str = 'ytdlp') -> MediaFile:
    marker = FileSystems.join(folder, stem + '.json')
    if FileSystems.exists(marker):
      with FileSystems.open(marker) as handle:
        record = json.loads(handle.read())
      if FileSystems.exists(record['uri']):
        self.cached.inc()
        return MediaFile(record['uri'], probe(record['uri']), record.get('offset', 0.0))
    local = tempfile.mkdtemp(prefix='dl-')
    try:
      path = self._with_retries(source, os.path.join(local, stem), section, method)
      try:
        info = probe(path)
      except ProbeError as error:
        raise DownloadError('download_corrupt', f'{source.url}: {error} ({os.path.getsize(path)} bytes)')
      ext = os.path.splitext(path)[1] or '.mp4'
      uri = FileSystems.join(folder, stem + ext)
      put_file(path, uri)
      self.bytes.inc(os.path.getsize(path))
      offset = section[0] if section else 0.0
      write_atomic(marker, json.dumps({'uri': uri, 'url': source.url, 'offset': offset}).encode())
      self.downloaded.inc()
      return MediaFile(uri, info, offset)
    finally:
      shutil.rmtree(local, ignore_errors=True)

  def _with_retries(self, source: Source, stem: str, section, method: str) -> str:
    deadline = time.monotonic() + self.timeout_s
    height = source.height or self.default_height
    for attempt in range(self.retries + 1):
      try:
        if method == 'http':
          dest = stem + (os.path.splitext(urllib.parse.urlsplit(source.url).path)[1] or '.mp4')
          http_download(source.url, dest, self.max_bytes, min(60.0, self.timeout_s), deadline)
          return dest
        return ytdlp_download(source.url, stem, height, section, self.max_bytes, min(60.0, self.timeout_s),
                              deadline)
      except DownloadError as error:
        if not error.retryable or attempt == self.retries or time.monotonic() > deadline:
          raise
        delay = min(30.0, 0.5 * 2 ** attempt) * (0.5 + random.random())
        logging.info('retrying %s in %.1fs after: %s', source.url, delay, error)
        time.sleep(min(delay, max(0.0, deadline - time.monotonic())))
    raise AssertionError('unreachable')
