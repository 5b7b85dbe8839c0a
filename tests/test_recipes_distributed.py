"""The four recipes (nerf, avatar, megactor, mmvox) under what DirectRunner never shows: every shuffle of a real
run counted (per clip, never per frame), each writer's side-effecting DoFn run twice and failing half-way as a
retried bundle would, the Dataflow translation, and a graph that does not grow with the data.

One real FnApiRunner run per recipe (module-scoped) records the element count of every PCollection and, each time
the writer's DoFn is called, its input element and a copy of the work dir at that moment; the retry tests
replay that element against the restored work dir and compare what they write with the real run's output.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import pickle
import shutil
import threading
from typing import Callable, Dict, List, Optional

import apache_beam as beam
import pytest
from apache_beam.io.filesystems import FileSystems

from beam_pipeline.__main__ import OUTPUT_RECORD, prepare
from beam_pipeline.demo import VideoSpec, write_video
from beam_pipeline.pipeline import build_pipeline
from beam_pipeline.recipes import get_recipe
from beam_pipeline.recipes.avatar import writer as avatar_writer
from beam_pipeline.recipes.megactor import writer as megactor_writer
from beam_pipeline.recipes.mmvox import writer as mmvox_writer
from beam_pipeline.recipes.nerf import writer as nerf_writer
from tests.helpers import read_jsonl, read_shards
from transforms import filters
from transforms.core.elements import ShardBatch
from transforms.deadletter import DeadLetter
from transforms.writers import folders, shards as write
from transforms.writers.shards import PublishShard, sample_key

QUIET = ('--no_report', '--no_progress')
# One per output or run, not per unit (mmvox's caches: beside the folder); each run's own copies under runs/<id>/.
RUN_FILES = {'index.jsonl', 'rejects.jsonl', 'stats.json', 'output.json'}
SHUFFLE_URNS = ('beam:transform:group_by_key:v1', 'beam:transform:combine_per_key:v1')


# ----------------------------------------------------------------------------- one real run per recipe

@dataclasses.dataclass
class RecipeRun:
  output: str
  work: str
  opts: object = dataclasses.field(repr=False)
  frames: int  # output frames the run wrote
  into_shuffles: Dict[str, int]  # transform -> elements into it, for every GroupByKey, combine and keyed state
  # DoFn class name -> [(pickled input element, work-dir copy)] in call order
  captured: Dict[str, List[tuple]] = dataclasses.field(repr=False)

  def element(self, fn: str, index: int = 0):
    """The `index`-th input of `fn` in the run, with the work dir as it was then."""
    data, snapshot = self.captured[fn][index]
    shutil.rmtree(self.work, ignore_errors=True)
    shutil.copytree(snapshot, self.work)
    return pickle.loads(data)


def _stateful(transform) -> bool:
  from apache_beam.portability.api import beam_runner_api_pb2
  if transform.spec.urn != 'beam:transform:pardo:v1':
    return False
  payload = beam_runner_api_pb2.ParDoPayload.FromString(transform.spec.payload)
  return bool(payload.state_specs)


@contextlib.contextmanager
def _capturing(classes, work: str, snapshots: str, captured: Dict[str, list]):
  """Record each input of the DoFn `classes` (pickled) and copy the work dir before the DoFn sees it.
  FnApiRunner's embedded workers run in this process, so patching the class reaches the deserialized DoFns."""
  with pytest.MonkeyPatch.context() as patch:
    for cls in classes:
      def process(self, element, *args, _original=cls.process, _name=cls.__name__, **kwargs):
        calls = captured.setdefault(_name, [])
        snapshot = os.path.join(snapshots, f'{_name}-{len(calls)}')
        shutil.copytree(work, snapshot)
        calls.append((pickle.dumps(element), snapshot))
        return _original(self, element, *args, **kwargs)
      patch.setattr(cls, 'process', process)
    yield


def run_recipe(root, argv, capture=()) -> RecipeRun:
  """The whole job on FnApiRunner (as test_distributed's shuffle count): element counts per PCollection."""
  from apache_beam.metrics import monitoring_infos
  from apache_beam.runners.portability.fn_api_runner import FnApiRunner
  from apache_beam.transforms import environments
  output, work = str(root / 'out'), str(root / 'work')
  options, opts = prepare([f'--output={output}', f'--work_dir={work}', *argv, *QUIET])
  p = beam.Pipeline(options=options)
  build_pipeline(p, opts)
  proto = p.to_runner_api(default_environment=environments.EmbeddedPythonEnvironment.default())
  captured: Dict[str, list] = {}
  os.makedirs(work, exist_ok=True)
  with _capturing(capture, work, str(root / 'snapshots'), captured):
    result = FnApiRunner().run_via_runner_api(proto, options)
  counts = {info.labels['PCOLLECTION']: monitoring_infos.extract_counter_value(info)
            for info in result.monitoring_infos() if info.urn == monitoring_infos.ELEMENT_COUNT_URN}
  into = {}
  for transform in proto.components.transforms.values():
    if transform.spec.urn in SHUFFLE_URNS or _stateful(transform):
      into[transform.unique_name] = sum(counts.get(pcoll, 0) for pcoll in transform.inputs.values())
  stats = json.loads(pathlib.Path(output, 'stats.json').read_text())
  assert stats['balanced'] and stats['rejected'] == 0, stats
  return RecipeRun(output, work, opts, stats['frames_written'], into, captured)


def _talker(root, seed: int, duration: float = 2.4) -> str:
  video = str(root / 'talker.mp4')
  write_video(video, VideoSpec(duration=duration, fps=25.0, seed=seed, motion_px=8.0))
  manifest = root / 'videos.jsonl'
  half = round(duration / 2, 2)
  manifest.write_text(json.dumps({'id': 'talker', 'url': video, 'clips': [[half, duration], [0.0, half]]}) + '\n')
  return str(manifest)


@pytest.fixture(scope='module')
def nerf_run(tmp_path_factory):
  """Two clips (60 frames) of one subject at 128 px."""
  root = tmp_path_factory.mktemp('nerf_dist')
  return run_recipe(root, [f'--input={_talker(root, 4)}', '--recipe=nerf', '--size=128'],
                    [nerf_writer.WriteSubject, filters.ScoreAndFilter])


@pytest.fixture(scope='module')
def avatar_run(tmp_path_factory):
  root = tmp_path_factory.mktemp('avatar_dist')
  return run_recipe(root, [f'--input={_talker(root, 5)}', '--recipe=avatar', '--size=128'],
                    [avatar_writer.WriteSubject])


@pytest.fixture(scope='module')
def mmvox_run(tmp_path_factory):
  """One 75-frame tube of a 1080p talking head (the face box about 320 px), as test_recipe_mmvox uses."""
  root = tmp_path_factory.mktemp('mmvox_dist')
  video = str(root / 'speaker.mp4')
  write_video(video, VideoSpec(duration=3.0, fps=25.0, width=1920, height=1080, face_scale=3.0, crf=35, seed=2))
  return run_recipe(root, [f'--input={video}', '--recipe=mmvox'], [mmvox_writer.WriteTube])


@pytest.fixture(scope='module')
def megactor_run(tmp_path_factory):
  """A VFHQ-style zip of two frame folders (40 and 36 frames)."""
  from tests.test_frame_sources import astronaut_frames, write_frame_zip
  root = tmp_path_factory.mktemp('megactor_dist')
  archive = write_frame_zip(str(root / 'group1.zip'), {'Clip+abc+P0': astronaut_frames(40),
                                                       'Clip+def+P1': astronaut_frames(36, seed=1)})
  # The generated astronaut's eyes do not move: MegActor's eye-motion filter would reject it.
  return run_recipe(root, [f'--input={archive}', '--recipe=megactor', '--size=128', '--min_eye_motion_var=0'],
                    [megactor_writer.MakeCopies])


RUNS = ('nerf', 'avatar', 'megactor', 'mmvox')
WRITER_SHUFFLES = {'nerf': ('NerfWriter/NerfBySubject', 'NerfWriter/NerfMergeBackgrounds'),
                   'avatar': ('AvatarWriter/AvatarGroupSubjects',),
                   'megactor': ('WriteShards',),
                   'mmvox': ('MmvoxLoaderCaches/MmvoxCombineCache',)}


@pytest.mark.parametrize('recipe', RUNS)
def test_no_per_frame_element_reaches_a_shuffle(recipe, request):
  """Every GroupByKey, CoGroupByKey, combine and keyed-state ParDo of the recipe's real run gets per-clip (or
  per-subject) elements: a handful for 1-2 clips, where per-frame elements would be 60-76."""
  run = request.getfixturevalue(f'{recipe}_run')
  assert run.frames >= 60
  assert len(run.into_shuffles) >= 10 and max(run.into_shuffles.values()) <= 8, run.into_shuffles
  writer = {name: count for name, count in run.into_shuffles.items()
            if name.startswith(WRITER_SHUFFLES[recipe]) and count}
  assert writer, f'no shuffle of the {recipe} writer saw an element: {run.into_shuffles}'


# ----------------------------------------------------------------------------- the writers, retried

class FileLog:
  """Every file a writer module publishes (write_atomic, put_file) and deletes (delete_quietly), in order,
  patched where the writer looks them up; `fail_at=N` makes the N-th publish raise as a failing disk would."""

  def __init__(self, patch: pytest.MonkeyPatch, modules, published: Callable[[], bool],
               fail_at: Optional[int] = None):
    self.writes: List[str] = []
    self.deletes: List[tuple] = []  # (uris, whether the unit was published then)
    self.fail_at = fail_at
    self.published = published
    for module in modules:
      for name, wrap in (('write_atomic', self._publish), ('put_file', self._publish),
                         ('delete_quietly', self._delete)):
        if hasattr(module, name):
          patch.setattr(module, name, wrap(getattr(module, name)))

  def _publish(self, original):
    def publish(*args, **kwargs):
      uri = args[1] if original.__name__ == 'put_file' else args[0]
      if self.fail_at is not None and len(self.writes) + 1 == self.fail_at:
        raise OSError(f'injected: the disk failed writing {uri}')
      self.writes.append(uri)
      return original(*args, **kwargs)
    return publish

  def media_deletes(self, work: str) -> List[bool]:
    """For each deletion of work-dir files: whether the unit was published by then."""
    return [published for uris, published in self.deletes if any(uri.startswith(work) for uri in uris)]

  def _delete(self, original):
    def delete(uris):
      uris = list(uris)
      self.deletes.append((uris, self.published()))
      return original(uris)
    return delete


def attempt(fn, element, log_modules=(), published=lambda: False, fail_at=None):
  """One bundle's run of `fn` on `element`: (records, rejects, FileLog, the exception it raised or None)."""
  with pytest.MonkeyPatch.context() as patch:
    log = FileLog(patch, log_modules, published, fail_at)
    if hasattr(fn, 'setup'):
      fn.setup()
    outputs, error = [], None
    try:
      outputs = list(fn.process(element))
    except OSError as raised:
      error = raised
  records = [o for o in outputs if not isinstance(o, beam.pvalue.TaggedOutput)]
  rejects = [o.value for o in outputs if isinstance(o, beam.pvalue.TaggedOutput)]
  return records, rejects, log, error


def tree(root: str) -> Dict[str, bytes]:
  """Relative path -> bytes of every file under `root` but the run-level ones."""
  found = {}
  for folder, _, names in os.walk(root):
    for name in names:
      path = os.path.join(folder, name)
      relative = os.path.relpath(path, root)
      if relative not in RUN_FILES and not relative.startswith('runs' + os.sep):
        found[relative] = pathlib.Path(path).read_bytes()
  return found


def as_json(records):
  return [json.loads(json.dumps(record, sort_keys=True)) for record in records]


@dataclasses.dataclass
class FolderWriter:
  """How to replay one folder recipe's writer DoFn."""
  fixture: str
  dofn: str  # the captured class
  make: Callable  # (output, opts) -> the DoFn
  module: object
  unit: Callable  # input element -> its unit name
  media: Callable  # input element -> the work-dir files it consumes


def _nerf_media(element):
  return [uri for clip in element[1]['clips'] for uri in clip.consumed]


def _avatar_media(element):
  return [uri for clip in element[1] for uri in clip.consumed]


FOLDER_WRITERS = {
    'nerf': FolderWriter('nerf_run', 'WriteSubject', lambda out, o: nerf_writer.WriteSubject(
        out, o.audio_features, o.focal, o.val_every, o.hubert_model), nerf_writer, lambda e: e[0], _nerf_media),
    'avatar': FolderWriter('avatar_run', 'WriteSubject', lambda out, o: avatar_writer.WriteSubject(out),
                           avatar_writer, lambda e: e[0], _avatar_media),
    'mmvox': FolderWriter('mmvox_run', 'WriteTube', lambda out, o: mmvox_writer.WriteTube(
        out, o.tube_format, bool(o.parsing_weights)), mmvox_writer, lambda e: mmvox_writer.unit_name(mmvox_writer.tube_key(e.clip.task)),
        lambda e: [e.clip.mp4_uri, *e.clip.files.values()]),
}


def _replay(recipe, request):
  spec = FOLDER_WRITERS[recipe]
  run = request.getfixturevalue(spec.fixture)
  element = run.element(spec.dofn)
  unit = spec.unit(element)
  media = spec.media(element)
  assert media and all(os.path.exists(uri) for uri in media)
  clean = tree(run.output)
  assert f'published/{unit}.jsonl' in clean
  return spec, run, element, unit, media, clean


@pytest.mark.parametrize('recipe', list(FOLDER_WRITERS))
def test_a_writer_run_twice_publishes_last_and_the_retry_re_emits_its_records(recipe, request, tmp_path):
  """The first attempt writes every file, publishes the unit last, then deletes the clips' media; its bundle
  is then retried (the media gone): the same records again, no reject, and the folder is byte-identical to the
  real run's."""
  spec, run, element, unit, media, clean = _replay(recipe, request)
  output = str(tmp_path / 'out')
  index = folders.unit_index_uri(output, unit)
  modules = (spec.module, folders)
  records, rejects, log, error = attempt(spec.make(output, run.opts), element, modules, lambda: os.path.exists(index))
  assert error is None and rejects == [] and records
  assert log.writes[-1] == index and log.writes.count(index) == 1 and len(log.writes) > 10
  assert log.media_deletes(run.work) and all(log.media_deletes(run.work))
  assert not [uri for uri in media if os.path.exists(uri)]
  assert as_json(records) == read_jsonl(os.path.join(run.output, folders.PUBLISHED, unit + '.jsonl'))

  retried, rejects, log, error = attempt(spec.make(output, run.opts), element, modules)
  assert error is None and rejects == [] and as_json(retried) == as_json(records) and log.writes == []
  assert tree(output) == clean


@pytest.mark.parametrize('recipe', list(FOLDER_WRITERS))
def test_a_writer_failing_half_way_keeps_its_media_and_the_retry_completes(recipe, request, tmp_path):
  """The disk fails on the middle file: nothing is published and no work-dir media is deleted (the writer
  raises, or rejects its clips as internal_error); once the fault clears the retry writes the same folder as
  the real run, over the half-written one."""
  spec, run, element, unit, media, clean = _replay(recipe, request)
  output = str(tmp_path / 'out')
  index = folders.unit_index_uri(output, unit)
  files = len([path for path in clean if path != f'published/{unit}.jsonl'])
  records, rejects, log, error = attempt(spec.make(output, run.opts), element, (spec.module, folders),
                                         lambda: os.path.exists(index), fail_at=files // 2)
  assert records == [] and (error is not None or {r.reason for r in rejects} == {'internal_error'})
  assert error is not None or 'injected' in rejects[0].detail
  assert not os.path.exists(index) and log.media_deletes(run.work) == []
  assert all(os.path.exists(uri) for uri in media)
  assert len(tree(output)) >= files // 3  # half a folder on disk, unpublished

  records, rejects, _, error = attempt(spec.make(output, run.opts), element)
  assert error is None and rejects == [] and records
  assert tree(output) == clean
  assert not [uri for uri in media if os.path.exists(uri)]


def _two_attempts_at_once(fn_a, fn_b, element, module):
  """A runner's backup attempt B beside a slow attempt A of one bundle: B passes the "already published?" check
  and stops at its first read of work-dir media; A then runs to the end (publishes, deletes that media); then B
  goes on. Returns each attempt's (records, rejects) and whether B's DeadLetter found the unit published."""
  b_paused, a_done = threading.Event(), threading.Event()
  found_published = []
  with pytest.MonkeyPatch.context() as patch:
    for name in ('read_frame_archive', 'read_bytes'):
      if hasattr(module, name):
        def hold(*args, _original=getattr(module, name), **kwargs):
          if threading.current_thread().name == 'attempt-b' and not b_paused.is_set():
            b_paused.set()
            assert a_done.wait(120)
          return _original(*args, **kwargs)
        patch.setattr(module, name, hold)
    published = fn_b.published
    patch.setattr(fn_b, 'published', lambda element: found_published.append(published(element)) or
                  found_published[-1])
    results = {}

    def run(name, fn):
      dead_letter = DeadLetter(fn, 'write')
      dead_letter.setup()
      outputs = list(dead_letter.process(element))
      results[name] = ([o for o in outputs if not isinstance(o, beam.pvalue.TaggedOutput)],
                       [o.value for o in outputs if isinstance(o, beam.pvalue.TaggedOutput)])

    second = threading.Thread(target=run, args=('b', fn_b), name='attempt-b')
    second.start()
    assert b_paused.wait(120)
    run('a', fn_a)
    a_done.set()
    second.join(120)
  return results['a'], results['b'], found_published


@pytest.mark.parametrize('recipe', list(FOLDER_WRITERS))
def test_two_attempts_of_a_writer_at_once_give_each_clip_one_record_and_no_reject(recipe, request, tmp_path):
  """The attempt that loses the race finds its media deleted: it re-emits the unit's published records instead
  of rejecting its clips `internal_error` (which would count a written clip as rejected too)."""
  spec, run, element, unit, media, clean = _replay(recipe, request)
  output = str(tmp_path / 'out')
  (a_records, a_rejects), (b_records, b_rejects), found = _two_attempts_at_once(
      spec.make(output, run.opts), spec.make(output, run.opts), element, spec.module)
  assert a_rejects == [] and b_rejects == []
  assert found and found[-1] is not None  # B failed on the deleted media and took A's published records
  expected = read_jsonl(os.path.join(run.output, folders.PUBLISHED, unit + '.jsonl'))
  assert as_json(a_records) == as_json(b_records) == expected
  assert sorted(r['id'] for r in b_records) == sorted(set(r['id'] for r in b_records))  # one record per clip
  assert tree(output) == clean


def _earlier_version(output: str, unit: str, run: RecipeRun, clean: Dict[str, bytes]) -> str:
  """The unit as a run published it before its clips changed: the real run's files with other bytes, one frame
  past the new count, and its records from other inputs. Returns that frame's path."""
  index = f'{folders.PUBLISHED}/{unit}.jsonl'
  frame = next(path for path in sorted(clean) if path != index and os.path.basename(path).split('.')[0].isdigit())
  stem, ext = os.path.basename(frame).split('.', 1)
  past = os.path.join(os.path.dirname(frame), '9' * max(3, len(stem)) + '.' + ext)
  records = read_jsonl(os.path.join(run.output, index))
  for relative in [*clean, past]:
    path = pathlib.Path(output, relative)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b'earlier' if relative != index else ''.join(
        json.dumps(dict(record, inputs='earlier')) + '\n' for record in records).encode())
  return past


@pytest.mark.parametrize('recipe', list(FOLDER_WRITERS))
def test_writers_replacing_an_earlier_version_at_once_leave_the_new_one(recipe, request, tmp_path):
  """A unit published before its clips changed is made again by two attempts at once (B stops at its first read
  of media until A has published and deleted it) and a retry: the real run's folder exactly (the earlier bytes
  and the frame past the new count gone), one record per clip, no reject, and the retry writes nothing."""
  spec, run, element, unit, _, clean = _replay(recipe, request)
  output = str(tmp_path / 'out')
  past = _earlier_version(output, unit, run, clean)
  (a_records, a_rejects), (b_records, b_rejects), found = _two_attempts_at_once(
      spec.make(output, run.opts), spec.make(output, run.opts), element, spec.module)
  expected = read_jsonl(os.path.join(run.output, folders.PUBLISHED, unit + '.jsonl'))
  assert a_rejects == b_rejects == [] and found and found[-1] is not None
  assert as_json(a_records) == as_json(b_records) == expected
  assert tree(output) == clean and not os.path.exists(os.path.join(output, past))
  retried, rejects, log, error = attempt(spec.make(output, run.opts), element, (spec.module, folders))
  assert error is None and rejects == [] and as_json(retried) == expected and log.writes == []


def _megactor_parts(run):
  from beam_pipeline.recipes.megactor.stylize import make_styler
  opts = run.opts
  copies = megactor_writer.MakeCopies(run.work, make_styler(opts.style, opts.sdxl_model, opts.style_prompt),
                                      megactor_writer.style_key(opts.style, opts.style_prompt, opts.sdxl_model),
                                      None, opts.crf, opts.x264_preset)
  return copies, megactor_writer.AssembleMegactorSample(run.work, opts.style, None, opts.megactor_members)


def _sample_digest(samples):
  """key -> members (the json without its shard name, which is random per run)."""
  result = {}
  for sample in samples:
    members = {name: value for name, value in sample.items() if not name.startswith('__')}
    members['json'] = {k: v for k, v in members['json'].items() if k != 'shard'}
    result[sample['__key__']] = {name: value.tobytes() if hasattr(value, 'tobytes') else value
                                 for name, value in members.items()}
  return result


def test_megactor_copies_and_samples_run_twice_then_publish_the_real_runs_bytes(megactor_run, tmp_path):
  """MakeCopies and AssembleMegactorSample twice, as retried bundles: the copies are made once (kept under
  names from the clip id) and the same fragment is packed; the shard published from it (twice, the second
  after the media went) holds the real run's sample byte for byte."""
  element = megactor_run.element('MakeCopies')
  copies, assemble = _megactor_parts(megactor_run)
  first, _, _, error = attempt(copies, element)
  styled = first[0].clip.files[megactor_writer.STYLED]
  made = pathlib.Path(styled).read_bytes(), os.stat(styled).st_mtime_ns
  second, _, _, error2 = attempt(copies, element)
  assert error is None and error2 is None and len(first) == len(second) == 1
  assert second[0].clip.files == first[0].clip.files
  assert (pathlib.Path(styled).read_bytes(), os.stat(styled).st_mtime_ns) == made  # found, not made again

  (ref,), _, _, _ = attempt(assemble, second[0])
  fragment = pathlib.Path(ref.fragment_uri).read_bytes()
  (again,), _, _, _ = attempt(assemble, second[0])
  assert again == ref and pathlib.Path(ref.fragment_uri).read_bytes() == fragment
  assert styled in ref.consumed and element.clip.mp4_uri in ref.consumed

  output = str(tmp_path / 'out')
  batch = ShardBatch((ref,))
  published, _, _, _ = attempt(PublishShard(output), batch)
  assert not [uri for uri in (ref.fragment_uri, *ref.consumed) if os.path.exists(uri)]
  retried, _, _, error = attempt(PublishShard(output), batch)
  assert error is None and retried == published and [r['id'] for r in published] == [element.clip.task.clip_id]
  ours = _sample_digest(read_shards(output))
  real = _sample_digest(read_shards(megactor_run.output))
  assert list(ours) == [ref.key] and ours[ref.key] == real[ref.key]
  assert {megactor_writer.STYLED, 'dwpose_result.pyd', 'dwpose_score.pyd', 'faces_bbox.pyd'} <= set(ours[ref.key])


def test_megactor_copy_failing_half_way_leaves_no_copy_and_the_retry_makes_the_same(megactor_run, tmp_path):
  """The styled copy's upload fails: no copy under its final name (a retry would keep it), the rendered clip
  stays; the retry makes a copy with the real run's bytes; packing the sample failing next leaves no fragment
  and keeps the copy."""
  element = megactor_run.element('MakeCopies')
  copies, assemble = _megactor_parts(megactor_run)
  target = copies.target(element.clip.task.clip_id, megactor_writer.STYLED)
  records, _, _, error = attempt(copies, element, (megactor_writer,), fail_at=1)
  assert records == [] and error is not None and not os.path.exists(target)
  assert os.path.exists(element.clip.mp4_uri)
  (retried,), _, log, error = attempt(copies, element, (megactor_writer,))
  assert error is None and log.writes == [target]
  refs, _, _, error = attempt(assemble, retried, (write,), fail_at=1)  # then packing the sample fails
  fragment = FileSystems.join(megactor_run.work, write.FRAGMENTS, f'{sample_key(retried.clip.task.clip_id)}.tar')
  assert refs == [] and error is not None and not os.path.exists(fragment) and os.path.exists(target)
  (ref,), _, _, _ = attempt(assemble, retried)
  assert ref.fragment_uri == fragment
  output = str(tmp_path / 'out')
  attempt(PublishShard(output), ShardBatch((ref,)))
  real = _sample_digest(read_shards(megactor_run.output))[ref.key]
  assert _sample_digest(read_shards(output))[ref.key][megactor_writer.STYLED] == real[megactor_writer.STYLED]


def test_a_filtered_clip_leaves_no_frame_archive(nerf_run):
  """A clip rejected by the filters takes its rendered mp4 and its frame archives with it (nothing else will
  read them), and a retried bundle finds them gone and rejects the clip the same way."""
  rendered = pickle.loads(nerf_run.captured['ScoreAndFilter'][0][0])
  nerf_run.element('WriteSubject')  # the work dir while every kept clip's archives were there
  media = [rendered.mp4_uri, *rendered.files.values()]
  assert rendered.files and all(os.path.exists(uri) for uri in media)
  kept, rejects, _, _ = attempt(filters.ScoreAndFilter(filters.Thresholds()), rendered)
  assert kept and not rejects and all(os.path.exists(uri) for uri in media)  # kept: its writer needs them
  strict = filters.ScoreAndFilter(filters.Thresholds(min_face_px=10_000))
  kept, rejects, _, _ = attempt(strict, rendered)
  assert kept == [] and [r.reason for r in rejects] == ['face_too_small'], rejects
  assert not [uri for uri in media if os.path.exists(uri)]
  kept, retried, _, error = attempt(strict, rendered)
  assert error is None and retried == rejects


# ----------------------------------------------------------------------------- the job graph

DATAFLOW = ('--runner=DataflowRunner', '--dry_run=True', '--project=demo-project', '--region=us-central1',
            '--temp_location=gs://demo-bucket/tmp')
WRITERS = {'nerf': 'NerfWriter', 'avatar': 'AvatarWriter', 'megactor': 'MegactorCopies', 'mmvox': 'MmvoxWriter'}


@pytest.mark.parametrize('recipe', RUNS)
def test_dataflow_translates_each_recipe_with_remote_paths(recipe, monkeypatch):
  """The Dataflow dry run translates (and so pickles) the recipe's graph with gs:// paths only: work dir
  under --temp_location, no local path left for a worker to miss."""
  monkeypatch.setenv('NO_GCE_CHECK', 'true')
  from beam_pipeline.launcher import launch
  result = launch([*DATAFLOW, f'--recipe={recipe}', '--input=gs://demo-bucket/in/', '--output=gs://demo-bucket/out'])
  pipeline = result.job.proto_pipeline
  top = {t.unique_name for t in pipeline.components.transforms.values()}
  assert {'ReadSources', 'Render', 'ScoreAndFilter', WRITERS[recipe], 'WriteRunSummary'} <= top
  flags = result.job.options.get_all_options()
  assert flags['recipe'] == recipe and flags['work_dir'].startswith('gs://demo-bucket/tmp/')
  assert pipeline.ByteSize() < 1_000_000


SHARD_RECIPES = ('hdtf', 'megactor')


def _graph_size(tmp_path, recipe: str, name: str, sources: int, units: int) -> int:
  """Bytes of the job graph for a manifest of `sources` videos and an output holding `units` published units."""
  root = tmp_path / name
  manifest = root / 'in.jsonl'
  published = root / 'out' / folders.PUBLISHED
  published.mkdir(parents=True)
  manifest.write_text(''.join(json.dumps({'id': f'v{i:05d}', 'url': f'/media/v{i:05d}.mp4'}) + '\n'
                              for i in range(sources)))
  records = [{'id': f'v{i:05d}_0', 'planned_id': f'v{i:05d}_0', 'num_frames': 250, 'folder': f'v{i:05d}'}
             for i in range(units)]
  if recipe in SHARD_RECIPES:  # a shard output's records are its index (a published/ folder marks a folder output)
    published.rmdir()
    (root / 'out' / 'index.jsonl').write_text(''.join(json.dumps(record) + '\n' for record in records))
  for record in records if recipe not in SHARD_RECIPES else ():
    (published / f'{record["folder"]}.jsonl').write_text(json.dumps(record) + '\n')
  # The output this recipe made (these short records do not show their recipe, as an output from before
  # output.json would have to).
  (root / 'out' / OUTPUT_RECORD).write_text(json.dumps({'recipe': recipe, 'layout': get_recipe(recipe).layout}))
  options, opts = prepare([f'--input={manifest}', f'--output={root / "out"}', f'--recipe={recipe}', '--run_id=fixed',
                           *QUIET])
  p = beam.Pipeline(options=options)
  build_pipeline(p, opts)
  return p.to_runner_api().ByteSize()


@pytest.mark.parametrize('recipe', RUNS)
def test_the_job_graph_does_not_grow_with_the_data(recipe, tmp_path):
  """One video and an empty output, or 2,000 videos and 2,000 published units: the same graph (within the few
  bytes two builds differ by anyway), so nothing of the input is baked into it."""
  small = _graph_size(tmp_path, recipe, 'a', 1, 0)
  large = _graph_size(tmp_path, recipe, 'b', 2000, 2000)
  assert abs(large - small) < 256, (small, large)
