"""report.html: what a person looks at after a run, next to the shards it describes.

A contact sheet of sampled output frames with their landmarks drawn, histograms
of head pose, face size, sync score and duration, and rejects by reason. It
reads index.jsonl, rejects.jsonl, stats.json and the shards of the sampled
clips through Beam FileSystems, so a gs:// output gets its report too. Fields
a run did not compute are shown as "not computed", never as empty plots.
"""
from __future__ import annotations

import collections
import html
import io
import json
import os
import tarfile
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import av
import cv2
import numpy as np
from apache_beam.io.filesystems import FileSystems

from transforms.fileio import write_atomic

REPORT = 'report.html'
FIGURES = 'report_files'
THUMB = 192
NOT_COMPUTED = 'not computed'


# ----------------------------------------------------------------------------- reading an output

def read_jsonl(uri: str) -> List[dict]:
  if not FileSystems.exists(uri):
    return []
  with FileSystems.open(uri) as handle:
    return [json.loads(line) for line in handle.read().decode().splitlines() if line.strip()]


def read_json(uri: str) -> dict:
  if not FileSystems.exists(uri):
    return {}
  with FileSystems.open(uri) as handle:
    return json.loads(handle.read())


def shard_samples(uri: str, wanted: Optional[Sequence[str]] = None) -> Iterator[Tuple[str, Dict[str, bytes]]]:
  """(key, {extension: bytes}) per sample of a tar shard, streamed (WebDataset's key rule: up to the first dot).

  With `wanted`, members of other samples are skipped unread.
  """
  wanted_set = set(wanted) if wanted is not None else None
  with FileSystems.open(uri, mime_type='application/x-tar', compression_type='uncompressed') as handle:
    key, members = None, {}
    with tarfile.open(fileobj=handle, mode='r|') as tar:
      for member in tar:
        if not member.isfile():
          continue
        base = os.path.basename(member.name)
        name, _, ext = base.partition('.')
        if name != key:
          if key is not None and members:
            yield key, members
          key, members = name, {}
        if wanted_set is None or name in wanted_set:
          members[ext] = tar.extractfile(member).read()
      if key is not None and members:
        yield key, members


def load_npy(data: bytes) -> np.ndarray:
  return np.load(io.BytesIO(data), allow_pickle=False)


def flatten(record: dict, prefix: str = '') -> Dict[str, object]:
  """{'face.face_size': 212.0, ...}: nested metadata under dotted names."""
  out = {}
  for key, value in record.items():
    name = f'{prefix}{key}'
    if isinstance(value, dict):
      out.update(flatten(value, name + '.'))
    else:
      out[name] = value
  return out


def numeric_field(records: Sequence[dict], include: Sequence[str], prefer: Sequence[str] = (),
                  exclude: Sequence[str] = ()) -> Tuple[Optional[str], np.ndarray]:
  """The first dotted field whose name has every `include` word (and a `prefer` word when one
  exists) with numbers in the records; (None, empty) when no record has one."""
  names = collections.Counter()
  flat = [flatten(r) for r in records]
  for record in flat:
    for name, value in record.items():
      lower = name.lower()
      if isinstance(value, (int, float)) and not isinstance(value, bool) and \
          all(w in lower for w in include) and not any(w in lower for w in exclude):
        names[name] += 1
  if not names:
    return None, np.zeros(0)
  ranked = sorted(names, key=lambda n: (not any(w in n.lower() for w in prefer), -names[n], n))
  field = ranked[0]
  values = np.array([r[field] for r in flat if isinstance(r.get(field), (int, float))], np.float64)
  return field, values[np.isfinite(values)]


# ----------------------------------------------------------------------------- pictures

def middle_frame(mp4: bytes) -> Tuple[int, Optional[np.ndarray]]:
  """(index, RGB) of the clip's middle frame."""
  with av.open(io.BytesIO(mp4)) as container:
    stream = container.streams.video[0]
    total = stream.frames or 0
    target = total // 2
    last = None
    for index, frame in enumerate(container.decode(stream)):
      last = (index, frame.to_ndarray(format='rgb24'))
      if index >= target:
        break
  return last if last is not None else (0, None)


def thumbnail(key: str, members: Dict[str, bytes]) -> Optional[np.ndarray]:
  """A captioned thumbnail of the sample's middle frame with its landmarks drawn."""
  if 'mp4' not in members:
    return None
  index, image = middle_frame(members['mp4'])
  if image is None:
    return None
  image = np.ascontiguousarray(image)
  if 'landmarks.npy' in members:
    landmarks = load_npy(members['landmarks.npy'])
    if index < len(landmarks):
      points = landmarks[index, :, :2]
      radius = max(1, image.shape[0] // 256)
      for x, y in points[np.isfinite(points).all(1)]:
        cv2.circle(image, (int(x), int(y)), radius, (40, 255, 80), -1, cv2.LINE_AA)
  thumb = cv2.resize(image, (THUMB, THUMB), interpolation=cv2.INTER_AREA)
  cv2.rectangle(thumb, (0, THUMB - 18), (THUMB, THUMB), (0, 0, 0), -1)
  cv2.putText(thumb, key[:28], (4, THUMB - 5), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (255, 255, 255), 1, cv2.LINE_AA)
  return thumb


def contact_sheet(thumbs: Sequence[np.ndarray], columns: int = 4) -> np.ndarray:
  rows = max(1, -(-len(thumbs) // columns))
  sheet = np.full((rows * THUMB, min(columns, max(len(thumbs), 1)) * THUMB, 3), 32, np.uint8)
  for i, thumb in enumerate(thumbs):
    r, c = divmod(i, columns)
    sheet[r * THUMB:(r + 1) * THUMB, c * THUMB:(c + 1) * THUMB] = thumb
  return sheet


def png(image: np.ndarray) -> bytes:
  ok, data = cv2.imencode('.png', cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
  if not ok:
    raise ValueError('PNG encoding failed')
  return data.tobytes()


def _figure_png(figure) -> bytes:
  buffer = io.BytesIO()
  figure.savefig(buffer, format='png', dpi=100, bbox_inches='tight')
  import matplotlib.pyplot as plt
  plt.close(figure)
  return buffer.getvalue()


def histogram(values: np.ndarray, title: str, xlabel: str, bins: int = 30) -> bytes:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  figure, axis = plt.subplots(figsize=(4.2, 3.0))
  axis.hist(values, bins=bins, color='#3b7dd8')
  axis.set_title(f'{title} (n={len(values)})', fontsize=10)
  axis.set_xlabel(xlabel)
  axis.set_ylabel('count')
  return _figure_png(figure)


def bar_chart(counts: Dict[str, int], title: str) -> bytes:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  labels = list(counts)
  figure, axis = plt.subplots(figsize=(max(4.2, 0.6 * len(labels) + 1.5), 3.0))
  axis.bar(range(len(labels)), [counts[k] for k in labels], color='#d8573b')
  axis.set_xticks(range(len(labels)), labels, rotation=30, ha='right', fontsize=8)
  axis.set_title(title, fontsize=10)
  axis.set_ylabel('clips')
  return _figure_png(figure)


# ----------------------------------------------------------------------------- gathering

def pick(records: Sequence[dict], count: int) -> List[dict]:
  """`count` records spread evenly over the index (deterministic)."""
  if len(records) <= count:
    return list(records)
  step = len(records) / count
  return [records[int(i * step)] for i in range(count)]


def sampled_shards(output: str, records: Sequence[dict], count: int) -> Tuple[List[Tuple[str, np.ndarray]], np.ndarray]:
  """Thumbnails of `count` sampled clips, and per-frame (yaw, pitch, roll) of every clip in the shards read."""
  chosen = pick(records, count)
  by_shard = collections.defaultdict(list)
  for record in chosen:
    if record.get('shard'):
      by_shard[record['shard']].append(record['id'])
  thumbs, poses = {}, []
  for shard, ids in sorted(by_shard.items()):
    uri = FileSystems.join(output, shard)
    if not FileSystems.exists(uri):
      continue
    for key, members in shard_samples(uri):
      if 'pose.npy' in members:
        poses.append(load_npy(members['pose.npy']).reshape(-1, 3))
      if key in ids:
        thumb = thumbnail(key, members)
        if thumb is not None:
          thumbs[key] = thumb
  ordered = [(r['id'], thumbs[r['id']]) for r in chosen if r['id'] in thumbs]
  pose = np.concatenate(poses) if poses else np.zeros((0, 3), np.float32)
  return ordered, pose[np.isfinite(pose).all(1)]


def figures(output: str, samples: int) -> Tuple[dict, list]:
  """(facts, [(title, png bytes or None, caption)]) for the page."""
  stats = read_json(FileSystems.join(output, 'stats.json'))
  index = read_jsonl(FileSystems.join(output, 'index.jsonl'))
  rejects = read_jsonl(FileSystems.join(output, 'rejects.jsonl'))
  thumbs, pose = sampled_shards(output, index, samples)
  panels = []
  sheet = png(contact_sheet([t for _, t in thumbs])) if thumbs else None
  panels.append(('contact sheet', sheet,
                 f'middle frame of {len(thumbs)} clips spread over the index, face landmarks drawn'))
  for axis, name in ((0, 'yaw'), (1, 'pitch')):
    field, values = numeric_field(index, [name], prefer=['mean', 'median'])
    if field:
      panels.append((name, histogram(values, name, 'degrees'), f'per clip, from index field {field}'))
    elif len(pose):
      panels.append((name, histogram(pose[:, axis], name, 'degrees'),
                     f'per frame, from pose.npy of the {len(pose)} frames in the shards read'))
    else:
      panels.append((name, None, NOT_COMPUTED))
  field, values = numeric_field(index, ['face_size'], exclude=['source'])
  panels.append(('face size', histogram(values, 'face size', 'pixels in the output frame') if field else None,
                 f'per clip, index field {field}' if field else NOT_COMPUTED))
  field, values = numeric_field(index, ['sync'], prefer=['score', 'conf'], exclude=['offset'])
  panels.append(('sync score', histogram(values, 'sync score', field) if field else None,
                 f'per clip, index field {field}' if field else NOT_COMPUTED))
  durations = np.array([r['duration'] for r in index if isinstance(r.get('duration'), (int, float))])
  panels.append(('duration', histogram(durations, 'duration', 'seconds') if len(durations) else None,
                 'per clip' if len(durations) else NOT_COMPUTED))
  reasons = collections.Counter(r.get('reason', '?') for r in rejects)
  panels.append(('rejects by reason', bar_chart(dict(reasons.most_common()), 'rejects by reason') if reasons else None,
                 f'{sum(reasons.values())} rejected clips (rejects.jsonl)' if reasons else 'no rejects'))
  facts = {'stats': stats, 'index': len(index), 'rejects': rejects}
  return facts, panels


def _slug(title: str) -> str:
  return title.replace(' ', '_')


def write_report(output: str, samples: int = 16) -> str:
  """Write report.html and its PNGs into `output`; returns the page's URI."""
  facts, panels = figures(output, samples)
  stats = facts['stats']
  rows = ''.join(f'<tr><th>{html.escape(str(k))}</th><td>{html.escape(json.dumps(v))}</td></tr>'
                 for k, v in sorted(stats.items()))
  blocks = []
  for title, data, caption in panels:
    if data is None:
      body = f'<p class="missing">{html.escape(caption)}</p>'
    else:
      name = f'{FIGURES}/{_slug(title)}.png'
      write_atomic(FileSystems.join(output, name), data)
      body = f'<img src="{name}" alt="{html.escape(title)}"><p>{html.escape(caption)}</p>'
    blocks.append(f'<figure><figcaption>{html.escape(title)}</figcaption>{body}</figure>')
  reject_rows = ''.join(
      f'<tr><td>{html.escape(r.get("id", ""))}</td><td>{html.escape(r.get("stage", ""))}</td>'
      f'<td>{html.escape(r.get("reason", ""))}</td><td>{html.escape(str(r.get("detail", ""))[:200])}</td></tr>'
      for r in facts['rejects'][:200])
  page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Run report: {html.escape(output)}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} figure{{display:inline-block;vertical-align:top;margin:0 1em 1em 0}}
figcaption{{font-weight:bold}} table{{border-collapse:collapse}} td,th{{border:1px solid #ccc;padding:2px 6px;
text-align:left;font-size:90%}} .missing{{color:#a00;width:20em}}</style></head>
<body><h1>Run report</h1><p>{html.escape(output)}: {facts['index']} clips in the index.</p>
<h2>Totals (stats.json)</h2><table>{rows or '<tr><td>no stats.json</td></tr>'}</table>
<h2>Figures</h2>{''.join(blocks)}
<h2>Rejects</h2><table><tr><th>id</th><th>stage</th><th>reason</th><th>detail</th></tr>{reject_rows}</table>
</body></html>
"""
  uri = FileSystems.join(output, REPORT)
  write_atomic(uri, page.encode())
  return uri
