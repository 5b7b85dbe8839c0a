"""Audio features for the nerf recipe: log-mel, frame windows, and the HuBERT, wav2vec2 and DeepSpeech handlers on
tiny random models."""
import json
import shutil

import numpy as np
import pytest

from beam_pipeline.recipes.nerf import audio_features as af
from model_handlers.weights import WeightsError

RATE = 16000


def _tone_burst(start_s=1.0, end_s=1.5, total_s=3.0, hz=1000.0):
  t = np.arange(int(total_s * RATE)) / RATE
  pcm = 0.001 * np.random.default_rng(0).normal(size=t.shape)
  burst = (t >= start_s) & (t < end_s)
  pcm[burst] += 0.5 * np.sin(2 * np.pi * hz * t[burst])
  return pcm.astype(np.float32)


def test_log_mel_has_80_bins_at_50_steps_per_second():
  for seconds in (0.5, 3.0, 3.013):
    pcm = np.zeros(int(seconds * RATE), np.float32)
    mel = af.log_mel(pcm)
    assert mel.shape == (1 + len(pcm) // 320, 80) and mel.dtype == np.float32
  np.testing.assert_allclose(af.log_mel(np.zeros(4000, np.float32)), -10, rtol=1e-6)  # silence: the floor
  with pytest.raises(ValueError, match='16000'):
    af.log_mel(np.zeros(100, np.float32), rate=44100)


def test_a_tone_burst_shows_when_and_at_which_pitch():
  mel = af.log_mel(_tone_burst())
  loudness = mel.max(axis=1)
  loud = np.flatnonzero(loudness > loudness.min() + 3)  # 30 dB above the noise
  # Steps are centred on j / 50 s; windows 400 samples long (8 ms either side) spill one step each way.
  assert 49 <= loud.min() <= 50 and 74 <= loud.max() <= 75
  band = np.argmax(mel[60])
  centres = af._mel_to_hz(np.linspace(0, af._hz_to_mel(8000), 82))[1:-1]
  assert abs(centres[band] - 1000) < 100
  assert np.argmax(mel[60]) == np.argmax(af.log_mel(_tone_burst(hz=1000))[70])
  assert np.argmax(af.log_mel(_tone_burst(hz=3000))[60]) > band  # a higher tone lands in a higher bin


def test_frame_windows_centre_each_frame_and_zero_pad_the_ends():
  steps, dims = 100, 3
  features = np.repeat(np.arange(1, steps + 1, dtype=np.float32)[:, None], dims, axis=1)  # value = step + 1
  windows = af.frame_windows(features, steps_per_s=50, num_frames=50, fps=25)
  assert windows.shape == (50, 16, dims) and windows.dtype == np.float32
  for frame in (0, 3, 4, 10, 45, 49):
    centre = 2 * frame  # frame i at i / 25 s is step 2 i at 50 Hz
    expected = np.array([s + 1 if 0 <= s < steps else 0 for s in range(centre - 8, centre + 8)], np.float32)
    np.testing.assert_array_equal(windows[frame, :, 0], expected)
  assert np.all(windows[0, :8] == 0) and windows[0, 8, 0] == 1  # before the audio: zeros
  assert np.all(windows[49, 10:] == 0) and windows[49, 9, 0] == steps  # after it: zeros
  # 30 fps on 50 Hz features: the centre is the nearest step to i / 30 s.
  windows = af.frame_windows(features, steps_per_s=50, num_frames=10, fps=30)
  assert [int(w[8, 0]) - 1 for w in windows] == [round(i * 50 / 30) for i in range(10)]


def test_to_frame_rate_is_identity_at_25_fps_and_interpolates_otherwise():
  features = np.stack([np.arange(60, dtype=np.float32), -np.arange(60, dtype=np.float32)], axis=1)
  np.testing.assert_array_equal(af.to_frame_rate(features, 50, 25, 25), features[:50])
  at_30 = af.to_frame_rate(features, 50, 10, 30)  # 60 steps/s: step k at k / 60 s = step k * 50 / 60
  np.testing.assert_allclose(at_30[:, 0], np.arange(20) * 50 / 60, rtol=1e-6)
  held = af.to_frame_rate(features, 50, 40, 25)  # more frames than audio: the last step holds
  assert held.shape == (80, 2) and np.all(held[60:, 0] == 59)


def test_mel_features_per_frame():
  pcm = _tone_burst(total_s=2.0)
  windows = af.audio_features('mel', pcm, num_frames=50, fps=25)
  assert windows.shape == (50, 16, 80)
  mel = af.log_mel(pcm)
  np.testing.assert_array_equal(windows[30, 8], mel[60])  # frame 30 (1.2 s) is centred on step 60
  with pytest.raises(ValueError, match='kind'):
    af.audio_features('lpc', pcm, 50, 25)
  assert af.parse_kinds('hubert, deepspeech,hubert') == ('hubert', 'deepspeech')
  with pytest.raises(ValueError, match='lpc'):
    af.parse_kinds('mel,lpc')


@pytest.fixture(scope='module')
def hubert_dir(tmp_path_factory):
  """A tiny random HuBERT saved as facebook/hubert-large-ls960-ft is (HubertForCTC, safetensors)."""
  transformers = pytest.importorskip('transformers')
  torch = pytest.importorskip('torch')
  torch.manual_seed(0)
  config = transformers.HubertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, conv_dim=(16,) * 7, num_conv_pos_embeddings=16,
                                     num_conv_pos_embedding_groups=4, vocab_size=12, feat_extract_norm='layer',
                                     do_stable_layer_norm=True)
  folder = tmp_path_factory.mktemp('hubert') / 'hubert-tiny'
  transformers.HubertForCTC(config).save_pretrained(str(folder))
  with open(folder / 'preprocessor_config.json', 'w') as handle:
    json.dump({'do_normalize': True, 'sampling_rate': 16000}, handle)
  return str(folder)


def _shared(handler):
  from model_handlers.in_process import SharedModel
  model = SharedModel(handler)
  model.setup()
  return model


def test_hubert_handler_gives_50_hz_hidden_states(hubert_dir):
  torch = pytest.importorskip('torch')
  from transformers import HubertModel
  pcm = _tone_burst(total_s=2.0)
  handler = af.HubertHandler(hubert_dir)
  model = handler.load_model()
  (result,) = handler.run_inference([pcm], model)
  assert result.inference.shape == ((len(pcm) - 80) // 320, 32) and result.inference.dtype == np.float32
  reference = HubertModel.from_pretrained(hubert_dir, local_files_only=True).eval()
  normalised = (pcm - pcm.mean()) / np.sqrt(pcm.var() + 1e-7)
  with torch.no_grad():
    expected = reference(torch.from_numpy(normalised)[None]).last_hidden_state[0].numpy()
  np.testing.assert_allclose(result.inference, expected, atol=1e-4)


def test_hubert_chunks_join_without_gap_or_repeat(hubert_dir):
  # 10-step chunks over 2.3 s: 11 full chunks (batched 4 at a time) and a remainder, as RAD-NeRF cuts them.
  pcm = _tone_burst(total_s=2.3)
  handler = af.HubertHandler(hubert_dir, batch_sizes={'cpu': 4, 'cuda': 4}, chunk_steps=10)
  chunked = next(iter(handler.run_inference([pcm], handler.load_model()))).inference
  assert chunked.shape == ((len(pcm) - 80) // 320, 32)
  whole_handler = af.HubertHandler(hubert_dir)
  whole = next(iter(whole_handler.run_inference([pcm], whole_handler.load_model()))).inference
  # Only the attention context differs near the cuts (the convolutional front end is exact): each chunked
  # step stays near the same whole-utterance step, far nearer than to its neighbours (no step lost or doubled).
  aligned = np.abs(chunked - whole).mean()
  assert aligned < 0.5 * np.abs(chunked[1:] - whole[:-1]).mean()
  assert aligned < 0.5 * np.abs(chunked[:-1] - whole[1:]).mean()


def test_hubert_features_per_video_frame(hubert_dir):
  pcm = _tone_burst(total_s=2.0)
  model = _shared(af.HubertHandler(hubert_dir))
  windows = af.audio_features('hubert', pcm, num_frames=50, fps=25, model=model)
  assert windows.shape == (50, 16, 32)
  steps = model.infer([pcm])[0]
  np.testing.assert_allclose(windows[20, 8], steps[40], atol=1e-6)  # frame 20 (0.8 s) is step 40
  assert np.all(windows[0, :8] == 0)
  (pairs,) = af.trainer_files('hubert', pcm, 50, 25, model).values()  # ER-NeRF's aud_hu.npy: the frame's 2 steps
  assert pairs.shape == (50, 2, 32)
  np.testing.assert_allclose(pairs[20], steps[40:42], atol=1e-6)
  # 30 fps: the 50 Hz steps are interpolated at 60 Hz (two per frame), then windowed.
  windows_30 = af.audio_features('hubert', pcm, num_frames=60, fps=30, model=model)
  assert windows_30.shape == (60, 16, 32)
  np.testing.assert_allclose(windows_30[30, 8], steps[50], atol=1e-5)  # 1.0 s is step 50 at either rate
  np.testing.assert_allclose(windows_30[30, 9], (steps[50] + 5 * steps[51]) / 6, atol=1e-5)  # 61/60 s


def test_missing_or_wrong_hubert_folder_names_the_flag(tmp_path, hubert_dir):
  with pytest.raises(WeightsError, match='--hubert_model.*not given'):
    af.check_hubert_dir(None)
  with pytest.raises(WeightsError, match='--hubert_model.*no such file'):
    af.HubertHandler(str(tmp_path / 'absent')).load_model()
  (tmp_path / 'empty').mkdir()
  with pytest.raises(WeightsError, match='--hubert_model.*config.json'):
    af.check_hubert_dir(str(tmp_path / 'empty'))
  other = tmp_path / 'bert'
  other.mkdir()
  (other / 'config.json').write_text(json.dumps({'model_type': 'bert'}))
  with pytest.raises(WeightsError, match='--hubert_model.*bert'):
    af.check_hubert_dir(str(other))
  broken = tmp_path / 'broken'
  broken.mkdir()
  (broken / 'config.json').write_text(open(f'{hubert_dir}/config.json').read())
  (broken / 'model.safetensors').write_bytes(b'not weights')
  with pytest.raises(WeightsError, match='--hubert_model.*could not load'):
    af.HubertHandler(str(broken)).load_model()
  with pytest.raises(ValueError, match='--hubert_model'):
    af.audio_features('hubert', np.zeros(16000, np.float32), 25, 25)


def test_hubert_handler_runs_in_run_inference(hubert_dir):
  import apache_beam as beam
  from apache_beam.ml.inference.base import RunInference
  from apache_beam.testing.test_pipeline import TestPipeline
  from apache_beam.testing.util import assert_that, equal_to
  utterances = [_tone_burst(total_s=seconds) for seconds in (0.5, 1.0)]
  with TestPipeline() as p:
    shapes = (p | beam.Create(utterances) | RunInference(af.HubertHandler(hubert_dir))
              | beam.Map(lambda result: (len(result.example), result.inference.shape)))
    assert_that(shapes, equal_to([(8000, (24, 32)), (16000, (49, 32))]))


def test_a_hub_name_the_hub_cannot_give_is_one_line(monkeypatch, tmp_path):
  """A name that is no folder here is a model hub name (owner/name), looked up as the original scripts do; with no
  hub (offline, as in tests) and nothing cached, the flag's error says so."""
  from huggingface_hub import constants
  monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
  monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'cache'))
  monkeypatch.chdir(tmp_path)
  assert af.is_hub_name('facebook/hubert-large-ls960-ft') and not af.is_hub_name('/weights/hubert')
  with pytest.raises(WeightsError, match='--wav2vec_model .nobody/no-such-model.: no such folder, and the model hub'):
    af.check_wav2vec_dir('nobody/no-such-model')
  (tmp_path / 'nobody' / 'no-such-model').mkdir(parents=True)  # a folder of that name here is a folder
  assert not af.is_hub_name('nobody/no-such-model')
  with pytest.raises(WeightsError, match='the folder has no config.json'):
    af.check_wav2vec_dir('nobody/no-such-model')


def test_a_hub_name_loads_as_transformers_loads_it(monkeypatch, tmp_path, hubert_dir):
  """facebook/hubert-large-ls960-ft-style names load through the model hub's client, here from its local cache
  (offline: tests never download), the same weights as the folder."""
  from huggingface_hub import constants
  repo = tmp_path / 'cache' / 'models--tiny-org--hubert-tiny'
  shutil.copytree(hubert_dir, repo / 'snapshots' / ('0' * 40))
  (repo / 'refs').mkdir()
  (repo / 'refs' / 'main').write_text('0' * 40)
  monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)
  monkeypatch.setattr(constants, 'HF_HUB_CACHE', str(tmp_path / 'cache'))
  monkeypatch.chdir(tmp_path)
  assert af.check_hubert_dir('tiny-org/hubert-tiny') == 'tiny-org/hubert-tiny'
  pcm = _tone_burst(total_s=1.0)
  from_hub, from_folder = (af.HubertHandler(name) for name in ('tiny-org/hubert-tiny', hubert_dir))
  np.testing.assert_array_equal(next(iter(from_hub.run_inference([pcm], from_hub.load_model()))).inference,
                                next(iter(from_folder.run_inference([pcm], from_folder.load_model()))).inference)


def tiny_wav2vec(folder) -> str:
  """A tiny random wav2vec2 CTC model with the Esperanto xlsr-53 model's 44 letters, in save_pretrained form."""
  transformers = pytest.importorskip('transformers')
  torch = pytest.importorskip('torch')
  torch.manual_seed(1)
  config = transformers.Wav2Vec2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=64, conv_dim=(16,) * 7, num_conv_pos_embeddings=16,
                                       num_conv_pos_embedding_groups=4, vocab_size=44, feat_extract_norm='layer',
                                       do_stable_layer_norm=True)
  transformers.Wav2Vec2ForCTC(config).save_pretrained(str(folder))
  return str(folder)


def test_wav2vec_handler_gives_the_ctc_logits(tmp_path):
  torch = pytest.importorskip('torch')
  from transformers import Wav2Vec2ForCTC, Wav2Vec2Model
  wav2vec_dir = tiny_wav2vec(tmp_path / 'wav2vec-tiny')
  pcm = _tone_burst(total_s=1.5)
  handler = af.Wav2VecHandler(wav2vec_dir)
  (result,) = handler.run_inference([pcm], handler.load_model())
  assert result.inference.shape == ((len(pcm) - 80) // 320, 44) and result.inference.dtype == np.float32
  reference = Wav2Vec2ForCTC.from_pretrained(wav2vec_dir, local_files_only=True).eval()
  normalised = (pcm - pcm.mean()) / np.sqrt(pcm.var() + 1e-7)
  with torch.no_grad():
    expected = reference(torch.from_numpy(normalised)[None]).logits[0].numpy()
  np.testing.assert_allclose(result.inference, expected, atol=1e-4)
  headless = tmp_path / 'headless'  # the base model has no CTC head: its "logits" would be random
  Wav2Vec2Model(reference.config).save_pretrained(str(headless))
  with pytest.raises(WeightsError, match='--wav2vec_model.*Wav2Vec2ForCTC'):
    af.check_wav2vec_dir(str(headless))


def tiny_deepspeech_graph(path) -> str:
  """A frozen TensorFlow graph with DeepSpeech 0.1.0's tensors: input_node (1, T, 494) float, input_lengths (1,)
  int32, logits (T, 1, 29) time-major, here one random linear layer."""
  tf = pytest.importorskip('tensorflow')
  graph = tf.Graph()
  with graph.as_default():
    inputs = tf.compat.v1.placeholder(tf.float32, [1, None, 494], name='input_node')
    tf.compat.v1.placeholder(tf.int32, [1], name='input_lengths')
    weights = tf.constant(np.random.default_rng(3).normal(0, 0.1, (494, 29)).astype(np.float32))
    tf.transpose(tf.tensordot(inputs, weights, 1), [1, 0, 2], name='logits')
  with open(path, 'wb') as handle:
    handle.write(graph.as_graph_def().SerializeToString())
  return str(path)


def test_deepspeech_handler_runs_the_frozen_graph_on_adnerf_input(tmp_path):
  pytest.importorskip('python_speech_features')
  graph = tiny_deepspeech_graph(tmp_path / 'output_graph.pb')
  pcm = _tone_burst(total_s=2.0)
  handler = af.DeepSpeechHandler(graph)
  (result,) = handler.run_inference([pcm], handler.load_model())
  from python_speech_features import mfcc
  inputs = af.deepspeech_input(pcm, mfcc)
  # 26 MFCCs every 10 ms, every second kept: 50 Hz; 19 context steps side by side; normalised over the utterance.
  assert inputs.shape == (100, 494) and abs(float(inputs.mean())) < 1e-4 and abs(float(inputs.std()) - 1) < 1e-3
  assert np.ptp(inputs[0, :9 * 26]) == 0 and np.ptp(inputs[0, 9 * 26:]) > 0  # the zero context before the start
  weights = np.random.default_rng(3).normal(0, 0.1, (494, 29)).astype(np.float32)
  assert result.inference.shape == (100, 29)
  np.testing.assert_allclose(result.inference, inputs @ weights, atol=1e-3)
  windows = af.trainer_files('deepspeech', pcm, 50, 25, _shared(handler))
  assert sorted(windows) == ['aud.npy', 'aud_ds.npy'] and windows['aud.npy'].shape == (50, 16, 29)
  np.testing.assert_allclose(windows['aud_ds.npy'][10, 8], result.inference[20], atol=1e-5)
  (tmp_path / 'junk.pb').write_bytes(b'not a graph')
  with pytest.raises(WeightsError, match='--deepspeech_model'):
    af.DeepSpeechHandler(str(tmp_path / 'junk.pb')).load_model()
