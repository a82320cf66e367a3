"""CodecChoice: which codec to send — dense, fp16, PowerSGD, TopK, … —, by the compression gain and a step model fitted online.

GraVAC adapts one compressor's CF above a floor θmin; it cannot send dense where compression
does not pay, nor switch to another compressor. CodecChoice chooses among a configured set of
candidates (:class:`~horovod_gravac.compression.Candidates`, ``compression="auto"`` or
``"dense|fp16|powersgd:1|topk:100"``), each at its own setting, dense included, from the
first steps — no warm-up window at a fixed floor:

* **Quality.** On the steps its decision marks (every ``gain_interval``-th) the engine
  measures every candidate's gain δ_k = ‖C_k(g)‖² / ‖g‖² on the fresh gradient (GraVAC's
  ``"fresh"`` gain, estimated from ``gain_sample`` elements), summed over layers and ranks,
  smoothed per candidate by :class:`~.gravac.GainTracker`. The candidate sent is measured
  as it compresses; the others as they would once sent for a while
  (:meth:`~horovod_gravac.compression.Compressor.settled_energy_profile`: a PowerSGD not
  sent yet at the best rank-r energy its warm-started Q settles at, not from its seeded Q). A candidate is *admissible* when
  δ_k ≥ ε (dense and fp16 always are). With the Adam family, wrap it in
  :class:`~.phases.AdamPhases`: dense until Adam's variance is frozen, the choice after.
* **Time.** A candidate sent before is priced by its own steps: t_k = compute_k + wait_k,
  the medians of its timed steps (what a link model cannot see is in them: an fp16 sum that
  Gloo reduces slowly on a CPU, a layer plan's smaller traffic). One never sent, by the step
  model of :mod:`.costmodel`: t_k = c + a·r_k + λ·s_k + β·B_k, its traffic (rounds r, ring
  message steps s, link bytes B) priced by the engine from the tensor shapes, the link
  (a, λ, β) fitted by non-negative least squares to the median waits of the candidates sent
  so far (one candidate sent: all waiting is charged to bytes), c the least compute measured
  so far (an optimistic guess: if it then looks best it is sent on trial and measured, and a
  wrong guess costs a trial).
* **The choice.** The admissible candidate with the best predicted progress per second
  δ_k / t_k is sent from the next step on — unless the candidate sent scores within
  ``omega`` of it (hysteresis) —, chosen again every ``interval`` steps, and sooner after a
  candidate sent for the first time: once ``trial_steps`` of its steps are timed (a trial
  costs a few steps, not an interval). The first ``settle_steps`` steps after a switch (and
  of the run) are not timed. A trial whose first timed step already scores the candidate
  ``trial_cutoff`` times below the best admissible one ends there.

The run starts with the set's first candidate (``"auto"``: dense, whose first steps charge
all their waiting to bytes: an optimistic price for the compressed candidates, which trials
then correct). Every rank switches at
the same step (the decision is broadcast); the residual carries across a switch (see
:mod:`horovod_gravac.compression.candidates`).
"""
from __future__ import annotations

from typing import Any

from ..validation import check_number
from .base import SEND_COMPRESSED, SEND_DENSE, Agent, Decision, ProbeSpec, StepStats
from .costmodel import CodecCosts, Link, Traffic
from .gravac import DEFAULT_GAIN_SAMPLE, GAINS, GainTracker, compression_throughputs


class CodecChoice(Agent):
    """Rank 0's choice of the codec among a set of candidates (see the module docstring).

    Arguments:
        epsilon: gain threshold ε in (0, 1]: a candidate is sent only while its gain is ≥ ε.
        interval: steps between choices once no candidate is on trial.
        omega: the candidate sent stays unless another's predicted δ/t is more than this
            much (relative) higher.
        gain_interval: measure every candidate's gain every this many steps.
        settle_steps: steps after a switch (and at the start) that are not timed.
        trial_steps: timed steps of a candidate sent for the first time before the next
            choice.
        trial_cutoff: a trial ends after its first timed step where that step already
            scores the (admissible) candidate this many times below the best admissible one
            (noise does not double a step: on a slow link, the run's dense start costs one
            timed step, not ``trial_steps``).
        gain_sample: elements a step's gains are estimated from, shared among the tensors in
            proportion to their sizes (None: exact).
        ewma: smoothing factor α of the gains; None → as GraVAC's (five time constants in an
            interval).
        start: the candidate sent first (its index in the set).
    """

    name = "choice"
    sets_cf = False
    chooses_codec = True

    def __init__(self, epsilon: float = 0.7, interval: int = 20, omega: float = 0.05,
                 gain_interval: int = 5, settle_steps: int = 1, trial_steps: int = 3,
                 trial_cutoff: float = 2.0, gain_sample: int | None = DEFAULT_GAIN_SAMPLE,
                 ewma: float | None = None, start: int = 0) -> None:
        super().__init__()
        self.epsilon = check_number("epsilon", epsilon, 0, 1, low_open=True)
        self.interval = check_number("interval", interval, 1, integer=True)
        self.omega = check_number("omega", omega, 0, 1)
        self.gain_interval = check_number("gain_interval", gain_interval, 1, integer=True)
        self.settle_steps = check_number("settle_steps", settle_steps, 0, self.interval - 1,
                                         integer=True)
        self.trial_steps = check_number("trial_steps", trial_steps, 1, integer=True)
        self.trial_cutoff = check_number("trial_cutoff", trial_cutoff, 1, low_open=True)
        self.gain_sample = check_number("gain_sample", gain_sample, 1, integer=True,
                                        optional=True)
        ewma = check_number("ewma", ewma, 0, 1, low_open=True, optional=True)
        self.codec = check_number("start", start, 0, integer=True)
        self.tracker = GainTracker("fresh", ewma, self.interval, self.gain_interval)
        self.costs = CodecCosts()
        #: per candidate, its priced (link bytes, decoded bytes, rounds, link steps)
        self.traffic: dict[int, tuple[float, ...]] = {}
        self.names: tuple[str, ...] = ()
        self.dense: tuple[bool, ...] = ()
        self.steps_in_interval = 0
        self.settling = self.settle_steps
        #: the codec sent is on trial (never timed before it was chosen), and its timed steps
        self.trial = True
        self.timed = 0

    @property
    def probe(self) -> ProbeSpec:
        """Every candidate's fresh gain at its own setting."""
        return ProbeSpec(GAINS["fresh"], sample=self.gain_sample, per_codec=True)

    def decision(self, next_step: int = 0) -> Decision:
        dense = bool(self.dense) and self.dense[self.codec]
        return Decision(cf=None, codec=self.codec, send=SEND_DENSE if dense else SEND_COMPRESSED,
                        measure_gain=next_step % self.gain_interval == 0)

    def initial_decision(self) -> Decision:
        return self.decision()

    def decide(self, stats: StepStats) -> Decision:
        if stats.codec_traffic:
            self.traffic = {k: (t.link_bytes, t.decoded_bytes, t.rounds, t.link_steps)
                            for k, t in stats.codec_traffic.items()}
        if stats.gain_measured:  # the fresh gradient's: a switch does not disturb it
            for codec, numerator in stats.gain_codecs.items():
                self.tracker.add(codec, numerator, stats.gain_reference, stats.world_size)
        if self.settling > 0:
            self.settling -= 1
        elif stats.codec is not None and stats.iter_time > 0:
            self.costs.add(stats.codec, stats.iter_time, stats.wait_time, stats.rounds,
                           stats.link_steps, stats.link_bytes)
            self.timed += 1
        self.steps_in_interval += 1
        link = self.costs.link()  # once a step: the choice and the metrics row share it
        predicted = self.predicted_times(link)
        if self.timed >= self.trial_steps and (self.trial or
                                               self.steps_in_interval >= self.interval) \
                or self._trial_is_clearly_worse(predicted):
            self._choose(predicted)
        decision = self.decision(stats.step + 1)
        self.record(stats, decision, codec=self.codec,
                    codec_name=self.names[self.codec] if self.names else None,
                    gain=self.tracker.get(self.codec), candidate_gains=self._gains_text(),
                    wait_s=stats.wait_time,
                    link_bytes=stats.link_bytes, predicted_step_s=predicted.get(self.codec),
                    **self._link_row(link))
        return decision

    def use_candidates(self, names: tuple[str, ...], dense: tuple[bool, ...]) -> None:
        """The set this agent chooses among (its specs, in order, and which send dense)."""
        if self.codec >= len(names):
            raise ValueError(f"start={self.codec} names no candidate: the set has "
                             f"{len(names)} ({', '.join(names)})")
        self.names, self.dense = tuple(names), tuple(dense)

    def predicted_times(self, link: Link | None) -> dict[int, float]:
        """Per candidate, its step time: the median of its own timed steps, or for one never
        sent what the ``link`` fitted to the steps so far predicts (empty before a step)."""
        measured = [c for c in map(self.costs.compute, self.traffic) if c is not None]
        if link is None or not measured:
            return {}
        guess = min(measured)
        times = {}
        for codec, priced in self.traffic.items():
            compute = self.costs.compute(codec)
            times[codec] = guess + link.wait_for(Traffic(*priced)) if compute is None \
                else compute + self.costs.wait(codec)
        return times

    def scores(self, predicted: dict[int, float]) -> dict[int, float]:
        """Per admissible candidate (gain ≥ ε), δ / its ``predicted`` step time."""
        return compression_throughputs({k: self.tracker.get(k) for k in self.traffic},
                                       predicted, self.epsilon)

    def _trial_is_clearly_worse(self, predicted: dict[int, float]) -> bool:
        """The (admissible) candidate on trial scores ``trial_cutoff`` times below the best
        admissible one after a timed step."""
        if not (self.trial and self.timed >= 1):
            return False
        scores = self.scores(predicted)
        return self.codec in scores and max(scores.values()) > \
            self.trial_cutoff * scores[self.codec]

    def _choose(self, predicted: dict[int, float]) -> None:
        """The best admissible δ/t, unless the codec sent is within ω of it."""
        self.steps_in_interval = 0
        self.trial = False
        scores = self.scores(predicted)
        if not scores:
            return  # nothing admissible measured yet: keep what is sent
        best = max(scores, key=scores.get)
        current = scores.get(self.codec)
        if best != self.codec and (current is None or
                                   scores[best] > (1 + self.omega) * current):
            self.trial = self.costs.compute(best) is None
            self.codec = best
            self.settling = self.settle_steps
            self.timed = 0

    def _gains_text(self) -> str:
        """Every candidate's smoothed gain, in the set's order ("-": not measured yet)."""
        gains = (self.tracker.get(k) for k in range(len(self.names)))
        return " ".join("-" if g is None else f"{g:.3f}" for g in gains)

    def _link_row(self, link: Link | None) -> dict[str, Any]:
        return {} if link is None else {"link_bandwidth": 1 / link.per_byte
                                        if link.per_byte > 0 else float("inf"),
                                        "link_latency": link.per_round,
                                        "compute_s": self.costs.compute(self.codec)}
