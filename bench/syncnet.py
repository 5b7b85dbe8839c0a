"""Cost per output frame of SyncNet on CPU, as the render pass pays it: its "## SyncNet" section in results.md.

python bench/syncnet.py [--frames 100] [--threads N]

Per 25 fps frame the pass makes one face crop, one 5-frame lip window and one MFCC audio window; each window
goes through SyncNet (random weights in the published layout: the cost does not depend on the values) in the
handler's CPU batches of 8. The frames are a real talking clip's (../shared/real_clips), the face box fixed.
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
from model_handlers.in_process import SharedModel  # noqa: E402
from model_handlers.syncnet import SyncNet, SyncNetModelHandler  # noqa: E402
from transforms.lib import avsync  # noqa: E402

CLIP = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'shared',
                    'real_clips', 'talk_glasses_512.mp4')
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results.md')
HEADING = '## SyncNet'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--frames', type=int, default=100)
  parser.add_argument('--threads', type=int, default=0, help='torch CPU threads; 0: torch\'s default')
  args = parser.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  scratch = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'work', 'syncnet')
  os.makedirs(scratch, exist_ok=True)
  weights = os.path.join(scratch, 'syncnet_v2.model')
  torch.save(SyncNet().state_dict(), weights)
  with av.open(CLIP) as container:
    frames = [f.to_ndarray(format='rgb24') for f in container.decode(video=0)]
  frames = (frames * (args.frames // len(frames) + 1))[:args.frames]
  box = np.array([[150.0, 110.0], [370.0, 400.0]])  # the face's corners in the 512 px frames
  samples = np.random.default_rng(0).normal(0, 3000, int(args.frames / avsync.FPS * avsync.AUDIO_RATE) + 640)
  model = SharedModel(SyncNetModelHandler(weights, device='cpu'))
  model.setup()
  model.infer([(avsync.LIP, np.zeros((5, 224, 224, 3), np.uint8))])  # warm up
  started = time.perf_counter()
  crops = [avsync.face_crop(frame, box) for frame in frames]
  cropped = time.perf_counter()
  lips = model.infer([(avsync.LIP, np.stack(crops[i:i + 5])) for i in range(len(crops) - 4)])
  lipped = time.perf_counter()
  count = avsync.window_count(len(frames), len(samples))
  audio = model.infer([(avsync.AUDIO, w) for w in avsync.audio_windows(samples, count)])
  heard = time.perf_counter()
  avsync.sync_offset(np.stack(lips[:count]), np.stack(audio))
  done = time.perf_counter()
  per = {name: 1000 * seconds / args.frames for name, seconds in
         (('crop', cropped - started), ('lip', lipped - cropped), ('audio', heard - lipped),
          ('readout', done - heard), ('total', done - started))}
  row = ' | '.join(f'{per[k]:.1f}' for k in ('crop', 'lip', 'audio', 'readout', 'total'))
  table = ('| ms per frame: crop | lip window | audio window (MFCC + net) | read-out | total |\n|---|---|---|---|---|\n'
           f'| {row} |')
  machine = f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads ' \
            f'{torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}'
  command = f'python bench/syncnet.py --frames {args.frames}' + (f' --threads {args.threads}' if args.threads else '')
  section = (f'{HEADING}\n`{command}` ({machine}); {args.frames} frames of '
             f'{os.path.basename(CLIP)}:\n\n{table}\n\n```json\n{json.dumps(per)}\n```\n')
  print(section)
  replace_section(RESULTS, HEADING, section.split('\n'))


if __name__ == '__main__':
  main()
