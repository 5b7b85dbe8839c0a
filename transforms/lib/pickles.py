"""The one way this project reads a Python pickle: rebuild plain data and arrays, refuse every other global.

A pickle names the functions it calls while loading (`os.system` in a `__reduce__`); plain `pickle.loads`
calls them. `load_restricted` resolves only the globals it is given, numpy's array reconstruction and a few
harmless builtins by default, so a pickle that names anything else stops with `RefusedGlobal` before
anything runs. Lists, dicts, strings and numbers need no global at all. Callers add the array types of their
format (FLAME's torch tensors, chumpy and scipy.sparse shims: beam_pipeline/recipes/avatar/flame.py).
"""
from __future__ import annotations

import codecs
import collections
import copyreg
import io
import pickle
from typing import Callable, Dict, Mapping, Optional, Tuple

import numpy as np

Globals = Mapping[Tuple[str, str], object]


class RefusedGlobal(pickle.UnpicklingError):
  """The pickle names a global this loader does not rebuild; nothing it names was called."""


def numpy_globals() -> Dict[Tuple[str, str], object]:
  """numpy's array and scalar reconstruction (pickle protocols 2-5) under its 1.x and 2.x module names."""
  try:
    from numpy._core import multiarray, numeric  # pylint: disable=import-outside-toplevel  # numpy 2.x names
  except ImportError:
    from numpy.core import multiarray, numeric  # pylint: disable=import-outside-toplevel
  found = {}
  for module in ('numpy.core', 'numpy._core'):
    found[(f'{module}.multiarray', '_reconstruct')] = multiarray._reconstruct  # pylint: disable=protected-access
    found[(f'{module}.multiarray', 'scalar')] = multiarray.scalar
    # protocol 5 arrays; it refuses object dtypes
    found[(f'{module}.numeric', '_frombuffer')] = numeric._frombuffer  # pylint: disable=protected-access
  found[('numpy', 'ndarray')] = np.ndarray
  found[('numpy', 'dtype')] = np.dtype
  return found


def plain_globals() -> Dict[Tuple[str, str], object]:
  """numpy arrays plus the builtins protocol 0-5 pickles of plain data use (sets, slices, OrderedDict)."""
  allowed = numpy_globals()
  for module in ('copy_reg', 'copyreg'):
    allowed[(module, '_reconstructor')] = copyreg._reconstructor  # pylint: disable=protected-access
  for module in ('__builtin__', 'builtins'):
    for name, value in (('object', object), ('set', set), ('frozenset', frozenset), ('slice', slice)):
      allowed[(module, name)] = value
  allowed[('_codecs', 'encode')] = codecs.encode
  allowed[('collections', 'OrderedDict')] = collections.OrderedDict
  return allowed


class _Unpickler(pickle.Unpickler):

  def __init__(self, handle, allowed: Globals, modules: Mapping[str, Callable[[str], object]]):
    super().__init__(handle, encoding='latin1')  # Python 2 pickles of numpy arrays (FLAME's) hold latin-1 bytes
    self._allowed = allowed
    self._modules = modules

  def find_class(self, module, name):
    for prefix, resolve in self._modules.items():
      if module == prefix or module.startswith(prefix + '.'):
        return resolve(name)
    found = self._allowed.get((module, name))
    if found is None:
      raise RefusedGlobal(f'refers to {module}.{name}, which is not a data type this loader rebuilds')
    return found


def load_restricted(data: bytes, extra: Optional[Globals] = None,
                    modules: Optional[Mapping[str, Callable[[str], object]]] = None):
  """The value pickled in `data`, rebuilt from plain data, numpy arrays and the `extra` globals only.

  `modules` maps a module name to a resolver for every global under it (a shim class for a library the
  reader does not need, such as chumpy). Raises RefusedGlobal for any other global, or the error the
  malformed data causes (pickle.UnpicklingError, EOFError, ValueError, ...).
  """
  allowed = plain_globals()
  allowed.update(extra or {})
  return _Unpickler(io.BytesIO(data), allowed, modules or {}).load()

