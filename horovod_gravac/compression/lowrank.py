"""PowerSGD low-rank compression (Vogels, Karimireddy & Jaggi, NeurIPS 2019).

A gradient reshaped to M ∈ R^{n×m} (n = first dimension) is approximated by P Qᵀ with rank r,
in two exchange rounds that the engine runs for a whole bucket at a time (``ctx.rounds`` = 2):

    round 1:  P = M Q                      (compress)      → P summed over ranks
    round 2:  P̂ = orth(ΣP), Q = Mᵀ P̂       (next_round)    → Q averaged over ranks
    M̂ = P̂ Qᵀ                               (decompress; the same on every rank)

The error M − P̂ Q_localᵀ feeds back at the next step (the paper's Algorithm 2).

Q is kept between steps (warm start: one power iteration per step refines it), so the
quality improves over time at no extra cost. Q starts from a seed shared by every rank, as the
allreduce of P only makes sense if all ranks multiply by the same Q. Vectors (biases) and
matrices too small to gain (r·(n+m) ≥ n·m) go uncompressed.

**Driven by a CF** (beyond the paper, so GraVAC, Accordion and static agents can set it): a
rank-r approximation of an n×m matrix sends r(n+m) values instead of nm, so a CF maps to the
rank r = ⌊nm / (CF·(n+m))⌋ per matrix (at least 1, at most ``max_rank``). Without a CF (the
default), every matrix gets ``rank``. Multi-level compression is a truncation: P at rank
r_min is M·Q[:, :r_min], and its first r_c columns are exactly P at rank r_c (so are the first
r_c columns of its orthogonalisation), which makes GraVAC's C(C(M, θmin), θs) one slice.
The gain of a level is measured locally, before any exchange: with P̂ = orth(P) and
Q = Mᵀ P̂, ‖P̂ Qᵀ‖² = ‖Q‖², so δ = ‖Q‖² / ‖M‖².
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from ..validation import check_bool, check_number
from .base import Ctx, Exchange, Payload, SeededCompressor, is_finite, validate_cf


#: subspace iterations of :meth:`PowerSGD.settled_energy_profile`
SETTLE_ITERATIONS = 4


def orthogonalize(p: Tensor) -> Tensor:
    """Orthonormal columns spanning ``p``: reduced QR, or a normalisation at rank 1."""
    if p.shape[1] == 1:
        norm = torch.linalg.vector_norm(p)
        return p / torch.where(norm > 0, norm, torch.ones_like(norm))
    return torch.linalg.qr(p, mode="reduced").Q


def length_squared_sketch(matrix: Tensor, top: int, sample: int | None,
                          generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor] | None:
    """A length-squared sketch of ``matrix``'s longer side (Drineas, Kannan & Mahoney 2006)
    — s = max(4·top, ⌈sample / shorter side⌉) lines drawn with probability ∝ their squared
    norm and scaled, so that the sketch's Gram matrix is the matrix's in expectation
    (s × shorter side) —, the lines picked and their scales; None where it would hold every
    line (or ``sample`` is None)."""
    lines = matrix if matrix.shape[0] >= matrix.shape[1] else matrix.t()
    long, short = lines.shape
    s = long if sample is None else min(long, max(4 * top, -(-sample // short)))
    if s >= long:
        return None
    weights = torch.nan_to_num(lines.pow(2).sum(1), nan=0.0, posinf=0.0)
    tiny = torch.finfo(weights.dtype).tiny
    picked = torch.multinomial(weights.clamp_min(tiny), s, replacement=True, generator=generator)
    scale = (weights.sum() / (s * weights[picked].clamp_min(tiny))).sqrt().unsqueeze(1)
    return lines[picked] * scale, picked, scale


class PowerSGD(SeededCompressor):
    """Rank-``rank`` PowerSGD with warm start; exchanged in two summed rounds (P, then Q).

    Arguments:
        rank: the rank of every matrix when no CF is given.
        seed: seed of the initial Q, the same on every rank.
        warm_start: keep Q between steps (one power iteration per step refines it).
        cf: a compression factor instead of a fixed rank: each matrix gets
            r = ⌊nm / (cf·(n+m))⌋ (an agent's ``cf=`` per call does the same).
        max_rank: the largest rank a CF may give (the orthogonalisation costs O(n·r²)).
    """

    name = "powersgd"
    exchange = Exchange.ALLREDUCE
    default_memory = "residual"
    state_is_shared = True
    adjustable_cf = True

    def __init__(self, rank: int = 1, seed: int = 0, warm_start: bool = True,
                 cf: float | None = None, max_rank: int = 64) -> None:
        super().__init__(None, seed)
        self.rank = check_number("rank (PowerSGD uses 1-4)", rank, 1, integer=True)
        self.max_rank = check_number("max_rank", max_rank, self.rank, integer=True)
        self.warm_start = check_bool("warm_start", warm_start)
        self._cf = None if cf is None else validate_cf(cf)
        self.qs: dict[str, Tensor] = {}

    @property
    def cf(self) -> float | None:
        """The CF that sets each matrix's rank, or None: every matrix at ``rank``."""
        return self._cf

    @cf.setter
    def cf(self, value: float | None) -> None:
        self._cf = None if value is None else validate_cf(value)

    def rank_for(self, n: int, m: int, cf: float | None = None) -> int:
        """The rank of an n×m matrix at ``cf`` (default: the compressor's CF, else ``rank``)."""
        cf = self._cf if cf is None else cf
        if cf is None:
            return self.rank
        return max(1, min(self.max_rank, int(n * m // (cf * (n + m)))))

    def _matrix_shape(self, shape: torch.Size, cf: float | None) -> tuple[int, int, int] | None:
        """(n, m, rank) of the matrix view, or None when a rank-r approximation would not
        send fewer values than the tensor (vectors, small matrices)."""
        if len(shape) < 2:
            return None
        n, m = shape[0], shape.numel() // max(1, shape[0])
        rank = self.rank_for(n, m, cf)
        if rank * (n + m) >= n * m:
            return None
        return n, m, rank

    def _start_q(self, name: str, m: int, rank: int, device: torch.device) -> Tensor:
        """Q (m × rank) this step starts from: the kept one (its first ``rank`` columns),
        completed with seeded random columns where it has fewer."""
        kept = self.qs.get(name) if self.warm_start else None
        if kept is not None and (kept.shape[0] != m or kept.device != device):
            kept = None
        have = 0 if kept is None else kept.shape[1]
        if have >= rank:
            return kept[:, :rank]
        gen = self.generator(device, "powersgd-q", name)
        fresh = torch.randn(m, rank, generator=gen, device=device)
        return fresh if kept is None else torch.cat([kept, fresh[:, have:]], dim=1)

    def compress(self, tensor: Tensor, name: str = "", step: int = 0,
                 cf: float | None = None) -> tuple[Payload, Ctx]:
        """Round 1: P = M Q. Tensors that don't gain go dense, in one round."""
        dims = self._matrix_shape(tensor.shape, cf)
        if dims is None:
            wire = tensor.float() if tensor.dtype == torch.bfloat16 else tensor
            return (wire,), Ctx(tensor.shape, tensor.dtype, Exchange.ALLREDUCE, {"name": name})
        n, m, rank = dims
        matrix = tensor.reshape(n, m).float()
        q = orthogonalize(self._start_q(name, m, rank, matrix.device))
        # "energies": ‖Mᵀ P̂‖² per column, shared with the truncations of this level
        return (matrix @ q,), Ctx(tensor.shape, tensor.dtype, self.exchange,
                                  {"matrix": matrix, "name": name, "q_start": q,
                                   "energies": [None]}, rounds=2)

    def recompress(self, payload: Payload, ctx: Ctx, cf: float) -> tuple[Payload, Ctx]:
        """The level at ``cf`` from the level at a lower CF: the first columns of P and Q."""
        if ctx.rounds == 1:  # the lower level was dense: compress afresh
            return self.compress(payload[0].view(ctx.shape), ctx.extra["name"], cf=cf)
        matrix = ctx.extra["matrix"]
        rank = min(self.rank_for(*matrix.shape, cf), payload[0].shape[1])
        return (payload[0][:, :rank].contiguous(),), Ctx(
            ctx.shape, ctx.dtype, self.exchange,
            {**ctx.extra, "q_start": ctx.extra["q_start"][:, :rank]}, rounds=2)

    def sent_norm_sq(self, payload: Payload, ctx: Ctx) -> Tensor:
        """‖P̂ Qᵀ‖² = ‖Mᵀ P̂‖² with this rank's P̂ = orth(P) (before any exchange).

        A truncation keeps P's first r columns, and a QR's first r columns span those, so
        ‖Mᵀ P̂_r‖² is the sum of the first r column energies of Mᵀ P̂: computed once per level
        and shared by its truncations (every ladder CF of the cost-model search).
        """
        if ctx.rounds == 1:
            return payload[0].float().pow(2).sum()
        rank, energies = payload[0].shape[1], ctx.extra["energies"]
        if energies[0] is None or energies[0].numel() < rank:
            energies[0] = (ctx.extra["matrix"].t() @ orthogonalize(payload[0])).pow(2).sum(0)
        return energies[0][:rank].sum()

    def energy_profile(self, tensor: Tensor, cfs: Sequence[float], name: str = "",
                       step: int = 0, sample: int | None = None) -> Tensor:
        """‖P̂ Qᵀ‖² = ‖Mᵀ P̂‖² at each CF's rank from the warm-start Q, with P̂ = orth(M Q) at
        the largest rank (its truncations share it: a QR's first columns span P's first).

        With ``sample``, estimated from a length-squared sketch of the matrix (Drineas,
        Kannan & Mahoney 2006): s lines of the longer side drawn with probability ∝ their
        squared norm and scaled so that the sketch's Gram matrix equals M's in expectation
        — rows (S with SᵀS ≈ MᵀM; P̂ = orth(S Q)) or columns (C with CCᵀ ≈ MMᵀ; M Q
        estimated from the same columns) — s = max(4·r, ⌈sample / shorter side⌉): a few
        small products instead of two of M's size.
        """
        dims = self._matrix_shape(tensor.shape, cfs[0])
        if dims is None or sample is None:
            return super().energy_profile(tensor, cfs, name, step)
        n, m, top = dims
        matrix = tensor.reshape(n, m).float()
        q = self._start_q(name, m, top, matrix.device)
        sketched = length_squared_sketch(
            matrix, top, sample, self.generator(matrix.device, "powersgd-gain", name, step))
        if sketched is None:
            side, p = matrix.t(), matrix @ q
        else:
            sketch, picked, scale = sketched
            if n >= m:  # rows: P̂ from the sketched rows
                side, p = sketch.t(), sketch @ q
            else:  # columns: M Q ≈ Σ_j M[:, j] Q[j] / (s p_j), from the sketched columns
                side, p = sketch, sketch.t() @ (q[picked] * scale)
        energies = (side @ orthogonalize(p)).pow(2).sum(0).cumsum(0)
        return torch.stack([energies[min(self.rank_for(n, m, cf), top) - 1] for cf in cfs])

    def settled_energy_profile(self, tensor: Tensor, cfs: Sequence[float], name: str = "",
                               step: int = 0, sample: int | None = None) -> Tensor:
        """The energy a warm-started Q settles at: the best rank-r approximation's, ‖M‖²'s
        share in the top r singular directions, from ``SETTLE_ITERATIONS`` subspace
        iterations on the Gram matrix of M's shorter side (of the same length-squared
        sketch as :meth:`energy_profile`; the Gram matrix is never formed). For a PowerSGD
        not sent yet, whose own Q is still the seeded one: one power iteration from a random
        Q underestimates what sending it for a few steps would reach, the more so at low
        rank."""
        dims = self._matrix_shape(tensor.shape, cfs[0])
        if dims is None:
            return super().energy_profile(tensor, cfs, name, step)
        n, m, top = dims
        matrix = tensor.reshape(n, m).float()
        sketched = length_squared_sketch(
            matrix, top, sample, self.generator(matrix.device, "powersgd-gain", name, step))
        lines = (matrix if n >= m else matrix.t()) if sketched is None else sketched[0]
        gen = self.generator(matrix.device, "powersgd-settle", name)
        v = torch.randn(lines.shape[1], top, generator=gen, device=matrix.device)
        for _ in range(SETTLE_ITERATIONS):  # v ← orth(LᵀL v), L: the (sketched) lines
            v = orthogonalize(lines.t() @ (lines @ v))
        energies = (lines @ v).pow(2).sum(0).cumsum(0)
        return torch.stack([energies[min(self.rank_for(n, m, cf), top) - 1] for cf in cfs])

    def error_profile(self, tensor: Tensor, cfs: Sequence[float], name: str = "",
                      step: int = 0, sample: int | None = None) -> Tensor:
        """‖M‖² − ‖P̂ᵀM‖² (P̂P̂ᵀ projects): from :meth:`energy_profile`, with the warm Q."""
        return self.projection_errors(tensor, cfs, name, step, sample)

    def settled_error_profile(self, tensor: Tensor, cfs: Sequence[float], name: str = "",
                              step: int = 0, sample: int | None = None) -> Tensor:
        """‖M‖² less the energy a warm-started Q settles at (:meth:`settled_energy_profile`)."""
        return self.projection_errors(tensor, cfs, name, step, sample, settled=True)

    def expected_bytes(self, shape: torch.Size, cf: float | None = None) -> tuple[int, Exchange]:
        """P (n×r) and Q (m×r) in float32, or the dense tensor where rank r would not gain."""
        dims = self._matrix_shape(shape, cf)
        if dims is None:
            return 4 * shape.numel(), Exchange.ALLREDUCE
        n, m, rank = dims
        return 4 * rank * (n + m), Exchange.ALLREDUCE

    def expected_rounds(self, shape: torch.Size,
                        cf: float | None = None) -> tuple[tuple[int, Exchange], ...]:
        """Two summed rounds, P (n×r) then Q (m×r); one dense sum where rank r would not gain."""
        dims = self._matrix_shape(shape, cf)
        if dims is None:
            return ((4 * shape.numel(), Exchange.ALLREDUCE),)
        n, m, rank = dims
        return (4 * rank * n, Exchange.ALLREDUCE), (4 * rank * m, Exchange.ALLREDUCE)

    def next_round(self, reduced: Payload, ctx: Ctx) -> Payload:
        """Round 2, from P summed over ranks: orthogonalize it and send Q = Mᵀ P̂."""
        p = orthogonalize(reduced[0])
        q = ctx.extra["matrix"].t() @ p
        ctx.extra.update(p=p, q_local=q)
        return (q,)

    def decompress(self, payload: Payload, ctx: Ctx) -> Tensor:
        """From the reduced Q (or a dense tensor): M̂ = P̂ Qᵀ."""
        if ctx.rounds == 1:
            return payload[0].to(ctx.dtype).view(ctx.shape)
        q = payload[0]
        self._keep_q(q, ctx)
        return (ctx.extra["p"] @ q.t()).to(ctx.dtype).view(ctx.shape)

    def _keep_q(self, q: Tensor, ctx: Ctx) -> None:
        """Warm start: the reduced Q is where the next step starts."""
        if self.warm_start:  # a NaN step must not stick: keep the Q this step started from
            q_next = torch.where(is_finite(q), q, ctx.extra["q_start"])
            kept = self.qs.get(ctx.extra["name"])
            if kept is not None and kept.shape[0] == q.shape[0] and kept.shape[1] > q.shape[1]:
                q_next = torch.cat([q_next, kept[:, q.shape[1]:]], dim=1)  # keep higher columns
            self.qs[ctx.extra["name"]] = q_next

    def error(self, compensated: Tensor, payload: Payload, ctx: Ctx) -> Tensor:
        """Local error M − P̂ Q_localᵀ (= M − P̂ P̂ᵀ M), as in the paper's Algorithm 2."""
        if ctx.rounds == 1:
            return torch.zeros_like(compensated)  # not in place: the payload is ``compensated``
        # P comes from every rank: if a peer's gradient was NaN, nothing of this step is
        # applied, so keep all of it (a non-finite P must not enter this rank's residual);
        # checked on the thin factors, not on their n×m product
        p, q = ctx.extra["p"], ctx.extra["q_local"]
        ok = is_finite(p) & is_finite(q)
        p, q = torch.where(ok, p, 0.0), torch.where(ok, q, 0.0)
        if compensated.dtype == torch.float32 and compensated.is_contiguous():
            compensated.view(p.shape[0], -1).addmm_(p, q.t(), alpha=-1)  # one pass
            return compensated
        return compensated.sub_((p @ q.t()).to(compensated.dtype).view(compensated.shape))

    def aggregate(self, payloads: Sequence[Payload], ctx: Ctx,
                  out: Tensor | None = None) -> Tensor:
        q = payloads[0] if len(payloads) == 1 else (torch.stack([p[0] for p in payloads]).sum(0),)
        if out is None or ctx.rounds == 1 or out.dtype != torch.float32 or \
                not out.is_contiguous():
            return super().aggregate((q,), ctx, out)
        self._keep_q(q[0], ctx)  # as decompress does
        return torch.mm(ctx.extra["p"], q[0].t(), out=out.view(ctx.extra["p"].shape[0], -1)
                        ).view(ctx.shape)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "qs": {k: v.clone() for k, v in self.qs.items()}}

    def __repr__(self) -> str:
        return f"PowerSGD({f'cf={self._cf:g}' if self._cf is not None else f'rank={self.rank}'})"

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.qs = {k: v.clone() for k, v in state.get("qs", {}).items()}
