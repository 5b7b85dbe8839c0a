"""The render prefetcher hands on items, the return value and errors exactly as the generator would."""
import threading

import pytest

from transforms.lib.prefetch import prefetch


def _numbers(n, fail_at=None, closed=None):
  try:
    for i in range(n):
      if i == fail_at:
        raise ValueError(f'bad frame {i}')
      yield i
  finally:
    if closed is not None:
      closed.set()
  return ('done', n)


def _drain(generator):
  items = []
  while True:
    try:
      items.append(next(generator))
    except StopIteration as stop:
      return items, stop.value


def test_items_and_return_value_in_order():
  items, value = _drain(prefetch(_numbers(200), depth=3))
  assert items == list(range(200)) and value == ('done', 200)


def test_error_reaches_the_consumer_after_the_items_before_it():
  seen = []
  with pytest.raises(ValueError, match='bad frame 5'):
    for item in prefetch(_numbers(10, fail_at=5), depth=2):
      seen.append(item)
  assert seen == [0, 1, 2, 3, 4]


def test_closing_early_stops_and_closes_the_producer():
  closed = threading.Event()
  before = threading.active_count()
  stream = prefetch(_numbers(10_000, closed=closed), depth=4)
  assert next(stream) == 0
  stream.close()
  assert closed.wait(5) and threading.active_count() == before
