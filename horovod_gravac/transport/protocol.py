"""What every transport provides, and what both share: the wire format of a gathered message
and the traffic each kind of collective puts on a rank's link.

A transport (Horovod's in :mod:`.horovod`, torch.distributed's in :mod:`.torch_distributed`)
starts four asynchronous collectives; the engine (``engine``) decides what goes into them.
Every collective sums, gathers or scatters one buffer:

* ``allreduce(tensors, name)`` — the sum over ranks of each tensor, in place, as one fused
  collective;
* ``allgather(buffer, name, same_size)`` — every rank's uint8 buffer, in rank order. When the
  sizes differ by rank (``same_size`` false) each buffer starts with its own length in bytes
  as an int64 (:func:`pack` with ``header``), which is how a rank's part is found again
  (torch.distributed's ``all_gather`` needs one size: there the transport first agrees on
  the largest, in a small blocking allreduce);
* ``alltoall(buffer, name)`` — a uint8 buffer of N rows of one size (:func:`pack_rows`): row
  j goes to rank j, and the result has the same shape, row i from rank i (Horovod's
  ``alltoall``, torch.distributed's ``all_to_all_single``; a two-stage exchange's chunks);
* ``broadcast(tensor, name)`` — rank 0's float64 values on every rank (the agents' decision).

Each returns a :class:`Handle` whose ``wait()`` blocks until the result is there. Horovod's
transport also sums torch sparse gradients (``sparse_allreduce``); DDP never hands a hook one.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch
from torch import Tensor

from ..compression.base import WIRE_ALIGN, Exchange, align

HEADER_DTYPE = torch.int64


class Handle(Protocol):
    """A collective in flight."""

    def wait(self) -> Tensor | list[Tensor]: ...


class Transport(Protocol):
    """The collectives the engine needs, on one group of ranks."""

    @property
    def rank(self) -> int: ...

    @property
    def size(self) -> int: ...

    @property
    def control_device(self) -> torch.device:
        """Where the agents' decision travels (the backend's device for small tensors)."""

    # optional: ``included`` (default True), whether this process is one of the ranks (a
    # Horovod process outside its process set has no rank and never exchanges)

    def allreduce(self, tensors: list[Tensor], name: str) -> Handle: ...
    def allgather(self, buffer: Tensor, name: str, same_size: bool) -> Handle: ...
    def alltoall(self, buffer: Tensor, name: str) -> Handle: ...
    def broadcast(self, tensor: Tensor, name: str) -> Handle: ...


def pack(tensors: Sequence[Tensor], header: bool) -> Tensor:
    """Tensors → one flat uint8 buffer: [length, n0, n1, … as int64][t0][t1]…, each tensor's
    bytes padded to 8 so that every part can be viewed in its dtype again.

    Without ``header`` only the padded bytes: the receiver knows every rank's sizes.
    """
    device = tensors[0].device
    parts = []
    for t in tensors:
        raw = t.reshape(-1).contiguous().view(torch.uint8)
        parts.append(raw)
        if raw.numel() % WIRE_ALIGN:
            parts.append(raw.new_zeros((-raw.numel()) % WIRE_ALIGN))
    if header:
        body = sum(p.numel() for p in parts)
        length = 8 * (1 + len(tensors)) + body
        lengths = torch.tensor([length, *(t.numel() for t in tensors)], dtype=HEADER_DTYPE)
        # made on the host, copied without waiting for the device's queue
        parts.insert(0, lengths.to(device, non_blocking=True).view(torch.uint8))
    return torch.cat(parts)


def header_length(part: Tensor) -> int:
    """The length in bytes a headed buffer declares (one host read)."""
    return int(part[:8].view(HEADER_DTYPE).item())


def unpack(part: Tensor, dtypes: Sequence[torch.dtype],
           counts: Sequence[int] | None) -> tuple[list[Tensor], int]:
    """One rank's buffer → its tensors (flat, in ``dtypes``) and the offset after them.

    ``counts`` (elements per tensor) for a buffer packed without a header; otherwise its
    header is read (one host read).
    """
    offset = 0
    if counts is None:
        counts = part[8:8 * (1 + len(dtypes))].view(HEADER_DTYPE).tolist()
        offset = 8 * (1 + len(dtypes))
    tensors = []
    for count, dtype in zip(counts, dtypes):
        size = count * dtype.itemsize
        tensors.append(part[offset:offset + size].view(dtype))
        offset += align(size)
    return tensors, offset


def pack_rows(tensors: Sequence[Tensor], rows: int) -> Tensor:
    """Tensors of ``rows`` rows each → one (rows, B) uint8 buffer: row j holds row j of every
    tensor, in order, each padded to 8 bytes (an alltoall's message: row j for rank j)."""
    parts = []
    for t in tensors:
        raw = t.reshape(rows, -1).contiguous().view(torch.uint8)
        parts.append(raw)
        if raw.shape[1] % WIRE_ALIGN:
            parts.append(raw.new_zeros(rows, (-raw.shape[1]) % WIRE_ALIGN))
    return torch.cat(parts, dim=1)


def unpack_rows(buffer: Tensor, dtypes: Sequence[torch.dtype],
                counts: Sequence[int]) -> list[Tensor]:
    """Inverse of :func:`pack_rows`: (rows, count) views in ``dtypes``, ``counts`` elements
    per row of each tensor."""
    tensors, offset = [], 0
    for count, dtype in zip(counts, dtypes):
        size = count * dtype.itemsize
        tensors.append(buffer[:, offset:offset + size].view(dtype))
        offset += align(size)
    return tensors


def link_bytes(exchange: Exchange, payload_bytes: float, world_size: int) -> float:
    """Bytes one rank's link carries for a collective on ``payload_bytes`` per rank.

    Ring algorithms (Horovod's and Gloo's): an allreduce sends 2(N−1)/N of the buffer
    (reduce-scatter, then allgather), an allgather (N−1) payloads — the cost of the same
    payload grows with the world size for allgathers and stays near 2× for allreduces; an
    alltoall sends every row but its own, (N−1)/N of the buffer.
    """
    n = world_size
    if exchange is Exchange.ALLGATHER:
        return (n - 1) * payload_bytes
    if exchange is Exchange.ALLTOALL:
        return (n - 1) / n * payload_bytes
    return 2 * (n - 1) / n * payload_bytes


def link_steps(exchange: Exchange | None, world_size: int) -> int:
    """Message steps one after another that a collective takes on a ring of ``world_size``
    ranks, each paying the link's latency once: an allreduce 2(N−1) (reduce-scatter, then
    allgather), an allgather and an alltoall N−1 (the pairwise exchange's rounds), a
    broadcast (``None``) N−1. Every kind grows as N−1, which is what lets a latency
    measured at one world size be carried to another (``benchmarks.whatif``)."""
    steps = world_size - 1
    return 2 * steps if exchange is Exchange.ALLREDUCE else steps
