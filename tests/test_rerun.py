"""Reruns into one output through the CLI: a Ctrl-C'd run resumed from its rendered clips, an edited clip made
again and its old sample retired, a clip gone from the manifest listed and then pruned, another recipe refused."""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from beam_pipeline import __main__, inspect_output
from beam_pipeline.demo import VideoSpec, write_video
from tests.helpers import INTERRUPTIBLE_CLI, REPO, read_jsonl, read_shards, run_cli

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
  process = subprocess.Popen([*INTERRUPTIBLE_CLI, f'--input={manifest}', f'--output={output}', *FLAGS], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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


def leftover(output, clip_id, planned_id, inputs):
  """A work-dir fragment as a killed run leaves it (its tar, its rendered clip, its ref), of a clip planned
  from `inputs` then: its files."""
  work = os.path.join(output, '_work')
  files = [os.path.join(work, 'samples', clip_id + '.tar'), os.path.join(work, 'clips', clip_id + '.mp4')]
  for path in files:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as handle:
      handle.write(b'rendered')
  ref = {'key': clip_id, 'id': clip_id, 'source_id': 'a', 'fragment_uri': files[0], 'size': 8, 'consumed': files[1:],
         'record': {'id': clip_id, 'planned_id': planned_id, 'inputs': inputs}}
  files.append(os.path.join(work, 'samples', clip_id + '.ref.json'))
  with open(files[-1], 'w') as handle:
    json.dump(ref, handle)
  return files


@pytest.fixture(scope='module')
def edited(setup, resumed):
  """Run 3: a_0's range edited, a_2 gone from the manifest; the work dir holds what killed runs left of a piece
  of a_0 as it was before and of a_2."""
  root, video, output = setup
  manifest = root / 'm.jsonl'
  write_manifest(manifest, video, [[0.3, 1.5], [1.6, 2.8]])
  leftovers = {'a_0': leftover(output, 'a_0_f200', 'a_0', 'before'), 'a_2': leftover(output, 'a_2', 'a_2', 'then')}
  result = run_cli(f'--input={manifest}', f'--output={output}', *FLAGS)
  return result, stats(output), manifest, leftovers


def test_an_edited_clip_is_made_again_and_its_old_sample_retired(setup, edited):
  _, _, output = setup
  result, summary, _, leftovers = edited
  assert summary['retired'] == 1 and summary['written_this_run'] == 1 and summary['already_written'] == 1
  assert samples(output) == [('a_0', 0.3), ('a_1', 1.6), ('a_2', 3.0)]
  index = read_jsonl(os.path.join(output, 'index.jsonl'))
  assert sorted((r['id'], r['start']) for r in index) == samples(output)
  assert 'retired: 1' in result.stdout
  # What a killed run left of a_0 as it was goes (once the run is written); a_2's waits: it may come back.
  assert not any(os.path.exists(path) for path in leftovers['a_0'])
  assert all(os.path.exists(path) for path in leftovers['a_2'])


def test_a_clip_gone_from_the_manifest_is_listed_then_pruned(setup, edited):
  _, _, output = setup
  _, summary, manifest, leftovers = edited
  assert summary['not_in_manifest'] == 1 and summary['not_in_manifest_examples'] == ['a_2']
  result = run_cli(f'--input={manifest}', f'--output={output}', '--prune', *FLAGS)
  assert stats(output)['retired'] == 1 and stats(output)['written_this_run'] == 0
  assert samples(output) == [('a_0', 0.3), ('a_1', 1.6)]
  assert 'no longer in the input' not in result.stdout
  assert not any(os.path.exists(path) for path in leftovers['a_2'])


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


def test_an_output_from_before_output_json_is_adopted_by_the_recipe_its_records_show(setup, edited, tmp_path,
                                                                                     monkeypatch):
  """An output made before outputs recorded their recipe (no output.json, samples without `inputs`): another
  recipe is refused by what its records show; the recipe that made it adopts it (output.json written, said in
  one line) and keeps its samples as they are."""
  _, _, output = setup
  manifest = edited[2]
  old = tmp_path / 'old'
  shutil.copytree(output, old, ignore=shutil.ignore_patterns('_work'))
  os.remove(old / 'output.json')
  for index in glob.glob(str(old / 'shards' / '*.jsonl')):
    records = [{k: v for k, v in record.items() if k != 'inputs'} for record in read_jsonl(index)]
    with open(index, 'w') as handle:
      handle.write(''.join(json.dumps(record) + '\n' for record in records))
  monkeypatch.setattr(sys, 'argv', ['beam_pipeline', '--recipe=megactor', f'--input={manifest}', f'--output={old}',
                                    *FLAGS])
  with pytest.raises(SystemExit) as ended:
    __main__.main()
  assert str(ended.value).startswith(f'--output={old} holds a dataset made by --recipe=hdtf (shards, by its records: '
                                     'it has no output.json), not by --recipe=megactor (shards): give this run')
  assert not (old / 'output.json').exists()

  result = run_cli(f'--input={manifest}', f'--output={old}', *FLAGS)
  (said,) = [line for line in result.stdout.splitlines() if line.startswith('adopted')]
  assert said.startswith(f'adopted {old}: made before outputs recorded their recipe; its records show '
                         '--recipe=hdtf (shards), now in output.json; its samples carry no inputs digest')
  made = json.loads((old / 'output.json').read_text())
  assert made['recipe'] == 'hdtf' and made['layout'] == 'shards' and made['adopted_by']
  summary = stats(str(old))
  assert summary['already_written'] == 2 and summary['written_this_run'] == 0 and summary['retired'] == 0
  assert samples(str(old)) == samples(output)


@pytest.mark.parametrize('record, made', [
    ({'id': 'a_0', 'file': 'clips/a_0.mp4', 'folder': 'a_0'}, ('hdtf', 'files')),
    ({'id': 'a_0', 'folder': 'a', 'frames': [0, 30]}, ('nerf', 'folders')),
    ({'id': 'a_0', 'folder': 'a', 'frames': ['00000.png', '00029.png']}, ('avatar', 'folders')),
    ({'id': 'a_0_f0', 'folder': 'a#000#f0', 'layout': 'mmvox'}, ('mmvox', 'folders')),
    ({'id': 'a_0', 'folder': 'a'}, ('', 'folders')),
], ids=['files', 'nerf', 'avatar', 'mmvox', 'unknown'])
def test_an_output_without_output_json_is_known_by_its_records(tmp_path, record, made):
  """Which recipe made a folder output from before output.json, by its first published record: the layout
  alone would not tell hdtf's files from the folder recipes, nor those from each other."""
  assert __main__.made_by(record, in_shard=False) == made
  (tmp_path / 'out' / 'published').mkdir(parents=True)
  (tmp_path / 'out' / 'published' / 'a.jsonl').write_text(json.dumps(record) + '\n')
  (tmp_path / 'in.jsonl').write_text('')
  argv = [f'--input={tmp_path / "in.jsonl"}', f'--output={tmp_path / "out"}', '--recipe=nerf']
  if made == ('nerf', 'folders'):
    __main__.prepare(argv)
    assert json.loads((tmp_path / 'out' / 'output.json').read_text())['recipe'] == 'nerf'
    return
  with pytest.raises(SystemExit) as ended:
    __main__.prepare(argv)
  assert '\n' not in str(ended.value) and not (tmp_path / 'out' / 'output.json').exists()
  if made[0]:
    assert f'made by --recipe={made[0]} ({made[1]}, by its records' in str(ended.value)
  else:
    assert 'its records do not show which recipe made them' in str(ended.value)
