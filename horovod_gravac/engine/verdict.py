"""The step's verdict: is the averaged gradient finite? Read back to the host once per step,
in one vector with the agent's statistics and (for Accordion) the layer norms; on a skipped
step, which of this rank's tensors brought the NaN/Inf (their residuals restart at zero)."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from .encoding import Ticket


class NonFiniteGradientError(FloatingPointError):
    """Raised on every rank when ``on_nonfinite="raise"`` and a step's gradient is not finite."""


def read_back(flags: list[Tensor], stats: list[Tensor], results: list[tuple[str, Tensor]],
              wants_norms: bool, device: torch.device
              ) -> tuple[bool, list[float] | None, dict[str, float]]:
    """The one host read of a step: (whether every flag is set, the agent's summed
    statistics or None, each result's norm by name where ``wants_norms``)."""
    pieces = [torch.stack([f.to(device) for f in flags]).double()
              if flags else torch.ones(0, dtype=torch.float64, device=device)]
    summed = stats[0].to(device).double() if stats else None
    if summed is not None:
        pieces.append(summed)
    if wants_norms:
        pieces.append(torch.stack([torch.linalg.vector_norm(
            r.coalesce()._values() if r.is_sparse else r, dtype=torch.float64).to(device)
            for _, r in results]))
    values = torch.cat(pieces).tolist()
    n_flags = len(flags)
    finite = all(v == 1.0 for v in values[:n_flags])
    width = summed.numel() if summed is not None else 0
    terms = values[n_flags:n_flags + width] if summed is not None else None
    norms = dict(zip((n for n, _ in results), values[n_flags + width:])) if wants_norms else {}
    return finite, terms, norms


def nonfinite_tensors(tickets: Iterable[Ticket], names: list[str],
                      device: torch.device) -> list[str]:
    """This rank's tensors whose residual a NaN/Inf reached: their first payload was not
    finite (a skipped step only: one more host read), in model order."""
    checked = [t for t in tickets if t.finite is not None]
    if not checked:
        return []
    flags = torch.stack([t.finite.to(device) for t in checked]).tolist()
    order = {n: i for i, n in enumerate(names)}
    return sorted((t.name for t, ok in zip(checked, flags) if not ok), key=order.get)


def nonfinite_error(step: int, culprits: list[str], keeps_state: bool) -> NonFiniteGradientError:
    """The error of a non-finite step, naming this rank's culprits where it knows them."""
    culprit = (f"this rank's gradient of {', '.join(culprits)} is non-finite"
               if culprits else "another rank's gradient is non-finite"
               if keeps_state else "a rank's gradient is non-finite")
    return NonFiniteGradientError(
        f"step {step}: the averaged gradient contains NaN/Inf ({culprit}); "
        "lower the learning rate or use on_nonfinite='skip'")
