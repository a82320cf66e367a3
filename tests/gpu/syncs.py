"""Host synchronisations in a block of code, and where in horovod_gravac they happen.

A host synchronisation stalls the Python thread until the device has run everything queued
before it; in backward that serialises backprop and communication. On a GPU, CUDA's own
sync debug mode finds them (``torch.cuda.set_sync_debug_mode``): "warn" to see every one and
its Python stack, "error" to fail at the first, wherever it is (also inside torch's C++).
On the CPU nothing waits, so the operations that would wait on an accelerator are recorded
instead: reads of a value (``item``/``bool``/``float``, ``tolist``, ``.cpu()``, ``numpy``) and
outputs whose size depends on the data (``nonzero``, ``masked_select``, ``unique``, reading
through a boolean mask) — the project's CPU count of host reads, seen at the operator level.
"""
from __future__ import annotations

import contextlib
import os
import traceback
import warnings
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: operators that wait for the device: their result is read on the host, or its size is
READS = frozenset({"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select",
                   "aten::equal", "aten::is_nonzero", "aten::_unique", "aten::_unique2",
                   "aten::unique_dim", "aten::unique_consecutive",
                   "aten::unique_dim_consecutive"})
#: tensor methods that copy to the host without an operator the CPU dispatcher would show
HOST_METHODS = ("tolist", "cpu", "numpy")
#: the words CUDA's sync debug mode uses
CUDA_MESSAGE = "synchronizing CUDA operation"
_PACKAGE = os.sep + "horovod_gravac" + os.sep


@dataclass(frozen=True)
class Sync:
    """One host synchronisation: what, in which phase of the step, and where."""

    what: str
    #: "hooks" (backward, before the engine's end of the step) or "finish" (its end)
    phase: str
    #: (file name, line, function, source line) of the innermost horovod_gravac frame
    site: tuple[str, int, str, str] | None

    def __str__(self) -> str:
        if self.site is None:
            return f"{self.what} (outside horovod_gravac)"
        file, line, function, source = self.site
        return f"{file}:{line} {function}: {source} ({self.what})"


def _site() -> tuple[str, int, str, str] | None:
    for frame in reversed(traceback.extract_stack()):
        if _PACKAGE in frame.filename:
            return (os.path.basename(frame.filename), frame.lineno or 0, frame.name,
                    (frame.line or "").strip())
    return None


def _waits(func: Any, args: tuple, kwargs: dict) -> bool:
    """Would this operator wait for an accelerator's queue?"""
    name = func._schema.name
    if name in READS:
        return True
    if name == "aten::repeat_interleave":
        return kwargs.get("output_size") is None and isinstance(args[0], torch.Tensor)
    if name in ("aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_"):
        masks = [i for i in args[1] if i is not None and i.dtype in (torch.bool, torch.uint8)]
        if not masks:
            return False
        # a mask assignment of one value becomes masked_fill_ (no wait); the rest nonzero()
        return name == "aten::index" or args[2].numel() != 1
    return False


class _Spy(TorchDispatchMode):
    def __init__(self, recorder: "SyncRecorder") -> None:
        super().__init__()
        self.recorder = recorder

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _waits(func, args, kwargs):
            self.recorder.record(func._schema.name)
        return func(*args, **kwargs)


class SyncRecorder:
    """Records host synchronisations while :meth:`watching`, each with its phase: "hooks",
    or "finish" inside :meth:`finishing` (the engine's end of a step, which reads the step's
    verdict once by design)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.events: list[Sync] = []
        self.phase = "hooks"
        self._mode = "default"

    def record(self, what: str) -> None:
        self.events.append(Sync(what, self.phase, _site()))

    def of(self, phase: str) -> list[Sync]:
        return [e for e in self.events if e.phase == phase]

    def _set_mode(self, mode: str) -> None:
        self._mode = mode
        torch.cuda.set_sync_debug_mode(mode)

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Record every host synchronisation inside the block."""
        if self.device.type == "cuda":
            with warnings.catch_warnings():  # restores showwarning and the filters
                warnings.simplefilter("always")
                shown = warnings.showwarning

                def caught(message, category, filename, lineno, file=None, line=None):
                    if CUDA_MESSAGE in str(message):
                        self.record(CUDA_MESSAGE)
                    else:
                        shown(message, category, filename, lineno, file, line)

                warnings.showwarning = caught
                self._set_mode("warn")
                try:
                    yield
                finally:
                    self._set_mode("default")
            return
        with contextlib.ExitStack() as stack:
            for method in HOST_METHODS:
                stack.enter_context(self._counted(method))
            stack.enter_context(_Spy(self))
            yield

    @contextlib.contextmanager
    def _counted(self, method: str) -> Iterator[None]:
        real = getattr(torch.Tensor, method)

        def counted(tensor, *args, **kwargs):
            self.record(f"Tensor.{method}")
            return real(tensor, *args, **kwargs)

        setattr(torch.Tensor, method, counted)
        try:
            yield
        finally:
            setattr(torch.Tensor, method, real)

    @contextlib.contextmanager
    def strict(self) -> Iterator[None]:
        """On CUDA, fail at the first host synchronisation outside :meth:`finishing`
        (``set_sync_debug_mode("error")``); on the CPU, nothing to add to the records."""
        if self.device.type != "cuda":
            yield
            return
        before = self._mode
        self._set_mode("error")
        try:
            yield
        finally:
            self._set_mode(before)

    @contextlib.contextmanager
    def finishing(self) -> Iterator[None]:
        """The engine's end of a step: recorded as "finish", and allowed in :meth:`strict`."""
        phase, mode = self.phase, self._mode
        self.phase = "finish"
        if mode == "error":
            self._set_mode("warn")
        try:
            yield
        finally:
            self.phase = phase
            if mode == "error":
                self._set_mode(mode)
