"""Turn a downloaded source into validated `ClipTask`s (or rejects with reasons)."""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import apache_beam as beam

from beam_pipeline.elements import ClipSpec, ClipTask, MediaFile, Reject, Source, Window

STAGE = 'plan'
END_TOLERANCE_S = 1.0  # annotations often overshoot the last frame by a little


def scale_window(window: Window, reference_height: Optional[int], actual_height: int) -> Window:
  """A fixed window given at the reference resolution, in pixels of the file we got."""
  if not reference_height or reference_height == actual_height:
    return window
  s = actual_height / reference_height
  x, y, w, h = window
  return int(round(x * s)), int(round(y * s)), int(round(w * s)), int(round(h * s))


def clamp_window(window: Window, width: int, height: int) -> Optional[Window]:
  """Intersect with the frame, with even sizes for the encoder; None if nothing is left."""
  x, y, w, h = window
  x0, y0 = max(0, x), max(0, y)
  x1, y1 = min(width, x + w), min(height, y + h)
  w2, h2 = (x1 - x0) // 2 * 2, (y1 - y0) // 2 * 2
  if w2 < 2 or h2 < 2:
    return None
  return x0, y0, w2, h2


class PlanClips(beam.DoFn):
  """(Source, [MediaFile]) -> ClipTask per planned clip; tag `rejects` for the ones that cannot be cut."""

  def __init__(self, crop_mode: str = 'auto', allow_silent: bool = False, min_duration: float = 1.0,
               max_duration: float = 0.0):
    self.crop_mode = crop_mode
    self.allow_silent = allow_silent
    self.min_duration = min_duration
    self.max_duration = max_duration

  def process(self, element: Tuple[Source, Sequence[MediaFile]]):
    source, media = element
    for position, clip in enumerate(source.clips):
      file = media[position] if len(media) == len(source.clips) and len(media) > 1 else media[0]
      result = self._plan(source, clip, file)
      if isinstance(result, Reject):
        yield beam.pvalue.TaggedOutput('rejects', result)
      else:
        yield result

  def _plan(self, source: Source, clip: ClipSpec, media: MediaFile):
    info = media.info

    def reject(reason, detail):
      return Reject(clip.clip_id, STAGE, reason, detail, source.source_id)

    if not info.has_audio and not self.allow_silent:
      return reject('no_audio', 'the source has no audio stream (use --allow_silent to keep silent clips)')
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
    window, mode = None, 'detect'
    if clip.crop is not None and self.crop_mode in ('auto', 'fixed'):
      scaled = scale_window(clip.crop, source.height, info.height)
      window = clamp_window(scaled, info.width, info.height)
      if window is None:
        return reject('bad_crop', f'crop window {clip.crop} lies outside the {info.width}x{info.height} frame')
      if window != scaled:
        notes.append(f'crop window {scaled} clamped to {window}')
      mode = 'fixed'
    elif self.crop_mode == 'fixed':
      window, mode = (0, 0, info.width // 2 * 2, info.height // 2 * 2), 'full'
      notes.append('no crop window given: full frame')
    return ClipTask(clip.clip_id, source.source_id, source.url, media, start, end, window, mode,
                    clip.crop_ratio, tuple(notes))
