"""A loopback HTTP server for download tests: slow, dripping, rate-limited and cut-short answers.

Path prefixes (they combine in this order, e.g. `/delay/1/drip/a.mp4`):
`/delay/<s>/` waits that long before answering; `/retry_after/<s>/` answers the first
request for a path 429 with `Retry-After: <s>`; `/nolength/` sends half the file with no Content-Length and closes; `/drip/` sends the
body in small pieces with pauses. Files are served with Range support and a content type
from their extension. Every request is logged with its time (and its Cookie header, if
any, in `cookies`), and the most requests handled at once is kept. `listener()` is a port that
only records who connects: where a refused URL points, to show that nothing got there.
"""
from __future__ import annotations

import contextlib
import http.server
import mimetypes
import os
import re
import socket
import ssl
import threading
import time
import urllib.parse
from typing import Iterator, List, Optional, Tuple

DRIP_BYTES = 16 << 10
DRIP_PAUSE_S = 0.1


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = 'HTTP/1.1'

  def log_message(self, *args):
    pass

  def do_GET(self):
    server = self.server
    path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
    with server.lock:
      server.requests.append((time.monotonic(), path, self.headers.get('Range')))
      if self.headers.get('Cookie'):
        server.cookies.append(self.headers.get('Cookie'))
      server.active += 1
      server.most_active = max(server.most_active, server.active)
    self._held = True
    try:
      self._serve(path)
    finally:
      self._release()

  def _release(self):
    """A request stops counting as active before its first byte goes out: a client that waits for one answer
    before the next request can then never be seen as two at once (counting until the handler returns raced
    with the client's next request)."""
    if self._held:
      self._held = False
      with self.server.lock:
        self.server.active -= 1

  def _serve(self, path: str):
    server = self.server
    match = re.match(r'^/delay/([\d.]+)(/.*)$', path)
    if match:
      time.sleep(float(match.group(1)))
      path = match.group(2)
    self._release()
    match = re.match(r'^/retry_after/(\d+)(/.*)$', path)
    if match:
      with server.lock:
        first = path not in server.limited
        server.limited.add(path)
      if first:
        return self._empty(429, {'Retry-After': match.group(1)})
      path = match.group(2)
    nolength, drip = path.startswith('/nolength/'), path.startswith('/drip/')
    if nolength or drip:
      path = path[len('/nolength'):] if nolength else path[len('/drip'):]
    file = os.path.join(server.root, path.lstrip('/'))
    if not os.path.isfile(file):
      return self._empty(404)
    with open(file, 'rb') as handle:
      data = handle.read()
    if nolength:
      self.send_response(200)
      self.send_header('Content-Type', 'video/mp4')
      self.send_header('Connection', 'close')
      self.end_headers()
      self.wfile.write(data[:len(data) // 2])
      self.close_connection = True
      return
    start, end, status = 0, len(data) - 1, 200
    ranged = re.fullmatch(r'bytes=(\d+)-(\d*)', self.headers.get('Range') or '')
    if ranged:
      start = int(ranged.group(1))
      end = min(end, int(ranged.group(2))) if ranged.group(2) else end
      if start >= len(data):
        return self._empty(416, {'Content-Range': f'bytes */{len(data)}'})
      status = 206
    self.send_response(status)
    self.send_header('Content-Type', mimetypes.guess_type(file)[0] or 'application/octet-stream')
    self.send_header('Accept-Ranges', 'bytes')
    self.send_header('Content-Length', str(end - start + 1))
    if status == 206:
      self.send_header('Content-Range', f'bytes {start}-{end}/{len(data)}')
    self.end_headers()
    body = data[start:end + 1]
    try:
      if not drip:
        self.wfile.write(body)
        return
      for at in range(0, len(body), DRIP_BYTES):
        self.wfile.write(body[at:at + DRIP_BYTES])
        self.wfile.flush()
        time.sleep(DRIP_PAUSE_S)
    except (BrokenPipeError, ConnectionResetError):
      self.close_connection = True

  def _empty(self, code: int, headers: dict = None):
    self.send_response(code)
    for name, value in (headers or {}).items():
      self.send_header(name, value)
    self.send_header('Content-Length', '0')
    self.end_headers()


class _Server(http.server.ThreadingHTTPServer):
  daemon_threads = True

  def handle_error(self, request, client_address):
    pass  # clients that give up mid-body (killed downloads) are part of the tests


@contextlib.contextmanager
def download_server(root: str, tls: Optional[Tuple[str, str]] = None) -> Iterator[_Server]:
  """A threaded loopback server for `root`; yields it (`.url`, `.requests`, `.most_active`: the most requests held
  unanswered at once).
  With `tls` (certificate file, key file) it speaks https."""
  server = _Server(('127.0.0.1', 0), _Handler)
  server.root, server.requests, server.cookies, server.limited = root, [], [], set()
  server.lock, server.active, server.most_active = threading.Lock(), 0, 0
  server.url = f'{"https" if tls else "http"}://127.0.0.1:{server.server_address[1]}'
  if tls:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*tls)
    server.socket = context.wrap_socket(server.socket, server_side=True)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield server
  finally:
    server.shutdown()
    server.server_close()


@contextlib.contextmanager
def listener() -> Iterator[Tuple[int, List[Tuple[str, int]]]]:
  """A loopback port that accepts connections, records their peers and closes them; yields (port, peers)."""
  sock = socket.create_server(('127.0.0.1', 0))
  sock.settimeout(0.2)
  peers: List[Tuple[str, int]] = []
  stop = threading.Event()

  def accept():
    while not stop.is_set():
      try:
        conn, peer = sock.accept()
      except OSError:
        continue
      peers.append(peer)
      conn.close()

  thread = threading.Thread(target=accept, daemon=True)
  thread.start()
  try:
    yield sock.getsockname()[1], peers
  finally:
    stop.set()
    thread.join()
    sock.close()
