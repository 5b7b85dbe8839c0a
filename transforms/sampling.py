"""Frames for the face detector and shot changes, from one decode pass: what tracking and auto crop start from.

Detector frames are sampled every 1/detect_fps seconds; shot changes are looked for on every decoded frame.
The window around a track (transforms/lib/geometry.square_window) follows HDTF's method 2: the union of the
face regions, made square around its centre, enlarged by `crop_ratio` (or `--crop_scale`), clamped to the frame.
"""
from __future__ import annotations

import dataclasses
from typing import Iterable, List, Optional, Tuple, Union

import apache_beam as beam
import av
import cv2
import numpy as np
from apache_beam.ml.inference.base import ModelHandler

from model_handlers.in_process import ModelError, SharedModel
from model_handlers.transnetv2 import SIZE as TRANSNET_SIZE, TransNetV2ModelHandler, cut_frames, require_transnetv2
from transforms.core.elements import ClipTask, Detection, FaceSamples, Reject
from transforms.lib.probe import open_media, upright_rgb

STAGE = 'crop'
_HIST_SIZE = (64, 36)  # frames are shrunk to this before their colour histogram is taken


@dataclasses.dataclass(frozen=True)
class ShotDetection:
  """How shot cuts are found (--shot_detector): HSV histograms above `threshold` (0: off), or TransNetV2
  (`model`, a ModelHandler of model_handlers/transnetv2.py) where given."""
  threshold: float = 0.0
  model: Optional[ModelHandler] = None


def shot_detection(opts) -> ShotDetection:
  """--shot_detector and --shot_threshold as SampleFrames takes them (a one-line error where TransNetV2 is asked
  for and its extra is missing)."""
  if opts.shot_detector == 'transnetv2' and opts.shot_threshold > 0:
    require_transnetv2('--shot_detector=transnetv2')
    return ShotDetection(opts.shot_threshold, TransNetV2ModelHandler())
  return ShotDetection(opts.shot_threshold)


class ShotCuts:
  """Hard cuts from consecutive frames' HSV histograms (Bhattacharyya distance above `threshold`).

  A cut is reported at the time of the first frame of the new shot. Gradual changes (a face
  walking out, a pan) move the histogram a little per frame and stay well under the threshold.
  """

  size = _HIST_SIZE

  def __init__(self, threshold: float):
    self.threshold = threshold
    self.previous = None
    self.cuts: List[float] = []

  def finish(self) -> None:
    """Every frame was pushed (the histograms judged each as it came)."""

  def push(self, t: float, small_rgb: np.ndarray) -> None:
    hsv = cv2.cvtColor(small_rgb, cv2.COLOR_RGB2HSV)
    hist = cv2.calcHist([hsv], [0, 1, 2], None, [16, 8, 4], [0, 180, 0, 256, 0, 256])
    hist = cv2.normalize(hist, hist).flatten()
    if self.previous is not None and cv2.compareHist(self.previous, hist, cv2.HISTCMP_BHATTACHARYYA) > self.threshold:
      self.cuts.append(t)
    self.previous = hist


class NeuralShotCuts:
  """TransNetV2's cuts: every frame of the clip at 48 x 27 (4 KB each) is kept until the clip is decoded, then
  judged in the network's overlapping windows of 100 frames; a cut is at the first frame after each run of
  frames it calls a transition (probability above 0.5)."""

  size = TRANSNET_SIZE
  threshold = 1.0  # > 0: frames are pushed

  def __init__(self, model: SharedModel):
    self.model = model
    self.times: List[float] = []
    self.frames: List[np.ndarray] = []
    self.cuts: List[float] = []

  def push(self, t: float, small_rgb: np.ndarray) -> None:
    self.times.append(t)
    self.frames.append(small_rgb)

  def finish(self) -> None:
    if len(self.frames) < 2:
      return
    (probs,) = self.model.infer([np.stack(self.frames)])
    if isinstance(probs, ModelError):
      raise RuntimeError(f'transnetv2 failed: {probs.detail}')
    self.cuts = [self.times[i] for i in cut_frames(probs)]


def sample_frames(task: ClipTask, detect_fps: float, max_side: int,
                  shots=None) -> Iterable[Tuple[int, float, np.ndarray]]:
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
        shots.push(frame.time - t0, frame.to_ndarray(width=shots.size[0], height=shots.size[1], format='rgb24'))
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

  def __init__(self, detector: ModelHandler, detect_fps: float, shots: Union[float, ShotDetection] = 0.0,
               max_side: int = 640):
    self.model = SharedModel(detector)
    self.detect_fps = detect_fps
    self.shots = shots if isinstance(shots, ShotDetection) else ShotDetection(float(shots))  # a float: HSV's
    self.shot_model = SharedModel(self.shots.model) if self.shots.model is not None else None
    self.max_side = max_side

  def setup(self):
    self.model.setup()
    if self.shot_model is not None:
      self.shot_model.setup()

  def process(self, task: ClipTask):
    shots = NeuralShotCuts(self.shot_model) if self.shot_model is not None else ShotCuts(self.shots.threshold)
    samples: List[Tuple[float, np.ndarray]] = []
    scores: List[float] = []  # the detector's best confidence on each sampled frame with a face
    errors: List[ModelError] = []
    pending: List[Tuple[float, np.ndarray]] = []

    def detect():
      for (t, _), found in zip(pending, self.model.infer([image for _, image in pending])):
        if isinstance(found, ModelError):
          errors.append(found)
        else:
          samples.append((t, face_boxes(found)))
          scores.extend([float(found.scores.max())] if len(found.scores) else [])
      pending.clear()

    try:
      for _, t, image in sample_frames(task, self.detect_fps, self.max_side, shots):
        pending.append((t, image))
        if len(pending) >= self.model.batch_size:
          detect()
      detect()
      shots.finish()
    except (av.error.FFmpegError, OSError) as error:
      yield self._reject(task, 'decode_error', str(error))
      return
    if 2 * len(errors) > len(samples) + len(errors):
      yield self._reject(task, 'model_error', f'the face detector failed on {len(errors)} of '
                         f'{len(samples) + len(errors)} sampled frames (last: {errors[-1].detail})')
      return
    if scores:  # scores.face_score: a drawing, a CG face or a face on a screen is a face to the detector too
      score = round(float(np.median(scores)), 3)
      task = dataclasses.replace(task, face_stats=task.face_stats + (('face_score', score),))
    yield FaceSamples(task, tuple(samples), tuple(shots.cuts), len(errors))

  @staticmethod
  def _reject(task: ClipTask, reason: str, detail: str):
    return beam.pvalue.TaggedOutput('rejects', Reject(task.clip_id, STAGE, reason, detail[:500], task.source_id,
                                                      planned_id=task.planned_id))


def face_boxes(found: Detection) -> np.ndarray:
  """A detection's face boxes (F, 4) as fractions of its frame (sampled frames are scaled down)."""
  size = np.array([found.image_width, found.image_height] * 2, np.float32)
  return (found.boxes / size).astype(np.float32)

