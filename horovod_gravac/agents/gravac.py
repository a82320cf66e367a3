"""GraVAC (Tyagi & Swany, IEEE CLOUD 2023, Algorithm 1): adapt the CF from the compression gain.

The compression gain δ of a CF says how much of the gradient survives compression. On the
steps its decision marks (every ``gain_interval``-th) the engine measures it per tensor and
sums it over ranks (:class:`~.base.ProbeSpec`); GraVAC smooths it (:class:`GainTracker`).
The decision for the next step, Algorithm 1's three branches:

* δc ≥ ε → send the compressed level (the candidate CF, at most θmax);
* δmin ≥ ε > δc → send the θmin level;
* otherwise → send dense (the residual is reset to 0).

Which CF is the candidate is the search strategy's (``search``):

**By cost model** (``search="cost_model"``, the default; beyond the paper). The paper's
search spends a window on each candidate and compares measured throughputs, which on a
shared machine vary by 2× from step to step. Instead every measured step measures the gain
of every CF of a ladder (θmin, 2θmin, 4θmin, … up to θmax), the engine prices each ladder
CF's link bytes from the shapes, and a :class:`~.costmodel.LinkModel` fits the link
(latency, bandwidth) from the step times and waits of the CFs actually sent, so the step
time of every ladder CF is predicted. At every window end (after the warm-up at θmin) the
CF with the best predicted compression throughput δ(c) / t(c) among those with δ(c) ≥ ε is
sent from then on; the CF sent stays unless the best one scores more than
``omega_throughput`` higher (hysteresis). The ranking is redone at every window end, so the
choice follows gains that drift. θmin stays the floor. Measured end to end (PTB LSTM, 4
ranks behind 100 Mbit/s) it reached the target 1.4–2× sooner than the throughput search.

**A CF per tensor** comes from a :class:`~.plan.LayerPlan` over GraVAC: GraVAC sets the
uniform CF, the plan spends it per tensor within the uniform CF's compression error.

**By throughput** (``search="throughput"``: the paper's). Each step records the
*compression throughput* T_sys·δ (T_sys = N·b / t_iter, δ the smoothed gain of the level
sent) for the CF that was sent, as a running mean per CF. Every ``window`` steps
(CheckGraVAC):

* if |δmin − δc| / δmin ≤ ω (``omega``), the CF just explored loses nothing against the
  floor: θmin is raised to it;
* if the two best compression throughputs are within ``omega_throughput`` of each other the
  search stops at the lower CF of the two (the paper's saturation rule: 1029.9 at 1280x vs
  1035.4 at 2000x with a 1% tolerance → 1280x);
* if the window just ended explored θmax, the search is over: it stops at the CF with the
  best compression throughput (the paper leaves this case open; staying at θmax with a gain
  below ε would send θmin for the rest of training). Dense steps are no candidates;
* otherwise θs ← policy(θs) (exponential: θs²; geometric: 2·θs).

The first window is a warm-up at θmin that measures the first candidate, so the exponential
policy from θmin = 10, θs = 2 explores 10, 20, 40, 160, then θmax. Once settled, the search
*reopens* (beyond the paper) from the initial θmin and θs when at ``reopen_confirmations``
consecutive window ends the settled CF's gain differs from its gain at the first window end
by more than ``reopen_tolerance`` (relative), or when the learning rate has changed by a
factor of ``reopen_lr_ratio`` since it settled (``None`` switches either rule off).

**Which gain** (``gain``; measured, PTB LSTM 2×200, TopK + residual memory, 500 steps):

* ``"fresh"`` (default) — δ = ‖C(g)‖² / ‖g‖² on the fresh gradient g, before error feedback.
  It tracks training quality: sending CF 100 trained like dense (validation perplexity 713 vs
  717) and its fresh gain stayed ≈ 0.85; at CF 1000 it fell to ≈ 0.5 and perplexity rose 8%.
* ``"error_fed"`` — δ = ‖C(g_o)‖² / ‖g_o‖² on g_o = g + residual, the paper's text. Once a
  higher CF is actually sent, the residual that compression creates dominates ‖g_o‖²: at
  CF 100 (trains like dense) this gain was 0.11, so GraVAC falls back to θmin and stays.
* ``"authors"`` — the GraVAC authors' public code: Σ_layers‖C(g_o)‖ / Σ_layers‖g‖ (norms,
  not squared; the raw gradient in the denominator), numerator and denominator each the mean
  of the last 25 measurements. It can exceed 1. Throughput search only.

End to end (4 ranks behind 100 Mbit/s, PTB LSTM, 200 steps): with the error-fed gain GraVAC
stayed at θmin; with the authors' gain it compressed past what the digits CNN tolerates
(accuracy 0.958 vs 0.985); the fresh gain's choices tracked quality on both workloads.

**What a gain costs.** The paper's δc is multi-level: C(C(g, θmin), θs), which is a second
compression of every gradient on top of the one sent. Here the compressor estimates the
energy ‖C(x, c)‖² of every CF measured from a sample, ``gain_sample`` elements a step shared
among the tensors by size (:meth:`~horovod_gravac.compression.Compressor.energy_profile`: the
largest of a strided sample for sparsifiers, a sketch of the matrix's lines for PowerSGD),
so a measured step costs a sort of the sample, not a compression; what is sent is one
compression of g + residual at the CF sent. ``gain_sample=None`` measures exactly (the
paper's multi-level compression). The cost model measures ten times a window by default
(``gain_interval`` = ⌊window/10⌋): its ranking needs a few measurements per window, not one
per step (on ResNet-101's 314 tensors a measured step costs 1.1x a static TopK step).

**Smoothing.** ``"fresh"`` and ``"error_fed"`` gains are smoothed by an exponentially weighted
mean with factor α, bias-corrected (m ← (1−α)m + αx, δ = m / (1 − (1−α)^n)), so the first
measurements are not over-weighted. The default α = min(1, max(N/100, 5·k/window)), k the
``gain_interval``, keeps the paper's N/100 where it is fast enough and otherwise fits five
time constants (1/α measurements, k steps apart) into a window. Whenever a level's CF changes
its mean restarts, and the first ``settle_steps`` steps after a change of θmin or of the
candidate CF are neither measured nor timed (the residual and the step time adjust to it).

The paper's behaviour is reachable with ``search="throughput"``, ``gain="error_fed"``,
``omega=omega_throughput=0.01``, ``ewma=N/100``, ``settle_steps=0``,
``reopen_tolerance=reopen_lr_ratio=None``, ``gain_sample=None`` (and
``min_compress_numel=0`` in the optimizer: the paper compresses every tensor).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

from ..validation import check_number
from .base import (COMPENSATED, GRADIENT, SEND_COMPRESSED, SEND_DENSE, SEND_MIN, Agent, Decision,
                   GainMeasure, ProbeSpec, StepStats)
from .costmodel import LinkFit, LinkModel

SCALING_POLICIES: dict[str, Callable[[float], float]] = {
    "exponential": lambda theta_s: theta_s * theta_s,
    "geometric": lambda theta_s: theta_s * 2.0,
}

#: gain name → what the engine measures. "authors" averages its terms over the last
#: AUTHORS_WINDOW measurements; the others use the bias-corrected EWMA.
GAINS: dict[str, GainMeasure] = {
    "fresh": GainMeasure(compressed=GRADIENT, reference=GRADIENT, power=2),
    "error_fed": GainMeasure(compressed=COMPENSATED, reference=COMPENSATED, power=2),
    "authors": GainMeasure(compressed=COMPENSATED, reference=GRADIENT, power=1),
}
AUTHORS_WINDOW = 25
LEVELS = ("min", "c")
SEARCHES = ("throughput", "cost_model")
#: the cost-model search's candidate CFs: θmin times powers of this, up to θmax
LADDER_STEP = 2.0
#: elements a step's gains are estimated from by default, shared among the tensors by size
#: (None: exact)
DEFAULT_GAIN_SAMPLE = 131072


def compression_throughputs(gains: Mapping[float, float | None],
                            step_times: Mapping[float, float | None],
                            epsilon: float) -> dict[float, float]:
    """The cost-model search's scores: per CF c with a gain δ(c) ≥ ε and a step time t(c) > 0,
    δ(c) / t(c) (the best is sent). Pure numbers: ``benchmarks.whatif`` ranks predicted
    step times at other scales with it."""
    scores = {}
    for cf, gain in gains.items():
        t = step_times.get(cf)
        if gain is not None and gain >= epsilon and t is not None and t > 0:
            scores[cf] = gain / t
    return scores


def cf_ladder(theta_min: float, theta_max: float) -> tuple[float, ...]:
    """θmin, 2θmin, 4θmin, … below θmax, then θmax."""
    ladder, cf = [], theta_min
    while cf < theta_max:
        ladder.append(cf)
        cf *= LADDER_STEP
    return (*ladder, theta_max)


class GainTracker:
    """Smoothed compression gains, one per key (a level, a CF): numerator over reference.

    ``"fresh"`` and ``"error_fed"`` gains are a bias-corrected EWMA of the ratios (factor α,
    see :meth:`alpha`); the authors' gain is the mean numerator over the mean reference of
    the last ``AUTHORS_WINDOW`` measurements. Plain numbers only (it pickles).
    """

    def __init__(self, gain: str, ewma: float | None, window: int, gain_interval: int) -> None:
        self.gain, self.ewma = gain, ewma
        self.window, self.gain_interval = window, gain_interval
        self.means: dict[Any, list[float]] = {}  # key → [m, 1 − (1−α)^n]
        #: key → the authors' last AUTHORS_WINDOW [numerator, reference]
        self.recent: dict[Any, list[list[float]]] = {}
        self.values: dict[Any, float] = {}

    def alpha(self, world_size: int) -> float:
        """The paper's N/100, raised where needed so that five time constants (1/α
        measurements, ``gain_interval`` steps apart) fit into a window; or ``ewma``."""
        if self.ewma is not None:
            return self.ewma
        return min(1.0, max(world_size / 100, 5 * self.gain_interval / self.window))

    def restart(self, *keys: Any) -> None:
        """Forget these gains: their CF changed."""
        for key in keys:
            self.means.pop(key, None)
            self.recent.pop(key, None)
            self.values.pop(key, None)

    def add(self, key: Any, numerator: float, reference: float, world_size: int) -> float:
        """One more measurement of ``key``; its smoothed gain."""
        if self.gain == "authors":
            recent = self.recent[key] = [*self.recent.get(key, []),
                                         [numerator, reference]][-AUTHORS_WINDOW:]
            num, den = (sum(t) for t in zip(*recent))
            value = num / den if den > 0 else 1.0
        else:
            # all-zero gradient: nothing is lost by compressing it
            x = min(1.0, numerator / reference) if reference > 0 else 1.0
            a = self.alpha(world_size)
            mean = self.means.setdefault(key, [0.0, 0.0])
            mean[0] = (1 - a) * mean[0] + a * x
            mean[1] = (1 - a) * mean[1] + a  # = 1 − (1−α)^n: the bias correction
            value = mean[0] / mean[1]
        self.values[key] = value
        return value

    def get(self, key: Any) -> float | None:
        return self.values.get(key)


class Search:
    """What GraVAC asks of a search strategy: the floor θmin and the candidate CF θmin·θs it
    holds, whether it still searches, the compression throughput recorded per CF sent, and
    what it makes of a step's measurements and of a window's end. Subclasses implement
    ``measured``, ``delta`` and ``window_end``."""

    name = ""
    #: CFs whose gain and link bytes the engine measures at every measured step
    ladder: tuple[float, ...] = ()

    def __init__(self, theta_min: float, theta_max: float, theta_s: float,
                 omega_throughput: float) -> None:
        self.theta_min, self.theta_max, self.theta_s = theta_min, theta_max, theta_s
        self.omega_throughput = omega_throughput
        self.searching = True
        self.reopened = 0  # how many times the search reopened
        self.throughput: dict[float, list[float]] = {}  # CF → [Σ T_sys·δ, steps]

    @property
    def candidate_cf(self) -> float:
        return min(self.theta_min * self.theta_s, self.theta_max)

    def mean_throughput(self) -> dict[float, float]:
        return {cf: s / n for cf, (s, n) in self.throughput.items()}

    def record(self, sent_cf: float, compression_throughput: float) -> None:
        acc = self.throughput.setdefault(sent_cf, [0.0, 0])
        acc[0] += compression_throughput
        acc[1] += 1

    def measured(self, stats: StepStats, tracker: GainTracker) -> None:
        """A measured step's gain terms into ``tracker``."""
        raise NotImplementedError

    def timed(self, sent_cf: float, stats: StepStats) -> None:
        """A timed step that sent ``sent_cf`` (a search that models the link fits it)."""

    def delta(self, tracker: GainTracker) -> tuple[float | None, float | None]:
        """(δmin, δc): the smoothed gains at θmin and at the candidate CF."""
        raise NotImplementedError

    def window_end(self, agent: "GraVAC", lr: float | None) -> None:
        """CheckGraVAC: move θmin and θs."""
        raise NotImplementedError

    def row(self) -> dict[str, Any]:
        """The search's columns of the agent's metrics row."""
        return {}


class ThroughputSearch(Search):
    """The paper's search: a window per candidate CF θmin·θs, ranked by the compression
    throughput measured while it was sent; it settles at saturation or at θmax and reopens
    when the settled gain drifts or the learning rate steps (see the module docstring)."""

    name = "throughput"

    def __init__(self, theta_min: float, theta_max: float, theta_s: float, omega: float,
                 omega_throughput: float, reopen_tolerance: float | None,
                 reopen_confirmations: int, reopen_lr_ratio: float | None) -> None:
        super().__init__(theta_min, theta_max, theta_s, omega_throughput)
        self.omega = omega
        self.reopen_tolerance, self.reopen_confirmations = reopen_tolerance, reopen_confirmations
        self.reopen_lr_ratio = reopen_lr_ratio
        self.initial = (theta_min, theta_s)
        #: once settled: (the settled CF's gain at the first window end, the learning rate)
        self.reference_gain: float | None = None
        self.reference_lr: float | None = None
        self.drifted_checks = 0

    def measured(self, stats: StepStats, tracker: GainTracker) -> None:
        """The decision's two levels, θmin and θmin·θs."""
        for level, numerator in zip(LEVELS, (stats.gain_min, stats.gain_compressed)):
            tracker.add(level, numerator, stats.gain_reference, stats.world_size)

    def delta(self, tracker: GainTracker) -> tuple[float | None, float | None]:
        """(δmin, δc): the smoothed gains of the two levels."""
        return tracker.get("min"), tracker.get("c")

    def window_end(self, agent: "GraVAC", lr: float | None) -> None:
        """CheckGraVAC."""
        tracker = agent.tracker
        if not self.searching:
            self._watch(tracker, lr)
            return
        explored, theta_min = self.candidate_cf, self.theta_min
        delta_min, delta_c = self.delta(tracker)
        if delta_min and delta_c is not None and \
                abs(delta_min - delta_c) / delta_min <= self.omega:
            self.theta_min = explored
        ranked = sorted(((cf, t) for cf, t in self.mean_throughput().items() if cf > 1),
                        key=lambda kv: kv[1], reverse=True)
        if len(ranked) >= 2 and ranked[1][1] > 0 and \
                abs(ranked[0][1] - ranked[1][1]) / ranked[1][1] <= self.omega_throughput:
            self._settle_at(min(ranked[0][0], ranked[1][0]))
        elif explored >= self.theta_max and ranked:
            self._settle_at(ranked[0][0])
        elif self.theta_min * self.theta_s < self.theta_max:
            self.theta_s = agent.policy(self.theta_s)
        tracker.restart("c")
        if self.theta_min != theta_min:
            tracker.restart("min")

    def _watch(self, tracker: GainTracker, lr: float | None) -> None:
        """Settled: reopen the search when the gain drifts or the learning rate steps."""
        if self.reference_lr is None:
            self.reference_lr = lr
        if self.reopen_lr_ratio is not None and lr and self.reference_lr:
            ratio = lr / self.reference_lr
            if max(ratio, 1 / ratio) >= self.reopen_lr_ratio:
                self._reopen(tracker)
                return
        delta_c = tracker.get("c")
        if delta_c is None or self.reopen_tolerance is None:
            return
        if self.reference_gain is None:
            self.reference_gain = delta_c
            return
        drift = abs(delta_c - self.reference_gain) / max(self.reference_gain, 1e-12)
        self.drifted_checks = self.drifted_checks + 1 if drift > self.reopen_tolerance else 0
        if self.drifted_checks >= self.reopen_confirmations:
            self._reopen(tracker)

    def _reopen(self, tracker: GainTracker) -> None:
        """Search again from the initial θmin and θs; old throughputs no longer apply."""
        self.searching = True
        self.reopened += 1
        self.theta_min, self.theta_s = self.initial
        self.throughput.clear()
        self.reference_gain = self.reference_lr = None
        self.drifted_checks = 0
        tracker.restart(*LEVELS)

    def _settle_at(self, ideal: float) -> None:
        """Stop searching: the compressed level is θ_ideal from now on."""
        self.searching = False
        if ideal <= self.theta_min:
            self.theta_min, self.theta_s = ideal, 1.0
        else:
            self.theta_s = ideal / self.theta_min

    def row(self) -> dict[str, Any]:
        return {"reopened": self.reopened}


class CostModelSearch(Search):
    """Every ladder CF ranked at each window end by its gain over the step time a fitted
    link model predicts for it (see the module docstring); θmin stays the floor."""

    name = "cost_model"

    def __init__(self, theta_min: float, theta_max: float, omega_throughput: float,
                 epsilon: float) -> None:
        super().__init__(theta_min, theta_max, 1.0, omega_throughput)
        self.epsilon = epsilon
        #: CFs whose gain and bytes the engine measures
        self.ladder = cf_ladder(theta_min, theta_max)
        self.link = LinkModel()
        self.ladder_link_bytes: dict[float, float] = {}  # CF → link bytes of a step at it

    def measured(self, stats: StepStats, tracker: GainTracker) -> None:
        """Every ladder CF's gain and link bytes."""
        for cf, numerator in stats.gain_ladder.items():
            tracker.add(cf, numerator, stats.gain_reference, stats.world_size)
        self.ladder_link_bytes.update(stats.ladder_link_bytes)

    def delta(self, tracker: GainTracker) -> tuple[float | None, float | None]:
        """(the gain at θmin, the gain of the compressed level's CF)."""
        return tracker.get(self.theta_min), tracker.get(self.candidate_cf)

    def timed(self, sent_cf: float, stats: StepStats) -> None:
        if stats.iter_time > 0:
            self.link.add(sent_cf, stats.link_bytes, stats.wait_time, stats.iter_time)

    def window_end(self, agent: "GraVAC", lr: float | None) -> None:
        """Send the ladder CF with the best predicted compression throughput from now on."""
        scores = self.predicted_throughputs(agent.tracker)
        sent = agent.sent_cf(agent.send)
        best = max(scores, key=scores.get) if scores else None
        if best is None:  # no CF above ε (or nothing measured): the θmin level, or dense
            self.theta_s = 1.0
        elif sent in scores and scores[sent] >= (1 - self.omega_throughput) * scores[best]:
            self.searching = False  # hysteresis: the CF sent is within tolerance of the best
            self.theta_s = sent / self.theta_min
        else:
            self.searching = True
            self.theta_s = best / self.theta_min

    def predicted_time(self, fit: LinkFit, cf: float) -> float | None:
        link_bytes = self.ladder_link_bytes.get(cf)
        return None if link_bytes is None else fit.step_time(link_bytes)

    def predicted_throughputs(self, tracker: GainTracker) -> dict[float, float]:
        """Per ladder CF c with δ(c) ≥ ε, δ(c) / predicted t(c)."""
        fit = self.link.fit()
        if fit is None:
            return {}
        return compression_throughputs({cf: tracker.get(cf) for cf in self.ladder},
                                       {cf: self.predicted_time(fit, cf) for cf in self.ladder},
                                       self.epsilon)

    def row(self) -> dict[str, Any]:
        fit = self.link.fit()
        return {} if fit is None else {
            "link_bandwidth": fit.bandwidth, "link_latency": fit.latency, "compute_s": fit.compute,
            "predicted_step_s": self.predicted_time(fit, self.candidate_cf)}


def _check_policy(policy: str | Callable[[float], float]) -> str | None:
    """A scaling policy's name, or None for a callable one; anything else a ValueError."""
    if isinstance(policy, str):
        if policy not in SCALING_POLICIES:
            raise ValueError(f"unknown scaling policy {policy!r}; valid: "
                             f"{', '.join(SCALING_POLICIES)} (or a callable)")
        return policy
    if callable(policy):
        return None
    raise ValueError(f"policy must be a name or a callable, got {policy!r}")


class GraVAC(Agent):
    """Rank 0's GraVAC: a :class:`GainTracker` and a search strategy
    (:class:`CostModelSearch` by default, :class:`ThroughputSearch` — the paper's — with
    ``search="throughput"``), around Algorithm 1's three branches.

    Arguments:
        theta_min: the floor CF θmin (first level of multi-level compression).
        theta_max: the largest CF ever used.
        epsilon: gain threshold ε in (0, 1]: a level is sent only while its gain is ≥ ε.
        omega: gain-gap tolerance of the θmin scale-up test (|δmin − δc| / δmin ≤ omega).
        window: steps between CheckGraVAC calls (the first window is a warm-up at θmin).
        theta_s: the initial scaling step θs > 1 (candidate CF = θmin·θs).
        policy: "exponential" (θs²), "geometric" (2·θs) or a callable θs → new θs.
        ewma: smoothing factor α of the gains; None → min(1, max(N/100, 5·gain_interval/window)).
        batch_size: samples per rank and step (T_sys = N·b / t_iter).
        gain: "fresh", "error_fed" or "authors" (see the module docstring).
        omega_throughput: tolerance between the two best (measured or predicted) compression
            throughputs (relative); above the step-time noise of the machine.
        gain_interval: measure the gain every this many steps; None: every step for the
            throughput search, ten times a window (⌊window/10⌋) for the cost model.
        settle_steps: steps after a change of θmin or of the candidate CF that are neither
            measured nor timed (also the first steps of a run).
        reopen_tolerance: relative drift of the settled CF's gain that reopens the search
            (``None``: never on gain drift; throughput search).
        reopen_confirmations: consecutive window ends that must see that drift.
        reopen_lr_ratio: a learning-rate change by this factor (either way) since the search
            settled reopens it (``None``: never on the learning rate; throughput search).
        search: "cost_model" (every ladder CF ranked by gain / predicted step time each
            window) or "throughput" (the paper's: a window per candidate, measured compression
            throughputs); see the module docstring.
        gain_sample: elements a step's gains are estimated from, shared among the tensors in
            proportion to their sizes (sparsifiers: a strided sample; PowerSGD: lines of the
            matrix); None measures them exactly, by multi-level compression (the paper's
            definition, a second compression of every gradient).
    """

    name = "gravac"

    def __init__(self, theta_min: float = 10.0, theta_max: float = 1000.0, epsilon: float = 0.7,
                 omega: float = 0.05, window: int = 500, theta_s: float = 2.0,
                 policy: str | Callable[[float], float] = "exponential",
                 ewma: float | None = None, batch_size: int = 1, gain: str = "fresh",
                 omega_throughput: float = 0.05, gain_interval: int | None = None,
                 settle_steps: int = 3, reopen_tolerance: float | None = 0.1,
                 reopen_confirmations: int = 2, reopen_lr_ratio: float | None = 2.0,
                 search: str = "cost_model",
                 gain_sample: int | None = DEFAULT_GAIN_SAMPLE) -> None:
        super().__init__()
        if check_number("theta_max", theta_max, 1) < check_number("theta_min", theta_min, 1):
            raise ValueError(f"theta_max ({theta_max!r}) must be >= theta_min ({theta_min!r})")
        theta_min, self.theta_max = float(theta_min), float(theta_max)
        self.epsilon = check_number("epsilon", epsilon, 0, 1, low_open=True)
        omega = check_number("omega", omega, 0, 1)
        omega_throughput = check_number("omega_throughput", omega_throughput, 0, 1)
        self.window = check_number("window", window, 1, integer=True)
        theta_s = check_number("theta_s", theta_s, 1, low_open=True)
        self.policy_name = _check_policy(policy)
        if self.policy_name is None:
            self._policy = policy
        ewma = check_number("ewma", ewma, 0, 1, low_open=True, optional=True)
        self.batch_size = check_number("batch_size", batch_size, 1, integer=True)
        if gain not in GAINS:
            raise ValueError(f"gain must be one of {', '.join(GAINS)}, got {gain!r}")
        self.gain = gain
        self.settle_steps = check_number("settle_steps", settle_steps, 0, self.window - 1,
                                         integer=True)
        reopen_tolerance = check_number("reopen_tolerance", reopen_tolerance, 0,
                                        low_open=True, optional=True)
        reopen_confirmations = check_number("reopen_confirmations", reopen_confirmations,
                                            1, integer=True)
        reopen_lr_ratio = check_number("reopen_lr_ratio", reopen_lr_ratio, 1,
                                       low_open=True, optional=True)
        if search not in SEARCHES:
            raise ValueError(f"search must be one of {', '.join(SEARCHES)}, got {search!r}")
        if search == "cost_model" and gain == "authors":
            raise ValueError("search='cost_model' smooths each CF's gain by EWMA; the authors' "
                             "gain averages its terms instead: use gain='fresh' or 'error_fed', "
                             "or search='throughput'")
        if gain_interval is None:  # the cost model ranks on a few measurements a window
            gain_interval = max(1, self.window // 10) if search == "cost_model" else 1
        self.gain_interval = check_number("gain_interval", gain_interval, 1, integer=True)
        self.gain_sample = check_number("gain_sample", gain_sample, 1, integer=True,
                                        optional=True)
        self.tracker = GainTracker(gain, ewma, self.window, self.gain_interval)
        self.search: Search = CostModelSearch(
            theta_min, theta_max, omega_throughput, self.epsilon) \
            if search == "cost_model" else ThroughputSearch(
                theta_min, theta_max, theta_s, omega, omega_throughput, reopen_tolerance,
                reopen_confirmations, reopen_lr_ratio)
        self.warmup = True
        self.steps_in_window = 0
        self.settling = self.settle_steps  # the first steps of a run are not timed either
        self.send = SEND_MIN

    # -- what the search holds ------------------------------------------------------------
    theta_min = property(lambda self: self.search.theta_min, doc="the floor CF θmin")
    candidate_cf = property(lambda self: self.search.candidate_cf,
                            doc="the CF of the compressed level: explored, chosen, or "
                                "measured during the warm-up")
    searching = property(lambda self: self.search.searching)
    reopened = property(lambda self: self.search.reopened)
    ladder = property(lambda self: self.search.ladder,
                      doc="the CFs the cost model measures (empty for the throughput search)")
    delta_min = property(lambda self: self.search.delta(self.tracker)[0],
                         doc="the smoothed gain of θmin (None: not measured yet)")
    delta_c = property(lambda self: self.search.delta(self.tracker)[1],
                       doc="the smoothed gain of the compressed level")

    @property
    def gain_measure(self) -> GainMeasure:
        """What the engine measures for this agent's gain definition."""
        return GAINS[self.gain]

    @property
    def probe(self) -> ProbeSpec:
        """The gains the engine measures: the decision's two levels, or every ladder CF."""
        return ProbeSpec(GAINS[self.gain], self.ladder, self.gain_sample)

    def policy(self, theta_s: float) -> float:
        if self.policy_name is None:
            # the next CF to try: above the last one, or the search would stall
            return check_number(f"policy({theta_s:g})", self._policy(theta_s), theta_s,
                                low_open=True)
        return SCALING_POLICIES[self.policy_name](theta_s)

    def alpha(self, world_size: int) -> float:
        return self.tracker.alpha(world_size)

    def mean_throughput(self) -> dict[float, float]:
        return self.search.mean_throughput()

    def sent_cf(self, send: str) -> float:
        """The CF of what a step with branch ``send`` put on the wire."""
        return {SEND_COMPRESSED: self.candidate_cf, SEND_MIN: self.theta_min,
                SEND_DENSE: 1.0}[send]

    def decision(self, next_step: int = 0) -> Decision:
        return Decision(cf=self.candidate_cf, theta_min=self.theta_min, send=self.send,
                        # settle steps are neither measured nor timed
                        measure_gain=self.settling == 0 and next_step % self.gain_interval == 0)

    def initial_decision(self) -> Decision:
        return self.decision()

    # -- the algorithm ---------------------------------------------------------------------
    def decide(self, stats: StepStats) -> Decision:
        search = self.search
        before = (search.candidate_cf, search.theta_min)
        if self.settling > 0:
            self.settling -= 1
        else:
            if stats.gain_measured:
                search.measured(stats, self.tracker)
            self._record_throughput(stats)
            search.timed(self.sent_cf(stats.sent), stats)
        self.steps_in_window += 1
        if self.steps_in_window >= self.window:
            self.steps_in_window = 0
            self._check(stats.lr)
        self._choose_send()
        if (search.candidate_cf, search.theta_min) != before:
            self.settling = self.settle_steps
        decision = self.decision(stats.step + 1)
        self.record(stats, decision, delta_min=self.delta_min, delta_c=self.delta_c,
                    sent=stats.sent, throughput=self.mean_throughput(),
                    searching=self.searching, wait_s=stats.wait_time,
                    link_bytes=stats.link_bytes, **search.row())
        return decision

    def _record_throughput(self, stats: StepStats) -> None:
        """T_sys·δ of what was sent at this step, into the running mean of its CF."""
        gain = {SEND_COMPRESSED: self.delta_c, SEND_MIN: self.delta_min,
                SEND_DENSE: 1.0}[stats.sent]
        if gain is None or not stats.iter_time > 0:
            return
        t_sys = stats.world_size * self.batch_size / stats.iter_time
        self.search.record(self.sent_cf(stats.sent), t_sys * gain)

    def _choose_send(self) -> None:
        """The three branches of Algorithm 1 (only the θmin level during the warm-up)."""
        delta_min, delta_c = self.delta_min, self.delta_c
        if delta_min is None or (delta_c is None and not self.warmup):
            return  # a level not measured yet (new CF, settling): keep the current branch
        if self.warmup:
            self.send = SEND_MIN if delta_min >= self.epsilon else SEND_DENSE
        elif delta_c >= self.epsilon:
            self.send = SEND_COMPRESSED
        elif delta_min >= self.epsilon:
            self.send = SEND_MIN
        else:
            self.send = SEND_DENSE

    def _check(self, lr: float | None) -> None:
        """CheckGraVAC, every ``window`` steps (the first ends the warm-up at θmin, which
        the throughput search spent measuring its first candidate)."""
        if self.warmup:
            self.warmup = False
            if not self.ladder:
                return
        self.search.window_end(self, lr)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("_policy", None)
        return state
