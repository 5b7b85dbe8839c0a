"""A live progress line for DirectRunner runs: sources downloaded, clips done, rejected, ETA.

DirectRunner (Beam's FnApiRunner) hands back its PipelineResult, and with it
the Beam metrics, only once the whole pipeline has finished. So the live
counts travel through a side channel: `CountEvents` branches append one byte
per element to a file in a local progress directory (O_APPEND writes are
atomic, so in-memory and multi_processing workers can share it) and a thread
turns file sizes into the line. The same branches bump Beam counters
(namespace `progress`), and the closing line is printed from the
PipelineResult's metrics.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Dict, Optional, TextIO

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import StandardOptions

NAMESPACE = 'progress'
EVENTS = ('sources', 'downloaded', 'planned', 'rendered', 'written', 'rejected')


class CountEvents(beam.DoFn):
  """Counts elements of one PCollection into the progress directory and a Beam counter."""

  def __init__(self, directory: str, event: str):
    self.directory = directory
    self.event = event
    self.counter = Metrics.counter(NAMESPACE, event)

  def setup(self):
    self.fd = os.open(os.path.join(self.directory, self.event), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

  def process(self, element):
    os.write(self.fd, b'.')
    self.counter.inc()
    return ()

  def teardown(self):
    os.close(self.fd)


def watch(pcolls: Dict[str, beam.PCollection], directory: str) -> None:
  """Branch a counter off each named PCollection (names from EVENTS)."""
  for event, pcoll in pcolls.items():
    _ = pcoll | f'Progress{event.capitalize()}' >> beam.ParDo(CountEvents(directory, event))


def wanted(options, no_progress: bool) -> bool:
  """Only DirectRunner runs locally, where the side channel's directory is reachable by every worker."""
  runner = options.view_as(StandardOptions).runner or 'DirectRunner'
  name = runner if isinstance(runner, str) else type(runner).__name__
  return not no_progress and 'direct' in name.lower()


def _clock(seconds: float) -> str:
  seconds = int(seconds)
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


def format_line(counts: Dict[str, int], already: int, elapsed: float) -> str:
  """One line of counts; the ETA extrapolates clips finished (rendered or rejected) per second."""
  todo = max(counts.get('planned', 0) - already, 0)
  done = min(todo, max(counts.get('rendered', 0), counts.get('written', 0)) + counts.get('rejected', 0))
  if todo and done >= todo:
    eta = 'finishing'
  elif done:
    eta = 'ETA ' + _clock(elapsed * (todo - done) / done)
  else:
    eta = 'ETA --'
  resumed = f' (+{already} from earlier runs)' if already else ''
  return (f'[{_clock(elapsed)}] sources {counts.get("downloaded", 0)}/{counts.get("sources", 0)} downloaded | '
          f'clips {done}/{todo} done{resumed}: {counts.get("rendered", 0)} rendered, '
          f'{counts.get("written", 0)} written, {counts.get("rejected", 0)} rejected | {eta}')


class ProgressLine:
  """Context manager: owns the progress directory and the thread that redraws the line."""

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
    counts = {event: 0 for event in EVENTS}
    for counter in result.metrics().query(MetricsFilter().with_namespace(NAMESPACE))['counters']:
      counts[counter.key.metric.name] += counter.committed or 0
    self._show(format_line(counts, self.already, time.monotonic() - self.began), final=True)

  def __exit__(self, *exc) -> None:
    self.stopped.set()
    if self.thread.is_alive():
      self.thread.join()
    if self.tty and self.last and exc[0] is not None:
      self.stream.write('\n')
    shutil.rmtree(self.directory, ignore_errors=True)
