"""Per-clip quality scores from the per-frame analysis, and the filters that reject on them.

Every score is written into the sample's json (`scores`), whether or not it filters; `failed` lists
the reason codes a clip fails. A clip is rejected with the first failing code (the detail names all),
unless `--score_only` is set: then every clip with a face is written and nothing is filtered.
"""
from __future__ import annotations

import collections
import dataclasses
import heapq
import os
import tempfile
from typing import List, Optional, Tuple

import apache_beam as beam
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics
from scipy import ndimage

from transforms.core.elements import Reject, RenderedClip
from transforms.core.fileio import delete_quietly, put_file, read_bytes, write_atomic
from transforms.lib import avsync, features
from transforms.lib.features import speech_ratio
from transforms.lib.preview import preview_mp4
from transforms.writers.shards import sample_key

STAGE = 'filter'
REJECT_THUMBNAILS = 'rejects'  # under the media dir ScoreAndFilter is given: <output>/report_media
REJECT_CLIPS = 3  # per reason and worker: previews of the rejects nearest the threshold (see NearestRejects)
REJECT_CLIP_PX, REJECT_CLIP_S = 160, 3.0


@dataclasses.dataclass(frozen=True)
class Thresholds:
  """Filter settings; the defaults are the command line's (see beam_pipeline/options.py)."""
  min_face_px: float = 64.0
  min_face_ratio: float = 0.8
  min_resolution: int = 0
  min_duration: float = 1.0
  min_sharpness: float = 25.0
  max_yaw: float = 45.0
  max_pitch: float = 30.0
  eye_motion: bool = False
  min_eye_motion_var: float = 2.0
  min_speech_ratio: float = 0.5
  min_face_score: float = 0.0
  min_sync_corr: float = 0.0
  max_sync_lag: int = 0
  sync_search: int = 15
  min_sync_conf: float = 3.0
  max_av_offset: int = 6
  score_only: bool = False

  @classmethod
  def from_options(cls, opts) -> 'Thresholds':
    return cls(**{f.name: getattr(opts, f.name) for f in dataclasses.fields(cls)})


@dataclasses.dataclass
class Analysis:
  """A rendered clip with its per-frame arrays, face statistics, scores and failed filters."""
  clip: RenderedClip
  arrays: dict
  face: dict
  scores: dict
  failed: List[Tuple[str, str, Optional[float], Optional[float]]]  # failures(): code, detail, value, threshold


def _robust_max_abs(values: np.ndarray) -> Optional[float]:
  """Largest |value| after a 5-frame median filter, so one mis-fitted frame does not decide."""
  values = values[~np.isnan(values)]
  if not len(values):
    return None
  return float(np.max(np.abs(ndimage.median_filter(values, size=min(5, len(values)), mode='nearest'))))


def _round(value, digits: int = 3):
  return None if value is None else round(float(value), digits)


def score_clip(clip: RenderedClip, arrays: dict, face: dict, th: Thresholds) -> dict:
  """Every score of a clip (None where it cannot be measured: no face, silence)."""
  info = clip.task.media.info
  present = ~np.isnan(arrays['bbox'][:, 0])
  sharpness = arrays['sharpness'][present]
  sharpness = sharpness[~np.isnan(sharpness)]
  mouth = features.mouth_opening(arrays['landmarks'])
  corr, lag = features.best_lag(mouth, features.audio_envelope(clip.wav, clip.num_frames, clip.fps), th.sync_search)
  return {
      'source_face_px': face.get('source_face_size'),
      'face_ratio': _round(face['face_ratio']),
      'source_resolution': min(info.width, info.height),
      'duration': _round(clip.num_frames / clip.fps),
      'sharpness': _round(np.median(sharpness) if len(sharpness) else None, 2),
      'max_abs_yaw': _round(_robust_max_abs(arrays['pose'][:, 0]), 2),
      'max_abs_pitch': _round(_robust_max_abs(arrays['pose'][:, 1]), 2),
      'eye_motion_var': _round(features.eye_motion_variance(arrays['landmarks'], arrays['blendshapes'],
                                                            arrays.get('l2cs_gaze'))),
      'sync_corr': _round(corr),
      'sync_lag_frames': lag if corr is not None else None,
      **syncnet_scores(arrays),
      **({'speech_ratio': _round(speech_ratio(arrays['speech']))} if 'speech' in arrays else {}),
      'face_score': dict(clip.task.face_stats).get('face_score'),
  }


def syncnet_scores(arrays: dict) -> dict:
  """SyncNet's read-out (transforms/analyzers/syncnet.py) when it ran: offset in 25 fps frames (positive: the
  sound comes first), LSE-C (confidence), LSE-D (distance at the best offset), windows scored, and the lowest
  per-window confidence (where a long clip loses sync). None where it could not judge (silence, no face)."""
  if 'syncnet' not in arrays:
    return {}
  offset, conf, dist, windows = (float(v) for v in arrays['syncnet'])
  frame_conf = arrays['sync_frame_conf']
  frame_conf = frame_conf[~np.isnan(frame_conf)]
  measured = not np.isnan(conf)
  return {'av_offset_frames': int(offset) if measured else None, 'lse_c': _round(conf if measured else None),
          'lse_d': _round(dist if measured else None), 'sync_windows': int(windows) if measured else 0,
          'min_window_conf': _round(frame_conf.min() if len(frame_conf) else None)}


def failures(scores: dict, th: Thresholds) -> List[Tuple[str, str, Optional[float], Optional[float]]]:
  """(reason code, detail, measured value, threshold) for each filter the scores fail, in a fixed order.

  The value is what the threshold is compared with (report.html sets one against the other).
  """
  s = scores
  lag = abs(s['sync_lag_frames']) if s['sync_lag_frames'] is not None else None
  syncnet = 'lse_c' in s
  offset = abs(s['av_offset_frames']) if s.get('av_offset_frames') is not None else None
  checks = [
      ('face_ratio_low', s['face_ratio'] < th.min_face_ratio, s['face_ratio'], th.min_face_ratio,
       f'face on {s["face_ratio"]:.0%} of frames < --min_face_ratio {th.min_face_ratio}'),
      ('face_too_small', s['source_face_px'] is not None and s['source_face_px'] < th.min_face_px,
       s['source_face_px'], th.min_face_px, f'face {s["source_face_px"]} source px < --min_face_px {th.min_face_px}'),
      ('low_resolution', s['source_resolution'] < th.min_resolution, s['source_resolution'], th.min_resolution,
       f'source short side {s["source_resolution"]} px < --min_resolution {th.min_resolution}'),
      ('too_short', s['duration'] < th.min_duration, s['duration'], th.min_duration,
       f'{s["duration"]}s < --min_duration {th.min_duration}s'),
      ('blurry', s['sharpness'] is not None and s['sharpness'] < th.min_sharpness, s['sharpness'], th.min_sharpness,
       f'face sharpness {s["sharpness"]} < --min_sharpness {th.min_sharpness}'),
      ('yaw_too_large', s['max_abs_yaw'] is not None and s['max_abs_yaw'] > th.max_yaw, s['max_abs_yaw'], th.max_yaw,
       f'|yaw| up to {s["max_abs_yaw"]} deg > --max_yaw {th.max_yaw}'),
      ('pitch_too_large', s['max_abs_pitch'] is not None and s['max_abs_pitch'] > th.max_pitch, s['max_abs_pitch'],
       th.max_pitch, f'|pitch| up to {s["max_abs_pitch"]} deg > --max_pitch {th.max_pitch}'),
      ('eye_motion_low', th.eye_motion and (s['eye_motion_var'] or 0.0) <= th.min_eye_motion_var,
       s['eye_motion_var'], th.min_eye_motion_var,
       f'eye motion variance {s["eye_motion_var"]} <= --min_eye_motion_var {th.min_eye_motion_var}'),
      ('no_speech', s.get('speech_ratio') is not None and s['speech_ratio'] < th.min_speech_ratio,
       s.get('speech_ratio'), th.min_speech_ratio,
       f'speech on {s.get("speech_ratio")} of the frames < --min_speech_ratio {th.min_speech_ratio} (Silero VAD)'),
      ('face_score_low', s.get('face_score') is not None and s['face_score'] < th.min_face_score, s.get('face_score'),
       th.min_face_score, f'face detector confidence {s.get("face_score")} < --min_face_score {th.min_face_score}'),
      ('sync_conf_low', syncnet and s['lse_c'] is not None and s['lse_c'] < th.min_sync_conf, s.get('lse_c'),
       th.min_sync_conf, f'SyncNet confidence {s.get("lse_c")} < --min_sync_conf {th.min_sync_conf}'),
      ('av_offset_large', syncnet and offset is not None and offset > th.max_av_offset, offset, th.max_av_offset,
       f'SyncNet AV offset {s.get("av_offset_frames")} frames (25 fps), beyond --max_av_offset {th.max_av_offset}'),
      ('av_sync_low', not syncnet and s['sync_corr'] is not None and s['sync_corr'] < th.min_sync_corr,
       s['sync_corr'], th.min_sync_corr,
       f'mouth/audio correlation {s["sync_corr"]} < --min_sync_corr {th.min_sync_corr}'),
      ('av_sync_offset', not syncnet and th.max_sync_lag > 0 and lag is not None and lag > th.max_sync_lag, lag,
       th.max_sync_lag,
       f'audio lags the mouth by {s["sync_lag_frames"]} frames, more than --max_sync_lag {th.max_sync_lag}'),
  ]
  return [(code, detail, None if value is None else float(value), float(threshold))
          for code, failed, value, threshold, detail in checks if failed]


def correct_offset(clip: RenderedClip, scores: dict) -> RenderedClip:
  """The clip with its audio moved by SyncNet's offset (mp4 and wav), recorded in `scores` as
  `audio_shift_s` (positive: the audio now plays later). Only offsets SyncNet is confident of reach here.

  The shifted mp4 gets its own name in the work dir and the unshifted one goes after it is in place, so a
  retried bundle finds the shifted file and never shifts twice."""
  offset = scores.get('av_offset_frames')
  if not offset:
    return clip
  seconds = offset / avsync.FPS
  scores['audio_shift_s'] = round(seconds, 4)
  shifted_uri = clip.mp4_uri[:-len('.mp4')] + '_av.mp4'
  if not FileSystems.exists(shifted_uri):
    with tempfile.TemporaryDirectory(prefix='avshift-') as tmp:
      src, dst = os.path.join(tmp, 'in.mp4'), os.path.join(tmp, 'out.mp4')
      with open(src, 'wb') as handle:
        handle.write(read_bytes(clip.mp4_uri))
      avsync.shift_mp4_audio(src, dst, seconds)
      put_file(dst, shifted_uri, move=True)
  delete_quietly([clip.mp4_uri])
  return dataclasses.replace(clip, mp4_uri=shifted_uri, wav=avsync.shift_wav(clip.wav, seconds))


def reject_thumbnail_uri(media_dir: str, clip_id: str, extension: str = '.jpg') -> str:
  """Where a rejected clip's thumbnail (or `.mp4` preview) goes (report.html shows it): named by its (file-safe,
  bounded) sample key."""
  return FileSystems.join(media_dir, REJECT_THUMBNAILS, sample_key(clip_id) + extension)


class NearestRejects:
  """Per reason, the `k` rejects nearest their threshold this worker has seen, with a short preview each
  (the first REJECT_CLIP_S seconds, REJECT_CLIP_PX wide, landmarks drawn, with the audio) beside the
  thumbnail, so report.html can play the ones a threshold change would keep. The run's nearest `k` are
  among every worker's nearest `k`, so they all have one, while the files stay bounded (`k` per reason and
  worker): a reject pushed out by a nearer one loses its preview."""

  def __init__(self, media_dir: str, k: int = REJECT_CLIPS):
    self.media_dir, self.k = media_dir, k
    self.held = collections.defaultdict(list)  # reason -> heap of (-distance, clip id)

  def offer(self, clip: RenderedClip, reason: str, value: Optional[float], threshold: Optional[float]) -> None:
    if value is None or threshold is None or not self.k:
      return
    entry, held = (-abs(value - threshold), clip.task.clip_id), self.held[reason]
    if (len(held) >= self.k and entry <= held[0]) or not FileSystems.exists(clip.mp4_uri):  # gone: a retry
      return
    landmarks = clip.arrays.get('lmk68')
    data = preview_mp4(read_bytes(clip.mp4_uri), clip.wav, REJECT_CLIP_PX, REJECT_CLIP_S,
                       None if landmarks is None else landmarks[..., :2], crf=32)
    if data is None:
      return
    write_atomic(reject_thumbnail_uri(self.media_dir, clip.task.clip_id, '.mp4'), data)
    if len(held) >= self.k:
      _, dropped = heapq.heapreplace(held, entry)
      delete_quietly([reject_thumbnail_uri(self.media_dir, dropped, '.mp4')])
    else:
      heapq.heappush(held, entry)


class ScoreAndFilter(beam.DoFn):
  """RenderedClip (its per-frame arrays packed by the render pass) -> Analysis, or a `Reject` on tag
  `rejects` (the rendered mp4 is removed from the work dir then)."""

  def __init__(self, thresholds: Thresholds, media_dir: Optional[str] = None):
    self.th = thresholds
    self.media_dir = media_dir  # <output>/report_media: rejected clips' thumbnails go there; None: nowhere
    self.kept = Metrics.counter(STAGE, 'clips_kept')
    self.rejected = Metrics.counter(STAGE, 'clips_rejected')
    self.nearest: Optional[NearestRejects] = None

  def setup(self):
    self.nearest = NearestRejects(self.media_dir) if self.media_dir else None

  def process(self, clip: RenderedClip):
    yield self._filter(clip)

  def _filter(self, clip: RenderedClip):
    arrays = clip.arrays
    face = features.face_statistics(arrays, clip)
    if face['face_frames'] == 0:
      return self._reject(clip, 'no_face', f'no face on any of {clip.num_frames} output frames')
    scores = score_clip(clip, arrays, face, self.th)
    failed = failures(scores, self.th)
    if failed and not self.th.score_only:
      code, _, value, threshold = failed[0]
      return self._reject(clip, code, '; '.join(detail for _, detail, _, _ in failed), value, threshold, scores)
    if not {code for code, *_ in failed} & {'sync_conf_low', 'av_offset_large'}:
      clip = correct_offset(clip, scores)
    self.kept.inc()
    return Analysis(clip, arrays, face, scores, failed)

  def _reject(self, clip: RenderedClip, reason: str, detail: str, value: Optional[float] = None,
              threshold: Optional[float] = None, scores: Optional[dict] = None):
    """The reject, with the measurement it failed on and all its scores. Its thumbnail (and, near the
    threshold, a preview) goes where report.html finds it, named from the clip id (a retried bundle overwrites
    it); the rendered mp4 and the clip's frame archives go (a retry finds them gone, and nothing here reads
    them)."""
    self.rejected.inc()
    if self.media_dir and clip.thumbnail:
      write_atomic(reject_thumbnail_uri(self.media_dir, clip.task.clip_id), clip.thumbnail)
    if self.nearest is not None:
      self.nearest.offer(clip, reason, value, threshold)
    delete_quietly([clip.mp4_uri, *clip.files.values()])
    kept_scores = tuple((name, score) for name, score in sorted((scores or {}).items())
                        if score is None or isinstance(score, (bool, int, float, str)))
    return beam.pvalue.TaggedOutput('rejects', Reject(
        clip.task.clip_id, STAGE, reason, detail, clip.task.source_id, planned_id=clip.task.planned_id, value=value,
        threshold=threshold, scores=kept_scores, language=clip.task.language))
