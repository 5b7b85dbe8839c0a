"""The dataset pipelines this job reproduces, one folder each (hdtf: a module): `--recipe=<name>` picks one.

A recipe adds stages and a writer to the shared spine (`beam_pipeline.pipeline.build_pipeline`); it never
copies it. Modules are imported when chosen, so a recipe's heavy dependencies load only for its jobs.
"""
from __future__ import annotations

import importlib

from beam_pipeline.recipes.base import Recipe

NAMES = ('hdtf', 'nerf', 'avatar', 'megactor', 'mmvox')


def get_recipe(name: str) -> Recipe:
  if name not in NAMES:
    raise ValueError(f'unknown recipe {name!r}; one of {", ".join(NAMES)}')
  return importlib.import_module(f'beam_pipeline.recipes.{name}').RECIPE
