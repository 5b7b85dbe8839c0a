"""The 40 CelebA attributes of a face tube (Multimodal VoxCeleb's label/<id>.txt), for `--recipe=mmvox`.

From a user-supplied attribute file (`--attributes`), one row per key; a tube takes the row of its own id,
else of the planned clip it was cut from, else of its source (annotating a speaker once covers every tube).
Three formats, told apart by their first line:
  - CelebA's list_attr_celeba.txt: a count line, a line of the 40 names, then `<key> v1 ... v40` with
    values -1/1 (or 0/1), whitespace-separated;
  - CSV with a header whose first column is the key (`id`, `image_id`...) and the other columns the 40
    names in any order (Kaggle's list_attr_celeba.csv), values -1/1 or 0/1;
  - MMVID's parsed annotation (face-attributes-2_parse_json.txt): `<key>,<Attribute name>,...` naming the
    active attributes ("Mouth Slightly Open" or "Mouth_Slightly_Open"), every other attribute 0.

Without a row, three are inferred from the landmarker's per-frame blendshapes and parsing (the median
over the tube's frames with a face): Smiling (mouthSmileLeft/Right), Mouth_Slightly_Open (jawOpen) and
Eyeglasses (the face-parsing eyeglasses class; only where the parsing model has one, see
`infer_attributes`). The rest are unknown: written 0, as MMVID's loader reads absent, and named on the
file's second line, which also names the inferred ones (MMVID's loader splits the text on commas; that
line has none, and the last attribute, Young, is always unknown there, so the loader's reading holds).
"""
from __future__ import annotations

import csv
import dataclasses
import io
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from model_handlers.mediapipe_face import BLENDSHAPE_NAMES

ATTRIBUTES = (
    '5_o_Clock_Shadow', 'Arched_Eyebrows', 'Attractive', 'Bags_Under_Eyes', 'Bald', 'Bangs', 'Big_Lips',
    'Big_Nose', 'Black_Hair', 'Blond_Hair', 'Blurry', 'Brown_Hair', 'Bushy_Eyebrows', 'Chubby', 'Double_Chin',
    'Eyeglasses', 'Goatee', 'Gray_Hair', 'Heavy_Makeup', 'High_Cheekbones', 'Male', 'Mouth_Slightly_Open',
    'Mustache', 'Narrow_Eyes', 'No_Beard', 'Oval_Face', 'Pale_Skin', 'Pointy_Nose', 'Receding_Hairline',
    'Rosy_Cheeks', 'Sideburns', 'Smiling', 'Straight_Hair', 'Wavy_Hair', 'Wearing_Earrings', 'Wearing_Hat',
    'Wearing_Lipstick', 'Wearing_Necklace', 'Wearing_Necktie', 'Young')
SMILE = (BLENDSHAPE_NAMES.index('mouthSmileLeft'), BLENDSHAPE_NAMES.index('mouthSmileRight'))
JAW_OPEN = BLENDSHAPE_NAMES.index('jawOpen')
# MediaPipe's blendshape scores are 0..1: a clear smile scores about 0.5 and up; a mouth at rest opens
# the jaw by under 0.05, a slightly open one (between words, lips apart) 0.1-0.3.
SMILE_AT = 0.4
JAW_OPEN_AT = 0.1
EYEGLASSES_AT = 0.002  # share of the frame labelled eyeglasses (a pair at 256 px covers about 1-3 %)
INFERRED = ('Smiling', 'Mouth_Slightly_Open', 'Eyeglasses')


class AttributeFileError(ValueError):
  """--attributes cannot be read: the message says which line and why."""


@dataclasses.dataclass(frozen=True)
class Labels:
  """40 values 0/1 in CelebA order, which are known, and which of those were inferred."""
  values: Tuple[int, ...]
  known: Tuple[bool, ...]
  inferred: Tuple[str, ...] = ()

  def text(self) -> str:
    """label/<id>.txt: MMVID's comma-separated line, then (only when not all came from a file) a line
    naming what was inferred and what is unknown."""
    line = ','.join(str(v) for v in self.values)
    if all(self.known) and not self.inferred:
      return line + '\n'
    unknown = [name for name, is_known in zip(ATTRIBUTES, self.known) if not is_known]
    return (f'{line}\n# inferred from the video: {" ".join(self.inferred) or "none"}; '
            f'unknown and written 0: {" ".join(unknown) or "none"}\n')


def _value(text: str, where: str) -> int:
  try:
    number = int(float(text))
  except ValueError:
    raise AttributeFileError(f'{where}: attribute value {text!r} is not -1, 0 or 1') from None
  if number not in (-1, 0, 1):
    raise AttributeFileError(f'{where}: attribute value {text!r} is not -1, 0 or 1')
  return 1 if number == 1 else 0


def _canonical(name: str) -> str:
  return name.strip().lower().replace(' ', '_')


_BY_NAME = {_canonical(name): name for name in ATTRIBUTES}


def _columns(names: Sequence[str], where: str) -> List[int]:
  """The CelebA index of each named column; every one of the 40 must be there once."""
  found = []
  for name in names:
    if _canonical(name) not in _BY_NAME:
      raise AttributeFileError(f'{where}: {name!r} is not a CelebA attribute')
    found.append(ATTRIBUTES.index(_BY_NAME[_canonical(name)]))
  missing = sorted(set(range(len(ATTRIBUTES))) - set(found))
  if missing or len(found) != len(set(found)):
    raise AttributeFileError(f'{where}: the header must name each of the 40 CelebA attributes once (missing: '
                             f'{[ATTRIBUTES[i] for i in missing]})')
  return found


def _rows(order: List[int], rows: Iterable[Tuple[int, List[str]]], source: str) -> Dict[str, Tuple[int, ...]]:
  table = {}
  for number, fields in rows:
    where = f'{source} line {number}'
    if len(fields) != len(order) + 1:
      raise AttributeFileError(f'{where}: {len(fields) - 1} values for {len(order)} attributes')
    values = [0] * len(ATTRIBUTES)
    for index, text in zip(order, fields[1:]):
      values[index] = _value(text, where)
    table[fields[0].strip()] = tuple(values)
  return table


def parse_attribute_file(text: str, source: str = '--attributes') -> Dict[str, Tuple[int, ...]]:
  """key -> 40 values 0/1 in CelebA order, from any of the three formats (see the module docstring)."""
  lines = [(number, line) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
  if not lines:
    raise AttributeFileError(f'{source} is empty')
  first = lines[0][1].strip()
  if first.isdigit():  # CelebA list_attr_celeba.txt
    if len(lines) < 2:
      raise AttributeFileError(f'{source}: the attribute-name line after the count is missing')
    order = _columns(lines[1][1].split(), f'{source} line {lines[1][0]}')
    return _rows(order, ((n, line.split()) for n, line in lines[2:]), source)
  fields = next(csv.reader(io.StringIO(first)))
  if len(fields) == len(ATTRIBUTES) + 1 and all(_canonical(f) in _BY_NAME for f in fields[1:]):
    order = _columns(fields[1:], f'{source} line {lines[0][0]}')  # CSV with a header
    return _rows(order, ((n, next(csv.reader(io.StringIO(line)))) for n, line in lines[1:]), source)
  table = {}  # MMVID: key, then the names of the active attributes
  for number, line in lines:
    key, *names = next(csv.reader(io.StringIO(line)))
    values = [0] * len(ATTRIBUTES)
    for name in names:
      if _canonical(name) not in _BY_NAME:
        raise AttributeFileError(f'{source} line {number}: {name!r} is not a CelebA attribute')
      values[ATTRIBUTES.index(_BY_NAME[_canonical(name)])] = 1
    table[key.strip()] = tuple(values)
  return table


def from_file(row: Sequence[int]) -> Labels:
  return Labels(tuple(int(v) for v in row), (True,) * len(ATTRIBUTES))


def infer_attributes(blendshapes: np.ndarray, eyeglasses_share: Optional[np.ndarray] = None) -> Labels:
  """Smiling and Mouth_Slightly_Open from (T, 52) blendshapes (NaN rows: no face), Eyeglasses from the
  per-frame share of eyeglasses pixels in the parsing (NaN where not parsed), or unknown when None (a
  parsing without an eyeglasses class: the offline mesh-based one cannot see glasses). The rest unknown."""
  values = [0] * len(ATTRIBUTES)
  known = [False] * len(ATTRIBUTES)
  inferred = []
  seen = blendshapes[~np.isnan(blendshapes[:, 0])] if len(blendshapes) else blendshapes
  if len(seen):
    smile = float(np.median(seen[:, list(SMILE)].mean(axis=1)))
    jaw = float(np.median(seen[:, JAW_OPEN]))
    for name, value in (('Smiling', smile >= SMILE_AT), ('Mouth_Slightly_Open', jaw >= JAW_OPEN_AT)):
      values[ATTRIBUTES.index(name)] = int(value)
      known[ATTRIBUTES.index(name)] = True
      inferred.append(name)
  if eyeglasses_share is not None:
    parsed = eyeglasses_share[~np.isnan(eyeglasses_share)]
    if len(parsed):
      index = ATTRIBUTES.index('Eyeglasses')
      values[index] = int(float(np.median(parsed)) >= EYEGLASSES_AT)
      known[index] = True
      inferred.append('Eyeglasses')
  return Labels(tuple(values), tuple(known), tuple(inferred))


def lookup(table: Dict[str, Tuple[int, ...]], *keys: str) -> Optional[Tuple[int, ...]]:
  """The first of `keys` (tube id, planned clip id, source id) the attribute file has a row for."""
  for key in keys:
    if key and key in table:
      return table[key]
  return None
