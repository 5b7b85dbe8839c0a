"""Concurrent downloads inside one worker: overlap, per-host limit, accounting under Beam (wall times:
bench/downloads.py).

Every server here is a loopback server the test starts; the sources opt in with
InputPolicy(allow_private_hosts=True).
"""
import socket

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from tests.corpus import reencode
from tests.download_server import download_server
from tests.helpers import run_bundle
from transforms.core.elements import ClipSpec, Source
from transforms.deadletter import DeadLetter
from transforms.lib.safety import InputPolicy
from transforms.sources.download import DownloadSource

LOOPBACK = InputPolicy(allow_private_hosts=True)


@pytest.fixture(scope='module')
def served(tmp_path_factory, media_dir):
  root = tmp_path_factory.mktemp('concurrency')
  reencode(str(media_dir / 'talking.mp4'), str(root / 'clip.mp4'), 1.0)
  return root


def closed_port() -> int:
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    return sock.getsockname()[1]


def test_400_unreachable_sources_are_all_accounted(tmp_path):
  """A refused port, default retries (3, with back-off): one `unreachable` reject per clip, through the
  DoFn wrapped in its dead letter under the DirectRunner (how long it takes: bench/downloads.py)."""
  port = closed_port()
  sources = [Source(f'u{k}', f'http://127.0.0.1:{port}/v{k}.mp4',
                    tuple(ClipSpec(f'u{k}_{c}', c) for c in range(1 + k % 2))) for k in range(400)]
  clips = [c.clip_id for s in sources for c in s.clips]
  with TestPipeline() as p:
    out = (p | beam.Create(sources)
           | beam.ParDo(DeadLetter(DownloadSource(str(tmp_path), policy=LOOPBACK), 'download'))
           .with_outputs('rejects', main='media'))
    assert_that(out.rejects | beam.Map(lambda r: (r.id, r.reason)), equal_to([(c, 'unreachable') for c in clips]),
                label='rejects')
    assert_that(out.media, equal_to([]), label='media')


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


@pytest.mark.parametrize('concurrent,most', [(16, 4), (1, 1)])
def test_downloads_overlap_up_to_the_per_host_limit(tmp_path, served, concurrent, most):
  """Eight sources on one host that answers after 2 s: with room for 16 downloads, exactly 4 requests at that
  host at once (they overlap, and the per-host limit holds); with room for one, one at a time. How much faster
  overlapping is: bench/downloads.py."""
  with download_server(str(served)) as server:
    sources = [Source(f'h{k}', f'{server.url}/delay/2/clip.mp4', (ClipSpec(f'h{k}_0', 0),)) for k in range(8)]
    outputs = run_bundle(DownloadSource(str(tmp_path), max_concurrent=concurrent, max_per_host=4, policy=LOOPBACK),
                         sources)
    assert len(outputs) == 8 and server.most_active == most
