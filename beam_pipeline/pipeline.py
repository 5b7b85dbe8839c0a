"""The pipeline graph: one readable composition of the stage transforms."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Dict, Optional

import apache_beam as beam
from apache_beam.io.filesystems import FileSystems

from beam_pipeline import progress
from beam_pipeline.options import TalkingFaceOptions
from beam_pipeline.recipes import get_recipe
from model_handlers.mediapipe_face import FaceDetectorModelHandler, FaceLandmarkerModelHandler
from transforms.core.layout import work_dir_of
from transforms.analyzers.speech import speech_analyzers, trim_to_speech
from transforms.analyzers.syncnet import syncnet_analyzers
from transforms.deadletter import DeadLetter
from transforms.filters import ScoreAndFilter, Thresholds
from transforms.frame_analysis import FaceLandmarks
from transforms.incremental import CarryRejects, ReadCarriedRejects, RecordInputs
from transforms.lib.safety import InputPolicy
from transforms.plan import PlanClips
from transforms.render import RenderClips
from transforms.resume import (CutClipsDone, MarkDonePieces, ReusableFragments, SkipDoneClips, SkipDoneTasks,
                               SortEarlier, cut_facts_of_earlier, cut_facts_of_fragment, planned_inputs)
from transforms.sampling import shot_detection
from transforms.sources.archives import MIB
from transforms.sources.download import DownloadSource
from transforms.sources.frames import FrameFolderOptions
from transforms.sources.manifest import ReadSources
from transforms.sources.unpack import UnpackMembers
from transforms.speaker import ChooseSpeaker
from transforms.subject_window import HoldIncompleteSubjects
from transforms.sync_split import SplitAtSyncBreaks
from transforms.track import DetectAndTrack
from transforms.writers.folders import RetireUnits
from transforms.writers.shards import DropLeftover, ReadFragments, RetireSamples, WriteShards
from transforms.writers.summary import ReadPublished, WriteRunSummary


MAX_TRACKED_FACES = 4  # faces the detector and the landmarker report per frame, largest first


def build_pipeline(p: beam.Pipeline, opts: TalkingFaceOptions, progress_dir: Optional[str] = None) -> Dict:
  """manifest -> skip done -> download -> plan -> (detect, track) -> skip done pieces -> render + landmarks
  (+ the recipe's per-frame analyzers) -> score -> the recipe's writer -> run summary.

  What an earlier run settled (published samples; with --incremental, permanent rejects; a killed run's
  rendered fragments in the work dir) is read inside the pipeline and counts for a clip only with the same
  inputs (transforms/resume.py): samples of changed clips, and with --prune of clips gone from the input, are
  retired. Counting branches feed the progress line (Beam counters, and on a local
  runner the live side channel in `progress_dir`).
  """
  work_dir = work_dir_of(opts)
  recipe = get_recipe(opts.recipe)
  if opts.split_at_sync_breaks:
    check_sync_split(opts, recipe)
  detector = FaceDetectorModelHandler(model_dir=opts.model_dir, max_batch_size=opts.landmark_batch_size,
                                      max_faces=MAX_TRACKED_FACES)
  landmarker = FaceLandmarkerModelHandler(model_dir=opts.model_dir, max_batch_size=opts.landmark_batch_size,
                                          max_faces=MAX_TRACKED_FACES)
  policy = InputPolicy.from_options(opts, work_dir)
  thresholds = Thresholds.from_options(opts)

  settings = decisive_settings(opts)
  read = p | 'ReadSources' >> ReadSources(opts.input, opts.input_format, policy=policy,
                                          max_member_mb=opts.max_download_mb,
                                          frames=FrameFolderOptions.from_options(opts))
  plans = read['sources'] | 'PlannedInputs' >> beam.FlatMap(planned_inputs, settings)
  # Earlier samples whose clip changed (or, with --prune, left the input) are retired; the rest count as done.
  listed = ((plans, read['planned'] | 'Listed' >> beam.Map(lambda clip_id: (clip_id, None)))
            | 'PlannedOrListed' >> beam.Flatten())
  earlier = ((p | 'ReadPublished' >> ReadPublished(opts.output), listed)
             | 'SortEarlier' >> SortEarlier(opts.prune))
  retired = earlier['stale'] | 'RetireStale' >> RetireSamples(opts.output)
  published = earlier['current'] | 'PublishedIds' >> beam.Map(lambda written: (written[0], written[3]))
  # With --incremental, earlier permanent rejects of clips planned with the same inputs count as done.
  carried = ((plans, p | 'ReadCarriedRejects' >> ReadCarriedRejects(opts.output, opts.incremental))
             | 'CarryRejects' >> CarryRejects())
  done = [published, carried | 'CarriedIds' >> beam.Map(lambda reject: (reject.id, reject.inputs))]
  reused = leftover = None
  if recipe.output_layout(opts) == 'shards':  # what a killed run rendered and filtered waits in the work dir
    fragments = ((p | 'ReadFragments' >> ReadFragments(work_dir), listed, published)
                 | 'ReusableFragments' >> ReusableFragments(opts.prune))
    reused, leftover = fragments['reusable'], fragments['leftover']
    done.append(reused | 'ReusedIds' >> beam.Map(lambda ref: (ref.id, ref.record.get('inputs', ''))))
  cut_facts = None
  if opts.split_at_sync_breaks:  # pieces are cut after the render: their clip is done once all of them are
    cut_facts = [earlier['current'] | 'CutFactsPublished' >> beam.FlatMap(cut_facts_of_earlier)]
    if reused is not None:
      cut_facts.append(reused | 'CutFactsReused' >> beam.FlatMap(cut_facts_of_fragment))
    cut_facts = cut_facts | 'CutFacts' >> beam.Flatten()
    done.append(cut_facts | 'CutClipsDone' >> CutClipsDone())
  done = done | 'DoneIds' >> beam.Flatten()

  unpacked = (read['sources']
              | 'SkipDone' >> SkipDoneClips(done, settings)
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
      opts.crop_mode, opts.allow_silent, opts.min_duration, opts.max_duration_s, max_clip_s=opts.max_clip_s,
      **({'silent_hint': recipe.silent} if recipe.silent else {})),
      'plan')).with_outputs('rejects', main='tasks')
  # Clips of one source go to different workers from here on.
  tasks = planned.tasks | 'SpreadClips' >> beam.Reshuffle()
  # A recipe of subjects gives every task to its tracker: a subject's clips share one window, given or not.
  windows_given = not recipe.subjects
  with_window, needs_detection = tasks | 'ByCropMode' >> beam.Partition(
      lambda task, _: 0 if windows_given and task.window is not None else 1, 2)

  detected = needs_detection | 'DetectAndTrack' >> (recipe.tracker(opts, detector) or DetectAndTrack(
      detector, opts.crop_scale, opts.detect_fps, shot_detection(opts), opts.multi_face, opts.max_gap / opts.fps,
      opts.min_duration, opts.crop_follow))

  # Per-frame models run inside the render pass and their results are packed per clip there: a
  # RenderedClip carries its arrays, so nothing per frame reaches a shuffle (transforms/frame_analysis.py).
  # The recipe's per-frame models and frame writers follow the landmarker, on the same decoded frames.
  analyzers = ([FaceLandmarks(landmarker)] + syncnet_analyzers(opts) + speech_analyzers(opts)
               + recipe.analyzers(opts, landmarker))
  to_render = ((with_window, detected['tasks']) | 'ReadyToRender' >> beam.Flatten()
               | 'SkipDonePieces' >> SkipDoneTasks(done))
  if cut_facts is not None:
    to_render = to_render | 'MarkDonePieces' >> MarkDonePieces(cut_facts)
  trim, trimmed_rejects = trim_to_speech(opts), ()
  if trim is not None:  # --trim_silence: the clip from its first to its last speech, before it is rendered
    trimmed = to_render | 'TrimToSpeech' >> beam.ParDo(DeadLetter(trim, 'speech')).with_outputs('rejects', main='tasks')
    to_render, trimmed_rejects = trimmed.tasks, (trimmed.rejects,)
  rendered = (to_render
              | 'Render' >> beam.ParDo(DeadLetter(RenderClips(work_dir, opts.size, opts.fps, opts.crf,
                                                              opts.x264_preset, opts.max_render_s, analyzers,
                                                              run_id=opts.run_id),
                                                  'render'))
              .with_outputs('rejects', main='rendered'))
  media_dir = None if opts.no_report else FileSystems.join(opts.output, 'report_media')
  to_filter, cut_rejects = rendered.rendered, ()
  if opts.split_at_sync_breaks:  # a clip whose lip sync breaks goes on as its in-sync pieces
    cut = (rendered.rendered
           | 'SplitAtSyncBreaks' >> beam.ParDo(DeadLetter(SplitAtSyncBreaks(
               work_dir, opts.min_sync_conf, opts.min_duration, opts.crf, opts.x264_preset, media_dir,
               opts.sync_break_margin), 'filter'))
           .with_outputs('rejects', main='clips'))
    to_filter, cut_rejects = cut.clips, (cut.rejects,)
  analysed = (to_filter
              | 'ScoreAndFilter' >> beam.ParDo(DeadLetter(ScoreAndFilter(thresholds, media_dir), 'filter'))
              .with_outputs('rejects', main='kept'))
  before_writing = (read['rejects'], unpacked['rejects'], downloaded.rejects, planned.rejects, detected['rejects'],
                    *trimmed_rejects, rendered.rejects, *cut_rejects, analysed.rejects)
  kept = analysed.kept
  if opts.multi_face == 'speaker':  # the tracker kept every face; the one in sync with the audio stays
    spoken = kept | 'ChooseSpeaker' >> ChooseSpeaker()
    kept, before_writing = spoken['kept'], before_writing + (spoken['rejects'],)
  if recipe.subjects:  # a subject is written whole: not while one of its clips may come through in a later run
    held = ((kept, before_writing | 'RejectsBeforeWriting' >> beam.Flatten())
            | 'HoldIncompleteSubjects' >> HoldIncompleteSubjects())
    kept, before_writing = held['kept'], before_writing + (held['rejects'],)
  written = recipe.write(kept, opts, work_dir)
  records, writer_rejects = written['records'], (written['rejects'],)
  if reused is not None:
    packed = reused | 'WriteReused' >> WriteShards(opts.output, opts.shard_max_samples, opts.shard_max_mb,
                                                   opts.shard_writers)
    records = (records, packed['records']) | 'AllRecords' >> beam.Flatten()
    writer_rejects += (packed['rejects'],)
  # Once every writer is done: folder units whose clips changed and no writer made again are retired (one a
  # writer made again keeps its new version), and work-dir fragments no run will pack are deleted.
  writers_done = records | 'WritersDone' >> beam.combiners.Count.Globally()
  retired = ((retired, earlier['stale'] | 'RetireStaleUnits' >> RetireUnits(opts.output, recipe.unit_files,
                                                                             writers_done))
             | 'AllRetired' >> beam.Flatten())
  if leftover is not None:
    _ = leftover | 'DropLeftovers' >> beam.ParDo(DropLeftover(), beam.pvalue.AsSingleton(writers_done))
  recipe.after_output(retired | 'Settled' >> beam.combiners.Count.Globally(), opts)

  rejects = (before_writing + writer_rejects) | 'AllRejects' >> beam.Flatten()
  recorded = (rejects, plans) | 'RejectInputs' >> RecordInputs()  # what a later --incremental run compares
  summary = ({'planned': read['planned'], 'earlier': earlier['current'], 'records': records, 'rejects': recorded,
              'carried': carried, 'retired': retired, **({'reused': reused} if reused is not None else {})}
             | 'WriteRunSummary' >> WriteRunSummary(opts.output, dataclasses.asdict(thresholds), opts.run_id))
  if not opts.no_progress:
    progress.watch({'sources': read['sources'], 'planned': read['planned'], 'downloaded': downloaded.media,
                    'rendered': rendered.rendered, 'written': records, 'rejected': rejects}, progress_dir)
  return {'records': records, 'rejects': rejects, 'summary': summary}


def check_sync_split(opts: TalkingFaceOptions, recipe) -> None:
  """--split_at_sync_breaks needs SyncNet's windows, a recipe whose clips are cut whole (a folder recipe keeps
  per-frame files and per-clip state from the render pass that a cut would not follow), and filters that reject."""
  why = ('it needs --syncnet_weights (the breaks are where SyncNet\'s window confidence falls)'
         if not opts.syncnet_weights else
         f'the {recipe.name} recipe writes {recipe.layout}, whose per-frame files a cut would not follow; it cuts '
         'shard recipes (hdtf, megactor)' if recipe.layout != 'shards' else
         '--score_only rejects nothing, and the stretches out of sync would be rejects' if opts.score_only else
         f'--sync_break_margin {opts.sync_break_margin} is negative' if opts.sync_break_margin < 0 else '')
  if why:
    raise SystemExit(f'--split_at_sync_breaks: {why}')


# Flags that change how a run goes, not what a sample holds: a rerun with other values keeps the samples.
RUN_ONLY = frozenset({
    'input', 'input_format', 'output', 'work_dir', 'recipe', 'layout', 'run_id', 'model_dir', 'incremental', 'prune',
    'download_method', 'full_downloads', 'max_download_mb', 'download_timeout_s', 'download_retries',
    'max_concurrent_downloads', 'max_downloads_per_host', 'cookies', 'proxy', 'max_render_s', 'shard_max_samples',
    'shard_max_mb', 'shard_writers', 'stale_after_h', 'landmark_batch_size', 'max_pixels', 'probe_timeout_s',
    'allowed_schemes', 'allow_private_hosts', 'allowed_buckets', 'allowed_roots', 'max_archive_mb',
    'read_input_pickles', 'trust_weight_pickles', 'no_progress', 'no_report', 'report_samples', 'faceswap_timeout_s',
})


def decisive_settings(opts: TalkingFaceOptions) -> str:
  """A digest of every option that may change a sample (all but RUN_ONLY: a new flag counts until listed
  there), stored with each sample through its clip's inputs (transforms/resume.clip_inputs)."""
  values = {name: value for name, value in opts.get_all_options(current_only=True).items() if name not in RUN_ONLY}
  return hashlib.sha1(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:16]
