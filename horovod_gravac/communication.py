"""The one module that calls Horovod's collectives: the engine's transport on a Horovod
process set (see ``transport`` for what a transport does), Horovod's sparse allreduce for
torch sparse gradients, and the object collectives of checkpoints and elastic state.

Every collective is asynchronous and summed (``op=hvd.Sum``), one per bucket and kind:
summed payloads go as one grouped allreduce, in place (Horovod copies them into its fusion
buffer and back, as for its own optimizer), gathered ones packed into one buffer; the engine
scales the sums itself. Horovod negotiates
collectives by name, so ranks may start them in different orders; names are unique within a
step. The agents' decision is broadcast over MPI (mpi4py's ``Ibcast``) when Horovod itself
runs on MPI, else with Horovod's own broadcast (Gloo).
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

from .transport import header_length


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


def import_mpi4py():
    """mpi4py, or an ImportError that says how to get it (the ``mpi`` extra)."""
    try:
        import mpi4py
    except ImportError as exc:
        raise ImportError("Horovod runs on MPI here, and horovod_gravac broadcasts the agents' "
                          "decisions with mpi4py there: pip install 'horovod-gravac[mpi]' "
                          f"(make install does) ({exc})") from exc
    return mpi4py


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


class _MPIHandle:
    def __init__(self, request: Any, tensor: Tensor) -> None:
        self._request, self._tensor = request, tensor

    def wait(self) -> Tensor:
        if self._request is not None:
            self._request.Wait()
            self._request = None
        return self._tensor


class HorovodTransport:
    """The engine's collectives on a Horovod process set.

    Arguments:
        process_set: the ranks that exchange (``hvd.global_process_set`` by default).
    """

    #: small tensors the agents exchange live on the host
    control_device = torch.device("cpu")

    def __init__(self, process_set=hvd.global_process_set) -> None:
        self.process_set = process_set
        self._mpi_comm = None
        # now, not at the first decision: mpi4py's own exit handlers must run after the
        # engine's, which completes the last decision broadcast (they run last-in first-out)
        self._mpi()

    @property
    def rank(self) -> int:
        return self.process_set.rank()

    @property
    def size(self) -> int:
        return self.process_set.size()

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

    def broadcast(self, tensor: Tensor, name: str):
        """Rank 0's ``tensor`` (float64, on the host) on every rank, without blocking."""
        comm = self._mpi()
        if comm is not None:
            array = tensor.numpy()
            return _MPIHandle(comm.Ibcast(array, root=0), tensor)
        return HorovodHandle(hvd.broadcast_async_(tensor, root_rank=0, name=name,
                                                  process_set=self.process_set))

    def settle(self) -> None:
        """Before the process exits, once the last decision broadcast was waited for: on MPI
        a barrier, so that no rank finalizes MPI while another still receives it."""
        if self._mpi_comm is not None:
            self._mpi_comm.Barrier()

    def sparse_allreduce(self, grad: Tensor, name: str, average: bool) -> _Deferred:
        """A torch sparse gradient, uncompressed, through Horovod's sparse allreduce
        (allgather of indices and values); the result is a sparse tensor."""
        op = hvd.Average if average else hvd.Sum
        return _Deferred(hvd.sparse_allreduce_async(grad, name=name, op=op,
                                                    process_set=self.process_set))

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


__all__ = ["HorovodHandle", "HorovodTransport", "allgather_object", "broadcast_object",
           "hvd", "import_mpi4py", "world"]
