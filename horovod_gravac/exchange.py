"""One rank's side of a compressed gradient exchange, whatever carries it.

:class:`GradientExchange` holds what the Horovod optimizer and the DDP communication hook
share: error feedback and compression of each tensor at the agent's current decision
(GraVAC's multi-level compression and gain terms included), byte accounting, and the end of
a step — the finite verdict, residual resets, and the agent's decision, taken on rank 0 and
broadcast. The collectives are a *communicator*'s (Horovod's in ``communication``,
torch.distributed's in ``communication_torch``); this module calls none itself.
"""
from __future__ import annotations

import contextlib
import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

import torch
from torch import Tensor

from . import agents as A
from . import compression as C
from .packing import link_bytes

NONFINITE_ACTIONS = ("skip", "raise")
#: skipped steps and changes of the CF sent; the application decides where it goes
log = logging.getLogger(__name__)


class NonFiniteGradientError(FloatingPointError):
    """Raised on every rank when ``on_nonfinite="raise"`` and a step's gradient is not finite."""


class Pending(Protocol):
    """An exchange in flight, as a communicator returns it."""

    name: str
    compressor: C.Compressor | None  # None: sent uncompressed by the transport itself
    wire_bytes: int

    @property
    def kind(self) -> C.Exchange: ...


class Communicator(Protocol):
    """What :class:`GradientExchange` needs from a transport."""

    rank: int
    size: int

    def start(self, name: str, compressor: C.Compressor, payload: C.Payload,
              ctx: C.Ctx) -> Pending: ...
    def start_second_phase(self, pending: Pending) -> C.Payload: ...
    def finish(self, pending: Pending) -> Tensor: ...
    def combine(self, values: list[float]) -> list[float]: ...
    def broadcast_floats(self, values: list[float] | None, length: int) -> list[float]: ...


class CommunicationStats:
    """Bytes each rank put on the wire: per step, per tensor, and cumulative.

    ``dense_bytes`` is what an uncompressed float32 exchange of the same gradients sends, so
    ``dense_bytes / bytes`` is the achieved compression factor.
    """

    def __init__(self) -> None:
        self.steps = 0
        self.total_bytes = 0
        self.total_dense_bytes = 0
        self.last_step: dict[str, int] = {}
        self._current: dict[str, int] = {}
        self._current_dense = 0
        self.last_dense_bytes = 0

    def record(self, name: str, wire_bytes: int, numel: int) -> None:
        self._current[name] = self._current.get(name, 0) + wire_bytes
        self._current_dense += 4 * numel

    def end_step(self) -> None:
        self.last_step, self._current = self._current, {}
        self.last_dense_bytes, self._current_dense = self._current_dense, 0
        self.total_bytes += sum(self.last_step.values())
        self.total_dense_bytes += self.last_dense_bytes
        self.steps += 1

    @property
    def last_bytes(self) -> int:
        return sum(self.last_step.values())

    @property
    def float32_equivalents(self) -> float:
        """Cumulative bytes sent, in float32 elements."""
        return self.total_bytes / 4

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "total_bytes": self.total_bytes,
                "total_dense_bytes": self.total_dense_bytes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = state["steps"]
        self.total_bytes = state["total_bytes"]
        self.total_dense_bytes = state["total_dense_bytes"]


@dataclass(frozen=True)
class StepReport:
    """What one step's exchange did, as step callbacks see it (on every rank).

    ``bytes``/``dense_bytes``: this rank's bytes on the wire and what dense float32 would
    have sent; ``skipped``: the averaged gradient was not finite and the step not applied;
    ``decision``: the decision applied at this step, ``next_decision`` the one for the next
    (both None without an agent); ``stats``: the statistics combined across ranks that the
    agent saw (gain terms, step time; None without an agent or on a skipped step);
    ``agent_row``: on rank 0, the agent's metrics row for this step (GraVAC: δmin, δc, the
    branch, throughput), empty elsewhere.
    """

    step: int
    bytes: int
    dense_bytes: int
    skipped: bool
    decision: A.Decision | None
    next_decision: A.Decision | None
    stats: A.StepStats | None
    agent_row: dict[str, Any]


class GradientExchange:
    """Error feedback, compression at the current decision, and the end of each step.

    Arguments:
        compressor: the :class:`~horovod_gravac.compression.Compressor` of every tensor.
        memory: the error-feedback :class:`~horovod_gravac.compression.Memory`.
        agent: the agent that sets the CF, or None.
        communicator: the transport (Horovod or torch.distributed).
        layers: names of the tensors a decision may set a CF for, the same on every rank.
        uncompressed: names exchanged dense, without a residual.
        on_nonfinite: "skip" or "raise" when a step's averaged gradient is not finite.
    """

    def __init__(self, compressor: C.Compressor, memory: C.Memory, agent: A.Agent | None,
                 communicator: Communicator, layers: list[str],
                 uncompressed: frozenset[str] = frozenset(), on_nonfinite: str = "skip") -> None:
        if on_nonfinite not in NONFINITE_ACTIONS:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_ACTIONS}, got {on_nonfinite!r}")
        self.compressor, self.memory, self.agent = compressor, memory, agent
        self.communicator = communicator
        self.layers = layers
        self.uncompressed = uncompressed
        self.on_nonfinite = on_nonfinite
        self.communication = CommunicationStats()
        self.step_count = 0
        #: steps whose averaged gradient was not finite (not applied)
        self.skipped_steps = 0
        self.decision = agent.initial_decision() if agent is not None else None
        #: the decision applied at each of the last RECENT_STEPS steps, on this rank
        self.decisions: deque[A.Decision] = deque(maxlen=A.RECENT_STEPS)
        self.dense = C.NoCompression()
        self._local_finite: list[tuple[str, Tensor]] = []  # (name, 0-dim bool) this step
        #: per tensor measured this step: [reference, θmin level, sent level, *ladder levels]
        self._gain_terms: dict[str, Tensor] = {}
        #: per tensor, the link bytes of each ladder CF (GraVAC's cost model), this step
        self._ladder_bytes: dict[str, list[float]] = {}
        self._last_sync = time.perf_counter()
        self._untimed = 0.0  # seconds inside untimed() since the last end of step
        self._wait = 0.0  # seconds blocked on collectives this step
        #: link bytes this step: all tensors, and those sent uncompressed (no CF changes them)
        self._link = self._fixed_link = 0.0

    # -- one tensor ------------------------------------------------------------------------
    def compress(self, name: str, grad: Tensor):
        """Error feedback and compression of one tensor at the current decision.

        Returns (compressor used, payload, ctx, tensor whose residual is still to be taken
        — PowerSGD's, after its second phase — or None). The residual is taken here, before
        the collective starts: allreduces run in place on the payload.
        """
        if name in self.uncompressed:
            return (self.dense, *self.dense.compress(grad, name), None)
        if self.memory.keeps_state:  # to find this rank's culprits if the step is skipped
            self._local_finite.append((name, C.is_finite(grad)))
        compensated = self.memory.compensate(grad, name)
        compressor, decision = self.compressor, self.decision
        if decision is None:
            payload, ctx = compressor.compress(compensated, name, self.step_count)
        elif self.agent.needs_gain_stats:
            payload, ctx, compressor = self._multilevel(grad, compensated, name, decision)
        else:
            payload, ctx = compressor.compress(compensated, name, self.step_count,
                                               cf=decision.cf_for(name))
        if compressor is self.dense:  # GraVAC's dense branch: the residual restarts at 0
            self.memory.reset(name)
            compensated = None
        elif ctx.exchange is not C.Exchange.LOWRANK:  # PowerSGD's error needs phase 2 first
            self.memory.update(name, compensated, compressor, payload, ctx)
            compensated = None
        return compressor, payload, ctx, compensated

    def _levels(self, tensor: Tensor, name: str, decision: A.Decision, second: bool = True):
        """Multi-level compression: C(x, θmin), then (if ``second``) C(C(x, θmin), θs)
        within that selection."""
        c = self.compressor
        p_min, ctx_min = c.compress(tensor, name, self.step_count, cf=decision.theta_min)
        return (p_min, ctx_min), \
            c.recompress(p_min, ctx_min, decision.cf_for(name)) if second else None

    def _multilevel(self, grad: Tensor, g_o: Tensor, name: str, decision: A.Decision):
        """GraVAC's step: send the decided level of g_o; measure the gain terms if asked.

        What is sent is always C(g_o) with error feedback; the gain may be measured on the
        fresh gradient instead (``GainMeasure``), which costs a second compression of it.
        """
        measure = self.agent.gain_measure if decision.measure_gain else None
        on_compensated = measure is not None and measure.compressed == A.COMPENSATED
        sent_levels = None
        if decision.send == A.SEND_COMPRESSED and self.agent.ladder and not on_compensated:
            # the cost-model search: what is sent is not measured, so one compression at the
            # CF sent (for TopK and PowerSGD the same as its level within θmin's, cheaper)
            sent_levels = (None, self.compressor.compress(g_o, name, self.step_count,
                                                          cf=decision.cf_for(name)))
        elif decision.send != A.SEND_DENSE:
            sent_levels = self._levels(g_o, name, decision,
                                       second=on_compensated or decision.send == A.SEND_COMPRESSED)
        if measure is not None:
            levels = sent_levels if on_compensated and sent_levels else \
                self._levels(g_o if on_compensated else grad, name, decision)
            reference = g_o if measure.reference == A.COMPENSATED else grad
            c = self.compressor
            ladder = self._ladder_levels(levels, name, decision)
            terms = torch.stack([torch.linalg.vector_norm(reference).float().square(),
                                 *(c.sent_norm_sq(*level) for level in (*levels, *ladder))])
            self._gain_terms[name] = (terms.sqrt() if measure.power == 1 else terms).double()
            self._ladder_bytes[name] = [link_bytes(ctx.exchange, c.sent_bytes(payload, ctx),
                                                   self.communicator.size)
                                        for payload, ctx in ladder]
        if decision.send == A.SEND_COMPRESSED:
            return (*sent_levels[1], self.compressor)
        if decision.send == A.SEND_MIN:
            return (*sent_levels[0], self.compressor)
        payload, ctx = self.dense.compress(g_o, name)
        return payload, ctx, self.dense

    def _ladder_levels(self, levels, name: str, decision: A.Decision) -> list:
        """The agent's ladder CFs, each within the θmin level (reusing the sent level)."""
        known = {decision.theta_min: levels[0], decision.cf_for(name): levels[1]}
        return [known.get(cf) or self.compressor.recompress(*levels[0], cf)
                for cf in self.agent.ladder]

    def start(self, name: str, grad: Tensor) -> tuple[Any, Tensor | None]:
        """Compress ``grad`` and start its collective: (pending, PowerSGD's compensated)."""
        compressor, payload, ctx, compensated = self.compress(name, grad)
        return self.communicator.start(name, compressor, payload, ctx), compensated

    def second_phase(self, pending: Pending, compensated: Tensor | None) -> None:
        """PowerSGD: send Q once P is reduced; its residual is taken now."""
        start = time.perf_counter()
        q = self.communicator.start_second_phase(pending)
        self._wait += time.perf_counter() - start
        if compensated is not None:
            self.memory.update(pending.name, compensated, self.compressor, q, pending.ctx)

    def finish(self, pending: Pending, numel: int) -> Tensor:
        """Wait for one exchange; the reduced gradient (counted in the byte accounting and
        the time blocked on collectives)."""
        start = time.perf_counter()
        reduced = self.communicator.finish(pending)
        self._wait += time.perf_counter() - start
        self.communication.record(pending.name, pending.wire_bytes, numel)
        link = link_bytes(pending.kind, pending.wire_bytes, self.communicator.size)
        self._link += link
        if pending.compressor is None or pending.name in self.uncompressed:
            self._fixed_link += link  # sent as is, whatever the CF
        return reduced

    # -- the end of a step -----------------------------------------------------------------
    def end_step(self, averaged: dict[str, Tensor],
                 lr: float | None) -> tuple[bool, list[str], Any]:
        """After every gradient of the step is reduced (``averaged``: name → gradient,
        identical on all ranks): count bytes, decide whether to skip, reset culprits'
        residuals, let the agent decide. Returns (skip, this rank's culprits, the agent's
        statistics or None)."""
        self.communication.end_step()
        averaged_finite, culprits = self._finite_verdict(list(averaged.values()))
        skip = not averaged_finite
        self.skipped_steps += skip
        for name in culprits:  # a NaN/Inf never stays in a residual
            self.memory.reset(name)
        applied = self.decision
        if self.agent is not None:
            self.decisions.append(applied)
        stats = None
        if skip:
            log.warning("step %d: the averaged gradient is not finite%s; step skipped",
                        self.step_count, f" (this rank's {', '.join(culprits)})"
                        if culprits else "")
        elif self.agent is not None:
            stats = self._consult_agent(lr, self._layer_norms(averaged))
            if self.decision.sent_cf != applied.sent_cf:
                log.info("step %d: %s sends CF %g from the next step (was %g)", self.step_count,
                         self.agent.name, self.decision.sent_cf, applied.sent_cf)
        self._reset_step_measurements()
        return skip, culprits, stats

    def report(self, skipped: bool, stats: A.StepStats | None) -> StepReport:
        """The :class:`StepReport` of the step that just ended."""
        applied = self.decisions[-1] if self.agent is not None else None
        row = dict(self.agent.history[-1]) if stats is not None and self.agent.history \
            and self.agent.history[-1].get("step") == stats.step else {}
        return StepReport(step=self.step_count, bytes=self.communication.last_bytes,
                          dense_bytes=self.communication.last_dense_bytes, skipped=skipped,
                          decision=applied, next_decision=self.decision, stats=stats,
                          agent_row=row)

    def nonfinite_error(self, culprits: list[str]) -> NonFiniteGradientError:
        culprit = (f"this rank's gradient of {', '.join(culprits)} is non-finite"
                   if culprits else "another rank's gradient is non-finite"
                   if self.memory.keeps_state else "a rank's gradient is non-finite")
        return NonFiniteGradientError(
            f"step {self.step_count}: the averaged gradient contains NaN/Inf ({culprit}); "
            "lower the learning rate or use on_nonfinite='skip'")

    def _finite_verdict(self, averaged: list[Tensor]) -> tuple[bool, list[str]]:
        """(are all averaged gradients finite, names of this rank's non-finite gradients).

        The one host read of a step: the averaged verdict is identical on every rank, so is
        the decision to skip.
        """
        local, self._local_finite = self._local_finite, []
        flags = [C.is_finite(g.coalesce()._values() if g.is_sparse else g)
                 for g in averaged] + [flag for _, flag in local]
        if not flags:
            return True, []
        device = flags[0].device
        verdict = torch.stack([f if f.device == device else f.to(device)
                               for f in flags]).tolist()
        mine = verdict[len(averaged):]
        return all(verdict[:len(averaged)]), [name for (name, _), ok in zip(local, mine) if not ok]

    def _layer_norms(self, averaged: dict[str, Tensor]) -> dict[str, float] | None:
        """Norms of the averaged gradients (identical on all ranks), for Accordion on rank 0."""
        if not self.agent.needs_layer_norms or self.communicator.rank != 0 or not averaged:
            return None
        norms = torch.stack([torch.linalg.vector_norm(g, dtype=torch.float64)
                             for g in averaged.values()])
        return dict(zip(averaged, norms.tolist()))

    def _consult_agent(self, lr: float | None,
                       layer_norms: dict[str, float] | None) -> A.StepStats:
        """Combine statistics, let rank 0 decide, broadcast: every rank applies the same."""
        now = time.perf_counter()
        iter_time, self._last_sync = now - self._last_sync - self._untimed, now
        timing = [iter_time, self._wait, self._link]
        ladder = list(self.agent.ladder)
        width = 3 + len(ladder)
        # one row per tensor (GraVAC's per-layer CFs) or the sum over tensors
        names = self.layers if self.agent.per_layer_terms else [None]
        terms = [[0.0] * width for _ in names]
        sizes = [[0.0] * len(ladder) for _ in names]
        fixed = 0.0
        if self.agent.needs_gain_stats:
            local = self._measured_rows(names, width)
            combined = self.communicator.combine(
                [x for row in local[0] for x in row] + [x for row in local[1] for x in row]
                + [self._fixed_link] + timing)
            size, cut, k = self.communicator.size, len(names) * width, len(ladder)
            terms = [combined[i * width:(i + 1) * width] for i in range(len(names))]
            sizes = [[b / size for b in combined[cut + i * k:cut + (i + 1) * k]]
                     for i in range(len(names))]
            fixed = combined[-len(timing) - 1] / size
            timing = [t / size for t in combined[-len(timing):]]  # means over ranks
        self._untimed = 0.0
        gains = [sum(column) for column in zip(*terms)]
        ladder_bytes = [sum(column) + fixed for column in zip(*sizes)] if ladder else []
        measured = self.decision.measure_gain
        layered = names != [None] and measured
        stats = A.StepStats(step=self.step_count, iter_time=timing[0],
                            world_size=self.communicator.size, gain_reference=gains[0],
                            gain_min=gains[1], gain_compressed=gains[2],
                            gain_measured=measured, lr=lr,
                            sent=self.decision.send, layer_norms=layer_norms or {},
                            wait_time=timing[1], link_bytes=timing[2],
                            gain_ladder=dict(zip(ladder, gains[3:])) if measured else {},
                            ladder_link_bytes=dict(zip(ladder, ladder_bytes))
                            if measured else {},
                            layer_ladder={name: (row[0], *row[3:]) for name, row in
                                          zip(names, terms) if any(row)} if layered else {},
                            layer_link_bytes={name: tuple(b) for name, row, b in
                                              zip(names, terms, sizes) if any(row)}
                            if layered else {})
        if not self.agent.adaptive:
            self.decision = self.agent.decide(stats)
            return stats
        values = self.agent.decide(stats).encode(self.layers) \
            if self.communicator.rank == 0 else None
        self.decision = A.Decision.decode(self.communicator.broadcast_floats(
            values, A.Decision.encoded_length(self.layers)), self.layers)
        return stats

    @contextlib.contextmanager
    def untimed(self) -> Iterator[None]:
        """Time spent inside is not part of the step time agents see."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._untimed += time.perf_counter() - start

    def _measured_rows(self, names: list[str | None], width: int):
        """This rank's gain terms and ladder bytes: one row per name (zeros for tensors not
        measured here), or with ``[None]`` the sums over tensors. One host read."""
        ladder_width = width - 3
        if not self._gain_terms:
            return [[0.0] * width for _ in names], [[0.0] * ladder_width for _ in names]
        if names == [None]:
            terms = [torch.stack(list(self._gain_terms.values())).sum(0).tolist()]
            return terms, [[sum(b) for b in zip(*self._ladder_bytes.values())]
                           if ladder_width else []]
        zeros = next(iter(self._gain_terms.values())).new_zeros(width)
        terms = torch.stack([self._gain_terms.get(name, zeros) for name in names]).tolist()
        return terms, [self._ladder_bytes.get(name, [0.0] * ladder_width) for name in names]

    def _reset_step_measurements(self) -> None:
        self._gain_terms.clear()
        self._ladder_bytes.clear()
        self._wait = self._link = self._fixed_link = 0.0

    def forget_step_in_flight(self) -> None:
        self._reset_step_measurements()
        self._local_finite = []

    # -- state -----------------------------------------------------------------------------
    def progress(self) -> dict[str, Any]:
        """The exchange's own state: step, skipped steps, byte counts, the next decision
        (not the compressor's, memory's or agent's, which those objects hold)."""
        return {"step": self.step_count, "skipped_steps": self.skipped_steps,
                "communication": self.communication.state_dict(), "decision": self.decision}

    def load_progress(self, progress: dict[str, Any]) -> None:
        self.step_count = progress["step"]
        self.skipped_steps = progress.get("skipped_steps", 0)
        self.communication.load_state_dict(progress["communication"])
        if self.agent is not None and progress.get("decision") is not None:
            self.decision = progress["decision"]

    def state_dict(self) -> dict[str, Any]:
        return {**self.progress(), "memory": self.memory.state_dict(),
                "compressor": self.compressor.state_dict(),
                "agent": self.agent.state_dict() if self.agent is not None else None}

    def load_state_dict(self, ours: dict[str, Any]) -> None:
        self.memory.load_state_dict(ours["memory"])
        self.compressor.load_state_dict(ours["compressor"])
        agent_state = ours.get("agent")
        if self.agent is not None and agent_state is not None:
            self.agent.load_state_dict(agent_state)
        # a decision only means something to the agent that made it
        self.load_progress(ours if agent_state is not None else {**ours, "decision": None})
