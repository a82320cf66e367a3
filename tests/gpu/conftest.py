"""Fixtures of the device tests: the device under test and a process group of one rank."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from horovod_gravac.compression import base
from tests.gpu.device import device_name, device_under_test, missing_reason


def pytest_report_header(config) -> str:
    return f"horovod_gravac device tests on: {device_name()}"


@pytest.fixture
def device(monkeypatch) -> torch.device:
    """The device under test; on the CPU, compressors take their accelerator paths."""
    reason = missing_reason()
    if reason is not None:
        pytest.skip(reason)
    if device_name() == "cpu":
        monkeypatch.setattr(base, "HOST_DEVICES", frozenset())
    return device_under_test()


@pytest.fixture(scope="module")
def world_of_one(tmp_path_factory) -> str:
    """torch.distributed with one rank in this process (NCCL on a GPU, Gloo on the CPU);
    returns the backend."""
    reason = missing_reason()
    if reason is not None:
        pytest.skip(reason)
    if dist.is_initialized():
        pytest.skip("this process has a process group already")
    store = tmp_path_factory.mktemp("store") / "file"
    if device_name() == "cuda":
        torch.cuda.set_device(0)
        dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1,
                                device_id=device_under_test())
    else:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield dist.get_backend()
    finally:
        dist.destroy_process_group()
