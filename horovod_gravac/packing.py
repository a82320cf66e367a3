"""What both transports share: payload tensors ↔ one flat uint8 buffer (the unit an
allgather moves), and the traffic each kind of collective puts on a rank's link."""
from __future__ import annotations

import torch
from torch import Tensor

from .compression import Exchange, Payload

_ALIGN = 8


def pack(payload: Payload, header: bool = True) -> Tensor:
    """Payload tensors → one flat uint8 tensor: [n0 n1 … as int64][bytes of t0][bytes of t1]…

    Without ``header`` only the padded bytes: the receiver must know every rank's sizes.
    """
    parts = [torch.tensor([t.numel() for t in payload], dtype=torch.int64,
                          device=payload[0].device).view(torch.uint8)] if header else []
    for t in payload:
        raw = t.reshape(-1).contiguous().view(torch.uint8)
        pad = (-raw.numel()) % _ALIGN
        parts.append(raw)
        if pad:
            parts.append(raw.new_zeros(pad))
    return torch.cat(parts)


def _split(buffer: Tensor, offset: int, counts: list[int],
           dtypes: list[torch.dtype]) -> tuple[Payload, int]:
    tensors = []
    for count, dtype in zip(counts, dtypes):
        size = count * dtype.itemsize
        tensors.append(buffer[offset:offset + size].view(dtype))
        offset += size + (-size) % _ALIGN
    return tuple(tensors), offset


def unpack(buffer: Tensor, dtypes: list[torch.dtype], ranks: int,
           counts: list[int] | None = None) -> list[Payload]:
    """Split an allgathered buffer into each rank's payload (flat tensors, given dtypes).

    ``counts`` (elements per payload tensor, the same on every rank) for buffers packed
    without a header; otherwise each rank's header is read (one host read per rank).
    """
    payloads, offset, header = [], 0, 8 * len(dtypes)
    for _ in range(ranks):
        rank_counts = counts
        if rank_counts is None:
            rank_counts = buffer[offset:offset + header].view(torch.int64).tolist()
            offset += header
        payload, offset = _split(buffer, offset, rank_counts, dtypes)
        payloads.append(payload)
    return payloads


def link_bytes(exchange: Exchange, payload_bytes: float, world_size: int) -> float:
    """Bytes one rank's link carries for a collective on ``payload_bytes`` per rank.

    Ring algorithms (Horovod's and Gloo's): an allreduce sends 2(N−1)/N of the buffer
    (reduce-scatter, then allgather), an allgather (N−1) payloads — the cost of the same
    payload grows with the world size for allgathers and stays near 2× for allreduces.
    PowerSGD's two phases are allreduces.
    """
    n = world_size
    if exchange is Exchange.ALLGATHER:
        return (n - 1) * payload_bytes
    return 2 * (n - 1) / n * payload_bytes
