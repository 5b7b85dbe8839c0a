"""hdtf's `--layout=files`: HDTF's own clip folder, read the way LatentSync's UNetDataset lists and opens it;
a rerun that resumes, and one clip's publish run twice at once and again as a retry."""
import io
import json
import os
import pickle
import threading

import apache_beam as beam
import av
import numpy as np
import pytest

from beam_pipeline import report
from beam_pipeline.__main__ import prepare, run
from beam_pipeline.recipes import hdtf
from tests.helpers import leftovers, load_npy, read_jsonl, run_cli
from transforms.deadletter import DeadLetter
from transforms.writers import folders

QUIET = ('--no_progress', '--no_report')


@pytest.fixture(scope='module')
def files_run(tmp_path_factory, media_dir):
  """Two 2 s clips and one past the source's end, at --size=256 with 16 kHz audio; the CLI's run() in this
  process, so the writer's input element (and the rendered clip it deletes) can be kept for the retry tests."""
  root = tmp_path_factory.mktemp('hdtf_files')
  manifest = root / 'in.jsonl'
  manifest.write_text(json.dumps({'id': 'talk', 'url': str(media_dir / 'talking.mp4'),
                                  'clips': [[0, 2], [2, 4], [20, 22]]}) + '\n')
  args = [f'--input={manifest}', f'--output={root / "out"}', f'--work_dir={root / "work"}', '--layout=files',
          '--audio_16k', '--size=256', *QUIET]
  captured = []
  original = hdtf.WriteClipFiles.process

  def process(self, analysis):
    with open(analysis.clip.mp4_uri, 'rb') as rendered:
      captured.append((pickle.dumps(analysis), rendered.read()))
    return original(self, analysis)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(hdtf.WriteClipFiles, 'process', process)
    run(args)
  return {'output': str(root / 'out'), 'work': str(root / 'work'), 'args': args, 'captured': captured}


def test_latentsync_lists_and_opens_the_clips(files_run):
  output = files_run['output']
  assert leftovers(output, files_run['work']) == []  # no beam-temp-* or emptied folder
  folder = os.path.join(output, hdtf.FILES)
  videos = sorted(name for name in os.listdir(folder) if name.endswith('.mp4'))  # UNetDataset's listing
  assert videos == ['talk_0.mp4', 'talk_1.mp4']
  for name in videos:
    key = name[:-len('.mp4')]
    meta = json.load(open(os.path.join(folder, key + '.json')))
    with av.open(os.path.join(folder, name)) as container:
      video, audio = container.streams.video[0], container.streams.audio[0]
      assert (video.width, video.height, float(video.average_rate)) == (256, 256, 25.0)
      assert (audio.codec_context.name, audio.rate, audio.channels) == ('aac', 16000, 1)
      frames = sum(1 for _ in container.decode(video=0))
    with av.open(os.path.join(folder, name)) as container:
      samples = sum(frame.samples for frame in container.decode(audio=0))
    assert frames == meta['num_frames'] == 50 >= 3 * 16  # UNetDataset skips clips under 3 x num_frames
    assert 0 <= samples - frames / 25 * 16000 < 1024  # the clip's audio, up to AAC's last 1024-sample frame
    assert meta['id'] == key and load_npy(open(os.path.join(folder, key + '.landmarks.npy'), 'rb').read()).shape \
        == (frames, 478, 3)
    with av.open(os.path.join(folder, key + '.wav')) as wav:
      assert (wav.streams.audio[0].rate, wav.streams.audio[0].channels) == (16000, 1)
  assert not [name for name in os.listdir(folder) if name.endswith('.partial')]
  index = read_jsonl(os.path.join(output, 'index.jsonl'))
  assert sorted((r['id'], r['file']) for r in index) == [('talk_0', 'clips/talk_0.mp4'), ('talk_1', 'clips/talk_1.mp4')]
  assert [(r['id'], r['reason']) for r in read_jsonl(os.path.join(output, 'rejects.jsonl'))] == [
      ('talk_2', 'clip_past_end')]
  stats = json.load(open(os.path.join(output, 'stats.json')))
  assert (stats['planned'], stats['written'], stats['rejected'], stats['balanced']) == (3, 2, 1, True)
  tiles, videos = report.kept_samples(output, report.gather(output, 4).picks.items(), 1)
  assert len(tiles) == 2 and len(videos) == 1  # report.html shows the clips, read from their files


def test_a_rerun_resumes_without_rendering_or_rewriting_a_clip(files_run):
  folder = os.path.join(files_run['output'], hdtf.FILES)

  def files():
    return {name: (open(os.path.join(folder, name), 'rb').read(), os.stat(os.path.join(folder, name)).st_mtime_ns)
            for name in os.listdir(folder)}

  before = files()
  result = run_cli(*files_run['args'])
  assert files() == before
  stats = json.load(open(os.path.join(files_run['output'], 'stats.json')))
  assert (stats['written_this_run'], stats['already_written'], stats['rejected'], stats['balanced']) == (0, 2, 1, True)
  assert 'resumed: 2 clips' in result.stdout and 'clips: ' in result.stdout


def _two_at_once(attempt, monkeypatch, module, step: str) -> None:
  """`attempt('attempt1')` and `attempt('attempt2')` in two threads, both past every check before either calls
  `module.step` (a runner's backup attempt beside the first)."""
  both_there = threading.Barrier(2, timeout=60)
  real = getattr(module, step)

  def after_both(*args):
    if threading.current_thread().name.startswith('attempt'):
      both_there.wait()
    return real(*args)

  monkeypatch.setattr(module, step, after_both)
  threads = [threading.Thread(target=attempt, args=(name,), name=name) for name in ('attempt1', 'attempt2')]
  for thread in threads:
    thread.start()
  for thread in threads:
    thread.join(60)


def _two_attempts_then_a_retry(files_run, output, monkeypatch, earlier: bool = False):
  """The run's first clip written into `output` by two attempts at once (both write every file before either
  publishes, as a runner's backup attempt), then by a retry; with `earlier`, over a version an earlier run
  published from other inputs. -> (the clip's analysis, each attempt's outputs, whether the rendered clip was
  still in the work dir before the retry)."""
  data, rendered = files_run['captured'][0]
  analysis = pickle.loads(data)
  os.makedirs(os.path.dirname(analysis.clip.mp4_uri), exist_ok=True)  # the run removed the emptied folder
  with open(analysis.clip.mp4_uri, 'wb') as handle:  # the run's writer deleted it once published
    handle.write(rendered)
  if earlier:
    _old_version(output, analysis.clip.task.clip_id)
  outputs = {}

  def attempt(name):
    outputs[name] = list(DeadLetter(hdtf.WriteClipFiles(str(output), files_run['work'], True), 'write')
                         .process(analysis))

  _two_at_once(attempt, monkeypatch, hdtf, 'publish_unit')
  rendered_left = os.path.exists(analysis.clip.mp4_uri)
  attempt('retry')
  return analysis, outputs, rendered_left


def test_two_attempts_at_once_and_a_retry_publish_one_clip(files_run, tmp_path, monkeypatch):
  """Both attempts write every file before either publishes (a runner's backup attempt); a third comes after
  the publish, when the rendered clip is gone. One clip, the run's bytes, one record each, no reject."""
  output = tmp_path / 'out'
  analysis, outputs, rendered_left = _two_attempts_then_a_retry(files_run, output, monkeypatch)
  key = analysis.clip.task.clip_id
  assert not rendered_left
  assert not any(isinstance(o, beam.pvalue.TaggedOutput) for outs in outputs.values() for o in outs)
  assert outputs['attempt1'] == outputs['attempt2'] == outputs['retry'] and len(outputs['retry']) == 1
  run_folder = os.path.join(files_run['output'], hdtf.FILES)
  expected = sorted(name for name in os.listdir(run_folder) if name.split('.')[0] == key)
  assert sorted(os.listdir(output / hdtf.FILES)) == expected  # no scratch file left behind
  for name in expected:
    assert (output / hdtf.FILES / name).read_bytes() == open(os.path.join(run_folder, name), 'rb').read(), name
  assert read_jsonl(str(output / 'published' / f'{key}.jsonl')) == outputs['retry']


def test_layout_files_is_hdtf_only(tmp_path):
  with pytest.raises(SystemExit, match='--layout=files is for --recipe=hdtf'):
    prepare(['--recipe=nerf', '--layout=files', f'--input={tmp_path}', f'--output={tmp_path / "out"}'])


def test_16k_audio_keeps_the_video_stream(files_run):
  """The remux copies the video packets: the frames decode to the same pixels as the rendered clip's."""
  analysis, rendered = pickle.loads(files_run['captured'][0][0]), files_run['captured'][0][1]
  remuxed = hdtf.with_wav_audio(rendered, analysis.clip.wav)
  decoded = []
  for data in (rendered, remuxed):
    with av.open(io.BytesIO(data)) as container:
      decoded.append(np.stack([frame.to_ndarray(format='rgb24') for frame in container.decode(video=0)]))
  assert decoded[0].shape == decoded[1].shape and np.array_equal(decoded[0], decoded[1])


# ----------------------------------------------------------------------------- reruns that change the clips

def _old_version(output, key: str) -> None:
  """`key` as an earlier run published it from other inputs, with a member this version does not have."""
  os.makedirs(os.path.join(output, hdtf.FILES), exist_ok=True)
  for member in ('mp4', 'json', 'sync_conf.npy'):
    with open(os.path.join(output, hdtf.FILES, f'{key}.{member}'), 'wb') as handle:
      handle.write(b'earlier')
  folders.publish_unit(str(output), key, [{'id': key, 'planned_id': key, 'num_frames': 10, 'inputs': 'earlier',
                                           'members': ['json', 'mp4', 'sync_conf.npy']}])


def test_two_attempts_replacing_an_earlier_version_leave_one(files_run, tmp_path, monkeypatch):
  """The clip changed since a run published it: two attempts at once (both write every file before either
  publishes) and a retry leave the run's files, without the member the earlier version had, and one record."""
  output = tmp_path / 'out'
  analysis, outputs, _ = _two_attempts_then_a_retry(files_run, output, monkeypatch, earlier=True)
  key = analysis.clip.task.clip_id
  assert outputs['attempt1'] == outputs['attempt2'] == outputs['retry'] and len(outputs['retry']) == 1
  assert outputs['retry'][0]['inputs'] == analysis.clip.task.inputs
  run_folder = os.path.join(files_run['output'], hdtf.FILES)
  expected = sorted(name for name in os.listdir(run_folder) if name.split('.')[0] == key)
  assert sorted(os.listdir(output / hdtf.FILES)) == expected and f'{key}.sync_conf.npy' not in expected
  for name in expected:
    assert (output / hdtf.FILES / name).read_bytes() == open(os.path.join(run_folder, name), 'rb').read(), name
  assert read_jsonl(str(output / 'published' / f'{key}.jsonl')) == outputs['retry']


def test_retiring_a_clip_twice_at_once_then_after_it_was_made_again(tmp_path, monkeypatch):
  """RetireUnit of one clip in two attempts at once (both past the "still the earlier version?" check), then a
  retry: every file and the index gone, each attempt reports the record. A clip a writer of the run made again
  keeps its new version: the earlier record counts as retired, nothing is deleted."""
  output = str(tmp_path / 'out')
  _old_version(output, 'talk_5')
  stale = ('talk_5', 'talk_5', 10, 'earlier', '', 'talk_5', (), 'talk_5')
  outputs = {}

  def attempt(name):
    outputs[name] = list(folders.RetireUnit(output, hdtf.RECIPE.unit_files).process(('talk_5', [stale])))

  _two_at_once(attempt, monkeypatch, folders, 'unpublish')
  attempt('retry')
  assert outputs == {name: [stale] for name in ('attempt1', 'attempt2', 'retry')}
  assert not os.path.exists(os.path.join(output, hdtf.FILES)) and os.listdir(os.path.join(output, 'published')) == []

  _old_version(output, 'talk_5')
  folders.publish_unit(output, 'talk_5', [{'id': 'talk_5', 'planned_id': 'talk_5', 'num_frames': 12,
                                           'inputs': 'now', 'members': ['mp4']}])
  attempt('after_remake')
  assert outputs['after_remake'] == [stale]
  assert _clip_names(output) == ['talk_5.json', 'talk_5.mp4', 'talk_5.sync_conf.npy']


def _write_manifest(manifest: str, media_dir, clips) -> None:
  with open(manifest, 'w') as handle:
    handle.write(json.dumps({'id': 'talk', 'url': str(media_dir / 'talking.mp4'), 'clips': clips}) + '\n')


def _clip_state(output: str) -> dict:
  folder, published = os.path.join(output, hdtf.FILES), os.path.join(output, 'published')
  return {'files': sorted(os.listdir(folder)) if os.path.isdir(folder) else [],
          'published': sorted(os.listdir(published)) if os.path.isdir(published) else [],
          'index': sorted((r['id'], r['start']) for r in read_jsonl(os.path.join(output, 'index.jsonl'))),
          'records': [r for name in ('talk_0', 'talk_1') for r in read_jsonl(os.path.join(published, name + '.jsonl'))],
          'stats': json.load(open(os.path.join(output, 'stats.json')))}


@pytest.fixture(scope='module')
def edited_files(files_run, media_dir):
  """After the runs above, two reruns into the same output: (1) talk_0 moved past the source's end (rejected now)
  and talk_1's range moved to 2.5-4 s (made again; its earlier version had one more member, as a run with
  --syncnet_weights writes), with a killed run's scratch files in clips/ and published/ (two a day old, one
  fresh: a live attempt's); (2) with --prune, only talk_0 listed (still past the end)."""
  output, args = files_run['output'], files_run['args']
  manifest = args[0].split('=', 1)[1]
  clips = os.path.join(output, hdtf.FILES)
  (earlier,) = read_jsonl(os.path.join(output, 'published', 'talk_1.jsonl'))
  with open(os.path.join(clips, 'talk_1.sync_conf.npy'), 'wb') as handle:
    handle.write(b'earlier')
  with open(os.path.join(output, 'published', 'talk_1.jsonl'), 'w') as handle:
    handle.write(json.dumps(dict(earlier, members=earlier['members'] + ['sync_conf.npy'])) + '\n')
  old = [os.path.join(clips, 'talk_9.mp4.0123456789ab.partial'),
         os.path.join(output, 'published', 'talk_9.jsonl.0123456789ab.partial')]
  fresh = os.path.join(clips, 'talk_1.wav.ba9876543210.partial')
  for path in old + [fresh]:
    with open(path, 'wb') as handle:
      handle.write(b'half')
    if path != fresh:
      os.utime(path, (os.stat(path).st_mtime - 2 * 86400,) * 2)
  _write_manifest(manifest, media_dir, [[30, 32], [2.5, 4], [20, 22]])
  run_cli(*args)
  edited = _clip_state(output)
  _write_manifest(manifest, media_dir, [[30, 32]])
  run_cli(*args, '--prune')
  return {'earlier': earlier, 'edited': edited, 'pruned': _clip_state(output), 'old': old, 'fresh': fresh,
          'output': output}


def test_an_edited_clip_is_made_again_and_one_now_rejected_retired(edited_files):
  """talk_1 is written again over its earlier version (the member it no longer has gone); talk_0, rejected now,
  leaves with every file and its published index; stale scratch files go, a fresh one (a live attempt's) stays."""
  edited = edited_files['edited']
  stats = edited['stats']
  assert (stats['planned'], stats['written'], stats['written_this_run'], stats['rejected'], stats['retired']) == (
      3, 1, 1, 2, 2)
  assert stats['balanced'] and stats['already_written'] == 0
  assert edited['index'] == [('talk_1', 2.5)]
  assert [name for name in edited['files'] if not name.endswith('.partial')] == sorted(
      f'talk_1.{member}' for member in edited_files['earlier']['members'])
  assert edited['published'] == ['talk_1.jsonl']
  (record,) = edited['records']
  assert record['inputs'] != edited_files['earlier']['inputs'] and record['members'] == edited_files['earlier'][
      'members']
  assert not any(os.path.exists(path) for path in edited_files['old']) and os.path.exists(edited_files['fresh'])


def test_a_clip_gone_from_the_input_is_pruned_with_its_files(edited_files):
  pruned = edited_files['pruned']
  stats = pruned['stats']
  assert (stats['planned'], stats['written'], stats['rejected'], stats['retired'], stats['not_in_manifest']) == (
      1, 0, 1, 1, 0)
  assert stats['balanced'] and pruned['index'] == [] and pruned['published'] == []
  assert pruned['files'] == [os.path.basename(edited_files['fresh'])]  # only the live attempt's scratch file


def _clip_names(output: str) -> list:
  return sorted(os.listdir(os.path.join(output, hdtf.FILES)))
