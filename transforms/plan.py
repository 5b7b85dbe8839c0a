"""Turn a downloaded source into validated `ClipTask`s (or rejects with reasons)."""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence, Tuple

import apache_beam as beam
from apache_beam.metrics import Metrics

from transforms.core.elements import ClipSpec, ClipTask, MediaFile, Reject, Source
from transforms.lib.geometry import fit_window, scale_window

STAGE = 'plan'
END_TOLERANCE_S = 1.0  # annotations often overshoot the last frame by a little


class PlanClips(beam.DoFn):
  """(Source, [MediaFile]) -> ClipTask per planned clip (or per piece of a clip longer than `max_clip_s`);
  tag `rejects` for the ones that cannot be cut."""

  def __init__(self, crop_mode: str = 'auto', allow_silent: bool = False, min_duration: float = 1.0,
               max_duration: float = 0.0, max_clip_s: float = 0.0,
               silent_hint: str = 'use --allow_silent to keep silent clips'):
    self.crop_mode = crop_mode
    self.silent_hint = silent_hint  # what the user can do about a silent source: the recipe decides
    self.allow_silent = allow_silent
    self.min_duration = min_duration
    self.max_duration = max_duration
    self.max_clip_s = max_clip_s
    self.pieces = Metrics.counter(STAGE, 'clips_split')

  def process(self, element: Tuple[Source, Sequence[MediaFile]]):
    source, media = element
    for position, clip in enumerate(source.clips):
      file = media[position] if len(media) == len(source.clips) and len(media) > 1 else media[0]
      result = self._plan(source, clip, file)
      if isinstance(result, Reject):
        yield beam.pvalue.TaggedOutput('rejects', result)
      else:
        yield from self._pieces(result)

  def _plan(self, source: Source, clip: ClipSpec, media: MediaFile):
    info = media.info

    def reject(reason, detail):
      return Reject(clip.clip_id, STAGE, reason, detail, source.source_id)

    if not info.has_audio and not self.allow_silent:
      return reject('no_audio', f'the source has no audio stream ({self.silent_hint})')
    media_end = media.offset + info.duration
    start = clip.start if clip.start is not None else media.offset
    end = clip.end if clip.end is not None else media_end
    notes = []
    if start >= media_end - 1.0 / max(info.fps, 1.0):
      return reject('clip_past_end', f'clip starts at {start:.3f}s but the video ends at {media_end:.3f}s')
    if end > media_end:
      if end - media_end > END_TOLERANCE_S:
        return reject('clip_past_end', f'clip ends at {end:.3f}s but the video ends at {media_end:.3f}s')
      notes.append(f'end clamped from {end:.3f}s to {media_end:.3f}s')
      end = media_end
    if end - start < self.min_duration:
      return reject('too_short', f'clip is {end - start:.3f}s, shorter than --min_duration {self.min_duration}s')
    if self.max_duration and end - start > self.max_duration:
      return reject('too_long', f'clip is {end - start:.3f}s, longer than --max_duration_s {self.max_duration}s')
    window, padding, mode = None, (0, 0, 0, 0), 'detect'
    if clip.crop is not None and self.crop_mode in ('auto', 'fixed'):
      scaled = scale_window(clip.crop, source.height, info.height)
      fitted = fit_window(scaled, info.width, info.height)
      if fitted is None:
        return reject('bad_crop', f'crop window {clip.crop} lies outside the {info.width}x{info.height} frame')
      window, padding = fitted
      if window != scaled:
        notes.append(f'crop window {scaled} made square and fitted to the {info.width}x{info.height} frame: {window}'
                     + (f', padded {padding} (left, top, right, bottom)' if any(padding) else ''))
      mode = 'fixed'
    elif self.crop_mode == 'fixed':
      (window, padding), mode = fit_window((0, 0, info.width, info.height), info.width, info.height), 'full'
      notes.append('no crop window given: the full frame' + (
          f', padded {padding} (left, top, right, bottom) to square' if any(padding) else ''))
    return ClipTask(clip.clip_id, source.source_id, source.url, media, start, end, window, mode,
                    clip.crop_ratio, tuple(notes), padding=padding, origin=source.origin, inputs=clip.inputs,
                    language=source.language)

  def _pieces(self, task: ClipTask):
    """A clip longer than --max_clip_s as consecutive pieces `<clip>_s<start ms>`, so one clip's frames,
    audio and per-frame results stay bounded on a worker; every piece accounts against the planned clip.

    Pieces are of equal length; only when that length would be under --min_duration (a --max_clip_s under
    twice --min_duration) are they --max_clip_s long, and a tail too short to keep is rejected `too_short`.
    """
    duration = task.end - task.start
    if not self.max_clip_s or duration <= self.max_clip_s:
      yield task
      return
    self.pieces.inc()
    count = math.ceil(duration / self.max_clip_s)
    length = duration / count if duration / count >= self.min_duration else self.max_clip_s
    bounds = [round(task.start + k * length, 3) for k in range(count)] + [task.end]
    for number, (start, end) in enumerate(zip(bounds, bounds[1:]), 1):
      piece_id = f'{task.clip_id}_s{int(round(start * 1000))}'
      if end - start < self.min_duration:
        yield beam.pvalue.TaggedOutput('rejects', Reject(
            piece_id, STAGE, 'too_short', f'last piece {start:.3f}-{end:.3f}s of {task.clip_id} (cut at --max_clip_s '
            f'{self.max_clip_s}s) is shorter than --min_duration {self.min_duration}s', task.source_id, task.planned))
        continue
      yield dataclasses.replace(task, clip_id=piece_id, planned_id=task.planned, start=start, end=end, notes=(
          *task.notes, f'piece {number} of {count} of {task.clip_id} ({start:.3f}-{end:.3f}s, --max_clip_s '
          f'{self.max_clip_s}s)'))
