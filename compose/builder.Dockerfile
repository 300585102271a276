# The one-shot model builder of docker-compose.yml (profile "build"): trains and exports the
# demo bundle into the shared "bundles" volume. It carries torch; serving images never do.
# TORCH_INDEX picks the wheel index (default: PyTorch's CPU wheels, a few hundred MB instead of
# the multi-GB CUDA build).
ARG PYTHON_IMAGE=python:3.11-slim
FROM ${PYTHON_IMAGE}
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ARG PIP_NO_INDEX=""
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1 \
    PATH=/opt/offramp/bin:$PATH
WORKDIR /src
COPY wheelhouse/ /wheelhouse/
COPY shared ./shared
RUN python -m venv /opt/offramp \
 && /opt/offramp/bin/pip install ${PIP_NO_INDEX:+--no-index} --find-links /wheelhouse \
      --extra-index-url "${TORCH_INDEX}" "torch>=2.3,<2.14" \
 && /opt/offramp/bin/pip install ${PIP_NO_INDEX:+--no-index} --find-links /wheelhouse "./shared[train]"
RUN useradd --create-home --uid 10001 offramp
USER 10001
WORKDIR /home/offramp
CMD ["offramp", "build", "--preset", "demo", "--out", "/bundles/demo"]
