"""Speech presence (--vad, --trim_silence): Silero VAD from its wheel on real speech, silence and a buzz."""
import json
import os
from fractions import Fraction

import av
import numpy as np
import pytest

from beam_pipeline.demo import VideoSpec, write_video
from model_handlers.silero_vad import RATE, SileroVadModelHandler, load_vad, speech_probabilities
from tests.helpers import REPO, read_jsonl, read_shards, run_cli
from transforms.analyzers.speech import SpeechActivity, speech_bounds
from transforms.lib.features import speech_ratio

REAL = os.path.join(os.path.dirname(REPO), 'shared', 'real_clips', 'talk_glasses_512.mp4')  # 3.2 s of speech
pytestmark = pytest.mark.skipif(not os.path.exists(REAL), reason='needs ../shared/real_clips (PROVENANCE.md)')


def _speech() -> np.ndarray:
  """The real clip's voice, 16 kHz mono float."""
  with av.open(REAL) as container:
    resampler = av.AudioResampler(format='flt', layout='mono', rate=RATE)
    chunks = [pcm.to_ndarray().reshape(-1) for frame in container.decode(audio=0)
              for pcm in resampler.resample(frame)]
  return np.concatenate(chunks)


def _wav(samples: np.ndarray) -> bytes:
  import io
  import wave
  out = io.BytesIO()
  with wave.open(out, 'wb') as handle:
    handle.setnchannels(1)
    handle.setsampwidth(2)
    handle.setframerate(RATE)
    handle.writeframes((np.clip(samples, -1, 1) * 32767).astype('<i2').tobytes())
  return out.getvalue()


def _with_audio(video: str, samples: np.ndarray, path: str) -> str:
  """`video`'s picture with `samples` (16 kHz mono) as its AAC track."""
  with av.open(video) as source, av.open(path, 'w') as out:
    vin = source.streams.video[0]
    vout = out.add_stream_from_template(vin)
    aout = out.add_stream('aac', rate=RATE)
    aout.layout = 'mono'
    for packet in source.demux(vin):
      if packet.dts is not None:
        packet.stream = vout
        out.mux(packet)
    for first in range(0, len(samples), 1024):
      frame = av.AudioFrame.from_ndarray(samples[None, first:first + 1024].astype(np.float32), format='fltp',
                                         layout='mono')
      frame.sample_rate, frame.pts, frame.time_base = RATE, first, Fraction(1, RATE)
      out.mux(aout.encode(frame))
    out.mux(aout.encode(None))
  return path


def test_vad_hears_real_speech_not_silence_or_a_buzz():
  model = load_vad()
  speech = _speech()
  t = np.arange(3 * RATE) / RATE
  chord = 0.1 * sum(np.sin(2 * np.pi * f * t) for f in (220, 277, 330, 440)).astype(np.float32)
  analyzer = SpeechActivity(SileroVadModelHandler(), fps=25.0)
  analyzer.setup()
  ratios = {}
  for name, samples in (('speech', speech), ('silence', np.zeros(3 * RATE, np.float32)), ('chord', chord)):
    clip = analyzer.start(None, 75, 64)
    clip.hear(_wav(samples))
    ratios[name] = speech_ratio(clip.finish(int(len(samples) / RATE * 25)).arrays['speech'])
  assert ratios['speech'] > 0.8 and ratios['silence'] == 0.0 and ratios['chord'] < 0.1, ratios
  silence = np.zeros(RATE, np.float32)
  start, end = speech_bounds(speech_probabilities(model, np.concatenate([silence, speech, silence])), 5.2)
  assert 0.7 < start < 1.1 and 4.0 < end < 4.5, (start, end)  # 0.2 s kept around the speech


@pytest.fixture(scope='module')
def vad_run(tmp_path_factory):
  """A generated face over 1 s of silence, 3.2 s of real speech and 1 s of silence; the same face over 2 s of
  silence (its picture goes on: the track is as long as the video). Run with --vad --trim_silence."""
  root = tmp_path_factory.mktemp('vad')
  media = root / 'media'
  media.mkdir()
  silent = write_video(str(root / 'picture.mp4'), VideoSpec(duration=5.2, fps=25.0, width=320, height=240,
                                                            audio=False, motion_px=5))
  gap = np.zeros(RATE, np.float32)
  _with_audio(silent, np.concatenate([gap, _speech()[:int(3.2 * RATE)], gap]), str(media / 'padded.mp4'))
  _with_audio(silent, np.zeros(2 * RATE, np.float32), str(media / 'quiet.mp4'))
  output = root / 'out'
  run_cli(f'--input={media}/*.mp4', f'--output={output}', f'--work_dir={root / "work"}', '--size=128',
          '--vad', '--trim_silence', '--no_progress', '--no_report')
  return str(output)


def test_vad_end_to_end_trims_to_speech_and_rejects_no_speech(vad_run):
  (sample,) = read_shards(vad_run)
  record = sample['json'] if isinstance(sample['json'], dict) else json.loads(sample['json'])
  assert sample['__key__'] == 'padded_0'
  assert 80 <= record['num_frames'] <= 100, record['num_frames']  # 3.2 s of speech and 0.2 s each side: 3.6 s
  assert record['scores']['speech_ratio'] > 0.8
  rejects = {r['id']: r for r in read_jsonl(os.path.join(vad_run, 'rejects.jsonl'))}
  assert (rejects['quiet_0']['stage'], rejects['quiet_0']['reason']) == ('speech', 'no_speech'), rejects

