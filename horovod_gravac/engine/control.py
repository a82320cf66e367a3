"""The agent's side of a step, off the critical path: the statistics it asked for, its
decision on rank 0, and the decision's way to every rank.

Rank 0's agent decides and the decision is broadcast without blocking (Horovod's broadcast,
over MPI under ``mpirun`` and over Gloo otherwise, or torch.distributed's for DDP); every rank
waits for it where the next step first needs it and applies it from that step on — the same
decision at the same step on every rank.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import logging
import sys
import weakref
from typing import Any

import torch
from torch import Tensor

from .. import agents as A
from .. import compression as C
from ..probing import ErrorProbe, GainProbe
from ..transport import Handle, Transport, link_steps
from .accounting import StepCounters, ladder_link_bytes, step_traffic, tensor_link_bytes
from .config import BucketLayout

#: changes of the CF sent and the variance's freeze; the application decides where it goes
log = logging.getLogger(__name__)


def _cf_text(cf: float | None) -> str:
    return "(the compressor's own)" if cf is None else f"{cf:g}"


#: every control alive, so that a decision still in flight is received before the process exits
_CONTROLS: "weakref.WeakSet[Control]" = weakref.WeakSet()


def _receive_decisions_in_flight() -> None:
    """At a normal exit, before the transport shuts down (registered when the first engine
    is made, after ``hvd.init()`` registered Horovod's: exit handlers run last-in
    first-out): the last step's decision broadcast, which no next step waited for, completes
    on every rank — a rank that exited with it pending would leave the others' without a
    peer. Not when the process dies of an exception: its peers may never get there."""
    if hasattr(sys, "last_value"):  # an uncaught exception ends this process
        return
    for control in list(_CONTROLS):
        if control.in_flight:
            with contextlib.suppress(Exception):  # the world may already be gone
                control.decision


class Control:
    """One rank's agent-facing side of the engine.

    Arguments:
        agent: the agent (None: no decisions, no statistics).
        transport: the collectives (the decision's broadcast).
        shapes: every tensor's shape by name, in the model's order.
        compressor: the compressor (to price a CF in link bytes), or the set of candidates
            (to price each).
        layout: the buckets (a candidate's rounds).
        uncompressed: the tensors sent dense.
        probe, error_probe: the probes whose sums the statistics carry.
        counters: the step's counters (the broadcast's wait and round).
        label: unique prefix of the engine's collective names.
    """

    def __init__(self, agent: A.Agent | None, transport: Transport,
                 shapes: dict[str, torch.Size], compressor: C.Compressor,
                 uncompressed: frozenset[str], layout: BucketLayout, probe: GainProbe | None,
                 error_probe: ErrorProbe | None, counters: StepCounters, label: str) -> None:
        self.agent, self.transport, self.shapes = agent, transport, shapes
        self.names = list(shapes)
        self.compressor, self.uncompressed, self.layout = compressor, uncompressed, layout
        self.probe, self.error_probe = probe, error_probe
        self.counters, self.label = counters, label
        self._decision = agent.initial_decision() if agent is not None else None
        #: the decision's broadcast in flight, and its buffer (alive until received)
        self._incoming: tuple[Handle, Tensor] | None = None
        self._ladder_bytes: dict[float, float] | None = None
        self._codec_traffic: dict[int, A.Traffic] | None = None
        self._traffic_size = 0
        if not _CONTROLS:
            atexit.register(_receive_decisions_in_flight)
        _CONTROLS.add(self)

    # -- the decision ------------------------------------------------------------------------
    @property
    def measures(self) -> bool:
        """Whether steps carry statistics for the agent."""
        return self.probe is not None or self.error_probe is not None

    @property
    def in_flight(self) -> bool:
        """A decision is on its way (its broadcast not yet received)."""
        return self._incoming is not None

    @property
    def decision(self) -> A.Decision | None:
        """The decision for the next step (None without an agent); waits for its broadcast."""
        if self._incoming is not None:
            (handle, _), self._incoming = self._incoming, None
            with self.counters.waiting():
                values = handle.wait()
            self._decision = A.Decision.decode(values.tolist(), self.names)
        return self._decision

    @decision.setter
    def decision(self, value: A.Decision | dict[str, Any] | None) -> None:
        """A decision, or its dict from a state (``progress()``)."""
        if isinstance(value, dict):
            value = A.Decision(**value)
        self._incoming, self._decision = None, value

    def drop_in_flight(self) -> None:
        """Forget a broadcast in flight (a world that is gone)."""
        self._incoming = None

    # -- the statistics ------------------------------------------------------------------------
    def statistics_vector(self, applied: A.Decision | None, device: torch.device) -> Tensor | None:
        """This step's statistics as one vector, to be summed over ranks: the gain terms
        (every step of an agent with a probe), then the plan's errors (the steps that
        measure them)."""
        parts = [] if self.probe is None else [self.probe.take(device)]
        if self.error_probe is not None and applied.measure_errors:
            parts.append(self.error_probe.take(device))
        return torch.cat(parts) if parts else None

    def statistics(self, step: int, applied: A.Decision, terms: list[float] | None,
                   norms: dict[str, float], iter_time: float, lr: float | None,
                   variance_change: float | None) -> A.StepStats:
        """What the agent sees of a step: the summed ``terms`` decoded, the times, and on
        rank 0 the link bytes the candidate CFs would cost."""
        spec = self.probe.spec if self.probe is not None else None
        gain_terms = self.probe.width if spec is not None else 0
        gains = spec.decode(terms[:gain_terms]) if spec is not None and terms is not None else {}
        errors_measured = applied.measure_errors and self.error_probe is not None and \
            terms is not None
        errors = self.error_probe.spec.decode(terms[gain_terms:], self.error_probe.names) \
            if errors_measured else {}
        rank0, size = self.transport.rank == 0, self.transport.size
        candidate_bytes = {n: self._candidate_link_bytes(n, applied.cf) for n in errors} \
            if errors_measured and rank0 else {}
        ladder = self._ladder_link_bytes() if spec is not None and spec.ladder and rank0 \
            else {}
        measured = applied.measure_gain and spec is not None
        codecs = self._codec_traffics() if spec is not None and spec.per_codec and rank0 \
            else {}
        return A.StepStats(
            step=step, iter_time=iter_time, world_size=size,
            gain_measured=measured, lr=lr, sent=applied.send, layer_norms=norms,
            wait_time=self.counters.wait_s, link_bytes=self.counters.link_bytes,
            rounds=self.counters.rounds, link_steps=self.counters.link_steps,
            codec=applied.codec, codec_traffic=codecs,
            **{k: v for k, v in gains.items() if measured},
            ladder_link_bytes=ladder if measured else {},
            errors_measured=errors_measured, layer_errors=errors,
            candidate_link_bytes=candidate_bytes, variance_change=variance_change)

    def _candidate_link_bytes(self, name: str, cf: float | None) -> tuple[float, ...]:
        """The link bytes tensor ``name`` costs with each of a layer plan's candidates: the
        CFs around ``cf``, or the codecs of the set."""
        shape, size = self.shapes[name], self.transport.size
        if self.error_probe.spec.codecs:
            return tuple(tensor_link_bytes(candidate, shape, None, size)
                         for candidate in self.compressor.candidates)
        return tuple(tensor_link_bytes(self.compressor, shape, c, size)
                     for c in self.error_probe.spec.cfs(cf))

    def _ladder_link_bytes(self) -> dict[float, float]:
        """Per ladder CF, the link bytes of a step at it: from the shapes alone, so computed
        once."""
        if self._ladder_bytes is None:
            self._ladder_bytes = ladder_link_bytes(self.compressor, self.shapes,
                                                   self.uncompressed, self.probe.spec.ladder,
                                                   self.transport.size)
        return self._ladder_bytes

    def _codec_traffics(self) -> dict[int, A.Traffic]:
        """Per candidate of the set, a step's traffic with it (the decision's broadcast
        included): from the shapes alone, so computed once (again if the world resizes)."""
        size = self.transport.size
        if self._codec_traffic is None or self._traffic_size != size:
            self._traffic_size = size
            self._codec_traffic = {
                k: dataclasses.replace(traffic, rounds=traffic.rounds + 1,
                                       link_steps=traffic.link_steps + link_steps(None, size))
                for k, traffic in enumerate(
                    step_traffic(candidate, self.shapes, self.uncompressed,
                                 self.layout.buckets, size)
                    for candidate in self.compressor.candidates)}
        return self._codec_traffic

    # -- deciding ------------------------------------------------------------------------------
    def consult(self, stats: A.StepStats, applied: A.Decision) -> dict[str, Any]:
        """Rank 0 decides; the decision leaves without blocking (static agents decide alike
        everywhere). Returns rank 0's metrics row for this step."""
        agent = self.agent
        if not agent.adaptive:
            self._decision = agent.decide(stats)
            return dict(agent.history[-1]) if agent.history else {}
        buffer = torch.zeros(A.Decision.encoded_length(self.names), dtype=torch.float64)
        row = {}
        if self.transport.rank == 0:
            decided = agent.decide(stats)
            buffer.copy_(torch.tensor(decided.encode(self.names), dtype=torch.float64))
            _log_change(stats.step, agent.name, applied, decided,
                        getattr(self.compressor, "specs", ()))
            row = dict(agent.history[-1]) if agent.history else {}
        buffer = buffer.to(self.transport.control_device)
        self._incoming = (self.transport.broadcast(buffer, f"{self.label}.decision"), buffer)
        self.counters.started(None, 0)
        self.counters.rounds += 1
        return row


def _log_change(step: int, agent: str, applied: A.Decision, decided: A.Decision,
                codecs: tuple[str, ...]) -> None:
    if decided.variance_frozen and not applied.variance_frozen:
        log.info("step %d: Adam's second moment freezes; the preconditioned momentum "
                 "is exchanged compressed from the next step", step)
    if decided.codec != applied.codec and decided.codec is not None:
        was = "dense" if applied.codec is None else codecs[applied.codec]
        log.info("step %d: %s sends %s from the next step (was %s)", step, agent,
                 codecs[decided.codec], was)
    elif decided.sent_cf != applied.sent_cf:
        log.info("step %d: %s sends CF %s from the next step (was %s)", step, agent,
                 _cf_text(decided.sent_cf), _cf_text(applied.sent_cf))
