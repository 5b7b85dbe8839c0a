"""Reruns into one output through the CLI: a Ctrl-C'd run resumed from its rendered clips, an edited clip made
again and its old sample retired, a clip gone from the manifest listed and then pruned, another recipe refused."""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from beam_pipeline import __main__, inspect_output
from beam_pipeline.demo import VideoSpec, write_video
from tests.helpers import REPO, read_jsonl, read_shards, run_cli

FLAGS = ['--size=96', '--no_progress', '--no_report']


def write_manifest(path, video, clips, typo=False):
  rows = [{'id': 'a', 'url': video, 'clips': clips}]
  if typo:
    rows.append({'id': 'typo', 'url': video, 'clip': [[0.0, 1.0]]})
  path.write_text(''.join(json.dumps(row) + '\n' for row in rows))


def stats(output):
  with open(os.path.join(output, 'stats.json')) as handle:
    return json.load(handle)


def samples(output):
  return sorted((sample['json']['id'], sample['json']['start']) for sample in read_shards(output))


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('rerun')
  video = str(root / 'talk.mp4')
  write_video(video, VideoSpec(duration=5.0, width=256, height=192))
  return root, video, str(root / 'out')


@pytest.fixture(scope='module')
def interrupted(setup):
  """Run 1, sent Ctrl-C as soon as its first clip is rendered and filtered (the others still rendering)."""
  root, video, output = setup
  manifest = root / 'm.jsonl'
  write_manifest(manifest, video, [[0.2, 1.4], [1.6, 2.8], [3.0, 4.2]], typo=True)
  process = subprocess.Popen([sys.executable, '-m', 'beam_pipeline', f'--input={manifest}', f'--output={output}',
                              *FLAGS], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
  pattern = os.path.join(output, '_work', 'samples', '*.ref.json')
  deadline = time.monotonic() + 300
  while not glob.glob(pattern) and process.poll() is None and time.monotonic() < deadline:
    time.sleep(0.05)
  process.send_signal(signal.SIGINT)
  out, err = process.communicate(timeout=60)
  return process.returncode, out, err, manifest


def test_ctrl_c_is_one_line_and_130(interrupted):
  code, _, err, _ = interrupted
  assert code == 130, err
  assert err.strip().splitlines()[-1] == 'interrupted; rerun with the same --output to resume'
  assert 'Traceback' not in err


@pytest.fixture(scope='module')
def resumed(setup, interrupted):
  _, _, output = setup
  result = run_cli(f'--input={interrupted[3]}', f'--output={output}', *FLAGS)
  return result, stats(output)


def test_rerun_after_ctrl_c_packs_what_was_rendered(setup, resumed):
  _, _, output = setup
  result, summary = resumed
  assert summary['reused'] >= 1 and 'without making them again' in result.stdout
  assert summary['written'] == 3 and summary['balanced']
  assert [sample[0] for sample in samples(output)] == ['a_0', 'a_1', 'a_2']
  assert not glob.glob(os.path.join(output, '_work', 'samples', '*'))  # fragments gone once published


def test_a_misspelt_manifest_field_rejects_its_row(setup, resumed):
  _, _, output = setup
  (reject,) = [r for r in read_jsonl(os.path.join(output, 'rejects.jsonl')) if r['id'] == 'typo']
  assert reject['reason'] == 'unknown_field' and "'clip' (did you mean 'clips'?)" in reject['detail']


@pytest.fixture(scope='module')
def edited(setup, resumed):
  """Run 3: a_0's range edited, a_2 gone from the manifest."""
  root, video, output = setup
  manifest = root / 'm.jsonl'
  write_manifest(manifest, video, [[0.3, 1.5], [1.6, 2.8]])
  result = run_cli(f'--input={manifest}', f'--output={output}', *FLAGS)
  return result, stats(output), manifest


def test_an_edited_clip_is_made_again_and_its_old_sample_retired(setup, edited):
  _, _, output = setup
  result, summary, _ = edited
  assert summary['retired'] == 1 and summary['written_this_run'] == 1 and summary['already_written'] == 1
  assert samples(output) == [('a_0', 0.3), ('a_1', 1.6), ('a_2', 3.0)]
  index = read_jsonl(os.path.join(output, 'index.jsonl'))
  assert sorted((r['id'], r['start']) for r in index) == samples(output)
  assert 'retired: 1' in result.stdout


def test_a_clip_gone_from_the_manifest_is_listed_then_pruned(setup, edited):
  _, _, output = setup
  _, summary, manifest = edited
  assert summary['not_in_manifest'] == 1 and summary['not_in_manifest_examples'] == ['a_2']
  result = run_cli(f'--input={manifest}', f'--output={output}', '--prune', *FLAGS)
  assert stats(output)['retired'] == 1 and stats(output)['written_this_run'] == 0
  assert samples(output) == [('a_0', 0.3), ('a_1', 1.6)]
  assert 'no longer in the input' not in result.stdout


def test_every_run_keeps_its_summary(setup, edited):
  _, _, output = setup
  runs = sorted(glob.glob(os.path.join(output, 'runs', '*')))
  assert len(runs) >= 3  # the Ctrl-C'd run wrote none
  for run in runs:
    with open(os.path.join(run, 'stats.json')) as handle:
      assert json.load(handle)['run_id'] == os.path.basename(run)
    assert os.path.exists(os.path.join(run, 'rejects.jsonl'))
  first = read_jsonl(os.path.join(runs[0], 'rejects.jsonl'))
  assert [r['id'] for r in first] == ['typo']  # the run that rejected it still says so


def test_another_recipe_into_the_output_is_refused(setup, edited, monkeypatch):
  _, video, output = setup
  monkeypatch.setattr(sys, 'argv', ['beam_pipeline', '--recipe=nerf', f'--input={video}', f'--output={output}',
                                    *FLAGS])
  with pytest.raises(SystemExit) as ended:
    __main__.main()
  line = str(ended.value)
  assert line.startswith(f'--output={output} holds a dataset made by --recipe=hdtf (shards), not by --recipe=nerf')
  assert 'another --output' in line and '\n' not in line
  assert not os.path.exists(os.path.join(output, 'published'))


def test_inspect_names_the_recipe_and_previews_inside_the_output(setup, edited, capsys):
  _, _, output = setup
  assert inspect_output.main([output]) == 0
  said = capsys.readouterr().out
  assert f'output {output} (--recipe=hdtf, shards)' in said and 'runs kept:' in said
  assert f'preview: {output}/preview.png' in said and os.path.getsize(os.path.join(output, 'preview.png')) > 1000
