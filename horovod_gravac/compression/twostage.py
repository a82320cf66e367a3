"""A two-stage compressed allreduce for quantizers: scatter-reduce, then allgather.

Gathering every rank's quantized tensor costs each rank (N−1)·n·b/8 bytes on its link (n
elements of b bits, N ranks): it grows with the world size. The two-stage exchange (as
DeepSpeed's 1-bit Adam compressed allreduce and CGX) keeps it near 2·n·b/8 whatever N is:

1. every rank splits its error-fed tensor g + e into N chunks of ``width`` elements
   (:func:`chunk_width`: ⌈n/N⌉ rounded up to the quantizer's ``chunk_multiple``, the last
   chunks padded with zeros; the same on every rank), quantizes each chunk on its own (its own
   scale) and sends chunk j to rank j: one alltoall (:attr:`Exchange.ALLTOALL`, round 1);
2. rank j, the *owner* of chunk j, decodes the N versions of its chunk it received, sums
   them, adds its own *owner residual* (the error feedback of this second quantization: one
   float32 vector of ``width`` elements per tensor, kept in the compressor) and quantizes the
   result again (:meth:`TwoStageQuantizer.next_round`);
3. the owners' chunks are allgathered (:attr:`Exchange.ALLGATHER`, round 2) and every rank
   decodes them into the whole tensor (:meth:`TwoStageQuantizer.aggregate`).

Bytes on a rank's link: (N−1)/N of its N chunks in the alltoall plus N−1 chunks in the
gather, 2·(N−1)·r with r the bytes of one quantized chunk (≈ n·b/(8N), plus a scale per chunk
and at most ``chunk_multiple``·N elements of padding): ≈ 2·(N−1)/N·n·b/8, against (N−1)·n·b/8
for the allgather — the same at N = 2, a third less at N = 3, half at 4, ~N/2 times less
beyond.

The owner decodes a *sum* of the N versions, as :meth:`Compressor.aggregate` returns sums: the
engine divides the gathered result by N when it averages (its ``average`` setting), as for
every other exchange; the quantizers here are scale-invariant, so quantizing the sum or the
average is the same rounding. The engine sees only rounds and exchanges (``ctx.rounds`` = 2,
``ctx.exchange`` ALLTOALL then ALLGATHER): the owner's work is this compressor's
``next_round``, as PowerSGD's Q is.

**Which quantizers.** Those whose chunk, once decoded, can be averaged and quantized again
with the same meaning: ``8bit``, ``qsgd``, ``natural`` and ``onebit`` (scaled sign). Not the
others: signSGD's aggregate is a majority vote of signs (a re-quantized sum of votes is not
a vote, and its N·sign scaling needs every vote); Signum keeps a momentum per rank of the
whole tensor and EF-SignSGD its own memory in parameter space, which a second stage on one
chunk would bypass; TernGrad's clipping at 2.5σ of the whole tensor is not a per-chunk
statistic; sparsifiers' indices differ by rank, so the owner's sum has up to N·k non-zeros
to select from again (another algorithm, with its own error); PowerSGD and fp16 are
allreduces already.

**The default** (``exchange="auto"``): two stages from :data:`AUTO_TWO_STAGE_FROM` (5) ranks
on, the allgather below. At N = 2 the two cost the same bytes and the two-stage exchange adds
a second quantization; at N = 3 and 4 it saves a third and a half of a traffic that is already
4–32× below dense, while its second quantization adds error (the owner residual feeds it back
a step later) and its gather can only start once the alltoall is back (in ``finish``, not
during backward). From 5 ranks on it saves ≥ 60% and the saving grows with N.

The NaN/Inf property of the quantizers holds through both stages: a non-finite chunk has a
non-finite scale (or finite marker), which makes the owner's sum and its re-quantized scale
non-finite, so every rank decodes a non-finite chunk and skips the step. The owner residual
never keeps a non-finite value (it keeps the one from before that step).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from .base import Compressor, Ctx, Exchange, Payload, align, is_finite, write_into

#: the values of a two-stage-capable quantizer's ``exchange`` argument
EXCHANGES = ("auto", "allgather", "two_stage")
#: ``exchange="auto"`` exchanges in two stages from this many ranks on
AUTO_TWO_STAGE_FROM = 5
#: the scratch buffer of the padded chunks (apart from the quantizers' own slots)
_PAD_SLOT = 8


def chunk_width(numel: int, size: int, multiple: int = 8) -> int:
    """Elements per chunk of a tensor of ``numel`` elements split among ``size`` ranks:
    ⌈numel/size⌉ rounded up to a multiple of ``multiple`` (at least ``multiple``); chunk j is
    [j·width, (j+1)·width) ∩ [0, numel), so the last chunks may be short or empty."""
    per = max(1, -(-numel // size))
    return -(-per // multiple) * multiple


def chunk_bounds(numel: int, size: int, multiple: int = 8) -> list[tuple[int, int]]:
    """(start, stop) of each rank's chunk: the same on every rank, from numel and size."""
    width = chunk_width(numel, size, multiple)
    return [(min(j * width, numel), min((j + 1) * width, numel)) for j in range(size)]


def valid_counts(rows: int, first: int, numel: int, width: int,
                 device: torch.device) -> Tensor:
    """Elements of rows ``first`` … ``first + rows − 1`` that hold data, not padding (int64;
    computed on ``device``, nothing read back)."""
    starts = (torch.arange(rows, device=device) + first) * width
    return (numel - starts).clamp_(0, width)


class TwoStageQuantizer(Compressor):
    """A quantizer that can also exchange in two stages (see the module docstring).

    Subclasses call :meth:`_set_exchange` from their constructor, dispatch ``compress``
    and ``decompress`` to :meth:`compress_chunks` / :meth:`decompress_chunks` in two-stage
    mode, and implement the row codec: :meth:`encode_rows` (R chunks of ``width`` elements →
    a payload whose every tensor has R rows), :meth:`decode_rows` and :meth:`row_layout`.
    """

    #: ``"auto"``, ``"allgather"`` or ``"two_stage"`` (the constructor's ``exchange``)
    exchange_mode: str = "allgather"
    #: a chunk's width is a multiple of this (8: sign bits pack 8 per byte)
    chunk_multiple: int = 8

    def _set_exchange(self, exchange: str) -> None:
        if not isinstance(exchange, str) or exchange not in EXCHANGES:
            raise ValueError(
                f"exchange of compressor {self.name!r} must be one of "
                f"{', '.join(map(repr, EXCHANGES))} ('auto': two stages from "
                f"{AUTO_TWO_STAGE_FROM} ranks on), got {exchange!r}")
        self.exchange_mode = exchange
        #: tensor name → the owner's residual of the chunk this rank owns (float32, width)
        self.owner_residuals: dict[str, Tensor] = {}
        #: the (rank, size) the owner residuals belong to: another rank or world size owns
        #: other chunks, of another width
        self._owner_world = (self.process_rank, self.world_size)

    @property
    def two_stage(self) -> bool:
        """Whether tensors are exchanged in two stages (at the bound world size)."""
        return self.exchange_mode == "two_stage" or (
            self.exchange_mode == "auto" and self.world_size >= AUTO_TWO_STAGE_FROM)

    def bind(self, rank: int, size: int) -> None:
        super().bind(rank, size)
        # (getattr: a compressor pickled before it had owner residuals)
        if getattr(self, "_owner_world", None) != (rank, size):
            self.owner_residuals = {}
            self._owner_world = (rank, size)

    # -- the row codec ---------------------------------------------------------------------
    def row_layout(self, width: int) -> list[tuple[int, torch.dtype]]:
        """(elements, dtype) of each payload tensor's row for a chunk of ``width``."""
        raise NotImplementedError

    def encode_rows(self, rows: Tensor, name: str, step: int, stage: int, first: int,
                    numel: int) -> Payload:
        """Quantize each row of ``rows`` (R × width, float32; padding is 0) on its own: a
        payload of 2-D tensors of R rows. ``stage`` (1: a rank's chunks, 2: the owner's) and
        ``first`` (the chunk index of row 0) key the random draws; ``numel``: the tensor's
        elements (rows past them are padding)."""
        raise NotImplementedError

    def decode_rows(self, payload: Payload, width: int) -> Tensor:
        """R × width float32 from a payload of R rows (its tensors 2-D, R rows each)."""
        raise NotImplementedError

    # -- the exchange ----------------------------------------------------------------------
    def compress_chunks(self, tensor: Tensor, name: str, step: int) -> tuple[Payload, Ctx]:
        """Round 1: the N chunks of ``tensor``, each quantized on its own; row j for rank j."""
        n, size = tensor.numel(), self.world_size
        width = chunk_width(n, size, self.chunk_multiple)
        flat = self.scratch(tensor, torch.float32, slot=_PAD_SLOT, numel=size * width)
        flat[:n].copy_(tensor.reshape(-1))
        flat[n:].zero_()
        payload = self.encode_rows(flat.view(size, width), name, step, 1, 0, n)
        extra = {"stage": 1, "name": name, "step": step, "width": width, "size": size,
                 "rank": self.process_rank, "sent": payload}
        return payload, Ctx(tensor.shape, tensor.dtype, Exchange.ALLTOALL, extra, rounds=2)

    def _decode_sent(self, payload: Payload, ctx: Ctx) -> Tensor:
        """A round-1 payload (every chunk) → the flat float32 tensor."""
        return self.decode_rows(payload, ctx.extra["width"]).view(-1)[:ctx.numel]

    def decompress_chunks(self, payload: Payload, ctx: Ctx) -> Tensor:
        """A rank's round-1 payload decoded: what this rank sent, the tensor's shape."""
        return self._decode_sent(payload, ctx).to(ctx.dtype).view(ctx.shape)

    def next_round(self, reduced: Payload, ctx: Ctx) -> Payload:
        """Round 2, as the owner of chunk ``rank``: the N versions received (row i from rank
        i) decoded and summed, plus the owner residual, quantized again; the residual keeps
        what that quantization dropped (or its previous value where the sum is not finite)."""
        extra = ctx.extra
        if extra.get("stage") != 1:
            return super().next_round(reduced, ctx)
        width, size, rank, name = extra["width"], extra["size"], extra["rank"], extra["name"]
        total = self.decode_rows(tuple(t.reshape(size, -1) for t in reduced), width).sum(0)
        kept = self.owner_residuals.get(name)
        if kept is not None and kept.shape == total.shape and kept.device == total.device:
            total.add_(kept)
        else:
            kept = None
        valid = max(0, min(width, ctx.numel - rank * width))
        if valid < width:  # padding stays 0 (decoded signs of padding are not)
            total[valid:] = 0
        payload = self.encode_rows(total.view(1, width), name, extra["step"], 2, rank,
                                   ctx.numel)
        residual = total.sub_(self.decode_rows(payload, width).view(-1))
        if valid < width:
            residual[valid:] = 0
        self.owner_residuals[name] = torch.where(is_finite(residual), residual,
                                                 kept if kept is not None else 0.0)
        extra["stage"] = 2
        ctx.exchange = Exchange.ALLGATHER
        return payload

    def aggregate(self, payloads: Sequence[Payload], ctx: Ctx,
                  out: Tensor | None = None) -> Tensor:
        """Round 2's gathered payloads (rank i's: chunk i, summed over ranks) → the sum over
        ranks of the whole tensor; other exchanges: the quantizer's own aggregate."""
        if ctx.extra.get("stage") != 2:
            return super().aggregate(payloads, ctx, out)
        rows = tuple(torch.stack([p[k].reshape(-1) for p in payloads])
                     for k in range(len(payloads[0])))
        flat = self.decode_rows(rows, ctx.extra["width"]).view(-1)[:ctx.numel]
        result = flat.to(ctx.dtype).view(ctx.shape)
        return result if out is None else write_into(out, result)

    def error(self, compensated: Tensor, payload: Payload, ctx: Ctx) -> Tensor:
        """Two stages: this rank's round-1 error, ``compensated`` − its decoded chunks (the
        owner's error is the owner residual); otherwise the quantizer's."""
        if ctx.extra.get("stage") is None:
            return super().error(compensated, payload, ctx)
        sent = self._decode_sent(ctx.extra["sent"], ctx)
        return compensated.sub_(sent.to(compensated.dtype).view(compensated.shape))

    # -- what the cost model prices --------------------------------------------------------
    def expected_rounds(self, shape: torch.Size,
                        cf: float | None = None) -> tuple[tuple[int, Exchange], ...]:
        """Two stages: N chunks in the alltoall, then one chunk in the gather."""
        if not self.two_stage:
            return super().expected_rounds(shape, cf)
        width = chunk_width(shape.numel(), self.world_size, self.chunk_multiple)
        row = sum(align(count * dtype.itemsize) for count, dtype in self.row_layout(width))
        return ((self.world_size * row, Exchange.ALLTOALL), (row, Exchange.ALLGATHER))

    def expected_bytes(self, shape: torch.Size, cf: float | None = None) -> tuple[int, Exchange]:
        """Two stages: the bytes of both rounds, and the first round's exchange (ALLTOALL);
        :meth:`expected_rounds` has them round by round."""
        if not self.two_stage:
            return super().expected_bytes(shape, cf)
        rounds = self.expected_rounds(shape, cf)
        return sum(b for b, _ in rounds), rounds[0][1]

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        rank, size = self._owner_world
        return {**super().state_dict(), "owner": {
            "rank": rank, "size": size,
            "residuals": {k: v.clone() for k, v in self.owner_residuals.items()}}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        owner = state.get("owner")
        if owner is None:
            self.owner_residuals = {}
            return
        self.owner_residuals = {k: v.clone() for k, v in owner["residuals"].items()}
        self._owner_world = (owner["rank"], owner["size"])

    def rescale(self, factor: float) -> None:
        for residual in self.owner_residuals.values():
            residual.mul_(factor)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, exchange={self.exchange_mode!r})"
