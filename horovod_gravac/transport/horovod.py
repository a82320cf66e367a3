"""The one module that calls Horovod's collectives: the engine's transport on a Horovod
process set (see :mod:`.protocol` for what a transport does), Horovod's sparse allreduce for
torch sparse gradients, and the object collectives of checkpoints and elastic state.

Every collective is asynchronous and summed (``op=hvd.Sum``), one per bucket and kind:
summed payloads go as one grouped allreduce, in place (Horovod copies them into its fusion
buffer and back, as for its own optimizer), gathered ones packed into one buffer, scattered
ones (a two-stage exchange's chunks) in one alltoall of a row per rank; the engine scales the
sums itself. Horovod negotiates collectives by name, so ranks may start them in
different orders; names are unique within a step. The agents' decision is Horovod's
asynchronous broadcast too, over MPI when Horovod runs on MPI and over Gloo otherwise: it is
serialised with every other collective in Horovod's background thread. (mpi4py's ``Ibcast``
beside Horovod's own MPI thread segfaulted at exit in about one 2-rank run of four here, in
Open MPI's progress engine, so this library makes no MPI call of its own.)
"""
from __future__ import annotations

from typing import Any, Callable

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

from .protocol import header_length


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


class HorovodHandle:
    """A Horovod collective in flight; ``wait`` synchronizes it once and applies ``then``."""

    def __init__(self, handle: Any, then: Callable[[Any], Any] | None = None) -> None:
        self._handle, self._then = handle, then
        self._result: Any = None

    def wait(self) -> Any:
        if self._handle is not None:
            result = hvd.synchronize(self._handle)
            self._result = result if self._then is None else self._then(result)
            self._handle = None
        return self._result


class _Deferred:
    """Horovod's sparse allreduce: a function that synchronizes and returns the result."""

    def __init__(self, synchronize: Callable[[], Tensor]) -> None:
        self._synchronize, self._result = synchronize, None

    def wait(self) -> Tensor:
        if self._synchronize is not None:
            self._result, self._synchronize = self._synchronize(), None
        return self._result


class HorovodTransport:
    """The engine's collectives on a Horovod process set.

    Arguments:
        process_set: the ranks that exchange (``hvd.global_process_set`` by default).
    """

    #: small tensors the agents exchange live on the host
    control_device = torch.device("cpu")

    def __init__(self, process_set=hvd.global_process_set) -> None:
        self.process_set = process_set

    @property
    def rank(self) -> int:
        return self.process_set.rank()

    @property
    def size(self) -> int:
        return self.process_set.size()

    @property
    def included(self) -> bool:
        """Whether this process is one of the process set's ranks (else it has no rank)."""
        return bool(self.process_set.included())

    def allreduce(self, tensors: list[Tensor], name: str) -> HorovodHandle:
        """One grouped allreduce, in place: Horovod fuses the tensors in its own buffer."""
        return HorovodHandle(hvd.grouped_allreduce_async_(tensors, name=name, op=hvd.Sum,
                                                          process_set=self.process_set))

    def allgather(self, buffer: Tensor, name: str, same_size: bool) -> HorovodHandle:
        """Every rank's buffer: Horovod concatenates them; equal sizes split evenly, others
        by the length each buffer's header declares (one host read per rank)."""
        size = self.size

        def split(gathered: Tensor) -> list[Tensor]:
            if same_size:
                return list(gathered.view(size, -1).unbind(0))
            parts, offset = [], 0
            for _ in range(size):
                length = header_length(gathered[offset:])
                parts.append(gathered[offset:offset + length])
                offset += length
            return parts

        return HorovodHandle(hvd.allgather_async(buffer, name=name, process_set=self.process_set),
                             split)

    def alltoall(self, buffer: Tensor, name: str) -> HorovodHandle:
        """Row j of ``buffer`` (N rows of one size) to rank j; the rows received, row i from
        rank i (Horovod splits the first dimension evenly when given no splits)."""
        return HorovodHandle(hvd.alltoall_async(buffer, name=name, process_set=self.process_set),
                             lambda result: result[0])  # (output, received splits)

    def broadcast(self, tensor: Tensor, name: str) -> HorovodHandle:
        """Rank 0's ``tensor`` (float64, on the host) on every rank, without blocking."""
        return HorovodHandle(hvd.broadcast_async_(tensor, root_rank=0, name=name,
                                                  process_set=self.process_set))

    def sparse_allreduce(self, grad: Tensor, name: str, average: bool) -> _Deferred:
        """A torch sparse gradient, uncompressed, through Horovod's sparse allreduce
        (allgather of indices and values); the result is a sparse tensor."""
        op = hvd.Average if average else hvd.Sum
        return _Deferred(hvd.sparse_allreduce_async(grad, name=name, op=op,
                                                    process_set=self.process_set))


__all__ = ["HorovodHandle", "HorovodTransport", "allgather_object", "broadcast_object",
           "hvd", "world"]
