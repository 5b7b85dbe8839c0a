"""What --split_at_sync_breaks costs: cutting a rendered clip into pieces against rendering it, per frame, in CPU
time; its "## Cutting at sync breaks" section in results.md.

python bench/sync_split.py [--seconds 20]

A real talking clip (../shared/real_clips, 512 px, looped to --seconds) is rendered once as the render pass does
it without models (decode, crop, resize to 512, H.264 at the default --crf 18 / veryfast, AAC, wav: transforms/
render.render), then cut as transforms/sync_split.py cuts it (transforms/lib/cut.cut_clip): two kept pieces
around a rejected stretch of a fifth of the clip. CPU time (time.process_time: every thread of this process,
x264's included), so the machine's load does not enter; what the cut costs the kept frames in quality is the
PSNR of the pieces' frames against the rendered ones.
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

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench.run import replace_section  # noqa: E402
from transforms.core.elements import ClipTask, MediaFile  # noqa: E402
from transforms.lib.cut import cut_clip  # noqa: E402
from transforms.lib.probe import probe  # noqa: E402
from transforms.render import render  # noqa: E402

CLIP = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'shared',
                    'real_clips', 'talk_glasses_512.mp4')
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results.md')
HEADING = '## Cutting at sync breaks'
FPS, SIZE, CRF, PRESET = 25.0, 512, 18, 'veryfast'


def _looped(path: str, seconds: float) -> None:
  """The real clip looped (stream copy) to about `seconds`."""
  with av.open(CLIP) as source:
    length = float(source.duration) / av.time_base
  with open(path + '.txt', 'w') as handle:
    handle.writelines(f"file '{CLIP}'\n" for _ in range(int(np.ceil(seconds / length))))
  with av.open(path + '.txt', format='concat', options={'safe': '0'}) as source, av.open(path, 'w') as out:
    streams = {s.index: out.add_stream_from_template(s) for s in source.streams if s.type in ('video', 'audio')}
    for packet in source.demux():
      if packet.dts is not None and packet.stream.index in streams:
        packet.stream = streams[packet.stream.index]
        out.mux(packet)


def _frames(path: str) -> np.ndarray:
  with av.open(path) as container:
    return np.stack([f.to_ndarray(format='rgb24') for f in container.decode(video=0)]).astype(np.float32)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--seconds', type=float, default=20.0)
  args = parser.parse_args()
  scratch = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'work', 'sync_split')
  os.makedirs(scratch, exist_ok=True)
  source = os.path.join(scratch, 'source.mp4')
  _looped(source, args.seconds)
  info = probe(source)
  task = ClipTask('bench', 'bench', source, MediaFile(source, info), 0.0, min(args.seconds, info.duration - 0.1),
                  (0, 0, info.width, info.height), 'fixed')
  rendered = os.path.join(scratch, 'rendered.mp4')
  started = time.process_time()
  steps = render(task, rendered, SIZE, FPS, CRF, PRESET)
  while True:
    try:
      next(steps)
    except StopIteration as done:
      frames = done.value[0]
      break
  render_cpu = time.process_time() - started
  a, b = int(frames * 0.4), int(frames * 0.6)  # the middle fifth out of sync
  pieces = [(0, a, os.path.join(scratch, 'a.mp4')), (a, b, None), (b, frames, os.path.join(scratch, 'b.mp4'))]
  started = time.process_time()
  cut_clip(rendered, pieces, FPS, CRF, PRESET)
  cut_cpu = time.process_time() - started
  whole = _frames(rendered)
  cut = np.concatenate([_frames(pieces[0][2]), _frames(pieces[2][2])])
  kept = np.concatenate([whole[:a], whole[b:]])
  psnr = float(10 * np.log10(255 ** 2 / np.mean((cut - kept) ** 2)))
  sizes = (os.path.getsize(pieces[0][2]) + os.path.getsize(pieces[2][2])) / os.path.getsize(rendered)
  per = {'frames': frames, 'render_ms_per_frame': round(1000 * render_cpu / frames, 2),
         'cut_ms_per_frame': round(1000 * cut_cpu / frames, 2), 'kept_psnr_db': round(psnr, 2),
         'pieces_bytes_over_clip': round(sizes, 3)}
  machine = f'{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}'
  table = ('| CPU ms per frame of the clip: render (no models) | cut into 2 pieces (80 % kept) | PSNR kept frames | '
           'pieces / clip bytes |\n|---|---|---|---|\n'
           f'| {per["render_ms_per_frame"]} | {per["cut_ms_per_frame"]} | {per["kept_psnr_db"]} dB | '
           f'{per["pieces_bytes_over_clip"]} |')
  section = (f'{HEADING}\n`python bench/sync_split.py --seconds {args.seconds:g}` ({machine}); {frames} frames of '
             f'{os.path.basename(CLIP)} looped, {SIZE} px, --crf {CRF}, {PRESET}; CPU time:\n\n{table}\n\n'
             f'```json\n{json.dumps(per)}\n```\n')
  print(section)
  replace_section(RESULTS, HEADING, section.split('\n'))


if __name__ == '__main__':
  main()
