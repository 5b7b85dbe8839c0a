"""The pipeline graph: one readable composition of the stage transforms."""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_pipeline import progress
from beam_pipeline.options import TalkingFaceOptions
from beam_pipeline.recipes import get_recipe
from model_handlers.mediapipe_face import FaceDetectorModelHandler, FaceLandmarkerModelHandler
from transforms.core.layout import work_dir_of
from transforms.deadletter import DeadLetter
from transforms.filters import ScoreAndFilter, Thresholds
from transforms.frame_analysis import FaceLandmarks
from transforms.incremental import CarryRejects, ReadCarriedRejects
from transforms.lib.safety import InputPolicy
from transforms.plan import PlanClips
from transforms.render import RenderClips
from transforms.resume import SkipDoneClips, SkipDoneTasks
from transforms.sources.archives import MIB
from transforms.sources.download import DownloadSource
from transforms.sources.frames import FrameFolderOptions
from transforms.sources.manifest import ReadSources
from transforms.sources.unpack import UnpackMembers
from transforms.track import DetectAndTrack
from transforms.writers.summary import ReadPublished, WriteRunSummary


MAX_TRACKED_FACES = 4  # faces the detector and the landmarker report per frame, largest first


def build_pipeline(p: beam.Pipeline, opts: TalkingFaceOptions, progress_dir: Optional[str] = None) -> Dict:
  """manifest -> skip done -> download -> plan -> (detect, track) -> skip done pieces -> render + landmarks
  (+ the recipe's per-frame analyzers) -> score -> the recipe's writer -> run summary.

  What an earlier run settled (published samples; with --incremental, permanent rejects) is read from the
  output inside the pipeline. Counting branches feed the progress line (Beam counters, and on a local
  runner the live side channel in `progress_dir`).
  """
  work_dir = work_dir_of(opts)
  recipe = get_recipe(opts.recipe)
  detector = FaceDetectorModelHandler(model_dir=opts.model_dir, max_batch_size=opts.landmark_batch_size,
                                      max_faces=MAX_TRACKED_FACES)
  landmarker = FaceLandmarkerModelHandler(model_dir=opts.model_dir, max_batch_size=opts.landmark_batch_size,
                                          max_faces=MAX_TRACKED_FACES)
  policy = InputPolicy.from_options(opts, work_dir)
  thresholds = Thresholds.from_options(opts)

  earlier = p | 'ReadPublished' >> ReadPublished(opts.output)
  read = p | 'ReadSources' >> ReadSources(opts.input, opts.input_format, policy=policy,
                                          max_member_mb=opts.max_download_mb,
                                          frames=FrameFolderOptions.from_options(opts))
  carried = ((read['planned'], p | 'ReadCarriedRejects' >> ReadCarriedRejects(opts.output, opts.incremental))
             | 'CarryRejects' >> CarryRejects())
  done = ((earlier | 'PublishedIds' >> beam.Map(lambda written: written[0]),
           carried | 'CarriedIds' >> beam.Map(lambda reject: reject.id))
          | 'DoneIds' >> beam.Flatten())

  unpacked = (read['sources']
              | 'SkipDone' >> SkipDoneClips(done)
              | 'UnpackMembers' >> UnpackMembers(work_dir, policy, int(opts.max_download_mb * MIB),
                                                 int(opts.max_archive_mb * MIB)))
  downloaded = (unpacked['sources']
                | 'Download' >> beam.ParDo(DeadLetter(DownloadSource(
                    work_dir, max_download_mb=opts.max_download_mb, timeout_s=opts.download_timeout_s,
                    retries=opts.download_retries, download_sections=not opts.full_downloads,
                    default_height=opts.download_height, download_method=opts.download_method, policy=policy,
                    max_pixels=opts.max_pixels, probe_timeout_s=opts.probe_timeout_s,
                    max_concurrent=opts.max_concurrent_downloads, max_per_host=opts.max_downloads_per_host,
                    cookies=opts.cookies, proxy=opts.proxy), 'download')).with_outputs(
                        'rejects', main='media'))
  planned = downloaded.media | 'PlanClips' >> beam.ParDo(DeadLetter(PlanClips(
      opts.crop_mode, opts.allow_silent, opts.min_duration, opts.max_duration_s, max_clip_s=opts.max_clip_s),
      'plan')).with_outputs('rejects', main='tasks')
  # Clips of one source go to different workers from here on.
  tasks = planned.tasks | 'SpreadClips' >> beam.Reshuffle()
  with_window, needs_detection = tasks | 'ByCropMode' >> beam.Partition(
      lambda task, _: 0 if task.window is not None else 1, 2)

  detected = needs_detection | 'DetectAndTrack' >> (recipe.tracker(opts, detector) or DetectAndTrack(
      detector, opts.crop_scale, opts.detect_fps, opts.shot_threshold, opts.multi_face, opts.max_gap / opts.fps,
      opts.min_duration, opts.crop_follow))

  # Per-frame models run inside the render pass and their results are packed per clip there: a
  # RenderedClip carries its arrays, so nothing per frame reaches a shuffle (transforms/frame_analysis.py).
  # The recipe's per-frame models and frame writers follow the landmarker, on the same decoded frames.
  analyzers = [FaceLandmarks(landmarker)] + recipe.analyzers(opts, landmarker)
  rendered = ((with_window, detected['tasks'])
              | 'ReadyToRender' >> beam.Flatten()
              | 'SkipDonePieces' >> SkipDoneTasks(done)
              | 'Render' >> beam.ParDo(DeadLetter(RenderClips(work_dir, opts.size, opts.fps, opts.crf,
                                                              opts.x264_preset, opts.max_render_s, analyzers,
                                                              run_id=opts.run_id),
                                                  'render'))
              .with_outputs('rejects', main='rendered'))
  analysed = (rendered.rendered
              | 'ScoreAndFilter' >> beam.ParDo(DeadLetter(ScoreAndFilter(
                  thresholds, FileSystems.join(opts.output, 'report_media')), 'filter'))
              .with_outputs('rejects', main='kept'))
  written = recipe.write(analysed.kept, opts, work_dir)

  rejects = ((read['rejects'], unpacked['rejects'], downloaded.rejects, planned.rejects, detected['rejects'],
              rendered.rejects, analysed.rejects, written['rejects'])
             | 'AllRejects' >> beam.Flatten())
  summary = ({'planned': read['planned'], 'earlier': earlier, 'records': written['records'], 'rejects': rejects,
              'carried': carried}
             | 'WriteRunSummary' >> WriteRunSummary(opts.output, dataclasses.asdict(thresholds)))
  if not opts.no_progress:
    progress.watch({'sources': read['sources'], 'planned': read['planned'], 'downloaded': downloaded.media,
                    'rendered': rendered.rendered, 'written': written['records'], 'rejected': rejects}, progress_dir)
  return {'records': written['records'], 'rejects': rejects, 'summary': summary}
