"""Test support: a loopback HTTP server that behaves like real media hosts, and CLI runners."""
from __future__ import annotations

import contextlib
import glob
import http.server
import io
import itertools
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from typing import Dict, Iterator, List, Optional

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# `python -m beam_pipeline` with Ctrl-C raising KeyboardInterrupt even where pytest's worker ignores SIGINT (the
# child inherits that); set in the child's Python, not in a preexec_fn, which can deadlock a fork from a process
# whose other threads (Beam's) hold locks.
INTERRUPTIBLE_CLI = [sys.executable, '-c', 'import runpy, signal; '
                     'signal.signal(signal.SIGINT, signal.default_int_handler); '
                     'runpy.run_module("beam_pipeline", run_name="__main__", alter_sys=True)']


class MediaHandler(http.server.BaseHTTPRequestHandler):
  """Serves files from `server.root` with byte-range support (206/416), like real CDNs.

  Path prefixes change behaviour: `/norange/` ignores Range headers (as Python's
  http.server does), `/flaky/` fails every `server.fail_every`-th request with 500,
  `/cut/` drops the connection half-way through the body of every `fail_every`-th
  request, `/status/<code>` answers that code, `/stall/` sends headers and then stalls,
  `/loop/` redirects to itself forever, `/goto/<quoted URL>` redirects there once.
  """
  protocol_version = 'HTTP/1.1'
  counter = itertools.count()
  servers: Dict[int, http.server.HTTPServer] = {}  # by port, so tests can read a server's request log

  def log_message(self, *args):
    pass

  def do_HEAD(self):
    self._serve(body=False)

  def do_GET(self):
    self._serve(body=True)

  def _serve(self, body: bool):
    path = urllib.parse.urlsplit(self.path).path
    self.server.requests.append((self.command, path, self.headers.get('Range')))
    honour_range = True
    if path.startswith('/status/'):
      return self._plain(int(path.split('/')[2]))
    if path.startswith(('/loop/', '/goto/')):
      self.send_response(302)
      self.send_header('Location', urllib.parse.unquote(path[len('/goto/'):]) if path.startswith('/goto/') else path)
      self.send_header('Content-Length', '0')
      self.end_headers()
      return
    if path.startswith('/flaky/'):
      path = path[len('/flaky'):]
      if next(self.counter) % self.server.fail_every == 0:
        return self._plain(500)
    cut = False
    if path.startswith('/cut/'):
      path, cut = path[len('/cut'):], next(self.counter) % self.server.fail_every == 0
    if path.startswith('/norange/'):
      path, honour_range = path[len('/norange'):], False
    stall = path.startswith('/stall/')
    if stall:
      path = path[len('/stall'):]
    file = os.path.join(self.server.root, urllib.parse.unquote(path.lstrip('/')))
    if not os.path.isfile(file):
      return self._plain(404)
    with open(file, 'rb') as handle:
      data = handle.read()
    start, end, status = 0, len(data) - 1, 200
    match = re.fullmatch(r'bytes=(\d*)-(\d*)', self.headers.get('Range') or '')
    if honour_range and match:
      first, last = match.groups()
      if first == '':
        start = max(0, len(data) - int(last))
      else:
        start = int(first)
        end = min(end, int(last)) if last else end
      if start >= len(data):
        self.send_response(416)
        self.send_header('Content-Range', f'bytes */{len(data)}')
        self.send_header('Content-Length', '0')
        self.end_headers()
        return
      status = 206
    self.send_response(status)
    self.send_header('Content-Type', 'video/mp4')
    self.send_header('Accept-Ranges', 'bytes' if honour_range else 'none')
    self.send_header('Content-Length', str(end - start + 1))
    if status == 206:
      self.send_header('Content-Range', f'bytes {start}-{end}/{len(data)}')
    self.end_headers()
    if stall:
      time.sleep(self.server.stall_s)
      return
    if body:
      try:
        self.wfile.write(data[start:start + (end + 1 - start) // 2] if cut else data[start:end + 1])
      except (BrokenPipeError, ConnectionResetError):
        pass
      self.close_connection = self.close_connection or cut  # short of its Content-Length, then EOF

  def _plain(self, code: int):
    self.send_response(code)
    self.send_header('Content-Length', '0')
    self.end_headers()


@contextlib.contextmanager
def media_server(root: str, fail_every: int = 3, stall_s: float = 30.0) -> Iterator[str]:
  """A threaded loopback server for `root`; yields its base URL."""
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), MediaHandler)
  server.daemon_threads = True
  server.root, server.fail_every, server.stall_s, server.requests = root, fail_every, stall_s, []
  MediaHandler.servers[server.server_address[1]] = server
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f'http://127.0.0.1:{server.server_address[1]}'
  finally:
    MediaHandler.servers.pop(server.server_address[1], None)
    server.shutdown()
    server.server_close()


def request_log(url: str) -> list:
  """(method, path, Range header) of every request the loopback server at `url` has answered so far."""
  return MediaHandler.servers[urllib.parse.urlsplit(url).port].requests


def run_cli(*args: str, env: Optional[Dict[str, str]] = None, timeout: float = 600) -> subprocess.CompletedProcess:
  """`python -m beam_pipeline ARGS` as a user runs it; raises with its output when it fails."""
  full_env = dict(os.environ, **(env or {}))
  result = subprocess.run([sys.executable, '-m', 'beam_pipeline', *args], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
  if result.returncode != 0:
    raise AssertionError(f'CLI failed ({result.returncode}):\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}')
  return result


def _keep_pickles(key: str, data: bytes):
  """Pickled members (megactor's `.pyd`) stay bytes: tests read them with pickles.load_restricted, not with
  webdataset's plain pickle.loads."""
  return data if key.rsplit('.', 1)[-1] in ('pyd', 'pickle', 'pkl') else None


def read_shards(output: str) -> List[dict]:
  """Every sample of the output's shards, read with webdataset as a training job would (pickles left as bytes)."""
  import webdataset as wds
  shards = sorted(glob.glob(os.path.join(output, 'shards', '*.tar')))
  if not shards:
    return []
  return list(wds.WebDataset(shards, shardshuffle=False).decode(_keep_pickles))


def read_jsonl(path: str) -> List[dict]:
  if not os.path.exists(path):
    return []
  with open(path) as handle:
    return [json.loads(line) for line in handle if line.strip()]


def leftovers(*roots: str) -> List[str]:
  """What a finished run must not leave under its output (or work dir): Beam's `beam-temp-*` folders and empty
  folders."""
  found = []
  for root in roots:
    for folder, folders, files in os.walk(root):
      found += [os.path.join(folder, name) for name in folders if name.startswith('beam-temp-')]
      if not folders and not files and folder != root:
        found.append(folder)
  return sorted(found)


def load_npy(data) -> np.ndarray:
  return data if isinstance(data, np.ndarray) else np.load(io.BytesIO(data), allow_pickle=False)


# ----------------------------------------------------------------------------- loopback services

def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = 30.0) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if process.poll() is not None:
      raise RuntimeError(f'{process.args[:3]} exited with {process.returncode}')
    with contextlib.suppress(OSError), socket.create_connection(('127.0.0.1', port), timeout=1):
      return
    time.sleep(0.2)
  raise TimeoutError(f'nothing listens on port {port} after {timeout}s')


@contextlib.contextmanager
def background(args, port: int, env=None, timeout: float = 30.0, log_path: str = os.devnull):
  """A service process on loopback, stopped (then killed) when the block ends; its output goes to `log_path`."""
  log = open(log_path, 'wb')
  process = subprocess.Popen(args, stdout=log, stderr=log, env=env, start_new_session=True)
  try:
    wait_for_port(port, process, timeout)
    yield process
  finally:
    process.terminate()
    try:
      process.wait(10)
    except subprocess.TimeoutExpired:
      process.kill()
      process.wait(10)
    log.close()


def run_bundle(fn, sources) -> list:
  """One bundle as a Beam runner drives a DoFn: setup, start, each element, finish (its outputs too), teardown."""
  fn.setup()
  fn.start_bundle()
  outputs = [output for source in sources for output in fn.process(source)]
  outputs += [windowed.value for windowed in fn.finish_bundle()]
  fn.teardown()
  return outputs


def official_syncnet_weights(folder) -> str:
  """Random weights in syncnet_v2.model's layout, saved as syncnet_python saves: torch.save of the state dict."""
  import torch
  from model_handlers.syncnet import SyncNet
  path = os.path.join(str(folder), 'syncnet_v2.model')
  torch.manual_seed(0)
  torch.save(SyncNet().state_dict(), path)
  return path
