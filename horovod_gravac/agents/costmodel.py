"""A measured model of a step's time: compute + latency + link bytes / bandwidth.

Beyond the paper: GraVAC's ``search="cost_model"`` ranks every candidate CF by its gain over
the step time this model predicts for it, so untried CFs are ranked without spending a window
on each. Per step the engine measures, on rank 0 (which decides; ranks step in lockstep):

* t — the step time, and w — the time spent blocked on collectives (``synchronize()``, the
  DDP hook's end of backward), so compute = t − w (backprop, compression, the optimizer);
* B — the bytes this rank's link carried: each collective's payload weighted by its ring
  traffic (``transport.link_bytes``: an allreduce 2(N−1)/N of it, an allgather N−1 payloads —
  so the cost of allgathers grows with the world size and one fitted link serves both kinds).

The fit, from the mean (B, w) of each CF sent so far, weighted by its number of steps (means,
not single steps: one step's time on a shared machine varies by 2×):

    w ≈ latency + B / bandwidth      (least squares; latency ≥ 0, bandwidth > 0)

With one CF measured (the first window) the latency is taken as 0 and all waiting is charged
to bytes: that overstates what more compression saves, and the next CF sent corrects it. A
step at CF c is then predicted to take ``compute + latency + B(c) / bandwidth``, compute being
the mean over all measured steps. No tensors here: plain floats that pickle.

**The step model** that :class:`~.choice.CodecChoice` fits online and ``benchmarks.whatif``
calibrates offline is the same: a step takes its compute (with the codec's own work) plus
the waiting on its exchange, priced by :class:`Link` from its :class:`Traffic` — rounds ×
a fixed cost, ring message steps × latency, link bytes / bandwidth — with the link fitted
by :func:`fit_link` (non-negative least squares) to measured waits.
"""
from __future__ import annotations

import itertools
import math
import statistics
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Traffic:
    """One step's exchange on one rank: link bytes (ring-weighted,
    ``transport.link_bytes``), the compressed bytes it decodes (an allgather's N payloads, a
    sum's or an alltoall's one), its exchange rounds and its collectives' ring message steps
    (``transport.link_steps``)."""

    link_bytes: float
    decoded_bytes: float = 0.0
    rounds: float = 0.0
    link_steps: float = 0.0


@dataclass(frozen=True)
class Link:
    """Seconds a step waits on collectives: ``per_round`` per exchange round, ``per_step``
    per ring message step, ``per_byte`` per link byte."""

    per_round: float
    per_step: float
    per_byte: float

    def wait(self, rounds: float, steps: float, nbytes: float) -> float:
        return self.per_round * rounds + self.per_step * steps + self.per_byte * nbytes

    def wait_for(self, traffic: Traffic) -> float:
        """The wait of a step with ``traffic``."""
        return self.wait(traffic.rounds, traffic.link_steps, traffic.link_bytes)

    @property
    def gbit_per_s(self) -> float:
        return 8 / self.per_byte / 1e9 if self.per_byte > 0 else math.inf


def fit_link(points: Sequence[tuple[float, float, float, float]],
             per_step: float | None = None) -> Link:
    """Non-negative least squares of wait ≈ a·r + λ·s + β·B over (r, s, B, wait) points:
    the best of every subset of the terms solved unconstrained whose solution is ≥ 0 (exact
    for so few unknowns). Where several fit equally well (one point fits any one term
    exactly), the bytes come first: waiting is charged to bytes until a second measurement
    says otherwise. ``per_step`` given: λ is that, and a and β are fitted to what remains.
    ``ValueError`` with no point."""
    if not points:
        raise ValueError("fit_link needs at least one measured run")
    x = np.array([p[:3] for p in points], dtype=float)
    y = np.array([p[3] for p in points], dtype=float)
    free = [2, 0, 1]
    if per_step is not None:
        y = y - per_step * x[:, 1]
        free = [2, 0]
    scale = np.where(x.max(axis=0) > 0, x.max(axis=0), 1.0)  # conditioning: bytes are ~1e6
    best, best_error = np.zeros(3), float(np.sum(y ** 2))
    for size in range(1, len(free) + 1):
        for cols in map(list, itertools.combinations(free, size)):
            sol, *_ = np.linalg.lstsq(x[:, cols] / scale[cols], y, rcond=None)
            if np.any(sol < 0):
                continue
            coef = np.zeros(3)
            coef[cols] = sol / scale[cols]
            error = float(np.sum((x @ coef - y) ** 2))
            if error < best_error - 1e-12 * max(1.0, float(np.sum(y ** 2))):
                best, best_error = coef, error
    if per_step is not None:
        best[1] = per_step
    return Link(*(float(c) for c in best))


class CodecCosts:
    """Per codec sent: its last ``keep`` timed steps (compute — the step time less waiting,
    the codec's own work included —, wait, rounds, ring message steps, link bytes), and
    their medians: one step's time on a shared machine varies by 2×, and a straggler must
    not decide. Plain numbers (it pickles, and ``state_dict`` copies it)."""

    def __init__(self, keep: int = 64) -> None:
        self.keep = keep
        #: codec → its last steps' [compute, wait, rounds, link steps, link bytes]
        self.sent: dict[int, list[list[float]]] = {}

    def add(self, codec: int, step_time: float, wait: float, rounds: float,
            link_steps: float, link_bytes: float) -> None:
        steps = self.sent.setdefault(codec, [])
        steps.append([max(step_time - wait, 0.0), wait, rounds, link_steps, link_bytes])
        del steps[:-self.keep]

    def _median(self, codec: int, column: int) -> float:
        return statistics.median(row[column] for row in self.sent[codec])

    def compute(self, codec: int) -> float | None:
        """Median compute of the steps that sent ``codec`` (None: never sent)."""
        return self._median(codec, 0) if self.sent.get(codec) else None

    def wait(self, codec: int) -> float | None:
        """Median wait of the steps that sent ``codec`` (None: never sent)."""
        return self._median(codec, 1) if self.sent.get(codec) else None

    def link(self) -> Link | None:
        """The link fitted to every codec's median (rounds, steps, bytes, wait); None before
        a step."""
        points = [tuple(self._median(k, c) for c in (2, 3, 4, 1))
                  for k, rows in self.sent.items() if rows]
        return fit_link(points) if points else None


@dataclass(frozen=True)
class LinkFit:
    """The fitted link: ``latency`` seconds per step plus ``seconds_per_byte`` per link byte."""

    latency: float
    seconds_per_byte: float
    compute: float

    @property
    def bandwidth(self) -> float:
        """Link bytes per second (inf when waiting did not grow with bytes)."""
        return 1.0 / self.seconds_per_byte if self.seconds_per_byte > 0 else float("inf")

    def step_time(self, link_bytes: float) -> float:
        """Predicted seconds of a step whose link carries ``link_bytes``."""
        return self.compute + self.latency + self.seconds_per_byte * link_bytes


class LinkModel:
    """Per CF sent: step count and sums of link bytes and waiting; compute over all steps."""

    def __init__(self) -> None:
        self.levels: dict[float, list[float]] = {}  # CF sent → [steps, Σ link bytes, Σ wait]
        self.compute_sum = 0.0
        self.steps = 0

    def add(self, cf: float, link_bytes: float, wait: float, step_time: float) -> None:
        """One measured step that sent CF ``cf``."""
        level = self.levels.setdefault(float(cf), [0, 0.0, 0.0])
        level[0] += 1
        level[1] += link_bytes
        level[2] += wait
        self.compute_sum += max(step_time - wait, 0.0)
        self.steps += 1

    def fit(self) -> LinkFit | None:
        """Weighted least squares over the per-CF means; None before any step with bytes."""
        points = [(n, b / n, w / n) for n, b, w in self.levels.values() if n]
        total = sum(n for n, _, _ in points)
        if not total:
            return None
        compute = self.compute_sum / self.steps
        mean_b = sum(n * b for n, b, _ in points) / total
        mean_w = sum(n * w for n, _, w in points) / total
        var = sum(n * (b - mean_b) ** 2 for n, b, _ in points)
        if var > 0:
            slope = sum(n * (b - mean_b) * (w - mean_w) for n, b, w in points) / var
            if slope < 0:  # waiting fell as bytes grew: noise, bytes cost nothing seen
                return LinkFit(max(mean_w, 0.0), 0.0, compute)
            if mean_w - slope * mean_b >= 0:
                return LinkFit(mean_w - slope * mean_b, slope, compute)
        # one byte level, or a negative intercept: through the origin, all waiting is bytes
        square = sum(n * b * b for n, b, _ in points)
        if square <= 0:
            return LinkFit(max(mean_w, 0.0), 0.0, compute)
        return LinkFit(0.0, max(sum(n * b * w for n, b, w in points) / square, 0.0), compute)

