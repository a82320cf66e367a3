"""The Adam-family exchange's phases, decided on rank 0: when Adam's second moment freezes.

Adam's update m̂ / (√v̂ + ε) is not linear in the gradient, so error feedback on compressed
gradients does not cancel under it (see :mod:`horovod_gravac.adam`). The Adam-family
exchange therefore runs in two phases, and this agent decides when the second begins:

1. **warm-up** — every step is dense: the gradient is averaged uncompressed and the wrapped
   Adam/AdamW steps as it always does, so its second moment v is dense training's;
2. **frozen** — from the step after rank 0 decides it on, v̂ stays as it is and every rank
   exchanges its preconditioned gradient, compressed with error feedback. The wrapped agent
   (GraVAC, Accordion, static, a layer plan; none: the compressor's own setting) decides the
   compression from then on, beginning with its initial decision — and it measures what is
   actually exchanged, in the metric of Adam's update.

**When to freeze** — when the variance is stable (after 0/1 Adam, Lu et al., ICLR 2023),
not after a fixed number of steps. Every ``check_interval`` steps of the warm-up, the
exchange measures the relative change of the preconditioner's denominator over the interval,

    r_t = Σ |√v̂_t − √v̂_{t−k}| / Σ √v̂_t        (v̂ = v / (1 − β2^t), k = check_interval),

summed over every exchanged parameter (:class:`~horovod_gravac.adam.AdamExchange`; the same
value on every rank, since v is). v freezes after the first check with r_t ≤ ``tolerance``
once at least ``warmup`` steps ran, or after ``max_warmup`` steps at the latest (if given).
The rule decides; the decision is broadcast with the agent's (``Decision.variance_frozen``),
so every rank freezes at the same step.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..validation import check_number
from .base import SEND_DENSE, Agent, Decision, ErrorSpec, ProbeSpec, StepStats

WARMUP, FROZEN = "warmup", "frozen"


@dataclass(frozen=True)
class FreezeRule:
    """When the Adam-family exchange freezes Adam's second moment (see the module docstring).

    Arguments:
        warmup: dense Adam steps at least, before v may freeze; >= 1.
        tolerance: freeze once the relative change r_t of √v̂ over a check interval is at
            most this; > 0.
        check_interval: steps between two measurements of r_t; >= 1.
        max_warmup: freeze after this many steps at the latest (None: only by the rule);
            >= ``warmup``.
    """

    warmup: int = 20
    tolerance: float = 0.05
    check_interval: int = 10
    max_warmup: int | None = None

    def __post_init__(self) -> None:
        check_number("warmup", self.warmup, 1, integer=True)
        check_number("tolerance", self.tolerance, 0, low_open=True)
        check_number("check_interval", self.check_interval, 1, integer=True)
        check_number("max_warmup", self.max_warmup, self.warmup, integer=True, optional=True)

    def freezes(self, steps_done: int, variance_change: float | None) -> bool:
        """Whether v freezes after ``steps_done`` dense steps, given the last measurement."""
        if self.max_warmup is not None and steps_done >= self.max_warmup:
            return True
        return steps_done >= self.warmup and variance_change is not None and \
            variance_change <= self.tolerance


class AdamPhases(Agent):
    """The Adam-family exchange's agent: dense steps until the rule freezes v, then
    ``agent``'s decisions (or, without one, the compressor's own setting).

    Arguments:
        agent: the agent that decides the compression once v is frozen, or None.
        rule: when to freeze (:class:`FreezeRule`).
    """

    adaptive = True

    def __init__(self, agent: Agent | None = None, rule: FreezeRule | None = None) -> None:
        super().__init__()
        if agent is not None and not isinstance(agent, Agent):
            raise ValueError(f"agent must be an Agent or None, got {type(agent).__name__}")
        self.agent = agent
        self.rule = rule or FreezeRule()
        #: the first step with a frozen v (None: still warming up)
        self.frozen_at: int | None = None

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.agent.name if self.agent is not None else "static"

    @property
    def sets_cf(self) -> bool:  # type: ignore[override]
        return self.agent is not None and self.agent.sets_cf

    @property
    def chooses_codec(self) -> bool:  # type: ignore[override]
        return self.agent is not None and self.agent.chooses_codec

    def use_candidates(self, names: tuple[str, ...], dense: tuple[bool, ...]) -> None:
        if self.agent is None:
            super().use_candidates(names, dense)
        else:
            self.agent.use_candidates(names, dense)

    @property
    def needs_layer_norms(self) -> bool:  # type: ignore[override]
        return self.agent is not None and self.agent.needs_layer_norms

    @property
    def probe(self) -> ProbeSpec | None:
        return self.agent.probe if self.agent is not None else None

    @property
    def error_probe(self) -> ErrorSpec | None:
        return self.agent.error_probe if self.agent is not None else None

    @property
    def phase(self) -> str:
        return WARMUP if self.frozen_at is None else FROZEN

    def initial_decision(self) -> Decision:
        return self._after_freeze() if self.frozen_at is not None else self._warmup()

    @staticmethod
    def _warmup() -> Decision:
        return Decision(cf=None, send=SEND_DENSE, measure_gain=False)

    def _after_freeze(self, decision: Decision | None = None) -> Decision:
        if decision is None:
            decision = self.agent.initial_decision() if self.agent is not None \
                else Decision(cf=None)
        return dataclasses.replace(decision, variance_frozen=True)

    def decide(self, stats: StepStats) -> Decision:
        if self.frozen_at is not None:
            if self.agent is None:
                decision = self._after_freeze()
                self.record(stats, decision, phase=FROZEN)
                return decision
            decision = self._after_freeze(self.agent.decide(stats))
            row = dict(self.agent.history[-1]) if self.agent.history else {}
            self.history.append({**row, "phase": FROZEN})
            return decision
        if self.rule.freezes(stats.step + 1, stats.variance_change):
            self.frozen_at = stats.step + 1
            decision = self._after_freeze()
        else:
            decision = self._warmup()
        self.record(stats, decision, phase=WARMUP, variance_change=stats.variance_change)
        return decision

    def state_dict(self) -> dict[str, Any]:
        """The phase and, through its own ``state_dict``, the wrapped agent's state."""
        state = {k: v for k, v in super().state_dict().items() if k not in ("rule", "agent")}
        return {**state, "agent": None if self.agent is None else self.agent.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        inner = state.pop("agent", None)
        super().load_state_dict(state)
        if inner is not None and self.agent is not None:
            self.agent.load_state_dict(inner)
