"""Accordion (Agarwal et al., MLSys 2021): low compression in critical regimes, high elsewhere.

Every ``interval`` steps the norm of each layer's gradient, accumulated over the interval, is
compared with the previous interval's: a relative change ≥ η marks a *critical regime* and that
layer uses ``low_cf`` for the next interval, otherwise ``high_cf``. The first interval and the
interval after a learning-rate decay always use ``low_cf``. ``per_layer=False`` applies one
decision to the whole model from the norm of all layers together.

The norms are of the averaged gradient, identical on every rank; rank 0 still decides and
broadcasts, as for every agent. Give ``interval`` in steps, or in epochs with
``steps_per_epoch`` (the paper: 10 epochs for CIFAR, 5 for PTB).
"""
from __future__ import annotations

import math
from ..validation import check_bool, check_number
from .base import Agent, Decision, StepStats


class Accordion(Agent):
    name = "accordion"
    needs_layer_norms = True

    def __init__(self, low_cf: float = 1.0, high_cf: float = 10.0, interval: int = 10,
                 steps_per_epoch: int | None = None, eta: float = 0.5,
                 per_layer: bool = True) -> None:
        super().__init__()
        self.low_cf = check_number("low_cf", low_cf, 1)
        self.high_cf = check_number("high_cf", high_cf, 1)
        if self.high_cf < self.low_cf:
            raise ValueError(f"high_cf ({high_cf!r}) must be >= low_cf ({low_cf!r})")
        interval = check_number("interval", interval, 1, integer=True)
        steps_per_epoch = check_number("steps_per_epoch", steps_per_epoch, 1, integer=True,
                                       optional=True)
        self.interval_steps = interval * (steps_per_epoch or 1)
        self.eta = check_number("eta", eta, 0, low_open=True)
        self.per_layer = check_bool("per_layer", per_layer)
        self.accumulated: dict[str, float] = {}  # squared norms summed over the interval
        self.previous: dict[str, float] | None = None
        self.layer_cf: dict[str, float] = {}
        self.cf = self.low_cf
        self.last_lr: float | None = None
        self.steps_in_interval = 0

    def initial_decision(self) -> Decision:
        return Decision(cf=self.low_cf)

    def decide(self, stats: StepStats) -> Decision:
        lr_decayed = (self.last_lr is not None and stats.lr is not None
                      and stats.lr < self.last_lr)
        self.last_lr = stats.lr
        for name, norm in stats.layer_norms.items():
            self.accumulated[name] = self.accumulated.get(name, 0.0) + norm * norm
        self.steps_in_interval += 1
        if self.steps_in_interval >= self.interval_steps:
            self._end_interval()
        if lr_decayed:  # the paper: always low compression right after a decay
            self.cf, self.layer_cf = self.low_cf, {}
        decision = Decision(cf=self.cf, layer_cf=dict(self.layer_cf) or None)
        self.record(stats, decision, critical_layers=sum(
            1 for v in self.layer_cf.values() if v == self.low_cf))
        return decision

    def _end_interval(self) -> None:
        current = {k: math.sqrt(v) for k, v in self.accumulated.items()}
        if not self.per_layer:
            current = {"__model__": math.sqrt(sum(self.accumulated.values()))}
        if self.previous is not None:
            critical = {k: self.previous.get(k, 0) > 0 and
                        abs(self.previous[k] - v) / self.previous[k] >= self.eta
                        for k, v in current.items()}
            if self.per_layer:
                self.layer_cf = {k: self.low_cf if c else self.high_cf for k, c in critical.items()}
                self.cf = self.high_cf
            else:
                self.cf = self.low_cf if critical["__model__"] else self.high_cf
        self.previous = current
        self.accumulated = {}
        self.steps_in_interval = 0
