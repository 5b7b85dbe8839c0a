"""Download stage wall times: concurrent against one at a time, dead hosts, and the bad-input corpus.

  python bench/downloads.py [--skip_corpus]

A script, not a test (tests/test_download_concurrency.py and tests/test_bad_inputs.py check what happens; this
measures how long it takes). It prints a table and writes a "Downloads" section into bench/results.md, keeping
the rest of the file. Every server is a loopback server started here; nothing leaves the machine.
- concurrency: 24 sources on 6 loopback hosts that each answer after 3 s, through one DownloadSource bundle at
  concurrency 16 (at most 4 per host) and at concurrency 1 (timed on 6 sources, scaled to 24: it is linear);
- unreachable: 400 sources (600 clips) on a refused port, default retries, through DeadLetter(DownloadSource)
  under the DirectRunner;
- corpus: the bad-input corpus of tests/corpus.py (every case a reason) through the CLI, as the test runs it.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import socket
import sys
import tempfile
import time
from typing import Dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from bench.run import machine, replace_section  # noqa: E402
from beam_pipeline.demo import VideoSpec, write_video  # noqa: E402
from tests.corpus import build as build_corpus, reencode  # noqa: E402
from tests.download_server import download_server  # noqa: E402
from tests.helpers import media_server, run_bundle, run_cli  # noqa: E402
from transforms.core.elements import ClipSpec, Source  # noqa: E402
from transforms.lib.safety import InputPolicy  # noqa: E402
from transforms.sources.download import DownloadSource  # noqa: E402

HEADING = '## Downloads'
LOOPBACK = InputPolicy(allow_private_hosts=True)
DELAY_S, SOURCES, HOSTS, SERIAL_SOURCES = 3.0, 24, 6, 6


def concurrency(root: str) -> Dict[str, float]:
  clip = os.path.join(root, 'served', 'clip.mp4')
  os.makedirs(os.path.dirname(clip))
  talking = os.path.join(root, 'talking.mp4')
  write_video(talking, VideoSpec(duration=2.0))
  reencode(talking, clip, 1.0)
  result = {}
  for concurrent, count in ((1, SERIAL_SOURCES), (16, SOURCES)):
    with contextlib.ExitStack() as stack:
      servers = [stack.enter_context(download_server(os.path.dirname(clip))) for _ in range(HOSTS)]
      sources = [Source(f's{k}', f'{servers[k % HOSTS].url}/delay/{DELAY_S:g}/clip.mp4', (ClipSpec(f's{k}_0', 0),))
                 for k in range(count)]
      started = time.monotonic()
      outputs = run_bundle(DownloadSource(os.path.join(root, f'work{concurrent}'), max_concurrent=concurrent,
                                       policy=LOOPBACK), sources)
      seconds = time.monotonic() - started
      assert len(outputs) == count, outputs
      result[f'c{concurrent}_s'] = seconds * SOURCES / count
      result[f'c{concurrent}_per_host'] = max(server.most_active for server in servers)
  result['speedup'] = result['c1_s'] / result['c16_s']
  return result


def unreachable(root: str) -> float:
  import apache_beam as beam
  from apache_beam.testing.test_pipeline import TestPipeline
  from apache_beam.testing.util import assert_that, equal_to
  from beam_pipeline.__main__ import LOCAL_RUNNER
  from transforms.deadletter import DeadLetter
  with socket.socket() as sock:
    sock.bind(('127.0.0.1', 0))
    port = sock.getsockname()[1]
  sources = [Source(f'u{k}', f'http://127.0.0.1:{port}/v{k}.mp4',
                    tuple(ClipSpec(f'u{k}_{c}', c) for c in range(1 + k % 2))) for k in range(400)]
  clips = [c.clip_id for s in sources for c in s.clips]
  started = time.monotonic()
  with TestPipeline(runner=LOCAL_RUNNER) as p:
    out = (p | beam.Create(sources)
           | beam.ParDo(DeadLetter(DownloadSource(os.path.join(root, 'dead'), policy=LOOPBACK), 'download'))
           .with_outputs('rejects', main='media'))
    assert_that(out.rejects | beam.Map(lambda r: (r.id, r.reason)), equal_to([(c, 'unreachable') for c in clips]))
  return time.monotonic() - started


def corpus(root: str) -> float:
  media = os.path.join(root, 'media')
  os.makedirs(media)
  write_video(os.path.join(media, 'talking.mp4'), VideoSpec(duration=8.0))
  with media_server(root, stall_s=15) as server:
    manifest, _ = build_corpus(root, os.path.join(media, 'talking.mp4'), server)
    started = time.monotonic()
    run_cli(f'--input={manifest}', f'--output={root}/out', f'--work_dir={root}/work', f'--allowed_roots={root}',
            '--allow_private_hosts', '--download_retries=1', '--download_timeout_s=4', '--max_download_mb=2.5',
            '--max_duration_s=30', '--size=256', '--score_only', '--no_progress', '--no_report')
    return time.monotonic() - started


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--skip_corpus', action='store_true', help='Leave out the bad-input corpus run (~2 min).')
  args = parser.parse_args(argv)
  box = machine()
  with tempfile.TemporaryDirectory(prefix='bench-downloads-') as root:
    timed = concurrency(os.path.join(root, 'c'))
    dead_s = unreachable(root)
    corpus_s = None if args.skip_corpus else corpus(os.path.join(root, 'corpus'))
  load_after = ' '.join(f'{v:.1f}' for v in os.getloadavg())
  rows = [
      '| what | wall time |', '| --- | --- |',
      f'| {SOURCES} sources, {HOSTS} hosts answering after {DELAY_S:g} s, concurrency 1 (timed on {SERIAL_SOURCES}, '
      f'scaled) | {timed["c1_s"]:.1f} s |',
      f'| the same at concurrency 16 (at most {timed["c16_per_host"]} per host) | {timed["c16_s"]:.1f} s '
      f'({timed["speedup"]:.1f}x) |',
      f'| 400 sources (600 clips) on a refused port, default retries, DirectRunner | {dead_s:.1f} s |',
  ]
  if corpus_s is not None:
    rows.append(f'| the bad-input corpus (tests/corpus.py) through the CLI | {corpus_s:.1f} s |')
  lines = [f'Measured {datetime.date.today()} by `python bench/downloads.py` on {box["cpu"]}, {box["cores"]} cores: '
           f'load average at the start {box["load"]}, at the end {load_after}.', ''] + rows
  print('\n'.join(lines))
  replace_section(os.path.join(REPO, 'bench', 'results.md'), HEADING, [HEADING, ''] + lines)


if __name__ == '__main__':
  main()
