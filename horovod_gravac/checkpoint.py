"""Checkpoints that resume bit for bit: model, optimizer, every rank's memories, agent, RNGs.

Error-feedback residuals (and DGC's momenta) are different on every rank, so a checkpoint
gathers each rank's share to rank 0, which writes one file (atomically: write, then rename).
Loading is collective too: rank 0 reads the file and broadcasts it, so the path need only
exist on rank 0's machine, and a missing or mismatched checkpoint fails on every rank at
once instead of leaving the others waiting in a collective.

    checkpoint.save("ckpt.pt", model, opt, epoch=3)        # every rank calls it
    extra = checkpoint.load("ckpt.pt", model, opt)         # -> {"epoch": 3, "rank_state": None}

What must match to resume: the world size (residuals are per rank), the compressor and
memory, and the agent. ``convert=True`` loads such a checkpoint on purpose: model, wrapped
optimizer and step are kept; error feedback starts again from zero residuals and fresh
compressor state; the agent's state is kept only when it is the same agent.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .transport import horovod as horovod_transport
from .engine import ADAM_STATE, with_rank_0_state
from .optimizer import DistributedOptimizer
from .optimizer import STATE_KEY as _OURS

FORMAT = "horovod_gravac.checkpoint/1"


def rng_state() -> dict[str, Any]:
    """This process's random number generator states (torch CPU and CUDA, NumPy, Python)."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _to(tree: Any, device: torch.device | str) -> Any:
    """``tree`` with every tensor moved to ``device`` (dicts, lists and tuples walked)."""
    if isinstance(tree, torch.Tensor):
        return tree.to(device)
    if isinstance(tree, dict):
        return {k: _to(v, device) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)) and not hasattr(tree, "_fields"):
        return type(tree)(_to(v, device) for v in tree)
    return tree


def _identity(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """What a checkpoint's per-rank state is only valid for."""
    if not isinstance(optimizer, DistributedOptimizer):
        return {"optimizer": type(optimizer).__name__}
    agent = optimizer.agent
    return {"optimizer": type(optimizer).__name__, "compressor": optimizer.compressor.name,
            "memory": optimizer.memory.name, "agent": agent.name if agent is not None else None,
            "adam_exchange": optimizer.adam is not None}


def save(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         rank_state: Any = None, **extra: Any) -> None:
    """Write a checkpoint of the job to ``path`` (collective: call on every rank).

    ``extra`` (epoch, data position, …) is saved from rank 0; ``rank_state`` is saved from
    every rank (an LSTM's hidden state on its shard); :func:`load` returns both.
    """
    rank, size = horovod_transport.world()
    state = optimizer.state_dict()
    ours = state.pop(_OURS, None)
    mine = {"optimizer": _to(ours, "cpu"), "rng": rng_state(), "rank_state": _to(rank_state, "cpu")}
    everyone = horovod_transport.allgather_object(mine)
    if rank != 0:
        return
    ckpt = {"format": FORMAT, "world_size": size, "identity": _identity(optimizer),
            "model": _to(model.state_dict(), "cpu"), "optimizer": _to(state, "cpu"),
            "ranks": everyone, "extra": extra}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(ckpt, tmp)
    os.replace(tmp, path)


def _read(path: Path) -> dict[str, Any] | Exception:
    """Rank 0's view of the file: the checkpoint, or the error every rank must raise."""
    if not path.is_file():
        return FileNotFoundError(f"no checkpoint at {path}: give the path a previous save() "
                                 "wrote, or start without resuming")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - reported on every rank below
        return ValueError(f"{path} is not a readable checkpoint: {e}")
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        return ValueError(f"{path} is not a horovod_gravac checkpoint (format {FORMAT})")
    return ckpt


def load(path: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
         convert: bool = False) -> dict[str, Any]:
    """Restore the job from ``path`` (collective: call on every rank).

    Returns the ``extra`` saved, with ``"rank_state"``: this rank's own ``rank_state`` (None
    after a conversion to another world size).
    """
    rank, size = horovod_transport.world()
    ckpt = horovod_transport.broadcast_object(_read(Path(path)) if rank == 0 else None)
    if isinstance(ckpt, Exception):
        raise ckpt
    written, here = ckpt["identity"], _identity(optimizer)
    mismatches = [f"{key} {written.get(key)!r} (this job: {here.get(key)!r})"
                  for key in sorted(set(written) | set(here)) if written.get(key) != here.get(key)]
    same_world = ckpt["world_size"] == size
    if not same_world:
        mismatches.insert(0, f"world size {ckpt['world_size']} (this job: {size})")
    if mismatches and not convert:
        raise ValueError(f"checkpoint {path} was written with {'; '.join(mismatches)}. "
                         "Error-feedback state is per rank and per compressor: resume with the "
                         "same settings, or pass convert=True (--resume-convert) to keep the "
                         "model and restart error feedback from zero")
    device = next(model.parameters()).device
    model.load_state_dict(ckpt["model"])
    state = _to(ckpt["optimizer"], device)
    ours = ckpt["ranks"][rank]["optimizer"] if not mismatches else None
    if ours is not None:  # what rank 0 decides is everyone's
        state[_OURS] = _to(with_rank_0_state(ours, ckpt["ranks"][0]["optimizer"],
                                             optimizer.compressor), device)
    optimizer.load_state_dict(state)
    if mismatches and isinstance(optimizer, DistributedOptimizer):
        _restart_error_feedback(optimizer, ckpt, written, here)
    if not mismatches:
        set_rng_state(ckpt["ranks"][rank]["rng"])
    rank_state = ckpt["ranks"][rank].get("rank_state") if same_world else None
    return {**ckpt["extra"], "rank_state": _to(rank_state, device)}


def _restart_error_feedback(optimizer: DistributedOptimizer, ckpt: dict[str, Any],
                            written: dict[str, Any], here: dict[str, Any]) -> None:
    """``convert=True``: keep step and (same) agent, start residuals and compressor afresh."""
    ours = ckpt["ranks"][0]["optimizer"]
    if ours is None:
        return
    optimizer.step_count = ours["step"]
    optimizer.memory.reset()
    if optimizer.adam is not None and ADAM_STATE in ours:  # the phase goes with Adam's state
        optimizer.adam.load_state_dict(_to(ours[ADAM_STATE], next(
            p.device for g in optimizer.param_groups for p in g["params"])))
    if written.get("agent") == here.get("agent") and optimizer.agent is not None:
        optimizer.agent.load_state_dict(ours["agent"])
        optimizer.decision = ours["decision"]
