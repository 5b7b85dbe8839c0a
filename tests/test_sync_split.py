"""--split_at_sync_breaks: stretches in sync from SyncNet's per-window confidences (hysteresis, shortest break,
shortest piece), the cut of a rendered clip into pieces, and the CLI with random SyncNet weights in the published
layout, whose per-window values (not SyncNet's accuracy) decide where the generated clip is cut."""
import dataclasses
import json
import os
import pathlib

import apache_beam as beam
import av
import numpy as np
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from beam_pipeline.demo import VideoSpec, write_video
from beam_pipeline.__main__ import run
from tests.helpers import load_npy, official_syncnet_weights, read_jsonl, read_shards
from transforms.analyzers.syncnet import sync_arrays
from transforms.core.elements import ClipTask, MediaFile, RenderedClip
from transforms.lib import avsync
from transforms.lib.cut import cut_clip
from transforms.lib.probe import probe
from transforms.render import silent_wav
from transforms.resume import CutClipsDone, MarkDonePieces, cut_facts_of_earlier
from transforms.sync_split import SplitAtSyncBreaks, _rebased_path
from transforms.writers.summary import _earlier_record
from transforms.lib.sync_breaks import (MIN_BREAK_WINDOWS, SYNC_MARGIN, bridge_short_breaks, plan_stretches, runs,
                                        sync_states, window_frame)


def test_hysteresis_leaves_sync_below_the_margin_and_returns_above_it():
  threshold = 3.0
  values = [3.2, 2.8, 2.6, 2.4, 3.2, 3.4, 3.6, np.nan, 3.4, 3.6]
  # in sync from 3.2; 2.8 and 2.6 stay within the margin; 2.4 leaves; 3.2 and 3.4 are not enough to return;
  # a window without a face is out of sync
  assert sync_states(values, threshold).tolist() == [True, True, True, False, False, False, True, False, False,
                                                     True]
  assert sync_states([2.9, 3.4, 3.6], threshold).tolist() == [False, False, True]
  assert SYNC_MARGIN == 0.5


def test_a_short_dip_between_in_sync_runs_does_not_break():
  found = runs([True] * 6 + [False] * (MIN_BREAK_WINDOWS - 1) + [True] * 6 + [False] * MIN_BREAK_WINDOWS + [True] * 3)
  assert bridge_short_breaks(found, MIN_BREAK_WINDOWS) == [(0, 16, True), (16, 21, False), (21, 24, True)]
  # at the clip's ends a short run out of sync is a stretch of its own
  assert bridge_short_breaks(runs([False] * 2 + [True] * 5), MIN_BREAK_WINDOWS) == [(0, 2, False), (2, 7, True)]


@pytest.mark.parametrize('fps', [25.0, 30.0, 20.0])
def test_stretches_partition_the_clip_and_keep_long_in_sync_runs(fps):
  """Windows 0-29 in sync, 30-39 out, 40-45 in (too short to keep), 46-51 out, 52-99 in: kept pieces of at
  least --min_duration, the rest between them one rejected stretch (holding the short in-sync run)."""
  values = np.array([6.0] * 30 + [1.0] * 10 + [6.0] * 6 + [1.0] * 6 + [6.0] * 48)
  ticks = len(values) + avsync.WINDOW_FRAMES  # 25 fps frames the windows came from
  frames = int(round(ticks / avsync.FPS * fps))
  stretches = plan_stretches(values, frames, fps, threshold=3.0, min_duration=1.0)
  assert [(s.kept, s.first_window, s.stop_window, s.short_runs) for s in stretches] == [
      (True, 0, 30, 0), (False, 30, 52, 1), (True, 52, 100, 0)]
  assert stretches[0].start == 0 and stretches[-1].end == frames
  assert all(a.end == b.start for a, b in zip(stretches, stretches[1:]))
  # each frame goes with the window whose middle (25 fps frame i + 2) is nearest
  assert stretches[1].start == window_frame(30, frames, fps) == int(np.ceil(31.5 / 25 * fps))
  assert stretches[1].conf == 1.0 and stretches[0].conf == 6.0
  ids = [s.piece_id('c_0', fps) for s in stretches]  # the start in ms: window 30's middle is at 1.28 s
  assert ids[0] == 'c_0_sync0' and abs(int(ids[1][len('c_0_sync'):]) - 1260) <= 1000 / fps and len(set(ids)) == 3


def test_a_clip_in_sync_throughout_or_never_long_enough_is_not_split():
  assert plan_stretches(np.full(60, 6.0), 65, 25.0, 3.0, 1.0) == []  # one stretch
  assert plan_stretches(np.array([6.0] * 20 + [1.0] * 40), 65, 25.0, 3.0, 1.0) == []  # 0.9 s < 1 s in sync
  assert plan_stretches(np.array([np.nan] * 60), 65, 25.0, 3.0, 1.0) == []  # no face: nothing in sync
  assert plan_stretches(np.array([]), 65, 25.0, 3.0, 1.0) == []


def test_a_clip_that_loses_sync_is_cut_there_and_each_piece_is_read_out_from_its_own_windows():
  """Embeddings in sync but for windows 70-99, whose audio is unrelated: the clip's per-window confidence falls
  there, and the two pieces around it, each read out from its own rows, are in sync at offset 0 with a higher
  confidence than the clip's. The confidence is measured at the clip's offset: audio that slips to another
  offset part-way is out of sync from there on (it is not the clip's)."""
  rng = np.random.default_rng(3)
  video = rng.normal(size=(160, 32))
  audio = video.copy()
  audio[70:100] = rng.normal(size=(30, 32))
  dists = avsync.window_distances(video, audio).astype(np.float32)
  whole = avsync.read_out(dists)
  frames = 165
  stretches = plan_stretches(whole.frame_conf, frames, 25.0, threshold=whole.confidence, min_duration=1.0)
  assert [s.kept for s in stretches] == [True, False, True]
  assert abs(stretches[1].first_window - 70) <= 4 and abs(stretches[1].stop_window - 100) <= 4
  for stretch in stretches[::2]:
    arrays = sync_arrays(dists[stretch.first_window:stretch.stop_window], stretch.end - stretch.start, 25.0,
                         stretch.first_window, stretch.start)
    assert arrays['syncnet'][0] == 0 and arrays['syncnet'][1] > whole.confidence
    assert np.isfinite(arrays['sync_frame_conf']).sum() == stretch.stop_window - stretch.first_window
  slipped = np.concatenate([video[:100], np.roll(video, 6, axis=0)[100:]])
  cut = plan_stretches(avsync.read_out(avsync.window_distances(video, slipped)).frame_conf, frames, 25.0,
                       threshold=whole.confidence, min_duration=1.0)
  assert [s.kept for s in cut] == [True, False] and abs(cut[1].first_window - 100) <= 4


def _numbered_clip(path: str, frames: int, fps: float, bursts) -> None:
  """A clip whose frame k is grey level 4k and whose audio is silent but for 20 ms tones at `bursts` (s)."""
  rate = 48000
  with av.open(path, 'w') as out:
    video = out.add_stream('libx264', rate=int(fps), options={'crf': '10'})
    video.width = video.height = 64
    video.pix_fmt = 'yuv420p'
    audio = out.add_stream('aac', rate=rate)
    audio.layout = 'mono'
    for k in range(frames):
      out.mux(video.encode(av.VideoFrame.from_ndarray(np.full((64, 64, 3), 4 * k, np.uint8), format='rgb24')))
    out.mux(video.encode(None))
    t = np.arange(int(frames / fps * rate)) / rate
    sound = sum(0.5 * np.sin(2 * np.pi * 1000 * t) * (abs(t - b) < 0.01) for b in bursts).astype(np.float32)
    frame = av.AudioFrame.from_ndarray(sound[None], format='fltp', layout='mono')
    frame.sample_rate, frame.pts = rate, 0
    out.mux(audio.encode(frame))
    out.mux(audio.encode(None))


def _read(path: str):
  with av.open(path) as container:
    greys = [float(f.to_ndarray(format='gray').mean()) for f in container.decode(video=0)]
    container.seek(0)
    sound = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
    return greys, sound, container.streams.audio[0].rate


def test_cut_writes_each_range_with_its_own_frames_and_sound(tmp_path):
  fps = 25.0
  _numbered_clip(str(tmp_path / 'clip.mp4'), 60, fps, bursts=(0.5, 1.7))
  ranges = [(0, 20, str(tmp_path / 'a.mp4')), (20, 38, None), (38, 60, str(tmp_path / 'b.mp4'))]
  middles = cut_clip(str(tmp_path / 'clip.mp4'), ranges, fps, crf=10, preset='veryfast')
  assert [round(float(m.mean()) / 4) for m in middles] == [10, 29, 49]  # each range's middle frame
  assert not os.path.exists(tmp_path / 'None')
  for (start, end, path), burst in zip([ranges[0], ranges[2]], (0.5, 1.7)):
    greys, sound, rate = _read(path)
    assert len(greys) == end - start and [round(g / 4) for g in greys] == list(range(start, end))
    assert abs(len(sound) / rate - (end - start) / fps) < 0.03
    onset = np.argmax(np.abs(sound) > 0.1) / rate
    assert abs(onset - (burst - 0.01 - start / fps)) < 0.01, onset


def _rendered(tmp_path, fps: float = 25.0) -> RenderedClip:
  """A rendered clip of 60 numbered frames whose SyncNet windows are in sync (distance 1 at offset 0, 10
  elsewhere) but for windows 25-34 (10 at every offset), as the render pass leaves it in the work dir."""
  clips = tmp_path / 'work' / 'clips'
  clips.mkdir(parents=True, exist_ok=True)
  _numbered_clip(str(clips / 'c_0.mp4'), 60, fps, bursts=(0.5,))
  dists = np.full((55, 2 * avsync.VSHIFT + 1), 10.0, np.float32)
  dists[:25, avsync.VSHIFT] = dists[35:, avsync.VSHIFT] = 1.0
  arrays = {'landmarks': np.arange(60 * 3, dtype=np.float32).reshape(60, 1, 3), 'speech': np.linspace(0, 1, 60),
            **sync_arrays(dists, 60, fps)}
  media = MediaFile(str(clips / 'c_0.mp4'), probe(str(clips / 'c_0.mp4')))
  task = ClipTask('c_0', 'c', 'https://example.com/c.mp4', media, 10.0, 12.4, (0, 0, 64, 64), 'fixed',
                  inputs='in1', language='de')
  return RenderedClip(task, str(clips / 'c_0.mp4'), silent_wav(60 / fps), 60, fps, 64, arrays)


def _outputs(fn, clip):
  out = list(fn.process(clip))
  pieces = {o.task.clip_id: o for o in out if isinstance(o, RenderedClip)}
  rejects = {o.value.id: o.value for o in out if isinstance(o, beam.pvalue.TaggedOutput)}
  return pieces, rejects


def test_split_makes_pieces_with_their_own_frames_arrays_and_read_out(tmp_path):
  clip = _rendered(tmp_path)
  fn = SplitAtSyncBreaks(str(tmp_path / 'work'), 3.0, 0.4, 18, 'veryfast', str(tmp_path / 'media'))
  pieces, rejects = _outputs(fn, clip)
  assert list(pieces) == ['c_0_sync0', 'c_0_sync1480'] and list(rejects) == ['c_0_sync1080']
  reject = rejects['c_0_sync1080']
  assert (reject.reason, reject.stage, reject.planned, reject.language, reject.threshold) == (
      'sync_break', 'filter', 'c_0', 'de', 3.0) and reject.value == 0.0
  assert os.path.getsize(tmp_path / 'media' / 'rejects' / 'c_0_sync1080.jpg') > 0
  first, second = pieces.values()
  for piece, start in ((first, 0), (second, 37)):
    frames = piece.num_frames
    assert piece.task.planned == 'c_0' and piece.task.cut_from == 'c_0' and piece.task.cut_pieces == 2
    assert piece.task.start == pytest.approx(10.0 + start / 25) and piece.task.end == pytest.approx(
        10.0 + (start + frames) / 25) and piece.task.language == 'de' and piece.task.inputs == 'in1'
    np.testing.assert_array_equal(piece.arrays['landmarks'], clip.arrays['landmarks'][start:start + frames])
    assert len(piece.arrays['speech']) == len(piece.arrays['sync_frame_conf']) == frames
    assert piece.arrays['syncnet'][0] == 0 and piece.arrays['syncnet'][1] == pytest.approx(9.0)
    greys, _, _ = _read(piece.mp4_uri)
    assert [round(g / 4) for g in greys] == list(range(start, start + frames)) and piece.thumbnail
    assert len(piece.wav) == 44 + 2 * round(frames / 25 * 16000)
  assert first.num_frames + reject_frames(rejects, 25.0) + second.num_frames == 60
  assert not os.path.exists(clip.mp4_uri)  # the pieces stand for it now
  # a retried bundle (the clip already gone) gives the same pieces from the files the first attempt left
  again, _ = _outputs(fn, clip)
  assert {k: (p.mp4_uri, p.num_frames) for k, p in again.items()} == {k: (p.mp4_uri, p.num_frames)
                                                                       for k, p in pieces.items()}
  assert all(p.thumbnail for p in again.values())


def test_a_follow_path_is_rebased_to_the_piece():
  """--crop_follow's points inside the piece and one either side (the window is interpolated), in piece time."""
  path = tuple((round(0.2 * k, 4), 10 * k, 5 * k) for k in range(11))
  assert _rebased_path(path, 0.5, 1.2) == ((-0.1, 20, 10), (0.1, 30, 15), (0.3, 40, 20), (0.5, 50, 25),
                                           (0.7, 60, 30))
  assert _rebased_path((), 0.5, 1.2) == ()


def reject_frames(rejects, fps) -> int:
  return sum(round(r.scores[0][1] * fps) for r in rejects.values())  # ('duration', seconds)


def test_pieces_an_earlier_run_wrote_are_cut_but_not_given_again(tmp_path):
  clip = _rendered(tmp_path)
  clip = dataclasses.replace(clip, task=dataclasses.replace(clip.task, done_pieces=('c_0_sync0',)))
  fn = SplitAtSyncBreaks(str(tmp_path / 'work'), 3.0, 0.4, 18, 'veryfast')
  pieces, rejects = _outputs(fn, clip)
  assert list(pieces) == ['c_0_sync1480'] and list(rejects) == ['c_0_sync1080']
  assert sorted(os.listdir(tmp_path / 'work' / 'clips')) == ['c_0_sync1480.mp4']
  assert pieces['c_0_sync1480'].task.cut_pieces == 2


def test_a_clip_counts_as_done_once_all_its_pieces_are():
  records = [{'id': 'c_0_sync0', 'planned_id': 'c_0', 'inputs': 'in1', 'cut_from': 'c_0', 'cut_pieces': 2},
             {'id': 'c_0_sync1480', 'planned_id': 'c_0', 'inputs': 'in1', 'cut_from': 'c_0', 'cut_pieces': 2},
             {'id': 'd_0_f200_sync0', 'planned_id': 'd_0', 'inputs': 'in1', 'cut_from': 'd_0_f200', 'cut_pieces': 2},
             {'id': 'e_0', 'planned_id': 'e_0', 'inputs': 'in1'}]
  facts = [fact for record in records for fact in cut_facts_of_earlier(_earlier_record(record))]
  assert len(facts) == 3
  task = ClipTask('d_0_f200', 'd', 'u', None, 0.0, 1.0, inputs='in1')
  with TestPipeline() as p:
    facts = p | 'Facts' >> beam.Create(facts)
    assert_that(facts | CutClipsDone(), equal_to([('c_0', 'in1')]), label='done')
    tasks = p | 'Tasks' >> beam.Create([task, dataclasses.replace(task, clip_id='e_0'),
                                        dataclasses.replace(task, clip_id='d_0_f200', source_id='x', inputs='in2')])
    marked = tasks | MarkDonePieces(facts) | beam.Map(lambda t: (t.clip_id, t.inputs, t.done_pieces))
    assert_that(marked, equal_to([('d_0_f200', 'in1', ('d_0_f200_sync0',)), ('e_0', 'in1', ()),
                                  ('d_0_f200', 'in2', ())]), label='marked')


@pytest.mark.parametrize('flags, why', [
    ([], 'it needs --syncnet_weights'),
    (['--syncnet_weights=w.model', '--recipe=nerf'], 'the nerf recipe writes folders'),
    (['--syncnet_weights=w.model', '--score_only'], '--score_only rejects nothing'),
    (['--syncnet_weights=w.model', '--sync_break_margin=-1'], '--sync_break_margin -1.0 is negative')])
def test_the_flag_says_in_one_line_what_it_cannot_do(tmp_path, flags, why):
  from beam_pipeline.__main__ import prepare
  from beam_pipeline.pipeline import build_pipeline
  (tmp_path / 'in.jsonl').write_text(json.dumps({'id': 'a', 'url': str(tmp_path / 'a.mp4')}))
  _, opts = prepare([f'--input={tmp_path}/in.jsonl', f'--output={tmp_path}/out', '--split_at_sync_breaks', *flags])
  with pytest.raises(SystemExit) as ended:
    build_pipeline(beam.Pipeline(), opts)
  assert str(ended.value).startswith(f'--split_at_sync_breaks: {why}') and '\n' not in str(ended.value)


@pytest.fixture(scope='module')
def official_weights(tmp_path_factory):
  return pathlib.Path(official_syncnet_weights(tmp_path_factory.mktemp('syncnet')))


def _threshold_that_splits(values: np.ndarray, frames: int, fps: float, min_duration: float, margin: float) -> float:
  """A --min_sync_conf between two of the clip's window confidences that cuts it into at least two kept pieces
  (the one with the most), or NaN when none does."""
  levels = np.unique(values[np.isfinite(values)])
  best, chosen = 1, float('nan')
  for low, high in zip(levels, levels[1:]):
    threshold = float((low + high) / 2)
    kept = sum(s.kept for s in plan_stretches(values, frames, fps, threshold, min_duration, margin))
    if kept > best:
      best, chosen = kept, threshold
  return chosen


def test_cli_cuts_a_clip_at_the_sync_breaks_its_windows_show(tmp_path, official_weights):
  """With random SyncNet weights the per-window confidence of a generated clip wanders; a threshold chosen from
  the values the first run (whole, --score_only) wrote cuts it in the second run: the in-sync pieces are samples
  whose frames are the clip's own, the stretches between them `sync_break` rejects, every frame accounted
  once; the language of the row travels to each piece and reject. A third run skips the clip. (The CLI's run()
  in this process: three processes would load torch, Beam and the models three times.)"""
  write_video(str(tmp_path / 'a.mp4'), VideoSpec(duration=2.0, width=320, height=240, fps=25.0,
                                                 irregular_speech=True))
  (tmp_path / 'in.jsonl').write_text(json.dumps({'id': 'a', 'url': str(tmp_path / 'a.mp4'), 'language': 'pt_br'}))
  common = [f'--input={tmp_path}/in.jsonl', f'--syncnet_weights={official_weights}', '--size=128', '--fps=25',
            '--min_duration=0.3', '--no_progress', '--no_report', f'--work_dir={tmp_path}/work']
  run([*common, f'--output={tmp_path}/whole', '--score_only'])
  (whole,) = read_shards(str(tmp_path / 'whole'))
  assert whole['json']['language'] == 'pt-BR'
  values = load_npy(whole['sync_conf.npy'])[2:-3]  # window i's middle is frame i + 2 at 25 fps
  frames = whole['json']['num_frames']
  # random weights are confident of little: the margin is a tenth of the spread their windows show
  margin = float(np.ptp(values[np.isfinite(values)])) / 10
  threshold = _threshold_that_splits(values, frames, 25.0, 0.3, margin)
  assert np.isfinite(threshold), f'no threshold cuts these window confidences: {np.round(values, 3).tolist()}'
  stretches = plan_stretches(values, frames, 25.0, threshold, 0.3, margin)

  cut = [*common, f'--output={tmp_path}/cut', '--split_at_sync_breaks', f'--min_sync_conf={threshold!r}',
         f'--sync_break_margin={margin!r}', '--max_av_offset=15']
  run(cut)
  samples = {s['json']['id']: s for s in read_shards(str(tmp_path / 'cut'))}
  rejects = {r['id']: r for r in read_jsonl(str(tmp_path / 'cut' / 'rejects.jsonl'))}
  expected = {s.piece_id('a_0', 25.0): s for s in stretches}
  assert set(samples) | set(rejects) == set(expected) and not set(samples) & set(rejects)
  original = _frames(whole['mp4'], tmp_path / 'whole_frames.mp4')
  for piece_id, stretch in expected.items():
    if not stretch.kept:
      reject = rejects[piece_id]
      assert reject['reason'] == 'sync_break' and reject['planned_id'] == 'a_0' and reject['stage'] == 'filter'
      assert reject['language'] == 'pt-BR' and reject['threshold'] == threshold
      continue
    sample = samples[piece_id]  # its own LSE-C (>= 0) passes the threshold the random weights call for
    meta = sample['json']
    assert meta['num_frames'] == stretch.end - stretch.start and meta['planned_id'] == 'a_0'
    assert meta['cut_from'] == 'a_0' and meta['language'] == 'pt-BR'
    assert len(load_npy(sample['landmarks.npy'])) == meta['num_frames'] == len(load_npy(sample['sync_conf.npy']))
    np.testing.assert_array_equal(load_npy(sample['landmarks.npy']),
                                  load_npy(whole['landmarks.npy'])[stretch.start:stretch.end])
    mine = _frames(sample['mp4'], tmp_path / f'{piece_id}.mp4')
    assert len(mine) == meta['num_frames']
    psnr = 10 * np.log10(255 ** 2 / np.mean((mine - original[stretch.start:stretch.end]) ** 2))
    assert psnr > 35, (piece_id, psnr)  # its own frames (one more encode), not its neighbours'
  stats = json.load(open(tmp_path / 'cut' / 'stats.json'))
  assert stats['planned'] == 1 and stats['balanced'] and stats['rejected_by_reason'].get('sync_break', 0) >= 1

  run(cut)
  rerun = json.load(open(tmp_path / 'cut' / 'stats.json'))
  assert rerun['written'] == 1 and rerun.get('written_this_run', 0) == 0, rerun
  assert sorted(s['json']['id'] for s in read_shards(str(tmp_path / 'cut'))) == sorted(samples)


def _frames(mp4: bytes, path) -> np.ndarray:
  with open(path, 'wb') as handle:
    handle.write(mp4)
  with av.open(str(path)) as container:
    return np.stack([f.to_ndarray(format='rgb24').astype(np.float64) for f in container.decode(video=0)])
