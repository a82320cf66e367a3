"""The torch.distributed counterpart of ``communication`` (Horovod's): the same exchanges,
by ``ctx.exchange``, on a torch.distributed process group — for the DDP communication hook.

* ALLREDUCE — ``all_reduce`` (sum) of the payload divided by the group size first, as DDP's
  own ``allreduce_hook`` does (the average, without overflow in low precision).
* ALLGATHER — the payload packed into one uint8 buffer, as for Horovod. ``all_gather``
  needs the same size on every rank: payloads whose size varies (thresholds) first agree on
  the largest in one small ``all_reduce(MAX)`` and are padded; each rank's part is cut by its
  header. Fixed-size payloads (TopK, quantizers) carry no header.
* LOWRANK — PowerSGD: ``all_reduce`` of P (a sum; its orthogonalisation does not care), then
  of Q, averaged.

Every collective is started asynchronously (``async_op=True``) in the order the hook is
called, which is the same on every rank; what depends on a result (PowerSGD's Q) is started
later in one fixed order too, so ranks never disagree on the sequence of collectives.
DDP averages gradients: there is no Sum/Adasum choice here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .compression import Compressor, Ctx, Exchange, Payload, wire_bytes
from .packing import pack, unpack


@dataclass
class TorchPending:
    """An exchange in flight for one named tensor (or a flat group of dense tensors)."""

    name: str
    compressor: Compressor | None  # None: a dense flat allreduce of uncompressed tensors
    ctx: Ctx | None
    work: Any
    result: Any  # the tensor reduced in place, or the list all_gather fills
    dtypes: list[torch.dtype] = field(default_factory=list)
    wire_bytes: int = 0
    counts: list[int] | None = None

    @property
    def kind(self) -> Exchange:
        """The collective: the compressor's, or an allreduce for uncompressed tensors."""
        return self.ctx.exchange if self.ctx is not None else Exchange.ALLREDUCE


class TorchCommunicator:
    """Starts and finishes the exchange of compressed payloads on a process group.

    Arguments:
        process_group: the group to exchange on (None: the default group).
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        self.group = process_group
        #: where small statistics tensors live: the gradients' device (NCCL needs CUDA)
        self.device = torch.device("cpu")

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    def start(self, name: str, compressor: Compressor, payload: Payload, ctx: Ctx) -> TorchPending:
        """Launch the collective for ``payload``; returns at once."""
        dtypes = [t.dtype for t in payload]
        if ctx.exchange is Exchange.ALLGATHER:
            counts = None if ctx.varying_size else [t.numel() for t in payload]
            buffer = pack(payload, header=counts is None)
            sent = buffer.numel()
            if counts is None:  # all_gather needs one size: pad to the largest
                length = torch.tensor([sent], dtype=torch.int64, device=buffer.device)
                dist.all_reduce(length, op=dist.ReduceOp.MAX, group=self.group)
                buffer = torch.cat([buffer, buffer.new_zeros(int(length) - sent)])
            parts = [torch.empty_like(buffer) for _ in range(self.size)]
            work = dist.all_gather(parts, buffer, group=self.group, async_op=True)
            return TorchPending(name, compressor, ctx, work, parts, dtypes, sent, counts)
        if len(payload) != 1:
            raise ValueError(f"{compressor.name}: an allreduced payload must be one tensor")
        tensor = payload[0]
        if ctx.exchange is Exchange.ALLREDUCE:  # P (LOWRANK) is summed unscaled
            tensor.div_(self.size)
        work = dist.all_reduce(tensor, group=self.group, async_op=True)
        return TorchPending(name, compressor, ctx, work, tensor, dtypes, wire_bytes(payload))

    def start_dense(self, name: str, flat: Tensor) -> TorchPending:
        """Average ``flat`` (uncompressed gradients, one tensor) in place."""
        work = dist.all_reduce(flat.div_(self.size), group=self.group, async_op=True)
        return TorchPending(name, None, None, work, flat, [flat.dtype], wire_bytes((flat,)))

    def start_second_phase(self, pending: TorchPending) -> Payload:
        """PowerSGD: wait for P, send Q (averaged). Returns the local Q (error feedback)."""
        pending.work.wait()
        q = pending.compressor.compress_second(pending.result, pending.ctx)
        wire = q[0] / self.size  # not in place: the local Q feeds the residual
        pending.work = dist.all_reduce(wire, group=self.group, async_op=True)
        pending.result = wire
        pending.wire_bytes += wire_bytes(q)
        return q

    def finish(self, pending: TorchPending) -> Tensor:
        """Wait for the exchange and return the averaged gradient."""
        pending.work.wait()
        if pending.compressor is None:
            return pending.result
        if pending.ctx.exchange is not Exchange.ALLGATHER:  # already averaged
            return pending.compressor.aggregate([(pending.result,)], pending.ctx)
        payloads = [unpack(part, pending.dtypes, 1, pending.counts)[0] for part in pending.result]
        return pending.compressor.aggregate(payloads, pending.ctx).mul_(1.0 / self.size)

    def combine(self, values: list[float]) -> list[float]:
        """Sum a few floats over ranks: one tiny blocking all_reduce (agents' statistics)."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, group=self.group)
        return tensor.tolist()

    def broadcast_floats(self, values: list[float] | None, length: int) -> list[float]:
        """The group's rank 0's ``values`` (``length`` floats) on every rank."""
        tensor = torch.zeros(length, dtype=torch.float64, device=self.device)
        if values is not None:
            tensor.copy_(torch.tensor(values, dtype=torch.float64))
        source = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        dist.broadcast(tensor, src=source, group=self.group)
        return tensor.tolist()
