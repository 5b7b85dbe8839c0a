"""Concurrent downloads inside one worker: wall time, per-host limit, accounting under Beam.

Every server here is a loopback server the test starts; the sources opt in with
InputPolicy(allow_private_hosts=True).
"""
import contextlib
import os
import socket
import time

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from tests.corpus import reencode
from tests.download_server import download_server
from transforms.core.elements import ClipSpec, Source
from transforms.deadletter import DeadLetter
from transforms.lib.safety import InputPolicy
from transforms.sources.download import DownloadSource

LOOPBACK = InputPolicy(allow_private_hosts=True)
DELAY_S = 3.0  # each server waits this long before answering a request
SOURCES = 24
HOSTS = 6  # loopback servers (host:port), SOURCES / HOSTS sources each
SERIAL_SOURCES = 6  # the one-at-a-time leg is timed on these and scaled to SOURCES (it is linear in them)


@pytest.fixture(scope='module')
def served(tmp_path_factory, media_dir):
  root = tmp_path_factory.mktemp('concurrency')
  reencode(str(media_dir / 'talking.mp4'), str(root / 'clip.mp4'), 1.0)
  return root


def run_bundle(fn: DownloadSource, sources) -> list:
  """One bundle as a Beam runner drives a DoFn: setup, start, process each element, finish, teardown."""
  fn.setup()
  fn.start_bundle()
  outputs = [output for source in sources for output in fn.process(source)]
  outputs += [windowed.value for windowed in fn.finish_bundle()]
  fn.teardown()
  return outputs


def _stage_seconds(tmp_path, served, concurrency: int, count: int):
  with contextlib.ExitStack() as stack:
    servers = [stack.enter_context(download_server(str(served))) for _ in range(HOSTS)]
    sources = [Source(f's{k}', f'{servers[k % HOSTS].url}/delay/{DELAY_S:g}/clip.mp4', (ClipSpec(f's{k}_0', 0),))
               for k in range(count)]
    fn = DownloadSource(str(tmp_path / f'work{concurrency}'), max_concurrent=concurrency, policy=LOOPBACK)
    started = time.monotonic()
    outputs = run_bundle(fn, sources)
    seconds = time.monotonic() - started
    most_per_host = max(server.most_active for server in servers)
  assert sorted(source.source_id for source, _ in outputs) == sorted(s.source_id for s in sources), outputs
  return seconds, most_per_host


def test_concurrent_downloads_are_several_times_faster(tmp_path, served):
  """24 sources on 6 hosts that each answer after 3 s: 16 at once (4 per host) against one at a time.

  The one-at-a-time leg runs 6 of the sources and is scaled by 24/6 (each source waits its full
  delay in turn, so its time is linear in the count), to keep the test near half a minute. A 1 s
  delay would make it cheaper but measure the probes' CPU (a child process per file, on 2 cores)
  more than the downloads.
  """
  measured, serial_most = _stage_seconds(tmp_path, served, 1, SERIAL_SOURCES)
  serial = measured * SOURCES / SERIAL_SOURCES
  parallel, parallel_most = _stage_seconds(tmp_path, served, 16, SOURCES)
  print(f'\ndownload stage, {SOURCES} sources, {DELAY_S:g} s server delay: concurrency 1 {serial:.1f} s '
        f'({measured:.1f} s measured for {SERIAL_SOURCES}), concurrency 16 {parallel:.1f} s, {serial / parallel:.1f}x')
  assert serial_most == 1 and parallel_most <= 4  # the per-host limit (default 4) held
  assert measured >= SERIAL_SOURCES * DELAY_S and serial / parallel >= 8


def closed_port() -> int:
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def test_400_unreachable_sources_are_all_accounted_quickly(tmp_path):
  """A refused port, default retries (3, with back-off): one `unreachable` reject per clip, through the
  DoFn wrapped in its dead letter under the DirectRunner, in well under two minutes."""
  port = closed_port()
  sources = [Source(f'u{k}', f'http://127.0.0.1:{port}/v{k}.mp4',
                    tuple(ClipSpec(f'u{k}_{c}', c) for c in range(1 + k % 2))) for k in range(400)]
  clips = [c.clip_id for s in sources for c in s.clips]
  started = time.monotonic()
  with TestPipeline() as p:
    out = (p | beam.Create(sources)
           | beam.ParDo(DeadLetter(DownloadSource(str(tmp_path), policy=LOOPBACK), 'download'))
           .with_outputs('rejects', main='media'))
    assert_that(out.rejects | beam.Map(lambda r: (r.id, r.reason)), equal_to([(c, 'unreachable') for c in clips]),
                label='rejects')
    assert_that(out.media, equal_to([]), label='media')
  seconds = time.monotonic() - started
  print(f'\n400 unreachable sources ({len(clips)} clips), default retries: {seconds:.1f} s on {os.cpu_count()} cores')
  assert seconds < 120


def test_an_unexpected_error_costs_only_its_clip(tmp_path, served):
  """A clip with a start and no end (a bug upstream: sections need both) breaks inside the pooled
  download: that clip is an `internal_error` reject, its sibling and the other sources come through,
  under DeadLetter in a real pipeline."""
  with download_server(str(served)) as server:
    broken = Source('b', f'{server.url}/clip.mp4', (ClipSpec('b_0', 0, 0.0, 0.8), ClipSpec('b_1', 1, 0.2, None)))
    good = [Source(f'g{k}', f'{server.url}/clip.mp4', (ClipSpec(f'g{k}_0', 0),)) for k in range(3)]
    with TestPipeline() as p:
      out = (p | beam.Create([broken, *good])
             | beam.ParDo(DeadLetter(DownloadSource(str(tmp_path), download_method='ytdlp', policy=LOOPBACK),
                                     'download')).with_outputs('rejects', main='media'))
      assert_that(out.rejects | beam.Map(lambda r: (r.id, r.stage, r.reason, 'TypeError' in r.detail)),
                  equal_to([('b_1', 'download', 'internal_error', True)]), label='rejects')
      assert_that(out.media | beam.Map(lambda kv: (kv[0].source_id, [c.clip_id for c in kv[0].clips])),
                  equal_to([('b', ['b_0']), ('g0', ['g0_0']), ('g1', ['g1_0']), ('g2', ['g2_0'])]), label='media')


def test_per_host_limit(tmp_path, served):
  """Eight sources on one host with room for 16 downloads: never more than 4 requests at that host at once."""
  with download_server(str(served)) as server:
    sources = [Source(f'h{k}', f'{server.url}/delay/0.5/clip.mp4', (ClipSpec(f'h{k}_0', 0),)) for k in range(8)]
    outputs = run_bundle(DownloadSource(str(tmp_path), max_concurrent=16, max_per_host=4, policy=LOOPBACK), sources)
    assert len(outputs) == 8 and server.most_active == 4
