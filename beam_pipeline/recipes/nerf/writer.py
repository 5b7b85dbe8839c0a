"""The `nerf` recipe's subject folders: AD-NeRF's `process_video.py` outputs, one folder per source video.

Three steps, so that no frame crosses a shuffle and no worker holds a subject's frames:
1. In the render pass, `NerfFrames` (after the parsing analyzers) puts each frame's jpg and parsing png into
   the clip's frame archive and folds the frame into the clip's partial background (transforms/
   nerf_frames.Background), which travels with the clip as three (H, W) arrays.
2. `StageNerfClip` parks each kept clip's per-frame arrays and audio in a small work-dir archive and emits a
   reference keyed by subject, plus its background; `CombinePerKey` merges the backgrounds into bc.jpg.
3. `WriteSubject` gets a subject's clip references and bc.jpg, numbers the frames 0..N-1 over the clips in
   time order and writes every file (atomically, deterministic bytes), then publishes the subject
   (`published/<subject>.jsonl`) last, then deletes the clips' work-dir media.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import tempfile
import wave
from typing import Dict, List, Optional, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from beam_pipeline.recipes.nerf import frames as nf
from beam_pipeline.recipes.nerf.audio_features import HANDLERS, AudioFeatureError, parse_kinds, trainer_files
from beam_pipeline.recipes.nerf.depth import ARCHIVE as DEPTH  # the depth analyzer's frame archive, with --depth
from model_handlers.in_process import SharedModel
from transforms.core.elements import ClipTask, Reject
from transforms.core.fileio import delete_quietly, put_file, write_atomic
from transforms.core.frame_store import FrameArchive, archive_uri, read_frame_archive
from transforms.deadletter import DeadLetter, describe
from transforms.frame_analysis import ClipPass, Frame, FrameAnalyzer, PassResult
from transforms.lib.features import EYE_BLINK, wav_samples
from transforms.subject_window import INCOMPLETE
from transforms.writers.folders import (
    UnitFiles, publish_unit, published_records, remade, same_version, tree, unpublish)

STAGE = 'write'
FRAMES = 'nerf'  # the render pass's frame archive (RenderedClip.files key and archive name)
STAGED = 'nerf_meta'  # the writer's per-clip archive of arrays and audio
BACKGROUND = 'nerf_bg'  # prefix of the partial background's arrays in RenderedClip.arrays
AUDIO_RATE = 16000


# ----------------------------------------------------------------------------- render pass

class _NerfPass(ClipPass):

  def __init__(self, uri: str, size: int, start: float, fps: float):
    self.archive = FrameArchive(uri)
    self.background = nf.Background.empty(size)
    self.start, self.fps = start, fps
    self.unparsed = 0

  def add(self, frames: List[Frame]) -> None:
    for frame in frames:
      labels = frame.found.get('parsing')
      self.archive.add(f'{frame.index}.jpg', nf.encode_jpeg(frame.image))
      if labels is None:  # the parsing model failed on this frame: it has no parsing and adds no background
        self.unparsed += 1
        continue
      self.archive.add(f'{frame.index}.png', nf.encode_png(labels))
      self.background.add(frame.image, nf.foreground_distance(labels), self.start + frame.index / self.fps)

  def finish(self, num_frames: int) -> PassResult:
    return PassResult(self.background.to_arrays(BACKGROUND), self.unparsed,
                      'no parsing for the frame' if self.unparsed else '', files={FRAMES: self.archive.close()})

  def abandon(self) -> None:
    self.archive.discard()


class NerfFrames(FrameAnalyzer):
  """Keeps each output frame (jpg) and its parsing (png) in a per-clip archive for the subject writer, and
  the clip's partial AD-NeRF background. Runs after the parsing analyzers (it reads found['parsing'])."""

  name = 'nerf_frames'

  def __init__(self, work_dir: str, fps: float):
    self.work_dir = work_dir
    self.fps = fps

  def setup(self) -> None:
    pass

  def start(self, task: ClipTask, num_frames: int, size: int) -> ClipPass:
    return _NerfPass(archive_uri(self.work_dir, task.clip_id, FRAMES), size, task.start, self.fps)


# ----------------------------------------------------------------------------- per clip: stage, background

@dataclasses.dataclass(frozen=True)
class NerfClip:
  """A kept clip waiting for its subject's writer: small (its arrays and audio wait in `staged_uri`)."""
  task: ClipTask  # DeadLetter finds the clip it owes through this
  num_frames: int
  fps: float
  size: int
  staged_uri: str
  frames_uri: str
  depth_uri: str  # '' without --depth
  consumed: Tuple[str, ...]  # work-dir media to delete once the subject is published
  scores: dict

  @property
  def order(self) -> Tuple[float, str]:
    return self.task.start, self.task.clip_id


class StageNerfClip(beam.DoFn):
  """Analysis -> (subject, NerfClip), and (subject, Background) on tag `background`."""

  def __init__(self, work_dir: str):
    self.work_dir = work_dir

  def process(self, analysis):
    clip = analysis.clip
    arrays = analysis.arrays
    staged = FrameArchive(archive_uri(self.work_dir, clip.task.clip_id, STAGED))
    try:
      for name in ('lmk68', 'landmarks', 'matrix'):
        staged.add(name + '.npy', nf.npy_bytes(np.asarray(arrays[name], np.float32)))
      blinks = np.asarray(arrays['blendshapes'], np.float32)[:, list(EYE_BLINK)]  # au.csv's AU45
      staged.add('blinks.npy', nf.npy_bytes(blinks))
      staged.add('audio.wav', clip.wav)
      staged_uri = staged.close()
    finally:
      staged.discard()
    files = dict(clip.files)
    subject = clip.task.source_id
    yield subject, NerfClip(clip.task, clip.num_frames, clip.fps, clip.size, staged_uri, files[FRAMES],
                            files.get(DEPTH, ''), (clip.mp4_uri, staged_uri, *sorted(files.values())),
                            dict(analysis.scores))
    yield beam.pvalue.TaggedOutput('background', (subject, nf.Background.from_arrays(arrays, BACKGROUND)))


class MergeBackgrounds(beam.CombineFn):
  """Partial backgrounds of a subject's clips -> bc.jpg bytes (a per-pixel argmax, merged in any order)."""

  def create_accumulator(self):
    return None

  def add_input(self, accumulator, background):
    return background if accumulator is None else accumulator.merge(background)

  def merge_accumulators(self, accumulators):
    merged = None
    for accumulator in accumulators:
      if accumulator is not None:
        merged = accumulator if merged is None else merged.merge(accumulator)
    return merged

  def extract_output(self, accumulator):
    return nf.encode_jpeg(accumulator.image()) if accumulator is not None else b''


# ----------------------------------------------------------------------------- per subject

def _read_staged(uri: str) -> Dict[str, bytes]:
  return dict(read_frame_archive(uri))


def _pcm(wav: bytes) -> np.ndarray:
  samples, rate = wav_samples(wav)
  if rate != AUDIO_RATE:
    raise ValueError(f'clip audio is {rate} Hz, not {AUDIO_RATE}')
  return samples


def _wav_bytes(pcm: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  with wave.open(buffer, 'wb') as out:
    out.setnchannels(1)
    out.setsampwidth(2)
    out.setframerate(AUDIO_RATE)
    out.writeframes(np.clip(np.round(pcm * 32768.0), -32768, 32767).astype('<i2').tobytes())
  return buffer.getvalue()


class _FramesJson:
  """A `{..., "frames": [...]}` JSON file written frame by frame to a local file, then published at `uri`:
  face_mesh.json holds 1434 numbers a frame, too many to build in memory for a long subject."""

  def __init__(self, uri: str, head: dict):
    self.uri = uri
    fd, self.local = tempfile.mkstemp(prefix='nerf-', suffix='.json')
    self.handle = os.fdopen(fd, 'w', encoding='utf-8')
    self.handle.write(json.dumps(head, separators=(',', ':'))[:-1] + ',"frames":[')
    self.count = 0

  def add(self, entry: dict) -> None:
    self.handle.write((',' if self.count else '') + json.dumps(entry, separators=(',', ':')))
    self.count += 1

  def close(self) -> None:
    self.handle.write(']}')
    self.handle.close()
    os.chmod(self.local, 0o644)  # as the other files (mkstemp makes it private)
    put_file(self.local, self.uri, move=True)

  def discard(self) -> None:
    """Drop the local file of a subject that failed part-way; a no-op after `close`."""
    if not self.handle.closed:
      self.handle.close()
    if os.path.exists(self.local):
      os.unlink(self.local)


def _adnerf_json_bytes(value) -> bytes:
  """As AD-NeRF writes its transforms files."""
  return json.dumps(value, indent=2, separators=(',', ': ')).encode()


class WriteSubject(beam.DoFn):
  """(subject, {'clips': NerfClips, 'bc': [bc.jpg bytes]}) -> one index record per clip, after the subject's
  folder is written and published; Rejects on tag `rejects`."""

  def __init__(self, output: str, audio_kinds, focal: Optional[float], val_every: Optional[int],
               hubert_model: Optional[str] = None, wav2vec_model: Optional[str] = None,
               deepspeech_model: Optional[str] = None):
    self.output = output
    self.audio_kinds = parse_kinds(audio_kinds)
    self.focal = focal
    self.val_every = val_every
    self.model_paths = {'hubert': hubert_model, 'wav2vec': wav2vec_model, 'deepspeech': deepspeech_model}
    self.models = {}
    self.subjects = Metrics.counter(STAGE, 'nerf_subjects')
    self.frames_written = Metrics.counter(STAGE, 'nerf_frames')

  def setup(self):
    for kind in self.audio_kinds:
      if kind in HANDLERS:
        self.models[kind] = SharedModel(HANDLERS[kind](self.model_paths[kind]))
        self.models[kind].setup()

  def published(self, keyed) -> Optional[List[dict]]:
    """The subject's records when some attempt published its folder with these clips (DeadLetter: a concurrent
    attempt); not an earlier version of the subject this attempt re-makes."""
    records = published_records(self.output, keyed[0])
    return records if same_version(records, _versions(keyed[1]['clips'])) else None

  def process(self, keyed):
    subject, grouped = keyed
    clips = sorted(grouped['clips'], key=lambda clip: clip.order)
    if not clips:
      return
    published = published_records(self.output, subject)
    if same_version(published, _versions(clips)):  # a retried bundle finds its subject published
      yield from published
      delete_quietly([uri for clip in clips for uri in clip.consumed])
      return
    if published is not None and not remade(published, _versions(clips)):
      yield from self._not_added(subject, clips)
      return
    # An unexpected error rejects each of the subject's clips `internal_error` (DeadLetter, with their planned
    # ids); the audio model failing on the subject's audio is a `model_error`, which a later run retries.
    failed = sorted(grouped.get('failed', ()))
    if failed:  # written whole (transforms/subject_window.py)
      for clip in clips:
        yield self._reject(clip, INCOMPLETE, f'subject {subject} is written only with all its clips, and {failed[0]} '
                           'failed in a way a later run retries: that run makes the subject')
      delete_quietly([uri for clip in clips for uri in clip.consumed])
      return
    try:
      yield from self._subject(subject, clips, b''.join(grouped['bc']), published)
    except AudioFeatureError as error:
      detail = describe(error)
      logging.warning('nerf: the audio features of subject %s failed: %s', subject, detail)
      for clip in clips:
        yield self._reject(clip, 'model_error', detail[:500])

  @staticmethod
  def _reject(clip: NerfClip, reason: str, detail: str):
    return beam.pvalue.TaggedOutput('rejects', Reject(clip.task.clip_id, STAGE, reason, detail, clip.task.source_id,
                                                      planned_id=clip.task.planned_id))

  def _subject(self, subject: str, clips: List[NerfClip], bc_jpeg: bytes, earlier: Optional[List[dict]]):
    """Writes the subject's folder and publishes it; `earlier`: the records of the version a run published
    before its clips changed, unpublished first and written over (transforms/writers/folders.py)."""
    if earlier is not None:
      unpublish(self.output, subject, earlier)
    folder = UnitFiles(FileSystems.join(self.output, subject))
    size, fps = clips[0].size, clips[0].fps
    bc = nf.decode_image(bc_jpeg)
    write_atomic(folder.uri('bc.jpg'), bc_jpeg)
    camera = nf.intrinsics(size, self.focal)
    mesh = _FramesJson(folder.uri('face_mesh.json'), {
        'image_size': [size, size], 'units': 'output pixels; z is relative depth at the scale of x (MediaPipe)'})
    face_poses = _FramesJson(folder.uri('face_poses.json'), {
        'convention': 'MediaPipe facial transformation matrix: canonical face (cm) -> camera space of a '
                      f'{nf.MEDIAPIPE_VERTICAL_FOV:g} degree vertical field of view camera looking down -z'})
    camera_poses = _FramesJson(folder.uri('camera_poses.json'), dict(
        camera, width=size, height=size,
        convention='camera-to-world in the head\'s frame, metres; OpenGL/NeRF axes (x right, y up, the camera '
                   'looks down -z), as AD-NeRF\'s transform_matrix'))
    poses, rects, pcm, records, blinks = {}, {}, [], [], []
    first = 0
    try:
      for clip in clips:
        staged = _read_staged(clip.staged_uri)
        lmk68 = np.load(io.BytesIO(staged['lmk68.npy'])).astype(np.float64)
        landmarks = np.load(io.BytesIO(staged['landmarks.npy'])).astype(np.float64)
        matrices = np.load(io.BytesIO(staged['matrix.npy'])).astype(np.float64)
        blinks.append(np.load(io.BytesIO(staged['blinks.npy'])))
        pcm.append(nf.frame_aligned_pcm(_pcm(staged['audio.wav']), first, clip.num_frames, fps, AUDIO_RATE))
        self._write_frames(folder, clip, first, bc)
        for index in range(clip.num_frames):
          i = first + index
          found = bool(np.isfinite(landmarks[index]).all() and np.isfinite(matrices[index]).all())
          if found:
            write_atomic(folder.uri('ori_imgs', f'{i}.lms'), nf.lms_text(lmk68[index]))
            poses[i] = nf.camera_pose(matrices[index], size, camera['focal_len'])
            rects[i] = nf.face_rect(lmk68[index], size, size)
          mesh.add({'img_id': i, 'landmarks': np.round(landmarks[index], 2).tolist() if found else None})
          face_poses.add({'img_id': i, 'matrix': np.round(matrices[index], 6).tolist() if found else None})
          camera_poses.add({'img_id': i, 'transform_matrix': np.round(poses[i], 8).tolist() if found else None})
        records.append(_record(subject, clip, first))
        first += clip.num_frames
      for frames_json in (mesh, face_poses, camera_poses):
        frames_json.close()
    finally:
      for frames_json in (mesh, face_poses, camera_poses):
        frames_json.discard()
    wav = _wav_bytes(np.concatenate(pcm))
    write_atomic(folder.uri('audio.wav'), wav)
    for kind in self.audio_kinds:
      for name, features in trainer_files(kind, _pcm(wav), first, fps, self.models.get(kind)).items():
        write_atomic(folder.uri(name), nf.npy_bytes(features.astype(np.float32)))
    write_atomic(folder.uri('au.csv'), nf.au_csv(np.concatenate(blinks), fps))
    for name, ids in nf.split_ids(sorted(poses), self.val_every).items():
      write_atomic(folder.uri(f'transforms_{name}.json'),
                   _adnerf_json_bytes(nf.transforms_json(ids, poses, rects, camera)))
    # What an earlier version or an unpublished attempt left and this one does not write: frames past the new
    # count, `.lms` of frames without a face now, depth maps or audio features this run does not make.
    folder.drop_others(tree(folder.root))
    published = publish_unit(self.output, subject, records)
    self.subjects.inc()
    self.frames_written.inc(first)
    yield from published
    delete_quietly([uri for clip in clips for uri in clip.consumed])

  @staticmethod
  def _write_frames(folder: UnitFiles, clip: NerfClip, first: int, bc: np.ndarray) -> None:
    """ori_imgs, parsing, gt_imgs (= com_imgs), head_imgs and torso_imgs (and depth) of one clip's frames, numbered
    from `first`."""
    image = None
    for name, data in read_frame_archive(clip.frames_uri):
      index, kind = name.rsplit('.', 1)
      i = first + int(index)
      if kind == 'jpg':
        write_atomic(folder.uri('ori_imgs', f'{i}.jpg'), data)
        image = nf.decode_image(data)
        continue
      write_atomic(folder.uri('parsing', f'{i}.png'), data)
      labels = nf.decode_image(data)
      gt = nf.gt_image(image, labels, bc)
      gt_jpeg = nf.encode_jpeg(gt)
      write_atomic(folder.uri('gt_imgs', f'{i}.jpg'), gt_jpeg)
      write_atomic(folder.uri('com_imgs', f'{i}.jpg'), gt_jpeg)  # AD-NeRF's com_imgs are its gt images
      write_atomic(folder.uri('head_imgs', f'{i}.jpg'), nf.encode_jpeg(nf.head_image(gt, labels, bc)))
      write_atomic(folder.uri('torso_imgs', f'{i}.png'), nf.encode_png(nf.torso_image(gt, labels, bc)))
    if clip.depth_uri:
      for name, data in read_frame_archive(clip.depth_uri):
        write_atomic(folder.uri('depth', f'{first + int(name.rsplit(".", 1)[0])}.npy'), data)

  def _not_added(self, subject: str, clips: List[NerfClip]):
    """Clips of a subject an earlier run published without them are rejected: adding them would renumber the
    published frames (a subject is re-made only when one of its published clips changed or left the input)."""
    for clip in clips:
      yield self._reject(clip, 'subject_exists', f'subject {subject} was written by an earlier run without this '
                         'clip; write to a new --output (or remove the subject\'s folder and '
                         f'published/{subject}.jsonl) to include it')
    delete_quietly([uri for clip in clips for uri in clip.consumed])


def _versions(clips) -> List[Tuple[str, str]]:
  return [(clip.task.clip_id, clip.task.inputs) for clip in clips]


def _record(subject: str, clip: NerfClip, first: int) -> dict:
  task = clip.task
  return {'id': task.clip_id, 'planned_id': task.planned, 'source_id': task.source_id, 'subject': subject,
          'num_frames': clip.num_frames, 'frames': [first, first + clip.num_frames], 'fps': clip.fps,
          'size': clip.size, 'start': round(task.start, 3), 'end': round(task.end, 3),
          'duration': round(clip.num_frames / clip.fps, 3),
          'crop': {'mode': task.crop_mode, 'window': list(task.window), 'padding': list(task.padding)},
          'scores': clip.scores, 'inputs': task.inputs, **({'language': task.language} if task.language else {})}


class WriteNerfSubjects(beam.PTransform):
  """Kept Analyses -> {'records': index records (one per clip), 'rejects': Rejects}."""

  def __init__(self, output: str, work_dir: str, audio_kinds, focal: Optional[float], val_every: Optional[int],
               hubert_model: Optional[str] = None, wav2vec_model: Optional[str] = None,
               deepspeech_model: Optional[str] = None):
    super().__init__()
    self.output, self.work_dir = output, work_dir
    self.writer = WriteSubject(output, audio_kinds, focal, val_every, hubert_model, wav2vec_model, deepspeech_model)

  def expand(self, kept):
    staged = (kept | 'NerfStageClip' >> beam.ParDo(DeadLetter(StageNerfClip(self.work_dir), STAGE))
              .with_outputs('background', 'rejects', main='clips'))
    bc = staged.background | 'NerfMergeBackgrounds' >> beam.CombinePerKey(MergeBackgrounds())
    failed = staged.rejects | 'NerfFailedClips' >> beam.Map(lambda r: (r.source_id, f'{r.id} ({r.reason})'))
    written = ({'clips': staged.clips, 'bc': bc, 'failed': failed}
               | 'NerfBySubject' >> beam.CoGroupByKey()
               | 'NerfWriteSubject' >> beam.ParDo(DeadLetter(self.writer, STAGE)).with_outputs('rejects',
                                                                                                 main='records'))
    rejects = (staged.rejects, written.rejects) | 'NerfWriterRejects' >> beam.Flatten()
    return {'records': written.records, 'rejects': rejects}
