"""The recipe hooks of the shared spine: defaults, frame archives, per-frame `found` results, folder units."""
from __future__ import annotations

import json

import numpy as np
import pytest

from beam_pipeline.recipes import NAMES, get_recipe
from beam_pipeline.recipes.base import Recipe, apply_defaults, explicit_flags
from transforms.core.frame_store import FrameArchive, archive_uri, read_frame_archive
from transforms.frame_analysis import ClipPass, FrameAnalyzer, PassResult
from transforms.writers.folders import is_published, publish_unit
from transforms.writers.summary import published_indexes


def test_every_recipe_is_registered():
  for name in NAMES:
    assert get_recipe(name).name == name
  with pytest.raises(ValueError, match='unknown recipe'):
    get_recipe('nope')


def test_recipe_defaults_yield_to_the_command_line():
  from beam_pipeline.options import TalkingFaceOptions

  class Fast(Recipe):
    defaults = {'fps': 30.0, 'eye_motion': True, 'size': 256}

  argv = ['--fps=24', '--size', '128']
  opts = TalkingFaceOptions(argv)
  assert explicit_flags(argv) == {'fps', 'size'}
  assert apply_defaults(Fast(), opts, argv) == {'eye_motion': True}
  assert (opts.fps, opts.size, opts.eye_motion) == (24.0, 128, True)


def test_frame_archive_is_deterministic_and_atomic(tmp_path):
  uri = archive_uri(str(tmp_path), 'clip_0', 'ori')
  blobs = []
  for attempt in range(2):  # a retried bundle writes the same bytes
    archive = FrameArchive(uri)
    for i in range(3):
      archive.add(f'{i}.jpg', bytes([i]) * (1000 + i))
    assert attempt or not (tmp_path / 'frames').exists()  # nothing in the work dir before close
    assert archive.close() == uri
    archive.discard()  # no-op after close
    blobs.append((tmp_path / 'frames' / 'clip_0.ori.tar').read_bytes())
  assert blobs[0] == blobs[1]
  assert [(name, len(data)) for name, data in read_frame_archive(uri)] == [('0.jpg', 1000), ('1.jpg', 1001),
                                                                          ('2.jpg', 1002)]
  dropped = FrameArchive(archive_uri(str(tmp_path), 'clip_1', 'ori'))
  dropped.add('0.jpg', b'x')
  dropped.discard()
  assert not (tmp_path / 'frames' / 'clip_1.ori.tar').exists()


def test_published_units_count_as_written(tmp_path):
  output = str(tmp_path)
  assert not is_published(output, 'subject')
  records = publish_unit(output, 'subject', [{'id': 'subject_0', 'planned_id': 'subject_0', 'num_frames': 5}])
  assert records[0]['folder'] == 'subject' and is_published(output, 'subject')
  (index,) = published_indexes(output)
  assert json.loads(open(index).read())['id'] == 'subject_0'


class _MouthWriter(FrameAnalyzer):
  """Reads what the landmarker found on each frame and keeps a crop per frame in an archive."""
  name = 'mouth_writer'
  batch_size = 4

  def __init__(self, work_dir):
    self.work_dir = work_dir

  def setup(self):
    pass

  def start(self, task, num_frames, size):
    analyzer = self

    class Pass(ClipPass):
      def __init__(self):
        self.archive = FrameArchive(archive_uri(analyzer.work_dir, task.clip_id, 'mouth'))
        self.seen = np.zeros(num_frames, bool)

      def add(self, frames):
        for frame in frames:
          if 'landmarks' in frame.found:
            self.seen[frame.index] = True
            self.archive.add(f'{frame.index}.npy', frame.found['landmarks'][13, :2].tobytes())

      def finish(self, produced):
        return PassResult({'mouth_seen': self.seen[:produced]}, 0, files={'mouth': self.archive.close()})

      def abandon(self):
        self.archive.discard()

    return Pass()


def test_analyzers_see_the_landmarks_of_each_frame(tmp_path):
  """A recipe's analyzer after the landmarker gets each frame's tracked-face landmarks in `found` and its
  archive comes back in RenderedClip.files."""
  import apache_beam as beam
  from apache_beam.testing.test_pipeline import TestPipeline
  from apache_beam.testing.util import assert_that
  from beam_pipeline.demo import VideoSpec, write_video
  from model_handlers.mediapipe_face import FaceLandmarkerModelHandler
  from transforms.core.elements import ClipTask, MediaFile
  from transforms.frame_analysis import FaceLandmarks
  from transforms.lib.probe import probe
  from transforms.render import RenderClips

  video = write_video(str(tmp_path / 'talk.mp4'), VideoSpec(duration=1.0, fps=25.0, width=320, height=240))
  info = probe(video)
  task = ClipTask('talk_0', 'talk', video, MediaFile(video, info), 0.0, 1.0, window=(0, 0, 240, 240))
  work = str(tmp_path / 'work')
  analyzers = [FaceLandmarks(FaceLandmarkerModelHandler(max_batch_size=8)), _MouthWriter(work)]

  def check(clips):
    (clip,) = clips
    assert clip.arrays['mouth_seen'].sum() >= 20 and clip.arrays['matrix'].shape == (25, 4, 4)
    members = list(read_frame_archive(clip.files['mouth']))
    assert len(members) == clip.arrays['mouth_seen'].sum()
    seen = np.flatnonzero(clip.arrays['mouth_seen'])
    for (name, data), index in zip(members, seen):
      assert name == f'{index}.npy'
      assert np.allclose(np.frombuffer(data, np.float32), clip.arrays['landmarks'][index, 13, :2])

  with TestPipeline() as p:
    rendered = (p | beam.Create([task])
                | beam.ParDo(RenderClips(work, 128, 25.0, 23, 'ultrafast', analyzers=analyzers)))
    assert_that(rendered, check)


def test_megactor_needs_both_dwpose_files(tmp_path):
  """One DWPose file without the other fails when the graph is built, naming the missing flag."""
  from apache_beam.options.pipeline_options import PipelineOptions
  from beam_pipeline.options import TalkingFaceOptions
  from model_handlers.weights import WeightsError
  pose = tmp_path / 'dw-ll_ucoco_384.onnx'
  pose.write_bytes(b'onnx')
  opts = PipelineOptions(['--recipe=megactor', f'--dwpose_model={pose}']).view_as(TalkingFaceOptions)
  with pytest.raises(WeightsError, match='--dwpose_detector: not given'):
    get_recipe('megactor').analyzers(opts, None)
  assert get_recipe('megactor').analyzers(PipelineOptions([]).view_as(TalkingFaceOptions), None) == []
