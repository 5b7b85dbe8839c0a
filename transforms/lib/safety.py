"""Checks for untrusted input: URL schemes, local roots, gs:// buckets, hosts, ids and archive member names.

A refusal is an `UnsafeInput` carrying a reject reason code: the stage that
checks turns it into a reject, so a hostile entry is explained in rejects.jsonl
and the run goes on.

Hosts are judged by the addresses they resolve to, never by an answer from
them: `checked_addresses` resolves a name once and refuses it if any address
is loopback, private, link-local (unless `allow_private_hosts`), unspecified,
multicast or a cloud metadata address, and `connect_checked` connects only to
the addresses it checked, so a name that resolves differently on the second
lookup (DNS rebinding) cannot slip through.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import os
import posixpath
import re
import socket
import urllib.parse
from typing import List, Optional, Tuple

from transforms.core.elements import ReasonError

DEFAULT_SCHEMES = ('http', 'https', 'gs', 'file')
ANY_BUCKET = '*'
_CONTROL = re.compile(r'[\x00-\x1f\x7f]')

# Where cloud VMs hand out credentials: refused even with --allow_private_hosts (no video lives there).
METADATA_HOSTS = frozenset({'metadata.google.internal', 'metadata.goog', 'metadata', 'instance-data',
                            'instance-data.ec2.internal'})
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    '169.254.169.254', '169.254.170.2', 'fd00:ec2::254', '100.100.100.200'))
_THIS_NETWORK = ipaddress.ip_network('0.0.0.0/8')
_SHARED = ipaddress.ip_network('100.64.0.0/10')  # carrier-grade NAT: internal to a provider
_NAT64 = ipaddress.ip_network('64:ff9b::/96')
_ALWAYS = ('a cloud metadata address', 'an unspecified address', 'a multicast address')  # whatever the flag


class UnsafeInput(ReasonError, ValueError):
  """An input refused by policy; `reason` is the reject code."""


@dataclasses.dataclass(frozen=True)
class InputPolicy:
  """What inputs may reach: URL schemes, local directories, pickles, hosts, gs:// buckets (picklable for Beam)."""
  schemes: Tuple[str, ...] = DEFAULT_SCHEMES
  roots: Tuple[str, ...] = ()  # empty: any local path
  read_input_pickles: bool = False
  allow_private_hosts: bool = False  # loopback, private and link-local hosts (never metadata addresses)
  buckets: Optional[Tuple[str, ...]] = None  # gs:// buckets inputs may read; None or ('*',): any

  @classmethod
  def from_options(cls, opts, work_dir: str = '') -> 'InputPolicy':
    """The policy the flags ask for; the work dir stays readable (archive members are unpacked there).

    gs:// buckets: `--allowed_buckets`, or by default the buckets of `--output` and `--input`.
    """
    schemes = tuple(s.strip().lower() for s in (opts.allowed_schemes or '').split(',') if s.strip())
    roots = [r.strip() for r in (opts.allowed_roots or '').split(',') if r.strip()]
    if roots and work_dir and '://' not in work_dir:
      roots.append(work_dir)
    listed = [b.strip() for b in (opts.allowed_buckets or '').split(',') if b.strip()]
    buckets = [bucket_of(b if b.startswith('gs://') else f'gs://{b}') if b != ANY_BUCKET else b for b in listed]
    if not listed:
      buckets = [bucket_of(opts.output or ''), bucket_of(opts.input or '')]
    buckets.append(bucket_of(work_dir))
    return cls(schemes, tuple(os.path.realpath(r) for r in roots), bool(opts.read_input_pickles),
               bool(opts.allow_private_hosts), tuple(dict.fromkeys(b for b in buckets if b)))


def scheme_of(url: str) -> str:
  """The URL scheme; `file` for plain local paths."""
  scheme = urllib.parse.urlsplit(url).scheme.lower()
  return scheme or 'file'


def bucket_of(url: str) -> Optional[str]:
  """The bucket of a gs:// URL (lower case), else None."""
  parts = urllib.parse.urlsplit(str(url).strip())
  return (parts.netloc.lower() or None) if parts.scheme.lower() == 'gs' else None


def check_url(url: str, policy: InputPolicy) -> str:
  """The URL stripped, or UnsafeInput: option injection, control characters, scheme, root or bucket not allowed."""
  text = str(url).strip()
  if not text:
    raise UnsafeInput('bad_url', 'empty URL')
  if text.startswith('-'):
    raise UnsafeInput('bad_url', f'URL {text[:80]!r} begins with "-" and would read as a command-line option')
  if _CONTROL.search(text):
    raise UnsafeInput('bad_url', f'URL {text[:80]!r} holds control characters')
  scheme = scheme_of(text)
  if scheme not in policy.schemes:
    raise UnsafeInput('scheme_not_allowed', f'URL scheme {scheme!r} is not in --allowed_schemes '
                      f'{",".join(policy.schemes)}')
  if scheme == 'file':
    local_path(text, policy)
  if scheme == 'gs' and policy.buckets is not None and ANY_BUCKET not in policy.buckets:
    bucket = bucket_of(text)
    if bucket not in policy.buckets:
      raise UnsafeInput('bucket_not_allowed', f'gs://{bucket}/ is not in --allowed_buckets '
                        f'({",".join(policy.buckets) or "none"}); list it there to read from it')
  return text


def address_refusal(address: str, policy: InputPolicy) -> Optional[str]:
  """Why an IP address may not be contacted, in words, or None if it may."""
  ip = ipaddress.ip_address(address.split('%', 1)[0])  # drop an IPv6 scope (fe80::1%eth0)
  if ip.version == 6 and ip.ipv4_mapped:
    ip = ip.ipv4_mapped
  elif ip in _NAT64:  # a NAT64 gateway forwards to the IPv4 address in the low bits
    ip = ipaddress.IPv4Address(int(ip) & 0xffffffff)
  if ip in METADATA_ADDRESSES:
    return 'a cloud metadata address'
  if ip.is_unspecified or (ip.version == 4 and ip in _THIS_NETWORK):
    return 'an unspecified address'
  if ip.is_multicast:
    return 'a multicast address'
  if policy.allow_private_hosts:
    return None
  if ip.is_loopback:
    return 'a loopback address'
  if ip.is_link_local:
    return 'a link-local address'
  if ip.version == 4 and ip in _SHARED:
    return 'a shared (carrier-grade NAT) address'
  if ip.is_private or ip.is_reserved or not ip.is_global or (ip.version == 6 and ip.is_site_local):
    return 'a private or reserved address'
  return None


def checked_addresses(host: str, port: Optional[int], policy: InputPolicy) -> List[str]:
  """The addresses `host` resolves to, all of them allowed; else UnsafeInput `host_not_allowed`.

  One refused address refuses the host: a name that resolves to a public and an
  internal address must not get a second chance at the internal one. The detail
  names the kind of address, never anything learnt from contacting it (nothing is).
  Resolution failures raise socket.gaierror (an OSError: the host is unreachable).
  """
  name = (host or '').strip('[]').rstrip('.').lower()
  if not name:
    raise UnsafeInput('bad_url', 'the URL names no host')
  opens = '' if policy.allow_private_hosts else ' (--allow_private_hosts opens loopback, private and link-local hosts)'
  if name in METADATA_HOSTS:
    raise UnsafeInput('host_not_allowed', f'{name} is a cloud metadata name, never an input host')
  addresses = list(dict.fromkeys(info[4][0] for info in socket.getaddrinfo(name, port or 0, type=socket.SOCK_STREAM)))
  for address in addresses:
    why = address_refusal(address, policy)
    if why:
      said = f'{name} is {why}' if _is_ip(name) else f'{name} resolves to {why}'
      raise UnsafeInput('host_not_allowed', said + ('' if why in _ALWAYS else opens))
  return addresses


def _is_ip(name: str) -> bool:
  try:
    ipaddress.ip_address(name.split('%', 1)[0])
    return True
  except ValueError:
    return False


def check_host(url: str, policy: InputPolicy) -> None:
  """Refuse (UnsafeInput) a URL whose host the policy does not allow; resolution errors raise OSError."""
  parts = urllib.parse.urlsplit(url)
  try:
    port = parts.port
  except ValueError as error:
    raise UnsafeInput('bad_url', f'{url[:200]}: {error}') from error
  checked_addresses(parts.hostname or '', port, policy)


def connect_checked(address: Tuple[str, int], timeout, source_address, policy: InputPolicy) -> socket.socket:
  """socket.create_connection that connects only to addresses `checked_addresses` allowed."""
  host, port = address
  error: Optional[OSError] = None
  for ip in checked_addresses(host, port, policy):
    try:
      return socket.create_connection((ip, port), timeout, source_address)
    except OSError as failure:
      error = failure
  raise error or OSError(f'{host} resolves to no address')


def local_path(url: str, policy: InputPolicy) -> str:
  """The real path of a local/file:// URL, refused when it resolves outside --allowed_roots."""
  path = urllib.parse.unquote(urllib.parse.urlsplit(url).path) if url.startswith('file:') else url
  real = os.path.realpath(path)
  if policy.roots and not any(real == root or real.startswith(root.rstrip(os.sep) + os.sep)
                              for root in policy.roots):
    raise UnsafeInput('path_not_allowed', f'{path} resolves to {real}, outside --allowed_roots')
  return real


def safe_member_name(name: str) -> Optional[str]:
  """A normalised relative path for an archive member, or None if it is absolute or climbs out."""
  if not name or '\x00' in name or _CONTROL.search(name):
    return None
  text = name.replace('\\', '/')
  if text.startswith('/') or re.match(r'^[A-Za-z]:', text):
    return None
  parts = [p for p in text.split('/') if p not in ('', '.')]
  if not parts or any(p == '..' for p in parts):
    return None
  return posixpath.join(*parts)


def unsafe_id_reason(raw: str) -> Optional[str]:
  """Why a raw id must not name a path (traversal, absolute, control bytes), or None if sanitising suffices."""
  text = str(raw)
  if _CONTROL.search(text):
    return 'holds control characters or NUL'
  parts = text.replace('\\', '/').split('/')
  if text.startswith(('/', '\\')) or any(p == '..' for p in parts):
    return 'climbs out of its folder (absolute or "..")'
  return None
