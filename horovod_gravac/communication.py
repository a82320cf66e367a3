"""The one module that calls Horovod's collectives.

Payloads are exchanged according to ``ctx.exchange``:

* ALLREDUCE — one asynchronous ``hvd.allreduce`` (Sum) of the single payload tensor.
* ALLGATHER — the payload tensors are packed into one uint8 buffer (each tensor's bytes
  padded to 8), so a layer costs one ``hvd.allgather`` whatever its payload. When the
  payload's size is the same on every rank (``ctx.varying_size`` false: TopK, quantizers),
  every rank's part is cut from the gathered buffer by the local sizes — no header, nothing
  read back to the host. Otherwise a small int64 header with each tensor's length leads the
  buffer and is read when the result is unpacked. ``compressor.aggregate`` sums the parts.
* LOWRANK — PowerSGD: allreduce P; at ``start_second_phase`` orthogonalize and allreduce Q.

A torch sparse gradient (``nn.Embedding(sparse=True)``) goes through Horovod's own
``sparse_allreduce_async`` (allgather of indices and values), as ``hvd.DistributedOptimizer``.

All collectives are started asynchronously as gradients become ready, and Horovod's tensor
fusion batches the small ones; :meth:`Communicator.start_group` issues Horovod's grouped
collectives instead (the ``groups`` argument). Compressors aggregate to *sums* over ranks;
the Average / predivide scaling is split as ``hvd.DistributedOptimizer`` does (prescale 1/f,
postscale f/size inside the allreduce; 1/size after an allgather).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

try:
    import horovod.torch as hvd
except ImportError as _exc:  # the one dependency pip cannot install for you
    raise ImportError(
        "horovod_gravac's optimizer needs Horovod built with PyTorch support. It is not a pip "
        "dependency: it must be built from source against the installed torch, which "
        "`make install` (launch/install.sh) in the horovod-gravac repository does"
        f" ({_exc})") from _exc
from torch import Tensor

from .compression import Compressor, Ctx, Exchange, Payload, wire_bytes
from .packing import pack, unpack

def allgather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank (checkpoints: per-rank state)."""
    return hvd.allgather_object(obj, name="gravac.gather_object")


def broadcast_object(obj: Any, process_set=hvd.global_process_set) -> Any:
    """Rank 0's ``obj`` on every rank (checkpoints and elastic state)."""
    return hvd.broadcast_object(obj, root_rank=0, name="gravac.broadcast_object",
                                process_set=process_set)


def world() -> tuple[int, int]:
    """(rank, size) of the global process set."""
    return hvd.rank(), hvd.size()


class _GroupResult:
    """One grouped Horovod collective shared by several tensors: synchronized once."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self._outputs: list[Tensor] | None = None

    def output(self, index: int) -> Tensor:
        if self._outputs is None:
            self._outputs = hvd.synchronize(self.handle)
        return self._outputs[index]


def import_mpi4py():
    """mpi4py, or an ImportError that says how to get it (the ``mpi`` extra)."""
    try:
        import mpi4py
    except ImportError as exc:
        raise ImportError("Horovod runs on MPI here, and horovod_gravac broadcasts the agents' "
                          "decisions with mpi4py there: pip install 'horovod-gravac[mpi]' "
                          f"(make install does) ({exc})") from exc
    return mpi4py


@dataclass
class Pending:
    """An exchange in flight for one named tensor."""

    name: str
    compressor: Compressor | None  # None: a torch sparse gradient (Horovod's sparse path)
    ctx: Ctx | None
    handle: Any  # a Horovod handle, (_GroupResult, index), or a callable (sparse)
    dtypes: list[torch.dtype] = field(default_factory=list)
    wire_bytes: int = 0
    #: elements per payload tensor when every rank's are the same (no header on the wire)
    counts: list[int] | None = None

    @property
    def kind(self) -> Exchange:
        """The collective: the compressor's, or an allgather for Horovod's sparse path."""
        return self.ctx.exchange if self.ctx is not None else Exchange.ALLGATHER

    def wait(self) -> Any:
        """Block until the collective is done and return its output."""
        if isinstance(self.handle, tuple):
            group, index = self.handle
            return group.output(index)
        if callable(self.handle):
            return self.handle()
        return hvd.synchronize(self.handle)


class Communicator:
    """Starts and finishes the exchange of compressed payloads on a Horovod process set."""

    def __init__(self, op=hvd.Average, gradient_predivide_factor: float = 1.0,
                 process_set=hvd.global_process_set) -> None:
        self.op = op
        self.predivide = float(gradient_predivide_factor)
        self.process_set = process_set
        self._mpi_comm = None

    @property
    def rank(self) -> int:
        return self.process_set.rank()

    def combine(self, values: list[float]) -> list[float]:
        """Sum a few floats over ranks: one tiny blocking allreduce (agents' statistics)."""
        summed = hvd.allreduce(torch.tensor(values, dtype=torch.float64), name="gravac.stats",
                               op=hvd.Sum, process_set=self.process_set)
        return summed.tolist()

    def broadcast_floats(self, values: list[float] | None, length: int) -> list[float]:
        """Rank 0's ``values`` (``length`` floats) on every rank, in one small broadcast:
        over MPI (mpi4py) when Horovod runs on MPI, else Horovod's own broadcast (Gloo)."""
        buffer = np.zeros(length, dtype=np.float64)
        if values is not None:
            buffer[:] = values
        comm = self._mpi()
        if comm is not None:
            comm.Bcast(buffer, root=0)
            return buffer.tolist()
        tensor = hvd.broadcast_(torch.from_numpy(buffer), root_rank=0, name="gravac.decision",
                                process_set=self.process_set)
        return tensor.tolist()

    def _mpi(self):
        """COMM_WORLD when Horovod itself runs on MPI with the global process set, else None."""
        if self._mpi_comm is None and hvd.mpi_enabled() \
                and self.process_set == hvd.global_process_set:
            mpi4py = import_mpi4py()
            # Horovod initialised MPI and will finalise it: mpi4py must do neither.
            mpi4py.rc.initialize = False
            mpi4py.rc.finalize = False
            from mpi4py import MPI
            self._mpi_comm = MPI.COMM_WORLD
        return self._mpi_comm

    @property
    def size(self) -> int:
        return self.process_set.size()

    def start(self, name: str, compressor: Compressor, payload: Payload, ctx: Ctx) -> Pending:
        """Launch the collective(s) for ``payload``; returns at once."""
        tensor, pending = self._prepare(name, compressor, payload, ctx)
        if ctx.exchange is Exchange.ALLGATHER:
            pending.handle = hvd.allgather_async(tensor, name=f"gravac.gather.{name}",
                                                 process_set=self.process_set)
        else:
            tag = "P" if ctx.exchange is Exchange.LOWRANK else "sum"
            # In place: payloads are fresh tensors or the gradient itself (as Horovod does),
            # and the Average/predivide scaling happens inside the collective.
            pending.handle = hvd.allreduce_async_(tensor, name=f"gravac.{tag}.{name}",
                                                  op=hvd.Sum, process_set=self.process_set,
                                                  **self._scaling(ctx.exchange))
        return pending

    def start_group(self, group: str,
                    items: list[tuple[str, Compressor, Payload, Ctx]]) -> list[Pending]:
        """Launch the tensors of one of the optimizer's ``groups`` as Horovod grouped
        collectives: one per kind of exchange (allreduce, PowerSGD's P, allgather), each
        performed as one fused operation, as ``hvd.DistributedOptimizer(groups=...)`` does."""
        prepared = [self._prepare(*item) for item in items]
        for kind in Exchange:
            members = [(t, p) for t, p in prepared if p.ctx.exchange is kind]
            if not members:
                continue
            tensors = [t for t, _ in members]
            label = f"gravac.group.{kind.value}.{group}"
            if kind is Exchange.ALLGATHER:
                handle = hvd.grouped_allgather_async(tensors, name=label,
                                                     process_set=self.process_set)
            else:
                handle = hvd.grouped_allreduce_async_(tensors, name=label, op=hvd.Sum,
                                                      process_set=self.process_set,
                                                      **self._scaling(kind))
            result = _GroupResult(handle)
            for index, (_, pending) in enumerate(members):
                pending.handle = (result, index)
        return [p for _, p in prepared]

    def _prepare(self, name: str, compressor: Compressor, payload: Payload,
                 ctx: Ctx) -> tuple[Tensor, Pending]:
        """The tensor to put on the wire and its (not yet started) Pending."""
        dtypes = [t.dtype for t in payload]
        if ctx.exchange is Exchange.ALLGATHER:
            counts = None if ctx.varying_size else [t.numel() for t in payload]
            buffer = pack(payload, header=counts is None)
            return buffer, Pending(name, compressor, ctx, None, dtypes, buffer.numel(), counts)
        if len(payload) != 1:
            raise ValueError(f"{compressor.name}: an allreduced payload must be one tensor")
        tensor = payload[0]
        return tensor, Pending(name, compressor, ctx, None, dtypes,
                               wire_bytes(payload))

    def _scaling(self, exchange: Exchange) -> dict[str, float]:
        """Horovod's split of Average: prescale 1/f, postscale f/size (P needs none)."""
        postscale = 1.0 if exchange is Exchange.LOWRANK or self.op != hvd.Average \
            else self.predivide / self.size
        return {"prescale_factor": 1.0 / self.predivide, "postscale_factor": postscale}

    def start_sparse(self, name: str, grad: Tensor) -> Pending:
        """A torch sparse gradient, uncompressed, through Horovod's sparse allreduce
        (allgather of indices and values); the result is a sparse tensor."""
        grad = grad.coalesce()
        op = hvd.Average if self.op == hvd.Average else hvd.Sum
        handle = hvd.sparse_allreduce_async(grad, name=f"gravac.sparse.{name}", op=op,
                                            process_set=self.process_set)
        indices, values = grad._indices(), grad._values()
        return Pending(name, None, None, handle, [values.dtype],
                       wire_bytes((indices, values)))

    def start_second_phase(self, pending: Pending) -> Payload:
        """PowerSGD: wait for P, send Q. Returns the local Q payload (for error feedback)."""
        p_sum = pending.wait()
        q = pending.compressor.compress_second(p_sum, pending.ctx)
        pending.handle = hvd.allreduce_async(q[0], name=f"gravac.Q.{pending.name}", op=hvd.Sum,
                                             process_set=self.process_set,
                                             **self._scaling(Exchange.ALLREDUCE))
        pending.wire_bytes += wire_bytes(q)
        return q

    def finish(self, pending: Pending) -> Tensor:
        """Wait for the exchange and return the reduced gradient (average or sum over ranks)."""
        result = pending.wait()
        if pending.compressor is None:  # sparse: Horovod already averaged
            return result
        if pending.ctx.exchange is not Exchange.ALLGATHER:  # already scaled by the allreduce
            return pending.compressor.aggregate([(result,)], pending.ctx)
        payloads = unpack(result, pending.dtypes, self.size, pending.counts)
        total = pending.compressor.aggregate(payloads, pending.ctx)
        return total.mul_(1.0 / self.size) if self.op == hvd.Average else total
