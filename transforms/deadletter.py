"""Dead letter per element: an unexpected exception in one clip never takes down its bundle.

`DeadLetter` wraps a stage DoFn (in the spirit of Beam's `with_exception_handling`, but its dead letters are
ordinary `Reject`s on the stage's `rejects` tag). When the wrapped `process` raises, every clip the element
still owed becomes a `Reject(reason='internal_error', stage=<stage>)` with the exception in its detail; clips
it had already settled (emitted downstream or rejected) are left alone, so accounting stays exact. A writer
may say, with a `published(element)` method, that another attempt already published the unit (a runner's
backup attempt that finished first and deleted the inputs this one was reading): its published records then
stand for those clips, so no clip is both written and rejected. An exception from an element that names no
clip is re-raised: failing loudly beats losing work silently. So is a `FatalError`: a failure of the worker
(e.g. its model fails on most frames), not of the clip, which would otherwise reject every clip of the run.
"""
from __future__ import annotations

import collections.abc
import logging
import traceback
from typing import Iterable, List, Optional, Tuple

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.core.elements import ClipTask, FatalError, Reject, RenderedClip, SampleRef, ShardBatch, Source

REASON = 'internal_error'


def owed_clips(element) -> List[Tuple[str, str]]:
  """(clip_id, source_id) of every clip a stage input element stands for."""
  return [(clip_id, source_id) for clip_id, source_id, _ in _owed(element)]


def _owed(element) -> List[Tuple[str, str, str]]:
  """(clip_id, source_id, planned_id) of every clip a stage input element stands for; planned_id '' where the
  clip is a planned clip itself (or the element does not say)."""
  if isinstance(element, Source):
    return [(c.clip_id, element.source_id, '') for c in element.clips]
  if isinstance(element, ClipTask):
    return [(element.clip_id, element.source_id, element.planned_id)]
  if isinstance(element, RenderedClip):
    return _owed(element.task)
  if isinstance(element, SampleRef):
    return [(element.id, element.source_id, '')]
  if isinstance(element, ShardBatch):
    return [(ref.id, ref.source_id, '') for ref in element.refs]
  carried = getattr(element, 'clip', None) or getattr(element, 'task', None)  # e.g. an analysis of a clip
  if isinstance(carried, (ClipTask, RenderedClip)):
    return _owed(carried)
  if isinstance(element, tuple) and len(element) == 2:
    head, body = element
    if isinstance(head, Source):
      return _owed(head)
    if isinstance(body, (ClipTask, RenderedClip)):
      return _owed(body)
    if isinstance(body, dict):  # a CoGroupByKey result: tag -> values
      groups = list(body.values())
    elif isinstance(body, collections.abc.Iterable) and not isinstance(body, (str, bytes)):  # a GroupByKey result (a subject)
      groups = [body]
    else:
      groups = []
    return list(dict.fromkeys(owed for values in groups for value in values for owed in _owed(value)))
  return []


def describe(error: Exception) -> str:
  """An unexpected error as a reject's detail: its type, message and the line that raised it."""
  where = traceback.extract_tb(error.__traceback__)[-1]
  return f'{type(error).__name__}: {error} (at {where.filename.rsplit("/", 1)[-1]}:{where.lineno})'


def settled_clips(output) -> Iterable[str]:
  """Clip ids an output accounts for: a reject, a source, a planned task, a rendered or analysed clip, a sample."""
  if isinstance(output, beam.pvalue.TaggedOutput):
    if output.tag == 'rejects':
      return [output.value.id]
    return []
  if isinstance(output, Reject):
    return [output.id]
  if isinstance(output, Source):  # e.g. an unpacked archive member, still to download
    return [c.clip_id for c in output.clips]
  if isinstance(output, ClipTask):  # a piece settles its planned clip too: the clip is on its way
    return [output.clip_id, output.planned]
  if isinstance(output, SampleRef):
    return [output.id]
  if isinstance(output, dict) and 'id' in output:  # an index record: the sample is published
    return [output['id']]
  if isinstance(output, RenderedClip) or isinstance(getattr(output, 'clip', None) or getattr(output, 'task', None),
                                                    (ClipTask, RenderedClip)):
    return [clip_id for clip_id, _ in owed_clips(output)]
  if isinstance(output, tuple) and len(output) == 2 and isinstance(output[0], Source):
    return [c.clip_id for c in output[0].clips]
  return []


class DeadLetter(beam.DoFn):
  """Runs `fn` per element; its unexpected exceptions become `internal_error` rejects (tag `rejects`)."""

  def __init__(self, fn: beam.DoFn, stage: str):
    super().__init__()
    self.fn = fn
    self.stage = stage
    self.errors = Metrics.counter('dead_letter', f'{stage}_{REASON}')
    self.recovered = Metrics.counter('dead_letter', f'{stage}_published_by_another_attempt')

  def setup(self):
    self.fn.setup()

  def start_bundle(self):
    self.fn.start_bundle()

  def finish_bundle(self):
    return self.fn.finish_bundle()

  def teardown(self):
    self.fn.teardown()

  def _published(self, element) -> Optional[List[dict]]:
    """The index records of the output unit `element` writes, when some attempt already published it: a writer
    says so with a `published(element)` method (None: not published)."""
    published = getattr(self.fn, 'published', None)
    try:
      return published(element) if published is not None else None
    except Exception:  # pylint: disable=broad-except  # the storage failing too: reject as planned
      logging.warning('%s: could not check whether another attempt published %s', self.stage,
                      [clip_id for clip_id, _ in owed_clips(element)][:5])
      return None

  def process(self, element, *args, **kwargs):
    settled = set()
    try:
      for output in self.fn.process(element, *args, **kwargs) or ():
        settled.update(settled_clips(output))
        yield output
    except FatalError:
      raise
    except Exception as error:  # pylint: disable=broad-except
      owed = [clip for clip in _owed(element) if clip[0] not in settled]
      if not owed and not settled:
        raise
      published = self._published(element)
      if published:  # another attempt published the unit (and may have deleted what this one was reading)
        self.recovered.inc()
        owed_ids = {clip_id for clip_id, _, _ in owed}
        yield from (record for record in published if record.get('id') in owed_ids)
        owed = [clip for clip in owed if clip[0] not in {record.get('id') for record in published}]
        if not owed:
          return
      self.errors.inc()
      detail = describe(error)
      logging.warning('%s: internal error on %s: %s', self.stage, [clip_id for clip_id, _, _ in owed], detail)
      for clip_id, source_id, planned_id in owed:
        yield beam.pvalue.TaggedOutput('rejects', Reject(clip_id, self.stage, REASON, detail[:500], source_id,
                                                         planned_id=planned_id))
