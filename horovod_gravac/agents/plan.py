"""An error-budgeted layer plan (after L-GreCo, Markov et al., MLSys 2024) on top of any agent.

The time-level agent (static, Accordion, GraVAC; the codec choice: below) sets the uniform
CF u of the compressed level; :class:`LayerPlan` redistributes it over the tensors. Every
``plan_interval`` steps:

1. On the interval's last ``measure_steps`` steps the engine measures, per compressed tensor
   ℓ and candidate CF c = f·u (f in ``factors``, around 1), the compression error
   e_ℓ(c) = ‖x_ℓ − C(x_ℓ, c)‖² on every rank's error-fed tensor x_ℓ = g_ℓ + residual_ℓ,
   summed over ranks and over the measured steps (:class:`~.base.ErrorSpec`; the steps in
   between measure nothing and carry nothing). It also prices each candidate's link bytes
   b_ℓ(c) from the shapes (an allgather's N−1 payloads, an allreduce's 2(N−1)/N).
2. Rank 0 solves

       minimise Σ_ℓ b_ℓ(c_ℓ)   subject to   Σ_ℓ e_ℓ(c_ℓ) ≤ α · Σ_ℓ e_ℓ(u)

   by dynamic programming over the tensors (:func:`plan_layers`): the budget is cut into
   ``LEVELS_PER_TENSOR`` × (number of tensors) units and every error is rounded *up* to a
   whole unit, so the solution is exact (the minimum bytes) on the rounded errors and meets
   the constraint on the measured ones; it can only lose a little budget to rounding (at most
   one unit per tensor: 1/LEVELS_PER_TENSOR of it). When it finds nothing cheaper than the
   uniform plan, the uniform plan stays.
3. Every decision carries the plan's c_ℓ (``Decision.layer_cf``, broadcast with the rest);
   the agent's state (in checkpoints) holds the plan and the interval's measurements. A plan
   holds for the uniform CF it was made for: when the time-level agent moves u, the plan is
   dropped, the next ``measure_steps`` steps measure the errors at the new u and the plan
   follows (a plan does not scale: PowerSGD's rank 1 is a floor that higher CFs cannot go
   below, so factors that saved bytes at one u can cost bytes at another).

What a CF means per compressor family: the kept fraction of TopK, DGC and the other
sparsifiers, PowerSGD's rank (r = ⌊nm / (c(n+m))⌋). The quantizers here have a fixed CF
(no setting to plan), as every agent requires. The plan acts on the compressed level; the
θmin level and dense steps of GraVAC send what they always send.

**A codec per tensor.** Over an agent that chooses the codec among a set of candidates
(:class:`~.choice.CodecChoice`, ``compression="auto"``), the candidates of each tensor are
the set's codecs instead of CFs around u: u is the codec the agent sends, e_ℓ(k) the error
of candidate k on tensor ℓ (:meth:`~horovod_gravac.compression.Candidates.errors`: 0 for
dense, a codec not sent as it would settle), b_ℓ(k) its link bytes, and the same knapsack
gives each tensor its codec (``Decision.layer_codec``): an embedding whose gradient sits in
a few rows can go sparse while the rest goes low-rank, within the error of sending u
everywhere. When u is dense every tensor is sent dense (nothing is planned). A plan holds
for the codec it was made for, as for a CF. The agent prices its codec by the steps that
sent it, the plan's smaller traffic included; a codec it has not sent, as if sent to every
tensor.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

from ..validation import check_number
from .base import SEND_COMPRESSED, Agent, Decision, ErrorSpec, StepStats, Wrapper
from .gravac import DEFAULT_GAIN_SAMPLE

#: candidate CFs per tensor, as factors of the uniform CF (L-GreCo: ranks ½× to 2×)
DEFAULT_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
#: units of the error budget per planned tensor (rounding loses at most one each)
LEVELS_PER_TENSOR = 50


def plan_layers(errors: Mapping[str, Sequence[float]], link_bytes: Mapping[str, Sequence[float]],
                budget: float, levels: int) -> dict[str, int] | None:
    """Per tensor, the index of its candidate that minimises Σ bytes with Σ error ≤ ``budget``.

    ``errors[name][k]`` and ``link_bytes[name][k]`` are candidate k's error and bytes. Exact
    on the errors rounded up to multiples of ``budget / levels`` (a knapsack by dynamic
    programming over the tensors, O(tensors × candidates × levels)); so the real errors meet
    the budget too. None when no choice does (with ``budget`` ≤ 0, only error-free
    candidates fit).
    """
    names = list(errors)
    if not names:
        return {}
    unit = budget / levels if budget > 0 else 0.0
    weights, costs = {}, {}
    for name in names:
        e = np.asarray(errors[name], dtype=np.float64)
        if unit > 0:
            w = np.ceil(np.maximum(e, 0.0) / unit - 1e-9)
        else:
            w = np.where(e <= 0, 0.0, levels + 1.0)
        weights[name] = np.minimum(w, levels + 1).astype(np.int64)  # > levels: never fits
        costs[name] = np.asarray(link_bytes[name], dtype=np.float64)
    best = np.zeros(levels + 1)  # best[b]: fewest bytes of the tensors so far within b units
    picks = np.empty((len(names), levels + 1), dtype=np.int16)
    for i, name in enumerate(names):
        new = np.full(levels + 1, np.inf)
        pick = np.full(levels + 1, -1, dtype=np.int16)
        for k, (w, cost) in enumerate(zip(weights[name], costs[name])):
            if w > levels:
                continue
            candidate = np.full(levels + 1, np.inf)
            candidate[w:] = best[:levels + 1 - w] + cost
            better = candidate < new
            new[better], pick[better] = candidate[better], k
        best, picks[i] = new, pick
    if not math.isfinite(best[levels]):
        return None
    choice, left = {}, levels
    for i in reversed(range(len(names))):
        k = int(picks[i, left])
        choice[names[i]] = k
        left -= int(weights[names[i]][k])
    return choice


class LayerPlan(Wrapper):
    """A time-level agent's uniform CF (or codec), redistributed over the tensors within its
    error.

    Arguments:
        agent: the time-level agent (an object, or a name for ``agents.create``) whose
            decision sets the uniform CF — or the codec, for an agent that chooses among a
            set of candidates (then every tensor's codec is planned); it must not set
            per-tensor CFs itself (Accordion's ``per_layer``).
        alpha: the error budget α > 0, relative to the uniform plan's total error (1: the
            same error, fewer bytes).
        plan_interval: steps between plans (≥ 1).
        factors: candidate CFs per tensor as factors of the uniform CF; positive, with 1
            (the uniform plan) among them (None: ``DEFAULT_FACTORS``). Not with an agent
            that chooses the codec: a tensor's candidates are then the set's codecs.
        measure_steps: steps at the end of each interval whose errors are measured and
            summed (1 … plan_interval).
        sample: elements a measured step's errors are estimated from, shared among the
            tensors by size, as GraVAC's gains (None: exact).
    """

    def __init__(self, agent: Agent | str, alpha: float = 1.0, plan_interval: int = 100,
                 factors: Sequence[float] | None = None, measure_steps: int = 3,
                 sample: int | None = DEFAULT_GAIN_SAMPLE) -> None:
        from . import create  # the registry imports this module
        inner = create(agent)
        if inner is None:
            raise ValueError("LayerPlan needs a time-level agent (static, accordion, gravac, "
                             f"choice), got {agent!r}")
        if inner.per_layer:
            raise ValueError(f"agent {inner.name!r} sets per-tensor CFs itself (per_layer=True); "
                             "a layer plan redistributes one uniform CF: use per_layer=False")
        super().__init__(inner)
        self.name = f"{inner.name}+plan"
        #: whether the plan chooses each tensor's codec (the agent chooses one) or its CF
        self.per_codec = bool(inner.chooses_codec)
        self.alpha = check_number("alpha", alpha, 0, low_open=True)
        self.plan_interval = check_number("plan_interval", plan_interval, 1, integer=True)
        if self.per_codec and factors is not None:
            raise ValueError(f"factors={factors!r}: agent {inner.name!r} chooses the codec, and "
                             "a plan under it chooses each tensor's codec among the same "
                             "candidates: leave factors out")
        self.factors = () if self.per_codec else _checked_factors(
            DEFAULT_FACTORS if factors is None else factors)
        #: the candidates of the set a codec-choosing agent chooses among (use_candidates)
        self.codecs = 0
        self.measure_steps = check_number("measure_steps", measure_steps, 1,
                                          self.plan_interval, integer=True)
        self.sample = check_number("sample", sample, 1, integer=True, optional=True)
        #: the plan: tensor → factor of the uniform CF, or its codec ({}: uniform), and the
        #: uniform CF (or codec) it is for
        self.plan: dict[str, float | int] = {}
        self.planned_for: float | int | None = None
        #: steps until the next plan (its errors are measured in the last measure_steps)
        self.until_plan = self.plan_interval
        #: errors summed over this interval's measured steps, and their uniform CF (or codec)
        self.errors: dict[str, list[float]] = {}
        self.link_bytes: dict[str, list[float]] = {}
        self.errors_for: float | int | None = None
        self.measured_steps = 0
        #: the uniform CF (or codec) of the last decision if it measures errors (else None)
        self.measured_for: float | int | None = None
        #: the last plan's totals: link bytes and errors of the uniform plan and of the plan
        self.summary: dict[str, float] = {}
        self.plans = 0

    # -- what the engine sees --------------------------------------------------------------
    adaptive = True

    @property
    def error_probe(self) -> ErrorSpec:
        return ErrorSpec(self.factors, self.sample, self.codecs)

    def use_candidates(self, names: tuple[str, ...], dense: tuple[bool, ...]) -> None:
        super().use_candidates(names, dense)
        self.codecs = len(names)

    def _uniform(self, decision: Decision) -> float | int | None:
        """What the time-level ``decision`` sends every tensor: its codec, or its CF."""
        return decision.codec if self.per_codec else decision.cf

    def initial_decision(self) -> Decision:
        return self._planned(self.agent.initial_decision())

    def decide(self, stats: StepStats) -> Decision:
        if stats.errors_measured:
            self._accumulate(stats)
        self.until_plan -= 1
        if self.until_plan <= 0:
            if self.measured_steps:
                self._replan()
            self.until_plan = self.plan_interval
        decision = self.agent.decide(stats)
        if self.planned_for is not None and self._uniform(decision) != self.planned_for:
            # the time-level agent moved the uniform CF (or codec): a plan for another does not
            # carry over (PowerSGD's rank 1 is a floor), so measure at the new one and plan again
            self.plan, self.planned_for = {}, None
            self.until_plan = min(self.until_plan, self.measure_steps)
        decision = self._planned(decision)
        if self.agent.history:
            self.agent.history[-1].update(self.row())
        return decision

    def _planned(self, decision: Decision) -> Decision:
        """``decision`` with the plan's per-tensor CFs (or codecs), marked for measuring when
        it is for one of the last ``measure_steps`` steps before the next plan."""
        measure = self.until_plan <= self.measure_steps
        self.measured_for = self._uniform(decision) if measure else None
        if self.per_codec:
            compressed = decision.send == SEND_COMPRESSED  # not the dense candidate
            layer_codec = {name: k for name, k in self.plan.items()
                           if k != decision.codec and compressed}
            return dataclasses.replace(decision, layer_codec=layer_codec or None,
                                       measure_errors=measure)
        layer_cf = {name: max(1.0, decision.cf * f) for name, f in self.plan.items()
                    if f != 1.0} or None
        return dataclasses.replace(decision, layer_cf=layer_cf, measure_errors=measure)

    def _accumulate(self, stats: StepStats) -> None:
        """Add a measured step's errors; a change of the uniform CF (codec) starts them again."""
        uniform = self.measured_for  # the uniform CF (codec) of the decision this step applied
        if uniform is None or not stats.layer_errors:
            return
        if uniform != self.errors_for:
            self.errors, self.link_bytes, self.measured_steps = {}, {}, 0
            self.errors_for = uniform
        for name, row in stats.layer_errors.items():
            total = self.errors.setdefault(name, [0.0] * len(row))
            total[:] = [t + x for t, x in zip(total, row)]
        self.link_bytes.update({n: list(b) for n, b in stats.candidate_link_bytes.items()})
        self.measured_steps += 1

    def _replan(self) -> None:
        """The plan from this interval's errors (see the module docstring)."""
        names = [n for n in self.errors if n in self.link_bytes]
        errors = {n: self.errors[n][1:] for n in names}
        sizes = {n: self.link_bytes[n] for n in names}
        one = self.errors_for if self.per_codec else self.factors.index(1.0)
        uniform = {n: one for n in names}
        budget = self.alpha * sum(e[one] for e in errors.values())
        choice = plan_layers(errors, sizes, budget, LEVELS_PER_TENSOR * max(1, len(names)))

        def total(of: dict[str, list[float]], pick: dict[str, int]) -> float:
            return sum(of[n][k] for n, k in pick.items())

        if choice is None or budget >= total(errors, uniform) and \
                total(sizes, choice) >= total(sizes, uniform):
            choice = uniform  # nothing within the budget is cheaper than the uniform CF
        self.plan = {n: k if self.per_codec else self.factors[k]
                     for n, k in choice.items() if k != one}
        self.planned_for = self.errors_for
        self.summary = {"uniform_bytes": total(sizes, uniform), "bytes": total(sizes, choice),
                        "uniform_error": total(errors, uniform), "error": total(errors, choice)}
        self.plans += 1
        self.errors, self.link_bytes, self.measured_steps, self.errors_for = {}, {}, 0, None

    def row(self) -> dict[str, Any]:
        """The metrics the agent's rows get: the last plan's bytes and error relative to the
        uniform plan's, and how many tensors it moved off the uniform CF."""
        s = self.summary
        if not s:
            return {"plans": self.plans}
        return {"plans": self.plans, "planned_tensors": len(self.plan),
                "plan_bytes_ratio": s["bytes"] / s["uniform_bytes"] if s["uniform_bytes"] else 1.0,
                "plan_error_ratio": s["error"] / s["uniform_error"] if s["uniform_error"] else 1.0}

    def state_dict(self) -> dict[str, Any]:
        """The plan, this interval's measurements and the time-level agent's state."""
        state = {k: copy.deepcopy(v) for k, v in vars(self).items() if k != "agent"}
        return {**state, "agent": self.agent.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        state = dict(state)
        self.agent.load_state_dict(state.pop("agent"))
        for key, value in copy.deepcopy(state).items():
            setattr(self, _RENAMED.get(key, key), value)


#: state keys a plan saved before it could plan codecs, and their names now
_RENAMED = {"planned_cf": "planned_for", "errors_cf": "errors_for",
            "measured_cf": "measured_for"}


def _checked_factors(factors: Sequence[float]) -> tuple[float, ...]:
    """``factors`` sorted, once each; refused unless positive numbers with 1 among them."""
    factors = tuple(factors) if isinstance(factors, (list, tuple)) else factors
    if not isinstance(factors, tuple) or not factors:
        raise ValueError(f"factors must be a non-empty list of positive numbers with 1 "
                         f"among them, got {factors!r}")
    for i, f in enumerate(factors):
        check_number(f"factors[{i}]", f, 0, low_open=True)
    if 1 not in factors:
        raise ValueError(f"factors must contain 1 (the uniform plan), got {factors!r}")
    return tuple(sorted(float(f) for f in set(factors)))
