"""Captions from CelebA attributes with MMVID's probabilistic grammar (mm_vox_celeb/pcfg.py), for `mmvox`.

The grammar, as MMVID generates Multimodal VoxCeleb's txt/<id>.txt:
  Sentence -> Phrase+         one phrase per bucket of up to three attributes ("x", "x and y", "x, y and z")
  Phrase   -> NP VP "."
  NP       -> PN | Det Gender  (PN "he" / "she"; Det "a" / "this"; Gender "man" / "male" / "woman" / "female"
                                3 in 4, else "person"; the first phrase takes PN half the time, later ones 85%)
  VP       -> "is" IsAttrs | "has" HasAttrs | ("wears" | "is wearing") WearAttrs
Attributes go to their bucket by verb (e.g. Eyeglasses: wear, Smiling: is, Bangs: has); "No_" attributes
are negated ("No_Beard" = 0 reads "has beard"); Male picks the pronoun and nouns and Mouth_Slightly_Open is
never said. The buckets are drawn once per id (weighted by what is left in each) and the 20 sentences
differ in their subjects and verbs.

Two additions, both where MMVID has no answer: an attribute that is unknown (not in the labels, see
attributes.py) is never said, also not through its negation, and a subject whose sex is unknown
is "a person" / "this person"; where no attribute is sayable the sentence is "<NP> is talking." (MMVID would
write an empty line, which its loader skips, so the clip would never be drawn).

The random draws come from one `random.Random` seeded from a SHA-256 of the id (not Python's salted
`hash`), so a rerun writes the same text.
"""
from __future__ import annotations

import hashlib
import random
from typing import Dict, List, Optional, Sequence, Tuple

from beam_pipeline.recipes.mmvox.attributes import ATTRIBUTES

NUM_CAPTIONS = 20

VERB = {
    '5_o_Clock_Shadow': 'has', 'Arched_Eyebrows': 'has', 'Attractive': 'is', 'Bags_Under_Eyes': 'has',
    'Bald': 'is', 'Bangs': 'has', 'Big_Lips': 'has', 'Big_Nose': 'has', 'Black_Hair': 'has',
    'Blond_Hair': 'has', 'Blurry': 'is', 'Brown_Hair': 'has', 'Bushy_Eyebrows': 'has', 'Chubby': 'is',
    'Double_Chin': 'has', 'Eyeglasses': 'wear', 'Goatee': 'wear', 'Gray_Hair': 'has', 'Heavy_Makeup': 'has',
    'High_Cheekbones': 'has', 'Male': 'is', 'Mouth_Slightly_Open': 'na', 'Mustache': 'has',
    'Narrow_Eyes': 'has', 'No_Beard': 'has', 'Oval_Face': 'has', 'Pale_Skin': 'has', 'Pointy_Nose': 'has',
    'Receding_Hairline': 'has', 'Rosy_Cheeks': 'has', 'Sideburns': 'has', 'Smiling': 'is',
    'Straight_Hair': 'has', 'Wavy_Hair': 'has', 'Wearing_Earrings': 'wear', 'Wearing_Hat': 'wear',
    'Wearing_Lipstick': 'wear', 'Wearing_Necklace': 'wear', 'Wearing_Necktie': 'wear', 'Young': 'is',
}
BUCKETS = ('wear', 'has', 'is')
PAIR_P, TRIPLE_P = 0.9, 0.85  # chance a bucket takes a second, then a third attribute (merge_and_pop)
FIRST_PRONOUN_P, LATER_PRONOUN_P = 0.5, 0.85
GENDERED_NOUN_P = 0.75
DETERMINERS = ('a', 'this')
NOUNS = {True: ('male', 'man'), False: ('female', 'woman')}
WEAR_VERBS = ('wears', 'is wearing')


def phrase_name(attribute: str) -> str:
  """MMVID's NAME: 'No_Beard' -> 'beard', 'Wearing_Hat' -> 'hat', '5_o_Clock_Shadow' -> "5 o'clock shadow"."""
  if attribute == '5_o_Clock_Shadow':
    return "5 o'clock shadow"
  return attribute.replace('No_', '').replace('Wearing_', '').replace('_', ' ').lower()


def seed_of(key: str) -> int:
  return int.from_bytes(hashlib.sha256(key.encode('utf-8')).digest()[:8], 'big')


def sayable(labels: Sequence[int], known: Sequence[bool]) -> List[str]:
  """Attributes a caption may state: known, and active after negating the `No_` ones."""
  said = []
  for name, value, is_known in zip(ATTRIBUTES, labels, known):
    if not is_known or VERB[name] == 'na' or name == 'Male':
      continue
    if bool(value) != name.startswith('No_'):
      said.append(name)
  return said


def _merge_and_pop(names: List[str], rng: random.Random) -> str:
  taken = [names.pop(0)]
  if names and rng.random() < PAIR_P:
    taken.append(names.pop(0))
  if names and rng.random() < TRIPLE_P:
    taken.append(names.pop(0))
  if len(taken) == 1:
    return taken[0]
  return ', '.join(taken[:-1]) + ' and ' + taken[-1]


def buckets(said: Sequence[str], rng: random.Random) -> List[Tuple[str, str]]:
  """(verb bucket, attribute phrase) in sentence order: attributes shuffled, then each phrase drawn from a
  bucket with probability proportional to what the bucket has left."""
  order = list(said)
  rng.shuffle(order)
  left: Dict[str, List[str]] = {verb: [phrase_name(a) for a in order if VERB[a] == verb] for verb in BUCKETS}
  phrases = []
  while any(left.values()):
    verb = rng.choices(BUCKETS, weights=[len(left[v]) for v in BUCKETS])[0]
    phrases.append((verb, _merge_and_pop(left[verb], rng)))
  return phrases


def noun_phrase(male: Optional[bool], pronoun_p: float, rng: random.Random) -> str:
  """NP -> PN | Det Gender; a subject of unknown sex is always Det "person"."""
  if male is not None and rng.random() <= pronoun_p:
    return 'he' if male else 'she'
  determiner = rng.choice(DETERMINERS)
  if male is not None and rng.random() < GENDERED_NOUN_P:
    return f'{determiner} {rng.choice(NOUNS[male])}'
  return f'{determiner} person'


def verb_phrase(subject: str, bucket: str, attributes: str, rng: random.Random) -> str:
  verb = {'is': 'is', 'has': 'has'}.get(bucket) or rng.choice(WEAR_VERBS)
  sentence = f'{subject} {verb} {attributes}'
  return sentence[0].upper() + sentence[1:] + '.'


def captions(key: str, labels: Sequence[int], known: Sequence[bool], count: int = NUM_CAPTIONS) -> List[str]:
  """`count` captions for `key` from its 40 CelebA labels (0/1) and which of them are known."""
  rng = random.Random(seed_of(key))
  male_index = ATTRIBUTES.index('Male')
  male = bool(labels[male_index]) if known[male_index] else None
  phrases = buckets(sayable(labels, known), rng)
  sentences = []
  for _ in range(count):
    if not phrases:
      sentences.append(verb_phrase(noun_phrase(male, FIRST_PRONOUN_P, rng), 'is', 'talking', rng))
      continue
    words = [verb_phrase(noun_phrase(male, FIRST_PRONOUN_P if i == 0 else LATER_PRONOUN_P, rng), bucket, said, rng)
             for i, (bucket, said) in enumerate(phrases)]
    sentences.append(' '.join(words))
  return sentences
