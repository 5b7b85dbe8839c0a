"""WebDataset sample tars (MegActor's packed VFHQ/CelebV tars, or this pipeline's megactor shards) as input.

Re-processing a packed dataset reads each sample's `mp4` member as a source named by its key; the other
members (`mp4_styled`, `swapped.mp4`, keypoint arrays, wav) are recomputed, not read. MegActor's arrays
are `.pyd` members: pickles, which run code when loaded. They are never loaded; a tar holding one is
refused (`pickle_refused`) unless the user passes --read_input_pickles, and even then only its `mp4`
members are read. A sample whose `json` member (this pipeline's) gives its frame size keeps that full
frame as its crop window, so a re-processed clip is not cropped a second time.

The archive listing (transforms.sources.manifest) hands every member to `SampleTar.take` first; a tar is a
sample tar when some key has both an `mp4` member and a member only a sample has (an array, `.pyd`,
wav, `mp4_styled`...). Other tars are listed as before.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Set, Tuple

from transforms.core.elements import Reject

SAMPLE_VIDEO = 'mp4'
PICKLED = 'pyd'  # webdataset's extension for pickled values
_READ_BY_LISTING = ('json', 'pkl', 'pickle')  # sidecars the generic listing reads itself


def split_key(name: str) -> Tuple[str, str]:
  """WebDataset's split of a member name: (key: folder and basename up to its first dot, suffix after it)."""
  folder, base = os.path.split(name)
  stem, dot, suffix = base.partition('.')
  return (f'{folder}/{stem}' if folder else stem), (suffix if dot else '')


def _is_pickle_head(head: bytes) -> bool:
  return len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5


class SampleTar:
  """Collects what makes one tar listing a sample tar; claims the members a plain listing must not read."""

  def __init__(self, video_extensions: Tuple[str, ...]):
    self.video_suffixes = tuple(ext.lstrip('.') for ext in video_extensions)
    self.pickled: List[str] = []  # member names, never loaded
    self.extra_keys: Set[str] = set()

  def take(self, safe: str, listed) -> bool:
    """True when the member is the collector's: a `.pyd` or another sample-only member (not a video, not a
    json/pkl sidecar). Only a 2-byte head is read, to tell a pickle by its content."""
    key, suffix = split_key(safe)
    lower = suffix.lower()
    if not suffix or lower in self.video_suffixes or lower in _READ_BY_LISTING:
      return False
    if lower.rsplit('.', 1)[-1] in self.video_suffixes:
      return False  # e.g. swapped.mp4: listed as a video, dropped below when this is a sample tar
    if lower.endswith(PICKLED) or _is_pickle_head(listed.read(2)):
      self.pickled.append(safe)
    self.extra_keys.add(key)
    return True

  def is_sample_tar(self, videos) -> bool:
    return any(self._main_video(safe) in self.extra_keys for safe, _, _ in videos)

  def _main_video(self, safe: str) -> Optional[str]:
    """The key of a sample's `mp4` member, None for any other name."""
    key, suffix = split_key(safe)
    return key if suffix == SAMPLE_VIDEO else None

  def restrict(self, videos, sidecars: Dict[str, dict], read_input_pickles: bool, archive_url: str, archive_id: str):
    """(videos, sidecars, rejects) of a sample tar: each sample's `mp4` member, its full-frame crop from its
    json when known; or, with `.pyd` members and no --read_input_pickles, one reject for the whole tar."""
    if self.pickled and not read_input_pickles:
      detail = (f'{os.path.basename(archive_url)[:120]} holds {len(self.pickled)} pickled members (e.g. '
                f'{self.pickled[0][:80]}); a tar with pickles is read only with --read_input_pickles, and its '
                f'pickles are never loaded')
      return [], {}, [Reject(archive_id, 'manifest', 'pickle_refused', detail, archive_id)]
    kept = [(safe, member_id, listed) for safe, member_id, listed in videos if self._main_video(safe) is not None]
    crops = {}
    for safe, _, _ in kept:
      key = self._main_video(safe)
      size = (sidecars.get(key) or {}).get('size')
      if isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) and v > 0 for v in size):
        crops[key] = {'crop': [0, 0, size[0], size[1]]}
    return kept, crops, []
