"""The progress line: live on DirectRunner through its side channel, and from Beam metrics on remote runners
(`progress.follow`, here against Beam's local portable job service, whose metrics arrive at the end)."""
import io
import re
import sys
import time

import apache_beam as beam
import pytest
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.runners.runner import PipelineState

from beam_pipeline import progress
from tests.helpers import background, free_port
from transforms import resume
from transforms.core.elements import ClipSpec, Source

LINE = re.compile(r'clips (\d+)/(\d+) done.*: (\d+) rendered, (\d+) written, (\d+) rejected \| .*\| job (\w+)$')


@pytest.fixture(scope='module')
def job_service():
  """Beam's local portable job service on a loopback port (what a Flink job server is to a real cluster)."""
  port = free_port()
  with background([sys.executable, '-m', 'apache_beam.runners.portability.local_job_service_main',
                   f'--port={port}'], port, timeout=60):
    yield f'localhost:{port}'


def _slow(clip_id):
  time.sleep(0.4)  # long enough for the follower to poll the job while it runs
  return clip_id


def small_job(options: PipelineOptions, fail: bool = False) -> beam.Pipeline:
  """Six planned clips: five written and one rejected, counted the way the pipeline counts them."""
  p = beam.Pipeline(options=options)
  planned = p | 'Plan' >> beam.Create([f'clip{i}' for i in range(6)])
  done = planned | 'Work' >> beam.Map(_slow)
  if fail:
    done = done | 'Break' >> beam.Map(lambda clip_id: 1 / 0)
  progress.watch({'planned': planned, 'written': done | 'Keep' >> beam.Filter(lambda c: c != 'clip5'),
                  'rejected': done | 'Drop' >> beam.Filter(lambda c: c == 'clip5')})
  return p


def portable(endpoint: str) -> PipelineOptions:
  return PipelineOptions(['--runner=PortableRunner', f'--job_endpoint={endpoint}', '--environment_type=LOOPBACK'])


def test_follow_polls_a_running_portable_job_until_it_ends(job_service):
  result = small_job(portable(job_service)).run()
  out = io.StringIO()
  state = progress.follow(result, interval_s=0.2, out=out)
  result.wait_until_finish()
  lines = [LINE.search(line).groups() for line in out.getvalue().splitlines()]
  assert state == PipelineState.DONE
  assert len(lines) >= 3 and lines[0][-1] != 'DONE', lines  # polled while it ran
  # The service hands out metrics only at the end: the last line must not be the first (empty) answer.
  assert lines[-1] == ('6', '6', '0', '5', '1', 'DONE'), lines
  assert out.getvalue().rstrip().endswith('| finishing | job DONE')


def test_follow_returns_a_failed_state(job_service):
  result = small_job(portable(job_service), fail=True).run()
  out = io.StringIO()
  assert progress.follow(result, interval_s=0.2, out=out) == PipelineState.FAILED
  assert out.getvalue().rstrip().endswith('job FAILED')
  with pytest.raises(RuntimeError):
    result.wait_until_finish()


def test_follow_on_a_runner_that_returns_when_done():
  """DirectRunner's run() returns a finished job: one line, the final counts; `total_planned` overrides."""
  result = small_job(PipelineOptions(['--runner=DirectRunner'])).run()
  out = io.StringIO()
  assert progress.follow(result, total_planned=8, already=1, interval_s=60, out=out) == PipelineState.DONE
  (line,) = out.getvalue().splitlines()
  assert 'clips 6/7 done (+1 from earlier runs): 0 rendered, 5 written, 1 rejected' in line, line


def test_follow_leaves_out_clips_an_earlier_run_settled():
  """The resume step's counter of skipped clips: this run does not owe them, so they are not to do."""
  sources = [Source('a', '/in/a.mp4', (ClipSpec('a_0', 0), ClipSpec('a_1', 1))),
             Source('b', '/in/b.mp4', (ClipSpec('b_0', 0),))]
  p = beam.Pipeline(options=PipelineOptions(['--runner=DirectRunner']))
  read = p | 'Sources' >> beam.Create(sources)
  todo = read | 'Skip' >> resume.SkipDoneClips(p | 'Done' >> beam.Create(['a_1', 'b_0']))
  progress.watch({'planned': read | 'Planned' >> beam.FlatMap(lambda s: [c.clip_id for c in s.clips]),
                  'written': todo | 'Todo' >> beam.FlatMap(lambda s: [c.clip_id for c in s.clips])})
  out = io.StringIO()
  progress.follow(p.run(), out=out)
  assert 'clips 1/1 done (+2 from earlier runs): 0 rendered, 1 written, 0 rejected' in out.getvalue()


def test_progress_side_channel_counts_live():
  """CountEvents feeds both the live files and Beam counters; the line reads the files while running."""
  stream = io.StringIO()
  with progress.ProgressLine(already=1, stream=stream, interval_s=0.05) as line:
    with beam.Pipeline() as p:
      ids = p | beam.Create(['a', 'b', 'c', 'd'])
      progress.watch({'planned': ids, 'rendered': ids | beam.Filter(lambda x: x != 'd')}, line.directory)
    assert line.counts()['planned'] == 4 and line.counts()['rendered'] == 3
    counters = {c.key.metric.name: c.committed
                for c in p.result.metrics().query(MetricsFilter().with_namespace('progress'))['counters']}
    assert counters == {'planned': 4, 'rendered': 3}
    line.finish(p.result)
  assert re.search(r'clips 3/3 done \(\+1 from earlier runs\): 3 rendered, 0 written, 0 rejected \| '
                   r'[\d.]+ clips/min \| finishing$', stream.getvalue().splitlines()[-1]), stream.getvalue()


def test_line_counts_rate_eta_and_clips_earlier_runs_settled():
  assert progress.format_line({'planned': 10, 'rendered': 2, 'rejected': 2}, 0, 40.0).endswith(
      'clips 4/10 done: 2 rendered, 0 written, 2 rejected | 6.0 clips/min | ETA 0:01:00')
  assert 'clips 0/4 done (+6 from earlier runs)' in progress.format_line({'planned': 10, 'skipped': 6}, 0, 5.0)
  assert progress.format_line({'planned': 3}, 0, 5.0).endswith('| ETA --')


@pytest.mark.parametrize('runner, live', [('DirectRunner', True), ('FnApiRunner', True), ('PortableRunner', False),
                                          ('DataflowRunner', False)])
def test_live_side_channel_only_where_workers_share_this_machine_and_run_returns_at_the_end(runner, live):
  assert progress.wanted(PipelineOptions([f'--runner={runner}']), no_progress=False) == live
  assert not progress.wanted(PipelineOptions([f'--runner={runner}']), no_progress=True)
