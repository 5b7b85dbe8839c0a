"""The local runner uses every core by default; Beam's --direct_num_workers and --direct_running_mode override.
(A default-mode CLI run's summary and progress line: tests/test_report.py, test_progress_line_from_beam_metrics.)"""
from __future__ import annotations

import pytest
from apache_beam.options.pipeline_options import DirectOptions

from beam_pipeline import local_runner
from beam_pipeline.__main__ import prepare


def workers_and_mode(tmp_path, *flags):
  options, _ = prepare([f'--input={tmp_path}/in.jsonl', f'--output={tmp_path}/out', '--dry_run=true', *flags])
  direct = options.view_as(DirectOptions)
  return direct.direct_num_workers, direct.direct_running_mode


def test_the_default_names_every_usable_core(tmp_path):
  cores = local_runner.usable_cores()
  workers, mode = workers_and_mode(tmp_path)
  assert (workers, mode) == local_runner.choose(cores, local_runner.available_mib())
  if cores <= local_runner.THREADS_UP_TO:
    assert workers == cores and mode == ('in_memory' if cores == 1 else 'multi_threading')


@pytest.mark.parametrize('flags, expected', [
    (('--direct_num_workers=1',), (1, 'in_memory')),
    (('--direct_num_workers=3',), (3, 'multi_threading')),
    (('--direct_num_workers=3', '--direct_running_mode=multi_processing'), (3, 'multi_processing')),
    (('--direct_running_mode=in_memory',), (1, 'in_memory')),
], ids=['one', 'three', 'three-processes', 'in-memory'])
def test_beam_flags_override(tmp_path, flags, expected):
  assert workers_and_mode(tmp_path, *flags) == expected


def test_remote_runners_are_left_alone(tmp_path):
  options, _ = prepare(['--runner=PortableRunner', '--environment_type=LOOPBACK', '--job_endpoint=localhost:1',
                        f'--input={tmp_path}/in.jsonl', f'--output={tmp_path}/out', '--dry_run=true'])
  assert options.view_as(DirectOptions).direct_num_workers == 1


def test_choose():
  gib = 1024
  assert local_runner.choose(1, 8 * gib) == (1, 'in_memory')
  assert local_runner.choose(2, 8 * gib) == (2, 'multi_threading')
  assert local_runner.choose(64, 256 * gib) == (64, 'multi_processing')
  # processes the free memory cannot hold are not started, unless the user asks for them
  assert local_runner.choose(64, 12 * gib) == (12 * gib // local_runner.WORKER_PROCESS_MIB, 'multi_processing')
  assert local_runner.choose(64, 12 * gib, workers=64) == (64, 'multi_processing')
  assert local_runner.choose(8, None, workers=0) == (8, 'multi_processing')
  assert local_runner.choose(8, None, mode='multi_threading') == (8, 'multi_threading')
