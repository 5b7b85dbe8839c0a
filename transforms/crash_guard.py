"""Crash markers: a decoder that crashes the worker (segfault, abort) on one clip costs that clip, not the job,
and a worker that dies for any other reason costs nothing.

A crash kills the worker process, so no exception handler can turn it into a reject, and the runner's
retries of the element would crash worker after worker until the job fails. So a tiny marker
`work_dir/markers/<run_id>/<clip id>` is written before a clip is rendered and removed when rendering
ends in any way the process survives (output, reject or exception). A retried element that finds its
marker was in flight when its worker died. That alone does not make it the culprit: the worker may have been
killed for memory or preempted, or another clip beside it crashed the decoder. So the first time, the clip is
rendered again, alone in its process (no other render starts until it is done, and it waits for those in
flight). Only a clip that was in flight at two deaths, the second time alone, is rejected `decoder_crash`;
one that comes through is kept, with a note in its json saying that a worker died while it was in flight.

The marker records every death the clip saw: host, process, whether it rendered alone, and the clips that were
already in flight beside it. A thread rewrites the markers of live renders every STALE_S / 3 seconds, so a
concurrent attempt of the same clip (a runner's backup attempt) waits for a live one instead of taking its
marker for a death. The reason is transient: a new run (new `--run_id`) tries the clip again.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import re
import socket
import threading
import time
from typing import Dict, Iterator, List, Optional, Tuple

import apache_beam as beam
from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms.core.elements import ClipTask, RenderedClip, Reject
from transforms.core.fileio import delete_quietly, read_bytes, write_atomic

REASON = 'decoder_crash'
DEATHS_TO_REJECT = 2  # deaths in flight before a clip is taken for the culprit (the last one rendering alone)
STALE_S = 60.0  # a marker whose heartbeat is older belongs to a dead worker; a fresher one to a live attempt
BEAT_TICK_S = 0.5
_PLAIN_NAME = re.compile(r'[A-Za-z0-9_-]{1,160}')


class _SharedOrAlone:
  """Renders share the process; a clip that was in flight at a worker's death renders alone (a writer lock:
  it waits for the renders in flight, and no render starts while it waits or runs)."""

  def __init__(self):
    self._condition = threading.Condition()
    self._shared = 0
    self._alone_waiting = 0
    self._alone = False
    self.in_flight: Dict[str, int] = {}  # clip id -> renders of it in flight in this process
    self.armed: Dict[str, Tuple[dict, float]] = {}  # marker uri -> (record, seconds between beats)
    self._beat_lock = threading.Lock()
    self._beating: Optional[threading.Thread] = None

  def keep_fresh(self, uri: str, record: dict, stale_s: float) -> None:
    """Rewrite `uri` every stale_s / 3 while it is armed, so that a concurrent attempt elsewhere (a runner's
    backup attempt) can tell this live render from a dead worker's marker."""
    with self._beat_lock:
      self.armed[uri] = (record, stale_s / 3)
      if self._beating is None or not self._beating.is_alive():
        self._beating = threading.Thread(target=self._beat, name='crash-guard-heartbeat', daemon=True)
        self._beating.start()

  def forget(self, uri: str) -> None:
    """After this returns the heartbeat never writes `uri` again (writes happen under the same lock)."""
    with self._beat_lock:
      self.armed.pop(uri, None)

  def _beat(self) -> None:
    while True:
      time.sleep(BEAT_TICK_S)
      with self._beat_lock:
        for uri, (record, every_s) in list(self.armed.items()):
          if time.time() - record['beat'] >= every_s:
            record['beat'] = time.time()
            with contextlib.suppress(BeamIOError, OSError):
              write_atomic(uri, json.dumps(record).encode())

  @contextlib.contextmanager
  def shared(self, clip_id: str) -> Iterator[None]:
    with self._condition:
      self._condition.wait_for(lambda: not self._alone and not self._alone_waiting)
      self._shared += 1
      self.in_flight[clip_id] = self.in_flight.get(clip_id, 0) + 1
    try:
      yield
    finally:
      with self._condition:
        self._shared -= 1
        self._leave(clip_id)
        self._condition.notify_all()

  @contextlib.contextmanager
  def alone(self, clip_id: str) -> Iterator[None]:
    with self._condition:
      self._alone_waiting += 1
      self._condition.wait_for(lambda: not self._alone and not self._shared)
      self._alone_waiting -= 1
      self._alone = True
      self.in_flight[clip_id] = self.in_flight.get(clip_id, 0) + 1
    try:
      yield
    finally:
      with self._condition:
        self._alone = False
        self._leave(clip_id)
        self._condition.notify_all()

  def _leave(self, clip_id: str) -> None:
    self.in_flight[clip_id] -= 1
    if not self.in_flight[clip_id]:
      del self.in_flight[clip_id]

  def beside(self, clip_id: str) -> List[str]:
    with self._condition:
      return sorted(other for other in self.in_flight if other != clip_id)


_PROCESS = _SharedOrAlone()  # one per worker process: every RenderClips instance of it shares it


@dataclasses.dataclass(frozen=True)
class Death:
  """A worker death a clip was in flight at, as its marker recorded it when the render started."""
  host: str
  pid: int
  alone: bool
  beside: List[str]

  def describe(self) -> str:
    where = f'{self.host} pid {self.pid}'
    if self.alone:
      return f'{where}, rendering alone'
    return f'{where}, beside {len(self.beside)} other clips' if self.beside else f'{where}, the only clip in flight'


class CrashGuard:
  """Markers of the clips this run has in flight, under `work_dir/markers/<run_id>/`; off without a run id."""

  def __init__(self, work_dir: str, run_id: Optional[str], stale_s: float = STALE_S):
    self.folder = FileSystems.join(work_dir, 'markers', run_id) if run_id else None
    self.stale_s = stale_s
    self.found = Metrics.counter('crash_guard', 'markers_found')
    self.survived = Metrics.counter('crash_guard', 'clips_through_after_a_worker_death')

  def marker(self, clip_id: str) -> str:
    """A clip's marker; ids that are not plain file names are named by their hash."""
    name = clip_id if _PLAIN_NAME.fullmatch(clip_id) else hashlib.sha256(clip_id.encode()).hexdigest()[:32]
    return FileSystems.join(self.folder, name)

  def _record(self, clip_id: str) -> Optional[dict]:
    try:
      return json.loads(read_bytes(self.marker(clip_id)))
    except (BeamIOError, OSError, ValueError):
      return None

  def deaths(self, clip_id: str) -> List[Death]:
    """The worker deaths this clip was in flight at: its marker's history, plus the death its marker's
    presence proves (the last render never finished). Empty when it has no marker.

    A marker with a fresh heartbeat is a live attempt of the same clip (a runner's backup attempt, or another
    thread here): wait until it finishes (its marker goes) or its heartbeat stops (its worker died)."""
    record = self._record(clip_id)
    while record is not None and time.time() - float(record.get('beat', 0)) < self.stale_s:
      time.sleep(min(1.0, self.stale_s / 10))
      record = self._record(clip_id)
    if record is None:
      return []
    history = [Death(**entry) for entry in record.get('deaths', ())]
    return history + [Death(record.get('host', '?'), int(record.get('pid', 0)), bool(record.get('alone')),
                            list(record.get('beside', ())))]

  def arm(self, clip_id: str, deaths: List[Death], alone: bool) -> None:
    now = time.time()
    record = {'clip_id': clip_id, 'host': socket.gethostname(), 'pid': os.getpid(), 'started': now, 'beat': now,
              'alone': alone, 'beside': _PROCESS.beside(clip_id),
              'deaths': [dataclasses.asdict(death) for death in deaths]}
    write_atomic(self.marker(clip_id), json.dumps(record).encode())
    _PROCESS.keep_fresh(self.marker(clip_id), record, self.stale_s)

  def disarm(self, clip_id: str) -> None:
    _PROCESS.forget(self.marker(clip_id))
    delete_quietly([self.marker(clip_id)])  # already gone (a duplicate attempt removed it) is fine

  def clear(self) -> int:
    """After the run: remove the markers crashed clips left (a new run has a new run id anyway)."""
    if self.folder is None:
      return 0
    try:
      markers = [m.path for m in FileSystems.match([FileSystems.join(self.folder, '*')])[0].metadata_list]
    except BeamIOError:
      return 0
    delete_quietly(markers)
    if '://' not in self.folder:  # a local run's folder would stay behind empty (object stores have none)
      with contextlib.suppress(OSError):
        os.rmdir(self.folder)
    return len(markers)


def _noted(output, deaths: List[Death]):
  """A rendered clip that came through after a worker death says so in its json (task notes)."""
  if not isinstance(output, RenderedClip):
    return output
  note = (f'rendered again alone after a worker died while this clip was in flight '
          f'({"; ".join(death.describe() for death in deaths)}); it was not the cause')
  output.task = dataclasses.replace(output.task, notes=output.task.notes + (note,))
  return output


def crash_guarded(stage: str):
  """Decorates a DoFn's `process(self, task: ClipTask)` whose `self.crash_guard` is a CrashGuard."""

  def decorate(process):

    @functools.wraps(process)
    def guarded(self, task: ClipTask, *args, **kwargs):
      guard: CrashGuard = self.crash_guard
      if guard.folder is None:
        yield from process(self, task, *args, **kwargs)
        return
      deaths = guard.deaths(task.clip_id)
      if deaths:
        guard.found.inc()
      if len(deaths) >= DEATHS_TO_REJECT:
        yield beam.pvalue.TaggedOutput('rejects', Reject(
            task.clip_id, stage, REASON, f'its worker died at each of the last {len(deaths)} attempts to decode '
            f'it ({"; ".join(death.describe() for death in deaths)}; marker {guard.marker(task.clip_id)}); a new '
            f'run tries it again', task.source_id, task.planned_id))
        return
      with (_PROCESS.alone(task.clip_id) if deaths else _PROCESS.shared(task.clip_id)):
        guard.arm(task.clip_id, deaths, alone=bool(deaths))
        try:
          for output in process(self, task, *args, **kwargs):
            yield _noted(output, deaths) if deaths else output
          if deaths:
            guard.survived.inc()
        finally:
          guard.disarm(task.clip_id)

    return guarded

  return decorate
