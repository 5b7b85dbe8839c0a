"""The face-swap command: placeholders, no shell, a time limit on the process group, clear failure reasons."""
import os
import shlex
import sys
import time
from fractions import Fraction

import av
import numpy as np
import pytest

from beam_pipeline.recipes.megactor import faceswap

SWAP = '''
import shutil, sys
args = dict(zip(sys.argv[1::2], sys.argv[2::2]))
open(args['--log'], 'w').write(repr(sys.argv[1:]))
shutil.copyfile(args['--target'], args['--output'])
'''
FAIL = '''
import sys
sys.stderr.write('loading models\\n' + 'x' * 2000 + '\\nerror: no face found in source\\n')
sys.exit(1)
'''
HANG = '''
import subprocess, sys, time
child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
open(sys.argv[1], 'w').write(str(child.pid))
time.sleep(60)
'''
NOTHING = 'import sys'
GARBAGE = '''
import sys
open(sys.argv[sys.argv.index('--output') + 1], 'wb').write(b'not a video')
'''


def script(tmp_path, name, text):
  path = tmp_path / name
  path.write_text(text)
  return str(path)


def command(*parts):
  return ' '.join(shlex.quote(p) for p in parts)


@pytest.fixture
def clip(tmp_path):
  path = tmp_path / 'clip.mp4'
  with av.open(str(path), 'w', format='mp4') as out:
    video = out.add_stream('libx264', rate=25)
    video.width = video.height = 64
    video.pix_fmt = 'yuv420p'
    for index in range(5):
      frame = av.VideoFrame.from_ndarray(np.full((64, 64, 3), 40 * index, np.uint8), format='rgb24')
      frame.pts, frame.time_base = index, Fraction(1, 25)
      out.mux(video.encode(frame))
    out.mux(video.encode(None))
  return str(path)


@pytest.fixture
def faces(tmp_path):
  folder = tmp_path / 'faces'
  folder.mkdir()
  for name in ('b.png', 'a.jpg', 'c.png', 'notes.txt'):
    (folder / name).write_bytes(b'image')
  return str(folder)


def test_swap_fills_placeholders_and_returns_the_decodable_output(tmp_path, clip, faces):
  log = tmp_path / 'argv.txt'
  swap = faceswap.FaceSwap(command(sys.executable, script(tmp_path, 'swap.py', SWAP), '--source', '{source}',
                                   '--target', '{target}', '--output', '{output}', '--log', str(log)), faces, 30)
  out = tmp_path / 'swapped.mp4'
  assert swap.swap('clip-1', clip, str(out)) is None
  assert out.read_bytes() == open(clip, 'rb').read()
  argv = eval(log.read_text())  # pylint: disable=eval-used  # the script wrote repr(list of str)
  assert argv[argv.index('--source') + 1] == swap.source_for('clip-1')
  assert argv[argv.index('--target') + 1] == os.path.abspath(clip)
  assert not os.path.exists(argv[argv.index('--output') + 1])  # its scratch folder is gone
  assert all('{' not in arg for arg in argv)


def test_source_images_are_chosen_from_the_clip_id(tmp_path, faces):
  images = faceswap.find_source_images(f'{faces},{faces}/a.jpg,{tmp_path}/missing/*.png')
  assert [os.path.basename(p) for p in images] == ['a.jpg', 'b.png', 'c.png']
  chosen = {faceswap.pick_source(images, f'clip-{k}') for k in range(30)}
  assert chosen == set(images)  # spread over all of them
  assert faceswap.pick_source(images, 'clip-7') == faceswap.pick_source(list(images), 'clip-7')
  assert faceswap.find_source_images(f'{faces}/*.png') == images[1:]


def test_failing_command_gives_its_stderr_tail(tmp_path, clip):
  swap = faceswap.FaceSwap(command(sys.executable, script(tmp_path, 'fail.py', FAIL), '{target}', '{output}'), None)
  reason, detail = swap.swap('clip', clip, str(tmp_path / 'out.mp4'))
  assert reason == 'faceswap_failed'
  assert 'status 1' in detail and detail.endswith('error: no face found in source')
  assert 'loading models' not in detail  # only the tail
  assert not (tmp_path / 'out.mp4').exists()


def test_missing_program_is_a_failure_not_a_crash(tmp_path, clip):
  swap = faceswap.FaceSwap(command(str(tmp_path / 'no-such-program'), '{target}', '{output}'), None)
  reason, detail = swap.swap('clip', clip, str(tmp_path / 'out.mp4'))
  assert reason == 'faceswap_failed' and 'could not start' in detail


def test_hanging_command_is_killed_with_its_children(tmp_path, clip):
  pid_file = tmp_path / 'child.pid'
  swap = faceswap.FaceSwap(command(sys.executable, script(tmp_path, 'hang.py', HANG), str(pid_file), '{target}',
                                   '{output}'), None, timeout_s=1.5)
  started = time.monotonic()
  reason, detail = swap.swap('clip', clip, str(tmp_path / 'out.mp4'))
  assert reason == 'faceswap_timeout' and '1.5s' in detail
  assert time.monotonic() - started < 30  # the command never ends by itself
  child = int(pid_file.read_text())
  for _ in range(50):  # the grandchild was killed with the group; give the kernel a moment to reap it
    try:
      os.kill(child, 0)
    except ProcessLookupError:
      break
    state = open(f'/proc/{child}/stat').read().split()[2]
    if state == 'Z':
      break
    time.sleep(0.1)
  else:
    pytest.fail('the command\'s child outlived the time limit')


def test_no_output_and_undecodable_output(tmp_path, clip):
  silent = faceswap.FaceSwap(command(sys.executable, script(tmp_path, 'n.py', NOTHING), '{target}', '{output}'),
                             None)
  reason, detail = silent.swap('clip', clip, str(tmp_path / 'out.mp4'))
  assert reason == 'faceswap_no_output' and 'wrote no file' in detail
  garbage = faceswap.FaceSwap(command(sys.executable, script(tmp_path, 'g.py', GARBAGE), '--output', '{output}',
                                      '{target}'), None)
  reason, detail = garbage.swap('clip', clip, str(tmp_path / 'out.mp4'))
  assert reason == 'faceswap_no_output' and 'decod' in detail
  assert not (tmp_path / 'out.mp4').exists()


def test_no_shell_a_hostile_value_stays_one_argument(tmp_path, clip):
  log = tmp_path / 'argv.txt'
  hostile = tmp_path / 'x; touch pwned $(touch pwned2)'
  hostile.mkdir()
  target = hostile / 'clip.mp4'
  target.write_bytes(open(clip, 'rb').read())
  marker = str(tmp_path / 'pwned3')
  swap = faceswap.FaceSwap(command(sys.executable, script(tmp_path, 'swap.py', SWAP), '--target', '{target}',
                                   '--output', '{output}', '--log', str(log)) + f' ; touch {marker}', None)
  assert swap.swap('clip', str(target), str(tmp_path / 'out.mp4')) is None
  argv = eval(log.read_text())  # pylint: disable=eval-used
  assert argv[argv.index('--target') + 1] == str(target)  # one argument, $(...) and ; included
  assert argv[-3:] == [';', 'touch', marker]  # literal arguments, not a second command
  assert not list(tmp_path.rglob('pwned*'))


def test_bad_configuration_fails_when_the_pipeline_is_built(tmp_path):
  with pytest.raises(ValueError, match='--faceswap_cmd.*{output}'):
    faceswap.FaceSwap('facefusion --target {target}', None)
  with pytest.raises(ValueError, match='--faceswap_cmd'):
    faceswap.FaceSwap('facefusion "unclosed', None)
  with pytest.raises(ValueError, match='--source_images'):
    faceswap.FaceSwap('facefusion -s {source} -t {target} -o {output}', str(tmp_path / '*.png'))
