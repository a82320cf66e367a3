"""The step: one rank's side of a compressed, fused gradient exchange, begun tensor by tensor
during backprop and finished once all have begun.

1. ``begin(name, grad)`` for every tensor, as backprop produces it: the tensor is encoded
   (:mod:`.encoding`: error feedback and compression at the decision's CF) and joins its
   bucket; a complete bucket leaves at once as fused collectives (:mod:`.buckets`), so
   communication starts while backprop goes on.
2. ``finish(write_back)``: the compressors' further rounds, bucket by bucket in one fixed
   order; every averaged gradient to ``write_back(name, tensor)``; the verdict (is the
   averaged gradient finite? — read back to the host once per step, with the agent's
   statistics and Accordion's layer norms); the agent's decision (:mod:`.control`); the
   :class:`~horovod_gravac.engine.StepReport` for the step callbacks.

The engine calls no collective itself: a transport (``communication``,
``communication_torch``) does.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from .. import agents as A
from ..probing import probes
from ..transport import Transport
from .accounting import CommunicationStats, StepCounters, StepReport, timing
from .buckets import Bucket, BucketExchange
from .config import BucketLayout, EngineConfig
from .control import Control
from .encoding import Encoder
from .verdict import NonFiniteGradientError, nonfinite_error, nonfinite_tensors, read_back

#: skipped steps; the application decides where it goes
log = logging.getLogger(__name__)


#: the key of an Adam-family exchange's part of a front-end's state (its phase: rank 0's)
ADAM_STATE = "adam"
#: what rank 0 decides in an engine's :meth:`~StepEngine.state_dict` (and a front-end's
#: Adam-family phase): every rank takes these from rank 0's state when a job resumes and when
#: Horovod elastic resets the world; the rest — error-feedback residuals, byte counters, a
#: compressor state of each rank's own (Signum's momentum) — stays each rank's own
RANK_0_STATE = ("step", "skipped_steps", "agent", "decision", ADAM_STATE)


def rank_0_keys(compressor: Any) -> tuple[str, ...]:
    """:data:`RANK_0_STATE`, and ``"compressor"`` where its state is the same on every rank
    (PowerSGD's Q: ``Compressor.state_is_shared``)."""
    return RANK_0_STATE + (("compressor",) if compressor.state_is_shared else ())


def with_rank_0_state(own: dict[str, Any], rank_0: dict[str, Any],
                      compressor: Any) -> dict[str, Any]:
    """This rank's state ``own`` with what rank 0 decides taken from ``rank_0``'s."""
    return {**own, **{k: rank_0[k] for k in rank_0_keys(compressor) if k in rank_0}}


@dataclass(frozen=True)
class StepOutcome:
    """``finish``'s result: skip the optimizer step? (and the error to raise, if asked)."""

    skipped: bool
    error: NonFiniteGradientError | None = None


class StepEngine:
    """One rank's compressed exchange, step after step (see the module docstring).

    Arguments:
        config: compressor, memory, agent and settings.
        transport: the collectives (Horovod's or torch.distributed's).
        tensors: ``(name, shape, element_size)`` of every tensor, in the model's order; the
            same on every rank.
        groups: explicit buckets (lists of names; the others go alone), or None: by size.
        uncompressed: names exchanged dense without a residual (default: by the config's
            ``min_compress_numel`` and ``compress_patterns``).
    """

    #: numbers the engines of a process, in the order they are made (the same on every rank):
    #: collective names must be unique among everything in flight, across engines too
    _made = itertools.count()

    def __init__(self, config: EngineConfig, transport: Transport,
                 tensors: Sequence[tuple[str, torch.Size, int]],
                 groups: Sequence[Sequence[str]] | None = None,
                 uncompressed: frozenset[str] | None = None) -> None:
        self.config = config
        self.label = f"gravac.{next(self._made)}"
        self.compressor, self.memory, self.agent = config.compressor, config.memory, config.agent
        self.transport = transport
        # the rank keys stochastic rounding (independent noise across ranks); rank and size
        # set a two-stage exchange's chunks (bound again at every step: elastic resizes). A
        # process outside the transport's ranks (a Horovod process set) has no rank there
        # and never exchanges.
        if getattr(transport, "included", True):
            self.compressor.bind(transport.rank, transport.size)
        self.names = [name for name, _, _ in tensors]
        self.shapes = {name: torch.Size(shape) for name, shape, _ in tensors}
        self.uncompressed = config.uncompressed(
            [(n, shape.numel()) for n, shape in self.shapes.items()]) \
            if uncompressed is None else uncompressed
        self.layout = BucketLayout.by_size(
            [(n, torch.Size(shape).numel() * size) for n, shape, size in tensors],
            config.bucket_cap_mb * 2**20, groups)
        probe, error_probe = probes(self.agent, self.compressor, self.shapes, self.uncompressed)
        self.communication = CommunicationStats()
        self._counters = StepCounters(transport.size)
        self._encoder = Encoder(self.compressor, self.memory, self.uncompressed, probe,
                                error_probe)
        self._buckets = BucketExchange(self.layout, transport, self.label, config.average,
                                       config.predivide, self.communication, self._counters,
                                       carrier=self.names[0] if self.names else None)
        self._control = Control(self.agent, transport, self.shapes, self.compressor,
                                self.uncompressed, self.layout, probe, error_probe,
                                self._counters, self.label)
        self.step_count = 0
        #: steps whose averaged gradient was not finite (not applied)
        self.skipped_steps = 0
        #: the decision applied at each of the last RECENT_STEPS steps, on this rank
        self.decisions: deque[A.Decision] = deque(maxlen=A.RECENT_STEPS)
        self._callbacks: OrderedDict[int, Callable[[StepReport], None]] = OrderedDict()
        self._last_sync = time.perf_counter()
        self._untimed = 0.0
        self._reset_step()

    @property
    def decision(self) -> A.Decision | None:
        """The decision for the next step (None without an agent); waits for its broadcast."""
        return self._control.decision

    @decision.setter
    def decision(self, value: A.Decision | dict[str, Any] | None) -> None:
        """A decision, or its dict from a state (``progress()``)."""
        self._control.decision = value

    # -- a step ------------------------------------------------------------------------------
    def _reset_step(self) -> None:
        self._applied: A.Decision | None = None
        self._begun: set[str] = set()
        self._finish_start = 0.0
        self._device: torch.device | None = None
        self._counters.clear(self.transport.size)
        self._buckets.reset()
        self._encoder.clear()

    def _start_step(self, device: torch.device) -> None:
        """The step's first tensor: its decision, its device, its world."""
        if self._applied is None and self.agent is not None:
            self._applied = self.decision
        if self._device is None:
            self._device = device
            self.compressor.bind(self.transport.rank, self.transport.size)
            self._counters.world_size = self.transport.size

    def begin(self, name: str, grad: Tensor) -> None:
        """Error feedback and compression of tensor ``name``; its bucket leaves once complete."""
        start = time.perf_counter()
        try:
            self._arrive(name, grad.device)
            ticket = self._encoder.encode(name, grad, self._applied, self.step_count)
            self.communication.record(name, 0, grad.numel())
            bucket = self._buckets.arrive(name)
            bucket.tickets[name] = ticket
            self._launch_ready(bucket)
        finally:
            self._counters.begin_s += time.perf_counter() - start

    def begin_sparse(self, name: str, grad: Tensor) -> None:
        """A torch sparse gradient: uncompressed, no error feedback, through the transport's
        sparse allreduce (Horovod's); it leaves at once."""
        self._arrive(name, grad.device)
        self._buckets.launch_sparse(name, grad.coalesce())
        self._launch_ready(self._buckets.arrive(name))

    def begun(self, name: str) -> bool:
        return name in self._begun

    @property
    def in_flight(self) -> bool:
        """A step has begun and not finished."""
        return bool(self._begun)

    def _arrive(self, name: str, device: torch.device) -> None:
        if name not in self.shapes:
            raise ValueError(f"unknown tensor {name!r}: the engine was built for "
                             f"{len(self.names)} tensors ({', '.join(self.names[:4])}, ...)")
        if name in self._begun:
            raise RuntimeError(f"tensor {name!r} began twice in one step")
        self._start_step(device)
        self._begun.add(name)

    def _launch_ready(self, bucket: Bucket | None = None) -> None:
        """The first round of what is complete: ``bucket``, and the carrier (with the
        agent's statistics) once every tensor began; None: every bucket not yet sent."""
        ready = [b for b in self._buckets.buckets if not b.rounds] if bucket is None else \
            self._buckets.ready(bucket, len(self._begun) == len(self.names),
                                self._control.measures)
        for launched in ready:
            stats = self._control.statistics_vector(self._applied, self._device) \
                if launched is self._buckets.carrier else None
            self._buckets.launch(launched, 0, stats)

    def finish(self, write_back: Callable[[str, Tensor], None], lr: float | None = None,
               destination: Callable[[str], Tensor | None] | None = None,
               variance_change: float | None = None) -> StepOutcome:
        """Complete the step (every tensor must have begun): further rounds, results to
        ``write_back(name, averaged)``, the verdict, the agent, the report.

        ``destination(name)``: a tensor of the gradient's shape and dtype that the averaged
        gradient may be decoded into (the one ``write_back`` gets then), or None.
        ``lr`` and ``variance_change`` (an Adam-family exchange's measurement, see
        :class:`~horovod_gravac.agents.StepStats`) are handed to the agent."""
        missing = [n for n in self.names if n not in self._begun]
        if missing:
            raise RuntimeError(f"finish() before every tensor began; missing: {missing[:5]}")
        self._finish_start = time.perf_counter() - self._counters.wait_s  # less the waits
        self._launch_ready()  # the carrier may still wait for the last tensor
        self._buckets.complete_step(destination or (lambda name: None))
        results = self._buckets.results()
        wants_norms = self.agent is not None and self.agent.needs_layer_norms and \
            self.transport.rank == 0
        device = self._device or torch.device("cpu")
        finite, terms, norms = read_back(self._buckets.flags, self._buckets.stats,
                                         [(n, results[n]) for n in self.names], wants_norms,
                                         device)
        culprits = [] if finite else nonfinite_tensors(self._buckets.tickets(), self.names,
                                                       device)
        for name in culprits:  # a NaN/Inf never stays in a residual
            self.memory.reset(name)
        for name in self.names:
            write_back(name, results[name])
        return self._conclude(finite, culprits, terms, norms, lr, variance_change)

    def _conclude(self, finite: bool, culprits: list[str], terms: list[float] | None,
                  norms: dict[str, float], lr: float | None,
                  variance_change: float | None) -> StepOutcome:
        """Count the step, consult the agent, report to the callbacks."""
        self.communication.end_step()
        skipped = not finite
        self.skipped_steps += skipped
        applied = self._applied
        if self.agent is not None:
            self.decisions.append(applied)
        now = time.perf_counter()
        iter_time, self._last_sync = now - self._last_sync - self._untimed, now
        self._untimed = 0.0
        agent_stats, row = None, {}
        if skipped:
            log.warning("step %d: the averaged gradient is not finite%s; step skipped",
                        self.step_count, f" (this rank's {', '.join(culprits)})"
                        if culprits else "")
        elif self.agent is not None:
            agent_stats = self._control.statistics(self.step_count, applied, terms, norms,
                                                   iter_time, lr, variance_change)
            row = self._control.consult(agent_stats, applied)
        counters = self._counters
        report = StepReport(step=self.step_count, bytes=self.communication.last_bytes,
                            dense_bytes=self.communication.last_dense_bytes, skipped=skipped,
                            decision=applied, stats=agent_stats, agent_row=row,
                            wait_s=counters.wait_s, begin_s=counters.begin_s,
                            finish_s=time.perf_counter() - self._finish_start - counters.wait_s,
                            link_bytes=counters.link_bytes, rounds=counters.rounds,
                            link_steps=counters.link_steps, _next=lambda: self.decision)
        error = nonfinite_error(self.step_count, culprits, self.memory.keeps_state) \
            if skipped and self.config.on_nonfinite == "raise" else None
        self._reset_step()
        for callback in list(self._callbacks.values()):
            callback(report)
        self.step_count += 1
        return StepOutcome(skipped, error)

    # -- around the steps -----------------------------------------------------------------------
    def register_step_callback(self, callback: Callable[[StepReport], None]) -> RemovableHandle:
        """Call ``callback(report)`` on every rank after each step (a :class:`StepReport`).
        Returns a handle whose ``remove()`` unregisters it."""
        handle = RemovableHandle(self._callbacks)
        self._callbacks[handle.id] = callback
        return handle

    def untimed(self) -> contextlib.AbstractContextManager[None]:
        """Time spent inside is not part of the step time agents see."""
        return timing(self._add_untimed)

    def _add_untimed(self, seconds: float) -> None:
        self._untimed += seconds

    def forget_step_in_flight(self) -> None:
        """Drop a half-done step and any decision in flight (a Horovod world that is gone)."""
        self._control.drop_in_flight()
        self.communication.discard_step()
        self._reset_step()

    # -- state -----------------------------------------------------------------------------------
    def progress(self) -> dict[str, Any]:
        """The engine's own state: step, skipped steps, byte counts, the next decision
        (not the compressor's, memory's or agent's, which those objects hold); plain
        containers, so ``torch.load`` reads it with ``weights_only=True``."""
        decision = self.decision
        return {"step": self.step_count, "skipped_steps": self.skipped_steps,
                "communication": self.communication.state_dict(),
                "decision": None if decision is None else dataclasses.asdict(decision)}

    def load_progress(self, progress: dict[str, Any]) -> None:
        self.step_count = progress["step"]
        self.skipped_steps = progress.get("skipped_steps", 0)
        self.communication.load_state_dict(progress["communication"])
        if self.agent is not None and progress.get("decision") is not None:
            self.decision = progress["decision"]

    def state_dict(self) -> dict[str, Any]:
        """The progress and the memory's, compressor's and agent's states
        (:func:`engine_state`); which parts rank 0 decides: :func:`with_rank_0_state`."""
        return engine_state(self.config, self.progress())

    def load_state_dict(self, ours: dict[str, Any]) -> None:
        self.load_progress(load_engine_state(self.config, ours))


def engine_state(config: EngineConfig, progress: dict[str, Any]) -> dict[str, Any]:
    """An engine's state: its ``progress`` and the state of the objects ``config`` holds
    (memory, compressor, agent) — what :meth:`StepEngine.state_dict` returns, also for a
    configuration not bound to an engine (a DDP hook's state before it is attached)."""
    return {**progress, "memory": config.memory.state_dict(),
            "compressor": config.compressor.state_dict(),
            "agent": config.agent.state_dict() if config.agent is not None else None}


def load_engine_state(config: EngineConfig, ours: dict[str, Any]) -> dict[str, Any]:
    """Load :func:`engine_state`'s ``ours`` into ``config``'s objects; returns the progress
    to load (without a decision where the agent's state is not loaded: a decision only
    means something to the agent that made it)."""
    config.memory.load_state_dict(ours["memory"])
    config.compressor.load_state_dict(ours["compressor"])
    agent_state = ours.get("agent")
    if config.agent is not None and agent_state is not None:
        config.agent.load_state_dict(agent_state)
    progress = {k: v for k, v in ours.items() if k not in ("memory", "compressor", "agent")}
    return progress if agent_state is not None else {**progress, "decision": None}
