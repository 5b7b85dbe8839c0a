"""Untrusted input stays in its sandbox: URL and path policy, ids, archive members, pickles, no shells."""
import io
import json
import os
import pickle
import re
import socket
import tarfile
import urllib.parse
import zipfile

import pytest

from tests.corpus import Evil
from tests.helpers import REPO, media_server
from transforms.core.elements import Reject, Source
from transforms.lib.safety import (InputPolicy, UnsafeInput, check_url, checked_addresses, safe_member_name,
                                   unsafe_id_reason)
from transforms.sources.download import DownloadError, http_download
from transforms.sources.manifest import read_input


@pytest.mark.parametrize('url,reason', [
    ('', 'bad_url'), ('-o/tmp/x', 'bad_url'), ('--exec=id', 'bad_url'), ('  -v http://x/a.mp4', 'bad_url'),
    ('http://x/a\nb.mp4', 'bad_url'), ('ftp://x/a.mp4', 'scheme_not_allowed'),
    ('javascript:alert(1)', 'scheme_not_allowed'),
    ('data:video/mp4;base64,AAAA', 'scheme_not_allowed'), ('file:///etc/hostname', 'path_not_allowed'),
    ('/etc/hostname', 'path_not_allowed'), ('file:///srv/ok/../../etc/hostname', 'path_not_allowed'),
])
def test_url_policy_refuses(url, reason):
  with pytest.raises(UnsafeInput) as error:
    check_url(url, InputPolicy(roots=('/srv/ok',)))
  assert error.value.reason == reason


@pytest.mark.parametrize('url', ['https://www.youtube.com/watch?v=x', 'gs://bucket/a.mp4', 'file:///srv/ok/a.mp4',
                                 '/srv/ok/sub/a.mp4', 'http://127.0.0.1:8/a-b.mp4'])
def test_url_policy_allows(url):
  assert check_url(url, InputPolicy(roots=('/srv/ok',))) == url


def test_symlink_out_of_root_is_refused(tmp_path):
  (tmp_path / 'in').mkdir()
  os.symlink('/etc/hostname', tmp_path / 'in' / 'link.mp4')
  policy = InputPolicy(roots=(str(tmp_path / 'in'),))
  with pytest.raises(UnsafeInput) as error:
    check_url(str(tmp_path / 'in' / 'link.mp4'), policy)
  assert error.value.reason == 'path_not_allowed'
  assert check_url(str(tmp_path / 'in' / 'real.mp4'), policy)
  with pytest.raises(UnsafeInput):  # a sibling whose name merely starts with the root's name
    check_url(str(tmp_path / 'in2' / 'a.mp4'), policy)


def test_schemes_are_configurable():
  with pytest.raises(UnsafeInput):
    check_url('http://example.com/a.mp4', InputPolicy(schemes=('https',)))


@pytest.mark.parametrize('name,safe', [
    ('a.mp4', 'a.mp4'), ('./dir//b.mp4', 'dir/b.mp4'), ('../a.mp4', None), ('dir/../../a.mp4', None),
    ('/etc/passwd', None), ('C:\\x\\a.mp4', None), ('a\\..\\..\\b.mp4', None), ('a\x00b.mp4', None), ('', None),
    ('./', None),
])
def test_member_names(name, safe):
  assert safe_member_name(name) == safe


@pytest.mark.parametrize('raw,unsafe', [
    ('Radio11', False), ('spk 1/vid', False), ('../x', True), ('a/../b', True), ('/abs', True), ('a\x00b', True),
    ('tab\there', True), ('..x', False),
])
def test_unsafe_ids(raw, unsafe):
  assert bool(unsafe_id_reason(raw)) == unsafe


def _tar(path, members):
  with tarfile.open(path, 'w:gz') as tar:
    for name, payload in members:
      info = tarfile.TarInfo(name)
      info.size = len(payload)
      tar.addfile(info, io.BytesIO(payload))
  return str(path)


def test_pickles_in_archives_are_never_loaded_by_default(tmp_path):
  marker = tmp_path / 'PWNED'
  archive = _tar(tmp_path / 'in.tar.gz', [('v/clip.mp4', b'not really a video'),
                                           ('v/clip.pkl', pickle.dumps(Evil(str(marker)))),
                                           ('v/disguised.bin', pickle.dumps(Evil(str(marker))))])
  items = list(read_input(archive, work_dir=str(tmp_path / 'work')))
  assert not marker.exists()
  rejects = {r.id: r.reason for r in items if isinstance(r, Reject)}
  assert rejects == {'v_clip.pkl': 'pickle_refused', 'v_disguised.bin': 'pickle_refused'}  # by name and by content
  (source,) = [s for s in items if isinstance(s, Source)]
  assert source.source_id == 'v_clip' and source.url == os.path.join(str(tmp_path / 'work'), 'archives', 'in',
                                                                      'v_clip.mp4')
  assert open(source.url, 'rb').read() == b'not really a video'


def test_trusted_pickle_sidecar_gives_clips(tmp_path):
  archive = _tar(tmp_path / 'in.tar.gz', [('clip.mp4', b'x'), ('clip.pkl', pickle.dumps({'clips': [[1, 2], [3, 4]]}))])
  items = list(read_input(archive, work_dir=str(tmp_path / 'work'), policy=InputPolicy(read_input_pickles=True)))
  (source,) = items
  assert [(c.clip_id, c.start, c.end) for c in source.clips] == [('clip_0', 1.0, 2.0), ('clip_1', 3.0, 4.0)]


def test_zip_members_stay_inside_the_work_dir(tmp_path):
  archive = tmp_path / 'in.zip'
  with zipfile.ZipFile(archive, 'w') as handle:
    handle.writestr('../../../outside.mp4', b'x')
    handle.writestr('/abs.mp4', b'x')
    handle.writestr('ok/a b.mp4', b'x')
    handle.writestr('ok/a b.json', json.dumps({'clips': [['00:01', '00:03']]}))
  work = tmp_path / 'deep' / 'work'
  items = list(read_input(str(archive), work_dir=str(work), max_member_mb=1))
  rejects = {r.id: r.reason for r in items if isinstance(r, Reject)}
  assert rejects == {'outside.mp4': 'unsafe_member', 'abs.mp4': 'unsafe_member'}
  (source,) = [s for s in items if isinstance(s, Source)]
  assert source.clips[0].start == 1.0 and source.source_id == 'ok_a_b'
  written = [os.path.join(d, f) for d, _, files in os.walk(tmp_path) for f in files]
  assert sorted(written) == sorted([str(archive), str(work / 'archives' / 'in' / 'ok_a_b.mp4')])


def test_archive_members_over_the_size_limit(tmp_path):
  archive = _tar(tmp_path / 'in.tar.gz', [('big.mp4', b'\0' * (2 << 20))])
  items = list(read_input(archive, work_dir=str(tmp_path / 'work'), max_member_mb=1))
  assert [(r.id, r.reason) for r in items] == [('big.mp4', 'too_large')]
  assert not (tmp_path / 'work' / 'archives' / 'in').exists()


def test_archive_outside_allowed_roots(tmp_path):
  archive = _tar(tmp_path / 'in.tar', [('a.mp4', b'x')])
  items = list(read_input(archive, work_dir=str(tmp_path / 'work'), policy=InputPolicy(roots=('/nowhere',))))
  assert [(r.id, r.reason) for r in items] == [('in', 'path_not_allowed')]


def test_redirect_to_another_scheme_is_refused(tmp_path):
  with media_server(str(tmp_path)) as server:
    target = urllib.parse.quote('ftp://127.0.0.1/secret.mp4', safe='')
    with pytest.raises(DownloadError) as error:
      http_download(f'{server}/goto/{target}', str(tmp_path / 'x.mp4'), 10**6, 5, 1e18,
                    InputPolicy(allow_private_hosts=True))
  assert error.value.reason == 'scheme_not_allowed'


def _project_sources():
  for package in ('beam_pipeline', 'transforms', 'model_handlers', 'bench'):
    for folder, _, files in os.walk(os.path.join(REPO, package)):
      for name in files:
        if name.endswith('.py'):
          path = os.path.join(folder, name)
          with open(path, encoding='utf-8') as handle:
            yield os.path.relpath(path, REPO), handle.read()


def test_no_shell_and_no_stray_pickle_loading():
  """External commands get argument lists; no plain pickle loading anywhere, under any flag: the only unpickler
  is the restricted one (transforms/lib/pickles.py)."""
  shells, pickles, unpicklers = [], [], []
  for path, text in _project_sources():
    if re.search(r'shell\s*=\s*True|os\.system\(|os\.popen\(|commands\.getoutput', text):
      shells.append(path)
    for match in re.finditer(r'pickle\.loads?\(|cloudpickle\.loads?\(|dill\.loads?\(|allow_pickle\s*=\s*True'
                             r'|torch\.load\((?!.*weights_only=True)', text):
      pickles.append((path, text[:match.start()].count('\n') + 1))
    unpicklers += [path for _ in re.finditer(r'pickle\.Unpickler\b', text)]
  assert shells == []
  assert pickles == []
  assert unpicklers == ['transforms/lib/pickles.py']


def test_unreadable_sidecars_are_rejected_not_fatal(tmp_path):
  archive = _tar(tmp_path / 'in.tar', [('a.mp4', b'x'), ('a.json', b'{not json'), ('b.mp4', b'x'),
                                        ('b.pkl', b'\x80\x04garbage'), ('c.mp4', b'x'), ('c.json', b'[1, 2]')])
  items = list(read_input(archive, work_dir=str(tmp_path / 'work'), policy=InputPolicy(read_input_pickles=True)))
  assert {r.id: r.reason for r in items if isinstance(r, Reject)} == {
      'a.json': 'bad_sidecar', 'b.pkl': 'bad_sidecar', 'c.json': 'bad_sidecar'}
  assert sorted(s.source_id for s in items if isinstance(s, Source)) == ['a', 'b', 'c']  # whole-video clips


@pytest.mark.parametrize('answers', [('93.184.216.34', '10.0.0.5'), ('93.184.216.34', '127.0.0.1'),
                                     ('2606:2800:220:1::1', 'fd00::5'), ('10.0.0.5', '93.184.216.34')])
def test_a_name_with_one_internal_address_among_public_ones_is_refused(monkeypatch, answers):
  """Every address a name resolves to is checked, not only the first: the connection could use any of them.
  (Resolution only: nothing is contacted.)"""
  real = socket.getaddrinfo

  def resolve(host, port, *args, **kwargs):
    if host != 'mixed.example':
      return real(host, port, *args, **kwargs)
    return [(socket.AF_INET6 if ':' in a else socket.AF_INET, socket.SOCK_STREAM, 6, '', (a, port or 0))
            for a in answers]

  monkeypatch.setattr(socket, 'getaddrinfo', resolve)
  with pytest.raises(UnsafeInput) as refused:
    checked_addresses('mixed.example', 443, InputPolicy())
  assert refused.value.reason == 'host_not_allowed'
