"""What a recipe may change in the shared pipeline, and nothing more."""
from __future__ import annotations

from typing import Any, Dict, List, Optional

import apache_beam as beam
from apache_beam.ml.inference.base import ModelHandler

from transforms.writers.folders import PUBLISHED, folder_files


class Recipe:
  """One dataset pipeline on the shared spine.

  - `defaults`: option values this recipe uses unless the user set the flag (e.g. its frame rate).
  - `analyzers`: per-frame models and frame writers added to the render pass after the face landmarker
    (transforms/frame_analysis.py); they see each frame once, with what earlier analyzers found on it.
  - `tracker`: a PTransform that replaces the spine's face detection and tracking (ClipTask -> ClipTasks
    with their crop windows, under 'tasks', and Rejects under 'rejects'), or None to keep the spine's.
  - `subjects`: True when a subject (source video) is one unit (transforms/subject_window.py): the `tracker`
    gets every task, those whose window is given too, and gives a subject's clips one window; its clips are
    written only when none failed in a way a later run retries.
  - `write`: the kept clips (transforms/filters.Analysis) -> {'records': index record dicts with at least
    'id', 'planned_id', 'num_frames' and 'inputs', 'rejects': Rejects}. Every kept clip must end in one of the two.
  - `unit_files`: a folder unit's files (transforms/writers/folders.py), what a rerun deletes when it retires it.
  - `after_output`: steps that sum up the whole output, once every unit of the run is published or retired.
  - `scratch_folders`: the output's folders where its writers leave `*.partial` files mid-write, swept at launch
    when a killed attempt left them.
  """

  name = ''
  layout = 'shards'  # what `write` makes: 'shards' (WebDataset tars) or 'folders' (transforms/writers/folders.py)
  subjects = False
  silent: str = ''  # why the recipe cannot use a source without audio ('': --allow_silent keeps such clips)
  scratch_folders = (PUBLISHED,)  # a folder unit's index is written beside its scratch copy
  defaults: Dict[str, Any] = {}

  def analyzers(self, opts, landmarker: ModelHandler) -> List:
    return []

  def tracker(self, opts, detector: ModelHandler) -> Optional[beam.PTransform]:
    return None

  def write(self, kept: beam.PCollection, opts, work_dir: str) -> Dict[str, beam.PCollection]:
    raise NotImplementedError

  def unit_files(self, output: str, records: List[dict]) -> List[str]:
    """The files of the published unit `records` are of, the one a trainer lists first, first: here a folder
    of its own (a subject's)."""
    return folder_files(output, records)

  def after_output(self, settled: beam.PCollection, opts) -> None:
    """`settled`: one element, once the run's writers and retirements are done. Nothing to add here."""

  def output_layout(self, opts) -> str:
    """What this run's `write` makes; `--layout=files` is hdtf's alone, a one-line error elsewhere."""
    if opts.layout != 'shards':
      raise SystemExit(f'--layout={opts.layout} is for --recipe=hdtf; the {self.name} recipe writes {self.layout}')
    return self.layout


def explicit_flags(argv) -> set:
  """Option names the command line sets (`--fps 30`, `--fps=30`, `--eye_motion`)."""
  names = set()
  for token in argv or ():
    if token.startswith('--'):
      names.add(token[2:].split('=', 1)[0].replace('-', '_'))
  return names


def apply_defaults(recipe: Recipe, opts, argv) -> Dict[str, Any]:
  """Set the recipe's defaults on `opts` for the flags the user did not give; returns what was set."""
  given = explicit_flags(argv)
  applied = {name: value for name, value in recipe.defaults.items() if name not in given}
  for name, value in applied.items():
    setattr(opts, name, value)
  return applied
