"""Run a generator a few items ahead in its own thread.

Rendering (decode, filter, encode) and the face landmarker that consumes its
frames are fused into one Beam stage, so they take turns on one thread. Both
spend their time in native code that releases the GIL (PyAV's codecs and
filters, MediaPipe's graph), so producing the next frames in a thread lets the
two overlap on a multi-core worker (bench/results.md has the measurement).
"""
from __future__ import annotations

import queue
import threading
from typing import Generator, TypeVar

T = TypeVar('T')
R = TypeVar('R')

_ITEM, _DONE, _ERROR = range(3)


def prefetch(generator: Generator[T, None, R], depth: int = 16) -> Generator[T, None, R]:
  """Yield `generator`'s items and return its return value; its exceptions re-raise here.

  At most `depth` items wait in memory. Closing the result early stops and closes `generator`.
  """
  items: 'queue.Queue' = queue.Queue(depth)
  stop = threading.Event()

  def put(entry) -> bool:
    while not stop.is_set():
      try:
        items.put(entry, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def produce():
    try:
      while True:
        if not put((_ITEM, next(generator))):
          generator.close()
          return
    except StopIteration as done:
      put((_DONE, done.value))
    except BaseException as error:  # pylint: disable=broad-except
      put((_ERROR, error))

  thread = threading.Thread(target=produce, name='prefetch', daemon=True)
  thread.start()
  try:
    while True:
      kind, value = items.get()
      if kind == _ITEM:
        yield value
      elif kind == _DONE:
        return value
      else:
        raise value
  finally:
    stop.set()
    thread.join()
