"""PowerSGD low-rank compression (Vogels, Karimireddy & Jaggi, NeurIPS 2019).

A gradient reshaped to M ∈ R^{n×m} (n = first dimension) is approximated by P Qᵀ with rank r:

    P = M Q            → allreduce(P), orthogonalize P
    Q = Mᵀ P           → allreduce(Q)
    M̂ = P Qᵀ           (the same on every rank; the error M − M̂ feeds back next step)

Q is kept between steps (warm start: one power iteration per step refines it), so the
quality improves over time at no extra cost. Q starts from a seed shared by every rank, as the
allreduce of P only makes sense if all ranks multiply by the same Q. Vectors (biases) and
matrices too small to gain (r·(n+m) ≥ n·m) go uncompressed.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from ..validation import check_number
from .base import Ctx, Exchange, Payload, SeededCompressor, is_finite


def orthogonalize(p: Tensor) -> Tensor:
    """Orthonormal columns spanning ``p`` (reduced QR; fine for the tiny r used here)."""
    return torch.linalg.qr(p, mode="reduced").Q


class PowerSGD(SeededCompressor):
    """Rank-``rank`` PowerSGD with warm start; exchanged in two allreduces (P, then Q)."""

    name = "powersgd"
    exchange = Exchange.LOWRANK
    default_memory = "residual"
    state_is_shared = True

    def __init__(self, rank: int = 1, seed: int = 0, warm_start: bool = True) -> None:
        super().__init__(None, seed)
        self.rank = check_number("rank (PowerSGD uses 1-4)", rank, 1, integer=True)
        self.warm_start = bool(warm_start)
        self.qs: dict[str, Tensor] = {}

    def _matrix_shape(self, shape: torch.Size) -> tuple[int, int] | None:
        if len(shape) < 2:
            return None
        n, m = shape[0], shape.numel() // max(1, shape[0])
        if self.rank * (n + m) >= n * m:
            return None
        return n, m

    def compress(self, tensor: Tensor, name: str = "", step: int = 0) -> tuple[Payload, Ctx]:
        """Phase 1: P = M Q. Tensors that don't gain go as a dense allreduce."""
        dims = self._matrix_shape(tensor.shape)
        if dims is None:
            wire = tensor.float() if tensor.dtype == torch.bfloat16 else tensor
            return (wire,), Ctx(tensor.shape, tensor.dtype, Exchange.ALLREDUCE)
        n, m = dims
        matrix = tensor.reshape(n, m).float()
        q = self.qs.get(name) if self.warm_start else None
        if q is None or q.shape != (m, self.rank) or q.device != matrix.device:
            gen = self.generator(matrix.device, "powersgd-q", name)
            q = torch.randn(m, self.rank, generator=gen, device=matrix.device)
        q = orthogonalize(q)
        return (matrix @ q,), Ctx(tensor.shape, tensor.dtype, self.exchange,
                                  {"matrix": matrix, "name": name, "q_start": q})

    def compress_second(self, p_sum: Tensor, ctx: Ctx) -> Payload:
        """Phase 2, from the allreduced P: orthogonalize it and send Q = Mᵀ P."""
        p = orthogonalize(p_sum)
        q = ctx.extra["matrix"].t() @ p
        ctx.extra.update(p=p, q_local=q)
        return (q,)

    def decompress(self, payload: Payload, ctx: Ctx) -> Tensor:
        """From the allreduced Q (or a dense tensor): M̂ = P Qᵀ."""
        if ctx.exchange is Exchange.ALLREDUCE:
            return payload[0].to(ctx.dtype).view(ctx.shape)
        q = payload[0]
        if self.warm_start:  # a NaN step must not stick: keep the Q this step started from
            self.qs[ctx.extra["name"]] = torch.where(is_finite(q), q, ctx.extra["q_start"])
        return (ctx.extra["p"] @ q.t()).to(ctx.dtype).view(ctx.shape)

    def error(self, compensated: Tensor, payload: Payload, ctx: Ctx) -> Tensor:
        """Local error M − P Q_localᵀ (= M − P Pᵀ M), as in the paper's Algorithm 2."""
        if ctx.exchange is Exchange.ALLREDUCE:
            return torch.zeros_like(compensated)  # not in place: the payload is ``compensated``
        local = ctx.extra["p"] @ ctx.extra["q_local"].t()
        # P comes from every rank: if a peer's gradient was NaN, nothing of this step is
        # applied, so keep all of it (a non-finite P must not enter this rank's residual).
        local.masked_fill_(~is_finite(local), 0.0)
        return compensated.sub_(local.to(compensated.dtype).view(compensated.shape))

    def aggregate(self, payloads: Sequence[Payload], ctx: Ctx) -> Tensor:
        return self.decompress((torch.stack([p[0] for p in payloads]).sum(0),), ctx)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "qs": {k: v.clone() for k, v in self.qs.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.qs = {k: v.clone() for k, v in state.get("qs", {}).items()}
