"""What DirectRunner never shows: bundles that run twice, stages on other machines, graphs that must not
grow with the data. Each test runs a stage the way a retry would, or walks the job graph."""
from __future__ import annotations

import json
import os
import shutil
import threading

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.io.filesystems import FileSystems
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_pipeline.__main__ import prepare
from beam_pipeline.pipeline import build_pipeline
from tests.helpers import read_jsonl, read_shards
from transforms.core import fileio
from transforms.core.elements import Reject, SampleRef, ShardBatch
from transforms.deadletter import DeadLetter
from transforms.writers import shards as write
from transforms.writers.shards import PublishShard, WriteShards, sample_key, shard_name, tar_members
from transforms.writers.summary import WriteRunSummary


def _ref(work, clip_id: str, frames: int = 3) -> SampleRef:
  """A sample packed the way AssembleSample packs one, with a rendered clip file it consumes."""
  key = sample_key(clip_id)
  record = {'id': clip_id, 'key': key, 'planned_id': clip_id, 'num_frames': frames}
  payload = {'mp4': clip_id.encode() * 50, 'json': record, 'landmarks.npy': np.full((frames, 2), 1.5, np.float32)}
  fragment = work / 'samples' / f'{key}.tar'
  fragment.parent.mkdir(parents=True, exist_ok=True)
  data = tar_members(key, payload)
  fragment.write_bytes(data)
  clip = work / 'clips' / f'{clip_id}.mp4'
  clip.parent.mkdir(parents=True, exist_ok=True)
  clip.write_bytes(b'rendered')
  return SampleRef(key, clip_id, 'src', str(fragment), len(data), record, (str(clip),))


def _run(fn, element):
  fn.setup() if hasattr(fn, 'setup') else None
  return list(fn.process(element))


def test_a_retried_publish_writes_one_shard_and_needs_nothing_deleted(tmp_path):
  """The first attempt publishes and cleans up, then its bundle fails (its outputs are discarded); the
  retry finds the shard published and emits the same records from it, without the deleted fragments."""
  output, work = tmp_path / 'out', tmp_path / 'work'
  batch = ShardBatch(tuple(_ref(work, f'clip_{i}') for i in range(3)))
  first = _run(PublishShard(str(output)), batch)
  assert not list((work / 'samples').iterdir()) and not list((work / 'clips').iterdir())
  retry = _run(PublishShard(str(output)), batch)
  assert retry == first
  assert sorted(os.listdir(output / 'shards')) == [f'{shard_name(batch)}.jsonl', f'{shard_name(batch)}.tar']
  samples = read_shards(str(output))
  assert sorted(s['__key__'] for s in samples) == ['clip_0', 'clip_1', 'clip_2']
  assert all(s['mp4'] == s['__key__'].encode() * 50 for s in samples)


def test_a_publish_that_fails_half_way_keeps_its_inputs_and_the_retry_completes(tmp_path):
  """Index written, tar not (the shard's final name is blocked): nothing is deleted, the shard does not
  count, and once the fault clears the retry publishes the same shard."""
  output, work = tmp_path / 'out', tmp_path / 'work'
  batch = ShardBatch(tuple(_ref(work, f'clip_{i}') for i in range(2)))
  blocked = output / 'shards' / f'{shard_name(batch)}.tar'
  (blocked / 'in_the_way').mkdir(parents=True)
  with pytest.raises(OSError):
    _run(PublishShard(str(output)), batch)
  assert (output / 'shards' / f'{shard_name(batch)}.jsonl').exists()
  assert write.finished_shard_indexes(str(output)) == []  # an index without its tar is no shard
  assert len(list((work / 'samples').iterdir())) == 2 and len(list((work / 'clips').iterdir())) == 2
  shutil.rmtree(blocked)
  records = _run(PublishShard(str(output)), batch)
  assert [r['id'] for r in records] == ['clip_0', 'clip_1']
  assert sorted(s['__key__'] for s in read_shards(str(output))) == ['clip_0', 'clip_1']


def test_two_attempts_of_a_publish_at_once_give_each_clip_one_record_and_no_reject(tmp_path, monkeypatch):
  """A backup attempt stops at its first fragment read; the other attempt publishes the shard and deletes the
  fragments; the backup then fails to read them and re-emits the published shard's records, no reject."""
  output, work = tmp_path / 'out', tmp_path / 'work'
  batch = ShardBatch(tuple(_ref(work, f'clip_{i}') for i in range(3)))
  paused, published = threading.Event(), threading.Event()
  real_open = FileSystems.open

  def hold(path, *args, **kwargs):
    if threading.current_thread().name == 'backup' and not paused.is_set():
      paused.set()
      assert published.wait(60)
    return real_open(path, *args, **kwargs)

  monkeypatch.setattr(FileSystems, 'open', hold)
  outputs = {}

  def attempt(name):
    outputs[name] = list(DeadLetter(PublishShard(str(output)), 'write').process(batch))

  backup = threading.Thread(target=attempt, args=('backup',), name='backup')
  backup.start()
  assert paused.wait(60)
  attempt('first')
  published.set()
  backup.join(60)
  assert not any(isinstance(o, beam.pvalue.TaggedOutput) for o in outputs['first'] + outputs['backup'])
  assert outputs['backup'] == outputs['first'] and [r['id'] for r in outputs['first']] == ['clip_0', 'clip_1',
                                                                                            'clip_2']
  assert sorted(s['__key__'] for s in read_shards(str(output))) == ['clip_0', 'clip_1', 'clip_2']


def test_two_attempts_writing_one_file_at_once_each_use_their_own_scratch_file(tmp_path, monkeypatch):
  """The first attempt has written its scratch file and is about to rename it when a second attempt writes the
  same file: with one shared scratch name the second renamed the first's away and the first failed."""
  target = tmp_path / 'unit' / 'frame.png'
  ready, second_done = threading.Event(), threading.Event()
  real_replace = os.replace

  def slow_replace(src, dst):
    if threading.current_thread().name == 'first':
      ready.set()
      assert second_done.wait(30)
    return real_replace(src, dst)

  monkeypatch.setattr(os, 'replace', slow_replace)
  errors = []

  def write():
    try:
      fileio.write_atomic(str(target), b'same bytes, as a retry writes them')
    except OSError as error:
      errors.append(error)

  first = threading.Thread(target=write, name='first')
  first.start()
  assert ready.wait(30)
  write()
  second_done.set()
  first.join(30)
  assert errors == [] and target.read_bytes() == b'same bytes, as a retry writes them'
  assert os.listdir(target.parent) == ['frame.png']


def test_duplicated_samples_are_packed_once_and_shards_are_bounded(tmp_path):
  """The same sample reaching the writer twice (a duplicated bundle upstream) is packed once; shard
  contents are fixed by the batching step, not by bundles."""
  output, work = tmp_path / 'out', tmp_path / 'work'
  refs = [_ref(work, f'clip_{i}') for i in range(7)]
  with TestPipeline() as p:
    records = (p | beam.Create(refs + refs[:3])
               | WriteShards(str(output), max_samples=3, max_mb=1024, writers=1))['records']
    assert_that(records | beam.Map(lambda r: r['id']), equal_to([f'clip_{i}' for i in range(7)]))
  keys = [s['__key__'] for s in read_shards(str(output))]
  assert sorted(keys) == [f'clip_{i}' for i in range(7)]
  sizes = sorted(len(read_jsonl(str(p))) for p in (output / 'shards').glob('*.jsonl'))
  assert sizes == [1, 3, 3]


def test_ids_that_sanitise_alike_keep_their_own_samples(tmp_path):
  """'a.b_0', 'a,b_0' and 'a_b_0' become the same key once dots and commas are replaced; the digest that keeps
  them apart is taken from the full id, so each sample is packed and read back with its own bytes."""
  import webdataset as wds
  output, work = tmp_path / 'out', tmp_path / 'work'
  ids = ['a.b_0', 'a,b_0', 'a_b_0']
  assert len({sample_key(clip_id) for clip_id in ids}) == 3
  batch = ShardBatch(tuple(sorted((_ref(work, i) for i in ids), key=lambda ref: ref.key)))
  _run(PublishShard(str(output)), batch)
  samples = list(wds.WebDataset([str(p) for p in (output / 'shards').glob('*.tar')], shardshuffle=False))
  assert sorted(json.loads(s['json'])['id'] for s in samples) == sorted(ids)
  assert all(s['mp4'] == json.loads(s['json'])['id'].encode() * 50 for s in samples)


def test_shards_are_bounded_by_bytes(tmp_path):
  """--shard_max_mb: a shard closes once its samples reach the byte limit (here 2.5 samples' worth: 3 each)."""
  output, work = tmp_path / 'out', tmp_path / 'work'
  refs = [_ref(work, f'clip_{i}') for i in range(7)]
  size = refs[0].size
  assert all(ref.size == size for ref in refs)
  with TestPipeline() as p:
    _ = p | beam.Create(refs) | WriteShards(str(output), max_samples=100, max_mb=2.5 * size / (1024 * 1024),
                                            writers=1)
  counts = sorted(len(read_jsonl(str(p))) for p in (output / 'shards').glob('*.jsonl'))
  assert counts == [1, 3, 3]
  assert all(p.stat().st_size < 4 * size for p in (output / 'shards').glob('*.tar'))


def test_keys_are_webdataset_safe_for_dotted_and_long_ids(tmp_path):
  import webdataset as wds
  output, work = tmp_path / 'out', tmp_path / 'work'
  ids = ['interview.part1_0', 'interview.part2_0', 'talk.2024_0', 'x' * 118 + '_0', 'x' * 118 + '_1', 'plain_0']
  batch = ShardBatch(tuple(sorted((_ref(work, i) for i in ids), key=lambda ref: ref.key)))
  _run(PublishShard(str(output)), batch)
  tars = [str(p) for p in (output / 'shards').glob('*.tar')]
  samples = list(wds.WebDataset(tars, shardshuffle=False))
  assert len(samples) == len(ids)
  by_id = {json.loads(s['json'])['id']: s for s in samples}
  assert sorted(by_id) == sorted(ids)
  for clip_id, sample in by_id.items():
    assert set(sample) >= {'__key__', 'mp4', 'json', 'landmarks.npy'}, sorted(sample)
    assert sample['mp4'] == clip_id.encode() * 50  # the right sample's bytes, not a neighbour's
    assert '.' not in sample['__key__'] and len(sample['__key__']) <= write.KEY_LIMIT
  assert sample_key('plain_0') == 'plain_0'


def test_index_and_stats_are_the_same_when_the_summary_runs_twice(tmp_path):
  output, work = tmp_path / 'out', tmp_path / 'work'
  batch = ShardBatch(tuple(_ref(work, f'c_{i}') for i in range(2)))
  records = _run(PublishShard(str(output)), batch)

  def summary():
    with TestPipeline() as p:
      _ = ({'planned': p | 'P' >> beam.Create(['c_0', 'c_1', 'bad_0']),
            'earlier': p | 'E' >> beam.Create([]),
            'records': p | 'R' >> beam.Create(records),
            'rejects': p | 'X' >> beam.Create([Reject('bad_0', 'render', 'no_face')]),
            'carried': p | 'C' >> beam.Create([])}
           | WriteRunSummary(str(output)))
    return {name: (output / name).read_bytes() for name in ('index.jsonl', 'rejects.jsonl', 'stats.json')}

  first = summary()
  assert summary() == first
  stats = json.loads(first['stats.json'])
  assert (stats['planned'], stats['written'], stats['rejected'], stats['balanced']) == (3, 2, 1, True)
  assert len(read_jsonl(str(output / 'index.jsonl'))) == 2
  assert [r['id'] for r in read_jsonl(str(output / 'rejects.jsonl'))] == ['bad_0']


def test_a_lost_clip_is_reported_unbalanced(tmp_path):
  output = tmp_path / 'out'
  with TestPipeline() as p:
    _ = ({'planned': p | 'P' >> beam.Create(['a_0', 'b_0']), 'earlier': p | 'E' >> beam.Create([]),
          'records': p | 'R' >> beam.Create([]), 'rejects': p | 'X' >> beam.Create([Reject('a_0', 'plan', 'too_short')]),
          'carried': p | 'C' >> beam.Create([])}
         | WriteRunSummary(str(output)))
  stats = json.loads((output / 'stats.json').read_text())
  assert not stats['balanced'] and stats['unbalanced_examples'] == ['b_0']


def test_a_clip_rejected_twice_does_not_cover_for_a_lost_one(tmp_path):
  """a_0 rejected twice and b_0 lost add up to the right totals (0 written + 2 rejected == 2 planned); the run
  is still unbalanced, and names both clips."""
  output = tmp_path / 'out'
  with TestPipeline() as p:
    _ = ({'planned': p | 'P' >> beam.Create(['a_0', 'b_0']), 'earlier': p | 'E' >> beam.Create([]),
          'records': p | 'R' >> beam.Create([]),
          'rejects': p | 'X' >> beam.Create([Reject('a_0', 'plan', 'too_short'), Reject('a_0', 'render', 'no_frames')]),
          'carried': p | 'C' >> beam.Create([])}
         | WriteRunSummary(str(output)))
  stats = json.loads((output / 'stats.json').read_text())
  assert stats['written'] + stats['rejected'] == stats['planned'] == 2
  assert not stats['balanced'] and stats['unbalanced_examples'] == ['a_0', 'b_0']


def test_pieces_count_once_against_their_planned_clip(tmp_path):
  output = tmp_path / 'out'
  records = [{'id': 'v_0_f0', 'planned_id': 'v_0', 'num_frames': 10}]
  rejects = [Reject('v_0_f4000', 'track', 'too_short', planned_id='v_0'),
             Reject('w_0_f0', 'track', 'too_short', planned_id='w_0'),
             Reject('w_0_f5000', 'track', 'too_short', planned_id='w_0')]
  with TestPipeline() as p:
    _ = ({'planned': p | 'P' >> beam.Create(['v_0', 'w_0']), 'earlier': p | 'E' >> beam.Create([]),
          'records': p | 'R' >> beam.Create(records), 'rejects': p | 'X' >> beam.Create(rejects),
          'carried': p | 'C' >> beam.Create([])}
         | WriteRunSummary(str(output)))
  stats = json.loads((output / 'stats.json').read_text())
  assert (stats['written'], stats['rejected'], stats['pieces_rejected'], stats['balanced']) == (1, 1, 3, True)


# ----------------------------------------------------------------------------- the job graph

def _graph(tmp_path, output, extra=()):
  manifest = tmp_path / 'in.jsonl'
  manifest.write_text(json.dumps({'id': 'a', 'url': str(tmp_path / 'a.mp4')}) + '\n')
  options, opts = prepare([f'--input={manifest}', f'--output={output}', '--run_id=fixed', *extra])
  p = beam.Pipeline(options=options)
  build_pipeline(p, opts)
  return p.to_runner_api()


def test_the_job_graph_does_not_grow_with_written_ids(tmp_path):
  empty = _graph(tmp_path, tmp_path / 'none0')
  full = tmp_path / 'full0'  # paths of one length: only what was written differs
  (full / 'shards').mkdir(parents=True)
  for shard in range(20):
    lines = ''.join(json.dumps({'id': f'clip{shard}_{i}', 'planned_id': f'clip{shard}_{i}', 'num_frames': 250}) + '\n'
                    for i in range(500))
    (full / 'shards' / f'shard-{shard}.jsonl').write_text(lines)
    (full / 'shards' / f'shard-{shard}.tar').write_bytes(b'')
  (full / 'rejects.jsonl').write_text(''.join(json.dumps(Reject(f'r_{i}', 'track', 'no_face').to_json()) + '\n'
                                              for i in range(2000)))
  written = _graph(tmp_path, full, ['--incremental'])
  # Two builds differ by a few bytes anyway (pickled closures, the text sink's temp name); 10,000 written
  # ids and 2,000 rejects baked in would add well over 100 KB.
  assert abs(written.ByteSize() - _graph(tmp_path, tmp_path / 'none0', ['--incremental']).ByteSize()) < 256
  assert abs(_graph(tmp_path, full).ByteSize() - empty.ByteSize()) < 256
  assert written.ByteSize() < 1_000_000


def test_no_per_frame_element_reaches_a_shuffle(tmp_path):
  """Run the whole job on one 8 s source (200 output frames, 40 detector samples) and count the elements
  that reach every GroupByKey in the graph the runner executed: per clip, never per frame."""
  from apache_beam.metrics import monitoring_infos
  from apache_beam.runners.portability.fn_api_runner import FnApiRunner
  from apache_beam.transforms import environments
  from beam_pipeline.demo import VideoSpec, write_video
  video = write_video(str(tmp_path / 'talk.mp4'), VideoSpec(duration=8.0, fps=25.0))
  manifest = tmp_path / 'in.jsonl'
  manifest.write_text(json.dumps({'id': 'talk', 'url': video, 'clips': [[0, 4], [4, 8]]}) + '\n')
  options, opts = prepare([f'--input={manifest}', f'--output={tmp_path / "out"}', '--size=128', '--no_report'])
  p = beam.Pipeline(options=options)
  build_pipeline(p, opts)
  proto = p.to_runner_api(default_environment=environments.EmbeddedPythonEnvironment.default())
  result = FnApiRunner().run_via_runner_api(proto, options)
  counts = {info.labels['PCOLLECTION']: monitoring_infos.extract_counter_value(info)
            for info in result.monitoring_infos() if info.urn == monitoring_infos.ELEMENT_COUNT_URN}
  into_shuffles = {t.unique_name: counts.get(pcoll, 0) for t in proto.components.transforms.values()
                   if t.spec.urn == 'beam:transform:group_by_key:v1' for pcoll in t.inputs.values()}
  assert len(into_shuffles) >= 5 and json.loads((tmp_path / 'out' / 'stats.json').read_text())['written'] == 2
  assert max(into_shuffles.values()) <= 12, into_shuffles  # 2 clips; 200 frames if per frame


def test_no_model_runs_between_shuffles_per_frame(tmp_path):
  """No RunInference transform in the graph: per-frame models run inside the render and sampling DoFns,
  so no per-frame element can reach a GroupByKey."""
  proto = _graph(tmp_path, tmp_path / 'out')
  names = [t.unique_name for t in proto.components.transforms.values()]
  assert not [n for n in names if 'RunInference' in n or n.endswith('/BeamML_RunInference')], names


# ----------------------------------------------------------------------------- remote runners

def test_distributed_runners_refuse_local_paths(tmp_path):
  base = ['--runner=DataflowRunner', '--project=p', '--region=us-central1', '--temp_location=gs://b/tmp',
          '--dry_run=True']
  with pytest.raises(SystemExit, match='--output=.*local path'):
    prepare(base + ['--input=gs://b/in.jsonl', f'--output={tmp_path}/out'])
  with pytest.raises(SystemExit, match='--input=.*local path'):
    prepare(base + [f'--input={tmp_path}/in.jsonl', '--output=gs://b/out'])
  with pytest.raises(SystemExit, match='--work_dir=.*local path'):
    prepare(base + ['--input=gs://b/in.jsonl', '--output=gs://b/out', f'--work_dir={tmp_path}'])
  with pytest.raises(SystemExit, match='--input=.*local path'):
    prepare(['--runner=FlinkRunner', f'--input={tmp_path}/in.jsonl', '--output=gs://b/out', '--work_dir=gs://b/w'])


def test_a_remote_output_keeps_raw_sources_out_of_the_dataset(tmp_path):
  _, opts = prepare(['--runner=DataflowRunner', '--project=p', '--region=us-central1', '--dry_run=True',
                     '--temp_location=gs://b/tmp', '--input=gs://b/in.jsonl', '--output=gs://b/out'])
  assert opts.work_dir.startswith('gs://b/tmp/talking_face_work/') and opts.run_id
  with pytest.raises(SystemExit, match='--work_dir'):
    prepare(['--runner=DataflowRunner', '--project=p', '--region=us-central1', '--dry_run=True',
             '--input=gs://b/in.jsonl', '--output=gs://b/out'])
  _, opts = prepare(['--dry_run=True', '--input=gs://b/in.jsonl', '--output=gs://b/out'])
  assert not opts.work_dir.startswith('gs://b/out')  # DirectRunner: this machine's cache
  _, opts = prepare(['--runner=PortableRunner', '--environment_type=LOOPBACK', '--dry_run=True',
                     f'--input={tmp_path}/in.jsonl', f'--output={tmp_path}/out'])
  assert opts.work_dir == os.path.join(str(tmp_path), 'out', '_work')


def test_unfinished_files_of_a_job_still_writing_are_left_alone(tmp_path):
  shards = tmp_path / 'shards'
  shards.mkdir()
  (shards / 'shard-a.jsonl').write_text('{}\n')  # in flight: its tar comes next
  (shards / 'shard-b.tar.partial').write_bytes(b'x')
  old = shards / 'shard-c.jsonl'
  old.write_text('{}\n')
  os.utime(old, (1, 1))
  killed, writing = tmp_path / 'beam-temp-rejects-1', tmp_path / 'beam-temp-rejects-2'  # Beam's text sink
  for folder in (killed, writing):
    folder.mkdir()
    (folder / 'piece.rejects.jsonl').write_text('{}\n')
  os.utime(killed / 'piece.rejects.jsonl', (1, 1))
  assert write.clean_unfinished(str(tmp_path), older_than_s=3600) == 2
  assert sorted(os.listdir(shards)) == ['shard-a.jsonl', 'shard-b.tar.partial']
  assert os.listdir(killed) == [] and os.listdir(writing) == ['piece.rejects.jsonl']
  assert fileio.remove_empty_dirs(str(tmp_path)) == 1 and not killed.exists() and shards.exists()
