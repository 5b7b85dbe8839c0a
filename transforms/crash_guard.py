"""Crash markers: a decoder that crashes the worker (segfault, abort) on one clip costs that clip, not the job.

A crash kills the worker process, so no exception handler can turn it into a reject, and the runner's
retries of the element would crash worker after worker until the job fails. So a tiny marker
`work_dir/markers/<run_id>/<clip id>` is written before a clip is rendered and removed when rendering
ends in any way the process survives (output, reject or exception). A retried element that finds its
marker is the one that was in flight when the worker died: it is rejected `decoder_crash` instead of
being decoded again. The reason is transient: a new run (new `--run_id`) tries the clip again.

Every clip in flight in the dead worker finds its marker, so a crash also rejects the clips that were
rendering beside the culprit (transiently, like the culprit).
"""
from __future__ import annotations

import functools
import hashlib
import json
import re
import socket
import time
from typing import Optional

import apache_beam as beam
from apache_beam.io.filesystem import BeamIOError
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms.core.elements import ClipTask, Reject
from transforms.core.fileio import delete_quietly, write_atomic

REASON = 'decoder_crash'
_PLAIN_NAME = re.compile(r'[A-Za-z0-9_-]{1,160}')


class CrashGuard:
  """Markers of the clips this run has in flight, under `work_dir/markers/<run_id>/`; off without a run id."""

  def __init__(self, work_dir: str, run_id: Optional[str]):
    self.folder = FileSystems.join(work_dir, 'markers', run_id) if run_id else None
    self.found = Metrics.counter('crash_guard', 'markers_found')

  def marker(self, clip_id: str) -> str:
    """A clip's marker; ids that are not plain file names are named by their hash."""
    name = clip_id if _PLAIN_NAME.fullmatch(clip_id) else hashlib.sha256(clip_id.encode()).hexdigest()[:32]
    return FileSystems.join(self.folder, name)

  def crashed_before(self, clip_id: str) -> bool:
    return FileSystems.exists(self.marker(clip_id))

  def arm(self, clip_id: str) -> None:
    write_atomic(self.marker(clip_id), json.dumps(
        {'clip_id': clip_id, 'host': socket.gethostname(), 'started': time.time()}).encode())

  def disarm(self, clip_id: str) -> None:
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
    return len(markers)


def crash_guarded(stage: str):
  """Decorates a DoFn's `process(self, task: ClipTask)` whose `self.crash_guard` is a CrashGuard."""

  def decorate(process):

    @functools.wraps(process)
    def guarded(self, task: ClipTask, *args, **kwargs):
      guard: CrashGuard = self.crash_guard
      if guard.folder is None:
        yield from process(self, task, *args, **kwargs)
        return
      if guard.crashed_before(task.clip_id):
        guard.found.inc()
        yield beam.pvalue.TaggedOutput('rejects', Reject(
            task.clip_id, stage, REASON, f'the worker died while this clip was being decoded (its crash marker '
            f'{guard.marker(task.clip_id)} was still there on retry); a new run tries it again', task.source_id,
            task.planned_id))
        return
      guard.arm(task.clip_id)
      try:
        yield from process(self, task, *args, **kwargs)
      finally:
        guard.disarm(task.clip_id)

    return guarded

  return decorate
