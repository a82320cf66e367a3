"""The agent interface: statistics in, a decision for the next step out. No tensors here.

Each step the optimizer combines cheap per-rank statistics across ranks (one tiny allreduce),
hands them to the agent on rank 0, and broadcasts the returned :class:`Decision`; every rank
applies it from the next step on. Agents are deterministic functions of the statistics they
saw, and their state is in ``state_dict()``, so a resumed job continues the same schedule.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar

#: how many recent steps ``Agent.history`` and ``DistributedOptimizer.decisions`` keep: a job
#: that runs for days must not grow without bound (write the stream out, as gravac-train does)
RECENT_STEPS = 10_000

SEND_COMPRESSED, SEND_MIN, SEND_DENSE = "compressed", "min", "dense"
SEND_CHOICES = (SEND_COMPRESSED, SEND_MIN, SEND_DENSE)


@dataclass(frozen=True)
class Decision:
    """What every rank does at the next step.

    ``cf`` is the CF of the compressed level (GraVAC: θmin·θs); ``theta_min`` the first level
    of multi-level compression; ``send`` which of the two levels (or dense) goes on the wire;
    ``layer_cf`` per-layer overrides (Accordion's per-layer mode).
    """

    cf: float
    theta_min: float | None = None
    send: str = SEND_COMPRESSED
    layer_cf: dict[str, float] | None = None

    def cf_for(self, name: str) -> float:
        return self.layer_cf.get(name, self.cf) if self.layer_cf else self.cf


@dataclass
class StepStats:
    """Statistics of one step, already combined across ranks.

    Squared norms are sums over layers and ranks: ``norm_sq`` of the error-fed gradient
    g_o, ``norm_sq_min`` of C(g_o, θmin) and ``norm_sq_compressed`` of C(C(g_o, θmin), θs).
    ``layer_norms`` holds per-layer norms of the averaged gradient (same on every rank).
    """

    step: int
    iter_time: float
    world_size: int
    norm_sq: float = 0.0
    norm_sq_min: float = 0.0
    norm_sq_compressed: float = 0.0
    lr: float | None = None
    sent: str = SEND_COMPRESSED
    layer_norms: dict[str, float] = field(default_factory=dict)


class Agent:
    """Base class. Subclasses implement ``initial_decision`` and ``decide``."""

    name: ClassVar[str] = ""
    #: the optimizer computes δ statistics (two-level compression + norms) only when asked
    needs_gain_stats: ClassVar[bool] = False
    #: the optimizer hands per-layer norms of the averaged gradient
    needs_layer_norms: ClassVar[bool] = False
    #: False when the decision never depends on statistics (no broadcast needed)
    adaptive: ClassVar[bool] = True

    def __init__(self) -> None:
        self.history: deque[dict[str, Any]] = deque(maxlen=RECENT_STEPS)

    def initial_decision(self) -> Decision:
        raise NotImplementedError

    def decide(self, stats: StepStats) -> Decision:
        raise NotImplementedError

    def record(self, stats: StepStats, decision: Decision, **extra: Any) -> None:
        """Append a row to the metrics stream (``history``, the last RECENT_STEPS rows)."""
        row = {"step": stats.step, "cf": decision.cf, "theta_min": decision.theta_min,
               "send": decision.send, "iter_time": stats.iter_time, **extra}
        self.history.append(row)

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if k != "history"} | {
            "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            setattr(self, key, value)
        self.history = deque(self.history, maxlen=RECENT_STEPS)
