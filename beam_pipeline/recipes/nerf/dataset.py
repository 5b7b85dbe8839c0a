"""A PyTorch `Dataset` over one subject folder the `nerf` recipe wrote (AD-NeRF layout).

    from torch.utils.data import DataLoader
    from beam_pipeline.recipes.nerf.dataset import NerfSubjectDataset
    loader = DataLoader(NerfSubjectDataset('out/<subject>', split='train'), batch_size=4, shuffle=True)

Each item is a dict of tensors: `image` (3, H, W) float in [0, 1] from gt_imgs (background replaced by
bc.jpg, what AD-NeRF trains on), `pose` (4, 4) camera-to-world, `audio` (16, D) the frame's feature window
(ER-NeRF's two HuBERT steps per frame in aud_hu.npy are put back into 16-step windows),
`parsing` (H, W) int64 face-parsing labels, `torso` (4, H, W) float RGBA in [0, 1], and `index` (the frame
number). `focal`, `cx`, `cy` and `background` ((3, H, W), bc.jpg) are attributes. torch is imported only when
an item is read, so the pipeline never needs it to import this module.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import cv2
import numpy as np

from beam_pipeline.recipes.nerf.audio_features import FILES, STEPS_PER_FRAME, frame_windows


def _read_rgb(path: str, flags: int = cv2.IMREAD_COLOR) -> np.ndarray:
  pixels = cv2.imread(path, flags)
  if pixels is None:
    raise FileNotFoundError(f'{path} is missing or does not decode')
  return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB if pixels.shape[2] == 3 else cv2.COLOR_BGRA2RGBA)


class NerfSubjectDataset:
  """Frames of `split` ('train' or 'val') of a subject folder; `audio_kind` ('mel', 'hubert', 'wav2vec',
  'deepspeech') picks the features (default: the only kind there)."""

  def __init__(self, folder: str, split: str = 'train', audio_kind: Optional[str] = None):
    self.folder = folder
    with open(os.path.join(folder, f'transforms_{split}.json'), encoding='utf-8') as handle:
      meta = json.load(handle)
    self.focal, self.cx, self.cy = float(meta['focal_len']), float(meta['cx']), float(meta['cy'])
    self.frames = meta['frames']
    if audio_kind is None:
      found = [kind for kind, names in FILES.items() if os.path.exists(os.path.join(folder, names[0]))]
      if len(found) != 1:
        raise ValueError(f'{folder} holds {len(found)} kinds of audio features; name one with audio_kind')
      audio_kind = found[0]
    self.audio = np.load(os.path.join(folder, FILES[audio_kind][0]), mmap_mode='r', allow_pickle=False)
    if audio_kind == 'hubert':  # (N, 2, D): the steps back in a row, windowed as the other kinds
      steps = np.asarray(self.audio, np.float32).reshape(-1, self.audio.shape[-1])
      self.audio = frame_windows(steps, STEPS_PER_FRAME, len(self.audio), 1.0)
    self.background_rgb = _read_rgb(os.path.join(folder, 'bc.jpg'))

  def __len__(self) -> int:
    return len(self.frames)

  @property
  def background(self):
    import torch
    return torch.from_numpy(self.background_rgb.astype(np.float32) / 255.0).permute(2, 0, 1)

  def __getitem__(self, item: int) -> dict:
    import torch
    frame = self.frames[item]
    index = int(frame['img_id'])
    image = _read_rgb(os.path.join(self.folder, 'gt_imgs', f'{index}.jpg'))
    torso = _read_rgb(os.path.join(self.folder, 'torso_imgs', f'{index}.png'), cv2.IMREAD_UNCHANGED)
    parsing = cv2.imread(os.path.join(self.folder, 'parsing', f'{index}.png'), cv2.IMREAD_UNCHANGED)
    if parsing is None:
      raise FileNotFoundError(f'parsing/{index}.png is missing in {self.folder}')
    return {
        'index': index,
        'image': torch.from_numpy(image.astype(np.float32) / 255.0).permute(2, 0, 1),
        'pose': torch.tensor(frame['transform_matrix'], dtype=torch.float32),
        'audio': torch.from_numpy(np.array(self.audio[int(frame['aud_id'])], np.float32)),
        'parsing': torch.from_numpy(parsing.astype(np.int64)),
        'torso': torch.from_numpy(torso.astype(np.float32) / 255.0).permute(2, 0, 1),
    }
