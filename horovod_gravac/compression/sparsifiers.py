"""Sparsifiers: send a subset of the elements as (values, int32 indices).

k = max(1, ⌊n/CF⌋) (:func:`num_selected`). Except RandomK, the selected positions differ by
rank, so payloads are all-gathered and summed with one ``index_add_`` per rank, in rank
order (the same sum, bit for bit, on every rank and device).

On accelerators (see :func:`~.base.sizes_may_depend_on_data`) TopK, RandomK and DGC take
paths whose payload size is exactly k and that never read a value back to the host, so the
backward hooks do not stall the host; on the CPU they use cheaper data-dependent passes.

Selection by threshold uses ``~(|t| < thr)`` rather than ``|t| >= thr`` so that NaN elements are
selected and show up in the payload instead of hiding in the residual.
"""
from __future__ import annotations

import math
from typing import ClassVar, Sequence

import torch
from torch import Tensor

from ..validation import check_bool, check_number
from .base import (Compressor, Ctx, Exchange, Payload, SeededCompressor, finite_marker,
                   num_selected, sizes_may_depend_on_data)
from .quantizers import pack_bits, unpack_bits

_INT32_MAX = 2**31 - 1


def _index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel <= _INT32_MAX else torch.int64


def _select_at_least(magnitude: Tensor, thr: Tensor | float, mask: Tensor | None = None) -> Tensor:
    """Indices of elements with |t| ≥ thr (and of NaNs); ``mask``: a bool buffer to use."""
    below = torch.lt(magnitude, thr) if mask is None else torch.lt(magnitude, thr, out=mask)
    return torch.nonzero(below.logical_not_()).view(-1)


def exact_topk_indices(magnitude: Tensor, k: int, sample: int = 4096,
                       mask: Tensor | None = None) -> Tensor:
    """Indices of the k largest entries of ``magnitude`` (a 1-D, non-negative tensor).

    The same set as ``torch.topk(magnitude, k)`` (up to ties), but a full sort is avoided:
    a threshold a bit below the k-th largest is estimated from a strided sample, the
    candidates above it are selected in one pass, and ``torch.topk`` runs on those few only.
    If too few candidates pass (a bad estimate), the threshold is halved and the pass redone;
    correctness never depends on the estimate.
    """
    n = magnitude.numel()
    if k >= n:
        return torch.arange(n, device=magnitude.device)
    if n <= 4 * sample or k * 8 > n or not sizes_may_depend_on_data(magnitude):
        return torch.topk(magnitude, k, sorted=False).indices
    stride = n // sample
    probe = magnitude[::stride]
    # Aim for ~1.5k candidates: the (1.5 k/n)-quantile from the top of the sample.
    rank = min(probe.numel(), max(1, math.ceil(1.5 * k * probe.numel() / n) + 2))
    thr = torch.topk(probe, rank, sorted=False).values.min()
    while True:
        cand = _select_at_least(magnitude, thr, mask)
        if cand.numel() >= k or not thr > 0:
            break
        thr = thr / 2
    if cand.numel() < k:  # only zeros left below thr: fall back to the exact routine
        return torch.topk(magnitude, k, sorted=False).indices
    return cand[torch.topk(magnitude[cand], k, sorted=False).indices]


#: reduced-precision dtypes a sparse payload's values may travel in (``value_dtype``)
VALUE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}


def check_value_dtype(value_dtype: str | None) -> torch.dtype | None:
    """``value_dtype`` as a torch dtype (None: the gradient's own), or a ValueError."""
    if value_dtype is None:
        return None
    if value_dtype not in VALUE_DTYPES:
        raise ValueError(f"value_dtype must be None (the gradient's dtype) or one of "
                         f"{sorted(VALUE_DTYPES)}, got {value_dtype!r}")
    return VALUE_DTYPES[value_dtype]


def _bitmap_is_smaller(numel: int, k: int) -> bool:
    """A bitmap of n bits is smaller than k int32 indices when k > n/32 (CF < 32)."""
    return (numel + 7) // 8 < 4 * k


class Sparsifier(Compressor):
    """Common machinery: (values, indices) payloads, sparse sum, in-place residuals.

    Positions travel as int32 indices or, for selections of exactly k elements (TopK) where
    it is smaller (k > n/32, i.e. CF < 32), as a bitmap of n bits with the values in index
    order; ``value_dtype`` (TopK, DGC) sends the values in float16 or bfloat16, and the
    rounding error then stays in the residual.
    """

    exchange = Exchange.ALLGATHER
    adjustable_cf = True
    nominal_cf = 100.0
    #: True when ``select`` returns exactly k indices (the payload size is the same on every
    #: rank); threshold-based selections return about k
    selects_exactly_k: ClassVar[bool] = False
    value_dtype: torch.dtype | None = None

    def magnitude(self, flat: Tensor) -> Tensor:
        """|flat| in a reused buffer."""
        return torch.abs(flat, out=self.scratch(flat, flat.dtype))

    def select(self, flat: Tensor, k: int, name: str, step: int) -> Tensor:
        """Indices of the elements to send from the 1-D ``flat`` (about k of them)."""
        raise NotImplementedError

    def compress(self, tensor: Tensor, name: str = "", step: int = 0,
                 cf: float | None = None) -> tuple[Payload, Ctx]:
        flat = tensor.reshape(-1)
        ctx = Ctx(tensor.shape, tensor.dtype, self.exchange,
                  varying_size=not self.selects_exactly_k)
        if flat.numel() == 0:
            return (flat, flat.new_zeros(0, dtype=torch.int32)), ctx
        indices = self.select(flat, num_selected(flat.numel(), cf or self.cf), name, step)
        return self._payload(flat, indices, ctx), ctx

    def _payload(self, flat: Tensor, indices: Tensor, ctx: Ctx) -> Payload:
        """The payload that sends ``flat`` at ``indices`` (values in ``value_dtype``)."""
        return self._encode(flat[indices].to(self.value_dtype or flat.dtype), indices, ctx)

    def _encode(self, values: Tensor, indices: Tensor, ctx: Ctx) -> Payload:
        """(values, int32 indices), or (values in index order, bitmap) when that is smaller
        and every rank sends exactly k (the form is then the same on every rank)."""
        n = ctx.numel
        if not (self.selects_exactly_k and _bitmap_is_smaller(n, indices.numel())):
            return values, indices.to(_index_dtype(n))
        indices, order = indices.sort()
        ctx.extra["indices"] = indices  # local only: multi-level selection and memories
        mask = torch.zeros(n, dtype=torch.bool, device=values.device)
        mask[indices] = True
        return values[order], pack_bits(mask)

    @staticmethod
    def _is_bitmap(payload: Payload) -> bool:
        return len(payload) > 1 and payload[1].dtype == torch.uint8

    def decompress(self, payload: Payload, ctx: Ctx) -> Tensor:
        values, positions = payload[0], payload[1]
        out = torch.zeros(ctx.numel, dtype=ctx.dtype, device=values.device)
        if self._is_bitmap(payload):
            out.masked_scatter_(unpack_bits(positions, ctx.numel), values.to(ctx.dtype))
        else:
            out.index_add_(0, positions.long(), values.to(ctx.dtype))
        return out.view(ctx.shape)

    def aggregate(self, payloads: Sequence[Payload], ctx: Ctx,
                  out: Tensor | None = None) -> Tensor:
        """The sum of every rank's (values, indices): one ``index_add_`` per rank, in rank
        order (into ``out``, zeroed, if given). Not one over all ranks' payloads at once:
        positions repeat across ranks, and on CUDA repeated positions add atomically in an
        order that varies, so ranks could decode different sums; within one payload they
        are distinct (DGC's padding adds zeros)."""
        if self._is_bitmap(payloads[0]) or (out is not None and not out.is_contiguous()):
            return Compressor.aggregate(self, payloads, ctx, out)
        target = torch.zeros(ctx.numel, dtype=ctx.dtype, device=payloads[0][0].device) \
            if out is None else out.view(-1).zero_()
        for values, positions in payloads:
            target.index_add_(0, positions.long(), values.to(ctx.dtype))
        return target.view(ctx.shape)

    def sent_norm_sq(self, payload: Payload, ctx: Ctx) -> Tensor:
        return payload[0].float().pow(2).sum()  # O(k): the values are all that is sent

    def energy_profile(self, tensor: Tensor, cfs: Sequence[float], name: str = "",
                       step: int = 0, sample: int | None = None) -> Tensor:
        """Energy of the k = ⌊n/cf⌋ largest |t| for each CF (what every sparsifier here
        approximates), from one sort of the largest of them.

        With ``sample``, estimated from a strided sample of that many elements when the
        tensor has more: the fraction of the sample's energy in its ⌊s/cf⌋ largest, times
        ‖t‖². Cost O(s log s) instead of a selection over n.
        """
        flat = tensor.reshape(-1).float()
        n = flat.numel()
        if n == 0:
            return flat.new_zeros(len(cfs))
        picked, scale = flat, None
        if sample is not None and n > sample:
            picked = flat[::n // sample][:sample]
            tiny = torch.finfo(flat.dtype).tiny
            scale = torch.linalg.vector_norm(flat).square() / \
                torch.linalg.vector_norm(picked).square().clamp_min(tiny)
        counts = [num_selected(picked.numel(), cf) for cf in cfs]
        top = torch.topk(picked.abs(), max(counts), sorted=True).values
        cumulative = top.pow(2).cumsum(0)
        energies = torch.stack([cumulative[c - 1] for c in counts])  # views: no host copy
        return energies if scale is None else energies * scale

    def error_profile(self, tensor: Tensor, cfs: Sequence[float], name: str = "",
                      step: int = 0, sample: int | None = None) -> Tensor:
        """‖t‖² less the kept energy (a selection is a projection): from :meth:`energy_profile`."""
        return self.projection_errors(tensor, cfs, name, step, sample)

    def expected_bytes(self, shape: torch.Size, cf: float | None = None) -> tuple[int, Exchange]:
        """k values and k int32 indices (or, selecting exactly k, a bitmap when smaller)."""
        n = shape.numel()
        k = num_selected(n, cf or self.cf)
        value = (self.value_dtype or torch.float32).itemsize
        positions = (n + 7) // 8 if self.selects_exactly_k and _bitmap_is_smaller(n, k) \
            else k * _index_dtype(n).itemsize
        return k * value + positions, self.exchange

    def indices(self, payload: Payload, ctx: Ctx) -> Tensor:
        """Positions (into the flattened tensor) that the payload carries."""
        if self._is_bitmap(payload):
            return ctx.extra["indices"]
        return payload[1]

    def error(self, compensated: Tensor, payload: Payload, ctx: Ctx) -> Tensor:
        values, flat = payload[0], compensated.view(-1)
        if self._is_bitmap(payload):
            return compensated.sub_(self.decompress(payload, ctx))
        if values.dtype == compensated.dtype and not ctx.extra.get("padded"):
            flat.index_fill_(0, self.indices(payload, ctx).long(), 0)
        else:  # rounded values, or padded slots repeating an index: subtract what was sent
            flat.index_add_(0, payload[1].long(), values.to(flat.dtype), alpha=-1)
        return compensated

    def recompress(self, payload: Payload, ctx: Ctx, cf: float) -> tuple[Payload, Ctx]:
        """Select within the kept values: exact top-k of them (cost ∝ k, not n)."""
        values = payload[0]
        k = num_selected(ctx.numel, cf)
        if k >= values.numel():
            return payload, ctx
        keep = exact_topk_indices(values.abs(), k)
        level = Ctx(ctx.shape, ctx.dtype, ctx.exchange,
                    {"padded": True} if ctx.extra.get("padded") else {}, ctx.varying_size)
        return self._encode(values[keep], self.indices(payload, ctx)[keep], level), level


class TopK(Sparsifier):
    """The k = ⌊n/CF⌋ largest |t|, exactly (Aji & Heafield 2017; Alistarh et al. 2018).

    ``value_dtype="float16"`` or ``"bfloat16"`` sends the values in half precision.
    """

    name = "topk"
    selects_exactly_k = True

    def __init__(self, cf: float | None = None, value_dtype: str | None = None) -> None:
        super().__init__(cf)
        self.value_dtype = check_value_dtype(value_dtype)

    def select(self, flat: Tensor, k: int, name: str, step: int) -> Tensor:
        return exact_topk_indices(self.magnitude(flat), k,
                                  mask=self.scratch(flat, torch.bool))


class RandomK(SeededCompressor, Sparsifier):
    """k indices uniformly without replacement, identical on every rank (Wangni et al. 2018).

    The indices come from a generator seeded by (seed, tensor name, step), so every rank
    picks the same ones: only the values travel, and a plain allreduce sums them.
    ``unbiased=True`` scales by n/k so that E[decompress(compress(t))] = t.
    """

    name = "randomk"
    exchange = Exchange.ALLREDUCE

    def __init__(self, cf: float | None = None, seed: int = 0, unbiased: bool = False) -> None:
        super().__init__(cf, seed)
        self.unbiased = check_bool("unbiased", unbiased)

    def sample_indices(self, numel: int, k: int, device: torch.device, name: str,
                       step: int) -> Tensor:
        """A uniform k-subset of range(numel), in O(k) when k ≪ n.

        Draws ~1.25k indices with replacement, drops duplicates, then keeps a random k of
        the distinct ones. Any permutation-invariant distribution over k-subsets is uniform,
        so the result is exactly uniform; for k > n/8 a permutation is cheaper.
        """
        gen = self.generator(device, "randomk", name, step)
        if k * 8 >= numel or not sizes_may_depend_on_data(device):
            return torch.randperm(numel, generator=gen, device=device)[:k]
        while True:
            draw = torch.randint(numel, (k + k // 4 + 16,), generator=gen, device=device)
            distinct = torch.unique(draw)
            if distinct.numel() >= k:
                pick = torch.randperm(distinct.numel(), generator=gen, device=device)[:k]
                return distinct[pick]

    def compress(self, tensor: Tensor, name: str = "", step: int = 0,
                 cf: float | None = None) -> tuple[Payload, Ctx]:
        flat = tensor.reshape(-1)
        k = num_selected(flat.numel(), cf or self.cf)
        indices = self.sample_indices(flat.numel(), k, flat.device, name, step)
        scale = flat.numel() / k if self.unbiased and k else 1.0
        values = flat[indices] * scale if scale != 1.0 else flat[indices]
        # The finite marker rides along as one extra value so NaN/Inf is never hidden.
        payload = (torch.cat([values.to(_wire_dtype(values.dtype)), finite_marker(flat)
                              .to(_wire_dtype(values.dtype))]),)
        return payload, Ctx(tensor.shape, tensor.dtype, self.exchange,
                            {"indices": indices, "scale": scale})

    def decompress(self, payload: Payload, ctx: Ctx) -> Tensor:
        values = payload[0]
        out = torch.zeros(ctx.numel, dtype=ctx.dtype, device=values.device)
        out[ctx.extra["indices"]] = values[:-1].to(ctx.dtype)
        return out.add_(values[-1].to(ctx.dtype)).view(ctx.shape)

    def aggregate(self, payloads: Sequence[Payload], ctx: Ctx,
                  out: Tensor | None = None) -> Tensor:
        return Compressor.aggregate(self, ((torch.stack([p[0] for p in payloads]).sum(0),),),
                                    ctx, out)

    def indices(self, payload: Payload, ctx: Ctx) -> Tensor:
        return ctx.extra["indices"]

    def energy_profile(self, tensor: Tensor, cfs: Sequence[float], name: str = "",
                       step: int = 0, sample: int | None = None) -> Tensor:
        """The expected energy of k = ⌊n/cf⌋ uniformly drawn elements: k/n of ‖t‖² (times
        (n/k)² when unbiased) — exact in expectation, and no draw needed."""
        n = tensor.numel()
        total = tensor.float().pow(2).sum()
        fractions = []
        for cf in cfs:
            k = num_selected(n, cf)
            fractions.append(k / n * ((n / k) ** 2 if self.unbiased else 1.0) if n else 0.0)
        return torch.stack([total * f for f in fractions])  # no host-to-device copy

    def error_profile(self, tensor: Tensor, cfs: Sequence[float], name: str = "",
                      step: int = 0, sample: int | None = None) -> Tensor:
        """The expected ‖t − C(t)‖²: (1 − k/n)‖t‖², or (n/k − 1)‖t‖² when unbiased
        (E‖C(t)‖² − ‖t‖², C being unbiased then)."""
        if not self.unbiased:
            return self.projection_errors(tensor, cfs, name, step, sample)
        total = torch.linalg.vector_norm(tensor, dtype=torch.float32).square()
        return (self.energy_profile(tensor, cfs, name, step).float() - total).clamp_min(0)

    def expected_bytes(self, shape: torch.Size, cf: float | None = None) -> tuple[int, Exchange]:
        """k values and the finiteness marker, summed over ranks (the indices are shared)."""
        return 4 * (num_selected(shape.numel(), cf or self.cf) + 1), self.exchange

    def error(self, compensated: Tensor, payload: Payload, ctx: Ctx) -> Tensor:
        if ctx.extra["scale"] != 1.0:  # unbiased: sent values were scaled, residual is not 0
            return Compressor.error(self, compensated, payload, ctx)
        compensated.view(-1).index_fill_(0, ctx.extra["indices"], 0)  # sent exactly
        return compensated

    def recompress(self, payload: Payload, ctx: Ctx, cf: float) -> tuple[Payload, Ctx]:
        """Keep a shared-random subset of the kept positions (still the same on all ranks)."""
        k = num_selected(ctx.numel, cf)
        values, marker = payload[0][:-1], payload[0][-1:]
        if k >= values.numel():
            return payload, ctx
        gen = self.generator(values.device, "randomk-sub", ctx.numel, k)
        keep = torch.randperm(values.numel(), generator=gen, device=values.device)[:k]
        rescale = values.numel() / k if self.unbiased else 1.0
        extra = {"indices": ctx.extra["indices"][keep], "scale": ctx.extra["scale"] * rescale}
        return ((torch.cat([values[keep] * rescale, marker]),),
                Ctx(ctx.shape, ctx.dtype, ctx.exchange, extra))


def _wire_dtype(dtype: torch.dtype) -> torch.dtype:
    """Horovod's allreduce has no bfloat16: such values travel as float32."""
    return torch.float32 if dtype == torch.bfloat16 else dtype


class Threshold(Sparsifier):
    """All elements with |t| ≥ λ (a fixed λ): the CF is an outcome, not a setting."""

    name = "threshold"
    adjustable_cf = False
    nominal_cf = 1.0

    def __init__(self, threshold: float = 1e-3) -> None:
        super().__init__()
        self.threshold = check_number("threshold", threshold, 0, low_open=True)

    def compress(self, tensor: Tensor, name: str = "", step: int = 0) -> tuple[Payload, Ctx]:
        flat = tensor.reshape(-1)
        ctx = Ctx(tensor.shape, tensor.dtype, self.exchange, varying_size=True)
        return self._payload(flat, _select_at_least(flat.abs(), self.threshold), ctx), ctx


class DGC(SeededCompressor, Sparsifier):
    """Deep Gradient Compression's sampled threshold (Lin et al., ICLR 2018).

    Sample 1% of |t|, take the threshold that would keep 1/CF of the sample, select above it;
    while the count is outside [0.7k, 1.3k], scale the threshold by 1.3 or 0.7 (at most
    ``max_adjust`` times); if still above 1.3k, keep the exact top-k of the candidates.
    Use with the ``dgc`` memory for momentum correction and factor masking.

    On accelerators the count is never read back: up to 2k candidates above the sampled
    threshold (lowered to at most max|t|, so there is at least one) are gathered in index
    order into a fixed buffer, and the exact top-k of them is sent — DGC's hierarchical
    selection with a fixed payload of k (unused slots carry a zero value). Candidates beyond
    the buffer stay in the residual.
    """

    name = "dgc"

    def __init__(self, cf: float | None = None, seed: int = 0, sample_ratio: float = 0.01,
                 max_adjust: int = 10, value_dtype: str | None = None) -> None:
        super().__init__(cf, seed)
        self.value_dtype = check_value_dtype(value_dtype)
        self.sample_ratio = check_number("sample_ratio", sample_ratio, 0, 1, low_open=True)
        self.max_adjust = check_number("max_adjust", max_adjust, 1, integer=True)

    def _sampled_threshold(self, magnitude: Tensor, k: int, name: str, step: int) -> Tensor:
        n = magnitude.numel()
        samples = min(n, max(1, int(n * self.sample_ratio), 1024))
        if samples >= n:
            probe = magnitude
        else:
            gen = self.generator(magnitude.device, "dgc", name, step)
            probe = magnitude[torch.randint(n, (samples,), generator=gen, device=magnitude.device)]
        probe_k = max(1, math.ceil(probe.numel() * k / n))
        return torch.topk(probe, probe_k, sorted=False).values.min()

    def compress(self, tensor: Tensor, name: str = "", step: int = 0,
                 cf: float | None = None) -> tuple[Payload, Ctx]:
        flat = tensor.reshape(-1)
        n = flat.numel()
        k = num_selected(n, cf or self.cf)
        if sizes_may_depend_on_data(flat) or n == 0:
            return super().compress(tensor, name, step, cf)
        magnitude = flat.abs()
        if 2 * k >= n:  # nothing to gain from a threshold
            ctx = Ctx(tensor.shape, tensor.dtype, self.exchange)
            return self._payload(flat, torch.topk(magnitude, k, sorted=False).indices, ctx), ctx
        thr = torch.minimum(self._sampled_threshold(magnitude, k, name, step), magnitude.max())
        slots = 2 * k
        passed = (magnitude < thr).logical_not_()
        position = passed.cumsum(0) - 1
        target = torch.where(passed & (position < slots), position,
                             torch.full_like(position, slots))
        buffer = torch.zeros(slots + 1, dtype=torch.int64, device=flat.device)
        buffer.scatter_(0, target, torch.arange(n, device=flat.device))  # slot `slots`: discard
        used = torch.arange(slots, device=flat.device) < passed.sum()
        candidates = torch.where(used, buffer[:slots], buffer[:1])  # unused: a real candidate
        score = torch.where(used, magnitude[candidates], -1.0)
        keep = torch.topk(score, k, sorted=False).indices
        indices = candidates[keep]
        values = torch.where(used[keep], flat[indices], 0.0).to(self.value_dtype or flat.dtype)
        values[:1].add_(finite_marker(flat).to(values.dtype))  # a NaN outside the buffer shows
        return ((values, indices.to(_index_dtype(n))),
                Ctx(tensor.shape, tensor.dtype, self.exchange, {"padded": True}))

    def select(self, flat: Tensor, k: int, name: str, step: int) -> Tensor:
        magnitude = flat.abs()
        thr = self._sampled_threshold(magnitude, k, name, step)
        lo, hi = 0.7 * k, 1.3 * k
        for _ in range(self.max_adjust):
            selected = _select_at_least(magnitude, thr)
            count = selected.numel()
            if count > hi:
                thr = thr * 1.3
            elif count < lo and thr > 0:
                thr = thr * 0.7
            else:
                break
        else:
            selected = _select_at_least(magnitude, thr)
        if selected.numel() > hi:
            selected = selected[exact_topk_indices(magnitude[selected], k)]
        elif selected.numel() == 0:
            selected = exact_topk_indices(magnitude, k)
        return selected


class RedSync(Sparsifier):
    """RedSync's trimmed threshold search (Fang et al., JPDC 2019).

    Binary search of r ∈ [0, 1] for thr = mean|t| + r·(max|t| − mean|t|) until
    k < nnz < 2k or the interval is narrower than ``min_interval``.
    """

    name = "redsync"

    def __init__(self, cf: float | None = None, min_interval: float = 0.2) -> None:
        super().__init__(cf)
        self.min_interval = check_number("min_interval", min_interval, 0, 1, low_open=True,
                                         high_open=True)

    def select(self, flat: Tensor, k: int, name: str, step: int) -> Tensor:
        magnitude = flat.abs()
        mean, top = magnitude.mean(), magnitude.max()
        lo, hi = 0.0, 1.0
        selected = None
        while hi - lo > self.min_interval:
            r = (lo + hi) / 2
            candidate = _select_at_least(magnitude, mean + r * (top - mean))
            nnz = candidate.numel()
            if nnz <= k:
                hi = r  # threshold too high
            else:
                selected, lo = candidate, r
                if nnz < 2 * k:
                    break
        if selected is None:  # even the mean keeps ≤ k: take what r = lo keeps
            selected = _select_at_least(magnitude, mean + lo * (top - mean))
        return selected if selected.numel() else exact_topk_indices(magnitude, k)


class SIDCo(Sparsifier):
    """Statistical threshold from a fitted exponential model of |t| (Abdelmoniem et al., MLSys 2021).

    For |t| ~ Exp(1/μ) the tail P(|t| > x) = exp(−x/μ), so thr = μ·ln(1/δ) keeps a fraction δ.
    The target δ = k/n is reached in ``stages`` steps of δ^(1/stages): each stage fits the
    mean excess of the elements above the current threshold (the exponential is memoryless)
    and raises the threshold, working on ever fewer elements.
    """

    name = "sidco"

    def __init__(self, cf: float | None = None, stages: int = 2) -> None:
        super().__init__(cf)
        self.stages = check_number("stages", stages, 1, integer=True)

    def select(self, flat: Tensor, k: int, name: str, step: int) -> Tensor:
        magnitude = flat.abs()
        n = flat.numel()
        stage_log = math.log(n / k) / self.stages  # ln(1/δ_stage)
        thr = magnitude.mean() * stage_log
        candidates = _select_at_least(magnitude, thr)
        for _ in range(self.stages - 1):
            if candidates.numel() <= k:
                break
            excess = magnitude[candidates] - thr
            thr = thr + excess.mean() * stage_log
            candidates = candidates[~(magnitude[candidates] < thr)]
        return candidates if candidates.numel() else exact_topk_indices(magnitude, k)
