"""Faults: transient download failures are retried and recovered, one clip's crash stays one clip's
reject (dead letter per element), and every download, probe, render and yt-dlp call has a time limit."""
import dataclasses
import hashlib
import os
import time

import apache_beam as beam
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from tests.corpus import reencode
from tests.helpers import media_server, request_log
from transforms.core.elements import ClipSpec, ClipTask, MediaFile, RenderedClip, Source
from transforms.deadletter import DeadLetter, owed_clips, settled_clips
from transforms.lib.probe import ProbeError, probe
from transforms.lib.safety import InputPolicy
from transforms.plan import PlanClips
from transforms.render import RenderClips
from transforms.sources.download import DownloadError, DownloadSource, http_download, ytdlp_download

LOOPBACK = InputPolicy(allow_private_hosts=True)  # these tests serve on 127.0.0.1


@pytest.fixture(scope='module')
def short_clip(tmp_path_factory, media_dir):
  root = tmp_path_factory.mktemp('faults')
  return reencode(str(media_dir / 'talking.mp4'), str(root / 'short.mp4'), 1.2)


def _sha(path):
  with open(path, 'rb') as handle:
    return hashlib.sha256(handle.read()).hexdigest()


@pytest.mark.parametrize('mode', ['flaky', 'cut'])
def test_transient_failures_are_retried_and_all_recovered(tmp_path, short_clip, mode):
  """`flaky`: a third of all requests answer 500. `cut`: a third drop the connection half-way (Range resumes)."""
  root = tmp_path / 'srv'
  root.mkdir()
  names = [f'v{i}.mp4' for i in range(9)]
  for name in names:
    os.link(short_clip, root / name)
  with media_server(str(root), fail_every=3) as server:
    fn = DownloadSource(str(tmp_path / 'work'), retries=3, timeout_s=60, policy=LOOPBACK)
    results = [fn.download(Source(f's{i}', f'{server}/{mode}/{name}', (ClipSpec(f's{i}_0', 0),)))
               for i, name in enumerate(names)]
    log = [entry for entry in request_log(server) if entry[1].startswith(f'/{mode}/')]
  assert all(len(r) == 1 and not isinstance(r[0], beam.pvalue.TaggedOutput) for r in results)
  assert all(_sha(r[0][1][0].uri) == _sha(short_clip) for r in results)
  failures = len(log) - len(names)
  assert 0.25 <= failures / len(log) <= 0.4, (failures, len(log))  # ~30% of requests failed, all recovered
  if mode == 'cut':
    assert sum(1 for _, _, rng in log if rng and rng != 'bytes=0-') == failures  # each cut resumed with Range


def test_retries_give_up_with_the_reason(tmp_path):
  with media_server(str(tmp_path)) as server:
    started = time.monotonic()
    out = DownloadSource(str(tmp_path / 'work'), retries=2, policy=LOOPBACK).download(
        Source('s', f'{server}/status/503/x.mp4', (ClipSpec('s_0', 0), ClipSpec('s_1', 1))))
    tries = [p for _, p, _ in request_log(server) if p.startswith('/status/')]
  assert [(o.value.id, o.value.reason) for o in out] == [('s_0', 'http_error'), ('s_1', 'http_error')]
  assert len(tries) == 3 and time.monotonic() - started < 10


def _task(path, clip_id, window):
  info = probe(path)
  return ClipTask(clip_id, 'src', path, MediaFile(path, info), 0.0, 1.0, window=window)


def test_one_crashing_clip_is_a_reject_and_its_bundle_goes_on(tmp_path, short_clip):
  """A task without a window makes rendering raise TypeError (a bug, not a media fault): without the
  dead letter it fails the pipeline; with it, that clip is an internal_error reject and the other renders."""
  good, broken = _task(short_clip, 'good_0', (0, 0, 640, 480)), _task(short_clip, 'broken_0', None)
  render = RenderClips(str(tmp_path / 'work'), 64, 25, 30, 'ultrafast')
  with pytest.raises(TypeError):
    list(render.process(broken))
  with TestPipeline() as p:
    out = (p | beam.Create([broken, good])
           | beam.ParDo(DeadLetter(render, 'render')).with_outputs('rejects', main='rendered'))
    assert_that(out.rendered | beam.Map(lambda clip: (clip.task.clip_id, clip.num_frames)),
                equal_to([('good_0', 25)]), label='rendered')
    assert_that(out.rejects | beam.Map(lambda r: (r.id, r.stage, r.reason, 'TypeError' in r.detail)),
                equal_to([('broken_0', 'render', 'internal_error', True)]), label='rejects')


def test_dead_letter_rejects_only_the_clips_still_owed(short_clip):
  """PlanClips crashes on a source whose media list is empty: each of its clips becomes one reject."""
  source = Source('s', short_clip, (ClipSpec('s_0', 0, 0.0, 1.0), ClipSpec('s_1', 1, 0.2, 1.1)))
  out = list(DeadLetter(PlanClips(), 'plan').process((source, [])))
  assert [(o.value.id, o.value.reason, o.value.stage) for o in out] == [
      ('s_0', 'internal_error', 'plan'), ('s_1', 'internal_error', 'plan')]


def test_dead_letter_reraises_what_it_cannot_attribute():
  with pytest.raises(ZeroDivisionError):
    list(DeadLetter(beam.Map(lambda x: 1 / 0).fn, 'map').process(3))


def test_ytdlp_is_killed_at_its_time_limit(tmp_path):
  (tmp_path / 'page').write_bytes(b'<html>' * 1000)
  with media_server(str(tmp_path), stall_s=60) as server:
    url = f'{server}/stall/page?unique={os.getpid()}'
    started = time.monotonic()
    with pytest.raises(DownloadError) as error:
      ytdlp_download(url, str(tmp_path / 'x'), None, None, 10**8, 30, time.monotonic() + 3, policy=LOOPBACK)
    elapsed = time.monotonic() - started
  assert error.value.reason == 'download_timeout' and elapsed < 30  # the stall lasts 60 s
  leftovers = []
  for pid in os.listdir('/proc'):
    try:
      with open(f'/proc/{pid}/cmdline', 'rb') as handle:
        if url.encode() in handle.read():
          leftovers.append(pid)
    except (FileNotFoundError, ProcessLookupError, PermissionError, NotADirectoryError):
      continue
  assert leftovers == []


def test_probe_and_render_time_limits(tmp_path, short_clip):
  with pytest.raises(ProbeError) as error:
    probe(short_clip, timeout_s=1e-9)
  assert error.value.reason == 'probe_timeout'
  render = RenderClips(str(tmp_path), 64, 25, 30, 'ultrafast', max_render_s=1e-9)
  out = [o for o in render.process(_task(short_clip, 'c_0', (0, 0, 640, 480)))
         if isinstance(o, beam.pvalue.TaggedOutput)]
  assert [(o.tag, o.value.reason) for o in out] == [('rejects', 'render_timeout')]


def test_too_many_pixels_is_refused_before_decoding(short_clip):
  with pytest.raises(ProbeError) as error:
    probe(short_clip, max_pixels=640 * 480 - 1)
  assert error.value.reason == 'too_many_pixels'
  assert probe(short_clip, max_pixels=640 * 480).width == 640


def test_dead_letter_knows_analysed_clips(short_clip):
  """Outputs that carry a clip (like the filter's analysis) settle it; elements that carry one owe it."""
  task = _task(short_clip, 'a_0', (0, 0, 640, 480))
  clip = RenderedClip(task=task, mp4_uri='x.mp4', wav=b'', num_frames=25, fps=25.0, size=64)

  class Analysed:
    def __init__(self, clip):
      self.clip = clip

  assert list(settled_clips(Analysed(clip))) == ['a_0']
  assert owed_clips(('a_0', {'rendered': [clip], 'faces': [(0, None)]})) == [('a_0', 'src')]
  assert owed_clips(Analysed(clip)) == [('a_0', 'src')]


def test_dead_letter_rejects_a_failed_group_with_each_clips_planned_id(short_clip):
  """A per-subject element (a GroupByKey result) that fails owes every clip of the group, each rejected with the
  planned clip it is a piece of; the clips it settled before failing are left alone."""
  pieces = [dataclasses.replace(_task(short_clip, f'a_0_s{ms}', (0, 0, 640, 480)), planned_id='a_0')
            for ms in (0, 5000)]
  other = _task(short_clip, 'b_0', (0, 0, 640, 480))

  class FailsAfterOne(beam.DoFn):
    def process(self, element):
      yield element[1][0]
      raise RuntimeError('disk full')

  out = list(DeadLetter(FailsAfterOne(), 'write').process(('subject', pieces + [other])))
  assert out[0] is pieces[0]
  assert [(o.value.id, o.value.reason, o.value.planned) for o in out[1:]] == [
      ('a_0_s5000', 'internal_error', 'a_0'), ('b_0', 'internal_error', 'b_0')]
  assert 'RuntimeError: disk full (at test_faults.py:' in out[1].value.detail


def test_urls_with_spaces_and_non_ascii_are_encoded(tmp_path, short_clip):
  os.link(short_clip, tmp_path / 'a b \u00e9.mp4')
  with media_server(str(tmp_path)) as server:
    http_download(f'{server}/a b \u00e9.mp4', str(tmp_path / 'raw.mp4'), 10**8, 5, 1e18, LOOPBACK)
    http_download(f'{server}/a%20b%20%C3%A9.mp4', str(tmp_path / 'quoted.mp4'), 10**8, 5, 1e18, LOOPBACK)
    paths = [p for _, p, _ in request_log(server)]
  assert _sha(tmp_path / 'raw.mp4') == _sha(tmp_path / 'quoted.mp4') == _sha(short_clip)
  assert paths == ['/a%20b%20%C3%A9.mp4'] * 2
