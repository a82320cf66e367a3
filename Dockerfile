# GPU image for horovod-gravac: CUDA + Open MPI + CUDA torch + Horovod (NCCL, MPI, Gloo).
# Horovod is built by the same launch/install.sh that CI runs, so the two cannot drift apart.
#   docker build -t horovod-gravac .
#   docker run --gpus all --rm -it horovod-gravac make demo
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04
FROM ${CUDA_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    VENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH} \
    HOROVOD_GPU_OPERATIONS=NCCL \
    HOROVOD_NCCL_LINK=SHARED \
    HOROVOD_WHEEL_CACHE=/opt/wheels \
    EXTRAS=bench,test,vision

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
# Dependencies first, from the install script alone: torch (CUDA build), Horovod with NCCL
# built from source, torchvision. This layer is rebuilt only when the script changes.
COPY launch/install.sh launch/install.sh
RUN PYTHON=python3.11 TORCH_VERSION="${TORCH_VERSION}" TORCH_INDEX_URL="${TORCH_INDEX_URL}" \
        INSTALL_PACKAGE=0 bash launch/install.sh \
    && pip install --no-cache-dir "torchvision" \
    && rm -rf /root/.cache/pip

# Then the source and this package (seconds): editing the code does not rebuild the above;
# and the Penn Treebank for `make demo`, checked against its SHA-256, into the data cache.
COPY . .
RUN PYTHON=python3.11 TORCH_VERSION="${TORCH_VERSION}" TORCH_INDEX_URL="${TORCH_INDEX_URL}" \
        bash launch/install.sh \
    && python -c "from horovod_gravac.app import data; data.download_ptb(data.ptb_cache_dir())" \
    && rm -rf /root/.cache/pip

RUN horovodrun --check-build
