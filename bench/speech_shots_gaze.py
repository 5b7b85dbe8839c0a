"""CPU cost per output frame of Silero VAD (--vad), TransNetV2 (--shot_detector=transnetv2), the HSV histograms
(the default shot detector) and L2CS-Net (--l2cs_weights): its "## VAD, shots, gaze" section in results.md.

python bench/speech_shots_gaze.py [--frames 200]

A real talking clip's frames and voice (../shared/real_clips), repeated to `--frames`. Each model is warmed up
once, then timed; wall and process CPU time per frame are both given (the CPU time is what a busy machine does
not inflate). L2CS-Net runs random weights in the gaze360 layout (the cost does not depend on the values).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import av
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.run import replace_section  # noqa: E402
from beam_pipeline.recipes.megactor.l2cs import L2CS, L2CSModelHandler, face_input  # noqa: E402
from model_handlers.silero_vad import RATE, load_vad, speech_probabilities  # noqa: E402
from model_handlers.transnetv2 import SIZE, load_transnetv2, transition_probabilities  # noqa: E402
from transforms.sampling import ShotCuts  # noqa: E402

CLIP = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'shared',
                    'real_clips', 'talk_glasses_512.mp4')
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results.md')
HEADING = '## VAD, shots, gaze'
FPS = 25.0


def _timed(function) -> tuple:
  wall, cpu = time.perf_counter(), time.process_time()
  function()
  return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--frames', type=int, default=200)
  parser.add_argument('--l2cs_frames', type=int, default=16, help='L2CS-Net is slow on CPU: fewer frames')
  args = parser.parse_args()
  with av.open(CLIP) as container:
    frames = [f.to_ndarray(format='rgb24') for f in container.decode(video=0)]
  with av.open(CLIP) as container:
    resampler = av.AudioResampler(format='flt', layout='mono', rate=RATE)
    voice = np.concatenate([pcm.to_ndarray().reshape(-1) for frame in container.decode(audio=0)
                            for pcm in resampler.resample(frame)])
  frames = (frames * (args.frames // len(frames) + 1))[:args.frames]
  voice = np.tile(voice, int(args.frames / FPS * RATE) // len(voice) + 1)[:int(args.frames / FPS * RATE)]
  per = {}

  vad = load_vad()
  speech_probabilities(vad, voice[:RATE])
  per['silero_vad'] = _timed(lambda: speech_probabilities(vad, voice))

  small = np.stack([np.ascontiguousarray(cv2_resize(f, SIZE)) for f in frames])
  transnet = load_transnetv2('cpu')
  transition_probabilities(transnet, small[:100])
  per['transnetv2'] = _timed(lambda: transition_probabilities(transnet, small))

  tiny = [cv2_resize(f, (64, 36)) for f in frames]
  shots = ShotCuts(0.4)
  per['hsv_histograms'] = _timed(lambda: [shots.push(i / FPS, f) for i, f in enumerate(tiny)])

  scratch = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'work', 'l2cs')
  os.makedirs(scratch, exist_ok=True)
  weights = os.path.join(scratch, 'L2CSNet_gaze360.pkl')
  torch.save(L2CS().state_dict(), weights)
  handler = L2CSModelHandler(weights, device='cpu')
  model = handler.load_model()
  box = np.array([150.0, 110.0, 370.0, 400.0])  # the face in the 512 px frames
  inputs = [face_input(frame, box) for frame in frames[:args.l2cs_frames]]
  list(handler.run_inference(inputs[:2], model))
  wall, cpu = _timed(lambda: [list(handler.run_inference(inputs[i:i + 8], model)) for i in range(0, len(inputs), 8)])
  per['l2cs_resnet50'] = (wall * args.frames / len(inputs), cpu * args.frames / len(inputs))

  per = {name: {'wall_ms': round(1000 * w / args.frames, 3), 'cpu_ms': round(1000 * c / args.frames, 3)}
         for name, (w, c) in per.items()}
  rows = '\n'.join(f'| {name} | {v["wall_ms"]:.2f} | {v["cpu_ms"]:.2f} |' for name, v in per.items())
  table = f'| per output frame (25 fps) | wall ms | CPU ms |\n|---|---|---|\n{rows}'
  machine = f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads ' \
            f'{torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}'
  section = (f'{HEADING}\n`python bench/speech_shots_gaze.py --frames {args.frames}` ({machine}); '
             f'{os.path.basename(CLIP)}, L2CS-Net on {args.l2cs_frames} frames in batches of 8:\n\n{table}\n\n'
             f'```json\n{json.dumps(per)}\n```\n')
  print(section)
  replace_section(RESULTS, HEADING, section.split('\n'))


def cv2_resize(frame: np.ndarray, size) -> np.ndarray:
  import cv2
  return cv2.resize(frame, tuple(size), interpolation=cv2.INTER_AREA)


if __name__ == '__main__':
  main()
