"""The 40 CelebA attributes of a face tube (Multimodal VoxCeleb's label/<key>.txt), for `--recipe=mmvox`.

From a user-supplied attribute file (`--attributes`), one row per key; a tube takes the row of its MMVID key
(as MMVID's own annotation names tubes), else of its id, else of the planned clip it was cut from, else of
its source (annotating a video once covers every tube).
Three formats, told apart by their first line:
  - CelebA's list_attr_celeba.txt: a count line, a line of the 40 names, then `<key> v1 ... v40` with
    values -1/1 (or 0/1), whitespace-separated;
  - CSV with a header whose first column is the key (`id`, `image_id`...) and the other columns the 40
    names in any order (Kaggle's list_attr_celeba.csv), values -1/1 or 0/1;
  - MMVID's parsed annotation (face-attributes-2_parse_json.txt): `<key>,<Attribute name>,...` naming the
    active attributes ("Mouth Slightly Open" or "Mouth_Slightly_Open"), every other attribute 0.

The file is read on the workers, row by row (`AttributeFormat`: its header is read where the job is built,
and the whole file checked there, so a bad one fails before any work with the line named).

Without a row, what can be seen is inferred (the median over the tube's frames with a face, or its parsed
frames): Smiling (mouthSmileLeft/Right), Mouth_Slightly_Open (jawOpen), the hair colour (Black, Blond,
Brown or Gray from the CIELAB colour of the parsed hair pixels, when enough hair shows), and Eyeglasses,
Wearing_Earrings and Wearing_Hat (their face-parsing classes; only where the parsing model has them, see
`infer_attributes`). The rest are unknown: written 0, as MMVID's loader reads absent; which were inferred
and which are unknown goes in a sidecar beside the one-line label file (writer.py).
"""
from __future__ import annotations

import csv
import dataclasses
import io
from typing import Dict, Optional, Sequence, Tuple

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
# Shares of the frame a BiSeNet class must cover (median over the parsed frames): a pair of glasses at 256 px
# covers about 1-3 %, an earring a few dozen pixels, a hat the top of the head.
PARSED_AT = {'Eyeglasses': 0.002, 'Wearing_Earrings': 0.0003, 'Wearing_Hat': 0.02}
# Hair colour, from the median CIELAB colour (L 0-100) of the hair pixels, said only when hair covers at
# least HAIR_SHOWN of the frame: black is dark; gray is light and colourless; blond light and yellow; the
# rest brown. Black-and-white footage has no colour: dark hair reads black, lighter hair gray.
HAIR_SHOWN = 0.03
BLACK_BELOW_L = 27.0
GRAY_BELOW_CHROMA = 7.0
GRAY_FROM_L = 40.0
BLOND_FROM_L, BLOND_FROM_B = 45.0, 14.0
HAIR_COLOURS = ('Black_Hair', 'Blond_Hair', 'Brown_Hair', 'Gray_Hair')


class AttributeFileError(ValueError):
  """--attributes cannot be read: the message says which line and why."""


@dataclasses.dataclass(frozen=True)
class Labels:
  """40 values 0/1 in CelebA order, which are known, and which of those were inferred."""
  values: Tuple[int, ...]
  known: Tuple[bool, ...]
  inferred: Tuple[str, ...] = ()

  def text(self) -> str:
    """label/<key>.txt: MMVID's one comma-separated line (make_label.py writes no newline after it)."""
    return ','.join(str(v) for v in self.values)

  def flags(self) -> dict:
    """The sidecar beside the label file: which values were inferred from the video, which are unknown."""
    return {'inferred': list(self.inferred),
            'unknown': [name for name, is_known in zip(ATTRIBUTES, self.known) if not is_known]}


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


def _columns(names: Sequence[str], where: str) -> Tuple[int, ...]:
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
  return tuple(found)


@dataclasses.dataclass(frozen=True)
class AttributeFormat:
  """How an attribute file's rows read, from its first lines: after `header_lines` lines, CelebA's
  whitespace-separated `<key> v1 ... v40` or a CSV row, values in `order` (CelebA index of each column), or
  MMVID's `<key>,<Active Name>,...` (kind `mmvid`, no header)."""
  kind: str  # celeba | csv | mmvid
  order: Tuple[int, ...] = ()
  header_lines: int = 0


def attribute_format(lines: Sequence[str], source: str = '--attributes') -> AttributeFormat:
  """The format of a file whose first lines (a few are enough) are `lines`."""
  numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
  if not numbered:
    raise AttributeFileError(f'{source} is empty')
  number, first = numbered[0][0], numbered[0][1].replace('\ufeff', '').strip()
  if first.isdigit():  # CelebA list_attr_celeba.txt: a count, then the names
    if len(numbered) < 2:
      raise AttributeFileError(f'{source}: the attribute-name line after the count is missing')
    names_at, names = numbered[1]
    return AttributeFormat('celeba', _columns(names.split(), f'{source} line {names_at}'), names_at)
  fields = next(csv.reader(io.StringIO(first)))
  if len(fields) == len(ATTRIBUTES) + 1 and all(_canonical(f) in _BY_NAME for f in fields[1:]):
    return AttributeFormat('csv', _columns(fields[1:], f'{source} line {number}'), number)
  return AttributeFormat('mmvid')


def parse_row(line: str, layout: AttributeFormat, where: str) -> Optional[Tuple[str, str]]:
  """(key, the 40 values as a string of '0'/'1' in CelebA order: compact in a side input) of one row of the
  file; None for a blank line."""
  line = line.replace('\ufeff', '').strip()
  if not line:
    return None
  values = ['0'] * len(ATTRIBUTES)
  if layout.kind == 'mmvid':
    key, *names = next(csv.reader(io.StringIO(line)))
    for name in names:
      if _canonical(name) not in _BY_NAME:
        raise AttributeFileError(f'{where}: {name!r} is not a CelebA attribute')
      values[ATTRIBUTES.index(_BY_NAME[_canonical(name)])] = '1'
    return key.strip(), ''.join(values)
  fields = line.split() if layout.kind == 'celeba' else next(csv.reader(io.StringIO(line)))
  if len(fields) != len(layout.order) + 1:
    raise AttributeFileError(f'{where}: {len(fields) - 1} values for {len(layout.order)} attributes')
  for index, text in zip(layout.order, fields[1:]):
    values[index] = str(_value(text, where))
  return fields[0].strip(), ''.join(values)


def parse_attribute_file(text: str, source: str = '--attributes') -> Dict[str, str]:
  """key -> 40 values ('0'/'1' characters in CelebA order) of a whole file, any of the three formats."""
  lines = text.splitlines()
  layout = attribute_format(lines[:64], source)
  table = {}
  for number, line in enumerate(lines[layout.header_lines:], layout.header_lines + 1):
    row = parse_row(line, layout, f'{source} line {number}')
    if row is not None:
      table[row[0]] = row[1]
  return table


def from_file(row: str) -> Labels:
  return Labels(tuple(int(v) for v in row), (True,) * len(ATTRIBUTES))


def hair_colour(lab: Sequence[float]) -> str:
  """The CelebA hair colour of a median CIELAB (L 0-100, a, b) hair colour."""
  lightness, a, b = lab
  chroma = float(np.hypot(a, b))
  if lightness < BLACK_BELOW_L:
    return 'Black_Hair'
  if chroma < GRAY_BELOW_CHROMA and lightness >= GRAY_FROM_L:
    return 'Gray_Hair'
  if lightness >= BLOND_FROM_L and b >= BLOND_FROM_B:
    return 'Blond_Hair'
  return 'Brown_Hair'


def _median_rows(values: Optional[np.ndarray]) -> Optional[np.ndarray]:
  """Per-column median over the rows without NaN (frames with a face, or parsed); None when there are none."""
  if values is None or not len(values):
    return None
  values = np.asarray(values, np.float64).reshape(len(values), -1)
  seen = values[~np.isnan(values).any(axis=1)]
  return np.median(seen, axis=0) if len(seen) else None


def infer_attributes(blendshapes: np.ndarray, hair: Optional[np.ndarray] = None,
                     parsed: Optional[Dict[str, np.ndarray]] = None) -> Labels:
  """What the video shows, the rest unknown. Smiling and Mouth_Slightly_Open from (T, 52) blendshapes (NaN
  rows: no face); the hair colour from (T, 4) rows of hair share and median CIELAB of its pixels (NaN where
  not parsed); Eyeglasses, Wearing_Earrings and Wearing_Hat from `parsed`, each a per-frame share of its class
  (NaN where not parsed), or None when the parsing has no such classes (the offline mesh-based one)."""
  values = [0] * len(ATTRIBUTES)
  known = [False] * len(ATTRIBUTES)
  inferred = []

  def say(name: str, value: bool) -> None:
    values[ATTRIBUTES.index(name)] = int(value)
    known[ATTRIBUTES.index(name)] = True
    inferred.append(name)

  face = _median_rows(blendshapes)
  if face is not None:
    say('Smiling', float(np.mean(face[list(SMILE)])) >= SMILE_AT)
    say('Mouth_Slightly_Open', float(face[JAW_OPEN]) >= JAW_OPEN_AT)
  share, colour = _median_rows(None if hair is None else hair[:, :1]), _median_rows(hair)
  if share is not None and share[0] >= HAIR_SHOWN and colour is not None:
    for name in HAIR_COLOURS:
      say(name, name == hair_colour(colour[1:]))
  for name, shares in sorted((parsed or {}).items(), key=lambda item: ATTRIBUTES.index(item[0])):
    share = _median_rows(shares)
    if share is not None:
      say(name, float(share[0]) >= PARSED_AT[name])
  return Labels(tuple(values), tuple(known), tuple(inferred))


def lookup(table: Dict[str, str], *keys: str) -> Optional[str]:
  """The first of `keys` (MMVID key, tube id, planned clip id, source id) the attribute file has a row for."""
  for key in keys:
    if key and key in table:
      return table[key]
  return None
