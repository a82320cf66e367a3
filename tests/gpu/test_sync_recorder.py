"""The host-sync recorder of the device tests (``tests/gpu/syncs.py``) itself, on any machine:
its CUDA side driven by a stand-in for CUDA's sync debug mode, its CPU side on real
operators."""
from __future__ import annotations

import warnings

import pytest
import torch

from horovod_gravac.transport import pack, unpack
from tests.gpu.syncs import CUDA_MESSAGE, SyncRecorder


def test_cuda_warnings_are_recorded_with_their_phase_and_site(monkeypatch):
    modes = []
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", modes.append)
    real = torch.Tensor.tolist

    def synchronizing_tolist(tensor):  # what CUDA's "warn" mode does on a device read
        warnings.warn(f"called a {CUDA_MESSAGE}")
        return real(tensor)

    monkeypatch.setattr(torch.Tensor, "tolist", synchronizing_tolist)
    headed = pack([torch.ones(3)], header=True)  # unpack reads its header: one read
    recorder = SyncRecorder(torch.device("cuda", 0))
    with pytest.warns(UserWarning, match="not a sync"):
        with recorder.watching():
            unpack(headed, [torch.float32], None)
            with recorder.finishing():
                unpack(headed, [torch.float32], None)
            warnings.warn("not a sync")  # passed on, not recorded
    assert [(e.phase, e.site[0], e.site[2]) for e in recorder.events] == [
        ("hooks", "protocol.py", "unpack"), ("finish", "protocol.py", "unpack")]
    assert "view(HEADER_DTYPE).tolist()" in str(recorder.events[0])
    assert modes == ["warn", "default"]
    with recorder.watching(), recorder.strict():
        with recorder.finishing():  # the step's end may read: "warn" there
            pass
    assert modes[2:] == ["warn", "error", "warn", "error", "warn", "default"]


def test_cpu_operators_that_would_wait_on_an_accelerator_are_recorded():
    recorder = SyncRecorder(torch.device("cpu"))
    x = torch.randn(100)
    with recorder.watching():
        x[x > 0] = 0.0  # one value through a mask: masked_fill_, no wait
        x.abs_().sum()  # no wait
    assert recorder.events == []
    with recorder.watching():
        x.sum().item()
        torch.nonzero(x)
        x[x < 0]  # a mask read sizes its output from the data
        x[x < 0] = torch.zeros(100)[x < 0]  # values through a mask: nonzero
        x.tolist()
    assert [e.what for e in recorder.events] == [
        "aten::_local_scalar_dense", "aten::nonzero", "aten::index", "aten::index",
        "aten::index_put_", "Tensor.tolist"]
    assert all(e.phase == "hooks" and e.site is None for e in recorder.events)
