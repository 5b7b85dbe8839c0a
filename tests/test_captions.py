"""MMVID's caption grammar: deterministic per id, only active (and known) attributes, every rule used."""
import random
import re

from beam_pipeline.recipes.mmvox.attributes import ATTRIBUTES
from beam_pipeline.recipes.mmvox.captions import VERB, captions, phrase_name, sayable, seed_of

ALL_KNOWN = (True,) * len(ATTRIBUTES)


def _labels(*active):
  return tuple(int(name in active) for name in ATTRIBUTES)


def test_the_same_id_gives_the_same_captions_and_ids_differ():
  labels = _labels('Male', 'Eyeglasses', 'Smiling', 'Bangs', 'Young', 'Wearing_Hat')
  first = captions('id10001_abc_0', labels, ALL_KNOWN)
  assert first == captions('id10001_abc_0', labels, ALL_KNOWN)
  assert len(first) == 20 and all(line.endswith('.') for line in first)
  assert first != captions('id10001_abc_1', labels, ALL_KNOWN)
  assert seed_of('x') == 0x2d711642b726b044  # SHA-256, not Python's per-process salted hash


def test_only_active_attributes_are_said():
  rng = random.Random(3)
  for n in range(200):
    active = {name for name in ATTRIBUTES if rng.random() < 0.25}
    text = ' '.join(captions(f'id{n}', _labels(*active), ALL_KNOWN)).lower()
    said = set(sayable(_labels(*active), ALL_KNOWN))
    for name in ATTRIBUTES:
      if VERB[name] == 'na' or name == 'Male':
        continue
      phrase = phrase_name(name)
      # "beard" is said when No_Beard is NOT active; every other name when it is.
      assert (name in said) == (name.startswith('No_') != (name in active))
      if name not in said and not any(phrase in phrase_name(other) for other in said if other != name):
        assert not re.search(rf'\b{re.escape(phrase)}\b', text), (name, text)
    assert 'mouth slightly open' not in text


def test_unknown_attributes_and_sex_are_never_said():
  known = tuple(name in ('Smiling', 'No_Beard') for name in ATTRIBUTES)
  labels = _labels('Smiling', 'Male', 'Eyeglasses')  # Male and Eyeglasses are not known: not said
  text = captions('tube', labels, known)
  sentences = {sentence for line in text for sentence in re.findall(r'[A-Z][^.]*\.', line)}
  assert sentences <= {'A person is smiling.', 'This person is smiling.', 'A person has beard.',
                       'This person has beard.'}
  joined = ' '.join(text).lower()
  assert 'eyeglasses' not in joined and not re.search(r'\b(he|she|man|woman|male|female)\b', joined)
  assert 'smiling' in joined and 'beard' in joined
  # Nothing sayable: "<subject> is talking." rather than an empty line the loader would skip.
  assert set(captions('tube', _labels(), (False,) * len(ATTRIBUTES))) <= {'A person is talking.',
                                                                          'This person is talking.'}


def test_every_rule_of_the_grammar_is_used_over_many_ids():
  rng = random.Random(0)
  seen = set()
  for n in range(300):
    active = {name for name in ATTRIBUTES if rng.random() < 0.3}
    for line in captions(f'clip{n}', _labels(*active), ALL_KNOWN):
      for sentence in re.findall(r'[A-Z][^.]*\.', line):
        subject = re.match(r'(He|She|A|This) ?(male|man|female|woman|person)?', sentence)
        seen.add(('NP', subject.group(1).lower(), subject.group(2)))
        verb = re.match(r'\S+(?: \S+)? (is wearing|wears|is|has) ', sentence)
        seen.add(('VP', verb.group(1)))
        body = sentence[verb.end():-1]
        seen.add(('list', 3 if ', ' in body else 2 if ' and ' in body else 1))
  noun_phrases = {('NP', 'he', None), ('NP', 'she', None)} | {
      ('NP', det, noun) for det in ('a', 'this') for noun in ('male', 'man', 'female', 'woman', 'person')}
  assert noun_phrases <= seen
  assert {('VP', 'is'), ('VP', 'has'), ('VP', 'wears'), ('VP', 'is wearing')} <= seen
  assert {('list', 1), ('list', 2), ('list', 3)} <= seen


def test_pronouns_follow_the_male_label():
  man = ' '.join(captions('m', _labels('Male', 'Smiling', 'Bangs', 'Eyeglasses'), ALL_KNOWN)).lower()
  woman = ' '.join(captions('w', _labels('Smiling', 'Bangs', 'Eyeglasses'), ALL_KNOWN)).lower()
  assert not re.search(r'\b(she|woman|female)\b', man)
  assert not re.search(r'\b(he|man|male)\b', woman)
