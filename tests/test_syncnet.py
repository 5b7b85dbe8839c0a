"""SyncNet: the published weights' layout through the CLI, the offset read-out's sign, the audio correction.

Random weights cannot measure a real offset, so the sign is checked in two halves that chain: the read-out on
embeddings with a known shift (audio late -> negative offset), and the correction of a clip whose audio burst
sits at a known time (a positive offset delays the audio, a negative one advances it).
"""
import io
import json
import pathlib
import subprocess
import sys
import wave

import av
import numpy as np
import pytest
import torch

from beam_pipeline import __main__
from beam_pipeline.demo import VideoSpec, write_video
from model_handlers.syncnet import SyncNet, load_syncnet
from tests.helpers import REPO, load_npy, official_syncnet_weights, read_shards
from transforms.core.elements import ClipTask, MediaFile, RenderedClip
from transforms.filters import correct_offset
from transforms.lib import avsync
from transforms.lib.probe import probe


@pytest.fixture(scope='module')
def official_weights(tmp_path_factory):
  return pathlib.Path(official_syncnet_weights(tmp_path_factory.mktemp('syncnet')))


def test_state_dict_keys_are_the_published_ones(official_weights):
  state = torch.load(str(official_weights), weights_only=True)
  assert len(state) == 102 and tuple(state['netcnnlip.0.weight'].shape) == (96, 3, 5, 7, 7)
  assert tuple(state['netcnnaud.18.weight'].shape) == (512, 256, 5, 4) and 'netfclip.3.bias' in state
  scripted = official_weights.parent / 'syncnet.ts'
  torch.jit.script(SyncNet()).save(str(scripted))
  lips = torch.rand(2, 3, 5, 224, 224) * 255
  assert tuple(load_syncnet(str(scripted)).forward_lip(lips).shape) == (2, 1024)


@pytest.mark.parametrize('late', [4, -3])
def test_read_out_sign_on_embeddings_with_a_known_shift(late):
  """Audio embedding i + late matches video embedding i (the sound `late` frames after the mouth): SyncNet's
  offset is -late, its distance there near 0 and its confidence about the median distance."""
  rng = np.random.default_rng(1)
  video = rng.normal(size=(60, 16))
  audio = np.roll(video, late, axis=0)
  found = avsync.sync_offset(video, audio)
  assert found.offset == -late and found.min_dist < 0.5 and found.confidence > 3  # (ends: zero padding)
  assert found.frame_conf.shape == (60,) and np.nanmin(found.frame_conf[10:50]) > 3


def test_mfcc_is_the_one_syncnet_was_trained_on():
  """SyncNet's audio input: python_speech_features.mfcc with its defaults on int16 samples at 16 kHz."""
  import python_speech_features
  samples = np.random.default_rng(0).normal(0, 3000, 16000).astype(np.int16)
  np.testing.assert_allclose(avsync.mfcc(samples), python_speech_features.mfcc(samples, 16000), atol=1e-4)
  assert avsync.audio_windows(samples, 20).shape == (20, 13, 20)


def _burst_clip(path, burst_s: float, duration: float = 1.6) -> None:
  """A 25 fps clip whose audio is silent but for a 50 ms tone at `burst_s`."""
  rate = 16000
  with av.open(str(path), 'w') as out:
    video = out.add_stream('libx264', rate=25)
    video.width = video.height = 64
    video.pix_fmt = 'yuv420p'
    audio = out.add_stream('aac', rate=rate)
    audio.layout = 'mono'
    for i in range(int(duration * 25)):
      out.mux(video.encode(av.VideoFrame.from_ndarray(np.full((64, 64, 3), i * 5 % 255, np.uint8), format='rgb24')))
    out.mux(video.encode(None))
    t = np.arange(int(duration * rate)) / rate
    sound = (0.5 * np.sin(2 * np.pi * 1000 * t) * (abs(t - burst_s) < 0.025)).astype(np.float32)[None]
    frame = av.AudioFrame.from_ndarray(sound, format='fltp', layout='mono')
    frame.sample_rate, frame.pts = rate, 0
    out.mux(audio.encode(frame))
    out.mux(audio.encode(None))


def _onset(samples: np.ndarray, rate: int) -> float:
  return float(np.argmax(np.abs(samples) > 0.1) / rate)


def _mp4_onset(path: str) -> float:
  with av.open(path) as container:
    stream = container.streams.audio[0]
    sound = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(stream)])
    return _onset(sound, stream.rate)


def _wav_onset(wav: bytes) -> float:
  with wave.open(io.BytesIO(wav)) as handle:
    data = np.frombuffer(handle.readframes(handle.getnframes()), '<i2') / 32768.0
    return _onset(data, handle.getframerate())


@pytest.mark.parametrize('offset', [3, -5])
def test_correction_moves_the_audio_by_the_offset_both_ways(tmp_path, offset):
  """A positive offset (the sound came first) delays the audio of the mp4 and the wav by offset / 25 s; a
  negative one advances it. The json's scores record the shift; a retry does not shift twice."""
  src = tmp_path / 'clip.mp4'
  _burst_clip(src, burst_s=0.8)
  with av.open(str(src)) as container:
    wav_data = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
  wav = io.BytesIO()
  with wave.open(wav, 'wb') as handle:
    handle.setnchannels(1)
    handle.setsampwidth(2)
    handle.setframerate(16000)
    handle.writeframes((wav_data[:25600] * 32767).astype('<i2').tobytes())
  task = ClipTask('c_0', 'c', str(src), MediaFile(str(src), probe(str(src))), 0.0, 1.6, None, 'auto')
  clip = RenderedClip(task, str(src), wav.getvalue(), 40, 25.0, 64)
  before = _mp4_onset(str(src)), _wav_onset(clip.wav)
  scores = {'av_offset_frames': offset}
  fixed = correct_offset(clip, scores)
  assert scores['audio_shift_s'] == offset / 25
  assert abs(_mp4_onset(fixed.mp4_uri) - before[0] - offset / 25) < 0.01
  assert abs(_wav_onset(fixed.wav) - before[1] - offset / 25) < 0.005
  assert not src.exists() and correct_offset(clip, dict(scores)).mp4_uri == fixed.mp4_uri
  assert abs(_mp4_onset(fixed.mp4_uri) - before[0] - offset / 25) < 0.01  # the retry left it as it was


def test_cli_scores_every_clip_with_syncnet(tmp_path, official_weights):
  """The published layout loads and runs in the render pass: every score and the per-window confidence are
  written; random weights are not confident of anything, so the clip fails sync_conf_low (kept: --score_only)."""
  write_video(str(tmp_path / 'a.mp4'), VideoSpec(duration=1.6, width=320, height=240, fps=25.0,
                                                 irregular_speech=True))
  (tmp_path / 'in.jsonl').write_text(json.dumps({'id': 'a', 'url': str(tmp_path / 'a.mp4')}) + '\n')
  result = subprocess.run([sys.executable, '-m', 'beam_pipeline', f'--input={tmp_path}/in.jsonl',
                           f'--output={tmp_path}/out', f'--syncnet_weights={official_weights}', '--size=128',
                           '--fps=25', '--score_only', '--no_progress', '--no_report'], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  (sample,) = read_shards(str(tmp_path / 'out'))
  scores = sample['json']['scores']
  # 40 frames at 25 fps: 35 windows scored; random weights give some offset within the +-15 searched
  assert scores['sync_windows'] == 35 and abs(scores['av_offset_frames']) <= 15
  assert 0 <= scores['lse_c'] < 3 and scores['lse_d'] > 0 and 'sync_conf_low' in sample['json']['failed']
  conf = load_npy(sample['sync_conf.npy'])
  assert conf.shape == (40,) and np.isfinite(conf).sum() == 35


def test_a_wrong_state_dict_is_one_line_naming_the_flag(tmp_path, monkeypatch):
  """A state dict with a key missing fails when the graph is built, before any work: one line, the flag named."""
  wrong = SyncNet().state_dict()
  wrong.pop('netfclip.3.bias')
  torch.save(wrong, str(tmp_path / 'wrong.model'))
  (tmp_path / 'in.jsonl').write_text(json.dumps({'id': 'a', 'url': str(tmp_path / 'a.mp4')}) + '\n')
  monkeypatch.setattr(sys, 'argv', ['beam_pipeline', f'--input={tmp_path}/in.jsonl', f'--output={tmp_path}/out',
                                    f'--syncnet_weights={tmp_path}/wrong.model', '--no_progress'])
  with pytest.raises(SystemExit) as ended:
    __main__.main()
  message = str(ended.value)
  assert message.startswith(f'error: --syncnet_weights ({tmp_path}/wrong.model): ') and '\n' not in message
  assert 'netfclip.3.bias' in message


def test_multi_face_speaker_keeps_the_smaller_face_that_speaks(tmp_path):
  """Two faces on screen, the larger one silent (mouth shut), the smaller one speaking: --multi_face=speaker
  keeps the smaller face and rejects the larger one as not_speaking. Without SyncNet weights the offline
  correlation ranks them (it holds on these generated mouths; random SyncNet weights could not rank them)."""
  write_video(str(tmp_path / 'two.mp4'), VideoSpec(duration=2.0, width=480, height=270, fps=25.0, motion_px=10,
                                                   irregular_speech=True, second_face_scale=0.7,
                                                   second_face_speaks=True))
  (tmp_path / 'in.jsonl').write_text(json.dumps({'id': 'two', 'url': str(tmp_path / 'two.mp4')}) + '\n')
  result = subprocess.run([sys.executable, '-m', 'beam_pipeline', f'--input={tmp_path}/in.jsonl',
                           f'--output={tmp_path}/out', '--multi_face=speaker', '--size=128', '--fps=25',
                           '--no_progress', '--no_report'], cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-2000:]
  (sample,) = read_shards(str(tmp_path / 'out'))
  (reject,) = [json.loads(line) for line in open(tmp_path / 'out' / 'rejects.jsonl')]
  kept_x = sample['json']['crop']['window'][0]
  assert kept_x > 240 and reject['reason'] == 'not_speaking'  # the small face sits in the right third
  assert sample['json']['scores']['sync_corr'] > reject['value']
