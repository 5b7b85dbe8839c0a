"""Frames for the face detector and shot changes, from one decode pass: what tracking and auto crop start from.

Detector frames are sampled every 1/detect_fps seconds; shot changes are looked for on every decoded frame.
The window around a track (transforms/lib/geometry.square_window) follows HDTF's method 2: the union of the
face regions, made square around its centre, enlarged by `crop_ratio` (or `--crop_scale`), clamped to the frame.
"""
from __future__ import annotations

from typing import Iterable, List, Optional, Tuple

import apache_beam as beam
import av
import cv2
import numpy as np
from apache_beam.ml.inference.base import ModelHandler

from model_handlers.in_process import ModelError, SharedModel
from transforms.core.elements import ClipTask, Detection, FaceSamples, Reject
from transforms.lib.probe import open_media, upright_rgb

STAGE = 'crop'
_HIST_SIZE = (64, 36)  # frames are shrunk to this before their colour histogram is taken


class ShotCuts:
  """Hard cuts from consecutive frames' HSV histograms (Bhattacharyya distance above `threshold`).

  A cut is reported at the time of the first frame of the new shot. Gradual changes (a face
  walking out, a pan) move the histogram a little per frame and stay well under the threshold.
  """

  def __init__(self, threshold: float):
    self.threshold = threshold
    self.previous = None
    self.cuts: List[float] = []

  def push(self, t: float, small_rgb: np.ndarray) -> None:
    hsv = cv2.cvtColor(small_rgb, cv2.COLOR_RGB2HSV)
    hist = cv2.calcHist([hsv], [0, 1, 2], None, [16, 8, 4], [0, 180, 0, 256, 0, 256])
    hist = cv2.normalize(hist, hist).flatten()
    if self.previous is not None and cv2.compareHist(self.previous, hist, cv2.HISTCMP_BHATTACHARYYA) > self.threshold:
      self.cuts.append(t)
    self.previous = hist


def sample_frames(task: ClipTask, detect_fps: float, max_side: int,
                  shots: Optional[ShotCuts] = None) -> Iterable[Tuple[int, float, np.ndarray]]:
  """(sample index, clip time, RGB frame scaled to at most `max_side`) every 1/detect_fps seconds of the
  clip; every decoded frame of the clip also goes through `shots`."""
  info = task.media.info
  scale = min(1.0, max_side / max(info.width, info.height))
  width, height = max(2, int(info.width * scale) // 2 * 2), max(2, int(info.height * scale) // 2 * 2)
  t0 = task.media_start + info.start_time
  t1 = task.media_end + info.start_time
  half_frame = 0.5 / max(info.fps, 1)
  with open_media(task.media.uri) as container:
    stream = container.streams.video[0]
    stream.thread_type = 'AUTO'
    container.seek(max(0, int((t0 - 0.5) * av.time_base)), backward=True, any_frame=False)
    index = 0
    for frame in container.decode(stream):
      if frame.time is None or frame.time < t0 - half_frame:
        continue
      if frame.time >= t1:
        break
      if shots is not None and shots.threshold > 0:
        shots.push(frame.time - t0, frame.to_ndarray(width=_HIST_SIZE[0], height=_HIST_SIZE[1], format='rgb24'))
      if frame.time < t0 + index / detect_fps - half_frame:
        continue
      yield index, frame.time - t0, upright_rgb(frame, width, height, info.rotation)  # phone videos: display matrix
      index = int((frame.time - t0) * detect_fps) + 1


class SampleFrames(beam.DoFn):
  """ClipTask -> FaceSamples: the detector's face boxes on frames sampled every 1/detect_fps seconds and
  the shot cuts, one element for the whole clip; `Reject`s on tag `rejects`.

  The detector runs here, in-process, on the sampled frames (model_handlers/in_process.py), so per-frame
  results never become elements. A clip whose sampled frames the detector failed on more than half the
  time is rejected as `model_error` (transient), not as a clip without a face.
  """

  def __init__(self, detector: ModelHandler, detect_fps: float, shot_threshold: float = 0.0, max_side: int = 640):
    self.model = SharedModel(detector)
    self.detect_fps = detect_fps
    self.shot_threshold = shot_threshold
    self.max_side = max_side

  def setup(self):
    self.model.setup()

  def process(self, task: ClipTask):
    shots = ShotCuts(self.shot_threshold)
    samples: List[Tuple[float, np.ndarray]] = []
    errors: List[ModelError] = []
    pending: List[Tuple[float, np.ndarray]] = []

    def detect():
      for (t, _), found in zip(pending, self.model.infer([image for _, image in pending])):
        if isinstance(found, ModelError):
          errors.append(found)
        else:
          samples.append((t, face_boxes(found)))
      pending.clear()

    try:
      for _, t, image in sample_frames(task, self.detect_fps, self.max_side, shots):
        pending.append((t, image))
        if len(pending) >= self.model.batch_size:
          detect()
      detect()
    except (av.error.FFmpegError, OSError) as error:
      yield self._reject(task, 'decode_error', str(error))
      return
    if 2 * len(errors) > len(samples) + len(errors):
      yield self._reject(task, 'model_error', f'the face detector failed on {len(errors)} of '
                         f'{len(samples) + len(errors)} sampled frames (last: {errors[-1].detail})')
      return
    yield FaceSamples(task, tuple(samples), tuple(shots.cuts), len(errors))

  @staticmethod
  def _reject(task: ClipTask, reason: str, detail: str):
    return beam.pvalue.TaggedOutput('rejects', Reject(task.clip_id, STAGE, reason, detail[:500], task.source_id,
                                                      planned_id=task.planned_id))


def face_boxes(found: Detection) -> np.ndarray:
  """A detection's face boxes (F, 4) as fractions of its frame (sampled frames are scaled down)."""
  size = np.array([found.image_width, found.image_height] * 2, np.float32)
  return (found.boxes / size).astype(np.float32)

