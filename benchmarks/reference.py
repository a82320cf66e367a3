"""Straightforward (GRACE-style) reference implementations, written the obvious way.

The baseline of ``benchmarks/compressors.py``: each function maps a flat gradient to what the
receiver reconstructs, with dense intermediates, ``torch.topk`` on |g|, masks and scatters,
so the library's implementations can be timed against the code people usually write.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def topk(t: Tensor, cf: float) -> Tensor:
    k = max(1, int(t.numel() // cf))
    _, idx = torch.topk(t.abs(), k)
    values = t[idx]
    return torch.zeros_like(t).scatter_(0, idx, values)


def randomk(t: Tensor, cf: float) -> Tensor:
    k = max(1, int(t.numel() // cf))
    idx = torch.randperm(t.numel(), device=t.device)[:k]
    return torch.zeros_like(t).scatter_(0, idx, t[idx])


def dgc(t: Tensor, cf: float) -> Tensor:
    """DGC's sampling loop as in its paper and GRACE."""
    n = t.numel()
    ratio = 1.0 / cf
    sample = torch.empty(max(1, int(n * 0.01)), device=t.device).uniform_(0, n).long()
    k_sample = max(1, int(n * ratio * 0.01))
    thr = torch.topk(t[sample].abs(), k_sample)[0].min()
    mask = t.abs() >= thr
    selected = mask.sum()
    for _ in range(10):
        if selected > 1.3 * n * ratio:
            thr = 1.3 * thr
        elif selected < 0.7 * n * ratio:
            thr = 0.7 * thr
        else:
            break
        mask = t.abs() >= thr
        selected = mask.sum()
    (idx,) = torch.where(mask)
    return torch.zeros_like(t).scatter_(0, idx, t[idx])


def qsgd(t: Tensor, cf: float, levels: int = 127) -> Tensor:
    norm = t.norm()
    abs_scaled = t.abs() / norm * levels
    lower = abs_scaled.floor()
    prob = torch.empty_like(t).uniform_()
    level = lower + (prob < (abs_scaled - lower)).float()
    code = (t.sign() * level).to(torch.int8)
    return code.float() * norm / levels


def terngrad(t: Tensor, cf: float) -> Tensor:
    std = t.std()
    c = 2.5 * std
    t = torch.clamp(t, -c, c)
    scale = t.abs().max()
    prob = torch.empty_like(t).uniform_()
    b = (prob < t.abs() / scale).float()
    code = (t.sign() * b).to(torch.int8)
    return code.float() * scale


def onebit(t: Tensor, cf: float) -> Tensor:
    mask = t >= 0
    pos_mean = t[mask].mean() if mask.any() else t.new_zeros(())
    neg_mean = t[~mask].mean() if (~mask).any() else t.new_zeros(())
    bits = mask.to(torch.uint8)
    return torch.where(bits.bool(), pos_mean, neg_mean)


def signsgd(t: Tensor, cf: float) -> Tensor:
    bits = (t >= 0).to(torch.uint8)
    return bits.float() * 2 - 1


def efsignsgd(t: Tensor, cf: float) -> Tensor:
    scale = t.abs().sum() / t.numel()
    bits = (t >= 0).to(torch.uint8)
    return (bits.float() * 2 - 1) * scale


def eightbit(t: Tensor, cf: float) -> Tensor:
    scale = t.abs().max()
    code = torch.round(t / scale * 127).to(torch.int8)
    return code.float() * scale / 127


def natural(t: Tensor, cf: float) -> Tensor:
    sign = t.sign()
    a = t.abs()
    low = torch.pow(2.0, torch.floor(torch.log2(a)))
    prob = (a - low) / low
    up = torch.empty_like(t).uniform_() < prob
    out = torch.where(up, low * 2, low)
    return torch.where(a == 0, torch.zeros_like(t), sign * out)


def fp16(t: Tensor, cf: float) -> Tensor:
    return t.half().float()


#: compressor name → reference (flat tensor, cf) → reconstruction
REFERENCES: dict[str, Callable[[Tensor, float], Tensor]] = {
    "topk": topk, "randomk": randomk, "dgc": dgc, "qsgd": qsgd, "terngrad": terngrad,
    "onebit": onebit, "signsgd": signsgd, "efsignsgd": efsignsgd, "8bit": eightbit,
    "natural": natural, "fp16": fp16,
}
