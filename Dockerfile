# One image, two roles (templates/README.md):
#  - the Dataflow / Flink SDK worker (--sdk_container_image / --environment_config): Beam's boot is the entrypoint;
#  - the flex-template launcher: Dataflow runs /opt/google/dataflow/python_template_launcher in the same image,
#    which runs FLEX_TEMPLATE_PYTHON_PY_FILE with the template parameters.
# CUDA runtime for the GPU model handlers: the default `gpu` extra brings torch's CUDA build (PyPI's Linux wheel),
# onnxruntime-gpu and every recipe's model libraries; MediaPipe runs on the CPU in either case.
# Every base is pinned. The Python version must match the Beam SDK image (3.11).

ARG BEAM_VERSION=2.77.0

FROM apache/beam_python3.11_sdk:${BEAM_VERSION} AS beam_sdk
FROM gcr.io/dataflow-templates-base/python311-template-launcher-base:flex_templates_base_image_release_20240628_RC00 AS template_launcher
FROM ghcr.io/astral-sh/uv:0.8.17 AS uv

FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu22.04

ARG BEAM_VERSION
# The project's extras: `gpu` carries every handler's GPU runtime. EXTRAS="" builds a CPU-only image for hdtf.
ARG EXTRAS=gpu
ARG PYTHON_VERSION=3.11.13

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Shared libraries OpenCV and MediaPipe load at import (GL, GLib), and CA certificates for https downloads.
# hadolint ignore=DL3008
RUN apt-get update \
  && apt-get install -y --no-install-recommends ca-certificates libgl1 libglib2.0-0 libegl1 libgles2 \
  && rm -rf /var/lib/apt/lists/*

# A standalone CPython of the SDK's minor version, and a virtual environment the SDK harness runs in directly.
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT=1
RUN uv python install "${PYTHON_VERSION}" \
  && uv venv --seed --python "${PYTHON_VERSION}" /opt/venv

WORKDIR /template
COPY setup.py ./
COPY beam_pipeline ./beam_pipeline
COPY transforms ./transforms
COPY model_handlers ./model_handlers
RUN uv pip install --no-cache "/template${EXTRAS:+[$EXTRAS]}" \
  && python -c "import apache_beam, mediapipe, av; assert apache_beam.__version__ == '${BEAM_VERSION}'" \
  && python -m model_handlers.devices

# Model files from their official addresses; the registry checks each sha256 and fails the build on a mismatch.
ENV BEAM_PIPELINE_CACHE=/opt/models
RUN python -m model_handlers.registry
ENV BEAM_PIPELINE_MODEL_DIR=/opt/models

# Worker role.
COPY --from=beam_sdk /opt/apache/beam /opt/apache/beam
# Launcher role.
COPY --from=template_launcher /opt/google/dataflow/python_template_launcher /opt/google/dataflow/python_template_launcher
# PYTHONSAFEPATH: running the launcher as a file must not put the package folder first on sys.path
# (its modules would shadow others); the installed package is imported instead.
ENV FLEX_TEMPLATE_PYTHON_PY_FILE=/template/beam_pipeline/launcher.py \
    PYTHONSAFEPATH=1

ENTRYPOINT ["/opt/apache/beam/boot"]
