"""What a person at the terminal sees: native chatter filtered, real errors kept, wrong flags in one line."""
import json
import subprocess
import sys

import pytest

from beam_pipeline import __main__
from beam_pipeline.recipes import get_recipe
from beam_pipeline.demo import VideoSpec, write_video
from tests.helpers import REPO

SCRIPT = r'''
import os, sys
from beam_pipeline import native_log
native_log.filter_native_stderr()
os.write(2, b"WARNING: [model_load.cc:402] Sparsity tensors may not yet be fully supported.\n")
os.write(2, b"INFO: [environment.cc:36] Creating LiteRT environment with options\n")
os.write(2, b"E0000 a real native error\n")
print("python warning", file=sys.stderr)
raise RuntimeError("boom")
'''


def test_native_noise_is_dropped_and_errors_kept():
  result = subprocess.run([sys.executable, '-c', SCRIPT], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert result.returncode == 1
  assert 'Sparsity tensors' not in result.stderr and 'LiteRT environment' not in result.stderr
  assert 'E0000 a real native error' in result.stderr
  assert 'python warning' in result.stderr and 'RuntimeError: boom' in result.stderr


def test_missing_input_is_a_clear_error(tmp_path):
  result = subprocess.run([sys.executable, '-m', 'beam_pipeline', f'--input={tmp_path}/none.jsonl',
                           f'--output={tmp_path}/out'], cwd=REPO, capture_output=True, text=True, timeout=120)
  assert result.returncode != 0
  assert result.stderr.strip().splitlines()[-1] == f'--input {tmp_path}/none.jsonl does not exist'


def cli_main(monkeypatch, *args):
  """`python -m beam_pipeline ARGS` in this process (no interpreter start): the SystemExit it ends with."""
  monkeypatch.setattr(sys, 'argv', ['beam_pipeline', *args])
  with pytest.raises(SystemExit) as ended:
    __main__.main()
  return ended.value


def test_an_unknown_flag_exits_2_with_the_nearest(tmp_path, monkeypatch, capfd):
  """Beam alone would warn and run the default recipe."""
  ended = cli_main(monkeypatch, '--recipie=nerf', f'--input={tmp_path}/in.jsonl', f'--output={tmp_path}/out')
  assert ended.code == 2
  assert capfd.readouterr().err.strip().splitlines()[-1] == 'error: unknown flag --recipie; did you mean --recipe?'
  assert not (tmp_path / 'out').exists()


def test_a_glob_that_matches_nothing_fails_before_any_output(tmp_path, monkeypatch):
  ended = cli_main(monkeypatch, f'--input={tmp_path}/*.mp4', f'--output={tmp_path}/out')
  assert str(ended) == f'--input {tmp_path}/*.mp4 matches no file'
  assert not (tmp_path / 'out').exists()


def test_an_empty_manifest_fails(tmp_path, monkeypatch):
  (tmp_path / 'in.jsonl').write_text('\n')
  ended = cli_main(monkeypatch, f'--input={tmp_path}/in.jsonl', f'--output={tmp_path}/out', '--no_progress',
                   '--no_report')
  assert str(ended) == f'error: --input {tmp_path}/in.jsonl holds no entries: nothing to make'


def test_nerf_refuses_allow_silent(tmp_path, monkeypatch):
  """The no_audio reject's hint depends on the recipe: nerf cannot use a silent source at all."""
  (tmp_path / 'in.jsonl').write_text('{"id": "a", "url": "%s"}\n' % (tmp_path / 'a.mp4'))
  ended = cli_main(monkeypatch, '--recipe=nerf', '--allow_silent', '--no_progress',
                   f'--input={tmp_path / "in.jsonl"}', f'--output={tmp_path / "out"}')
  assert str(ended) == '--allow_silent is refused: ' + get_recipe('nerf').silent
  assert not (tmp_path / 'out').exists()


WEIGHTS_FLAGS = [
    ('nerf', ['--parsing_weights={missing}'], '--parsing_weights'),
    ('nerf', ['--audio_features=hubert', '--hubert_model={missing}'], '--hubert_model'),
    ('nerf', ['--audio_features=mel,wav2vec', '--wav2vec_model={missing}'], '--wav2vec_model'),
    ('nerf', ['--audio_features=deepspeech', '--deepspeech_model={missing}'], '--deepspeech_model'),
    ('nerf', ['--depth={missing}'], '--depth'),
    ('avatar', ['--matting_weights={missing}'], '--matting_weights'),
    ('avatar', ['--flame_model={missing}'], '--flame_model'),
    ('avatar', ['--flame_model={missing}', '--flame_landmarks={missing}'], '--flame_model'),
    ('megactor', ['--dwpose_detector={missing}', '--dwpose_model={missing}'], '--dwpose_detector'),
    ('megactor', ['--style=sdxl_turbo', '--sdxl_model={missing}'], '--sdxl_model'),
    ('megactor', ['--faceswap_cmd=swap {{source}} {{target}} {{output}}', '--source_images={missing}'],
     '--source_images'),
    ('mmvox', ['--parsing_weights={missing}'], '--parsing_weights'),
    ('hdtf', ['--syncnet_weights={missing}'], '--syncnet_weights'),
]


@pytest.mark.parametrize('recipe,flags,named', WEIGHTS_FLAGS,
                         ids=[f'{r}{f[-1].split("=")[0]}' for r, f, _ in WEIGHTS_FLAGS])
def test_a_wrong_weights_path_is_one_line_naming_its_flag(tmp_path, monkeypatch, capsys, recipe, flags, named):
  """When the graph is built (before any work): `error: --flag (path): ...`, no traceback."""
  (tmp_path / 'in.jsonl').write_text('{"id": "a", "url": "%s"}\n' % (tmp_path / 'a.mp4'))
  missing = tmp_path / 'no_such_weights'
  argv = [f'--recipe={recipe}', f'--input={tmp_path / "in.jsonl"}', f'--output={tmp_path / "out"}', '--no_progress',
          *(flag.format(missing=missing) for flag in flags)]
  monkeypatch.setattr(sys, 'argv', ['beam_pipeline', *argv])
  with pytest.raises(SystemExit) as ended:
    __main__.main()
  message = str(ended.value)
  assert message.startswith(f'error: {named} ') and str(missing) in message and '\n' not in message


@pytest.mark.parametrize('flags,expected', [
    (['--audio_features=deepspeech'], 'error: --deepspeech_model: not given; pass the path of DeepSpeech 0.1.0'),
    (['--audio_features=hubert,lpc'], "--audio_features=hubert,lpc: audio feature kind 'lpc' is not one of mel,"),
], ids=['model_not_given', 'unknown_kind'])
def test_nerf_audio_flags_are_one_line(tmp_path, monkeypatch, flags, expected):
  (tmp_path / 'in.jsonl').write_text('{"id": "a", "url": "%s"}\n' % (tmp_path / 'a.mp4'))
  monkeypatch.setattr(sys, 'argv', ['beam_pipeline', '--recipe=nerf', f'--input={tmp_path / "in.jsonl"}',
                                    f'--output={tmp_path / "out"}', '--no_progress', *flags])
  with pytest.raises(SystemExit) as ended:
    __main__.main()
  assert str(ended.value).startswith(expected) and '\n' not in str(ended.value)


def test_weights_a_worker_cannot_load_are_one_line_too(tmp_path):
  """Weights that exist but are not what the flag wants fail when the model loads on the worker; the local
  runner re-raises that as its own error, and the CLI still prints only the weights error, naming the flag."""
  video = tmp_path / 'a.mp4'
  write_video(str(video), VideoSpec(duration=1.2, width=160, height=120))
  (tmp_path / 'in.jsonl').write_text(json.dumps({'id': 'a', 'url': str(video)}) + '\n')
  (tmp_path / 'bad.pth').write_bytes(b'not a state dict')
  result = subprocess.run([sys.executable, '-m', 'beam_pipeline', '--recipe=nerf', f'--input={tmp_path}/in.jsonl',
                           f'--output={tmp_path}/out', f'--parsing_weights={tmp_path}/bad.pth', '--size=64',
                           '--no_progress', '--no_report'], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f'error: --parsing_weights ({tmp_path}/bad.pth): '), lines[-5:]
