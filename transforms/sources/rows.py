"""Large manifests in slices, so that their rows are parsed on many workers.

A JSONL or CSV file over the split size becomes byte ranges; a range holds the lines that *start* in it,
so consecutive ranges cover every line once whatever the line lengths. A parquet file becomes runs of row
groups. Nothing here plans a row: `transforms.sources.manifest` does, with the per-row rules of a whole-file
parse. So that each row keeps the number a whole-file parse gives it (`row<N>` ids, `line N` in reject
details), every range is counted first (lines and records, each range on its own) and numbered from the
counts of the ranges before it. A CSV record whose quoted field holds a line break does not fit in one line:
counting finds it (or any error of the csv module), and that file is parsed whole instead, as before.
"""
from __future__ import annotations

import codecs
import csv
import io
import itertools
import json
import re
from typing import Iterable, Iterator, NamedTuple, Optional, Tuple

from apache_beam.io.filesystems import FileSystems

MIB = 1024 * 1024
SPLIT_BYTES = 16 * MIB  # a manifest larger than this is parsed in slices of about this size
MAX_HEADER_BYTES = MIB  # a CSV whose first line is longer stays whole (its header is read to split it)
BLOCK = 1 << 16  # reads while looking for a line end
PARQUET_BATCH = 8192  # rows converted to records at a time
# Piece kinds: whole inputs, then slices of a manifest.
HDTF, VIDEO, ARCHIVE, WHOLE, LINES, CSV, PARQUET = 'hdtf', 'video', 'archive', 'whole', 'lines', 'csv', 'parquet'
_NEWLINES = re.compile(r'\r\n?')


class Piece(NamedTuple):
  """One unit of parse work and where its entries sit in the input (duplicates: the earliest place wins)."""
  kind: str  # HDTF, VIDEO, ARCHIVE, WHOLE (a manifest parsed whole), LINES or CSV (a byte range), PARQUET
  path: str
  file: int  # the file's place in the input's listing (sorted by path)
  size: int = 0  # bytes, as listed
  start: int = 0  # a slice's first byte (LINES, CSV) or row group (PARQUET)
  stop: int = 0  # and the one after its last
  part: int = 0  # the slice's place in its file
  header: Tuple[str, ...] = ()  # CSV: the column names of the file's first record
  first_line: int = 0  # lines of the file before the slice (JSONL details number lines from 1)
  first_row: int = 0  # records of the file before the slice (`row<N>` ids)


class Counted(NamedTuple):
  """What a byte range holds: lines, records, and whether its file must be parsed whole."""
  lines: int
  records: int
  whole: bool


def normalize_newlines(text: str) -> str:
  """CSV line ends as one: mixed \\r\\n, \\r and \\n are all read as \\n."""
  return _NEWLINES.sub('\n', text)


def jsonl_record(line: str, number: int) -> dict:
  """The record of one non-blank JSONL line (line `number` from 1), or an `__error__` record saying why not."""
  try:
    record = json.loads(line)
  except json.JSONDecodeError as error:
    return {'__error__': f'line {number}: {error}'}
  return record if isinstance(record, dict) else {'__error__': f'line {number} is not an object'}


def _open(path: str):
  return FileSystems.open(path, mime_type='application/octet-stream', compression_type='uncompressed')


# ----------------------------------------------------------------------------- splitting

def split_file(piece: Piece, split_bytes: int = SPLIT_BYTES) -> Iterator[Piece]:
  """A manifest over `split_bytes` -> its slices; any other piece, or a file that must stay whole, as it is.

  Opens only what a split needs: a CSV's first line (its header), a parquet footer, the start of a .json
  (a JSON array stays whole).
  """
  if piece.kind != WHOLE or piece.size <= split_bytes:
    yield piece
    return
  lower = piece.path.lower()
  if lower.endswith('.parquet'):
    yield from _row_group_slices(piece, split_bytes)
    return
  header: Tuple[str, ...] = ()
  if lower.endswith('.csv'):
    found = csv_header(piece.path)
    if found is None:
      yield piece
      return
    header = found
  elif lower.endswith('.json') and _starts_array(piece.path):
    yield piece
    return
  kind = CSV if lower.endswith('.csv') else LINES
  for part, start in enumerate(range(0, piece.size, split_bytes)):
    yield piece._replace(kind=kind, start=start, stop=min(start + split_bytes, piece.size), part=part, header=header)


def csv_header(path: str) -> Optional[Tuple[str, ...]]:
  """The column names a CSV's first record gives, or None when its first line is too long to split at."""
  with _open(path) as handle:
    head = handle.read(MAX_HEADER_BYTES)
  end = head.find(b'\n')
  if end < 0:
    return None
  text = normalize_newlines(head[:end + 1].decode('utf-8-sig', errors='replace'))
  try:
    return tuple(next(csv.reader(io.StringIO(text)), []))
  except csv.Error:
    return None


def _starts_array(path: str) -> bool:
  """Whether the text starts with '[' after white space, as the whole-file parse decides."""
  decoder = codecs.getincrementaldecoder('utf-8-sig')(errors='replace')
  with _open(path) as handle:
    while True:
      block = handle.read(BLOCK)
      text = decoder.decode(block, final=not block).lstrip()
      if text or not block:
        return text.startswith('[')


def _row_group_slices(piece: Piece, split_bytes: int) -> Iterator[Piece]:
  """Runs of row groups of about `split_bytes` (uncompressed), numbered from the footer's row counts."""
  import pyarrow.parquet as pq
  try:
    with _open(piece.path) as handle:
      meta = pq.ParquetFile(handle).metadata
  except (OSError, ValueError):  # not parquet, or broken: the whole-file parse says so, as before
    yield piece
    return
  runs, first, first_row, rows, weight = [], 0, 0, 0, 0
  for index in range(meta.num_row_groups):
    group = meta.row_group(index)
    weight += group.total_byte_size
    rows += group.num_rows
    if weight >= split_bytes or index == meta.num_row_groups - 1:
      runs.append((first, index + 1, first_row))
      first, first_row, weight = index + 1, rows, 0
  if len(runs) < 2:
    yield piece
    return
  for part, (start, stop, row) in enumerate(runs):
    yield piece._replace(kind=PARQUET, start=start, stop=stop, part=part, first_row=row)


# ----------------------------------------------------------------------------- reading a byte range

def _line_rest(handle) -> bytes:
  """The bytes up to and including the next newline (or to the end of the file); may read past them."""
  parts = []
  while True:
    block = handle.read(BLOCK)
    if not block:
      return b''.join(parts)
    end = block.find(b'\n')
    if end >= 0:
      parts.append(block[:end + 1])
      return b''.join(parts)
    parts.append(block)


def slice_bytes(piece: Piece) -> bytes:
  """The bytes of the lines that start in [start, stop): a line under way at `start` belongs to the slice
  before, and the line holding byte stop - 1 is read to its end."""
  with _open(piece.path) as handle:
    begin = piece.start
    if begin:
      handle.seek(begin - 1)
      begin += len(_line_rest(handle)) - 1
      if begin >= piece.stop:
        return b''
      handle.seek(begin)
    data = handle.read(piece.stop - begin)
    if data.endswith(b'\n') or len(data) < piece.stop - begin:
      return data
    return data + _line_rest(handle)


def slice_text(piece: Piece) -> str:
  """The slice decoded as the whole file is: UTF-8, bad bytes replaced, a BOM dropped at the file's start.
  Slices begin after a newline, which no multi-byte sequence holds, so decoding apart changes nothing."""
  return slice_bytes(piece).decode('utf-8-sig' if piece.start == 0 else 'utf-8', errors='replace')


def _csv_lines(piece: Piece) -> list:
  return io.StringIO(normalize_newlines(slice_text(piece))).readlines()


# ----------------------------------------------------------------------------- counting and numbering

def count_slice(piece: Piece) -> Tuple[Piece, Optional[Counted]]:
  """A byte-range slice with what it holds; any other piece with None (its rows need no count)."""
  if piece.kind == LINES:
    lines = slice_text(piece).splitlines()
    return piece, Counted(len(lines), sum(1 for line in lines if line.strip()), False)
  if piece.kind != CSV:
    return piece, None
  lines = _csv_lines(piece)
  # One record per line, or a quoted field runs over a line end: a blank line after the last one tells,
  # since a record still open at the slice's end swallows it.
  reader = csv.reader(itertools.chain(lines, ['\n']))
  rows = records = 0
  try:
    if piece.start == 0:
      next(reader)  # the header
      rows = 1
    for fields in reader:
      rows += 1
      records += bool(fields)  # the csv module's blank lines, which DictReader skips
  except csv.Error:  # e.g. a field over the csv module's limit: the whole-file parse stops there, as before
    return piece, Counted(len(lines), 0, True)
  return piece, Counted(len(lines), records, rows != len(lines) + 1)


def number_slices(keyed: Tuple[int, Iterable[Tuple[Piece, Optional[Counted]]]]) -> Iterator[Piece]:
  """The pieces of one file, numbered from the counts of the slices before each; the file as one WHOLE piece
  when a slice cannot be parsed apart."""
  _, counted = keyed
  counted = sorted(counted, key=lambda entry: entry[0].part)
  if any(counts is not None and counts.whole for _, counts in counted):
    first = counted[0][0]
    yield Piece(WHOLE, first.path, first.file, first.size)
    return
  lines = rows = 0
  for piece, counts in counted:
    if counts is None:
      yield piece
      continue
    yield piece._replace(first_line=lines, first_row=rows)
    lines += counts.lines
    rows += counts.records


# ----------------------------------------------------------------------------- records of a slice

def slice_records(piece: Piece) -> Iterator[Tuple[int, dict]]:
  """(row number in the file, record) for each record of a numbered slice, as a whole-file parse gives them."""
  row = piece.first_row
  if piece.kind == PARQUET:
    import pyarrow.parquet as pq
    with _open(piece.path) as handle:
      batches = pq.ParquetFile(handle).iter_batches(batch_size=PARQUET_BATCH,
                                                    row_groups=list(range(piece.start, piece.stop)))
      for batch in batches:
        for record in batch.to_pylist():
          yield row, record
          row += 1
    return
  if piece.kind == CSV:
    reader = csv.DictReader(_csv_lines(piece), fieldnames=None if piece.start == 0 else list(piece.header))
    for record in reader:
      yield row, record
      row += 1
    return
  for number, line in enumerate(slice_text(piece).splitlines(), piece.first_line + 1):
    if line.strip():
      yield row, jsonl_record(line, number)
      row += 1
