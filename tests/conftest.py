"""Shared fixtures: generated talking clips, the loopback media server, offline models."""
from __future__ import annotations

import os

import pytest

from apache_beam.options.pipeline_options import StandardOptions

from beam_pipeline.__main__ import LOCAL_RUNNER
from beam_pipeline.demo import VideoSpec, write_video
from tests.helpers import REPO, media_server

# TestPipeline() without a runner takes Beam's default, DirectRunner, which first tries to download the
# Prism runner binary: tests make no outside traffic, so they run on the same local runner as the CLI.
StandardOptions.DEFAULT_RUNNER = LOCAL_RUNNER

SHARED_MODELS = os.path.join(os.path.dirname(REPO), 'shared', 'models')
if not os.environ.get('BEAM_PIPELINE_MODEL_DIR') and os.path.isdir(SHARED_MODELS):
  os.environ['BEAM_PIPELINE_MODEL_DIR'] = SHARED_MODELS


@pytest.fixture(scope='session')
def media_dir(tmp_path_factory):
  """Generated sources: a talking head, one without a face, one without audio."""
  root = tmp_path_factory.mktemp('media')
  write_video(str(root / 'talking.mp4'), VideoSpec(duration=8.0))
  write_video(str(root / 'talking_hd.mp4'), VideoSpec(duration=4.0, width=1280, height=720, fps=25.0,
                                                      face_scale=1.4, seed=3))
  write_video(str(root / 'noface.mp4'), VideoSpec(duration=4.0, face=False, seed=1))
  write_video(str(root / 'silent.mp4'), VideoSpec(duration=4.0, audio=False, seed=2))
  return root


@pytest.fixture(scope='session')
def server(media_dir):
  with media_server(str(media_dir)) as url:
    yield url
