"""Frame folders (VFHQ layout: one folder of numbered images per clip) as video sources.

The listing (transforms.sources.manifest) shows every member of a zip or uncompressed tar to `FrameFolders`,
which keeps the numbered images. A folder of them that holds no video and at least two images becomes
one source. Images beside a video, and a lone image in an archive that holds videos, are thumbnails or
posters: ordinary members, ignored as before (rejected only as any member is: link, encrypted, too
large). A lone image in an archive of images only is a folder too short to be a clip (`too_few_frames`).

A folder's frame list (where each frame sits in the archive, in play order) does not travel in its
source: the listing writes the lists of an archive's folders, one JSON line each, to one file in the
work dir (`frame_listings/<sha256 of the content>.jsonl`: a retried listing rewrites the same bytes
under the same name), and the source url (`frame-folder:?...`) names the archive, the folder, and the
byte range and sha256 of its line, a few hundred bytes however many frames the folder has. (Listed in
one process with no work dir, e.g. `read_input`, the line rides in the url: nothing crosses a shuffle.)
After the shuffle, `encode_folder` (run by transforms.sources.unpack.UnpackMembers) reads the line back, checks
it, and streams the frames one at a time from the archive into a lossless video in the work dir
(`archives/<archive id>/<folder id>.mkv`, H.264 RGB at crf 0) at the frame rate the listing fixed
(--fps), so the rest of the pipeline sees an ordinary video. Frames of odd width or height lose their
last column or row (H.264 wants even sides, as MegActor's packer does).

Bounds: each image by --max_download_mb and --max_pixels (checked from its header, before it is
decoded), a folder's frames by --max_download_mb in all and by --max_folder_frames, the archive by
--max_archive_mb, the encode by --max_render_s. Failures are reasons: `bad_frame` (an image that
does not decode), `mixed_frame_sizes`, `too_few_frames`, `too_many_frames`, `too_many_pixels`,
`too_large`, `encode_timeout`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import tempfile
import time
import urllib.parse
from fractions import Fraction
from typing import Dict, Iterator, List, NamedTuple, Optional, Set, Tuple, Union

import apache_beam as beam
import av
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from PIL import Image

from transforms.core.elements import ReasonError, Reject, Source
from transforms.core.fileio import put_file, write_atomic
from transforms.core.layout import work_dir_of
from transforms.lib.probe import VIDEO_EXTENSIONS
from transforms.lib.safety import InputPolicy, UnsafeInput, safe_member_name
from transforms.sources.archives import (FRAME_SCHEME, MIB, TAR, TAR_STREAM, UNPACK_ERRORS, ZIP, ArchiveMember, _open,
                                         _zip_member, unpacked_uri)

STAGE = 'unpack'  # frames are read and encoded where archive members are unpacked
LISTINGS = 'frame_listings'  # work-dir folder of the listing files
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')
MIN_FRAMES = 2  # one image is a still, not a clip
MIN_SIDE_PX = 16  # as transforms.lib.probe: smaller frames cannot hold a usable face
_NUMBERED = re.compile(r'^(?P<stem>.*?)(?P<number>\d+)$')
_SHA256 = re.compile(r'^[0-9a-f]{64}$')
_INT_FIELDS = ('before', 'size', 'max_pixels', 'list_count', 'list_at', 'list_length')
_FLOAT_FIELDS = ('fps', 'timeout_s')
_STR_FIELDS = ('archive', 'kind', 'folder', 'file', 'list_digest', 'list_uri', 'list_inline')


class FrameError(ReasonError):
  """A folder that cannot become a video; `reason` is the reject code."""


@dataclasses.dataclass(frozen=True)
class FrameFolderOptions:
  """What the listing fixes for every frame folder of a run (picklable: it travels with ReadSources)."""
  fps: float = 30.0
  max_frames: int = 54000  # 30 minutes at 30 fps
  max_pixels: int = 4096 * 4096  # 0: no limit
  timeout_s: float = 1800.0
  listing_dir: str = ''  # where frame lists are written; '' carries them in the url (one process, no shuffle)

  @classmethod
  def from_options(cls, opts) -> 'FrameFolderOptions':
    return cls(float(opts.fps), int(opts.max_folder_frames), int(opts.max_pixels or 0), float(opts.max_render_s),
               FileSystems.join(work_dir_of(opts), LISTINGS))


class Frame(NamedTuple):
  """One image of a folder: where it sits in the archive (ArchiveMember's fields for zips)."""
  name: str
  offset: int
  size: int
  method: int = 0
  compressed_size: int = 0
  crc: int = 0
  flags: int = 0


def frames_line(frames: Tuple[Frame, ...]) -> bytes:
  """A folder's frames as one ASCII JSON line (odd bytes of tar names survive as \\udcXX escapes)."""
  return json.dumps([list(frame) for frame in frames], separators=(',', ':')).encode('ascii')


class FrameList(NamedTuple):
  """Where a folder's frame list is: a byte range of a listing file in the work dir, or the line itself
  (`inline`, listed with no work dir). `digest`, the line's sha256, checks what is read back."""
  count: int
  digest: str
  uri: str = ''
  at: int = 0
  length: int = 0
  inline: str = ''

  def load(self) -> Tuple[Frame, ...]:
    """The frames; ValueError when what is read back is not the line listed. A listing file that is gone
    raises OSError (BeamIOError): not the input's fault, so it becomes a transient internal_error."""
    if self.uri:
      with FileSystems.open(self.uri, mime_type='application/octet-stream',
                            compression_type='uncompressed') as handle:
        handle.seek(self.at)
        line = handle.read(self.length)
    else:
      line = self.inline.encode('ascii', 'replace')
    if hashlib.sha256(line).hexdigest() != self.digest:
      raise ValueError(f'the frame list read back from {self.uri or "the url"} is not the one listed')
    frames = tuple(Frame(str(f[0]), *(int(v) for v in f[1:])) for f in json.loads(line))
    if len(frames) != self.count:
      raise ValueError(f'the frame list holds {len(frames)} frames, the url says {self.count}')
    return frames


@dataclasses.dataclass(frozen=True)
class FrameFolder:
  """A listed frame folder: travels as a Source url until it is encoded."""
  archive: str  # the archive's url, as the listing checked it
  kind: str  # ZIP or TAR (seekable)
  folder: str  # the folder's name inside the archive ('' for images at its root)
  file: str  # '<archive id>/<folder id>.mkv' under work_dir/archives
  fps: float
  before: int  # listed bytes of the archive's members planned before this folder (--max_archive_mb)
  size: int  # listed bytes of its frames
  max_pixels: int
  timeout_s: float
  frames: FrameList

  @property
  def url(self) -> str:
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != 'frames'}
    fields.update({f'list_{name}': value for name, value in self.frames._asdict().items()})
    return f'{FRAME_SCHEME}:?{urllib.parse.urlencode(fields, errors="surrogateescape")}'

  @classmethod
  def from_url(cls, url: str) -> 'FrameFolder':
    """The folder a url names; ValueError when it is malformed or its target is not a flat safe name."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query, keep_blank_values=True,
                                  errors='surrogateescape')
    try:
      values = {name: query[name][0] for name in _STR_FIELDS}
      values.update({name: int(query[name][0]) for name in _INT_FIELDS})
      values.update({name: float(query[name][0]) for name in _FLOAT_FIELDS})
    except (KeyError, TypeError, ValueError, IndexError) as error:
      raise ValueError(f'malformed frame folder url: {error}') from error
    frames = FrameList(*(values.pop(f'list_{name}') for name in FrameList._fields))
    folder = cls(frames=frames, **values)
    parent, _, name = folder.file.partition('/')
    if folder.kind not in (ZIP, TAR) or not folder.fps > 0 or not name or '/' in name \
        or safe_member_name(folder.file) != folder.file or parent.startswith('.') or name.startswith('.'):
      raise ValueError(f'frame folder url names kind {folder.kind!r}, file {folder.file!r}, fps {folder.fps}')
    if frames.count < MIN_FRAMES or not _SHA256.match(frames.digest) or bool(frames.uri) == bool(frames.inline) \
        or frames.at < 0 or frames.length < 0:
      raise ValueError(f'frame folder url names a frame list of {frames.count} frames, digest {frames.digest[:64]!r}, '
                       f'{"a listing file" if frames.uri else "no listing file"}, {"an" if frames.inline else "no"} '
                       f'inline list')
    return folder

  def member(self, frame: Frame) -> ArchiveMember:
    return ArchiveMember(archive=self.archive, kind=self.kind, name=frame.name, offset=frame.offset,
                         size=frame.size, before=self.before, file=self.file, method=frame.method,
                         compressed_size=frame.compressed_size, crc=frame.crc, flags=frame.flags)


def numbered_image(name: str) -> Optional[Tuple[str, str, int]]:
  """(folder, stem before the number, number) of `dir/00012.png`-like names; None for anything else."""
  stem, ext = os.path.splitext(os.path.basename(name))
  match = _NUMBERED.match(stem)
  if ext.lower() not in IMAGE_EXTENSIONS or not match:
    return None
  return os.path.dirname(name), match.group('stem'), int(match.group('number'))


class ListedFolder(NamedTuple):
  """A folder as the archive listing plans it (beside the listed member videos)."""
  name: str
  size: int
  frames: FrameList
  kind: str

  def url(self, archive: str, before: int, file: str, options: FrameFolderOptions) -> str:
    return FrameFolder(archive, self.kind, self.name, file, options.fps, before, self.size, options.max_pixels,
                       options.timeout_s, self.frames).url


class _Image(NamedTuple):
  """A numbered image as listed, in play order by its first field."""
  order: Tuple[str, int, str]  # (stem, number, safe name)
  frame: Frame
  kind: str
  problem: Optional[Tuple[str, str]]  # (reason, detail) that would reject it as any member, or None


class FrameFolders:
  """Collects the numbered images of one archive listing, folder by folder, and which folders hold videos."""

  def __init__(self, options: FrameFolderOptions, max_member_bytes: int):
    self.video_extensions = VIDEO_EXTENSIONS
    self.options = options
    self.max_member_bytes = max_member_bytes
    self.images: Dict[str, List[_Image]] = {}
    self.video_folders: Set[str] = set()

  def take(self, safe: str, listed) -> bool:
    """True when `safe` (a manifest._Listed member) is a numbered image: this collector's, to be planned as a
    frame or handed back as an ordinary member by `listed`. A video is only noted (its folder holds no frames)."""
    parsed = numbered_image(safe)
    if parsed is None:
      if safe.lower().endswith(self.video_extensions):
        self.video_folders.add(os.path.dirname(safe))
      return False
    folder, stem, number = parsed
    where = dict(listed.where)
    kind = where.pop('kind')
    problem = None
    if not listed.regular:
      problem = ('unsafe_member', f'member {safe} is not a regular file')
    elif listed.encrypted:
      problem = ('bad_archive', f'member {safe} is encrypted')
    elif listed.size > self.max_member_bytes:
      problem = ('too_large', f'member {safe} is {listed.size} bytes, over --max_download_mb')
    frame = Frame(listed.name, where.get('offset', 0), listed.size, where.get('method', 0),
                  where.get('compressed_size', 0), where.get('crc', 0), where.get('flags', 0))
    self.images.setdefault(folder, []).append(_Image((stem, number, safe), frame, kind, problem))
    return True

  def listed(self, prefix: str, archive_id: str, sanitize) -> Iterator[Union[Reject, Tuple[str, str, ListedFolder]]]:
    """Rejects, and (folder, folder id, ListedFolder) of the frame folders, their frame lists written to the
    listing file (or kept inline without a listing dir)."""
    planned = []
    for folder in sorted(self.images):
      images = sorted(self.images[folder])
      if folder in self.video_folders or (len(images) < MIN_FRAMES and self.video_folders):
        # Thumbnails, posters: ordinary members, which the manifest rejects for these problems only.
        yield from (Reject(sanitize(prefix + image.order[2]), 'manifest', *image.problem, archive_id)
                    for image in images if image.problem)
        continue
      folder_id = sanitize(prefix + folder if folder else prefix.rstrip('_') or archive_id)
      problem = next((image.problem for image in images if image.problem), None)
      size = sum(image.frame.size for image in images)
      if problem is None and images[0].kind == TAR_STREAM:
        problem = ('bad_archive', 'frame folders are read from zips and uncompressed tars only (a compressed tar '
                   'cannot seek to a frame)')
      elif problem is None and len(images) < MIN_FRAMES:
        problem = ('too_few_frames', f'folder {folder or "(root)"} holds {len(images)} numbered image; a clip needs '
                   f'at least {MIN_FRAMES}')
      elif problem is None and len(images) > self.options.max_frames:
        problem = ('too_many_frames', f'folder {folder or "(root)"} holds {len(images)} images, over '
                   f'--max_folder_frames {self.options.max_frames}')
      elif problem is None and size > self.max_member_bytes:
        problem = ('too_large', f'folder {folder or "(root)"} holds {size} bytes of images, over --max_download_mb')
      if problem is not None:
        yield Reject(folder_id, 'manifest', problem[0], problem[1][:300], archive_id)
        continue
      planned.append((folder, folder_id, size, images))
    lists = self._frame_lists([tuple(image.frame for image in images) for _, _, _, images in planned])
    for (folder, folder_id, size, images), frames in zip(planned, lists):
      yield folder, folder_id, ListedFolder(folder, size, frames, images[0].kind)

  def _frame_lists(self, folders: List[Tuple[Frame, ...]]) -> List[FrameList]:
    """Each folder's FrameList; with a listing dir, all lines go to one file named by its content, published
    atomically (a retried listing finds it, or rewrites the same bytes)."""
    lines = [frames_line(frames) for frames in folders]
    digests = [hashlib.sha256(line).hexdigest() for line in lines]
    if not self.options.listing_dir:
      return [FrameList(len(frames), digest, inline=line.decode('ascii'))
              for frames, line, digest in zip(folders, lines, digests)]
    if not lines:
      return []
    content = b''.join(line + b'\n' for line in lines)
    uri = FileSystems.join(self.options.listing_dir, hashlib.sha256(content).hexdigest() + '.jsonl')
    if not FileSystems.exists(uri):
      write_atomic(uri, content)
    lists, at = [], 0
    for frames, line, digest in zip(folders, lines, digests):
      lists.append(FrameList(len(frames), digest, uri, at, len(line)))
      at += len(line) + 1
    return lists


# ----------------------------------------------------------------------------- encoding (after the shuffle)

def _read_frame(handle, folder: FrameFolder, frame: Frame) -> bytes:
  """Exactly the listed bytes of one frame (a zip member's CRC is checked once its last byte is read)."""
  if folder.kind == ZIP:
    reader = _zip_member(handle, folder.member(frame))
  else:
    handle.seek(frame.offset)
    reader = handle
  data = reader.read(frame.size)
  if len(data) != frame.size:
    raise EOFError(f'frame {frame.name} ended after {len(data)} of its {frame.size} bytes')
  if folder.kind == ZIP:
    reader.read(1)  # the CRC check runs at the member's end
  return data


def decode_frame(data: bytes, name: str, max_pixels: int) -> np.ndarray:
  """RGB uint8 of one image, its size checked from the header before any pixel is decoded."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      width, height = image.size
      if max_pixels and width * height > max_pixels:
        raise FrameError('too_many_pixels', f'frame {name} is {width}x{height}, over --max_pixels {max_pixels}')
      if min(width, height) < MIN_SIDE_PX:
        raise FrameError('bad_frame', f'frame {name} is {width}x{height}: a side is under {MIN_SIDE_PX} pixels')
      return np.asarray(image.convert('RGB'))
  except FrameError:
    raise
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
    raise FrameError('bad_frame', f'frame {name} does not decode: {type(error).__name__}: {error}') from error


class _LosslessWriter:
  """Frames into an H.264 RGB (libx264rgb, crf 0) Matroska file: nothing is lost before the render pass."""

  def __init__(self, path: str, fps: float):
    self.path = path
    self.rate = Fraction(fps).limit_denominator(1001)
    self.container = None
    self.stream = None
    self.count = 0

  def add(self, image: np.ndarray) -> None:
    if self.container is None:
      self.container = av.open(self.path, 'w', format='matroska', options={'fflags': '+bitexact'})  # no random ids
      self.stream = self.container.add_stream('libx264rgb', rate=self.rate)
      self.stream.height, self.stream.width = image.shape[:2]
      self.stream.pix_fmt = 'rgb24'
      self.stream.options = {'crf': '0', 'preset': 'ultrafast', 'threads': '1'}  # one thread: same bytes each run
    frame = av.VideoFrame.from_ndarray(image, format='rgb24')
    frame.pts, frame.time_base = self.count, 1 / self.rate
    self.container.mux(self.stream.encode(frame))
    self.count += 1

  def close(self) -> None:
    """Flush and close (once)."""
    if self.container is not None:
      container, self.container = self.container, None
      container.mux(self.stream.encode())
      container.close()

  def abort(self) -> None:
    """Close without flushing, after a failure (the scratch file is removed; its error must not hide the first)."""
    if self.container is not None:
      container, self.container = self.container, None
      try:
        container.close()
      except av.error.FFmpegError:
        pass


def encode_folder(folder: FrameFolder, frames: Tuple[Frame, ...], target: str, policy: InputPolicy,
                  max_total_bytes: int) -> None:
  """Stream the folder's frames (its FrameList, loaded) from its archive into a lossless video published at
  `target`.

  One frame is in memory at a time. Raises FrameError (bad, mixed-size or too many pixels frames,
  time limit), UnsafeInput, or an UNPACK_ERRORS member for a corrupt archive.
  """
  if folder.before + folder.size > max_total_bytes:
    raise FrameError('too_large', f'folder {folder.folder} ({folder.size} bytes) would bring what is read from '
                     f'{os.path.basename(folder.archive)} to {folder.before + folder.size} bytes, over '
                     f'--max_archive_mb ({max_total_bytes} bytes)')
  deadline = time.monotonic() + folder.timeout_s if folder.timeout_s else None
  local_dir = os.path.dirname(target) if '://' not in target else None
  if local_dir:
    os.makedirs(local_dir, exist_ok=True)
  fd, scratch = tempfile.mkstemp(prefix='frames-', suffix='.mkv', dir=local_dir)
  os.close(fd)
  writer = _LosslessWriter(scratch, folder.fps)
  try:
    shape = None
    with _open(folder.archive, policy) as handle:
      for frame in frames:
        if deadline is not None and time.monotonic() > deadline:
          raise FrameError('encode_timeout', f'folder {folder.folder}: {writer.count} of {len(frames)} frames '
                           f'encoded within --max_render_s {folder.timeout_s:g}s')
        image = decode_frame(_read_frame(handle, folder, frame), frame.name, folder.max_pixels)
        if shape is None:
          shape = image.shape
        elif image.shape != shape:
          raise FrameError('mixed_frame_sizes', f'frame {frame.name} is {image.shape[1]}x{image.shape[0]}, the '
                           f'folder\'s first frame {shape[1]}x{shape[0]}')
        writer.add(image[:image.shape[0] // 2 * 2, :image.shape[1] // 2 * 2])
    writer.close()
    put_file(scratch, target, move=True)
  finally:
    writer.abort()
    if os.path.exists(scratch):
      os.unlink(scratch)


class FolderEncoder:
  """Frame-folder Sources -> Sources of their encoded videos (or rejects); shared by the pipeline step and
  transforms.sources.unpack.unpack_in_process."""

  def __init__(self, work_dir: str, policy: InputPolicy = InputPolicy(), max_total_bytes: int = 65536 * MIB):
    self.work_dir = work_dir
    self.policy = policy
    self.max_total_bytes = int(max_total_bytes)
    self.encoded = Metrics.counter(STAGE, 'frame_folders_encoded')
    self.kept = Metrics.counter(STAGE, 'frame_folders_already_encoded')
    self.frames = Metrics.counter(STAGE, 'folder_frames_encoded')

  def target(self, folder: FrameFolder) -> str:
    return unpacked_uri(self.work_dir, folder.file)

  def encode(self, source: Source) -> Iterator[Union[Source, Reject]]:
    try:
      folder = FrameFolder.from_url(source.url)
    except ValueError as error:
      yield from _rejects(source, 'bad_url', str(error))
      return
    target = self.target(folder)
    if FileSystems.exists(target):  # published atomically: a rerun or a retried bundle encodes nothing twice
      self.kept.inc()
      yield dataclasses.replace(source, url=target)
      return
    try:
      frames = folder.frames.load()  # a lost listing file raises: not the input's fault
    except ValueError as error:
      yield from _rejects(source, 'bad_url', f'folder {folder.folder}: {error}')
      return
    try:
      encode_folder(folder, frames, target, self.policy, self.max_total_bytes)
    except FrameError as error:
      yield from _rejects(source, error.reason, str(error))
      return
    except UnsafeInput as error:
      yield from _rejects(source, error.reason, str(error))
      return
    except UNPACK_ERRORS as error:
      yield from _rejects(source, 'bad_archive', f'folder {folder.folder}: {type(error).__name__}: {error}')
      return
    self.encoded.inc()
    self.frames.inc(len(frames))
    yield dataclasses.replace(source, url=target)


def _rejects(source: Source, reason: str, detail: str) -> Iterator[Reject]:
  return (Reject(c.clip_id, STAGE, reason, detail[:500], source.source_id) for c in source.clips)


class EncodeFrameFolders(beam.DoFn):
  """A frame-folder Source -> the Source of its encoded video, or rejects (tag `rejects`)."""

  def __init__(self, encoder: FolderEncoder):
    self.encoder = encoder

  def process(self, source: Source):
    for item in self.encoder.encode(source):
      yield beam.pvalue.TaggedOutput('rejects', item) if isinstance(item, Reject) else item
