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
"""
from __future__ import annotations

from dataclasses import dataclass


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

