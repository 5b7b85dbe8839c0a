"""Checks for untrusted input: URL schemes, local roots, ids and archive member names.

A refusal is an `UnsafeInput` carrying a reject reason code: the stage that
checks turns it into a reject, so a hostile entry is explained in rejects.jsonl
and the run goes on.
"""
from __future__ import annotations

import dataclasses
import os
import posixpath
import re
import urllib.parse
from typing import Optional, Tuple

DEFAULT_SCHEMES = ('http', 'https', 'gs', 'file')
_CONTROL = re.compile(r'[\x00-\x1f\x7f]')


class UnsafeInput(ValueError):
  """An input refused by policy; `reason` is the reject code."""

  def __init__(self, reason: str, detail: str):
    super().__init__(detail)
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class InputPolicy:
  """What inputs may reach: URL schemes, local directories, pickles (picklable for Beam workers)."""
  schemes: Tuple[str, ...] = DEFAULT_SCHEMES
  roots: Tuple[str, ...] = ()  # empty: any local path
  trust_pickle: bool = False

  @classmethod
  def from_options(cls, opts, work_dir: str = '') -> 'InputPolicy':
    """The policy the flags ask for; a local work dir stays readable (archive members are unpacked there)."""
    schemes = tuple(s.strip().lower() for s in (opts.allowed_schemes or '').split(',') if s.strip())
    roots = [r.strip() for r in (opts.allowed_roots or '').split(',') if r.strip()]
    if roots and work_dir and '://' not in work_dir:
      roots.append(work_dir)
    return cls(schemes, tuple(os.path.realpath(r) for r in roots), bool(opts.trust_pickle))


def scheme_of(url: str) -> str:
  """The URL scheme; `file` for plain local paths."""
  scheme = urllib.parse.urlsplit(url).scheme.lower()
  return scheme or 'file'


def check_url(url: str, policy: InputPolicy) -> str:
  """The URL stripped, or UnsafeInput: option injection, control characters, scheme or root not allowed."""
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
  return text


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
