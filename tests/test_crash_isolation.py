"""A decoder that crashes the process (segfault) on one hostile file costs only that file: probing runs in a
child process, and a clip whose render killed its worker twice (the second time alone) is rejected
`decoder_crash`; a clip that was only beside it, or on a worker killed from outside, is rendered again."""
import concurrent.futures
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import time

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from tests.helpers import REPO
from tests.test_clip_geometry import write_disc_video
from transforms.core.elements import ClipSpec, ClipTask, MediaFile, Source
from transforms import crash_guard
from transforms.crash_guard import CrashGuard
from transforms.incremental import PERMANENT_REASONS
from transforms.lib import probe as probe_module
from transforms.lib.probe import ProbeError, probe
from transforms.render import RenderClips
from transforms.sources.download import DownloadSource

# Loaded by every Python started with this directory on PYTHONPATH (the probe children of the test): opening
# a file named crash*.mp4 reads address 0 (a real SIGSEGV); hang*.mp4 blocks as a stuck decoder would.
HOSTILE_DECODER = '''
import ctypes, fnmatch, os, time
import av
_open = av.open

def _hostile_open(file, *args, **kwargs):
  name = os.path.basename(file) if isinstance(file, str) else ''
  if fnmatch.fnmatch(name, 'crash*.mp4'):
    ctypes.string_at(0)
  if fnmatch.fnmatch(name, 'hang*.mp4'):
    time.sleep(600)
  return _open(file, *args, **kwargs)

av.open = _hostile_open
'''


@pytest.fixture
def hostile_decoder(tmp_path, monkeypatch):
  hooks = tmp_path / 'hooks'
  hooks.mkdir()
  (hooks / 'sitecustomize.py').write_text(HOSTILE_DECODER)
  monkeypatch.setenv('PYTHONPATH', str(hooks))


@pytest.fixture(scope='module')
def video(tmp_path_factory):
  return write_disc_video(tmp_path_factory.mktemp('crash') / 'good.mp4', 320, 240, (160, 120), 40, seconds=2.0)


def test_a_decoder_crash_while_probing_rejects_only_that_file(tmp_path, video, hostile_decoder):
  shutil.copy(video, tmp_path / 'crash_1.mp4')
  shutil.copy(video, tmp_path / 'fine.mp4')
  sources = [Source(name, str(tmp_path / f'{name}.mp4'), (ClipSpec(f'{name}_0', 0),)) for name in ('crash_1', 'fine')]
  with TestPipeline() as p:
    out = (p | beam.Create(sources)
           | beam.ParDo(DownloadSource(str(tmp_path / 'work'))).with_outputs('rejects', main='media'))
    assert_that(out.rejects | beam.Map(lambda r: (r.id, r.stage, r.reason, 'SIGSEGV' in r.detail)),
                equal_to([('crash_1_0', 'probe', 'decoder_crash', True)]), label='OneCrashReject')
    assert_that(out.media | beam.Map(lambda found: (found[0].source_id, found[1][0].info.width)),
                equal_to([('fine', 320)]), label='OneGoodSource')
  assert 'decoder_crash' not in PERMANENT_REASONS  # a new run tries the file again


def test_a_decoder_stuck_in_one_call_is_killed_at_the_time_limit(tmp_path, video, hostile_decoder, monkeypatch):
  shutil.copy(video, tmp_path / 'hang.mp4')
  monkeypatch.setattr(probe_module, 'CHILD_START_S', 2.0)
  began = time.monotonic()
  with pytest.raises(ProbeError) as error:
    probe(str(tmp_path / 'hang.mp4'), timeout_s=1.0)
  assert error.value.reason == 'probe_timeout'
  assert time.monotonic() - began < 60  # the decoder blocks for 600 s


# ----------------------------------------------------------------------------- render markers

def render_fn(work_dir):
  fn = RenderClips(str(work_dir), 64, 25.0, 18, 'ultrafast', run_id='run-1')
  fn.crash_guard.stale_s = 1.5  # a dead worker's marker counts as a death after 1.5 s without a heartbeat
  return fn


def clip_task(path, clip_id='good_0', start=0.0, end=1.0):
  return ClipTask(clip_id, 'good', path, MediaFile(path, probe(path)), start, end, window=(40, 0, 240, 240))


def outcomes(outputs):
  """'rendered' for a rendered clip, the reason for a reject."""
  return [o.value.reason if getattr(o, 'tag', None) == 'rejects' else type(o).__name__ for o in outputs]


def markers(work_dir):
  folder = work_dir / 'markers' / 'run-1'
  return sorted(os.listdir(folder)) if folder.exists() else []


def test_a_render_leaves_no_marker_whether_it_is_kept_or_rejected(tmp_path, video):
  fn = render_fn(tmp_path / 'work')
  fn.setup()
  assert outcomes(fn.process(clip_task(video))) == ['RenderedClip']
  assert outcomes(fn.process(clip_task(video, 'late_0', 5.0, 6.0))) == ['no_frames']  # nothing there
  assert markers(tmp_path / 'work') == []


CRASHING_RENDER = '''
import ctypes, pickle, sys
import av
fn, task = pickle.load(open(sys.argv[1], 'rb'))
av.open = lambda *args, **kwargs: ctypes.string_at(0)  # the decoder segfaults on this clip
fn.setup()
list(fn.process(task))
'''

# Two clips render at once in one worker; the culprit's decoder segfaults while the other is still decoding.
CRASH_BESIDE = '''
import ctypes, pickle, sys, threading
import av
fn, good, culprit = pickle.load(open(sys.argv[1], 'rb'))
decoding = threading.Event()
real_open = av.open

def hostile_open(file, *args, **kwargs):
  if 'culprit' in str(file):
    decoding.wait(60)
    ctypes.string_at(0)
  decoding.set()
  threading.Event().wait(60)  # the good clip is still in flight when its neighbour kills the process
  return real_open(file, *args, **kwargs)

av.open = hostile_open
fn.setup()
threads = [threading.Thread(target=lambda task=task: list(fn.process(task))) for task in (good, culprit)]
for thread in threads:
  thread.start()
for thread in threads:
  thread.join()
'''

# The worker is killed from outside while it renders (the kernel's OOM killer, a preemption): SIGKILL.
KILLED_RENDER = '''
import os, pickle, signal, sys
import av
fn, task = pickle.load(open(sys.argv[1], 'rb'))
av.open = lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL)
fn.setup()
list(fn.process(task))
'''


def die_in_a_worker(tmp_path, script, *elements):
  """Run `script` on pickled (RenderClips, tasks...) in a child process that dies as a worker would."""
  with open(tmp_path / 'element.pkl', 'wb') as handle:
    pickle.dump(elements, handle)
  worker = subprocess.run([sys.executable, '-c', textwrap.dedent(script), str(tmp_path / 'element.pkl')],
                          cwd=REPO, capture_output=True, timeout=120, check=False)
  assert worker.returncode < 0, worker.stderr.decode()[-2000:]  # killed by the signal, as a worker would be


def test_a_clip_whose_render_killed_the_worker_twice_is_rejected(tmp_path, video):
  fn, task = render_fn(tmp_path / 'work'), clip_task(video)
  die_in_a_worker(tmp_path, CRASHING_RENDER, fn, task)
  assert markers(tmp_path / 'work') == ['good_0']
  die_in_a_worker(tmp_path, CRASHING_RENDER, fn, task)  # the retry: alone in its worker, and it crashes again
  (first, second) = fn.crash_guard.deaths('good_0')
  assert (first.alone, second.alone) == (False, True)
  fn.setup()
  for _ in range(2):  # the runner's retry, and a retry of that
    (output,) = list(fn.process(task))
    assert (output.tag, output.value.reason, output.value.stage) == ('rejects', 'decoder_crash', 'render')
    assert 'the last 2 attempts' in output.value.detail and 'rendering alone' in output.value.detail
  assert markers(tmp_path / 'work') == ['good_0']
  other_run = RenderClips(str(tmp_path / 'work'), 64, 25.0, 18, 'ultrafast', run_id='run-2')
  assert outcomes(other_run.process(task)) == ['RenderedClip']  # transient: a new run renders it


def test_a_clip_beside_a_crash_is_rendered_again_and_kept_and_the_culprit_is_rejected(tmp_path, video):
  fn = render_fn(tmp_path / 'work')
  culprit_file = str(shutil.copy(video, tmp_path / 'culprit.mp4'))
  good, culprit = clip_task(video), clip_task(culprit_file, 'culprit_0')
  die_in_a_worker(tmp_path, CRASH_BESIDE, fn, good, culprit)
  assert markers(tmp_path / 'work') == ['culprit_0', 'good_0']  # both were in flight: either may be the cause
  fn.setup()
  (kept,) = list(fn.process(good))  # retried alone: it comes through, and says what happened
  assert type(kept).__name__ == 'RenderedClip' and kept.num_frames == 25
  assert any('worker died' in note and 'not the cause' in note for note in kept.task.notes)
  die_in_a_worker(tmp_path, CRASHING_RENDER, fn, culprit)  # the culprit, alone, kills its worker again
  (rejected,) = list(fn.process(culprit))
  assert rejected.value.reason == 'decoder_crash'
  assert markers(tmp_path / 'work') == ['culprit_0']


def test_a_worker_killed_from_outside_costs_its_clips_nothing(tmp_path, video):
  """SIGKILL (the OOM killer, a preempted VM): the clip is rendered again and kept."""
  fn, task = render_fn(tmp_path / 'work'), clip_task(video)
  die_in_a_worker(tmp_path, KILLED_RENDER, fn, task)
  (death,) = fn.crash_guard.deaths('good_0')
  assert not death.alone and death.pid > 0
  fn.setup()
  assert outcomes(fn.process(task)) == ['RenderedClip'] and markers(tmp_path / 'work') == []


def test_a_clip_that_was_in_flight_at_a_death_renders_alone(tmp_path, video):
  """No other render of the process runs beside it (a second death can then only be its own), and a second
  attempt of it that runs at the same time waits for the first instead of counting it as a death."""
  fn = render_fn(tmp_path / 'work')
  suspect, other = clip_task(video, 'suspect_0'), clip_task(video, 'other_0')
  dead = {'clip_id': 'suspect_0', 'host': 'gone', 'pid': 1, 'beat': time.time() - 600, 'alone': False,
          'beside': [], 'deaths': []}  # as a worker that died ten minutes ago left it
  os.makedirs(tmp_path / 'work' / 'markers' / 'run-1')
  (tmp_path / 'work' / 'markers' / 'run-1' / 'suspect_0').write_text(json.dumps(dead))
  fn.setup()
  seen = []
  render = fn._render  # pylint: disable=protected-access

  def watched(task, tmp):
    state = crash_guard._PROCESS  # pylint: disable=protected-access
    seen.append((state._alone, dict(state.in_flight)))  # pylint: disable=protected-access
    yield from render(task, tmp)

  fn._render = watched  # pylint: disable=protected-access
  with concurrent.futures.ThreadPoolExecutor(4) as pool:
    results = list(pool.map(lambda task: outcomes(fn.process(task)), [suspect, other, suspect, other]))
  assert results == [['RenderedClip']] * 4
  alone = [in_flight for was_alone, in_flight in seen if was_alone]
  assert alone and all(in_flight == {'suspect_0': 1} for in_flight in alone)
  assert markers(tmp_path / 'work') == []


def test_marker_names_stay_plain_files(tmp_path):
  guard = CrashGuard(str(tmp_path), 'run-1')
  assert guard.marker('interview_part1_s0').endswith(os.path.join('run-1', 'interview_part1_s0'))
  odd = guard.marker('../../etc/passwd')
  assert os.path.dirname(odd) == os.path.join(str(tmp_path), 'markers', 'run-1') and '..' not in os.path.basename(odd)
