"""No code from a pickle ever runs: a payload that would create a file is planted in every place a pickle can
arrive (an archive's metadata sidecar, a sample tar's `.pyd`, FLAME weights, a DECA embedding, torch weights)
and read with --read_input_pickles and --trust_weight_pickles each on and off."""
import io
import json
import os
import pickle
import tarfile

import numpy as np
import pytest

from beam_pipeline.recipes.avatar import flame
from model_handlers.face_parsing import FaceParsingModelHandler
from model_handlers.weights import WeightsError
from tests import flame_synthetic
from tests.helpers import REPO, read_jsonl
from transforms.core.elements import Reject, Source
from transforms.lib.pickles import RefusedGlobal, load_restricted
from transforms.lib.safety import InputPolicy
from transforms.sources.manifest import list_input

# (read_input_pickles, trust_weight_pickles) through the CLI (two runs each): one flag on and the other off. Each
# flag is then on and off for what it guards, and neither flag's "on" may leak into what the other one guards.
CROSSED = [(False, True), (True, False)]


class Payload:
  """Unpickling this with plain pickle.loads runs `touch <marker>`."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return os.system, (f'touch {self.marker}',)


def _tar(path, members):
  with tarfile.open(path, 'w') as archive:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      archive.addfile(info, io.BytesIO(data))
  return str(path)


@pytest.fixture()
def planted(tmp_path):
  """Every file a pickle can arrive in, each carrying the payload; `marker` must never exist."""
  marker = tmp_path / 'payload_ran'
  payload = Payload(marker)
  sidecar = _tar(tmp_path / 'sidecar.tar', [('talk.mp4', b'not a video'),
                                            ('talk.pkl', pickle.dumps({'clips': [[0, 1]], 'x': payload}))])
  samples = _tar(tmp_path / 'samples.tar', [('k1.mp4', b'not a video'),
                                            ('k1.dwpose_result.pyd', pickle.dumps([payload])),
                                            ('k1.json', json.dumps({'size': [64, 64]}).encode())])
  model = tmp_path / 'generic_model.pkl'
  model.write_bytes(pickle.dumps({'v_template': payload, 'f': np.zeros((1, 3))}, protocol=2))
  embedding = tmp_path / 'landmark_embedding.npy'
  np.save(embedding, np.array({'static_lmk_faces_idx': payload}, dtype=object), allow_pickle=True)
  torch_weights = tmp_path / '79999_iter.pth'
  torch_weights.write_bytes(pickle.dumps({'cp.conv1.weight': payload}))
  return {'marker': marker, 'sidecar': sidecar, 'samples': samples, 'model': str(model),
          'embedding': str(embedding), 'torch': str(torch_weights), 'payload': payload}


def test_the_payload_is_real(planted):
  """Plain pickle.loads would run it: the marker appears (so its absence below means something)."""
  pickle.loads(pickle.dumps(planted['payload']))
  assert planted['marker'].exists()


def test_the_restricted_loader_refuses_the_payload_and_rebuilds_data(planted):
  with pytest.raises(RefusedGlobal, match='system'):
    load_restricted(pickle.dumps({'a': planted['payload']}))
  data = {'clips': [[0.5, 2]], 'crop': np.arange(4), 'names': ('a', 'b'), 'set': {1, 2}}
  loaded = load_restricted(pickle.dumps(data, protocol=5))
  assert loaded['clips'] == [[0.5, 2]] and np.array_equal(loaded['crop'], np.arange(4))
  assert loaded['names'] == ('a', 'b') and loaded['set'] == {1, 2}
  assert not planted['marker'].exists()


@pytest.mark.parametrize('read_input_pickles', [False, True])
def test_input_pickles_never_run(planted, read_input_pickles):
  policy = InputPolicy(read_input_pickles=read_input_pickles)
  sidecar = list(list_input(planted['sidecar'], policy=policy))
  samples = list(list_input(planted['samples'], policy=policy))
  assert not planted['marker'].exists()
  rejects = {r.id: (r.reason, r.detail) for r in sidecar + samples if isinstance(r, Reject)}
  if read_input_pickles:
    # The sidecar is read by the restricted loader, which refuses the payload's global: a bad sidecar, the
    # video still listed with a whole-video clip. The sample tar is accepted; its .pyd is never read.
    assert rejects['talk.pkl'][0] == 'bad_sidecar' and 'posix.system' in rejects['talk.pkl'][1]
    assert sorted(s.source_id for s in sidecar + samples if isinstance(s, Source)) == ['k1', 'talk']
  else:
    assert {key: reason for key, (reason, _) in rejects.items()} == {'talk.pkl': 'pickle_refused',
                                                                       'samples': 'pickle_refused'}


def test_a_pickled_sidecar_of_plain_data_gives_its_clips(tmp_path):
  archive = _tar(tmp_path / 'in.tar', [('talk.mp4', b'x'),
                                       ('talk.pkl', pickle.dumps({'clips': np.array([[1.0, 2.0], [3.0, 4.0]])}))])
  (source,) = list_input(archive, policy=InputPolicy(read_input_pickles=True))
  assert [(c.start, c.end) for c in source.clips] == [(1.0, 2.0), (3.0, 4.0)]


@pytest.mark.parametrize('trust_weight_pickles', [False, True])
@pytest.mark.parametrize('where', ['model', 'embedding'])
def test_weight_pickles_never_run(planted, tmp_path, trust_weight_pickles, where):
  """FLAME's model and DECA's embedding: refused without the flag, restricted to arrays with it."""
  if where == 'model':
    model, landmarks = planted['model'], None
  else:  # a good pickle-free model, so that the embedding is what is read
    shapes, embedding, iris = flame_synthetic.build()
    model = flame_synthetic.write_npz(tmp_path / 'flame.npz', shapes, embedding, iris)
    landmarks = planted['embedding']
  with pytest.raises(WeightsError) as refused:
    flame.load_flame(model, trust_weight_pickles, landmarks)
  flag = '--flame_model' if where == 'model' else '--flame_landmarks'
  assert flag in str(refused.value)
  assert ('--trust_weight_pickles' in str(refused.value)) != trust_weight_pickles
  assert not planted['marker'].exists()


def test_torch_weights_are_read_without_pickled_code(planted):
  """Torch files load with weights_only whatever the flags: the payload is refused, naming the flag."""
  with pytest.raises(WeightsError, match='--parsing_weights'):
    FaceParsingModelHandler(planted['torch']).load_model()
  assert not planted['marker'].exists()


@pytest.mark.parametrize('read_input_pickles,trust_weight_pickles', CROSSED)
def test_the_cli_never_runs_a_planted_pickle(planted, tmp_path, read_input_pickles, trust_weight_pickles):
  """Both archives through the real CLI, then the avatar recipe handed the pickled FLAME model: nothing runs,
  inputs end as rejects with reasons, and the weights end the run with one line naming the flag."""
  import subprocess
  import sys
  manifest = tmp_path / 'in.jsonl'
  manifest.write_text(''.join(json.dumps({'id': name, 'url': planted[name]}) + '\n' for name in ('sidecar', 'samples')))
  flags = ['--read_input_pickles'] * read_input_pickles + ['--trust_weight_pickles'] * trust_weight_pickles
  env = dict(os.environ, PYTHONPATH=REPO)
  out = tmp_path / 'out'
  run = subprocess.run([sys.executable, '-m', 'beam_pipeline', f'--input={manifest}', f'--output={out}',
                        '--no_progress', '--no_report', *flags], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  reasons = {r['id']: r['reason'] for r in read_jsonl(os.path.join(out, 'rejects.jsonl'))}
  if read_input_pickles:
    assert reasons['sidecar_talk.pkl'] == 'bad_sidecar' and 'samples' not in reasons
  else:
    assert reasons['sidecar_talk.pkl'] == reasons['samples'] == 'pickle_refused'
  avatar = subprocess.run([sys.executable, '-m', 'beam_pipeline', '--recipe=avatar', f'--input={manifest}',
                           f'--output={tmp_path / "avatar"}', f'--flame_model={planted["model"]}',
                           f'--flame_landmarks={planted["embedding"]}', '--no_progress', *flags],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert avatar.returncode != 0 and 'Traceback' not in avatar.stderr
  last = avatar.stderr.strip().splitlines()[-1]
  assert last.startswith('error: --flame_model') and len(avatar.stderr.strip().splitlines()) == 1
  assert not planted['marker'].exists()
