"""templates/metadata.json from the option parser, so the flex template never drifts from the flags.

`python -m beam_pipeline.template_metadata > templates/metadata.json` regenerates it;
a test fails while the checked-in file differs. Flex templates pass every
parameter as `--name=value`, so boolean flags arrive as `--flag=true|false`:
`normalise_flags` turns those back into what argparse expects.
"""
from __future__ import annotations

import argparse
import json
import re
from typing import Dict, List

from beam_pipeline.options import TalkingFaceOptions

NAME = 'Talking-face dataset pipeline'
DESCRIPTION = ('Turns talking-head videos (HDTF annotation folder, manifest or glob on gs://) into WebDataset '
               'shards: download, clip, face crop, MediaPipe landmarks, index, rejects and stats.')
REQUIRED = ('input', 'output')
# Beam/Dataflow options a template user sets per run; they are Beam's own flags, not ours.
BEAM_PARAMETERS = {
    'sdk_container_image': ('Worker image', 'The image built from this repository\'s Dockerfile (same as the '
                            'template image).', r'^[^\s]+$'),
    'dataflow_service_options': ('Dataflow service options', 'e.g. worker_accelerator=type:nvidia-l4;count:1;'
                                 'install-nvidia-driver for one GPU per worker.', r'^[^\s]+$'),
    'number_of_worker_harness_threads': ('Worker harness threads', 'SDK threads per worker process; lower it '
                                         'when clips are large.', r'^[1-9][0-9]*$'),
}
_WORDS = {'fps': 'FPS', 'crf': 'CRF', 'mb': 'MiB', 'x264': 'x264', 'dir': 'directory', 's': '(s)'}
_INT = r'^-?[0-9]+$'
_FLOAT = r'^-?[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)?$'
_BOOL = r'^(true|false)$'
_GCS = r'^gs://[a-z0-9][-_.a-z0-9]{1,220}[a-z0-9](/.*)?$'  # workers read and write through GCS only
_PATHS = {'input': _GCS, 'output': _GCS, 'work_dir': _GCS}


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(allow_abbrev=False)
  TalkingFaceOptions._add_argparse_args(parser)  # pylint: disable=protected-access
  return parser


def _actions() -> List[argparse.Action]:
  return [a for a in _parser()._actions if a.option_strings and a.dest != 'help']  # pylint: disable=protected-access


def _label(name: str) -> str:
  words = [_WORDS.get(w, w) for w in name.split('_')]
  return ' '.join(words)[:1].upper() + ' '.join(words)[1:]


def _regex(action: argparse.Action) -> str:
  if action.dest in _PATHS:
    return _PATHS[action.dest]
  if isinstance(action, argparse._StoreTrueAction) or action.const is True:  # pylint: disable=protected-access
    return _BOOL
  if action.choices:
    return '^(' + '|'.join(re.escape(str(c)) for c in action.choices) + ')$'
  if action.type is int:
    return _INT
  if action.type is float:
    return _FLOAT
  return ''


def parameters() -> List[Dict]:
  """One flex-template parameter per TalkingFaceOptions flag, then the Beam options users set per run."""
  result = []
  for action in _actions():
    entry = {'name': action.dest, 'label': _label(action.dest), 'helpText': action.help,
             'isOptional': action.dest not in REQUIRED}
    regex = _regex(action)
    if regex:
      entry['regexes'] = [regex]
    result.append(entry)
  for name, (label, help_text, regex) in BEAM_PARAMETERS.items():
    result.append({'name': name, 'label': label, 'helpText': help_text, 'isOptional': True, 'regexes': [regex]})
  return result


def metadata() -> Dict:
  return {'name': NAME, 'description': DESCRIPTION, 'parameters': parameters()}


def normalise_flags(argv: List[str]) -> List[str]:
  """`--flag=true` (or `--flag true`) -> `--flag`, `--flag=false` -> nothing, for this pipeline's boolean flags."""
  store_true = argparse._StoreTrueAction  # pylint: disable=protected-access
  booleans = {a.dest for a in _actions() if isinstance(a, store_true)}
  out, rest = [], list(argv)
  while rest:
    arg = rest.pop(0)
    name, equals, value = arg.partition('=')
    if not equals and rest and rest[0].lower() in ('true', 'false'):
      value = rest[0]
    if name.startswith('--') and name[2:] in booleans and value.lower() in ('true', 'false'):
      if not equals:
        rest.pop(0)
      if value.lower() == 'true':
        out.append(name)
      continue
    out.append(arg)
  return out


def main() -> None:
  print(json.dumps(metadata(), indent=2))


if __name__ == '__main__':
  main()
