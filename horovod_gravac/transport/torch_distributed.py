"""The torch.distributed counterpart of :mod:`.horovod`: the engine's transport
on a process group, for the DDP communication hook (see :mod:`.protocol`).

torch.distributed matches collectives by the order they are started, not by name: the engine
starts them in one order on every rank (buckets in a fixed order, rounds after rounds).
``all_gather`` needs one size on every rank: buffers whose size varies first agree on the
largest in one small ``all_reduce(MAX)`` and are padded; each rank's part is cut by its
header's length.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor

from .protocol import header_length


class TorchHandle:
    """A torch.distributed work in flight; ``wait`` waits once and applies ``then``."""

    def __init__(self, work: Any, result: Any, then: Callable[[Any], Any] | None = None) -> None:
        self._work, self._result, self._then = work, result, then

    def wait(self) -> Any:
        if self._work is not None:
            self._work.wait()
            self._work = None
            if self._then is not None:
                self._result = self._then(self._result)
        return self._result


class TorchTransport:
    """The engine's collectives on a torch.distributed process group.

    Arguments:
        process_group: the group to exchange on (None: the default group).
    """

    def __init__(self, process_group: dist.ProcessGroup | None = None) -> None:
        self.group = process_group
        #: flat buffers of fused allreduces, by name, reused from step to step
        self._flat: dict[str, Tensor] = {}
        #: where the agent's decision travels: on NCCL's default group a Gloo group of the
        #: same ranks, so that reading it is never a device synchronisation (made here: every
        #: rank makes its transport in the same order, as new_group needs)
        self._control = dist.new_group(backend="gloo") \
            if process_group is None and dist.get_backend() == "nccl" else process_group

    @property
    def rank(self) -> int:
        return dist.get_rank(self.group)

    @property
    def size(self) -> int:
        return dist.get_world_size(self.group)

    @property
    def control_device(self) -> torch.device:
        """Where the decision travels: the host, but on an NCCL group of its own (which
        broadcasts only CUDA tensors)."""
        if dist.get_backend(self._control) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def allreduce(self, tensors: list[Tensor], name: str) -> TorchHandle:
        """The tensors summed in place, through one flat buffer (as DDP's buckets)."""
        if len(tensors) == 1:
            return TorchHandle(dist.all_reduce(tensors[0], group=self.group, async_op=True),
                               tensors)
        numel = sum(t.numel() for t in tensors)
        flat = self._flat.get(name)
        if flat is None or flat.numel() != numel or flat.dtype != tensors[0].dtype \
                or flat.device != tensors[0].device:
            flat = self._flat[name] = torch.empty(numel, dtype=tensors[0].dtype,
                                                  device=tensors[0].device)
        torch.cat([t.reshape(-1) for t in tensors], out=flat)

        def unflatten(reduced: Tensor) -> list[Tensor]:
            offset = 0
            for t in tensors:
                t.copy_(reduced[offset:offset + t.numel()].view_as(t))
                offset += t.numel()
            return tensors

        return TorchHandle(dist.all_reduce(flat, group=self.group, async_op=True), flat,
                           unflatten)

    def allgather(self, buffer: Tensor, name: str, same_size: bool) -> TorchHandle:
        sent = buffer.numel()
        if not same_size:  # all_gather needs one size: pad to the largest
            length = torch.tensor([sent], dtype=torch.int64, device=buffer.device)
            dist.all_reduce(length, op=dist.ReduceOp.MAX, group=self.group)
            buffer = torch.cat([buffer, buffer.new_zeros(int(length) - sent)])
        parts = [torch.empty_like(buffer) for _ in range(self.size)]
        work = dist.all_gather(parts, buffer, group=self.group, async_op=True)
        return TorchHandle(work, parts, None if same_size else
                           lambda gathered: [p[:header_length(p)] for p in gathered])

    def alltoall(self, buffer: Tensor, name: str) -> TorchHandle:
        """Row j of ``buffer`` (N rows of one size) to rank j: ``all_to_all_single`` with
        even splits; the result has row i from rank i."""
        received = torch.empty_like(buffer)
        return TorchHandle(dist.all_to_all_single(received, buffer, group=self.group,
                                                  async_op=True), received)

    def broadcast(self, tensor: Tensor, name: str) -> TorchHandle:
        """From the group's rank 0 (the decision: on the control group)."""
        source = 0 if self.group is None else dist.get_global_rank(self.group, 0)
        return TorchHandle(dist.broadcast(tensor, src=source, group=self._control,
                                          async_op=True), tensor)


def gather_to_rank0(obj: Any, group: dist.ProcessGroup | None = None) -> list[Any] | None:
    """Every rank's picklable ``obj``, in rank order, on the group's rank 0 (None elsewhere);
    collective: every rank of the group calls it."""
    size = dist.get_world_size(group)
    first = 0 if group is None else dist.get_global_rank(group, 0)
    everyone: list[Any] | None = [None] * size if dist.get_rank() == first else None
    dist.gather_object(obj, everyone, dst=first, group=group)
    return everyone
