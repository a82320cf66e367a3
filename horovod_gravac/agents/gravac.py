"""GraVAC (Tyagi & Swany, IEEE CLOUD 2023, Algorithm 1): adapt the CF from the compression gain.

The compression gain δ of a CF says how much of the gradient survives compression. Every
step (every ``gain_interval`` steps) the optimizer measures it for the floor θmin (δmin) and,
by multi-level compression within the θmin selection, for the candidate θmin·θs (δc). The
decision for the next step:

* δc ≥ ε → send the compressed level (CF θmin·θs, capped at θmax);
* δmin ≥ ε > δc → send the θmin level;
* otherwise → send dense (the residual is reset to 0).

Each step records the *compression throughput* T_sys·δ (T_sys = N·b / t_iter, δ the smoothed
gain of the level sent) for the CF that was sent, as a running mean per CF. Every ``window``
steps (CheckGraVAC):

* if |δmin − δc| / δmin ≤ ω (``omega``), the CF just explored loses nothing against the
  floor: θmin is raised to it;
* if the two best compression throughputs are within ``omega_throughput`` of each other the
  search stops at the lower CF of the two (the paper's saturation rule: 1029.9 at 1280x vs
  1035.4 at 2000x with a 1% tolerance → 1280x);
* if the window just ended explored θmax, the search is over: it stops at the CF with the
  best compression throughput (the paper leaves this case open; staying at θmax with a gain
  below ε would send θmin for the rest of training). Dense steps are no candidates;
* otherwise θs ← policy(θs) (exponential: θs²; geometric: 2·θs).

**A search that reopens** (beyond the paper). Gains change while training (CF 1000's fresh
gain on PTB rose from 0.55 to 0.62–0.72 over 500 steps), so a CF settled early may be too low
or too high later. Once settled, the gain of the settled CF at the first window's end is the
reference; the search starts again from the initial θmin and θs (throughput means forgotten)
when at ``reopen_confirmations`` consecutive window ends (hysteresis: one noisy window does
not reopen) the gain differs from the reference by more than ``reopen_tolerance`` (relative),
or at once when the learning rate has changed by a factor of ``reopen_lr_ratio`` or more
since the search settled (a step decay; slow schedules reopen at most once per such factor).
``None`` switches either rule off.

The first window is a warm-up at θmin, so the exponential policy from θmin = 10, θs = 2
explores 10, 20, 40, 160, then θmax.

**A search by cost model** (``search="cost_model"``, beyond the paper). The paper's search
spends a window on each candidate CF and compares measured throughputs, which on a shared
machine vary by 2× from step to step. Instead, every measured step also measures the gain of
every CF of a ladder (θmin, 2θmin, 4θmin, … up to θmax; multi-level compression within the
θmin selection, as for θmin·θs) and the bytes each would put on the link, while the
exchange measures the step's compute and waiting time. A :class:`~.costmodel.LinkModel` fits
the link (latency, bandwidth) from the CFs actually sent, so the step time of every ladder CF
is predicted. At every window end (after the warm-up at θmin) the CF with the best predicted
compression throughput δ(c) / t(c) among those with δ(c) ≥ ε is sent from then on; the CF sent
stays unless the best one scores more than ``omega_throughput`` higher (hysteresis). The
ranking is redone at every window end, so the choice follows gains that drift (the reopening
rules are the throughput search's). θmin stays the floor (not raised). Measuring every ladder
CF costs compute (PTB LSTM, 4 ranks behind 100 Mbit/s, measured every step: GraVAC's TopK
steps at CF 80 took 0.92 s median, 0.83 s of it compute, against 0.49 s for a whole static
TopK 100× step), so by default the gains are measured ten times per
window (``gain_interval`` = ⌊window/10⌋), and on the other steps what is sent is one
compression of g + residual at the CF sent rather than a level within θmin's.

**Per-layer CFs** (``per_layer=True``, with the cost model). Gains differ by layer (an
embedding's gradient is sparse, an LSTM's dense), so one CF for all wastes bytes. The gain
terms and bytes are then kept per tensor; for every ladder CF c the bytes that c would cost
on every tensor are re-spent per tensor (:func:`~.costmodel.allocate`): each tensor starts
at the highest CF where its own gain is ≥ ε (c is no candidate when those starts cost more
than c's bytes), the rest goes greedily where it keeps the most energy per byte. c is ranked
by that allocation's gain over its predicted step time, and the decision carries the chosen
per-tensor CFs (``Decision.layer_cf``). Measured first without the per-tensor floor (the most
energy overall): on PTB that ended at perplexity 766 against 750.7 with one CF for all.

**Which gain** (``gain``; measured, PTB LSTM 2×200, TopK + residual memory, 500 steps):

* ``"fresh"`` (default) — δ = ‖C(g)‖² / ‖g‖² on the fresh gradient g, before error feedback.
  It tracks training quality: sending CF 100 trained like dense (validation perplexity 713 vs
  717) and its fresh gain stayed ≈ 0.85; at CF 1000 it fell to ≈ 0.5 and perplexity rose 8%.
* ``"error_fed"`` — δ = ‖C(g_o)‖² / ‖g_o‖² on g_o = g + residual, the paper's text. Once a
  higher CF is actually sent, the residual that compression creates dominates ‖g_o‖²: at
  CF 100 (trains like dense) this gain was 0.11, so GraVAC falls back to θmin and stays.
* ``"authors"`` — the GraVAC authors' public code: Σ_layers‖C(g_o)‖ / Σ_layers‖g‖ (norms,
  not squared; the raw gradient in the denominator), numerator and denominator each the mean
  of the last 25 measurements. It can exceed 1.

End to end (``benchmarks/end_to_end.py``, 4 ranks behind 100 Mbit/s links, PTB LSTM, 200
steps, everything else at defaults): with the fresh gain GraVAC settled at 80x and reached
dense's target 2.45x faster than dense (perplexity within 1%); with the error-fed gain it
stayed at θmin (1.88x, like static TopK 10x); with the authors' gain 2.94x on PTB, but on the
digits CNN it compressed past what the model tolerates (mean CF 15, accuracy 0.958 vs 0.985,
target missed on one seed of two) where the fresh gain stayed at CF 10 and reached it. So the
default is the fresh gain: the one whose choice tracked training quality on both workloads.

The fresh gain costs one more compression of g at θmin per layer on the steps it is measured
(the candidate level is selected within it); ``gain_interval`` measures every k-th step.
Measured (``benchmarks/overhead.py``, 2 ranks, LSTM 2×200 shapes, a step of static TopK 100x =
1): GraVAC 1.46x with the fresh gain, 1.45x error-fed, 1.29x fresh every 4th step — the extra
compression is a small part; the rest is the per-step statistics allreduce, the decision
broadcast and multi-level compression.

**Smoothing.** ``"fresh"`` and ``"error_fed"`` gains are smoothed by an exponentially weighted
mean with factor α, bias-corrected (m ← (1−α)m + αx, δ = m / (1 − (1−α)^n)), so the first
measurements are not over-weighted. The default α = min(1, max(N/100, 5·k/window)), k the
``gain_interval``, keeps the paper's N/100 where it is fast enough and otherwise fits five time
constants (1/α measurements, k steps apart) into a window, so δ at a window's end describes the
CF explored in that window. Whenever a level's CF
changes its mean restarts, and the first ``settle_steps`` steps after a change of θmin or of the
candidate CF are neither measured nor timed (the residual and the step time adjust to it).

The paper's behaviour is reachable with ``gain="error_fed"``, ``omega=omega_throughput=0.01``,
``ewma=N/100``, ``settle_steps=0``, ``reopen_tolerance=reopen_lr_ratio=None`` (and
``min_compress_numel=0`` in the optimizer: the paper compresses every tensor).
"""
from __future__ import annotations

from collections import deque
from typing import Any, Callable

from ..validation import check_number
from .base import (COMPENSATED, GRADIENT, SEND_COMPRESSED, SEND_DENSE, SEND_MIN, Agent, Decision,
                   GainMeasure, StepStats)
from .costmodel import LinkFit, LinkModel, allocate

SCALING_POLICIES: dict[str, Callable[[float], float]] = {
    "exponential": lambda theta_s: theta_s * theta_s,
    "geometric": lambda theta_s: theta_s * 2.0,
}

#: gain name → what the optimizer measures. "authors" averages its terms over the last
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


def cf_ladder(theta_min: float, theta_max: float) -> tuple[float, ...]:
    """θmin, 2θmin, 4θmin, … below θmax, then θmax."""
    ladder, cf = [], theta_min
    while cf < theta_max:
        ladder.append(cf)
        cf *= LADDER_STEP
    return (*ladder, theta_max)


class GraVAC(Agent):
    """Rank 0's GraVAC state machine.

    Arguments:
        theta_min: the floor CF θmin (first level of multi-level compression).
        theta_max: the largest CF ever used.
        epsilon: gain threshold ε in (0, 1]: a level is sent only while its gain is ≥ ε.
        omega: gain-gap tolerance of the θmin scale-up test (|δmin − δc| / δmin ≤ omega).
        omega_throughput: tolerance of the saturation test between the two best compression
            throughputs (relative); above the step-time noise of the machine.
        window: steps between CheckGraVAC calls (the first window is a warm-up at θmin).
        theta_s: the initial scaling step θs > 1 (candidate CF = θmin·θs).
        policy: "exponential" (θs²), "geometric" (2·θs) or a callable θs → new θs.
        ewma: smoothing factor α of the gains; None → min(1, max(N/100, 5·gain_interval/window)).
        batch_size: samples per rank and step (T_sys = N·b / t_iter).
        gain: "fresh", "error_fed" or "authors" (see the module docstring).
        gain_interval: measure the gain every this many steps; None: every step for the
            throughput search, ten times per window (every ⌊window/10⌋-th step) for the cost
            model, whose ranking needs a few measurements per window rather than every step.
        settle_steps: steps after a change of θmin or of the candidate CF that are neither
            measured nor timed (also the first steps of a run).
        reopen_tolerance: relative drift of the settled CF's gain that reopens the search
            (``None``: never on gain drift).
        reopen_confirmations: consecutive window ends that must see that drift.
        reopen_lr_ratio: a learning-rate change by this factor (either way) since the search
            settled reopens it (``None``: never on the learning rate).
        search: "throughput" (the paper's: a window per candidate, measured compression
            throughputs) or "cost_model" (every ladder CF ranked by gain / predicted step
            time each window; see the module docstring).
        per_layer: with the cost model, a CF per tensor within the chosen CF's bytes.
    """

    name = "gravac"
    needs_gain_stats = True

    def __init__(self, theta_min: float = 10.0, theta_max: float = 1000.0, epsilon: float = 0.7,
                 omega: float = 0.05, window: int = 500, theta_s: float = 2.0,
                 policy: str | Callable[[float], float] = "exponential",
                 ewma: float | None = None, batch_size: int = 1, gain: str = "fresh",
                 omega_throughput: float = 0.05, gain_interval: int | None = None,
                 settle_steps: int = 3, reopen_tolerance: float | None = 0.1,
                 reopen_confirmations: int = 2, reopen_lr_ratio: float | None = 2.0,
                 search: str = "throughput", per_layer: bool = False) -> None:
        super().__init__()
        self.theta_min = check_number("theta_min", theta_min, 1)
        self.theta_max = check_number("theta_max", theta_max, 1)
        if self.theta_max < self.theta_min:
            raise ValueError(f"theta_max ({theta_max!r}) must be >= theta_min ({theta_min!r})")
        self.epsilon = check_number("epsilon", epsilon, 0, 1, low_open=True)
        self.omega = check_number("omega", omega, 0, 1)
        self.omega_throughput = check_number("omega_throughput", omega_throughput, 0, 1)
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
        if gain not in GAINS:
            raise ValueError(f"gain must be one of {', '.join(GAINS)}, got {gain!r}")
        self.gain = gain
        self.settle_steps = check_number("settle_steps", settle_steps, 0, self.window - 1,
                                         integer=True)
        self.reopen_tolerance = check_number("reopen_tolerance", reopen_tolerance, 0,
                                             low_open=True, optional=True)
        self.reopen_confirmations = check_number("reopen_confirmations", reopen_confirmations,
                                                 1, integer=True)
        self.reopen_lr_ratio = check_number("reopen_lr_ratio", reopen_lr_ratio, 1,
                                            low_open=True, optional=True)
        if search not in SEARCHES:
            raise ValueError(f"search must be one of {', '.join(SEARCHES)}, got {search!r}")
        if search == "cost_model" and gain == "authors":
            raise ValueError("search='cost_model' smooths each CF's gain by EWMA; the authors' "
                             "gain averages its terms instead: use gain='fresh' or 'error_fed'")
        self.search = search
        if gain_interval is None:
            gain_interval = max(1, self.window // 10) if search == "cost_model" else 1
        self.gain_interval = check_number("gain_interval", gain_interval, 1, integer=True)
        if per_layer and search != "cost_model":
            raise ValueError("per_layer=True needs search='cost_model' (per-tensor gains and "
                             f"bytes per ladder CF), got search={search!r}")
        self.per_layer = bool(per_layer)
        #: per tensor: EWMA of (reference, *ladder gain terms), latest link bytes per ladder CF
        self._layer_means: dict[str, list[float]] = {}
        self.layer_link_bytes: dict[str, tuple[float, ...]] = {}
        self.layer_cf: dict[str, float] | None = None
        #: CFs whose gain and bytes the exchange measures besides θmin and θmin·θs
        self.ladder = cf_ladder(self.theta_min, self.theta_max) if search == "cost_model" else ()
        self.link = LinkModel()
        self.ladder_gains: dict[float, float] = {}  # CF → smoothed gain (cost model)
        self.ladder_link_bytes: dict[float, float] = {}  # CF → link bytes of a step at it
        self._ladder_means: dict[float, list[float]] = {}
        self._initial = (self.theta_min, self.theta_s)
        self.warmup = True
        self.searching = True
        #: once settled: (the settled CF's gain at the first window end, the learning rate)
        self.reference_gain: float | None = None
        self.reference_lr: float | None = None
        self.drifted_checks = 0
        self.reopened = 0  # how many times the search reopened
        self.delta_min: float | None = None
        self.delta_c: float | None = None
        #: per level: bias-corrected EWMA [m, 1 − (1−α)^n] or the authors' recent terms
        self._means: dict[str, list[float]] = {}
        self._recent: dict[str, deque] = {}
        self.throughput: dict[float, list[float]] = {}  # CF → [sum, count]
        self.steps_in_window = 0
        self.settling = self.settle_steps  # the first steps of a run are not timed either
        self.send = SEND_MIN
        self._restart(*LEVELS)

    # -- helpers -------------------------------------------------------------------------
    @property
    def gain_measure(self) -> GainMeasure:
        """What the optimizer measures for this agent's gain definition."""
        return GAINS[self.gain]

    @property
    def per_layer_terms(self) -> bool:
        """Per-tensor gain terms and ladder bytes: needed for per-layer CFs."""
        return self.per_layer

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

    def decision(self, next_step: int = 0) -> Decision:
        return Decision(cf=self.candidate_cf, theta_min=self.theta_min, send=self.send,
                        layer_cf=self.layer_cf, measure_gain=next_step % self.gain_interval == 0)

    def initial_decision(self) -> Decision:
        return self.decision()

    def alpha(self, world_size: int) -> float:
        if self.ewma is not None:
            return self.ewma
        return min(1.0, max(world_size / 100, 5 * self.gain_interval / self.window))

    # -- gains -----------------------------------------------------------------------------
    def _restart(self, *levels: str) -> None:
        """Forget a level's gain: its CF changed."""
        for level in levels:
            self._means[level] = [0.0, 0.0]
            self._recent[level] = deque(maxlen=AUTHORS_WINDOW)
            setattr(self, f"delta_{level}", None)

    def _smoothed(self, mean: list[float], numerator: float, reference: float,
                  world_size: int) -> float:
        """One more measurement into a bias-corrected EWMA; the smoothed gain."""
        # all-zero gradient: nothing is lost by compressing it
        x = min(1.0, numerator / reference) if reference > 0 else 1.0
        a = self.alpha(world_size)
        mean[0] = (1 - a) * mean[0] + a * x
        mean[1] = (1 - a) * mean[1] + a  # = 1 − (1−α)^n: the bias correction
        return mean[0] / mean[1]

    def _update_gains(self, stats: StepStats) -> None:
        if self.ladder:
            self._update_ladder(stats)
            return
        for level, numerator in zip(LEVELS, (stats.gain_min, stats.gain_compressed)):
            if self.gain == "authors":
                recent = self._recent[level]
                recent.append((numerator, stats.gain_reference))
                num, den = (sum(t) for t in zip(*recent))
                value = num / den if den > 0 else 1.0
            else:
                value = self._smoothed(self._means[level], numerator, stats.gain_reference,
                                       stats.world_size)
            setattr(self, f"delta_{level}", value)

    def _update_ladder(self, stats: StepStats) -> None:
        """Cost model: every ladder CF's gain and link bytes; δmin, δc read from them."""
        for cf, numerator in stats.gain_ladder.items():
            mean = self._ladder_means.setdefault(cf, [0.0, 0.0])
            self.ladder_gains[cf] = self._smoothed(mean, numerator, stats.gain_reference,
                                                   stats.world_size)
        self.ladder_link_bytes.update(stats.ladder_link_bytes)
        a = self.alpha(stats.world_size)
        for name, terms in stats.layer_ladder.items():
            mean = self._layer_means.setdefault(name, list(terms))
            mean[:] = [(1 - a) * m + a * x for m, x in zip(mean, terms)]
        self.layer_link_bytes.update(stats.layer_link_bytes)
        self.delta_min = self.ladder_gains.get(self.theta_min)
        self.delta_c = self._candidate_gain()

    def _candidate_gain(self) -> float | None:
        """Cost model: the gain of the compressed level — its per-tensor CFs' or its CF's."""
        return self._allocated_gain(self.layer_cf) if self.layer_cf else \
            self.ladder_gains.get(self.candidate_cf)

    def _allocated_gain(self, layer_cf: dict[str, float]) -> float | None:
        """Σ energy kept at the per-tensor CFs over Σ reference (per-tensor means)."""
        reference = sum(m[0] for m in self._layer_means.values())
        if reference <= 0:
            return None
        kept = sum(m[1 + self.ladder.index(layer_cf[name])]
                   for name, m in self._layer_means.items() if name in layer_cf)
        return min(1.0, kept / reference)

    def _allocation(self, cf: float) -> dict[str, float] | None:
        """Per-tensor CFs within the bytes of ``cf`` everywhere: each tensor starts at the
        highest ladder CF where its own gain is ≥ ε, then the rest of the bytes go where
        they keep the most energy. None when those starts alone cost more than ``cf``."""
        names = [n for n in self._layer_means if n in self.layer_link_bytes]
        if not names:
            return None
        k = self.ladder.index(cf)
        energy = {n: self._layer_means[n][1:] for n in names}
        sizes = {n: self.layer_link_bytes[n] for n in names}
        start = {n: max((i for i, e in enumerate(energy[n])
                         if e >= self.epsilon * self._layer_means[n][0]), default=0)
                 for n in names}
        choice = allocate(energy, sizes, sum(sizes[n][k] for n in names), start)
        if choice is None:
            return None
        if all(k <= start[n] for n in names) and \
                sum(energy[n][i] for n, i in choice.items()) < sum(energy[n][k] for n in names):
            choice = dict.fromkeys(names, k)  # greedy fell short of the uniform CF
        return {n: self.ladder[i] for n, i in choice.items()}

    # -- the algorithm ---------------------------------------------------------------------
    def decide(self, stats: StepStats) -> Decision:
        before = (self.candidate_cf, self.theta_min, self.layer_cf)
        if self.settling > 0:
            self.settling -= 1
        else:
            if stats.gain_measured:
                self._update_gains(stats)
            self._record_throughput(stats)
            if self.ladder and stats.iter_time > 0:
                self.link.add(self.sent_cf(stats.sent), stats.link_bytes, stats.wait_time,
                              stats.iter_time)

        self.steps_in_window += 1
        if self.steps_in_window >= self.window:
            self.steps_in_window = 0
            self._check(stats.lr)

        self._choose_send()
        if (self.candidate_cf, self.theta_min, self.layer_cf) != before:
            self.settling = self.settle_steps
        decision = self.decision(stats.step + 1)
        fit = self.link.fit() if self.ladder else None
        self.record(stats, decision, delta_min=self.delta_min, delta_c=self.delta_c,
                    sent=stats.sent, throughput=self.mean_throughput(),
                    searching=self.searching, reopened=self.reopened,
                    wait_s=stats.wait_time, link_bytes=stats.link_bytes,
                    **({"layer_cf": self.layer_cf} if self.per_layer else {}),
                    **({} if fit is None else {
                        "link_bandwidth": fit.bandwidth, "link_latency": fit.latency,
                        "compute_s": fit.compute,
                        "predicted_step_s": self._predicted_time(fit, self.candidate_cf)}))
        return decision

    def sent_cf(self, send: str) -> float:
        """The CF of what a step with branch ``send`` put on the wire."""
        return {SEND_COMPRESSED: self.candidate_cf, SEND_MIN: self.theta_min,
                SEND_DENSE: 1.0}[send]

    def _predicted_time(self, fit: LinkFit, cf: float) -> float | None:
        link_bytes = self.ladder_link_bytes.get(cf)
        return None if link_bytes is None else fit.step_time(link_bytes)

    def predicted_throughputs(self) -> dict[float, tuple[float, dict[str, float] | None]]:
        """Cost model: per ladder CF c with δ(c) ≥ ε, (δ(c) / predicted t(c), its per-tensor
        CFs or None); with ``per_layer`` δ(c) is the gain of c's bytes allocated per tensor."""
        fit = self.link.fit()
        if fit is None:
            return {}
        scores = {}
        for cf, gain in self.ladder_gains.items():
            layer_cf = self._allocation(cf) if self.per_layer else None
            if self.per_layer and not layer_cf:
                continue  # no per-tensor CFs within c's bytes keep every tensor's gain ≥ ε
            if layer_cf:
                gain = self._allocated_gain(layer_cf) or gain
            t = self._predicted_time(fit, cf)
            if gain >= self.epsilon and t is not None and t > 0:
                scores[cf] = (gain / t, layer_cf)
        return scores

    def _record_throughput(self, stats: StepStats) -> None:
        """T_sys·δ of what was sent at this step, into the running mean of its CF."""
        sent_cf = self.sent_cf(stats.sent)
        gain = {SEND_COMPRESSED: self.delta_c, SEND_MIN: self.delta_min,
                SEND_DENSE: 1.0}[stats.sent]
        if gain is None or not stats.iter_time > 0:
            return
        t_sys = stats.world_size * self.batch_size / stats.iter_time
        acc = self.throughput.setdefault(sent_cf, [0.0, 0])
        acc[0] += t_sys * gain
        acc[1] += 1

    def _choose_send(self) -> None:
        """The three branches of Algorithm 1 (only the θmin level during the warm-up)."""
        if self.delta_min is None or (self.delta_c is None and not self.warmup):
            return  # a level not measured yet (new CF, settling): keep the current branch
        if self.warmup:
            self.send = SEND_MIN if self.delta_min >= self.epsilon else SEND_DENSE
        elif self.delta_c >= self.epsilon:
            self.send = SEND_COMPRESSED
        elif self.delta_min >= self.epsilon:
            self.send = SEND_MIN
        else:
            self.send = SEND_DENSE

    def _check(self, lr: float | None) -> None:
        """CheckGraVAC, every ``window`` steps."""
        if self.warmup:  # θs takes effect: explore θmin·θs, measured since the start
            self.warmup = False
            if not self.ladder:
                return
        if self.ladder:
            self._choose_by_cost()
            return
        if not self.searching:
            self._watch(lr)
            return
        explored, theta_min = self.candidate_cf, self.theta_min
        if self.delta_min and self.delta_c is not None and \
                abs(self.delta_min - self.delta_c) / self.delta_min <= self.omega:
            self.theta_min = explored
        ranked = sorted(((cf, t) for cf, t in self.mean_throughput().items() if cf > 1),
                        key=lambda kv: kv[1], reverse=True)
        if len(ranked) >= 2 and ranked[1][1] > 0 and \
                abs(ranked[0][1] - ranked[1][1]) / ranked[1][1] <= self.omega_throughput:
            self._settle_at(min(ranked[0][0], ranked[1][0]))
        elif explored >= self.theta_max and ranked:
            self._settle_at(ranked[0][0])
        elif self.theta_min * self.theta_s < self.theta_max:
            self.theta_s = self.policy(self.theta_s)
        self._restart("c")
        if self.theta_min != theta_min:
            self._restart("min")

    def _choose_by_cost(self) -> None:
        """Send the ladder CF with the best predicted compression throughput from now on."""
        scores = self.predicted_throughputs()
        sent = self.sent_cf(self.send)
        best = max(scores, key=lambda cf: scores[cf][0]) if scores else None
        if best is None:  # no CF above ε (or nothing measured): the θmin level, or dense
            self.theta_s, self.layer_cf = 1.0, None
        elif sent in scores and scores[sent][0] >= (1 - self.omega_throughput) * scores[best][0]:
            self.searching = False  # hysteresis: the CF sent is within tolerance of the best
            self.theta_s = sent / self.theta_min
            if self.layer_cf is None:
                self.layer_cf = scores[sent][1]
        else:
            self.searching = True
            self.theta_s = best / self.theta_min
            self.layer_cf = scores[best][1]
        self.delta_c = self._candidate_gain()

    def _watch(self, lr: float | None) -> None:
        """Settled: reopen the search when the gain drifts or the learning rate steps."""
        if self.reference_lr is None:
            self.reference_lr = lr
        if self.reopen_lr_ratio is not None and lr and self.reference_lr:
            ratio = lr / self.reference_lr
            if max(ratio, 1 / ratio) >= self.reopen_lr_ratio:
                self._reopen()
                return
        if self.delta_c is None or self.reopen_tolerance is None:
            return
        if self.reference_gain is None:
            self.reference_gain = self.delta_c
            return
        drift = abs(self.delta_c - self.reference_gain) / max(self.reference_gain, 1e-12)
        self.drifted_checks = self.drifted_checks + 1 if drift > self.reopen_tolerance else 0
        if self.drifted_checks >= self.reopen_confirmations:
            self._reopen()

    def _reopen(self) -> None:
        """Search again from the initial θmin and θs; old throughputs no longer apply."""
        self.searching = True
        self.reopened += 1
        self.theta_min, self.theta_s = self._initial
        self.throughput.clear()
        self.reference_gain = self.reference_lr = None
        self.drifted_checks = 0
        self._restart(*LEVELS)

    def _settle_at(self, ideal: float) -> None:
        """Stop searching: the compressed level is θ_ideal from now on."""
        self.searching = False
        if ideal <= self.theta_min:
            self.theta_min, self.theta_s = ideal, 1.0
        else:
            self.theta_s = ideal / self.theta_min

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.pop("_policy", None)
        return state
