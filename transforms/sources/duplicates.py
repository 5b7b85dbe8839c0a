"""Clip ids planned twice, found across entries parsed apart: the earliest entry keeps the id, every later one
is rejected `duplicate_id`, as a sequential parse of the input decides.

An entry's position (the file's place in the input, then the row, then the item within the row) orders
entries as a parse from the first file to the last would meet them. Duplicates are found by a shuffle keyed
by clip id whose values are small: position, the clip's place in its source, the source id, and a source of
one clip (most of them) packed, so that this shuffle alone settles it. A source of several clips is rebuilt
without the clips it lost by a join keyed by its position. No worker holds every id, and the outcome depends
on positions only, never on bundle order. Sources cross both shuffles as plain tuples, which Beam's coder
writes natively (a dataclass goes through pickle: about 5x the time and 3x the bytes).
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Iterator, Tuple

import apache_beam as beam

from transforms.core.elements import ClipSpec, Reject, Source

STAGE = 'manifest'
DUPLICATE = 'an earlier entry already plans this clip id'
_SOURCE_FIELDS = tuple(field.name for field in dataclasses.fields(Source))
_CLIP_FIELDS = tuple(field.name for field in dataclasses.fields(ClipSpec))
_CLIPS, _CLIP_ID = _SOURCE_FIELDS.index('clips'), _CLIP_FIELDS.index('clip_id')
_source_values, _clip_values = operator.attrgetter(*_SOURCE_FIELDS), operator.attrgetter(*_CLIP_FIELDS)

Position = Tuple[int, ...]


def pack_source(source: Source) -> tuple:
  """A Source as the tuple of its fields in order, each clip the tuple of its own."""
  values = _source_values(source)
  return values[:_CLIPS] + (tuple(map(_clip_values, source.clips)),) + values[_CLIPS + 1:]


def unpack_source(packed: tuple) -> Source:
  return Source(*packed[:_CLIPS], tuple(ClipSpec(*clip) for clip in packed[_CLIPS]), *packed[_CLIPS + 1:])


def _claims(positioned: Tuple[Position, Source]):
  """(clip id, claim) for each clip: (position, place in the source, source id, the packed source when it has
  one clip, so that the claims alone settle it); a source of several clips also goes to the join, packed."""
  position, source = positioned
  single = len(source.clips) == 1
  packed = pack_source(source)
  for place, clip in enumerate(source.clips):
    yield clip.clip_id, (position, place, source.source_id, packed if single else None)
  if not single:
    yield beam.pvalue.TaggedOutput('held', (position, packed))


def _settle(keyed):
  """The earliest claim on a clip id keeps it: a one-clip source that wins goes on; every later claim is a
  duplicate_id reject, and drops the clip from its source (one of several clips) at the join."""
  clip_id, claims = keyed
  claims = sorted(claims, key=lambda claim: claim[:2])
  if claims[0][3] is not None:
    yield claims[0][3]
  for position, _, source_id, packed in claims[1:]:
    yield beam.pvalue.TaggedOutput('rejects', Reject(clip_id, STAGE, 'duplicate_id', DUPLICATE, source_id))
    if packed is None:
      yield beam.pvalue.TaggedOutput('dropped', (position, clip_id))


def _kept(joined) -> Iterator[tuple]:
  """A source of several clips (packed) with the clips it lost left out; none when it lost them all."""
  _, grouped = joined
  dropped = set(grouped['dropped'])
  for packed in (packed for tag, values in grouped.items() if tag != 'dropped' for packed in values):
    clips = tuple(clip for clip in packed[_CLIPS] if clip[_CLIP_ID] not in dropped)
    if clips:
      yield packed[:_CLIPS] + (clips,) + packed[_CLIPS + 1:]


class DropDuplicateClips(beam.PTransform):
  """(position, Source), or a tuple of such PCollections -> {'sources': Sources without the clips an earlier
  entry plans, 'rejects': a duplicate_id Reject for each of those}.

  A source of one clip (a row without `clips`, a globbed video) is settled by the claims shuffle alone; only
  sources of several clips meet the clips they lost at the join. Both stay packed until they are flattened.
  """

  def expand(self, inputs):
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    claimed = [part | f'ClaimClips{number}' >> beam.FlatMap(_claims).with_outputs('held', main='claims')
               for number, part in enumerate(inputs)]
    settled = (tuple(claims.claims for claims in claimed)
               | 'Claims' >> beam.Flatten()
               | 'GroupClaims' >> beam.GroupByKey()
               | 'Settle' >> beam.FlatMap(_settle).with_outputs('rejects', 'dropped', main='single'))
    held = {f'source{number}': claims.held for number, claims in enumerate(claimed)}
    kept = (dict(held, dropped=settled.dropped)
            | 'JoinDropped' >> beam.CoGroupByKey()
            | 'Rebuild' >> beam.FlatMap(_kept))
    sources = (settled.single, kept) | 'Kept' >> beam.Flatten() | 'Unpack' >> beam.Map(unpack_source)
    return {'sources': sources, 'rejects': settled.rejects}
