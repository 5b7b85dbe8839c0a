"""Run a RunInference `ModelHandler` inside a DoFn, on frames that DoFn already holds.

Why: per-frame results must never become PCollection elements. Sent through `RunInference`, every
output frame is an element and its result has to be grouped back to its clip by a shuffle: about
25 M elements and 160 GB of shuffle for 100 k clips of 10 s, and a whole-video clip's frames in one
in-memory list. So the stages that hold frames (rendering, sampling for detection) call their models
here and pack the results per clip as they come.

What RunInference does and this keeps: one model per worker process, shared by every DoFn thread
(`apache_beam.utils.shared.Shared`, as RunInference does); batches of at most the handler's
`max_batch_size`; the handler's own counters (they run inside its `run_inference`) and RunInference's
metric names (`<model>_num_inferences`, `<model>_inference_batch_latency_micro_secs`, ...) in the
handler's namespace. Models the handler wants shared across processes (`share_model_across_processes`)
are still loaded once per process here.

What it adds: a frame the model fails on is a `ModelError`, not an empty result, and a process where
most frames fail stops the job (`transforms.core.elements.FatalError`) instead of rejecting every clip.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Any, List, Sequence

from apache_beam.metrics import Metrics
from apache_beam.ml.inference.base import ModelHandler
from apache_beam.utils import shared

from transforms.core.elements import FatalError

DEFAULT_BATCH_SIZE = 32
FATAL_AFTER_FRAMES = 200  # a process judges its model only after this many frames...
FATAL_ERROR_RATE = 0.5  # ...and stops the job when more than this share of them failed


@dataclasses.dataclass(frozen=True)
class ModelError:
  """Stands for the result of a frame the model failed on: a model error, never "no face"."""
  model: str
  detail: str


class _LoadedModel:
  """The process's model and its running count of frames and model errors (weak-referenceable for Shared)."""

  def __init__(self, name: str, model):
    self.name = name
    self.model = model
    self.lock = threading.Lock()
    self.frames = 0
    self.errors = 0
    self.last_error = ''

  def count(self, frames: int, errors: List[ModelError]) -> None:
    with self.lock:
      self.frames += frames
      self.errors += len(errors)
      if errors:
        self.last_error = errors[-1].detail
      failing = self.frames >= FATAL_AFTER_FRAMES and self.errors > FATAL_ERROR_RATE * self.frames
      frames, errors, last = self.frames, self.errors, self.last_error
    if failing:
      raise FatalError(f'{self.name} failed on {errors} of {frames} frames in this worker process '
                       f'(more than {FATAL_ERROR_RATE:.0%}); stopping instead of rejecting every clip. '
                       f'Last error: {last}')


class SharedModel:
  """A ModelHandler's model, loaded once per process, called on batches of frames in the calling thread.

  Build it with the pipeline (it pickles with its DoFn), call `setup()` from `DoFn.setup`, then `infer`.
  """

  def __init__(self, handler: ModelHandler):
    self.handler = handler
    self.name = getattr(handler, 'model_name', '') or type(handler).__name__
    self.batch_size = int(handler.batch_elements_kwargs().get('max_batch_size', DEFAULT_BATCH_SIZE))
    self._shared = shared.Shared()
    self._loaded = None

  def setup(self) -> None:
    """Load (or find this process's already loaded) model, and make the metrics."""
    self.handler.set_environment_vars()
    namespace, prefix = self.handler.get_metrics_namespace(), self.name + '_'
    self._inferences = Metrics.counter(namespace, prefix + 'num_inferences')
    self._failed_batches = Metrics.counter(namespace, prefix + 'failed_batches_counter')
    self._batch_size = Metrics.distribution(namespace, prefix + 'inference_request_batch_size')
    self._batch_bytes = Metrics.distribution(namespace, prefix + 'inference_request_batch_byte_size')
    self._latency = Metrics.distribution(namespace, prefix + 'inference_batch_latency_micro_secs')
    load_latency = Metrics.distribution(namespace, prefix + 'load_model_latency_milli_secs')

    def load():
      started = time.monotonic()
      loaded = _LoadedModel(self.name, self.handler.load_model())
      load_latency.update(int((time.monotonic() - started) * 1000))
      return loaded

    self._loaded = self._shared.acquire(load, tag=self.name)

  def infer(self, frames: Sequence[Any]) -> List[Any]:
    """One inference per frame, in order, in batches of at most `batch_size`; `ModelError` where it failed.

    Raises `FatalError` once most frames this process has seen failed.
    """
    results: List[Any] = []
    for first in range(0, len(frames), self.batch_size):
      results += self._batch(frames[first:first + self.batch_size])
    return results

  def _batch(self, batch: Sequence[Any]) -> List[Any]:
    started = time.monotonic()
    try:
      results = [r.inference for r in self.handler.run_inference(batch, self._loaded.model)]
    except Exception as error:  # pylint: disable=broad-except
      # A batch that fails as a whole (out of memory, a broken model) fails each of its frames.
      self._failed_batches.inc()
      logging.warning('%s failed on a batch of %d frames', self.name, len(batch), exc_info=True)
      results = [ModelError(self.name, f'{type(error).__name__}: {error}'[:300])] * len(batch)
    self._latency.update(int((time.monotonic() - started) * 1e6))
    self._inferences.inc(len(batch))
    self._batch_size.update(len(batch))
    self._batch_bytes.update(self.handler.get_num_bytes(batch))
    self._loaded.count(len(batch), [r for r in results if isinstance(r, ModelError)])
    return results
