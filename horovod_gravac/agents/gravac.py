"""GraVAC (Tyagi & Swany, IEEE CLOUD 2023, Algorithm 1): adapt the CF from the compression gain.

The gain of a compression is δ = ‖C(g)‖² / ‖g‖² ∈ (0, 1], how much of the error-fed
gradient's energy survives. Every step the optimizer measures (summed over layers and ranks)
δmin for C(g, θmin) and δc for the multi-level C(C(g, θmin), θs), smoothed by an EWMA with
factor N/100. The decision for the next step:

* δc ≥ ε → send the compressed level (CF θmin·θs, capped at θmax);
* δmin ≥ ε > δc → send the θmin level;
* otherwise → send dense (the residual is reset to 0).

Each step records the *compression throughput* T_sys·δ (T_sys = N·b / t_iter) for the CF that
was sent, as a running mean per CF. Every ``window`` steps (CheckGraVAC):

* if |δmin − δc| / δmin ≤ ω, the CF just explored loses nothing against the floor: θmin is
  raised to it (θmin ← θmin·θs);
* θs ← policy(θs) (exponential: θs²; geometric: 2·θs);
* if the two best compression throughputs are within ω of each other the search stops at the
  lower CF of the two (the paper's saturation rule: 1029.9 at 1280x vs 1035.4 at 2000x with
  ω = 1% → 1280x).

The first window is a warm-up at θmin (θs is first applied after it), so the exponential
policy from θmin = 10, θs = 2 explores 10, 20, 40, 160, then θmax. Multi-level compression,
which the paper's public code never implemented, is what makes measuring δc cheap.
"""
from __future__ import annotations

from typing import Any, Callable

from ..validation import check_number
from .base import SEND_COMPRESSED, SEND_DENSE, SEND_MIN, Agent, Decision, StepStats

SCALING_POLICIES: dict[str, Callable[[float], float]] = {
    "exponential": lambda theta_s: theta_s * theta_s,
    "geometric": lambda theta_s: theta_s * 2.0,
}


class GraVAC(Agent):
    """Rank 0's GraVAC state machine. Parameters as in the paper (SPEC §3)."""

    name = "gravac"
    needs_gain_stats = True

    def __init__(self, theta_min: float = 10.0, theta_max: float = 1000.0, epsilon: float = 0.7,
                 omega: float = 0.01, window: int = 500, theta_s: float = 2.0,
                 policy: str | Callable[[float], float] = "exponential",
                 ewma: float | None = None, batch_size: int = 1) -> None:
        super().__init__()
        self.theta_min = check_number("theta_min", theta_min, 1)
        self.theta_max = check_number("theta_max", theta_max, 1)
        if self.theta_max < self.theta_min:
            raise ValueError(f"theta_max ({theta_max!r}) must be >= theta_min ({theta_min!r})")
        self.epsilon = check_number("epsilon", epsilon, 0, 1, low_open=True)
        self.omega = check_number("omega", omega, 0)
        self.window = check_number("window", window, 1, integer=True)
        self.theta_s = check_number("theta_s", theta_s, 1, low_open=True)
        if isinstance(policy, str):
            if policy not in SCALING_POLICIES:
                raise ValueError(f"unknown scaling policy {policy!r}; valid: "
                                 f"{', '.join(SCALING_POLICIES)} (or a callable)")
            self.policy_name = policy
        elif callable(policy):
            self.policy_name = None
            self._policy = policy
        else:
            raise ValueError(f"policy must be a name or a callable, got {policy!r}")
        self.ewma = check_number("ewma", ewma, 0, 1, low_open=True, optional=True)
        self.batch_size = check_number("batch_size", batch_size, 1, integer=True)
        self.warmup = True
        self.searching = True
        self.delta_min: float | None = None
        self.delta_c: float | None = None
        self.throughput: dict[float, list[float]] = {}  # CF → [sum, count]
        self.steps_in_window = 0
        self.send = SEND_MIN

    # -- helpers -------------------------------------------------------------------------
    def policy(self, theta_s: float) -> float:
        if self.policy_name is None:
            return float(self._policy(theta_s))
        return SCALING_POLICIES[self.policy_name](theta_s)

    @property
    def candidate_cf(self) -> float:
        """The CF of the compressed level: the one explored, or measured during warm-up."""
        return min(self.theta_min * self.theta_s, self.theta_max)

    def mean_throughput(self) -> dict[float, float]:
        return {cf: s / n for cf, (s, n) in self.throughput.items()}

    def decision(self) -> Decision:
        return Decision(cf=self.candidate_cf, theta_min=self.theta_min, send=self.send)

    def initial_decision(self) -> Decision:
        return self.decision()

    # -- the algorithm ---------------------------------------------------------------------
    def decide(self, stats: StepStats) -> Decision:
        alpha = self.ewma if self.ewma is not None else min(1.0, stats.world_size / 100)
        if stats.norm_sq > 0:
            d_min = min(1.0, stats.norm_sq_min / stats.norm_sq)
            d_c = min(1.0, stats.norm_sq_compressed / stats.norm_sq)
        else:  # all-zero gradient: nothing is lost by compressing it
            d_min = d_c = 1.0
        self.delta_min = d_min if self.delta_min is None else alpha * d_min + (1 - alpha) * self.delta_min
        self.delta_c = d_c if self.delta_c is None else alpha * d_c + (1 - alpha) * self.delta_c

        # Record what was actually sent this step.
        sent_cf, sent_gain = {SEND_COMPRESSED: (self.candidate_cf, d_c), SEND_MIN: (self.theta_min, d_min),
                              SEND_DENSE: (1.0, 1.0)}[stats.sent]
        t_sys = stats.world_size * self.batch_size / max(stats.iter_time, 1e-12)
        acc = self.throughput.setdefault(sent_cf, [0.0, 0])
        acc[0] += t_sys * sent_gain
        acc[1] += 1

        self.steps_in_window += 1
        if self.steps_in_window >= self.window:
            self.steps_in_window = 0
            self._check()

        # Branch for the next step.
        if self.warmup:
            self.send = SEND_MIN if self.delta_min >= self.epsilon else SEND_DENSE
        elif self.delta_c >= self.epsilon:
            self.send = SEND_COMPRESSED
        elif self.delta_min >= self.epsilon:
            self.send = SEND_MIN
        else:
            self.send = SEND_DENSE
        decision = self.decision()
        self.record(stats, decision, delta_min=self.delta_min, delta_c=self.delta_c,
                    sent=stats.sent, throughput=self.mean_throughput())
        return decision

    def _check(self) -> None:
        """CheckGraVAC, every ``window`` steps."""
        if self.warmup:
            self.warmup = False  # θs takes effect: explore θmin·θs
            return
        if not self.searching:
            return
        if self.delta_min and abs(self.delta_min - self.delta_c) / self.delta_min <= self.omega:
            self.theta_min = min(self.theta_min * self.theta_s, self.theta_max)
        ranked = sorted(self.mean_throughput().items(), key=lambda kv: kv[1], reverse=True)
        if len(ranked) >= 2 and ranked[1][1] > 0 and \
                abs(ranked[0][1] - ranked[1][1]) / ranked[1][1] <= self.omega:
            ideal = min(ranked[0][0], ranked[1][0])
            self.searching = False
            if ideal <= self.theta_min:
                self.theta_min, self.theta_s = ideal, 1.0
            else:
                self.theta_s = ideal / self.theta_min
            return
        if self.theta_min * self.theta_s < self.theta_max:
            self.theta_s = self.policy(self.theta_s)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("_policy", None)
        return state
