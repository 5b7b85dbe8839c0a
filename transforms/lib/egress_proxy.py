"""A filtering HTTP proxy on 127.0.0.1 that every connection of the yt-dlp child (and its ffmpeg) goes through.

yt-dlp resolves hosts and follows redirects on its own, and so does the ffmpeg it starts for sections and HLS:
a check of the page's host made before they run covers neither a redirect nor a second DNS answer. Given
`--proxy` (yt-dlp hands it on to ffmpeg as `http_proxy`), both ask this proxy for each connection, by CONNECT
(https) or with an absolute URI (plain http). The proxy resolves the target with the input policy
(`checked_addresses`: every address allowed) and connects only to an address it checked (`connect_checked`),
or answers 403 naming the refusal and records it in the asking download's `Session`, so the caller can reject
with `host_not_allowed` instead of yt-dlp's generic error. Nothing is sent to a refused host.

Behind a user's proxy (`--proxy`, or the environment's proxy variables) the target is still checked by name,
then the request goes on through that proxy, which resolves the name itself: there, the check by name is the
protection against DNS rebinding.

One proxy serves every download of a process (`shared_proxy`, started on first use); each download holds a
`Session` whose credentials its children send, which tells their connections apart. Each connection gets a
daemon thread, every socket a timeout, and a session's sockets are shut when it ends.
"""
from __future__ import annotations

import base64
import collections
import contextlib
import dataclasses
import logging
import os
import re
import secrets
import selectors
import socket
import threading
import urllib.parse
import urllib.request
from typing import Deque, Dict, Iterator, List, Optional, Set, Tuple

from transforms.lib.safety import InputPolicy, UnsafeInput, checked_addresses, connect_checked

HEAD_LIMIT = 64 << 10  # request and response heads; a longer one is refused
HEAD_TIMEOUT_S = 30.0  # to send a request head
CHUNK = 64 << 10
MAX_CONNECTIONS = 512  # at once, over all sessions: a runaway child cannot exhaust the worker's threads
HISTORY = 1000
_HOP_BY_HOP = frozenset({'connection', 'keep-alive', 'proxy-authorization', 'proxy-authenticate', 'proxy-connection',
                         'te', 'trailer', 'upgrade'})
_UNPRINTABLE = re.compile(r'[^\x20-\x7e]')


class _Answered(Exception):
  """The client has been answered with an error status; the connection ends."""


@dataclasses.dataclass(frozen=True)
class Upstream:
  """A user's http:// proxy that checked requests go on through."""
  host: str
  port: int
  authorization: Optional[str] = dataclasses.field(repr=False)  # Proxy-Authorization, from the URL's credentials

  @classmethod
  def parse(cls, url: str) -> 'Upstream':
    """An http:// proxy URL (no scheme means http://), else ValueError."""
    text = url if '://' in url else f'http://{url}'
    parts = urllib.parse.urlsplit(text)
    if parts.scheme.lower() != 'http' or not parts.hostname:
      raise ValueError(f'proxy {_redacted(url)}: only http:// proxies can carry yt-dlp\'s connections behind the '
                       'host filter')
    authorization = None
    if parts.username is not None:
      pair = f'{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or "")}'
      authorization = 'Basic ' + base64.b64encode(pair.encode()).decode()
    return cls(parts.hostname, parts.port or 80, authorization)


def _redacted(url: str) -> str:
  return re.sub(r'//[^/@]*@', '//***@', url)


@dataclasses.dataclass(eq=False)
class Session:
  """One download's use of the proxy: the URL its children are given and what the proxy refused them."""
  policy: InputPolicy
  upstream: Optional[Upstream]  # None: the environment's proxy variables, if any, else direct
  timeout_s: float  # idle limit of each connection
  url: str
  authorization: str
  refusals: List[str] = dataclasses.field(default_factory=list)
  sockets: Set[socket.socket] = dataclasses.field(default_factory=set)
  lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)
  closed: bool = False

  def refused(self) -> Optional[str]:
    """The first refusal's detail, or None."""
    with self.lock:
      return self.refusals[0] if self.refusals else None


class EgressProxy:
  """The proxy: a listening socket on 127.0.0.1 and a daemon thread accepting on it."""

  def __init__(self):
    self._listener = socket.create_server(('127.0.0.1', 0))
    self._listener.settimeout(0.5)  # the accept loop looks at `_stop` this often
    self.port = self._listener.getsockname()[1]
    self._stop = threading.Event()
    self._lock = threading.Lock()
    self._sessions: Dict[str, Session] = {}
    self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
    self._history: Deque[Tuple[str, str, Optional[str]]] = collections.deque(maxlen=HISTORY)
    self._thread = threading.Thread(target=self._accept, name=f'egress-proxy-{self.port}', daemon=True)
    self._thread.start()

  @property
  def alive(self) -> bool:
    return self._thread.is_alive() and not self._stop.is_set()

  @contextlib.contextmanager
  def session(self, policy: InputPolicy, upstream: Optional[str] = None, timeout_s: float = 60.0) -> Iterator[Session]:
    """A session for one child run; its connections are shut when it ends."""
    token = secrets.token_hex(16)
    pair = f'dl:{token}'
    session = Session(policy, Upstream.parse(upstream) if upstream else None, timeout_s,
                      f'http://{pair}@127.0.0.1:{self.port}', 'Basic ' + base64.b64encode(pair.encode()).decode())
    with self._lock:
      self._sessions[session.authorization] = session
    try:
      yield session
    finally:
      with self._lock:
        self._sessions.pop(session.authorization, None)
      with session.lock:
        session.closed = True
        held = list(session.sockets)
      for sock in held:
        with contextlib.suppress(OSError):
          sock.shutdown(socket.SHUT_RDWR)

  def history(self) -> List[Tuple[str, str, Optional[str]]]:
    """(method, host:port, refusal or None) of the latest requests past the credentials check, oldest first."""
    with self._lock:
      return list(self._history)

  def _record(self, method: str, where: str, refusal: Optional[str]) -> None:
    with self._lock:
      self._history.append((method, where, refusal))

  def close(self) -> None:
    self._stop.set()
    self._thread.join(timeout=5)
    self._listener.close()

  # -- connections

  def _accept(self) -> None:
    while not self._stop.is_set():
      try:
        client, _ = self._listener.accept()
      except socket.timeout:
        continue
      except OSError:
        if self._stop.is_set():
          return
        continue
      if not self._slots.acquire(blocking=False):
        with contextlib.suppress(OSError):
          client.settimeout(1.0)
          _answer(client, 503, 'too many connections')
        client.close()
        continue
      try:
        threading.Thread(target=self._connection, args=(client,), name='egress-proxy-conn', daemon=True).start()
      except RuntimeError:  # no thread to be had
        client.close()
        self._slots.release()

  def _connection(self, client: socket.socket) -> None:
    target: List[socket.socket] = []
    session: Optional[Session] = None
    try:
      client.settimeout(HEAD_TIMEOUT_S)
      head, rest = _read_head(client)
      method, uri, headers = _parse_request(head)
      session = self._session_for(headers)
      if session is None:
        return _answer(client, 407, 'proxy credentials required',
                       {'Proxy-Authenticate': 'Basic realm="download"'})
      client.settimeout(session.timeout_s)
      if not _hold(session, client):
        return
      if method == 'CONNECT':
        self._tunnel(client, session, uri, target)
      else:
        self._forward(client, session, method, uri, headers, rest, target)
    except _Answered:
      pass
    except (OSError, ValueError) as error:  # the client went away, or spoke nonsense
      logging.debug('egress proxy: connection ended: %s', error)
    finally:
      for sock in target + [client]:
        if session is not None:
          with session.lock:
            session.sockets.discard(sock)
        with contextlib.suppress(OSError):
          sock.close()
      self._slots.release()

  def _session_for(self, headers: List[Tuple[str, str]]) -> Optional[Session]:
    given = _header(headers, 'proxy-authorization') or ''
    with self._lock:
      for authorization, session in self._sessions.items():
        if secrets.compare_digest(given.encode(), authorization.encode()):
          return session
    return None

  def _open(self, client: socket.socket, session: Session, method: str, host: str, port: int, scheme: str,
            target: List[socket.socket]) -> Tuple[socket.socket, Optional[Upstream]]:
    """A socket to `host:port` (or to the proxy that takes the request on), after the policy's check; a refusal
    or a failure is answered to the client here (`_Answered`)."""
    where = _authority(host, port)
    try:
      upstream = session.upstream or _environment_proxy(scheme, host, port)
    except ValueError as error:
      _answer(client, 502, str(error))
      raise _Answered() from None
    try:
      if upstream is None:
        sock = connect_checked((host, port), session.timeout_s, None, session.policy)
      else:
        checked_addresses(host, port, session.policy)  # the upstream proxy resolves: checked by name
        sock = socket.create_connection((upstream.host, upstream.port), session.timeout_s)
    except UnsafeInput as error:
      detail = str(error)
      with session.lock:
        session.refusals.append(detail)
      self._record(method, where, detail)
      logging.warning('egress proxy: refused %s %s: %s', method, where, detail)
      _answer(client, 403, f'{error.reason}: {detail}', body=f'{error.reason}: {detail}\n')
      raise _Answered() from None
    except ValueError as error:  # a name that does not encode (IDNA)
      _answer(client, 400, f'bad host name {where}: {error}')
      raise _Answered() from None
    except socket.gaierror as error:
      _answer(client, 502, f'Failed to resolve {where} ({error.strerror or error})')
      raise _Answered() from None
    except socket.timeout:
      _answer(client, 504, f'Connection to {where} timed out')
      raise _Answered() from None
    except OSError as error:
      _answer(client, 502, f'{error.strerror or error} ({where})')
      raise _Answered() from None
    self._record(method, where, None)
    target.append(sock)
    sock.settimeout(session.timeout_s)
    if not _hold(session, sock):
      raise _Answered()
    return sock, upstream

  def _tunnel(self, client: socket.socket, session: Session, uri: str, target: List[socket.socket]) -> None:
    """CONNECT host:port: a byte tunnel after the check (through the upstream proxy's own CONNECT if any)."""
    parts = urllib.parse.urlsplit(f'//{uri}')
    try:
      host, port = parts.hostname, parts.port
    except ValueError:
      host, port = None, None
    if not host or not port or parts.path or parts.username is not None:
      return _answer(client, 400, 'CONNECT wants host:port')
    sock, upstream = self._open(client, session, 'CONNECT', host, port, 'https', target)
    if upstream is not None:
      where = _authority(host, port)
      extra = f'Proxy-Authorization: {upstream.authorization}\r\n' if upstream.authorization else ''
      sock.sendall(f'CONNECT {where} HTTP/1.1\r\nHost: {where}\r\n{extra}\r\n'.encode())
      head, early = _read_head(sock)
      status = head.split(b'\r\n', 1)[0].decode('latin-1')
      if not re.match(r'HTTP/1\.[01] 2\d\d', status):
        return _answer(client, 502, f'the upstream proxy answered: {status[:200]}')
      client.sendall(b'HTTP/1.1 200 Connection established\r\n\r\n' + early)
    else:
      client.sendall(b'HTTP/1.1 200 Connection established\r\n\r\n')
    _splice(client, sock, session.timeout_s, forward_client=True)

  def _forward(self, client: socket.socket, session: Session, method: str, uri: str, headers: List[Tuple[str, str]],
               rest: bytes, target: List[socket.socket]) -> None:
    """A plain http request with an absolute URI: one request per connection (both sides told to close)."""
    parts = urllib.parse.urlsplit(uri)
    try:
      port = parts.port or 80
    except ValueError:
      return _answer(client, 400, 'bad port')
    if parts.scheme.lower() != 'http' or not parts.hostname:
      return _answer(client, 400, 'only http:// URLs are forwarded (https goes through CONNECT)')
    if _header(headers, 'transfer-encoding') is not None:
      return _answer(client, 411, 'a request body needs a Content-Length')
    length = int(_header(headers, 'content-length') or 0)
    host = parts.hostname
    sock, upstream = self._open(client, session, method, host, port, 'http', target)
    where = _authority(host, port)
    path = urllib.parse.urlunsplit(('', '', parts.path or '/', parts.query, ''))
    line = f'{method} {f"http://{where}{path}" if upstream else path} HTTP/1.1\r\n'
    named = {h.strip().lower() for h in (_header(headers, 'connection') or '').split(',')}
    kept = [(k, v) for k, v in headers if k.lower() not in _HOP_BY_HOP | named | {'host'}]
    kept = [('Host', where if port != 80 else _authority(host, None))] + kept + [('Connection', 'close')]
    if upstream is not None and upstream.authorization:
      kept.append(('Proxy-Authorization', upstream.authorization))
    sock.sendall((line + ''.join(f'{k}: {v}\r\n' for k, v in kept) + '\r\n').encode('latin-1'))
    sock.sendall(rest[:length])
    sent = len(rest[:length])
    while sent < length:
      block = client.recv(min(CHUNK, length - sent))
      if not block:
        return
      sent += len(block)
      sock.sendall(block)
    head, rest = _read_head(sock)
    client.sendall(_closing(head) + rest)
    _splice(client, sock, session.timeout_s, forward_client=False)


def _hold(session: Session, sock: socket.socket) -> bool:
  """Count `sock` as the session's (shut when it ends); False once the session has ended."""
  with session.lock:
    if session.closed:
      return False
    session.sockets.add(sock)
    return True


def _authority(host: str, port: Optional[int]) -> str:
  name = f'[{host}]' if ':' in host else host
  return f'{name}:{port}' if port else name


def _environment_proxy(scheme: str, host: str, port: int) -> Optional[Upstream]:
  """The environment's proxy for `scheme` (http_proxy, https_proxy, no_proxy), as yt-dlp would have used it."""
  proxies = urllib.request.getproxies_environment()
  url = proxies.get(scheme) or (proxies.get('http') if scheme == 'https' else None) or proxies.get('all')
  if not url or urllib.request.proxy_bypass_environment(_authority(host, port), proxies):
    return None
  return Upstream.parse(url)


def _read_head(sock: socket.socket) -> Tuple[bytes, bytes]:
  """(head up to its blank line, bytes read after it); ValueError if it is too long or the peer closes first."""
  data = b''
  while b'\r\n\r\n' not in data:
    if len(data) > HEAD_LIMIT:
      raise ValueError('head too long')
    block = sock.recv(CHUNK)
    if not block:
      raise ValueError('closed before the end of the head')
    data += block
  head, rest = data.split(b'\r\n\r\n', 1)
  return head + b'\r\n\r\n', rest


def _parse_request(head: bytes) -> Tuple[str, str, List[Tuple[str, str]]]:
  """(method, request target, [(header name, value)] in order)."""
  lines = head.decode('latin-1').split('\r\n')
  parts = lines[0].split(' ')
  if len(parts) != 3 or not parts[2].startswith('HTTP/1.'):
    raise ValueError(f'not an HTTP/1 request line: {lines[0][:100]!r}')
  headers = []
  for line in lines[1:]:
    if ':' in line:
      name, value = line.split(':', 1)
      headers.append((name.strip(), value.strip()))
  return parts[0].upper(), parts[1], headers


def _header(headers: List[Tuple[str, str]], name: str) -> Optional[str]:
  return next((value for key, value in headers if key.lower() == name), None)


def _closing(head: bytes) -> bytes:
  """A response head told to close its connection (one request per proxied connection)."""
  lines = head.decode('latin-1').split('\r\n')
  kept = [line for line in lines[1:] if line and line.split(':', 1)[0].strip().lower() not in
          ('connection', 'keep-alive', 'proxy-connection')]
  return '\r\n'.join([lines[0]] + kept + ['Connection: close', '', '']).encode('latin-1')


def _answer(sock: socket.socket, code: int, reason: str, headers: Optional[Dict[str, str]] = None,
            body: str = '') -> None:
  """An error status to the client; `reason` (printable ASCII) is what yt-dlp's error line shows."""
  reason = _UNPRINTABLE.sub('?', reason)[:300]
  payload = _UNPRINTABLE.sub('?', body or reason + '\n').encode()
  extra = ''.join(f'{k}: {v}\r\n' for k, v in (headers or {}).items())
  with contextlib.suppress(OSError):
    sock.sendall(f'HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain\r\nContent-Length: {len(payload)}\r\n'
                 f'{extra}Connection: close\r\n\r\n'.encode() + payload)


def _splice(client: socket.socket, target: socket.socket, idle_s: float, forward_client: bool) -> None:
  """Relay bytes both ways until both ends have closed (an end that closes is half-closed on the other side),
  one fails, or nothing moves for `idle_s`. Without `forward_client` (a forwarded request, whose response is
  the last thing on the connection) bytes from the client are dropped and either end closing ends it."""
  peers = {client: target, target: client}
  with selectors.DefaultSelector() as selector:
    for sock in peers:
      selector.register(sock, selectors.EVENT_READ)
    while selector.get_map():
      ready = selector.select(idle_s)
      if not ready:
        return
      for key, _ in ready:
        sock = key.fileobj
        block = sock.recv(CHUNK)
        if not block:
          if not forward_client:
            return
          selector.unregister(sock)
          with contextlib.suppress(OSError):
            peers[sock].shutdown(socket.SHUT_WR)
        elif forward_client or sock is target:
          peers[sock].sendall(block)


_SHARED: Optional[EgressProxy] = None
_SHARED_PID = 0
_SHARED_LOCK = threading.Lock()


def shared_proxy() -> EgressProxy:
  """This process's proxy, started on first use (again in a forked child, whose copy has no thread)."""
  global _SHARED, _SHARED_PID
  with _SHARED_LOCK:
    if _SHARED is None or _SHARED_PID != os.getpid() or not _SHARED.alive:
      _SHARED, _SHARED_PID = EgressProxy(), os.getpid()
    return _SHARED
