"""The pipeline graph: one readable composition of the stage transforms."""
from __future__ import annotations

from typing import Dict, Iterable

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from beam_pipeline.options import TalkingFaceOptions
from model_handlers.mediapipe_face import FaceDetectorModelHandler, FaceLandmarkerModelHandler
from transforms.crop import ChooseWindow, SampleFrames, face_box_fraction
from transforms.download import DownloadSource
from transforms.manifest import ReadSources
from transforms.plan import PlanClips
from transforms.render import RenderClips
from transforms.write import AssembleSample, WriteRunSummary, WriteShards


def work_dir_of(opts: TalkingFaceOptions) -> str:
  return opts.work_dir or FileSystems.join(opts.output, '_work')


def _key_frame_result(keyed):
  (clip_id, index), result = keyed
  return clip_id, (index, result.inference)


def build_pipeline(p: beam.Pipeline, opts: TalkingFaceOptions, written_ids: Iterable[str] = ()) -> Dict:
  """manifest -> download -> plan -> (detect) -> render + landmarks -> shards -> run summary."""
  work_dir = work_dir_of(opts)
  detector = FaceDetectorModelHandler(model_dir=opts.model_dir, max_batch_size=opts.landmark_batch_size)
  landmarker = FaceLandmarkerModelHandler(model_dir=opts.model_dir, max_batch_size=opts.landmark_batch_size)

  read = p | 'ReadSources' >> ReadSources(opts.input, opts.input_format, written_ids)
  downloaded = read['sources'] | 'Download' >> beam.ParDo(DownloadSource(
      work_dir, max_download_mb=opts.max_download_mb, timeout_s=opts.download_timeout_s,
      retries=opts.download_retries, download_sections=not opts.full_downloads,
      default_height=opts.download_height, download_method=opts.download_method)).with_outputs(
          'rejects', main='media')
  planned = downloaded.media | 'PlanClips' >> beam.ParDo(PlanClips(
      opts.crop_mode, opts.allow_silent, opts.min_duration, opts.max_duration_s)).with_outputs(
          'rejects', main='tasks')
  with_window, needs_detection = planned.tasks | 'ByCropMode' >> beam.Partition(
      lambda task, _: 0 if task.window is not None else 1, 2)

  sampled = needs_detection | 'SampleFrames' >> beam.ParDo(SampleFrames(opts.detect_fps)).with_outputs(
      'rejects', main='frames')
  boxes = (sampled.frames
           | 'DetectFaces' >> RunInference(KeyedModelHandler(detector))
           | 'FaceBoxes' >> beam.Map(face_box_fraction))
  detected = ({'task': needs_detection | 'KeyTasks' >> beam.Map(lambda t: (t.clip_id, t)), 'faces': boxes}
              | 'GroupDetections' >> beam.CoGroupByKey()
              | 'ChooseWindow' >> beam.ParDo(ChooseWindow(opts.crop_scale)).with_outputs('rejects', main='tasks'))

  rendered = ((with_window, detected.tasks)
              | 'ReadyToRender' >> beam.Flatten()
              | 'Render' >> beam.ParDo(RenderClips(work_dir, opts.size, opts.fps, opts.crf, opts.x264_preset,
                                                   opts.max_render_s)).with_outputs(
                                                       'rendered', 'rejects', main='frames'))
  faces = (rendered.frames
           | 'Landmarks' >> RunInference(KeyedModelHandler(landmarker))
           | 'ByClip' >> beam.Map(_key_frame_result))
  samples = ({'rendered': rendered.rendered, 'faces': faces}
             | 'JoinFaces' >> beam.CoGroupByKey()
             | 'AssembleSample' >> beam.ParDo(AssembleSample()).with_outputs('rejects', main='samples'))
  records = samples.samples | 'WriteShards' >> beam.ParDo(WriteShards(
      opts.output, opts.shard_max_samples, opts.shard_max_mb))

  rejects = ((read['rejects'], downloaded.rejects, planned.rejects, sampled.rejects, detected.rejects,
              rendered.rejects, samples.rejects)
             | 'AllRejects' >> beam.Flatten())
  summary = (p
             | 'AfterWrites' >> beam.Create([None])
             | 'WriteRunSummary' >> beam.ParDo(WriteRunSummary(opts.output),
                                               beam.pvalue.AsList(read['planned']),
                                               beam.pvalue.AsList(rejects),
                                               beam.pvalue.AsList(records)))
  return {'records': records, 'rejects': rejects, 'summary': summary}
