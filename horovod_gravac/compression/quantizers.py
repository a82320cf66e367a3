"""Quantizers: every element is sent, in fewer bits.

Payload sizes are fixed per tensor, but most carry a per-rank scale (norm, max), so their
integer codes cannot be summed by an allreduce: they are all-gathered and each rank's
contribution is decompressed (FP16 and the identity are plain allreduces). Codes use the
smallest dtype Horovod exchanges (int8/uint8); sign bits are packed 8 per byte.

``8bit``, ``qsgd``, ``natural`` and ``onebit`` can instead exchange in two stages, an
alltoall of chunks and an allgather of the chunks' owners' re-quantized sums, so that a
rank's traffic does not grow with the number of ranks (``exchange="two_stage"``; by default
from 5 ranks on; see ``twostage`` for how, for which quantizers and why not the others).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from ..validation import check_number
from .base import (Compressor, Ctx, Exchange, Payload, SeededCompressor, finite_marker, is_finite,
                   write_into)
from .twostage import TwoStageQuantizer, valid_counts

# (Little-endian byte order, as on x86-64 and ARM64.)
# Eight 0/1 bytes read as one little-endian int64 → one byte of bits, bit j = element j:
# multiplying by Σ_j 2^(56−7j) moves byte j's bit to position 56 + j, with no carries.
_PACK_MAGIC = 0x0102040810204080
# One byte → eight 0/1 bytes: replicate it into every byte, keep bit j in byte j, and turn
# "nonzero" into 1 by adding 0x7F per byte (no carry crosses a byte) and keeping the top bit.
_SPREAD, _BIT_OF_BYTE = 0x0101010101010101, -0x7FBFDFEFF7FBFDFF  # 0x8040201008040201
_ADD_7F, _TOP_BITS = 0x7F7F7F7F7F7F7F7F, -0x7F7F7F7F7F7F7F80  # 0x8080808080808080


def pack_bits(bits: Tensor) -> Tensor:
    """A bool tensor as uint8, 8 per byte, element j of each group in bit j (zero-padded)."""
    flat = bits.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    words = flat.view(torch.uint8).view(torch.int64)
    return (((words * _PACK_MAGIC) >> 56) & 0xFF).to(torch.uint8)


def unpack_bits(packed: Tensor, numel: int) -> Tensor:
    """Inverse of :func:`pack_bits`: the first ``numel`` bits as a bool tensor."""
    words = (packed.to(torch.int64) * _SPREAD) & _BIT_OF_BYTE
    ones = (((words + _ADD_7F) & _TOP_BITS) >> 7) & _SPREAD  # & drops the sign extension
    return ones.view(torch.uint8)[:numel].view(torch.bool)


def _nonzero(scale: Tensor) -> Tensor:
    """``scale`` with exact zeros replaced by 1 (an all-zero tensor); NaN stays NaN."""
    return torch.where(scale == 0, torch.ones_like(scale), scale)


class NoCompression(Compressor):
    """Identity: the dense baseline (bfloat16 travels as float32: Horovod can't sum it)."""

    name = "none"
    default_memory = "none"
    preserves_adam = True

    def compress(self, tensor: Tensor, name: str = "", step: int = 0) -> tuple[Payload, Ctx]:
        wire = tensor.float() if tensor.dtype == torch.bfloat16 else tensor
        return (wire,), Ctx(tensor.shape, tensor.dtype, self.exchange)

    def decompress(self, payload: Payload, ctx: Ctx) -> Tensor:
        return payload[0].to(ctx.dtype).view(ctx.shape)

    def error(self, compensated: Tensor, payload: Payload, ctx: Ctx) -> Tensor:
        return torch.zeros_like(compensated)  # not in place: the payload is ``compensated``


class FP16(Compressor):
    """Cast to half precision, as Horovod's ``Compression.fp16``."""

    name = "fp16"
    default_memory = "none"
    nominal_cf = 2.0
    preserves_adam = True

    def compress(self, tensor: Tensor, name: str = "", step: int = 0) -> tuple[Payload, Ctx]:
        return (tensor.to(torch.float16),), Ctx(tensor.shape, tensor.dtype, self.exchange)

    def decompress(self, payload: Payload, ctx: Ctx) -> Tensor:
        return payload[0].to(ctx.dtype).view(ctx.shape)


class EightBit(TwoStageQuantizer):
    """8-bit linear quantization scaled by max|t| (Dettmers, ICLR 2016): sign + 7-bit level.

    ``exchange``: ``"allgather"``, ``"two_stage"`` (each chunk its own max; the owner's sum
    quantized again by its max) or ``"auto"`` (two stages from 5 ranks on).
    """

    name = "8bit"
    exchange = Exchange.ALLGATHER
    nominal_cf = 4.0

    def __init__(self, cf: float | None = None, exchange: str = "auto") -> None:
        super().__init__(cf)
        self._set_exchange(exchange)

    def compress(self, tensor: Tensor, name: str = "", step: int = 0) -> tuple[Payload, Ctx]:
        if self.two_stage:
            return self.compress_chunks(tensor, name, step)
        x = tensor.reshape(-1).float()
        scale = x.abs().amax().reshape(1) if x.numel() else x.new_zeros(1)
        codes = torch.round(x * (127.0 / _nonzero(scale))).to(torch.int8)
        return (codes, scale), Ctx(tensor.shape, tensor.dtype, self.exchange)

    def decompress(self, payload: Payload, ctx: Ctx) -> Tensor:
        if ctx.extra:
            return self.decompress_chunks(payload, ctx)
        codes, scale = payload
        return (codes.float() * (scale / 127.0)).to(ctx.dtype).view(ctx.shape)

    def row_layout(self, width: int) -> list[tuple[int, torch.dtype]]:
        return [(width, torch.int8), (1, torch.float32)]

    def encode_rows(self, rows: Tensor, name: str, step: int, stage: int, first: int,
                    numel: int) -> Payload:
        scale = rows.abs().amax(1, keepdim=True)  # NaN-propagating
        return torch.round(rows * (127.0 / _nonzero(scale))).to(torch.int8), scale

    def decode_rows(self, payload: Payload, width: int) -> Tensor:
        codes, scale = payload
        return codes.reshape(-1, width).float() * (scale.reshape(-1, 1) / 127.0)


class QSGD(TwoStageQuantizer, SeededCompressor):
    """QSGD (Alistarh et al., NeurIPS 2017): s levels, stochastic rounding, unbiased.

    level_i = ⌊s|t_i|/‖t‖₂⌋ + Bernoulli(frac); sends sign·level (int8 for s ≤ 127, else
    int16) and ‖t‖₂, per bucket of ``bucket_size`` elements when given.

    ``exchange``: ``"allgather"``, ``"two_stage"`` (each chunk — whole buckets — its own
    norms; the owner's sum quantized again, still unbiased) or ``"auto"`` (two stages from 5
    ranks on).
    """

    name = "qsgd"
    exchange = Exchange.ALLGATHER
    default_memory = "none"
    nominal_cf = 4.0

    def __init__(self, levels: int = 127, bucket_size: int | None = None, seed: int = 0,
                 exchange: str = "auto") -> None:
        super().__init__(None, seed)
        self.levels = check_number("levels", levels, 1, 32767, integer=True)
        self.bucket_size = check_number("bucket_size", bucket_size, 1, integer=True, optional=True)
        self._set_exchange(exchange)

    @property
    def chunk_multiple(self) -> int:
        """Chunks are whole buckets (and whole bytes of 8 elements)."""
        return math.lcm(8, self.bucket_size) if self.bucket_size else 8

    @property
    def _code_dtype(self) -> torch.dtype:
        return torch.int8 if self.levels <= 127 else torch.int16

    def row_layout(self, width: int) -> list[tuple[int, torch.dtype]]:
        return [(width, self._code_dtype), (width // (self.bucket_size or width), torch.float32)]

    def encode_rows(self, rows: Tensor, name: str, step: int, stage: int, first: int,
                    numel: int) -> Payload:
        r, width = rows.shape
        size = self.bucket_size or width
        x = rows.view(r, width // size, size)
        norms = torch.linalg.vector_norm(x, dim=2, keepdim=True)
        scaled = torch.abs(x, out=self.scratch(x, torch.float32, slot=2).view(x.shape))
        scaled.mul_(self.levels / _nonzero(norms))
        gen = self.generator(x.device, "qsgd-chunks", name, step, self.process_rank, stage)
        noise = self.scratch(x, torch.float32, slot=3).view(x.shape).uniform_(generator=gen)
        codes = scaled.add_(noise).floor_().copysign_(x).to(self._code_dtype)
        return codes.view(r, width), norms.view(r, -1)

    def decode_rows(self, payload: Payload, width: int) -> Tensor:
        codes, norms = payload
        r, size = norms.shape[0], self.bucket_size or width
        x = codes.reshape(r, width // size, size).float()
        return x.mul_(norms.reshape(r, -1, 1) / self.levels).view(r, width)

    def _buckets(self, x: Tensor) -> Tensor:
        size = self.bucket_size or max(1, x.numel())
        pad = (-x.numel()) % size
        return (torch.cat([x, x.new_zeros(pad)]) if pad else x).view(-1, size)

    def compress(self, tensor: Tensor, name: str = "", step: int = 0) -> tuple[Payload, Ctx]:
        if self.two_stage:
            return self.compress_chunks(tensor, name, step)
        x = self._buckets(tensor.reshape(-1).float())
        norms = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        scaled = torch.abs(x, out=self.scratch(x, torch.float32).view(x.shape))
        scaled.mul_(self.levels / _nonzero(norms))
        gen = self.generator(x.device, "qsgd", name, step, self.process_rank)
        noise = self.scratch(x, torch.float32, slot=1).view(x.shape).uniform_(generator=gen)
        # ⌊s + u⌋, u ~ U[0, 1): s rounded up with probability frac(s), the stochastic rounding
        level = scaled.add_(noise).floor_()
        code_dtype = torch.int8 if self.levels <= 127 else torch.int16
        codes = level.copysign_(x).to(code_dtype)
        return (codes.view(-1), norms.view(-1)), Ctx(tensor.shape, tensor.dtype, self.exchange)

    def decompress(self, payload: Payload, ctx: Ctx) -> Tensor:
        if ctx.extra:
            return self.decompress_chunks(payload, ctx)
        codes, norms = payload
        if ctx.numel == 0:
            return torch.zeros(ctx.shape, dtype=ctx.dtype, device=codes.device)
        x = codes.view(norms.numel(), -1).float().mul_(norms.view(-1, 1) / self.levels)
        return x.view(-1)[: ctx.numel].to(ctx.dtype).view(ctx.shape)

    def aggregate(self, payloads: Sequence[Payload], ctx: Ctx,
                  out: Tensor | None = None) -> Tensor:
        """Σ codes·norm/s over ranks, each rank's decoded into a reused buffer."""
        if ctx.extra or out is None or ctx.numel == 0 or not out.is_contiguous() or \
                out.dtype != torch.float32:
            return super().aggregate(payloads, ctx, out)
        flat = out.view(-1)
        for i, (codes, norms) in enumerate(payloads):
            rows = codes.view(norms.numel(), -1)
            decoded = torch.mul(rows, norms.view(-1, 1) / self.levels,
                                out=self.scratch(codes, torch.float32).view(rows.shape))
            part = decoded.view(-1)[:ctx.numel]
            if i == 0:
                flat.copy_(part)
            else:
                flat.add_(part)
        return out


class TernGrad(SeededCompressor):
    """TernGrad (Wen et al., NeurIPS 2017): clip at 2.5σ, s = max|t|, send s·sign·Bernoulli(|t|/s).

    Unbiased for the clipped tensor; codes ∈ {−1, 0, 1} as int8.
    """

    name = "terngrad"
    exchange = Exchange.ALLGATHER
    default_memory = "none"
    nominal_cf = 4.0

    def __init__(self, clip: float = 2.5, seed: int = 0) -> None:
        super().__init__(None, seed)
        self.clip = check_number("clip (in standard deviations)", clip, 0, low_open=True)

    def compress(self, tensor: Tensor, name: str = "", step: int = 0) -> tuple[Payload, Ctx]:
        x = tensor.reshape(-1).float()
        if x.numel() == 0:
            return (x.to(torch.int8), x.new_zeros(1)), Ctx(tensor.shape, tensor.dtype, self.exchange)
        bound = self.clip * x.std(correction=0)
        x = torch.maximum(torch.minimum(x, bound), -bound)
        scale = x.abs().amax().reshape(1) + finite_marker(tensor)
        gen = self.generator(x.device, "terngrad", name, step, self.process_rank)
        keep = torch.rand(x.shape, generator=gen, device=x.device) < x.abs() / _nonzero(scale)
        codes = (torch.sign(x) * keep).to(torch.int8)
        return (codes, scale), Ctx(tensor.shape, tensor.dtype, self.exchange)

    def decompress(self, payload: Payload, ctx: Ctx) -> Tensor:
        codes, scale = payload
        return (codes.float() * scale).to(ctx.dtype).view(ctx.shape)


class Natural(TwoStageQuantizer, SeededCompressor):
    """Natural compression (Horváth et al., 2019): stochastic rounding to a power of two.

    |t| ∈ [2^p, 2^(p+1)) rounds up with probability (|t| − 2^p)/2^p, which is unbiased. Each
    element is one byte: sign bit + 7-bit exponent below the tensor's largest one (sent as a
    float32 scale); 127 encodes zero, and magnitudes 2^126 times below the largest underflow to 0.

    ``exchange``: ``"allgather"``, ``"two_stage"`` (each chunk its own largest exponent; the
    owner's sum rounded again, still unbiased) or ``"auto"`` (two stages from 5 ranks on).
    """

    name = "natural"
    exchange = Exchange.ALLGATHER
    default_memory = "none"
    nominal_cf = 4.0

    def __init__(self, seed: int = 0, exchange: str = "auto") -> None:
        super().__init__(None, seed)
        self._set_exchange(exchange)

    def row_layout(self, width: int) -> list[tuple[int, torch.dtype]]:
        return [(width, torch.uint8), (1, torch.float32)]

    def encode_rows(self, rows: Tensor, name: str, step: int, stage: int, first: int,
                    numel: int) -> Payload:
        mantissa, exponent = torch.frexp(rows.abs())
        gen = self.generator(rows.device, "natural-chunks", name, step, self.process_rank, stage)
        up = torch.rand(rows.shape, generator=gen, device=rows.device) < (2 * mantissa - 1)
        exponent = exponent - 1 + up
        top = exponent.amax(1, keepdim=True)
        below = (top - exponent).clamp_(max=127).masked_fill_(rows == 0, 127)
        codes = (below | ((rows < 0).to(torch.int32) << 7)).to(torch.uint8)
        marker = (rows.sum(1, keepdim=True, dtype=torch.float64) * 0).to(torch.float32)
        return codes, torch.ldexp(torch.ones_like(marker), top) + marker

    def decode_rows(self, payload: Payload, width: int) -> Tensor:
        codes, scale = payload
        codes, scale = codes.reshape(-1, width), scale.reshape(-1, 1)
        below = (codes & 127).to(torch.int32)
        magnitude = torch.ldexp(scale.expand(codes.shape), -below).masked_fill_(below == 127, 0)
        # a non-finite scale (the finite marker) stays visible where every code is a zero
        return torch.where(codes >= 128, -magnitude, magnitude).add_(scale * 0)

    def compress(self, tensor: Tensor, name: str = "", step: int = 0) -> tuple[Payload, Ctx]:
        if self.two_stage:
            return self.compress_chunks(tensor, name, step)
        x = tensor.reshape(-1).float()
        mantissa, exponent = torch.frexp(x.abs())  # |x| = m·2^e, m ∈ [0.5, 1)
        gen = self.generator(x.device, "natural", name, step, self.process_rank)
        up = torch.rand(x.shape, generator=gen, device=x.device) < (2 * mantissa - 1)
        exponent = exponent - 1 + up  # |x| rounded to 2^exponent
        top = exponent.amax() if x.numel() else exponent.new_zeros(())
        below = (top - exponent).clamp_(max=127)
        below[x == 0] = 127
        codes = (below | ((x < 0).to(torch.int32) << 7)).to(torch.uint8)
        scale = torch.ldexp(torch.ones(1, device=x.device), top.reshape(1)) + finite_marker(x)
        return (codes, scale), Ctx(tensor.shape, tensor.dtype, self.exchange)

    def decompress(self, payload: Payload, ctx: Ctx) -> Tensor:
        if ctx.extra:
            return self.decompress_chunks(payload, ctx)
        codes, scale = payload
        below = (codes & 127).to(torch.int32)
        magnitude = torch.ldexp(scale.expand(codes.shape), -below)
        magnitude[below == 127] = 0
        signed = torch.where(codes >= 128, -magnitude, magnitude)
        return signed.to(ctx.dtype).view(ctx.shape)


class SignSGD(Compressor):
    """signSGD with majority vote (Bernstein et al., ICML 2018): 1 bit per element.

    The aggregate over N ranks is N·sign(Σ signs), so averaging yields the majority vote.
    A 4-byte finiteness marker rides along so a NaN gradient does not become ±1.
    """

    name = "signsgd"
    exchange = Exchange.ALLGATHER
    default_memory = "none"
    nominal_cf = 32.0

    def signs_of(self, tensor: Tensor, name: str) -> Tensor:
        """The tensor whose signs are sent (Signum overrides: its momentum)."""
        return tensor

    def compress(self, tensor: Tensor, name: str = "", step: int = 0) -> tuple[Payload, Ctx]:
        source = self.signs_of(tensor, name)
        payload = (pack_bits(source >= 0), finite_marker(source))
        return payload, Ctx(tensor.shape, tensor.dtype, self.exchange)

    def decompress(self, payload: Payload, ctx: Ctx) -> Tensor:
        bits, marker = payload
        signs = unpack_bits(bits, ctx.numel).to(ctx.dtype) * 2 - 1
        return signs.add_(marker.to(ctx.dtype)).view(ctx.shape)

    def aggregate(self, payloads: Sequence[Payload], ctx: Ctx,
                  out: Tensor | None = None) -> Tensor:
        votes = super().aggregate(payloads, ctx)
        # torch.sign(NaN) is 0: add votes·0 (NaN where a vote was) to keep NaN visible.
        result = torch.sign(votes).mul_(len(payloads)).add_(votes * 0)
        return result if out is None else write_into(out, result)


class Signum(SignSGD):
    """Signum (Bernstein et al., ICML 2018): the sign of momentum m ← β·m + (1−β)·g, majority vote."""

    name = "signum"

    def __init__(self, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = check_number("momentum", momentum, 0, 1, high_open=True)
        self.momenta: dict[str, Tensor] = {}

    def signs_of(self, tensor: Tensor, name: str) -> Tensor:
        m = self.momenta.get(name)
        if m is None or m.shape != tensor.shape:
            m = self.momenta[name] = torch.zeros_like(tensor)
        updated = (m * self.momentum).add_(tensor, alpha=1 - self.momentum)
        # A NaN/Inf gradient is sent (visibly) but never becomes the momentum; no host sync.
        m.copy_(torch.where(is_finite(updated), updated, m))
        return updated

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "momenta": {k: v.clone() for k, v in self.momenta.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.momenta = {k: v.clone() for k, v in state.get("momenta", {}).items()}


class EFSignSGD(Compressor):
    """EF-SignSGD (Karimireddy et al., ICML 2019): send (‖t‖₁/n)·sign(t), with error feedback."""

    name = "efsignsgd"
    exchange = Exchange.ALLGATHER
    default_memory = "efsignsgd"
    nominal_cf = 32.0

    def compress(self, tensor: Tensor, name: str = "", step: int = 0) -> tuple[Payload, Ctx]:
        x = tensor.reshape(-1)
        scale = (torch.linalg.vector_norm(x, 1, dtype=torch.float32) / max(1, x.numel())).reshape(1)
        return (pack_bits(x >= 0), scale + finite_marker(x)), Ctx(tensor.shape, tensor.dtype,
                                                                   self.exchange)

    def decompress(self, payload: Payload, ctx: Ctx) -> Tensor:
        bits, scale = payload
        signs = unpack_bits(bits, ctx.numel).to(torch.float32) * 2 - 1
        return (signs * scale).to(ctx.dtype).view(ctx.shape)


class OneBit(TwoStageQuantizer):
    """1-bit SGD (Seide et al., 2014): a sign bit per element plus the mean of the
    non-negative and of the negative part, used with error feedback.

    ``exchange``: ``"allgather"``, ``"two_stage"`` (each chunk its own two means; the owner's
    sum quantized again to signs and means, with the owner residual — the 1-bit compressed
    allreduce of DeepSpeed's 1-bit Adam) or ``"auto"`` (two stages from 5 ranks on).
    """

    name = "onebit"
    exchange = Exchange.ALLGATHER
    nominal_cf = 32.0

    def __init__(self, cf: float | None = None, exchange: str = "auto") -> None:
        super().__init__(cf)
        self._set_exchange(exchange)

    def row_layout(self, width: int) -> list[tuple[int, torch.dtype]]:
        return [(width // 8, torch.uint8), (2, torch.float32)]

    def encode_rows(self, rows: Tensor, name: str, step: int, stage: int, first: int,
                    numel: int) -> Payload:
        r, width = rows.shape
        positive = rows >= 0
        valid = valid_counts(r, first, numel, width, rows.device)
        n_pos = positive.sum(1) - (width - valid)  # padding is 0: counted non-negative
        pos_sum = rows.clamp(min=0).sum(1, dtype=torch.float32)  # NaN-propagating
        neg_sum = rows.sum(1, dtype=torch.float32) - pos_sum
        means = torch.stack([pos_sum / n_pos.clamp(min=1),
                             neg_sum / (valid - n_pos).clamp(min=1)], dim=1)
        return pack_bits(positive).view(r, width // 8), means

    def decode_rows(self, payload: Payload, width: int) -> Tensor:
        bits, means = payload
        means = means.reshape(-1, 2)
        r = means.shape[0]
        signs = unpack_bits(bits.reshape(-1), r * width).view(r, width)
        return torch.where(signs, means[:, :1], means[:, 1:])

    def compress(self, tensor: Tensor, name: str = "", step: int = 0) -> tuple[Payload, Ctx]:
        if self.two_stage:
            return self.compress_chunks(tensor, name, step)
        x = tensor.reshape(-1)
        positive = x >= 0
        n_pos = positive.sum()
        pos_sum = x.clamp(min=0).sum(dtype=torch.float32)  # NaN-propagating, unlike a mask
        neg_sum = x.sum(dtype=torch.float32) - pos_sum
        means = torch.stack([pos_sum / n_pos.clamp(min=1), neg_sum / (x.numel() - n_pos).clamp(min=1)])
        return (pack_bits(positive), means), Ctx(tensor.shape, tensor.dtype, self.exchange)

    def decompress(self, payload: Payload, ctx: Ctx) -> Tensor:
        if ctx.extra:
            return self.decompress_chunks(payload, ctx)
        bits, means = payload
        out = torch.where(unpack_bits(bits, ctx.numel), means[0], means[1])
        return out.to(ctx.dtype).view(ctx.shape)
