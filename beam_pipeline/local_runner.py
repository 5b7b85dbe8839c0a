"""The local runner's default workers: every core this process may use, without Beam's runner flags to learn.

Beam's FnApiRunner runs one bundle at a time in one thread unless `--direct_num_workers` and
`--direct_running_mode` say otherwise; it then splits every stage's input evenly over the workers (after the
pipeline's `SpreadClips` reshuffle and the skip-done join, one share of the clips per worker).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import List, Optional, Tuple

from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

LOCAL_RUNNERS = ('FnApiRunner', 'DirectRunner')
# Up to this many workers they are threads of this process. A worker process imports the pipeline and loads
# its models again (about 11 s of CPU each, measured: twice the CPU of a small in-memory run with 2 of them),
# while threads share one copy, and the heavy work releases the GIL (the landmarker through ctypes: 14.3 of its
# 16.4 ms of CPU per frame, measured; PyAV's codecs, x264, OpenCV). What holds the GIL (result conversion and
# the render loop's Python) caps threads as they grow; beyond this many, processes scale further.
THREADS_UP_TO = 4
# Peak RSS of one worker process on the hdtf bench was about 1.1 GiB: processes beyond what the free memory
# holds would swap.
WORKER_PROCESS_MIB = 1536


def usable_cores() -> int:
  """Cores this process may run on (a container's or taskset's limit included)."""
  try:
    return len(os.sched_getaffinity(0))
  except AttributeError:  # no affinity call (macOS, Windows)
    return os.cpu_count() or 1


def available_mib() -> Optional[int]:
  try:
    with open('/proc/meminfo') as handle:
      for line in handle:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) // 1024
  except OSError:
    pass
  return None


def choose(cores: int, memory_mib: Optional[int], workers: Optional[int] = None,
           mode: Optional[str] = None) -> Tuple[int, str]:
  """(workers, running mode): what the user gave stays; the rest defaults to every core (threads up to
  THREADS_UP_TO workers, processes beyond, as many as the free memory holds). Beam's `0` means every core."""
  if mode == 'in_memory':
    return (1 if workers is None else workers), mode
  given = workers is not None and workers != 0
  workers = workers if given else cores
  if mode is None:
    if workers <= 1:
      return 1, 'in_memory'
    mode = 'multi_threading' if workers <= THREADS_UP_TO else 'multi_processing'
  if mode == 'multi_processing' and not given and memory_mib:
    workers = max(1, min(workers, memory_mib // WORKER_PROCESS_MIB))
  return workers, mode


def use_all_cores(options: PipelineOptions, argv: List[str]) -> None:
  """Set the local runner's workers and running mode in `options` where `argv` does not name them."""
  runner = options.view_as(StandardOptions).runner
  if (runner if isinstance(runner, str) else type(runner).__name__) not in LOCAL_RUNNERS:
    return
  parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
  parser.add_argument('--direct_num_workers', type=int)
  parser.add_argument('--direct_running_mode')
  given, _ = parser.parse_known_args(argv)
  workers, mode = choose(usable_cores(), available_mib(), given.direct_num_workers, given.direct_running_mode)
  direct = options.view_as(DirectOptions)
  direct.direct_num_workers, direct.direct_running_mode = workers, mode
  logging.info('local runner: %d worker(s), %s', workers, mode)


SDK_WORKER = 'apache_beam.runners.worker.sdk_worker'


class _WithoutWorkerTracebacks:
  """sys.stderr less what Beam's SDK harness prints when a bundle fails in a worker thread of this process:
  the runner raises that traceback as its own error, which the CLI reports (one line for a weights flag)."""

  def __init__(self, stream):
    self._stream = stream

  def write(self, text: str) -> int:
    caller = sys._getframe(0).f_back  # pylint: disable=protected-access  # None when the interpreter writes
    if caller is not None and caller.f_globals.get('__name__') == SDK_WORKER:
      return len(text)
    return self._stream.write(text)

  def __getattr__(self, name: str):
    return getattr(self._stream, name)


def quiet_worker_errors() -> None:
  """A worker's failure is said once, by the runner's error: not also by the SDK harness's print and log."""
  logging.getLogger(SDK_WORKER).setLevel(logging.CRITICAL)
  sys.stderr = _WithoutWorkerTracebacks(sys.stderr)
