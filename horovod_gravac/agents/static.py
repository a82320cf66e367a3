"""Static compression: the same CF at every step (the baseline GraVAC is compared with)."""
from __future__ import annotations

from ..validation import check_number
from .base import Agent, Decision, StepStats


class Static(Agent):
    name = "static"
    adaptive = False

    def __init__(self, cf: float = 100.0) -> None:
        super().__init__()
        self.cf = check_number("cf", cf, 1)

    def initial_decision(self) -> Decision:
        return Decision(cf=self.cf)

    def decide(self, stats: StepStats) -> Decision:
        decision = self.initial_decision()
        self.record(stats, decision)
        return decision
