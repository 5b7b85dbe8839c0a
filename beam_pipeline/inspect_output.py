"""`python -m beam_pipeline.inspect_output <shard.tar | output dir>`: what is in it, and a preview image.

For a shard: one line per sample (frames, duration, face, crop, payloads). For
an output of any layout (shards, folders, files): the recipe and layout that made
it, totals from stats.json, index, shard and unit counts, rejects by reason and
which metadata fields the samples carry. A contact sheet of sampled frames with
landmarks drawn (from the shards) is written as a PNG inside the output (for a
shard: beside it). Local and gs:// paths.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from typing import List, Optional

from apache_beam.io.filesystems import FileSystems

from beam_pipeline import report
from transforms.core.fileio import write_atomic


def _size(uri: str) -> int:
  try:
    return FileSystems.match([uri])[0].metadata_list[0].size_in_bytes
  except (IndexError, OSError, ValueError):
    return 0


def _mib(n: float) -> str:
  return f'{n / 2 ** 20:.1f} MiB'


def summarise_shard(uri: str, samples: int, lines: List[str]):
  """Summary lines for one tar shard; returns thumbnails of up to `samples` of its samples."""
  lines.append(f'shard {uri}: {_mib(_size(uri))}')
  thumbs, extensions, count = [], collections.Counter(), 0
  for key, members in report.shard_samples(uri):
    count += 1
    extensions.update(members.keys())
    meta = json.loads(members['json']) if 'json' in members else {}
    face = meta.get('face', {})
    crop = meta.get('crop', {})
    lines.append(f'  {key}: {meta.get("num_frames", "?")} frames, {meta.get("duration", "?")} s, '
                 f'size {meta.get("size", "?")}, face in {face.get("face_ratio", "?")} of frames '
                 f'(median {face.get("face_size", "?")} px), crop {crop.get("mode", "?")} {crop.get("window", "")}, '
                 f'{_mib(sum(len(v) for v in members.values()))}')
    if len(thumbs) < samples:
      thumb = report.thumbnail(key, members)
      if thumb is not None:
        thumbs.append(thumb)
  lines.append(f'  {count} samples; payloads: ' + ', '.join(f'{ext} x{n}' for ext, n in sorted(extensions.items())))
  return thumbs


def summarise_output(output: str, samples: int, lines: List[str]):
  """Summary lines for an output directory; returns thumbnails spread over its index."""
  stats = report.read_json(FileSystems.join(output, 'stats.json'))
  index = report.read_jsonl(FileSystems.join(output, 'index.jsonl'))
  rejects = report.read_jsonl(FileSystems.join(output, 'rejects.jsonl'))
  shards = _listed(FileSystems.join(output, 'shards', '*.tar'))
  made = report.read_json(FileSystems.join(output, 'output.json'))
  lines.append(f'output {output}' + (f' (--recipe={made.get("recipe")}, {made.get("layout")})' if made else ''))
  if stats:
    lines.append(f'  planned {stats.get("planned")}, written {stats.get("written")}, rejected '
                 f'{stats.get("rejected")}, balanced {stats.get("balanced")}, frames {stats.get("frames_written")}')
  else:
    lines.append('  no stats.json (run unfinished?)')
  units = _listed(FileSystems.join(output, 'published', '*.jsonl'))
  lines.append(f'  index: {len(index)} clips, {sum(r.get("duration", 0) for r in index):.1f} s; '
               + (f'shards: {len(shards)}, {_mib(sum(m.size_in_bytes for m in shards))}' if shards or not units
                  else f'published units (subjects or tubes): {len(units)}'))
  runs = _listed(FileSystems.join(output, 'runs', '*', 'stats.json'))
  if runs:
    lines.append(f'  runs kept: {len(runs)} (runs/<run id>/stats.json, rejects.jsonl)')
  for reason, n in collections.Counter(r.get('reason', '?') for r in rejects).most_common():
    lines.append(f'  rejected {n} x {reason}')
  fields = collections.Counter(name for r in index for name in report.flatten(r))
  if fields:
    lines.append('  metadata fields (clips that have them): ' +
                 ', '.join(f'{name} {n}' for name, n in sorted(fields.items())))
  thumbs, _ = report.sampled_shards(output, index, samples)
  return [t for _, t in thumbs]


def _listed(pattern: str) -> list:
  try:
    return FileSystems.match([pattern])[0].metadata_list
  except Exception:  # pylint: disable=broad-except  # no such folder
    return []


def default_preview(path: str) -> str:
  """Inside the output: `<output>/preview.png`; for a shard `<output>/shards/x.tar`, `<output>/x.preview.png`."""
  if not path.endswith('.tar'):
    return FileSystems.join(path, 'preview.png')
  folder, name = path.rsplit('/', 1) if '/' in path else ('.', path)
  if folder.rsplit('/', 1)[-1] == 'shards' and '/' in folder:
    folder = folder.rsplit('/', 1)[0]
  return FileSystems.join(folder, name[:-len('.tar')] + '.preview.png')


def main(argv: Optional[List[str]] = None) -> int:
  parser = argparse.ArgumentParser(prog='python -m beam_pipeline.inspect_output', description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('path', help='A shard (.tar) or an output directory, local or gs://.')
  parser.add_argument('--preview', default=None,
                      help='Where to write the preview PNG (default: <output>/preview.png; for a shard '
                      '<output>/<shard>.preview.png).')
  parser.add_argument('--samples', type=int, default=16, help='Most samples shown in the preview.')
  args = parser.parse_args(argv)
  path = args.path.rstrip('/')
  lines: List[str] = []
  if path.endswith('.tar'):
    if not FileSystems.exists(path):
      parser.error(f'{path} does not exist')
    thumbs = summarise_shard(path, args.samples, lines)
  elif any(FileSystems.exists(FileSystems.join(path, name)) for name in ('index.jsonl', 'shards', 'output.json')):
    thumbs = summarise_output(path, args.samples, lines)
  else:
    parser.error(f'{path} is neither a .tar shard nor an output directory (no index.jsonl, output.json or shards/)')
  preview = args.preview or default_preview(path)
  if thumbs:
    write_atomic(preview, report.png(report.contact_sheet(thumbs)))
    lines.append(f'preview: {preview} ({len(thumbs)} samples)')
  else:
    lines.append('preview: none (no decodable samples)')
  print('\n'.join(lines))
  return 0


if __name__ == '__main__':
  sys.exit(main())
