"""Loading rules every handler of user-supplied weights follows.

Weights are local paths (or gs:// through Beam FileSystems) the user names with a flag; nothing downloads at
run time. A missing file, a file in the wrong format, or weights of the wrong shape is a `WeightsError` that
names the flag, raised when the model loads on the worker (and checked early by `require` when the graph is
built, so a typo fails before any work). Pickled code is refused: torch files load with `weights_only=True`,
and Python pickles only when the user passed `--trust_pickle`.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import tempfile
from typing import Dict, Iterable, Optional, Sequence

from apache_beam.io.filesystems import FileSystems


class WeightsError(ValueError):
  """User-supplied weights are missing or unusable; the message says which flag to fix and how."""

  def __init__(self, flag: str, path: Optional[str], problem: str):
    self.flag, self.path = flag, path
    where = f' ({path})' if path else ''
    super().__init__(f'{flag}{where}: {problem}')


def require(path: Optional[str], flag: str, what: str) -> str:
  """`path` when it names an existing file or folder; else a WeightsError saying what the flag should hold."""
  if not path:
    raise WeightsError(flag, None, f'not given; pass the path of {what}')
  exists = os.path.exists(path) if '://' not in path else FileSystems.exists(path)
  if not exists:
    raise WeightsError(flag, path, f'no such file or folder; it should hold {what}')
  return path


def is_remote(path: str) -> bool:
  return '://' in path and not path.startswith('file://')


def require_files(path: Optional[str], names: Sequence[str], flag: str, what: str) -> str:
  """`path` when it is a folder (local or gs://) holding every file in `names`; else a WeightsError."""
  if not path:
    raise WeightsError(flag, None, f'not given; pass the path of {what}')
  if not is_remote(path) and not os.path.isdir(path):
    raise WeightsError(flag, path, f'no such file or folder; it should hold {what}')
  for name in names:
    if not FileSystems.exists(FileSystems.join(path, name)):
      raise WeightsError(flag, path, f'the folder has no {name}; it should hold {what}')
  return path


def local_copy(path: str, flag: str, what: str) -> str:
  """A local path for `path`: itself when local; for a gs:// file or folder, a copy in this machine's temp
  dir, made once per machine (copied aside, then renamed into place), for libraries that open only local
  files (transformers, diffusers, a face-swap command). Distributed workers get their weights this way."""
  if not is_remote(path):
    return path
  root = os.path.join(tempfile.gettempdir(), 'beam_pipeline_weights',
                      hashlib.sha1(path.encode()).hexdigest()[:16])
  target = os.path.join(root, os.path.basename(path.rstrip('/')) or 'weights')
  if os.path.exists(target):
    return target
  base = path.rstrip('/')
  files = [(m.path, '') for m in FileSystems.match([base])[0].metadata_list if m.path == base]
  if not files:
    under = FileSystems.match([base + '/**'])[0].metadata_list
    files = [(m.path, m.path[len(base) + 1:]) for m in under if not m.path.endswith('/')]
  if not files:
    raise WeightsError(flag, path, f'nothing there; it should hold {what}')
  os.makedirs(root, exist_ok=True)
  staging = tempfile.mkdtemp(dir=root, prefix='.partial-')
  try:
    for uri, relative in files:
      local = os.path.join(staging, 'item', relative) if relative else os.path.join(staging, 'item')
      os.makedirs(os.path.dirname(local), exist_ok=True)
      with FileSystems.open(uri, mime_type='application/octet-stream', compression_type='uncompressed') as src, \
          open(local, 'wb') as out:
        shutil.copyfileobj(src, out, 1 << 22)
    try:
      os.rename(os.path.join(staging, 'item'), target)
    except OSError:  # another process of this machine put its copy there first
      if not os.path.exists(target):
        raise
  finally:
    shutil.rmtree(staging, ignore_errors=True)
  return target


def read_weights(path: str, flag: str, what: str) -> bytes:
  require(path, flag, what)
  with FileSystems.open(path, mime_type='application/octet-stream') as handle:
    return handle.read()


def load_torch_state(path: str, flag: str, what: str) -> Dict:
  """A torch state dict (or a dict holding tensors) read with `weights_only=True`: pickled code is refused."""
  import torch
  data = read_weights(path, flag, what)
  try:
    state = torch.load(io.BytesIO(data), map_location='cpu', weights_only=True)
  except Exception as error:  # pylint: disable=broad-except  # torch raises many kinds here
    raise WeightsError(flag, path, f'not a torch state dict loadable without pickled code ({what}): '
                       f'{type(error).__name__}: {str(error)[:200]}') from error
  if not isinstance(state, dict):
    raise WeightsError(flag, path, f'holds a {type(state).__name__}, not a state dict ({what})')
  return state


def load_torchscript(path: str, flag: str, what: str, device=None):
  """A TorchScript archive (torch.jit.save / the official exports): code in TorchScript, not pickle."""
  import torch
  data = read_weights(path, flag, what)
  try:
    return torch.jit.load(io.BytesIO(data), map_location=device or 'cpu')
  except Exception as error:  # pylint: disable=broad-except
    raise WeightsError(flag, path, f'not a TorchScript archive ({what}): {type(error).__name__}: '
                       f'{str(error)[:200]}') from error


def is_torchscript(path: str) -> bool:
  """TorchScript archives are zip files holding a `code/` folder; plain state dicts hold `data.pkl` only."""
  import zipfile
  try:
    # Only the zip directory at the end is read (the streams FileSystems opens are seekable).
    with FileSystems.open(path, mime_type='application/octet-stream', compression_type='uncompressed') as handle:
      with zipfile.ZipFile(handle) as archive:
        return any('/code/' in name or name.startswith('code/') for name in archive.namelist())
  except (zipfile.BadZipFile, OSError, ValueError):
    return False


def load_into(module, state: Dict, flag: str, path: str, what: str, strip_prefixes: Iterable[str] = ('module.',)):
  """Load `state` into `module` strictly; missing, unexpected or wrongly shaped keys are a WeightsError."""
  prefixes = tuple(strip_prefixes)
  cleaned = {}
  for key, value in state.items():
    for prefix in prefixes:
      if key.startswith(prefix):
        key = key[len(prefix):]
    cleaned[key] = value
  own = module.state_dict()
  missing = sorted(set(own) - set(cleaned))
  unexpected = sorted(set(cleaned) - set(own))
  wrong = sorted(k for k in set(own) & set(cleaned) if tuple(own[k].shape) != tuple(cleaned[k].shape))
  if missing or unexpected or wrong:
    parts = []
    if missing:
      parts.append(f'{len(missing)} missing keys (e.g. {missing[:3]})')
    if unexpected:
      parts.append(f'{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})')
    if wrong:
      parts.append(f'{len(wrong)} keys of the wrong shape (e.g. {wrong[0]}: {tuple(cleaned[wrong[0]].shape)} '
                   f'where {tuple(own[wrong[0]].shape)} is expected)')
    raise WeightsError(flag, path, f'does not hold {what}: ' + '; '.join(parts))
  module.load_state_dict(cleaned)
  return module
