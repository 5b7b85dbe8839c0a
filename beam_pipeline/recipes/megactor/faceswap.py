"""Face-swapped copies (MegActor's `swapped.mp4`) through an external command, e.g. FaceFusion's headless CLI.

The command is the user's (`--faceswap_cmd`), given as one string that is split like a shell would split it
(`shlex`) but run without a shell: an argument list in which `{source}`, `{target}` and `{output}` are
replaced by the face image, the clip's mp4 and the file to write, so nothing in a path or an argument can
run as a command. The face image comes from `--source_images`, one per clip, chosen from the clip id (the
same on every run; MegActor drew one at random). The command runs in its own process group with a time
limit: past it the whole group (FaceFusion and the ffmpeg it starts) is killed. Its output is accepted only
when it decodes as video. Failures are reasons a clip can be rejected with:
- faceswap_failed: the command could not start or exited non-zero (the detail ends with its stderr);
- faceswap_timeout: it ran past --faceswap_timeout_s;
- faceswap_no_output: it exited 0 but wrote no file, or one that does not decode as video.
"""
from __future__ import annotations

import glob
import hashlib
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
from typing import List, Optional, Sequence, Tuple

import av
from apache_beam.io.filesystems import FileSystems

from model_handlers.weights import WeightsError, is_remote, local_copy

PLACEHOLDERS = ('{source}', '{target}', '{output}')
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp')
STDERR_TAIL = 800  # characters of the command's error output kept in a reject's detail
DEFAULT_TIMEOUT_S = 600.0


def parse_command(command: str) -> List[str]:
  """--faceswap_cmd split into an argument list; it must name {target} and {output} (else ValueError)."""
  try:
    argv = shlex.split(command or '')
  except ValueError as error:
    raise ValueError(f'--faceswap_cmd: cannot be split into arguments ({error})') from error
  if not argv:
    raise ValueError('--faceswap_cmd: empty command')
  missing = [p for p in ('{target}', '{output}') if not any(p in arg for arg in argv)]
  if missing:
    raise ValueError(f'--faceswap_cmd: needs the placeholders {" and ".join(missing)} (where the clip to swap '
                     f'and the file to write go), e.g. "... --target-path {{target}} --output-path {{output}}"')
  return argv


def find_source_images(spec: Optional[str]) -> List[str]:
  """Image files named by --source_images (comma-separated files, folders or globs, local or gs://), sorted,
  duplicates removed. gs:// images are copied to a worker when it first uses one (distributed workers do not
  see the launching machine's disk)."""
  found = set()
  for part in (p.strip() for p in (spec or '').split(',')):
    if not part:
      continue
    if is_remote(part):
      pattern = part if glob.has_magic(part) or part.lower().endswith(IMAGE_EXTENSIONS) else part.rstrip('/') + '/*'
      found.update(m.path for m in FileSystems.match([pattern])[0].metadata_list
                   if m.path.lower().endswith(IMAGE_EXTENSIONS))
      continue
    if os.path.isdir(part):
      candidates = [os.path.join(part, name) for name in os.listdir(part)]
    else:
      candidates = glob.glob(part) if glob.has_magic(part) else [part]
    found.update(os.path.abspath(c) for c in candidates
                 if os.path.isfile(c) and c.lower().endswith(IMAGE_EXTENSIONS))
  return sorted(found)


def pick_source(images: Sequence[str], clip_id: str) -> str:
  """The clip's face image: chosen from a hash of its id, so a rerun swaps in the same face."""
  digest = int.from_bytes(hashlib.sha256(clip_id.encode()).digest()[:8], 'big')
  return images[digest % len(images)]


def fill(argv: Sequence[str], source: str, target: str, output: str) -> List[str]:
  """The argument list with the placeholders replaced (each argument on its own; never through a shell)."""
  values = {'{source}': source, '{target}': target, '{output}': output}
  filled = []
  for arg in argv:
    for placeholder, value in values.items():
      arg = arg.replace(placeholder, value)
    filled.append(arg)
  return filled


def decodes_as_video(path: str) -> Optional[str]:
  """None when `path` holds a video stream with a decodable frame; else what is wrong with it."""
  try:
    with av.open(path) as container:
      if not container.streams.video:
        return 'has no video stream'
      for _ in container.decode(container.streams.video[0]):
        return None
      return 'has no decodable video frame'
  except (av.FFmpegError, OSError, ValueError) as error:
    return f'does not decode ({type(error).__name__}: {str(error)[:200]})'


def _tail(data: bytes) -> str:
  return data.decode('utf-8', 'replace').strip()[-STDERR_TAIL:]


def _kill_group(process: subprocess.Popen) -> None:
  try:
    os.killpg(process.pid, signal.SIGKILL)
  except ProcessLookupError:
    pass


class FaceSwap:
  """Runs the face-swap command on one clip: `swap(clip_id, target_mp4, output_mp4)` -> None or (reason, detail).

  Built when the pipeline is built (a bad --faceswap_cmd or --source_images fails there) and pickled with the
  DoFn that calls it.
  """

  def __init__(self, command: str, source_images: Optional[str], timeout_s: float = DEFAULT_TIMEOUT_S):
    self.argv = parse_command(command)
    self.timeout_s = float(timeout_s)
    self.sources = find_source_images(source_images)
    if any('{source}' in arg for arg in self.argv) and not self.sources:
      raise WeightsError('--source_images', source_images, f'no images ({", ".join(IMAGE_EXTENSIONS)}) found '
                         'there; --faceswap_cmd needs one for {source}')

  @classmethod
  def from_options(cls, opts) -> 'FaceSwap':
    return cls(opts.faceswap_cmd, opts.source_images, opts.faceswap_timeout_s)

  def source_for(self, clip_id: str) -> Optional[str]:
    return pick_source(self.sources, clip_id) if self.sources else None

  def swap(self, clip_id: str, target: str, output: str) -> Optional[Tuple[str, str]]:
    """Swap the face of `target` (a local mp4) into `output`; None when `output` holds a decodable video,
    else (reason, detail). The command works in a scratch folder of its own, removed afterwards."""
    scratch = tempfile.mkdtemp(prefix='faceswap-')
    try:
      suffix = os.path.splitext(output)[1] or '.mp4'
      written = os.path.join(scratch, 'swapped' + suffix)
      source = self.source_for(clip_id)
      source = local_copy(source, '--source_images', 'a face image') if source else ''
      argv = fill(self.argv, source, os.path.abspath(target), written)
      failure = self._run(argv, scratch)
      if failure is None:
        problem = decodes_as_video(written) if os.path.isfile(written) and os.path.getsize(written) else \
            'wrote no file'
        if problem is not None:
          failure = ('faceswap_no_output', f'the face-swap command exited 0 but its output {problem}')
      if failure is None:
        shutil.move(written, output)
      return failure
    finally:
      shutil.rmtree(scratch, ignore_errors=True)

  def _run(self, argv: List[str], scratch: str) -> Optional[Tuple[str, str]]:
    try:
      process = subprocess.Popen(argv, cwd=scratch, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, start_new_session=True)
    except OSError as error:
      return 'faceswap_failed', f'the face-swap command {argv[0]!r} could not start: {error}'
    try:
      out, err = process.communicate(timeout=self.timeout_s)
    except subprocess.TimeoutExpired:
      _kill_group(process)
      try:
        process.communicate(timeout=10)
      except subprocess.TimeoutExpired:  # a grandchild that left the group still holds the pipes
        pass
      return 'faceswap_timeout', f'the face-swap command ran longer than --faceswap_timeout_s {self.timeout_s:g}s ' \
          'and was killed with its process group'
    finally:
      _kill_group(process)  # nothing it started outlives it
    if process.returncode != 0:
      said = _tail(err) or _tail(out)
      return 'faceswap_failed', f'the face-swap command exited with status {process.returncode}' + \
          (f'; its output ends: {said}' if said else '')
    return None
