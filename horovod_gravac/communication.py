"""The one module that calls Horovod's collectives.

Payloads are exchanged according to ``ctx.exchange``:

* ALLREDUCE — one asynchronous ``hvd.allreduce`` (Sum) of the single payload tensor.
* ALLGATHER — the payload tensors are packed into one uint8 buffer (a small int64 header
  with each tensor's length, then each tensor's bytes padded to 8), so a layer costs one
  ``hvd.allgather`` whatever its payload; per-rank sizes may differ (DGC, thresholds).
  After the gather, every rank's payload is unpacked and ``compressor.aggregate`` sums them.
* LOWRANK — PowerSGD: allreduce P; at ``finish`` orthogonalize and allreduce Q.

All collectives are started asynchronously as gradients become ready, and Horovod's tensor
fusion batches the small ones. Compressors aggregate to *sums* over ranks; the Average /
predivide scaling is split as ``hvd.DistributedOptimizer`` does (prescale 1/f, postscale
f/size inside the allreduce; 1/size after an allgather).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import horovod.torch as hvd
import torch
from torch import Tensor

from .compression import Compressor, Ctx, Exchange, Payload

_ALIGN = 8


def pack(payload: Payload) -> Tensor:
    """Payload tensors → one flat uint8 tensor: [n0 n1 … as int64][bytes of t0][bytes of t1]…"""
    parts = [torch.tensor([t.numel() for t in payload], dtype=torch.int64,
                          device=payload[0].device).view(torch.uint8)]
    for t in payload:
        raw = t.reshape(-1).contiguous().view(torch.uint8)
        pad = (-raw.numel()) % _ALIGN
        parts.append(raw)
        if pad:
            parts.append(raw.new_zeros(pad))
    return torch.cat(parts)


def unpack(buffer: Tensor, dtypes: list[torch.dtype], ranks: int) -> list[Payload]:
    """Split an allgathered buffer into each rank's payload (flat tensors, given dtypes)."""
    payloads, offset, header = [], 0, 8 * len(dtypes)
    for _ in range(ranks):
        counts = buffer[offset:offset + header].view(torch.int64).tolist()
        offset += header
        tensors = []
        for count, dtype in zip(counts, dtypes):
            size = count * torch.empty((), dtype=dtype).element_size()
            tensors.append(buffer[offset:offset + size].view(dtype))
            offset += size + (-size) % _ALIGN
        payloads.append(tuple(tensors))
    return payloads


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


@dataclass
class Pending:
    """An exchange in flight for one named tensor."""

    name: str
    compressor: Compressor
    ctx: Ctx
    handle: Any
    dtypes: list[torch.dtype] = field(default_factory=list)
    wire_bytes: int = 0


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

    def broadcast_decision(self, decision: Any) -> Any:
        """Rank 0's decision on every rank: over MPI (mpi4py) when Horovod runs on MPI,
        else with Horovod's own broadcast (Gloo)."""
        comm = self._mpi()
        if comm is not None:
            return comm.bcast(decision, root=0)
        return hvd.broadcast_object(decision, root_rank=0, name="gravac.decision",
                                    process_set=self.process_set)

    def _mpi(self):
        """COMM_WORLD when Horovod itself runs on MPI with the global process set, else None."""
        if self._mpi_comm is None and hvd.mpi_enabled() \
                and self.process_set == hvd.global_process_set:
            import mpi4py
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
        if ctx.exchange is Exchange.ALLGATHER:
            buffer = pack(payload)
            handle = hvd.allgather_async(buffer, name=f"gravac.gather.{name}",
                                         process_set=self.process_set)
            return Pending(name, compressor, ctx, handle, [t.dtype for t in payload],
                           buffer.numel())
        if len(payload) != 1:
            raise ValueError(f"{compressor.name}: an allreduced payload must be one tensor")
        tensor = payload[0]
        tag = "P" if ctx.exchange is Exchange.LOWRANK else "sum"
        # In place: payloads are fresh tensors or the gradient itself (as Horovod does), and
        # the Average/predivide scaling happens inside the collective, not in an extra pass.
        handle = hvd.allreduce_async_(tensor, name=f"gravac.{tag}.{name}", op=hvd.Sum,
                                      prescale_factor=1.0 / self.predivide,
                                      postscale_factor=self._postscale(ctx),
                                      process_set=self.process_set)
        return Pending(name, compressor, ctx, handle, [tensor.dtype],
                       tensor.numel() * tensor.element_size())

    def _postscale(self, ctx: Ctx) -> float:
        """Horovod's split of Average: prescale 1/f, postscale f/size (P needs none)."""
        if ctx.exchange is Exchange.LOWRANK or self.op != hvd.Average:
            return 1.0
        return self.predivide / self.size

    def start_second_phase(self, pending: Pending) -> Payload:
        """PowerSGD: wait for P, send Q. Returns the local Q payload (for error feedback)."""
        p_sum = hvd.synchronize(pending.handle)
        q = pending.compressor.compress_second(p_sum, pending.ctx)
        postscale = self.predivide / self.size if self.op == hvd.Average else 1.0
        pending.handle = hvd.allreduce_async(q[0], name=f"gravac.Q.{pending.name}", op=hvd.Sum,
                                             prescale_factor=1.0 / self.predivide,
                                             postscale_factor=postscale,
                                             process_set=self.process_set)
        pending.wire_bytes += q[0].numel() * q[0].element_size()
        return q

    def finish(self, pending: Pending) -> Tensor:
        """Wait for the exchange and return the reduced gradient (average or sum over ranks)."""
        result = hvd.synchronize(pending.handle)
        if pending.ctx.exchange is not Exchange.ALLGATHER:  # already scaled by the allreduce
            return pending.compressor.aggregate([(result,)], pending.ctx)
        total = pending.compressor.aggregate(unpack(result, pending.dtypes, self.size), pending.ctx)
        return total.mul_(1.0 / self.size) if self.op == hvd.Average else total
