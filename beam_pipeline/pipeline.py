"""The pipeline graph: one readable composition of the stage transforms."""
from __future__ import annotations

from typing import Dict, Iterable, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems
from apache_beam.ml.inference.base import KeyedModelHandler, RunInference

from beam_pipeline import progress
from beam_pipeline.elements import Reject
from beam_pipeline.options import TalkingFaceOptions
from model_handlers.mediapipe_face import FaceDetectorModelHandler, FaceLandmarkerModelHandler
from transforms.deadletter import DeadLetter
from transforms.download import DownloadSource
from transforms.filters import ScoreAndFilter, Thresholds
from transforms.incremental import CarryRejects
from transforms.manifest import ReadSources
from transforms.plan import PlanClips
from transforms.render import RenderClips
from transforms.safety import InputPolicy
from transforms.track import DetectAndTrack
from transforms.write import AssembleSample, WriteRunSummary, WriteShards


MAX_TRACKED_FACES = 4  # faces the detector reports per sampled frame, largest first


def work_dir_of(opts: TalkingFaceOptions) -> str:
  return opts.work_dir or FileSystems.join(opts.output, '_work')


def _key_frame_result(keyed):
  (clip_id, index), result = keyed
  return clip_id, (index, result.inference)


def build_pipeline(p: beam.Pipeline, opts: TalkingFaceOptions, written_ids: Iterable[str] = (),
                   progress_dir: Optional[str] = None, carried_rejects: Iterable[Reject] = ()) -> Dict:
  """manifest -> download -> plan -> (detect) -> render + landmarks -> shards -> run summary.

  With `progress_dir`, counting branches feed the live progress line (beam_pipeline.progress).
  `carried_rejects` (--incremental) are skipped like written clips and counted again as rejects.
  """
  work_dir = work_dir_of(opts)
  detector = FaceDetectorModelHandler(model_dir=opts.model_dir, max_batch_size=opts.landmark_batch_size,
                                      max_faces=MAX_TRACKED_FACES)
  landmarker = FaceLandmarkerModelHandler(model_dir=opts.model_dir, max_batch_size=opts.landmark_batch_size)

  carried_rejects = list(carried_rejects)
  skip = set(written_ids) | {r.id for r in carried_rejects}
  policy = InputPolicy.from_options(opts, work_dir)
  read = p | 'ReadSources' >> ReadSources(opts.input, opts.input_format, skip, work_dir=work_dir, policy=policy,
                                          max_member_mb=opts.max_download_mb)
  downloaded = read['sources'] | 'Download' >> beam.ParDo(DeadLetter(DownloadSource(
      work_dir, max_download_mb=opts.max_download_mb, timeout_s=opts.download_timeout_s,
      retries=opts.download_retries, download_sections=not opts.full_downloads,
      default_height=opts.download_height, download_method=opts.download_method, policy=policy,
      max_pixels=opts.max_pixels, probe_timeout_s=opts.probe_timeout_s), 'download')).with_outputs(
          'rejects', main='media')
  planned = downloaded.media | 'PlanClips' >> beam.ParDo(DeadLetter(PlanClips(
      opts.crop_mode, opts.allow_silent, opts.min_duration, opts.max_duration_s), 'plan')).with_outputs(
          'rejects', main='tasks')
  with_window, needs_detection = planned.tasks | 'ByCropMode' >> beam.Partition(
      lambda task, _: 0 if task.window is not None else 1, 2)

  detected = needs_detection | 'DetectAndTrack' >> DetectAndTrack(
      detector, opts.crop_scale, opts.detect_fps, opts.shot_threshold, opts.multi_face, opts.max_gap / opts.fps,
      opts.min_duration, opts.crop_follow, written_ids)

  rendered = ((with_window, detected['tasks'])
              | 'ReadyToRender' >> beam.Flatten()
              | 'Render' >> beam.ParDo(DeadLetter(RenderClips(work_dir, opts.size, opts.fps, opts.crf,
                                                              opts.x264_preset, opts.max_render_s), 'render'))
              .with_outputs('rendered', 'rejects', main='frames'))
  faces = (rendered.frames
           | 'Landmarks' >> RunInference(KeyedModelHandler(landmarker))
           | 'ByClip' >> beam.Map(_key_frame_result))
  analysed = ({'rendered': rendered.rendered, 'faces': faces}
              | 'JoinFaces' >> beam.CoGroupByKey()
              | 'ScoreAndFilter' >> beam.ParDo(DeadLetter(ScoreAndFilter(Thresholds.from_options(opts)), 'filter'))
              .with_outputs('rejects', main='kept'))
  records = (analysed.kept
             | 'AssembleSample' >> beam.ParDo(AssembleSample())
             | 'WriteShards' >> beam.ParDo(WriteShards(
                 opts.output, opts.shard_max_samples, opts.shard_max_mb)))

  rejects = ((read['rejects'], downloaded.rejects, planned.rejects, detected['rejects'],
              rendered.rejects, analysed.rejects, read['planned'] | 'CarryRejects' >> CarryRejects(carried_rejects))
             | 'AllRejects' >> beam.Flatten())
  summary = (p
             | 'AfterWrites' >> beam.Create([None])
             | 'WriteRunSummary' >> beam.ParDo(WriteRunSummary(opts.output),
                                               beam.pvalue.AsList(read['planned']),
                                               beam.pvalue.AsList(rejects),
                                               beam.pvalue.AsList(records),
                                               pieces=beam.pvalue.AsList(detected['pieces'])))
  if progress_dir:
    progress.watch({'sources': read['sources'], 'planned': read['planned'], 'downloaded': downloaded.media,
                    'rendered': rendered.rendered, 'written': records, 'rejected': rejects}, progress_dir)
  return {'records': records, 'rejects': rejects, 'summary': summary}
