"""Error-feedback memories, keyed by tensor name.

A memory turns a gradient into the tensor to compress (``compensate``) and keeps what
compression dropped (``update``). Residuals are per rank and per tensor; they are never
averaged across ranks. ``compensate`` returns a tensor the memory owns, so ``update`` may
reuse its storage for the new residual (no extra pass over the gradient).
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from ..validation import check_number
from .base import Compressor, Ctx, Payload


class Memory:
    """No error feedback: what compression drops is lost."""

    name = "none"
    #: True when the memory carries values from step to step (that a NaN must not enter)
    keeps_state: ClassVar[bool] = False

    def compensate(self, tensor: Tensor, name: str) -> Tensor:
        return tensor

    def update(self, name: str, compensated: Tensor, compressor: Compressor, payload: Payload,
               ctx: Ctx) -> None:
        pass

    def reset(self, name: str | None = None) -> None:
        """Forget the residual of ``name`` (or of every tensor): GraVAC's dense branch."""

    def rescale(self, factor: float) -> None:
        """Multiply everything kept by ``factor``: the gradients' units changed (a mixed
        precision loss scale went from S to S·factor), and the residuals must follow."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class ResidualMemory(Memory):
    """Classic EF (Seide et al. 2014; Karimireddy et al. 2019): g_ef = g + e; e ← g_ef − D(C(g_ef))."""

    name = "residual"
    keeps_state = True

    def __init__(self) -> None:
        self.residuals: dict[str, Tensor] = {}

    def compensate(self, tensor: Tensor, name: str) -> Tensor:
        residual = self.residuals.get(name)
        if residual is None or residual.shape != tensor.shape:
            return tensor.clone()
        return residual.add_(tensor)

    def update(self, name: str, compensated: Tensor, compressor: Compressor, payload: Payload,
               ctx: Ctx) -> None:
        self.residuals[name] = compressor.error(compensated, payload, ctx)

    def reset(self, name: str | None = None) -> None:
        if name is None:
            self.residuals.clear()
        else:
            self.residuals.pop(name, None)

    def rescale(self, factor: float) -> None:
        for residual in self.residuals.values():
            residual.mul_(factor)

    def state_dict(self) -> dict[str, Any]:
        return {"residuals": {k: v.clone() for k, v in self.residuals.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.residuals = {k: v.clone() for k, v in state.get("residuals", {}).items()}


class EFSignSGDMemory(ResidualMemory):
    """EF-SignSGD's memory (Karimireddy et al., ICML 2019): the error lives in parameter space.

    p = γ·g + e; send C(p)/γ; e ← p − C(p). With a constant learning rate γ this equals
    :class:`ResidualMemory`; when γ changes, the stored error keeps its meaning as an update.
    Set ``lr`` to the optimizer's current learning rate before each step.
    """

    name = "efsignsgd"

    def __init__(self, lr: float = 1.0) -> None:
        super().__init__()
        self.lr = check_number("lr", lr, 0, low_open=True)
        self._stored_lr: dict[str, float] = {}

    def compensate(self, tensor: Tensor, name: str) -> Tensor:
        residual = self.residuals.get(name)
        ratio = self._stored_lr.get(name, self.lr) / self.lr
        if residual is not None and residual.shape == tensor.shape and ratio != 1.0:
            residual.mul_(ratio)  # to the current units (no pass while the rate is constant)
        return super().compensate(tensor, name)

    def update(self, name: str, compensated: Tensor, compressor: Compressor, payload: Payload,
               ctx: Ctx) -> None:
        super().update(name, compensated, compressor, payload, ctx)
        self._stored_lr[name] = self.lr

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "lr": self.lr, "stored_lr": dict(self._stored_lr)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.lr = state.get("lr", self.lr)
        self._stored_lr = dict(state.get("stored_lr", {}))


class DGCMemory(Memory):
    """DGC's momentum correction with factor masking (Lin et al., ICLR 2018).

    u ← m·u + g; v ← v + u; compress v; at the positions sent, zero both u and v.
    Optional local gradient clipping to ``clip_norm`` before accumulation. Use it with
    a plain (momentum-free) wrapped optimizer: the momentum lives here.
    """

    name = "dgc"
    keeps_state = True

    def __init__(self, momentum: float = 0.9, clip_norm: float | None = None) -> None:
        self.momentum = check_number("momentum", momentum, 0, 1, high_open=True)
        self.clip_norm = check_number("clip_norm", clip_norm, 0, low_open=True, optional=True)
        self.velocities: dict[str, Tensor] = {}
        self.accumulated: dict[str, Tensor] = {}

    def compensate(self, tensor: Tensor, name: str) -> Tensor:
        if self.clip_norm is not None:
            norm = torch.linalg.vector_norm(tensor)
            tensor = tensor * (self.clip_norm / (norm + 1e-6)).clamp(max=1.0)
        u = self.velocities.get(name)
        if u is None or u.shape != tensor.shape:
            u = self.velocities[name] = torch.zeros_like(tensor)
            self.accumulated[name] = torch.zeros_like(tensor)
        u.mul_(self.momentum).add_(tensor)
        return self.accumulated[name].add_(u)

    def update(self, name: str, compensated: Tensor, compressor: Compressor, payload: Payload,
               ctx: Ctx) -> None:
        indices = getattr(compressor, "indices", None)
        if indices is None:
            raise ValueError(f"the dgc memory needs a sparsifier, not {compressor.name!r}")
        self.accumulated[name] = compressor.error(compensated, payload, ctx)
        self.velocities[name].view(-1).index_fill_(0, indices(payload, ctx).long(), 0)

    def reset(self, name: str | None = None) -> None:
        for store in (self.velocities, self.accumulated):
            if name is None:
                store.clear()
            else:
                store.pop(name, None)

    def rescale(self, factor: float) -> None:
        for store in (self.velocities, self.accumulated):
            for tensor in store.values():
                tensor.mul_(factor)

    def state_dict(self) -> dict[str, Any]:
        return {"velocities": {k: v.clone() for k, v in self.velocities.items()},
                "accumulated": {k: v.clone() for k, v in self.accumulated.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.velocities = {k: v.clone() for k, v in state.get("velocities", {}).items()}
        self.accumulated = {k: v.clone() for k, v in state.get("accumulated", {}).items()}


MEMORIES: dict[str, type[Memory]] = {
    cls.name: cls for cls in (Memory, ResidualMemory, EFSignSGDMemory, DGCMemory)}
