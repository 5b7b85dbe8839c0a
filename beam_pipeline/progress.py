"""Progress of a run: clips done, rejected, rate and ETA, on any runner.

`watch` branches a counting DoFn off the pipeline's main PCollections; each
bumps a Beam counter (namespace `progress`) per element.

- Remote runners (Dataflow, Flink, portable): the job runs while this process
  waits, and `follow` polls the job's Beam metrics into a line every
  `interval_s` until the job ends.
- DirectRunner (Beam's FnApiRunner) hands back its PipelineResult, and with it
  the metrics, only once the whole pipeline has finished. So the live counts
  travel through a side channel as well: with a progress directory the same
  DoFns append one byte per element to a file there (O_APPEND writes are
  atomic, so in-memory and multi_processing workers can share it) and
  `ProgressLine`'s thread turns file sizes into the line. Its closing line is
  printed from the finished run's metrics.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Dict, Optional, TextIO

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.options.pipeline_options import StandardOptions
from apache_beam.runners.portability import portable_runner
from apache_beam.runners.runner import PipelineState

from transforms import resume

NAMESPACE = 'progress'
EVENTS = ('sources', 'downloaded', 'planned', 'rendered', 'written', 'rejected')
# Planned clips an earlier run settled (written, or rejected for good): this run owes nothing for them.
SKIPPED = (resume.STAGE, 'clips_already_done')


class CountEvents(beam.DoFn):
  """Counts elements of one PCollection into a Beam counter and, given a directory, a file there."""

  def __init__(self, directory: Optional[str], event: str):
    self.directory = directory
    self.event = event
    self.counter = Metrics.counter(NAMESPACE, event)

  def setup(self):
    self.fd = None
    if self.directory:
      self.fd = os.open(os.path.join(self.directory, self.event), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

  def process(self, element):
    if self.fd is not None:
      os.write(self.fd, b'.')
    self.counter.inc()
    return ()

  def teardown(self):
    if self.fd is not None:
      os.close(self.fd)


def watch(pcolls: Dict[str, beam.PCollection], directory: Optional[str] = None) -> None:
  """Branch a counter off each named PCollection (names from EVENTS). Without a directory (remote runners)
  only the Beam counters count, for `follow`."""
  for event, pcoll in pcolls.items():
    _ = pcoll | f'Progress{event.capitalize()}' >> beam.ParDo(CountEvents(directory, event))


def wanted(options, no_progress: bool) -> bool:
  """The live side-channel line: for DirectRunner and the FnApiRunner it runs on, whose workers run on this
  machine (the directory reaches them) and whose `run()` returns only at the end."""
  runner = options.view_as(StandardOptions).runner or 'DirectRunner'
  name = (runner if isinstance(runner, str) else type(runner).__name__).lower()
  return not no_progress and ('direct' in name or 'fnapi' in name)


def _clock(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def format_line(counts: Dict[str, int], already: int, elapsed: float) -> str:
  """One line of counts; rate and ETA extrapolate clips finished (rendered or rejected) per second.

  `already` and `counts['skipped']` are planned clips earlier runs settled: this run does not owe them.
  """
  settled = already + counts.get('skipped', 0)
  todo = max(counts.get('planned', 0) - settled, 0)
  done = min(todo, max(counts.get('rendered', 0), counts.get('written', 0)) + counts.get('rejected', 0))
  if todo and done >= todo:
    eta = 'finishing'
  elif done:
    eta = 'ETA ' + _clock(elapsed * (todo - done) / done)
  else:
    eta = 'ETA --'
  rate = f'{done * 60 / elapsed:.1f} clips/min | ' if done and elapsed > 0 else ''
  resumed = f' (+{settled} from earlier runs)' if settled else ''
  return (f'[{_clock(elapsed)}] sources {counts.get("downloaded", 0)}/{counts.get("sources", 0)} downloaded | '
          f'clips {done}/{todo} done{resumed}: {counts.get("rendered", 0)} rendered, '
          f'{counts.get("written", 0)} written, {counts.get("rejected", 0)} rejected | {rate}{eta}')


def metric_counts(result) -> Dict[str, int]:
  """The progress counters (and `skipped`, from the resume step's) as the runner reports them now, for a
  running or a finished job.

  Attempted counts (work done, retries included) are the live ones on Dataflow; committed ones are what
  the portable job service and DirectRunner fill in. The larger is the progress so far.
  """
  if isinstance(result, portable_runner.PipelineResult):
    result._metrics = None  # pylint: disable=protected-access  # it keeps its first answer, even mid-run
  counts = dict.fromkeys(EVENTS + ('skipped',), 0)
  for counter in result.metrics().query()['counters']:
    name = (counter.key.metric.namespace, counter.key.metric.name)
    event = name[1] if name[0] == NAMESPACE and name[1] in EVENTS else 'skipped' if name == SKIPPED else None
    if event:
      counts[event] += max(counter.committed or 0, counter.attempted or 0)
  return counts


def follow(result, total_planned: Optional[int] = None, already: int = 0, interval_s: float = 30.0,
           out: Optional[TextIO] = None) -> str:
  """Print the progress line from the job's Beam metrics every `interval_s` until the job ends; returns its
  final state (then call `result.wait_until_finish()`, which raises when it failed).

  For runners whose `run()` returns while the job runs (Dataflow, Flink, portable job services); on one that
  returns at the end (DirectRunner) it prints the final line at once. `total_planned` replaces the `planned`
  counter where the caller knows better (e.g. a job built without `watch`).
  """
  out = out or sys.stdout
  began = time.monotonic()
  counts = dict.fromkeys(EVENTS, 0)
  while True:
    state = result.state
    try:
      counts = metric_counts(result)
    except Exception as error:  # pylint: disable=broad-except  # a metrics hiccup must not stop the wait
      logging.warning('progress: could not read the job metrics (%s); the line keeps the last counts', error)
    if total_planned is not None:
      counts['planned'] = total_planned
    out.write(f'{format_line(counts, already, time.monotonic() - began)} | job {state}\n')
    out.flush()
    if PipelineState.is_terminal(state):
      return state
    time.sleep(interval_s)


class ProgressLine:
  """Context manager: owns the progress directory and the thread that redraws the line (DirectRunner)."""

  def __init__(self, already: int = 0, stream: Optional[TextIO] = None, interval_s: Optional[float] = None):
    self.already = already
    self.stream = stream or sys.stderr
    self.tty = self.stream.isatty()
    self.interval_s = interval_s or (1.0 if self.tty else 10.0)  # logs get a line every 10 s, not a flood
    self.directory = tempfile.mkdtemp(prefix='beam-progress-')
    self.stopped = threading.Event()
    self.began = time.monotonic()
    self.thread = threading.Thread(target=self._loop, daemon=True)
    self.last = ''

  def counts(self) -> Dict[str, int]:
    out = {}
    for event in EVENTS:
      try:
        out[event] = os.path.getsize(os.path.join(self.directory, event))
      except OSError:
        out[event] = 0
    return out

  def _show(self, line: str, final: bool = False) -> None:
    if self.tty:
      self.stream.write('\r' + line.ljust(len(self.last)) + ('\n' if final else ''))
    elif line != self.last or final:
      self.stream.write(line + '\n')
    self.stream.flush()
    self.last = line

  def _loop(self) -> None:
    while not self.stopped.wait(self.interval_s):
      self._show(format_line(self.counts(), self.already, time.monotonic() - self.began))

  def __enter__(self) -> 'ProgressLine':
    self.thread.start()
    return self

  def finish(self, result) -> None:
    """The closing line, from the finished pipeline's Beam metrics."""
    self.stopped.set()
    self.thread.join()
    self._show(format_line(metric_counts(result), self.already, time.monotonic() - self.began), final=True)

  def __exit__(self, *exc) -> None:
    self.stopped.set()
    if self.thread.is_alive():
      self.thread.join()
    if self.tty and self.last and exc[0] is not None:
      self.stream.write('\n')
    shutil.rmtree(self.directory, ignore_errors=True)
