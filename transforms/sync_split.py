"""--split_at_sync_breaks: a clip whose lip sync breaks becomes its in-sync pieces instead of one reject.

Where in the graph: between the render pass and the filters. SyncNet reads a clip out as a whole (the offset,
and the median distance each window's confidence is measured against, come from all its windows, and the audio
windows run once the clip's sound is complete), so where sync breaks is known when the render pass ends, not
while it decodes. The positions come from that pass (`sync_dists`, transforms/analyzers/syncnet.py); the pieces
are cut from the clip it rendered into the work dir (transforms/lib/cut.py), so the source is not decoded twice
and no per-frame model runs again. The cost, only for clips that are split: one decode of the rendered clip
and one more H.264 encode of its kept frames.

Each kept stretch (transforms/lib/sync_breaks.py) becomes a RenderedClip `<clip>_sync<ms>` of its own: its frames
and audio, its per-frame arrays sliced, and SyncNet read out again from its own windows (offset, LSE-C, LSE-D),
so the filters judge it, and correct its offset, as a clip. What lies between kept pieces is rejected
`sync_break`, with its windows' median confidence against --min_sync_conf. A clip in sync throughout, or with no
in-sync stretch as long as --min_duration, goes on whole and the filters judge it as without the flag.
"""
from __future__ import annotations

import dataclasses
import io
import os
import shutil
import tempfile
import wave
from typing import List, Optional

import apache_beam as beam
import av
import numpy as np
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics import Metrics

from transforms.analyzers.syncnet import DISTS, FRAME_CONF, SUMMARY, sync_arrays
from transforms.core.elements import Reject, RenderedClip
from transforms.core.fileio import delete_quietly, put_file, write_atomic
from transforms.filters import reject_thumbnail_uri
from transforms.lib import avsync
from transforms.lib.cut import cut_clip
from transforms.lib.sync_breaks import SYNC_MARGIN, Stretch, plan_stretches
from transforms.render import thumbnail_jpeg

STAGE = 'filter'
REASON = 'sync_break'
_SYNC_ARRAYS = (SUMMARY, FRAME_CONF, DISTS)  # read out again per piece; every other array is per frame


def slice_wav(wav: bytes, start_s: float, end_s: float) -> bytes:
  """The 16-bit PCM wav's samples from `start_s` to `end_s`."""
  with wave.open(io.BytesIO(wav)) as handle:
    params = handle.getparams()
    first = min(params.nframes, int(round(start_s * params.framerate)))
    stop = min(params.nframes, int(round(end_s * params.framerate)))
    handle.setpos(first)
    data = handle.readframes(stop - first)
  out = io.BytesIO()
  with wave.open(out, 'wb') as handle:
    handle.setparams(params)
    handle.writeframes(data)
  return out.getvalue()


def _rebased_path(path, start_s: float, end_s: float):
  """--crop_follow's (clip time, left, top) points for a piece: those inside it and one either side (the
  window is interpolated between points), in piece time."""
  if not path:
    return ()
  times = [t for t, _, _ in path]
  first = max(0, int(np.searchsorted(times, start_s, side='right')) - 1)
  stop = min(len(path), int(np.searchsorted(times, end_s, side='left')) + 1)
  return tuple((round(t - start_s, 4), x, y) for t, x, y in path[first:stop])


def _middle_frame(path: str) -> Optional[np.ndarray]:
  with av.open(path) as container:
    stream = container.streams.video[0]
    target, last = (stream.frames or 0) // 2, None
    for index, frame in enumerate(container.decode(stream)):
      last = frame.to_ndarray(format='rgb24')
      if index >= target:
        break
  return last


class SplitAtSyncBreaks(beam.DoFn):
  """RenderedClip -> the clip as it is, or its in-sync pieces (RenderedClips) and a `sync_break` Reject (tag
  `rejects`) for each stretch around them. Rejects get their middle frame as thumbnail under `media_dir`."""

  def __init__(self, work_dir: str, min_sync_conf: float, min_duration: float, crf: int, preset: str,
               media_dir: Optional[str] = None, margin: float = SYNC_MARGIN):
    self.work_dir = work_dir
    self.threshold, self.min_duration, self.margin = min_sync_conf, min_duration, margin
    self.crf, self.preset = crf, preset
    self.media_dir = media_dir
    self.split = Metrics.counter(STAGE, 'clips_split_at_sync_breaks')
    self.pieces = Metrics.counter(STAGE, 'sync_pieces_kept')

  def process(self, clip: RenderedClip):
    # Every piece is cut before the first goes out: an error part-way rejects the clip as a whole (DeadLetter).
    yield from self._split(clip)

  def _stretches(self, clip: RenderedClip) -> List[Stretch]:
    dists = clip.arrays.get(DISTS)
    found = avsync.read_out(dists) if dists is not None and len(dists) else None
    if found is None:  # silent, no face, or no SyncNet: nothing to cut at
      return []
    return plan_stretches(found.frame_conf, clip.num_frames, clip.fps, self.threshold, self.min_duration,
                          self.margin)

  def _split(self, clip: RenderedClip) -> list:
    stretches = self._stretches(clip)
    if not stretches:
      return [clip]
    task = clip.task
    ids = [stretch.piece_id(task.clip_id, clip.fps) for stretch in stretches]
    uris = {piece_id: FileSystems.join(self.work_dir, 'clips', piece_id + '.mp4')
            for stretch, piece_id in zip(stretches, ids) if stretch.kept and piece_id not in task.done_pieces}
    middles = self._cut(clip, stretches, ids, uris)
    kept = sum(stretch.kept for stretch in stretches)
    out = []
    for stretch, piece_id, middle in zip(stretches, ids, middles):
      if piece_id in uris:
        out.append(self._piece(clip, stretch, piece_id, uris[piece_id], middle, kept))
      elif not stretch.kept:
        out.append(self._reject(clip, stretch, piece_id, middle))
    delete_quietly([clip.mp4_uri, *clip.files.values()])  # after the pieces are in place: a retry finds them
    self.split.inc()
    self.pieces.inc(len(uris))
    return out

  def _cut(self, clip: RenderedClip, stretches: List[Stretch], ids: List[str], uris: dict) -> list:
    """The pieces' mp4s in the work dir; each stretch's middle frame. A retry that finds the rendered clip gone
    (this DoFn deleted it after the pieces were in place) takes the pieces as they are."""
    if not FileSystems.exists(clip.mp4_uri):
      missing = [uri for uri in uris.values() if not FileSystems.exists(uri)]
      if missing:
        raise FileNotFoundError(f'{clip.mp4_uri} is gone and so are pieces cut from it: {missing[:3]}')
      scratch = tempfile.mkdtemp(prefix='syncsplit-')
      try:
        middles = []
        for piece_id in ids:
          if piece_id in uris:
            local = os.path.join(scratch, 'piece.mp4')
            with FileSystems.open(uris[piece_id], compression_type='uncompressed') as src, open(local, 'wb') as dst:
              shutil.copyfileobj(src, dst)
            middles.append(_middle_frame(local))
          else:
            middles.append(None)  # a reject's thumbnail was written by the attempt that cut it
        return middles
      finally:
        shutil.rmtree(scratch, ignore_errors=True)
    scratch = tempfile.mkdtemp(prefix='syncsplit-')
    try:
      source = clip.mp4_uri
      if '://' in source:
        source = os.path.join(scratch, 'clip.mp4')
        with FileSystems.open(clip.mp4_uri, compression_type='uncompressed') as src, open(source, 'wb') as dst:
          shutil.copyfileobj(src, dst)
      local = {piece_id: os.path.join(scratch, f'{n}.mp4') for n, piece_id in enumerate(ids) if piece_id in uris}
      middles = cut_clip(source, [(s.start, s.end, local.get(piece_id)) for s, piece_id in zip(stretches, ids)],
                         clip.fps, self.crf, self.preset)
      for piece_id, path in local.items():
        put_file(path, uris[piece_id], move=True)
      return middles
    finally:
      shutil.rmtree(scratch, ignore_errors=True)

  def _piece(self, clip: RenderedClip, stretch: Stretch, piece_id: str, uri: str, middle, count: int):
    task, fps = clip.task, clip.fps
    frames = stretch.end - stretch.start
    start_s, end_s = stretch.start / fps, stretch.end / fps
    path = _rebased_path(task.path, start_s, end_s)
    window = (path[0][1], path[0][2]) + tuple(task.window[2:]) if path else task.window
    piece_task = dataclasses.replace(
        task, clip_id=piece_id, planned_id=task.planned, start=task.start + start_s, end=task.start + end_s,
        window=window, path=path, cut_from=task.clip_id, cut_pieces=count, done_pieces=(),
        notes=task.notes + (f'{start_s:.2f}s-{end_s:.2f}s of {task.clip_id}, one of its {count} stretches in lip sync '
                            f'(--split_at_sync_breaks: SyncNet window confidence {stretch.conf:.2f}, median)',))
    arrays = {name: value[stretch.start:stretch.end] for name, value in clip.arrays.items()
              if name not in _SYNC_ARRAYS}
    unsliced = [name for name, value in arrays.items() if len(value) != frames]
    if unsliced:
      raise ValueError(f'arrays {unsliced} are not per frame: a piece cannot be cut from them')
    dists = clip.arrays[DISTS][stretch.first_window:stretch.stop_window]
    arrays.update(sync_arrays(dists, frames, fps, stretch.first_window, stretch.start))
    errors = int(round(clip.model_errors * frames / clip.num_frames))  # which frames failed is not kept
    return RenderedClip(task=piece_task, mp4_uri=uri, wav=slice_wav(clip.wav, start_s, end_s), num_frames=frames,
                        fps=fps, size=clip.size, arrays=arrays,
                        thumbnail=thumbnail_jpeg(middle) if middle is not None else b'', model_errors=errors)

  def _reject(self, clip: RenderedClip, stretch: Stretch, piece_id: str, middle) -> beam.pvalue.TaggedOutput:
    task, fps = clip.task, clip.fps
    start_s, end_s = stretch.start / fps, stretch.end / fps
    conf = None if np.isnan(stretch.conf) else round(stretch.conf, 3)
    short = (f'; holds {stretch.short_runs} stretch(es) in sync shorter than --min_duration {self.min_duration}s'
             if stretch.short_runs else '')
    detail = (f'{start_s:.2f}s-{end_s:.2f}s of {task.clip_id} out of lip sync: SyncNet window confidence '
              f'{"(no face)" if conf is None else conf} (median) < --min_sync_conf {self.threshold} (less '
              f'--sync_break_margin {self.margin} to leave sync, more to return){short}')
    if self.media_dir and middle is not None:
      write_atomic(reject_thumbnail_uri(self.media_dir, piece_id), thumbnail_jpeg(middle))
    return beam.pvalue.TaggedOutput('rejects', Reject(
        piece_id, STAGE, REASON, detail, task.source_id, planned_id=task.planned, value=conf,
        threshold=self.threshold, scores=(('duration', round(end_s - start_s, 3)), ('sync_window_conf', conf)),
        language=task.language))
