"""Inputs must not reach where they should not: hosts (loopback, private, link-local, metadata) and
gs:// buckets. Refusals are shown by the absence of any request on a loopback server this test
started; nothing is sent anywhere but to loopback (metadata names are refused before any lookup)."""
import json
import os
import pickle
import shutil
import socket
import subprocess
import urllib.parse
import urllib.request

import apache_beam as beam
import pytest

from beam_pipeline.options import TalkingFaceOptions
from tests.download_server import download_server
from tests.helpers import media_server, request_log
from transforms.core.elements import ClipSpec, Reject, Source
from transforms.lib.safety import InputPolicy, UnsafeInput, address_refusal, check_url, checked_addresses
from transforms.sources.download import DownloadError, DownloadSource, GuardedHTTPConnection, Redirects, http_download
from transforms.sources.manifest import list_input

DEFAULT = InputPolicy()
LOOPBACK = InputPolicy(allow_private_hosts=True)


def _rejects(outputs):
  return [(o.value.id, o.value.reason) for o in outputs if isinstance(o, beam.pvalue.TaggedOutput)]


def closed_port() -> int:
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


@pytest.mark.parametrize('address,by_default,with_flag', [
    ('127.0.0.1', 'a loopback address', None), ('::1', 'a loopback address', None),
    ('10.1.2.3', 'a private or reserved address', None), ('172.16.5.4', 'a private or reserved address', None),
    ('192.168.0.10', 'a private or reserved address', None),
    ('100.64.0.1', 'a shared (carrier-grade NAT) address', None),
    ('fc00::1', 'a private or reserved address', None), ('fd12:3456::1', 'a private or reserved address', None),
    ('169.254.10.1', 'a link-local address', None), ('fe80::1%1', 'a link-local address', None),
    ('::ffff:10.0.0.1', 'a private or reserved address', None),
    ('64:ff9b::a00:1', 'a private or reserved address', None),
    ('169.254.169.254', 'a cloud metadata address', 'a cloud metadata address'),
    ('fd00:ec2::254', 'a cloud metadata address', 'a cloud metadata address'),
    ('::ffff:169.254.169.254', 'a cloud metadata address', 'a cloud metadata address'),
    ('0.0.0.0', 'an unspecified address', 'an unspecified address'), ('::', 'an unspecified address',
                                                                       'an unspecified address'),
    ('224.0.0.1', 'a multicast address', 'a multicast address'), ('ff02::1', 'a multicast address',
                                                                   'a multicast address'),
    ('8.8.8.8', None, None), ('2606:4700::1111', None, None), ('64:ff9b::808:808', None, None),
])
def test_address_categories(address, by_default, with_flag):
  """A pure function of the address: nothing is contacted."""
  assert address_refusal(address, DEFAULT) == by_default
  assert address_refusal(address, LOOPBACK) == with_flag


@pytest.mark.parametrize('name', ['metadata.google.internal', 'METADATA.google.internal.', 'metadata',
                                  'metadata.goog'])
def test_metadata_names_are_refused_before_any_lookup(name):
  for policy in (DEFAULT, LOOPBACK):
    with pytest.raises(UnsafeInput) as error:
      checked_addresses(name, 80, policy)
    assert error.value.reason == 'host_not_allowed' and 'metadata name' in str(error.value)


def test_loopback_url_is_refused_by_default_without_a_request(tmp_path, media_dir):
  with media_server(str(media_dir)) as server:
    direct = Source('d', f'{server}/talking.mp4', (ClipSpec('d_0', 0),))
    page = Source('p', f'{server}/watch?v=1', (ClipSpec('p_0', 0, 0.0, 2.0),))  # a page: yt-dlp's path
    named = Source('n', f'{server.replace("127.0.0.1", "localhost")}/talking.mp4', (ClipSpec('n_0', 0),))
    refused = DownloadSource(str(tmp_path / 'a'), retries=0)
    outputs = refused.download(direct) + refused.download(page) + refused.download(named)
    assert request_log(server) == []
    allowed = DownloadSource(str(tmp_path / 'b'), retries=0, policy=LOOPBACK).download(direct)
    assert [path for _, path, _ in request_log(server)] == ['/talking.mp4']
  assert _rejects(outputs) == [('d_0', 'host_not_allowed'), ('p_0', 'host_not_allowed'), ('n_0', 'host_not_allowed')]
  assert '127.0.0.1 is a loopback address' in outputs[0].value.detail
  assert 'localhost resolves to a loopback address' in outputs[2].value.detail
  assert '--allow_private_hosts' in outputs[0].value.detail
  (source, media), = allowed
  assert source.source_id == 'd' and media[0].info.duration > 0


def test_the_detail_does_not_tell_whether_an_internal_host_answers(tmp_path, media_dir):
  """A listening and a closed loopback port get the same reject, word for word."""
  with media_server(str(media_dir)) as server:
    open_port = urllib.parse.urlsplit(server).port
    fn = DownloadSource(str(tmp_path), retries=0)
    answering = fn.download(Source('a', f'http://127.0.0.1:{open_port}/talking.mp4', (ClipSpec('a_0', 0),)))
    silent = fn.download(Source('a', f'http://127.0.0.1:{closed_port()}/talking.mp4', (ClipSpec('a_0', 0),)))
    assert request_log(server) == []
  assert answering[0].value == silent[0].value


def test_unspecified_and_metadata_hosts_stay_refused_with_the_flag(tmp_path, media_dir):
  """0.0.0.0 would reach this machine's own servers: refused even with --allow_private_hosts, for the URL
  itself and for a redirect from an allowed loopback server (the target server sees nothing)."""
  with media_server(str(media_dir)) as server, media_server(str(media_dir)) as target:
    inner = f'http://0.0.0.0:{urllib.parse.urlsplit(target).port}/talking.mp4'
    fn = DownloadSource(str(tmp_path), retries=0, policy=LOOPBACK)
    direct = fn.download(Source('z', inner, (ClipSpec('z_0', 0),)))
    redirecting = f'/goto/{urllib.parse.quote(inner, safe="")}/x.mp4'
    hop = fn.download(Source('r', server + redirecting, (ClipSpec('r_0', 0),)))
    assert request_log(target) == []
    assert [path for _, path, _ in request_log(server)] == [redirecting]
  assert _rejects(direct) == [('z_0', 'host_not_allowed')] and 'unspecified' in direct[0].value.detail
  assert _rejects(hop) == [('r_0', 'host_not_allowed')]
  assert 'redirects to a refused host' in hop[0].value.detail and 'x.mp4' in hop[0].value.detail


@pytest.mark.parametrize('target', ['http://127.0.0.1:{port}/x.mp4', 'http://localhost:{port}/x.mp4',
                                    'http://169.254.169.254/latest/meta-data/', 'http://metadata.google.internal/',
                                    'http://[::ffff:127.0.0.1]:{port}/x.mp4'])
def test_redirects_to_refused_hosts_are_not_followed(tmp_path, target):
  """The redirect check on its own (its first hop would need --allow_private_hosts to reach a loopback
  server): an allowed host that redirects to a refused one gets UnsafeInput, and nothing is sent."""
  with media_server(str(tmp_path)) as server:
    newurl = target.format(port=urllib.parse.urlsplit(server).port)
    request = urllib.request.Request('http://video.example/clip.mp4')
    with pytest.raises(UnsafeInput) as error:
      Redirects(DEFAULT).redirect_request(request, None, 302, 'Found', {}, newurl)
    assert request_log(server) == []
  assert error.value.reason == 'host_not_allowed' and 'http://video.example/clip.mp4 redirects' in str(error.value)


def test_redirects_between_allowed_hosts_are_followed(tmp_path, media_dir):
  with media_server(str(media_dir)) as first, media_server(str(media_dir)) as second:
    hop = urllib.parse.quote(f'{second}/talking.mp4', safe='')
    http_download(f'{first}/goto/{hop}', str(tmp_path / 'x.mp4'), 10**9, 10, 1e18, LOOPBACK)
    assert [path for _, path, _ in request_log(second)] == ['/talking.mp4']
  assert (tmp_path / 'x.mp4').read_bytes() == (media_dir / 'talking.mp4').read_bytes()


def test_the_connection_checks_what_it_connects_to(media_dir):
  """The check sits in the connection itself: a name resolving to loopback is refused there, so neither a
  redirect nor a second DNS answer can route around a check made earlier."""
  with media_server(str(media_dir)) as server:
    port = urllib.parse.urlsplit(server).port
    connection = GuardedHTTPConnection('localhost', port, timeout=5, policy=DEFAULT)
    with pytest.raises(UnsafeInput):
      connection.request('GET', '/talking.mp4')
    assert request_log(server) == []
    allowed = GuardedHTTPConnection('localhost', port, timeout=5, policy=LOOPBACK)
    allowed.request('HEAD', '/talking.mp4')
    assert allowed.getresponse().status == 200 and allowed.sock.getpeername()[0] in ('127.0.0.1', '::1')
    allowed.close()


def test_through_a_proxy_the_target_is_checked_by_name(tmp_path, media_dir):
  """A proxy connects for us, so the target host is checked before the proxy is asked: a refused target
  never reaches the proxy; an allowed one is fetched through it."""
  with media_server(str(media_dir)) as proxy:
    target = f'http://127.0.0.1:{closed_port()}/talking.mp4'
    with pytest.raises(UnsafeInput):
      http_download(target, str(tmp_path / 'x.mp4'), 10**9, 10, 1e18, DEFAULT, proxy=proxy)
    assert request_log(proxy) == []
    http_download(target, str(tmp_path / 'y.mp4'), 10**9, 10, 1e18, LOOPBACK, proxy=proxy)
    assert [path for _, path, _ in request_log(proxy)] == ['/talking.mp4']


@pytest.mark.skipif(not shutil.which('openssl'), reason='needs the openssl command to make a certificate')
def test_https_keeps_the_hostname_for_sni_and_the_certificate(tmp_path, media_dir, monkeypatch):
  """The connection goes to the checked address, but TLS still verifies the certificate against the
  name in the URL: a certificate for `localhost` works for https://localhost and fails for the bare IP."""
  cert, key = str(tmp_path / 'cert.pem'), str(tmp_path / 'key.pem')
  subprocess.run(['openssl', 'req', '-x509', '-newkey', 'rsa:2048', '-nodes', '-keyout', key, '-out', cert, '-days',
                  '1', '-subj', '/CN=localhost', '-addext', 'subjectAltName=DNS:localhost'], check=True,
                 capture_output=True)
  monkeypatch.setenv('SSL_CERT_FILE', cert)  # the default context trusts only this certificate
  with download_server(str(media_dir), tls=(cert, key)) as server:
    named = server.url.replace('127.0.0.1', 'localhost') + '/talking.mp4'
    with pytest.raises(UnsafeInput):
      http_download(named, str(tmp_path / 'refused.mp4'), 10**9, 10, 1e18, DEFAULT)
    assert server.requests == []
    http_download(named, str(tmp_path / 'named.mp4'), 10**9, 10, 1e18, LOOPBACK)
    with pytest.raises(DownloadError) as error:
      http_download(f'{server.url}/talking.mp4', str(tmp_path / 'ip.mp4'), 10**9, 10, 1e18, LOOPBACK)
  assert (tmp_path / 'named.mp4').read_bytes() == (media_dir / 'talking.mp4').read_bytes()
  assert 'CERTIFICATE_VERIFY_FAILED' in str(error.value) and not os.path.exists(tmp_path / 'ip.mp4')


# -- gs:// buckets


def _options(*args):
  return TalkingFaceOptions(list(args)).view_as(TalkingFaceOptions)


def test_buckets_default_to_those_of_the_output_input_and_work_dir():
  opts = _options('--input=gs://in-bucket/hdtf/', '--output=gs://out-bucket/run')
  policy = InputPolicy.from_options(opts, 'gs://work-bucket/cache')
  assert policy.buckets == ('out-bucket', 'in-bucket', 'work-bucket')
  assert check_url('gs://in-bucket/videos/a.mp4', policy)
  with pytest.raises(UnsafeInput) as error:
    check_url('gs://someone-elses/secret.mp4', policy)
  assert error.value.reason == 'bucket_not_allowed' and '--allowed_buckets' in str(error.value)
  local = InputPolicy.from_options(_options('--input=/data/m.jsonl', '--output=/data/out'), '/data/out/_work')
  assert local.buckets == ()  # no bucket named anywhere: gs:// inputs need --allowed_buckets
  listed = InputPolicy.from_options(_options('--output=gs://out-bucket/run', '--allowed_buckets=a, gs://B/'),
                                    'gs://out-bucket/run/_work')
  assert listed.buckets == ('a', 'b', 'out-bucket')
  anything = InputPolicy.from_options(_options('--output=/o', '--allowed_buckets=*'), '/o/_work')
  assert check_url('gs://any/x.mp4', anything)
  assert pickle.loads(pickle.dumps(policy)) == policy  # workers get it pickled


def test_refused_buckets_are_rejects_for_videos_and_archives(tmp_path):
  policy = InputPolicy(buckets=('in-bucket',))
  out = DownloadSource(str(tmp_path), policy=policy).download(
      Source('v', 'gs://other-bucket/v.mp4', (ClipSpec('v_0', 0),)))
  assert _rejects(out) == [('v_0', 'bucket_not_allowed')]
  manifest = tmp_path / 'm.jsonl'
  manifest.write_text(json.dumps({'id': 'arc', 'url': 'gs://other-bucket/videos.tar'}) + '\n')
  items = list(list_input(str(manifest), policy=policy))
  assert [(r.id, r.reason) for r in items if isinstance(r, Reject)] == [('arc', 'bucket_not_allowed')]


def test_cli_flags_reach_the_policy():
  opts = _options('--output=/o', '--allow_private_hosts')
  assert InputPolicy.from_options(opts).allow_private_hosts
  assert not InputPolicy.from_options(_options('--output=/o')).allow_private_hosts

