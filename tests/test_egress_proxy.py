"""yt-dlp and the ffmpeg it starts reach the network only through the filtering proxy, which checks the address
each connection goes to: redirects, a second DNS answer and media named only at download time (HLS segments,
a page's video) are refused before anything connects to them.

Real yt-dlp and ffmpeg children and real loopback servers. A refused target is 0.0.0.0:<a listening loopback
port> (refused even with --allow_private_hosts; a connection that got past the filter would land on this
machine, where the listener sees it), or a metadata address once a child has been shown to go through the
proxy. The proxy runs in this process: `connects` records its socket.create_connection calls and lets only
loopback through, so a failing test still sends nothing off this machine.
"""
import ipaddress
import os
import shutil
import socket
import subprocess
import time
import urllib.parse

import apache_beam as beam
import imageio_ffmpeg
import pytest
import yt_dlp

from tests.download_server import download_server, listener
from tests.helpers import media_server, request_log
from transforms.core.elements import ClipSpec, Source
from transforms.lib.egress_proxy import EgressProxy, shared_proxy
from transforms.lib.probe import probe
from transforms.lib.safety import InputPolicy
from transforms.sources.download import (DownloadError, DownloadSource, PROXIED_PROTOCOLS, _check_formats, _format,
                                         ytdlp_download)

DEFAULT = InputPolicy()
LOOPBACK = InputPolicy(allow_private_hosts=True)
PUBLIC = '93.184.215.14'  # what the rebinding name answers first: an allowed address nothing may connect to


def _rejects(outputs):
  return [(o.value.id, o.value.reason) for o in outputs if isinstance(o, beam.pvalue.TaggedOutput)]


def _served(outputs):
  return [o for o in outputs if not isinstance(o, beam.pvalue.TaggedOutput)]


def _proxied(where: str) -> list:
  """(method, refusal) of what the proxy was asked for `host:port`."""
  return [(method, refusal) for method, target, refusal in shared_proxy().history() if target == where]


@pytest.fixture
def connects(monkeypatch):
  """Targets of this process's socket.create_connection; anything but a loopback IP fails without connecting."""
  made = []
  real = socket.create_connection

  def guarded(address, *args, **kwargs):
    made.append((address[0], address[1]))
    try:
      loopback = ipaddress.ip_address(address[0]).is_loopback
    except ValueError:
      loopback = False
    if not loopback:
      raise OSError(f'test guard: no connection to {address[0]} from this test')
    return real(address, *args, **kwargs)

  monkeypatch.setattr(socket, 'create_connection', guarded)
  return made


@pytest.fixture
def no_proxy_everywhere(monkeypatch):
  """A worker whose environment says to bypass proxies for every host: ffmpeg honours no_proxy even when
  yt-dlp hands it a proxy, so the children must not see it."""
  monkeypatch.setenv('no_proxy', '*')
  monkeypatch.setenv('NO_PROXY', '*')


def test_a_redirect_to_a_refused_address_is_refused_before_any_connection(tmp_path, media_dir, connects):
  """The page's host is allowed (loopback, with the flag) and answers 302 to 0.0.0.0: yt-dlp follows it and
  the proxy refuses. The same then for the cloud metadata address (refused even with the flag)."""
  fn = DownloadSource(str(tmp_path), retries=0, policy=LOOPBACK)
  with media_server(str(media_dir)) as server, listener() as (trap, reached):
    hop = f'/goto/{urllib.parse.quote(f"http://0.0.0.0:{trap}/", safe="")}'
    out = fn.download(Source('u', server + hop, (ClipSpec('u_0', 0, 0.0, 2.0),)))
    assert _rejects(out) == [('u_0', 'host_not_allowed')], out
    assert 'yt-dlp asked for a refused host' in out[0].value.detail and 'unspecified' in out[0].value.detail
    assert _proxied(f'0.0.0.0:{trap}') == [('GET', '0.0.0.0 is an unspecified address')]
    assert reached == [] and not [c for c in connects if c[1] == trap]
    meta = f'/goto/{urllib.parse.quote("http://169.254.169.254/latest/meta-data/", safe="")}'
    out = fn.download(Source('m', server + meta, (ClipSpec('m_0', 0, 0.0, 2.0),)))
    assert {path for _, path, _ in request_log(server)} == {hop, meta}
  assert _rejects(out) == [('m_0', 'host_not_allowed')] and 'a cloud metadata address' in out[0].value.detail
  assert _proxied('169.254.169.254:80') == [('GET', '169.254.169.254 is a cloud metadata address')]
  assert all(host == '127.0.0.1' for host, _ in connects), connects


@pytest.mark.parametrize('scheme', ['http', 'https'])
def test_dns_rebinding_is_refused_where_the_connection_is_made(tmp_path, media_dir, connects, monkeypatch, scheme):
  """A name that answers a public address to the check before yt-dlp runs, and loopback after: the proxy
  resolves again, checks that answer and refuses (CONNECT for https). Nothing connects to either address.

  The name is `localhost`, whose first answer in this process is made public: after that it answers from
  /etc/hosts as always, so a child that resolved it itself would ask no DNS server, and would reach the
  loopback server, where the test sees it."""
  answers = []
  real = socket.getaddrinfo

  def resolve(host, port, *args, **kwargs):
    if host != 'localhost':
      return real(host, port, *args, **kwargs)
    answers.append(port)
    if len(answers) == 1:
      return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, '', (PUBLIC, port or 0))]
    return real(host, port, *args, **kwargs)

  monkeypatch.setattr(socket, 'getaddrinfo', resolve)
  with media_server(str(media_dir)) as server:
    port = urllib.parse.urlsplit(server).port
    out = DownloadSource(str(tmp_path), retries=0, policy=DEFAULT).download(
        Source('r', f'{scheme}://localhost:{port}/watch', (ClipSpec('r_0', 0, 0.0, 2.0),)))
    assert request_log(server) == []
  assert _rejects(out) == [('r_0', 'host_not_allowed')], out
  assert len(answers) >= 2  # the check before yt-dlp ran, then the proxy's own
  (method, refusal), = _proxied(f'localhost:{port}')
  assert method == ('CONNECT' if scheme == 'https' else 'GET')
  assert refusal.startswith('localhost resolves to a loopback address') and refusal in out[0].value.detail
  assert connects == []


def test_allowed_downloads_go_through_the_proxy_one_request_per_connection(tmp_path, media_dir, connects,
                                                                           no_proxy_everywhere):
  """A section (ffmpeg) and a page with a <video> (metadata pass, then yt-dlp's own downloader) download as
  before; every request the server answered came through the proxy, whose connections carry one request
  each, even with no_proxy=* in the worker's environment."""
  (tmp_path / 'srv').mkdir()
  shutil.copy(media_dir / 'talking.mp4', tmp_path / 'srv' / 'talking.mp4')
  (tmp_path / 'srv' / 'page.html').write_text('<html><body><video src="talking.mp4"></video></body></html>')
  with download_server(str(tmp_path / 'srv')) as server:
    section = ytdlp_download(f'{server.url}/talking.mp4', str(tmp_path / 'sec'), None, (1.0, 3.0), 10**9, 10, 1e18,
                             policy=LOOPBACK)
    out = DownloadSource(str(tmp_path / 'work'), retries=0, policy=LOOPBACK).download(
        Source('p', f'{server.url}/page.html', (ClipSpec('p_0', 0),)))
    answered = [path for _, path, _ in server.requests]
  where = server.url.split('//', 1)[1]
  assert 1.5 <= probe(section).duration <= 3.5
  (_, (media,)), = _served(out)
  assert media.info.duration > 7 and '/page.html' in answered and '/talking.mp4' in answered
  assert _proxied(where) == [('GET', None)] * len(answered)
  host, port = where.split(':')
  assert set(connects) == {(host, int(port))}


def _playlist(folder, segments: str) -> None:
  """An 8 s VOD playlist whose four segments are at `segments` (a URL prefix)."""
  folder.mkdir(exist_ok=True)
  body = ''.join(f'#EXTINF:2.0,\n{segments}/seg{k:03d}.ts\n' for k in range(4))
  (folder / 'vod.m3u8').write_text('#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:0\n'
                                   f'#EXT-X-PLAYLIST-TYPE:VOD\n{body}#EXT-X-ENDLIST\n')


@pytest.mark.parametrize('case', ['hls', 'hls section', 'hls https section'])
def test_hls_segments_on_a_refused_host_are_refused_at_the_fetch(tmp_path, connects, no_proxy_everywhere, case):
  """The playlist's host is allowed (so the metadata checks pass); its segments are on 0.0.0.0, which only
  the download reads: yt-dlp's HLS downloader, or ffmpeg for a section (plain http, and TLS through CONNECT)."""
  with listener() as (trap, reached):
    scheme = 'https' if 'https' in case else 'http'
    _playlist(tmp_path / 'srv', f'{scheme}://0.0.0.0:{trap}')
    with download_server(str(tmp_path / 'srv')) as server:
      clip = ClipSpec('h_0', 0, 1.0, 3.0) if 'section' in case else ClipSpec('h_0', 0)
      out = DownloadSource(str(tmp_path / 'work'), retries=0, timeout_s=60, policy=LOOPBACK).download(
          Source('h', f'{server.url}/vod.m3u8', (clip,)))
      answered = [path for _, path, _ in server.requests]
    assert reached == []
  assert _rejects(out) == [('h_0', 'host_not_allowed')], out
  assert '0.0.0.0 is an unspecified address' in out[0].value.detail
  asked = _proxied(f'0.0.0.0:{trap}')
  assert asked and set(asked) == {('CONNECT' if scheme == 'https' else 'GET', '0.0.0.0 is an unspecified address')}
  assert answered and set(answered) == {'/vod.m3u8'}
  assert not [c for c in connects if c[1] == trap]


@pytest.mark.parametrize('section', [None, (1.0, 3.0)], ids=['whole', 'section'])
def test_a_page_naming_media_on_a_refused_host_is_refused_at_the_media_fetch(tmp_path, connects, no_proxy_everywhere,
                                                                             section):
  """ytdlp_download reads the page and fetches its <video> in one run (no metadata pass to check the media
  host by name first): the fetch itself, by yt-dlp or by ffmpeg, is refused."""
  (tmp_path / 'srv').mkdir()
  with listener() as (trap, reached):
    (tmp_path / 'srv' / 'page.html').write_text(
        f'<html><body><video src="http://0.0.0.0:{trap}/talking.mp4"></video></body></html>')
    with download_server(str(tmp_path / 'srv')) as server:
      with pytest.raises(DownloadError) as error:
        ytdlp_download(f'{server.url}/page.html', str(tmp_path / 'x'), None, section, 10**9, 10,
                       time.monotonic() + 60, policy=LOOPBACK)
      answered = [path for _, path, _ in server.requests]
    assert reached == []
  assert error.value.reason == 'host_not_allowed' and not error.value.retryable
  assert '0.0.0.0 is an unspecified address' in str(error.value)
  assert answered == ['/page.html'] and _proxied(f'0.0.0.0:{trap}')
  assert not [c for c in connects if c[1] == trap]


def test_behind_the_users_proxy_each_target_is_still_checked(tmp_path, media_dir, connects):
  """With --proxy the filter hands allowed requests on to that proxy (here a loopback server that answers
  any path, the first hop a redirect) and refuses the redirect's target itself: the user's proxy sees only
  the first request, and the filter connects to nothing but the user's proxy."""
  with media_server(str(media_dir)) as upstream, listener() as (trap, reached):
    page = f'http://127.0.0.1:9/goto/{urllib.parse.quote(f"http://0.0.0.0:{trap}/", safe="")}'
    out = DownloadSource(str(tmp_path), retries=0, proxy=upstream, policy=LOOPBACK).download(
        Source('c', page, (ClipSpec('c_0', 0, 0.0, 2.0),)))
    asked = [path for _, path, _ in request_log(upstream)]
    assert reached == []
  assert _rejects(out) == [('c_0', 'host_not_allowed')] and 'unspecified' in out[0].value.detail
  assert asked == [urllib.parse.urlsplit(page).path]
  assert set(connects) == {('127.0.0.1', urllib.parse.urlsplit(upstream).port)}


def test_without_proxy_the_environments_proxy_takes_the_checked_requests_on(tmp_path, media_dir, connects,
                                                                           monkeypatch):
  """No --proxy: the worker's http_proxy carries what the filter let through, as yt-dlp would have used it (a
  section, so ffmpeg's requests too); the loopback server acting as that proxy answers for port 9."""
  with download_server(str(media_dir)) as upstream:
    monkeypatch.setenv('http_proxy', upstream.url)
    out = DownloadSource(str(tmp_path), download_method='ytdlp', retries=0, policy=LOOPBACK).download(
        Source('e', 'http://127.0.0.1:9/talking.mp4', (ClipSpec('e_0', 0, 1.0, 3.0),)))
    asked = [path for _, path, _ in upstream.requests]
  assert _served(out), out
  assert asked and set(asked) == {'/talking.mp4'}
  assert set(connects) == {('127.0.0.1', urllib.parse.urlsplit(upstream.url).port)}


def test_a_users_proxy_must_be_http(tmp_path):
  with pytest.raises(ValueError, match='only http:// proxies'):
    DownloadSource(str(tmp_path), proxy='socks5://127.0.0.1:1080')
  DownloadSource(str(tmp_path), proxy='127.0.0.1:3128')  # no scheme: http://, as yt-dlp reads it


def test_only_formats_whose_connections_go_through_the_proxy_are_chosen():
  """yt-dlp itself chooses with the format string the downloads use: rtmp, rtsp, mms and f4m formats are
  passed over even when they are the best, and a page offering nothing else has no format to download."""
  other = [{'format_id': 'rtmp', 'url': 'rtmp://media.example/live/a', 'height': 1080},
           {'format_id': 'rtsp', 'url': 'rtsp://media.example/a', 'height': 1080},
           {'format_id': 'mms', 'url': 'mms://media.example/a', 'height': 1080},
           {'format_id': 'f4m', 'url': 'http://media.example/a.f4m', 'protocol': 'f4m', 'height': 1080}]
  proxied = [{'format_id': 'hls', 'url': 'https://media.example/a.m3u8', 'protocol': 'm3u8_native', 'height': 720},
             {'format_id': 'mp4', 'url': 'https://media.example/a.mp4', 'height': 360}]

  def choose(formats, height=None):
    for f in formats:
      f.update(vcodec='h264', acodec='aac')
    info = {'id': 'a', 'title': 'a', 'formats': formats, 'extractor': 'generic', 'extractor_key': 'Generic',
            'webpage_url': 'https://media.example/a'}
    with yt_dlp.YoutubeDL({'format': _format(height), 'quiet': True, 'simulate': True}) as ydl:
      return ydl.process_ie_result(info, download=False)

  best = choose(other + proxied)
  assert best['format_id'] == 'hls' and best['protocol'] in PROXIED_PROTOCOLS
  assert choose(other + proxied, height=480)['format_id'] == 'mp4'
  with pytest.raises(yt_dlp.utils.ExtractorError, match='Requested format is not available'):
    choose(other)
  _check_formats('https://media.example/a', best)
  with pytest.raises(DownloadError) as error:
    _check_formats('https://media.example/a', {'protocol': 'rtmp', 'url': 'rtmp://media.example/live/a'})
  assert error.value.reason == 'scheme_not_allowed'


# -- the proxy on its own, with a plain socket client


def _ask(port: int, request: str, authorization: str = '') -> bytes:
  """What the proxy answers `request` (one head) before it closes."""
  with socket.create_connection(('127.0.0.1', port), 10) as sock:
    extra = f'Proxy-Authorization: {authorization}\r\n' if authorization else ''
    sock.sendall(f'{request}\r\n{extra}\r\n'.encode())
    return _drain(sock)


def _drain(sock: socket.socket) -> bytes:
  """Everything `sock` receives until the other end closes."""
  answer = b''
  while True:
    block = sock.recv(65536)
    if not block:
      return answer
    answer += block


def test_refused_targets_get_a_403_that_names_the_refusal(connects):
  proxy = shared_proxy()
  with proxy.session(LOOPBACK) as session:
    for request in ('CONNECT 169.254.169.254:443 HTTP/1.1', 'GET http://169.254.169.254/latest/meta-data/ HTTP/1.1',
                    'CONNECT metadata.google.internal:80 HTTP/1.1', 'GET http://[::ffff:169.254.169.254]/ HTTP/1.1'):
      answer = _ask(proxy.port, request, session.authorization)
      status = answer.split(b'\r\n', 1)[0].decode()
      assert status.startswith('HTTP/1.1 403 host_not_allowed: '), (request, status)
      assert b'metadata' in answer.split(b'\r\n\r\n', 1)[1]
  assert len(session.refusals) == 4 and 'metadata.google.internal is a cloud metadata name' in session.refusals[2]
  assert connects == [('127.0.0.1', proxy.port)] * 4  # this test's own connections to the proxy only


def test_requests_without_a_live_sessions_credentials_get_407(connects):
  """Other local processes cannot use the proxy, and a child outliving its download gets nothing more."""
  proxy = shared_proxy()
  with proxy.session(LOOPBACK) as session:
    pass
  for authorization in ('', 'Basic ' + 'x' * 20, session.authorization):
    answer = _ask(proxy.port, 'GET http://127.0.0.1:9/ HTTP/1.1', authorization)
    assert answer.startswith(b'HTTP/1.1 407 ') and b'Proxy-Authenticate: Basic' in answer
  assert connects == [('127.0.0.1', proxy.port)] * 3


def test_requests_go_on_to_the_users_proxy_with_its_credentials(media_dir, connects):
  """CONNECT and plain requests that pass the check go on to the user's proxy (a second proxy of this kind,
  which wants its credentials); a refused target never reaches it, and a proxy that says no is a 502."""
  outer = EgressProxy()
  try:
    with outer.session(LOOPBACK) as theirs, download_server(str(media_dir)) as server, listener() as (trap, _):
      where = server.url.split('//', 1)[1]
      proxy = shared_proxy()
      with proxy.session(LOOPBACK, theirs.url) as session:
        with socket.create_connection(('127.0.0.1', proxy.port), 10) as sock:
          sock.sendall(f'CONNECT {where} HTTP/1.1\r\nProxy-Authorization: {session.authorization}\r\n\r\n'.encode())
          assert sock.recv(100).startswith(b'HTTP/1.1 200 ')
          sock.sendall(f'GET /talking.mp4 HTTP/1.1\r\nHost: {where}\r\nRange: bytes=0-9\r\nConnection: close\r\n\r\n'
                   .encode())
          tunnelled = _drain(sock)
        forwarded = _ask(proxy.port, f'GET {server.url}/talking.mp4 HTTP/1.1', session.authorization)
        refused = _ask(proxy.port, f'CONNECT 0.0.0.0:{trap} HTTP/1.1', session.authorization)
      with proxy.session(LOOPBACK, f'http://dl:{"0" * 32}@127.0.0.1:{outer.port}') as wrong:
        denied = _ask(proxy.port, f'CONNECT {where} HTTP/1.1', wrong.authorization)
      seen = outer.history()
      answered = [path for _, path, _ in server.requests]
  finally:
    outer.close()
  assert tunnelled.startswith(b'HTTP/1.1 206 ') and tunnelled.endswith((media_dir / 'talking.mp4').read_bytes()[:10])
  assert forwarded.startswith(b'HTTP/1.1 200 ') and b'Connection: close' in forwarded
  assert forwarded.endswith((media_dir / 'talking.mp4').read_bytes())
  assert refused.startswith(b'HTTP/1.1 403 host_not_allowed: 0.0.0.0 is an unspecified address')
  assert denied.startswith(b'HTTP/1.1 502 the upstream proxy answered: HTTP/1.1 407')
  assert seen == [('CONNECT', where, None), ('GET', where, None)] and answered == ['/talking.mp4'] * 2
  assert not [c for c in connects if c[1] == trap]


def test_tunnels_end_when_idle_and_when_their_session_ends():
  """Bounded: a tunnel to a server that says nothing closes after the session's idle limit, and the
  tunnels of a session close when it ends."""
  proxy = shared_proxy()
  with socket.create_server(('127.0.0.1', 0)) as silent:
    port = silent.getsockname()[1]
    for idle_s, end_session in ((0.5, False), (30.0, True)):
      with proxy.session(LOOPBACK, timeout_s=idle_s) as session:
        client = socket.create_connection(('127.0.0.1', proxy.port), 10)
        client.sendall(f'CONNECT 127.0.0.1:{port} HTTP/1.1\r\nProxy-Authorization: {session.authorization}\r\n\r\n'
                       .encode())
        assert client.recv(100).startswith(b'HTTP/1.1 200 ')
        held, _ = silent.accept()
        started = time.monotonic()
        if not end_session:
          assert client.recv(100) == b''  # the proxy gave up on the silent tunnel
      if end_session:
        assert client.recv(100) == b''
      took = time.monotonic() - started
      assert took < (8.0 if not end_session else 15.0), (idle_s, took)  # never: the client's 10 s timeout / 30 s idle
      client.close()
      held.close()


@pytest.mark.skipif(not shutil.which('openssl'), reason='needs the openssl command to make a certificate')
def test_ffmpeg_tunnels_tls_through_the_proxy(tmp_path, media_dir, connects, monkeypatch):
  """ffmpeg as yt-dlp starts it (proxy in http_proxy) reads https through CONNECT, the certificate checked
  against the name in the URL; a refused https host gets no connection."""
  cert, key = str(tmp_path / 'cert.pem'), str(tmp_path / 'key.pem')
  subprocess.run(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', cert, '-days',
                  '1', '-subj', '/CN=localhost', '-addext', 'subjectAltName=DNS:localhost'], check=True,
                 capture_output=True)
  env = {name: value for name, value in os.environ.items() if 'proxy' not in name.lower()}
  env['SSL_CERT_FILE'] = cert
  with download_server(str(media_dir), tls=(cert, key)) as server, listener() as (trap, reached):
    port = urllib.parse.urlsplit(server.url).port
    with shared_proxy().session(LOOPBACK) as session:
      results = []
      for url in (f'https://localhost:{port}/talking.mp4', f'https://0.0.0.0:{trap}/talking.mp4'):
        out = tmp_path / f'{len(results)}.mp4'
        results.append(subprocess.run(
            [imageio_ffmpeg.get_ffmpeg_exe(), '-y', '-loglevel', 'error', '-ss', '1', '-i', url, '-t', '1', '-c',
             'copy', str(out)], env=dict(env, http_proxy=session.url), capture_output=True, text=True, timeout=60))
    assert reached == []
    answered = len(server.requests)
  assert results[0].returncode == 0, results[0].stderr
  assert 0.5 <= probe(str(tmp_path / '0.mp4')).duration <= 1.5 and answered
  assert results[1].returncode != 0 and session.refusals == ['0.0.0.0 is an unspecified address']
  assert set(_proxied(f'localhost:{port}')) == {('CONNECT', None)}
  assert set(connects) == {('127.0.0.1', port)}
