"""Shot cuts (--shot_detector): TransNetV2 from its wheel and the HSV histograms, on a generated cut."""
import random

import numpy as np
import pytest

from beam_pipeline.demo import VideoSpec, write_video
from model_handlers.mediapipe_face import FaceDetectorModelHandler
from model_handlers.transnetv2 import TransNetV2ModelHandler, cut_frames
from transforms.core.elements import ClipTask, MediaFile
from transforms.lib.probe import probe
from transforms.sampling import SampleFrames, ShotDetection
from transforms.track import TrackFaces


@pytest.fixture(scope='module')
def cut_clip(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('shots') / 'cut.mp4')
  # At 320 x 240 this cut reads 0.33 on the histograms, under --shot_threshold 0.4; TransNetV2 finds it there too.
  write_video(path, VideoSpec(duration=3.0, fps=25.0, width=640, height=480, cut_at=1.6, seed=5, audio=False))
  return ClipTask('cut_0', 'cut', path, MediaFile(path, probe(path)), 0.0, 3.0)


@pytest.mark.parametrize('shots', ['transnetv2', 'hsv'])
def test_a_cut_splits_the_track_with_either_detector(cut_clip, shots):
  import torch
  before = (torch.are_deterministic_algorithms_enabled(), random.getstate())
  detection = ShotDetection(0.4, TransNetV2ModelHandler('cpu') if shots == 'transnetv2' else None)
  sampler = SampleFrames(FaceDetectorModelHandler(max_faces=2), detect_fps=5.0, shots=detection)
  sampler.setup()
  (found,) = list(sampler.process(cut_clip))
  assert len(found.cuts) == 1 and abs(found.cuts[0] - 1.6) <= 0.04, found.cuts  # the first frame of the new shot
  pieces = list(TrackFaces(1.8).process(found))
  assert [round(p.end - p.start, 1) for p in pieces] in ([1.6, 1.4], [1.6], [1.4]), pieces  # none spans the cut
  # Building TransNetV2 leaves the process's torch and random settings as they were.
  assert (torch.are_deterministic_algorithms_enabled(), random.getstate()) == before


def test_cut_frames_are_the_first_frames_after_a_transition():
  probs = np.array([0.0, 0.1, 0.9, 0.8, 0.1, 0.0, 0.7, 0.0], np.float32)
  assert cut_frames(probs).tolist() == [4, 7]
