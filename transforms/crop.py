"""Auto crop: detect the face on sampled source frames, then one square window per clip.

HDTF's method 2: the union of the face regions over the clip, made square
around its centre, enlarged by `crop_ratio` (or `--crop_scale`), clamped.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, Optional, Tuple

import apache_beam as beam
import av
import numpy as np
from apache_beam.metrics import Metrics

from beam_pipeline.elements import ClipTask, Detection, Reject, Window
from transforms.probe import open_media

STAGE = 'crop'


def sample_frames(task: ClipTask, detect_fps: float, max_side: int) -> Iterable[Tuple[int, np.ndarray]]:
  """(sample index, RGB frame scaled to at most `max_side`) every 1/detect_fps seconds of the clip."""
  info = task.media.info
  scale = min(1.0, max_side / max(info.width, info.height))
  width, height = max(2, int(info.width * scale) // 2 * 2), max(2, int(info.height * scale) // 2 * 2)
  t0 = task.media_start + info.start_time
  t1 = task.media_end + info.start_time
  with open_media(task.media.uri) as container:
    stream = container.streams.video[0]
    stream.thread_type = 'AUTO'
    container.seek(max(0, int((t0 - 0.5) * av.time_base)), backward=True, any_frame=False)
    index = 0
    for frame in container.decode(stream):
      if frame.time is None or frame.time < t0 + index / detect_fps - 0.5 / max(info.fps, 1):
        continue
      if frame.time >= t1:
        break
      yield index, frame.to_ndarray(width=width, height=height, format='rgb24')
      index = int((frame.time - t0) * detect_fps) + 1


class SampleFrames(beam.DoFn):
  """ClipTask -> ((clip_id, sample index), small RGB frame) for the face detector."""

  def __init__(self, detect_fps: float, max_side: int = 640):
    self.detect_fps = detect_fps
    self.max_side = max_side

  def process(self, task: ClipTask):
    try:
      for index, image in sample_frames(task, self.detect_fps, self.max_side):
        yield (task.clip_id, index), image
    except (av.error.FFmpegError, OSError) as error:
      yield beam.pvalue.TaggedOutput('rejects', Reject(task.clip_id, STAGE, 'decode_error', str(error)[:500],
                                                       task.source_id))


def face_box_fraction(keyed_result) -> Tuple[str, Optional[Tuple[float, float, float, float]]]:
  """RunInference output -> (clip_id, largest face box as fractions of the frame, or None)."""
  (clip_id, _), result = keyed_result
  found: Detection = result.inference
  if not found.num_faces:
    return clip_id, None
  size = np.array([found.image_width, found.image_height] * 2, np.float32)
  return clip_id, tuple(float(v) for v in found.boxes[0] / size)


def square_window(union: Tuple[float, float, float, float], scale: float, width: int, height: int) -> Window:
  """A square around the union's centre, side = longest side x scale, shifted and shrunk to fit."""
  x0, y0, x1, y1 = union
  side = max(x1 - x0, y1 - y0) * scale
  side = int(min(side, width, height)) // 2 * 2
  cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
  left = int(round(min(max(cx - side / 2, 0), width - side)))
  top = int(round(min(max(cy - side / 2, 0), height - side)))
  return left, top, side, side


class ChooseWindow(beam.DoFn):
  """(clip_id, {'task': [ClipTask], 'faces': [box or None]}) -> ClipTask with its window, or `no_face`."""

  def __init__(self, crop_scale: float, min_face_ratio: float = 0.0):
    self.crop_scale = crop_scale
    self.min_face_ratio = min_face_ratio
    self.no_face = Metrics.counter(STAGE, 'clips_without_face')

  def process(self, element):
    _, grouped = element
    # No task: the clip was rejected while sampling (its reject is already out).
    for task in grouped['task']:
      yield self._choose(task, list(grouped['faces']))

  def _choose(self, task: ClipTask, faces: list):
    boxes = [b for b in faces if b is not None]
    total = len(faces)
    info = task.media.info
    if not boxes:
      self.no_face.inc()
      return beam.pvalue.TaggedOutput('rejects', Reject(
          task.clip_id, STAGE, 'no_face', f'no face in any of {total} sampled frames', task.source_id))
    found = np.array(boxes) * np.array([info.width, info.height, info.width, info.height])
    union = (found[:, 0].min(), found[:, 1].min(), found[:, 2].max(), found[:, 3].max())
    scale = task.crop_ratio or self.crop_scale
    window = square_window(union, scale, info.width, info.height)
    stats = (('detect_samples', float(total)), ('detect_face_ratio', len(boxes) / max(total, 1)),
             ('source_face_px', float(np.median(np.maximum(found[:, 2] - found[:, 0], found[:, 3] - found[:, 1])))))
    return dataclasses.replace(task, window=window, crop_mode='detect', face_stats=task.face_stats + stats)
