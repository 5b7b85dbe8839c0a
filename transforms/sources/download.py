"""Fetch each source into the work dir once, probe it, and hand on its URI.

Direct media URLs (http/https with a video extension) are streamed with a size
and time bound and resumed with Range requests; other web pages go through
yt-dlp, run as a child process with an argument list so that the time limit
(and the size limit, by watching its output folder) can kill it and the ffmpeg
it starts; gs:// and local files are read in place. Every URL passes the
scheme, root and bucket checks first, and every host the input policy's
address check at connect time, so redirects and DNS answers are covered: in
the connection itself for direct downloads, and for yt-dlp and its ffmpeg in
the filtering proxy (transforms/lib/egress_proxy.py) that is their only way
out, with formats restricted to protocols that go through it. A download that
does not decode is rejected with the probe's reason (`download_corrupt`,
`no_video`, `too_many_pixels`, ...).

Downloads of one worker run concurrently: `DownloadSource` hands each source
to a bounded thread pool (IN_FLIGHT x `max_concurrent` sources at once), with
at most `max_concurrent` network attempts running and `max_per_host` of them
to one host; a source waiting out a retry back-off holds no slot. Probes (a
child process each, CPU-bound) run at most one per core, apart from those
slots, so they never hold up a download. The time limit covers the whole download of a source (every retry,
the yt-dlp metadata pass and every section), not the time queued for a slot.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import email.utils
import functools
import hashlib
import http.client
import json
import logging
import os
import queue
import random
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable, Counter, Dict, List, Optional, Tuple

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from apache_beam.transforms.window import GlobalWindow
from apache_beam.utils.timestamp import MIN_TIMESTAMP
from apache_beam.utils.windowed_value import WindowedValue

from transforms.core.elements import ClipSpec, MediaFile, ReasonError, Reject, Source
from transforms.core.fileio import put_file, read_bytes, write_atomic
from transforms.lib.egress_proxy import Session, Upstream, shared_proxy
from transforms.lib.probe import ProbeError, VIDEO_EXTENSIONS, probe
from transforms.lib.safety import (InputPolicy, UnsafeInput, check_host, check_url, connect_checked, local_path,
                                   scheme_of)

STAGE = 'download'
CHUNK = 1 << 20
MAX_REDIRECTS = 5
IN_FLIGHT = 4  # sources in the pool per attempt slot: the rest of them wait out back-offs
POLL_S = 0.25  # how often a yt-dlp child's deadline and output size are checked
LIVE_STATUSES = ('is_live', 'is_upcoming')
TRUNCATABLE = ('download_corrupt', 'empty_file')  # what a body cut short looks like to the probe
# yt-dlp protocols whose every connection goes over http(s) through the filtering proxy: yt-dlp's own
# downloaders, or ffmpeg, which yt-dlp gives the proxy as http_proxy. rtmp, rtsp, mms and the like would not.
PROXIED_PROTOCOLS = ('http', 'https', 'm3u8', 'm3u8_native', 'http_dash_segments', 'http_dash_segments_generator')
_PROTOCOL_FILTER = f"[protocol~='^({'|'.join(PROXIED_PROTOCOLS)})$']"
# Proxy variables the children must not see: ffmpeg honours no_proxy even when handed a proxy.
_PROXY_VARIABLES = ('http_proxy', 'https_proxy', 'all_proxy', 'ftp_proxy', 'no_proxy')
_PROXY_HEADERS = ('ytdl-request-proxy', 'ytdl-socks-proxy')  # would send that request through another proxy
COUNTERS = ('sources_downloaded', 'sources_cached', 'sources_failed', 'sections_failed', 'retries', 'bytes',
            'internal_errors')


class DownloadError(ReasonError):

  def __init__(self, reason: str, detail: str, retryable: bool = False, retry_after: Optional[float] = None):
    super().__init__(reason, detail)
    self.retryable = retryable
    self.retry_after = retry_after  # seconds the server asked us to wait (Retry-After)


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


def host_key(url: str) -> Optional[str]:
  """What the per-host limit counts: `host:port` of an http(s) URL, None for anything else."""
  parts = urllib.parse.urlsplit(url)
  if parts.scheme.lower() not in ('http', 'https'):
    return None
  return parts.netloc.rsplit('@', 1)[-1].lower() or None


# -- direct http(s) downloads under the host policy


class _Guarded:
  """An http.client connection that connects only to addresses the input policy allows.

  `HTTPConnection.connect` opens its socket through `_create_connection`; ours
  resolves, checks every address and connects to a checked one. The hostname
  stays the connection's host, so Host and TLS SNI/certificate checks are unchanged.
  """

  def __init__(self, *args, policy: Optional[InputPolicy] = None, **kwargs):
    super().__init__(*args, **kwargs)
    if policy is not None:
      self._create_connection = functools.partial(connect_checked, policy=policy)


class GuardedHTTPConnection(_Guarded, http.client.HTTPConnection):
  pass


class GuardedHTTPSConnection(_Guarded, http.client.HTTPSConnection):
  pass


def _connection_for(cls, req: urllib.request.Request, policy: InputPolicy):
  """Checked at connect time; through a proxy (which connects for us) the target is checked by name first."""
  if req.has_proxy() or getattr(req, '_tunnel_host', None):
    check_host(req.full_url, policy)
    return cls
  return functools.partial(cls, policy=policy)


class _GuardedHTTPHandler(urllib.request.HTTPHandler):

  def __init__(self, policy: InputPolicy):
    super().__init__()
    self.policy = policy

  def http_open(self, req):
    return self.do_open(_connection_for(GuardedHTTPConnection, req, self.policy), req)


class _GuardedHTTPSHandler(urllib.request.HTTPSHandler):

  def __init__(self, policy: InputPolicy):
    super().__init__()
    self.policy = policy

  def https_open(self, req):
    return self.do_open(_connection_for(GuardedHTTPSConnection, req, self.policy), req, context=self._context)


class Redirects(urllib.request.HTTPRedirectHandler):
  """Follow at most MAX_REDIRECTS hops, only to http(s) (never ftp:// or file://) and only to allowed hosts."""
  max_redirections = MAX_REDIRECTS

  def __init__(self, policy: InputPolicy):
    self.policy = policy

  def redirect_request(self, req, fp, code, msg, headers, newurl):
    if urllib.parse.urlsplit(newurl).scheme.lower() not in ('http', 'https'):
      raise DownloadError('scheme_not_allowed', f'{req.full_url} redirects to {newurl[:200]}, not http(s)')
    try:
      check_host(newurl, self.policy)
    except UnsafeInput as error:
      raise UnsafeInput(error.reason, f'{req.full_url[:200]} redirects to a refused host: {error}') from None
    except OSError:
      raise DownloadError('unreachable', f'{req.full_url[:200]} redirects to {newurl[:200]}, whose host does '
                          'not resolve', retryable=True) from None
    return super().redirect_request(req, fp, code, msg, headers, newurl)


def _opener(policy: InputPolicy, proxy: Optional[str]) -> urllib.request.OpenerDirector:
  proxies = {'http': proxy, 'https': proxy} if proxy else None  # None: the environment's proxies
  return urllib.request.build_opener(urllib.request.ProxyHandler(proxies), _GuardedHTTPHandler(policy),
                                     _GuardedHTTPSHandler(policy), Redirects(policy))


def _is_timeout(error: BaseException) -> bool:
  return isinstance(error, TimeoutError) or isinstance(getattr(error, 'reason', None), TimeoutError)


def retry_after_s(value: Optional[str]) -> Optional[float]:
  """Seconds to wait from a Retry-After header (delta seconds or an HTTP date), None if absent or unreadable."""
  if not value:
    return None
  text = value.strip()
  if text.isdigit():
    return float(text)
  try:
    when = email.utils.parsedate_to_datetime(text)
  except (TypeError, ValueError):
    return None
  return max(0.0, when.timestamp() - time.time())


def http_download(url: str, dest: str, max_bytes: int, timeout_s: float, deadline: float,
                  policy: InputPolicy = InputPolicy(), proxy: Optional[str] = None) -> bool:
  """Stream `url` into `dest`, resuming a partial file with a Range request.

  Socket reads time out after `timeout_s` (or what is left before `deadline`), and the
  deadline is checked after every receive (read1), so a server that stalls or drips
  bytes cannot hold the worker past it. Returns whether the body's end was verified
  (Content-Length or chunked framing): without either, a connection closed early looks
  like a complete file, and only the probe can tell.
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
    response = _opener(policy, proxy).open(request, timeout=wait)
  except urllib.error.HTTPError as error:
    if error.code == 416 and have:
      return True  # already complete
    if 300 <= error.code < 400:
      raise DownloadError('too_many_redirects', f'{url}: {error.code} {error.msg}'[:500])
    transient = error.code >= 500 or error.code == 429
    asked = retry_after_s(error.headers.get('Retry-After')) if error.code in (429, 503) else None
    raise DownloadError('http_error', f'HTTP {error.code} for {url}', retryable=transient, retry_after=asked)
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
    return bool(length) or bool(response.chunked)


# -- yt-dlp, one child process per call


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


def _last_error(err: str, returncode: int) -> DownloadError:
  lines = [line for line in err.strip().splitlines() if line.strip()]
  return _ytdlp_error(lines[-1] if lines else f'yt-dlp exited with {returncode}')


def _kill_group(process: subprocess.Popen) -> None:
  try:
    os.killpg(process.pid, signal.SIGKILL)
  except (ProcessLookupError, PermissionError):
    pass
  process.communicate()


def folder_bytes(folder: str) -> int:
  """Bytes under `folder` (yt-dlp's .part files, HLS fragments and ffmpeg's output all count)."""
  total = 0
  for root, _, files in os.walk(folder):
    for name in files:
      with contextlib.suppress(OSError):
        total += os.lstat(os.path.join(root, name)).st_size
  return total


def run_child(args: List[str], what: str, deadline: float, folder: Optional[str] = None,
              max_bytes: int = 0, env: Optional[Dict[str, str]] = None) -> Tuple[int, str, str]:
  """(exit code, stdout, stderr) of a child run in its own session (with `env`, else this process's).

  Its whole process group (yt-dlp and the ffmpeg it starts) is killed at the
  deadline (`download_timeout`), or once `folder` holds more than `max_bytes`
  (`too_large`: yt-dlp's --max-filesize does not bound section or HLS downloads).
  """
  process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, start_new_session=True, env=env)
  try:
    while True:
      left = deadline - time.monotonic()
      if left <= 0:
        _kill_group(process)
        raise DownloadError('download_timeout', f'{what}: yt-dlp did not finish within the time limit',
                            retryable=True)
      try:
        out, err = process.communicate(timeout=min(POLL_S, left))
        return process.returncode, out, err
      except subprocess.TimeoutExpired:
        pass
      if folder and max_bytes and folder_bytes(folder) > max_bytes:
        _kill_group(process)
        raise DownloadError('too_large', f'{what}: the download grew past the {max_bytes}-byte limit')
  except BaseException:
    if process.poll() is None:
      _kill_group(process)
    raise


def _ytdlp_base(timeout_s: float, cookies: Optional[str], session: Session) -> List[str]:
  """yt-dlp's common arguments; its only way out is the session's filtering proxy."""
  args = [sys.executable, '-m', 'yt_dlp', '--ignore-config', '--no-cache-dir', '--no-playlist', '--no-warnings',
          '--socket-timeout', f'{timeout_s:g}', '--proxy', session.url]
  if cookies:
    args += ['--cookies', cookies]
  return args


def _format(height: Optional[int]) -> str:
  """The format choice, each part of it restricted to PROXIED_PROTOCOLS."""
  p = _PROTOCOL_FILTER
  return (f'bv*[height<={height}]{p}+ba{p}/b[height<={height}]{p}/bv*{p}+ba{p}/b{p}' if height
          else f'bv*{p}+ba{p}/b{p}')


def _child_env() -> Dict[str, str]:
  return {name: value for name, value in os.environ.items() if name.lower() not in _PROXY_VARIABLES}


def _run_ytdlp(args: List[str], url: str, deadline: float, session: Session, folder: Optional[str] = None,
               max_bytes: int = 0) -> Tuple[int, str, str]:
  """run_child for yt-dlp behind the filter. A connection the proxy refused explains the run, however it
  ended: yt-dlp reports it as an HTTP or proxy error, ffmpeg as an exit code, and an HLS download may
  even go on without the refused segments."""
  try:
    result = run_child(args, url, deadline, folder, max_bytes, _child_env())
  except DownloadError:
    _raise_refused(url, session)
    raise
  _raise_refused(url, session)
  return result


def _raise_refused(url: str, session: Session) -> None:
  refusal = session.refused()
  if refusal:
    raise DownloadError('host_not_allowed', f'{url[:200]}: yt-dlp asked for a refused host (nothing was sent to '
                        f'it): {refusal}')


def _check_formats(url: str, info: dict) -> None:
  """The chosen formats' protocols and URL schemes go through the proxy (the format filter already says so;
  this holds if yt-dlp ever reads the filter otherwise), and no format picks a proxy of its own."""
  for chosen in info.get('requested_formats') or [info]:
    protocol, media = chosen.get('protocol'), str(chosen.get('url') or '')
    if protocol not in PROXIED_PROTOCOLS or scheme_of(media) not in ('http', 'https'):
      raise DownloadError('scheme_not_allowed', f'{url[:200]}: yt-dlp chose a {protocol} format ({media[:100]}), '
                          'which would not go through the host filter')
    if any(name.lower() in _PROXY_HEADERS for name in (chosen.get('http_headers') or {})):
      raise DownloadError('ytdlp_error', f'{url[:200]}: a format names a proxy of its own')


def ytdlp_info(url: str, height: Optional[int], timeout_s: float, deadline: float, cookies: Optional[str] = None,
               proxy: Optional[str] = None, policy: InputPolicy = InputPolicy()) -> dict:
  """yt-dlp's metadata for `url` (`-J`, formats chosen), refusing playlists and live streams. Every
  connection yt-dlp makes is checked against `policy` (through `proxy`, the user's, if given)."""
  with shared_proxy().session(policy, proxy, timeout_s) as session:
    args = _ytdlp_base(timeout_s, cookies, session) + ['--flat-playlist', '-J', '-f', _format(height), '--', url]
    code, out, err = _run_ytdlp(args, url, deadline, session)
  if code != 0:
    raise _last_error(err, code)
  try:
    info = json.loads(out)
  except ValueError as error:
    raise DownloadError('ytdlp_error', f'{url}: yt-dlp printed no metadata ({error})') from None
  if not isinstance(info, dict):
    raise DownloadError('ytdlp_error', f'{url}: yt-dlp printed no metadata')
  if info.get('_type') in ('playlist', 'multi_video'):
    count = len(info.get('entries') or [])
    raise DownloadError('playlist_refused', f'{url} is a playlist of {count} videos, not one video: give each '
                        'video its own manifest row')
  if info.get('is_live') or info.get('live_status') in LIVE_STATUSES:
    raise DownloadError('live_refused', f'{url} is a live stream ({info.get("live_status") or "is_live"}): it has '
                        'no fixed end to cut clips from')
  _check_formats(url, info)
  return info


def media_urls(info: dict) -> List[str]:
  """The URLs yt-dlp will fetch media from, as its metadata names them (each chosen format's)."""
  formats = info.get('requested_formats') or [info]
  return [f[key] for f in formats for key in ('url', 'manifest_url', 'fragment_base_url') if f.get(key)]


def ytdlp_download(url: str, dest_stem: str, height: Optional[int], section: Optional[Tuple[float, float]],
                   max_bytes: int, timeout_s: float, deadline: float, info_file: Optional[str] = None,
                   cookies: Optional[str] = None, proxy: Optional[str] = None,
                   policy: InputPolicy = InputPolicy()) -> str:
  """Download with yt-dlp; returns the written file. `section` fetches only that time range.

  With `info_file` (from `ytdlp_info`), the media is fetched from that metadata instead
  of extracting the page again. yt-dlp runs as a child process in its own session: at
  the deadline, or once its output folder outgrows `max_bytes`, the whole group
  (yt-dlp and the ffmpeg it starts) is killed, which no in-process hook can do. Every
  connection of both is checked against `policy` by the filtering proxy.
  """
  if deadline - time.monotonic() <= 0:
    raise DownloadError('download_timeout', f'{url} did not finish within the time limit')
  with shared_proxy().session(policy, proxy, timeout_s) as session:
    args = _ytdlp_base(timeout_s, cookies, session) + [
        '--no-progress', '--force-overwrites', '--no-mtime', '-f', _format(height), '-o', dest_stem + '.%(ext)s',
        '--merge-output-format', 'mp4', '--max-filesize', str(max_bytes), '--retries', '2',
        '--abort-on-unavailable-fragments',
        '--print', 'after_move:filepath', '--no-simulate', *_ffmpeg_location()]
    if section is not None:
      args += ['--download-sections', f'*{section[0]:.3f}-{section[1]:.3f}']
    args += ['--load-info-json', info_file] if info_file else ['--', url]
    code, out, err = _run_ytdlp(args, url, deadline, session, os.path.dirname(dest_stem), max_bytes)
  if code != 0:
    raise _last_error(err, code)
  files = [line.strip() for line in out.splitlines() if line.strip()]
  if not files or not os.path.exists(files[-1]):
    raise DownloadError('ytdlp_error', f'yt-dlp wrote no file for {url}')
  if os.path.getsize(files[-1]) > max_bytes:
    raise DownloadError('too_large', f'{url} exceeds the {max_bytes}-byte limit')
  return files[-1]


# -- concurrency: slots shared by every download of a worker process


class Slots:
  """At most `total` network attempts at once in this process, and `per_host` to one host."""

  def __init__(self, total: int, per_host: int):
    self.total = total
    self.per_host = per_host
    self._changed = threading.Condition()
    self._active = 0
    self._by_host: Counter[str] = collections.Counter()

  def _full(self, host: Optional[str]) -> bool:
    return self._active >= self.total or (host is not None and self._by_host[host] >= self.per_host)

  @contextlib.contextmanager
  def take(self, host: Optional[str], budget: 'Budget'):
    """Hold one slot (for `host`); the time spent waiting for it is given back to `budget`."""
    asked = time.monotonic()
    with self._changed:
      while self._full(host):
        self._changed.wait()
      self._active += 1
      if host is not None:
        self._by_host[host] += 1
    budget.deadline += time.monotonic() - asked
    try:
      yield
    finally:
      with self._changed:
        self._active -= 1
        if host is not None:
          self._by_host[host] -= 1
        self._changed.notify_all()


_SLOTS: Dict[Tuple[int, int], Slots] = {}
_SLOTS_LOCK = threading.Lock()
_PROBE_SLOTS = Slots(os.cpu_count() or 2, 1)


def shared_slots(total: int, per_host: int) -> Slots:
  """One Slots per limit pair in a process, so every DoFn instance of a worker shares the limits."""
  with _SLOTS_LOCK:
    return _SLOTS.setdefault((total, per_host), Slots(total, per_host))


class Budget:
  """The time limit of one source's whole download; only time queued for a slot is not counted."""

  def __init__(self, seconds: float):
    self.deadline = time.monotonic() + seconds

  def left(self) -> float:
    return self.deadline - time.monotonic()


class _Once:
  """`make()` run at most once; its result, or its exception, is what every later call gets."""

  def __init__(self, make: Callable):
    self.make = make
    self.outcome: Optional[Tuple[bool, object]] = None

  def __call__(self):
    if self.outcome is None:
      try:
        self.outcome = (True, self.make())
      except (DownloadError, UnsafeInput) as error:
        self.outcome = (False, error)
    ok, value = self.outcome
    if not ok:
      raise value
    return value


def in_global_window(output):
  """A finish_bundle output: results of sources taken in process() leave in the global window."""
  if isinstance(output, beam.pvalue.TaggedOutput):
    return beam.pvalue.TaggedOutput(output.tag, WindowedValue(output.value, MIN_TIMESTAMP, (GlobalWindow(),)))
  return WindowedValue(output, MIN_TIMESTAMP, (GlobalWindow(),))


def _where(error: BaseException) -> str:
  frames = traceback.extract_tb(error.__traceback__)
  place = f' (at {frames[-1].filename.rsplit("/", 1)[-1]}:{frames[-1].lineno})' if frames else ''
  return f'{type(error).__name__}: {error}{place}'


class DownloadSource(beam.DoFn):
  """Source -> (source, [MediaFile]) with everything cached under `work_dir/sources/<id>/`.

  Rejects (tag `rejects`) name every clip of a source that could not be fetched,
  was refused by the input policy, or does not probe as usable video; a failed
  section rejects only the clip it serves. `process` hands the source to the pool
  and emits the results of whichever downloads have finished; `finish_bundle`
  waits for the rest (in the global window). An unexpected exception in one
  download becomes an `internal_error` reject for that source's clips only.
  `download(source)` does one source's whole job in the calling thread.
  """

  def __init__(self, work_dir: str, max_download_mb: float = 2048, timeout_s: float = 600,
               retries: int = 3, download_sections: bool = True, section_margin_s: float = 2.0,
               default_height: Optional[int] = None, download_method: str = 'auto',
               policy: InputPolicy = InputPolicy(), max_pixels: int = 0, probe_timeout_s: float = 60.0,
               max_concurrent: int = 16, max_per_host: int = 4, cookies: Optional[str] = None,
               proxy: Optional[str] = None):
    if max_concurrent < 1 or max_per_host < 1:
      raise ValueError('--max_concurrent_downloads and --max_downloads_per_host must be at least 1')
    if cookies and not FileSystems.exists(cookies):
      raise ValueError(f'--cookies {cookies}: no such file')
    if proxy:
      try:
        Upstream.parse(proxy)
      except ValueError as error:
        raise ValueError(f'--proxy: {error}') from None
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
    self.max_concurrent = max_concurrent
    self.max_per_host = max_per_host
    self.cookies = cookies
    self.proxy = proxy
    self.counters = {name: Metrics.counter(STAGE, name) for name in COUNTERS}
    self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None

  # -- Beam lifecycle

  def setup(self):
    self._pool = concurrent.futures.ThreadPoolExecutor(IN_FLIGHT * self.max_concurrent, thread_name_prefix='download')

  def start_bundle(self):
    self._running = 0
    self._finished: 'queue.SimpleQueue' = queue.SimpleQueue()

  def process(self, source: Source):
    while self._running >= IN_FLIGHT * self.max_concurrent:
      yield from self._collect(wait=True)
    self._running += 1
    self._pool.submit(self._pooled, source)
    yield from self._collect(wait=False)

  def finish_bundle(self):
    while self._running:
      for output in self._collect(wait=True):
        yield in_global_window(output)

  def teardown(self):
    if self._pool is not None:
      self._pool.shutdown(wait=False, cancel_futures=True)

  def download(self, source: Source) -> list:
    """One source's outputs, fetched in the calling thread (metrics counted here)."""
    outputs, tally = self._download(source)
    self._count(tally)
    return outputs

  # -- pool plumbing: results are counted and emitted on the bundle's thread (Beam metrics live there)

  def _pooled(self, source: Source) -> None:
    result = None
    try:
      result = self._download(source)
    finally:
      self._finished.put(result or (self._internal_error(source.clips, source, 'the download thread stopped'),
                                    collections.Counter(internal_errors=1)))

  def _collect(self, wait: bool) -> list:
    outputs = []
    try:
      item = self._finished.get(block=wait)
    except queue.Empty:
      return outputs
    while True:
      self._running -= 1
      found, tally = item
      self._count(tally)
      outputs.extend(found)
      try:
        item = self._finished.get_nowait()
      except queue.Empty:
        return outputs

  def _count(self, tally: Counter[str]) -> None:
    for name, value in tally.items():
      if value:
        self.counters[name].inc(value)

  def _download(self, source: Source) -> Tuple[list, Counter[str]]:
    tally: Counter[str] = collections.Counter()
    try:
      return self._fetch(source, Budget(self.timeout_s), tally), tally
    except Exception as error:  # pylint: disable=broad-except  # a bug: only this source's clips pay for it
      tally['internal_errors'] += 1
      logging.warning('download: internal error on %s: %s', source.source_id, _where(error))
      return self._internal_error(source.clips, source, _where(error)), tally

  @staticmethod
  def _internal_error(clips, source: Source, detail: str) -> list:
    return [beam.pvalue.TaggedOutput('rejects', Reject(c.clip_id, STAGE, 'internal_error', detail[:500],
                                                       source.source_id)) for c in clips]

  @staticmethod
  def _rejects(clips, source: Source, error: Exception) -> list:
    stage = 'probe' if isinstance(error, ProbeError) else STAGE
    return [beam.pvalue.TaggedOutput('rejects', Reject(c.clip_id, stage, error.reason, str(error)[:500],
                                                       source.source_id)) for c in clips]

  # -- one source

  @property
  def _slots(self) -> Slots:
    return shared_slots(self.max_concurrent, self.max_per_host)

  def _probe(self, uri: str, budget: Budget):
    """Probes are CPU-bound: at most one per core at once, whatever the download concurrency."""
    with _PROBE_SLOTS.take(None, budget):
      return probe(uri, self.max_pixels, self.probe_timeout_s)

  def _fetch(self, source: Source, budget: Budget, tally: Counter[str]) -> list:
    try:
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
        return [(source, [MediaFile(path, self._probe(path, budget))])]
      if method == 'gcs':
        if not FileSystems.exists(url):
          raise DownloadError('not_found', f'{url} does not exist')
        return [(source, [MediaFile(url, self._probe(url, budget))])]
      folder = FileSystems.join(self.work_dir, 'sources', source.source_id)
      height = source.height or self.default_height
      if method == 'http':
        return [(source, [self._cached(folder, source, url, None, 'http', height, budget, tally, None)])]
      with tempfile.TemporaryDirectory(prefix='ytdlp-') as scratch:
        info = _Once(functools.partial(self._metadata, url, height, budget, tally, scratch))
        if self.download_sections and all(c.start is not None for c in source.clips):
          return self._sections(source, folder, url, height, budget, tally, info)
        return [(source, [self._cached(folder, source, url, None, 'ytdlp', height, budget, tally, info)])]
    except (DownloadError, UnsafeInput, ProbeError) as error:
      tally['sources_failed'] += 1
      return self._rejects(source.clips, source, error)

  def _sections(self, source: Source, folder: str, url: str, height: Optional[int], budget: Budget,
                tally: Counter[str], info: _Once) -> list:
    """One download per clip's time range; a failed one rejects only its clip."""
    served: List[Tuple[ClipSpec, MediaFile]] = []
    outputs = []
    for clip in source.clips:
      try:
        section = (max(0.0, clip.start - self.section_margin_s), clip.end + self.section_margin_s)
        served.append((clip, self._cached(folder, source, url, section, 'ytdlp', height, budget, tally, info,
                                          clip.start)))
      except (DownloadError, UnsafeInput, ProbeError) as error:
        tally['sections_failed'] += 1
        outputs += self._rejects([clip], source, error)
      except Exception as error:  # pylint: disable=broad-except  # a bug: this section's clip pays for it
        tally['internal_errors'] += 1
        logging.warning('download: internal error on %s: %s', clip.clip_id, _where(error))
        outputs += self._internal_error([clip], source, _where(error))
    if not served:
      tally['sources_failed'] += 1
    else:
      kept = dataclasses.replace(source, clips=tuple(clip for clip, _ in served))
      outputs.insert(0, (kept, [media for _, media in served]))
    return outputs

  def _metadata(self, url: str, height: Optional[int], budget: Budget, tally: Counter[str], scratch: str) -> tuple:
    """(info json path, cookies copy, duration or None) for the yt-dlp downloads of one source, after the
    host, playlist, live and media-host checks. yt-dlp runs get the cookies copy: yt-dlp writes cookies back."""
    cookies = None
    if self.cookies:
      cookies = os.path.join(scratch, 'cookies.txt')
      with open(os.open(cookies, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 'wb') as handle:
        handle.write(read_bytes(self.cookies))

    def attempt():
      try:
        check_host(url, self.policy)
        info = ytdlp_info(url, height, min(60.0, self.timeout_s), budget.deadline, cookies, self.proxy,
                          self.policy)
        for media in media_urls(info):
          check_host(media, self.policy)
      except OSError as error:  # the name does not resolve
        raise DownloadError('unreachable', f'{url}: {error}', retryable=True) from None
      path = os.path.join(scratch, 'info.json')
      with open(path, 'w') as handle:
        json.dump(info, handle)
      return path, info.get('duration')

    path, duration = self._retrying(url, budget, tally, attempt)
    return path, cookies, duration

  @staticmethod
  def _stem(source: Source, url: str, method: str, height: Optional[int], section) -> str:
    """Cache name from what was asked: URL, method, height (yt-dlp) and time range."""
    asked = [url, method, height if method == 'ytdlp' else None,
             [round(section[0], 3), round(section[1], 3)] if section else None]
    return f'{source.source_id}.{hashlib.sha1(json.dumps(asked).encode()).hexdigest()[:12]}'

  def _cached(self, folder: str, source: Source, url: str, section, method: str, height: Optional[int],
              budget: Budget, tally: Counter[str], info: Optional[_Once], clip_start: float = 0.0) -> MediaFile:
    stem = self._stem(source, url, method, height, section)
    marker = FileSystems.join(folder, stem + '.json')
    if FileSystems.exists(marker):
      with FileSystems.open(marker) as handle:
        record = json.loads(handle.read())
      if record.get('url') == url and FileSystems.exists(record['uri']):
        tally['sources_cached'] += 1
        return MediaFile(record['uri'], self._probe(record['uri'], budget), record.get('offset', 0.0))
    local = tempfile.mkdtemp(prefix='dl-')
    try:
      path, verified = self._fetch_file(url, os.path.join(local, stem), section, method, height, budget, tally,
                                        info, clip_start)
      try:
        probed = self._probe(path, budget)
      except ProbeError as error:
        size = os.path.getsize(path)
        if not verified and error.reason in TRUNCATABLE:
          raise DownloadError('truncated', f'{url}: the connection closed after {size} bytes, with no '
                              f'Content-Length to check the end against, and the file does not decode ({error}): '
                              'cut short', retryable=True) from None
        raise ProbeError(error.reason, f'{url}: {error} ({size} bytes)') from None
      ext = os.path.splitext(path)[1] or '.mp4'
      uri = FileSystems.join(folder, stem + ext)
      put_file(path, uri)
      tally['bytes'] += os.path.getsize(path)
      offset = section[0] if section else 0.0
      write_atomic(marker, json.dumps({'uri': uri, 'url': url, 'offset': offset}).encode())
      tally['sources_downloaded'] += 1
      return MediaFile(uri, probed, offset)
    finally:
      shutil.rmtree(local, ignore_errors=True)

  def _fetch_file(self, url: str, stem: str, section, method: str, height: Optional[int], budget: Budget,
                  tally: Counter[str], info: Optional[_Once], clip_start: float) -> Tuple[str, bool]:
    """(downloaded path, whether its end was verified). A section whose clip starts after the end the
    metadata gives is `clip_past_end` without downloading (ffmpeg would write an empty file)."""
    if method == 'http':
      dest = stem + (os.path.splitext(urllib.parse.urlsplit(url).path)[1] or '.mp4')
      verified = self._retrying(url, budget, tally, lambda: http_download(
          url, dest, self.max_bytes, min(60.0, self.timeout_s), budget.deadline, self.policy, self.proxy))
      return dest, verified
    info_file, cookies, duration = info()
    if section is not None and duration and clip_start >= duration:
      raise DownloadError('clip_past_end', f'clip starts at {clip_start:.3f}s but {url} is {duration:g}s long '
                          '(yt-dlp metadata)')
    path = self._retrying(url, budget, tally, lambda: ytdlp_download(
        url, stem, height, section, self.max_bytes, min(60.0, self.timeout_s), budget.deadline, info_file,
        cookies, self.proxy, self.policy))
    return path, True

  def _retrying(self, url: str, budget: Budget, tally: Counter[str], attempt: Callable):
    """`attempt()` in a slot for the URL's host, retried with exponential back-off (or the server's
    Retry-After) on transient errors while the budget lasts; no slot is held while waiting."""
    host = host_key(url)
    for number in range(self.retries + 1):
      try:
        with self._slots.take(host, budget):
          return attempt()
      except DownloadError as error:
        if not error.retryable or number == self.retries or budget.left() <= 0:
          raise
        delay = min(30.0, 0.5 * 2 ** number) * (0.5 + random.random())
        if error.retry_after is not None:
          if error.retry_after > budget.left():
            raise DownloadError(error.reason, f'{error}; the server asks to retry after {error.retry_after:.0f}s, '
                                'past the download time limit') from None
          delay = max(delay, error.retry_after)
        tally['retries'] += 1
        logging.info('retrying %s in %.1fs after: %s', url, delay, error)
        time.sleep(min(delay, max(0.0, budget.left())))
    raise AssertionError('unreachable')
