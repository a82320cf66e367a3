"""Which device the tests under ``tests/gpu`` run on.

``HOROVOD_GRAVAC_TEST_DEVICE=cuda`` (what ``make test-gpu`` sets) runs them on the GPU; the
default, ``cpu``, runs the same tests on the CPU with the compressors on the paths they take
on accelerators (fixed payload sizes, nothing read back), so that they keep working between
the rare runs on a GPU.
"""
from __future__ import annotations

import os

import torch

DEVICE_ENV = "HOROVOD_GRAVAC_TEST_DEVICE"
DEVICES = ("cpu", "cuda")


def device_name() -> str:
    """The device the environment asks for; a ValueError names the valid ones."""
    name = os.environ.get(DEVICE_ENV, "cpu")
    if name not in DEVICES:
        raise ValueError(f"{DEVICE_ENV} must be one of {', '.join(DEVICES)}, got {name!r}")
    return name


def missing_reason() -> str | None:
    """Why the device asked for cannot be used here (None: it can)."""
    if device_name() == "cuda" and not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda})"
    return None


def device_under_test() -> torch.device:
    """The device under test (``cuda`` is device 0)."""
    return torch.device("cuda", 0) if device_name() == "cuda" else torch.device("cpu")
