"""The step engine: one rank's side of a compressed, fused gradient exchange.

Both front-ends (``DistributedOptimizer`` on Horovod, the DDP communication hook on
torch.distributed) drive one :class:`StepEngine` per model, built from one
:class:`EngineConfig`. A step is:

1. ``begin(name, grad)`` for every tensor, as backprop produces it: error feedback
   (g + residual) and compression at the CF the current decision sets for it, each tensor on
   its own (layer-wise). The tensor joins its *bucket* — consecutive tensors in backward
   order up to ``bucket_cap_mb`` of gradient, a pure function of the model and the settings,
   the same on every rank and across resumes — and once the bucket is complete its payloads
   leave in one collective per kind: one allreduce (sum) per payload dtype for everything of
   fixed size (dense tensors, fp16, RandomK, every PowerSGD P), one allgather for the
   per-rank payloads (sparsifiers' indices, quantizers' scales), one alltoall for payloads of
   a row per rank (a two-stage exchange's chunks). Communication starts while backprop goes
   on.
2. ``finish(write_back)`` once all tensors have begun: the compressors' further rounds for a
   whole bucket at a time (PowerSGD's Q from the reduced P: one allreduce of every Q of the
   bucket; a two-stage exchange's allgather of the chunks' owners' sums), in one fixed
   order on every rank; then every averaged gradient is handed to
   ``write_back(name, tensor)``, and the step's outcome is returned (:class:`StepOutcome`):
   whether the averaged gradient is finite, the bytes, the decision.

Control stays off the critical path. The statistics an agent asks for (its
:class:`~horovod_gravac.agents.ProbeSpec`: compression gains, measured by
:class:`~horovod_gravac.probing.GainProbe`; a layer plan's
:class:`~horovod_gravac.agents.ErrorSpec`, by :class:`~horovod_gravac.probing.ErrorProbe`, on
the steps that measure it) ride at the end of the last bucket's first fused collective and
are summed over ranks there — no collective of their own. The finite
verdict, the statistics and Accordion's layer norms are read back to the host once per step.
Rank 0's agent decides and the decision is broadcast without blocking (Horovod's broadcast,
over MPI under ``mpirun`` and over Gloo otherwise, or torch.distributed's for DDP); every rank waits
for it where the next step first needs it (its first ``begin``) and applies it from that
step on — the same decision at the same step on every rank.

The engine calls no collective itself: a transport (``communication``,
``communication_torch``) does.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import itertools
import logging
import sys
import time
import weakref
from collections import OrderedDict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from . import agents as A
from . import compression as C
from .probing import ErrorProbe, GainProbe
from .transport import (Handle, Transport, align, link_bytes, link_steps, pack, pack_rows,
                        unpack, unpack_rows)
from .validation import check_number

NONFINITE_ACTIONS = ("skip", "raise")
#: gradient bytes per bucket by default (PyTorch DDP's ``bucket_cap_mb`` default is 25)
DEFAULT_BUCKET_CAP_MB = 25.0
#: skipped steps and changes of the CF sent; the application decides where it goes
log = logging.getLogger(__name__)


def _cf_text(cf: float | None) -> str:
    return "(the compressor's own)" if cf is None else f"{cf:g}"


class NonFiniteGradientError(FloatingPointError):
    """Raised on every rank when ``on_nonfinite="raise"`` and a step's gradient is not finite."""


# -- configuration ---------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineConfig:
    """Everything a front-end builds its engine from (validated when made).

    Arguments:
        compressor: the :class:`~horovod_gravac.compression.Compressor` of every tensor.
        memory: the error-feedback :class:`~horovod_gravac.compression.Memory`.
        agent: the agent that sets the CF, or None.
        on_nonfinite: ``"skip"`` or ``"raise"`` when a step's averaged gradient is not finite.
        min_compress_numel: gradients with fewer elements are sent uncompressed, without a
            residual (biases, norm scales).
        compress_patterns: name patterns → always (True) / never (False) compress.
        bucket_cap_mb: gradient megabytes (2**20 bytes) per bucket; > 0.
        average: average over ranks (True) or sum (False).
        predivide: ``gradient_predivide_factor`` f: payloads are scaled by 1/f before the sum
            and by f/N after it (Horovod's split of the average).
    """

    compressor: C.Compressor
    memory: C.Memory
    agent: A.Agent | None = None
    on_nonfinite: str = "skip"
    min_compress_numel: int = C.DEFAULT_MIN_COMPRESS_NUMEL
    compress_patterns: Mapping[str, bool] | None = None
    bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB
    average: bool = True
    predivide: float = 1.0

    def __post_init__(self) -> None:
        if self.on_nonfinite not in NONFINITE_ACTIONS:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_ACTIONS}, got "
                             f"{self.on_nonfinite!r}")
        check_number("bucket_cap_mb", self.bucket_cap_mb, 0, low_open=True)
        check_number("min_compress_numel", self.min_compress_numel, 0, integer=True)
        check_number("gradient_predivide_factor", self.predivide, 0, low_open=True)
        if self.agent is not None and self.agent.sets_cf:
            C.check_adjustable(self.compressor, self.agent.name)

    @classmethod
    def create(cls, compression: str | C.Compressor = "none",
               memory: str | C.Memory | None = None, agent: str | A.Agent | None = None,
               **settings: Any) -> "EngineConfig":
        """A config from names or objects (``"topk:100"``, ``"residual"``, ``"gravac"``)."""
        compressor = C.create(compression)
        return cls(compressor, C.create_memory(memory, compressor), A.create(agent), **settings)

    def uncompressed(self, sizes: Sequence[tuple[str, int]]) -> frozenset[str]:
        """Names of the tensors exchanged dense (see ``compression.uncompressed_tensors``)."""
        return C.uncompressed_tensors(sizes, self.min_compress_numel, self.compress_patterns)


@dataclass(frozen=True)
class BucketLayout:
    """Which tensors travel together: buckets in the order backprop completes them.

    A pure function of the tensors (names, gradient bytes, in the model's order), the cap
    and the explicit groups: the same on every rank, and the same after a resume, so the
    fused buffers — and the order in which Gloo's ring sums their elements — never change.
    """

    buckets: tuple[tuple[str, ...], ...]

    @classmethod
    def by_size(cls, tensors: Sequence[tuple[str, int]], cap_bytes: float,
                groups: Sequence[Sequence[str]] | None = None) -> "BucketLayout":
        """Consecutive tensors in reverse model order (backprop's) up to ``cap_bytes`` of
        gradient each (a larger tensor alone); with ``groups``, each group is a bucket and
        every other tensor goes alone (Horovod's ``groups``)."""
        order = {name: i for i, (name, _) in enumerate(tensors)}
        if groups is not None:
            grouped = {n for g in groups for n in g}
            buckets = [tuple(g) for g in groups if g] + [(n,) for n, _ in tensors
                                                         if n not in grouped]
            buckets.sort(key=lambda b: -max(order[n] for n in b))
            return cls(tuple(buckets))
        buckets, current, size = [], [], 0
        for name, nbytes in reversed(tensors):
            if current and size + nbytes > cap_bytes:
                buckets.append(tuple(current))
                current, size = [], 0
            current.append(name)
            size += nbytes
        if current:
            buckets.append(tuple(current))
        return cls(tuple(buckets))


# -- accounting and reports ------------------------------------------------------------------
class CommunicationStats:
    """Bytes each rank put on the wire: per step, per tensor, and cumulative.

    ``dense_bytes`` is what an uncompressed float32 exchange of the same gradients sends, so
    ``dense_bytes / bytes`` is the achieved compression factor. Headers of gathered buffers
    and the agents' statistics count in the step's bytes, not in any tensor's.
    """

    def __init__(self) -> None:
        self.steps = 0
        self.total_bytes = 0
        self.total_dense_bytes = 0
        self.last_step: dict[str, int] = {}
        self.last_overhead = 0
        self.last_dense_bytes = 0
        self._current: dict[str, int] = {}
        self._overhead = 0
        self._current_dense = 0

    def record(self, name: str | None, wire_bytes: int, numel: int = 0) -> None:
        """``wire_bytes`` sent for tensor ``name`` (None: headers and statistics); ``numel``
        elements counted once per tensor and step."""
        if name is None:
            self._overhead += wire_bytes
        else:
            self._current[name] = self._current.get(name, 0) + wire_bytes
        self._current_dense += 4 * numel

    def end_step(self) -> None:
        self.last_step, self._current = self._current, {}
        self.last_overhead, self._overhead = self._overhead, 0
        self.last_dense_bytes, self._current_dense = self._current_dense, 0
        self.total_bytes += self.last_bytes
        self.total_dense_bytes += self.last_dense_bytes
        self.steps += 1

    def discard_step(self) -> None:
        self._current, self._overhead, self._current_dense = {}, 0, 0

    @property
    def last_bytes(self) -> int:
        return sum(self.last_step.values()) + self.last_overhead

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
    ``decision``: the decision applied at this step (None without an agent);
    ``next_decision`` the one for the next step (waits for rank 0's broadcast when read on
    another rank); ``stats``: the statistics combined across ranks that the agent saw (gain
    terms, step time; None without an agent or on a skipped step); ``agent_row``: on rank 0,
    the agent's metrics row for this step (GraVAC: δmin, δc, the branch, throughput), empty
    elsewhere; ``wait_s``: seconds blocked on collectives (and on the decision's
    broadcast); ``begin_s``: seconds in ``begin`` (error feedback, compression, gain
    measurement, packing and starting collectives, during backprop; the decision's wait
    included); ``finish_s``: seconds in ``finish`` besides waiting (later rounds, decoding,
    the verdict, the agent);
    ``link_bytes``: bytes the rank's link carried (each collective weighted by its ring
    traffic); ``rounds``: the exchange rounds this rank started in the step (a bucket's
    round: its fused collectives start together; the decision's broadcast is one, counted in
    the step that started it) and ``link_steps`` the ring message steps of their collectives
    (``transport.link_steps``): what latency is priced by (``benchmarks.whatif``).
    """

    step: int
    bytes: int
    dense_bytes: int
    skipped: bool
    decision: A.Decision | None
    stats: A.StepStats | None
    agent_row: dict[str, Any]
    wait_s: float = 0.0
    begin_s: float = 0.0
    finish_s: float = 0.0
    link_bytes: float = 0.0
    rounds: int = 0
    link_steps: int = 0
    _next: Callable[[], A.Decision | None] = field(default=lambda: None, repr=False,
                                                    compare=False)

    @property
    def next_decision(self) -> A.Decision | None:
        return self._next()


@dataclass(frozen=True)
class StepOutcome:
    """``finish``'s result: skip the optimizer step? (and the error to raise, if asked)."""

    skipped: bool
    culprits: list[str]
    report: StepReport
    error: NonFiniteGradientError | None = None


# -- one step in flight ----------------------------------------------------------------------
@dataclass
class Ticket:
    """One tensor of the step in flight (what ``begin`` returns)."""

    name: str
    compressor: C.Compressor
    payload: C.Payload  # this round's
    ctx: C.Ctx
    #: the error-fed tensor whose residual is taken once the last round's payload exists
    compensated: Tensor | None = None
    #: whether this rank's first payload was finite (0-dim bool; tensors with a residual)
    finite: Tensor | None = None
    round: int = 0
    result: Tensor | None = None


@dataclass
class _Message:
    """One fused collective of a bucket round: a sum (one dtype), the gather or the alltoall."""

    handle: Handle
    tickets: list[Ticket]
    kind: C.Exchange
    stats: int = 0  # floats of statistics at the end
    #: gather of one size on every rank: elements per tensor; alltoall: elements per row
    counts: list[int] | None = None
    dtypes: list[torch.dtype] = field(default_factory=list)


@dataclass
class _Sparse:
    name: str
    handle: Handle
    result: Tensor | None = None


class _Bucket:
    def __init__(self, index: int, names: tuple[str, ...]) -> None:
        self.index, self.names = index, names
        self.tickets: dict[str, Ticket] = {}
        self.arrived: set[str] = set()
        self.rounds: list[list[_Message]] = []  # per launched round

    @property
    def complete(self) -> bool:
        return len(self.arrived) == len(self.names)

    def reset(self) -> None:
        self.tickets, self.arrived, self.rounds = {}, set(), []


#: every engine alive, so that a decision still in flight is received before the process exits
_ENGINES: "weakref.WeakSet[StepEngine]" = weakref.WeakSet()


def _receive_decisions_in_flight() -> None:
    """At a normal exit, before the transport shuts down (registered when the first engine
    is made, after ``hvd.init()`` registered Horovod's: exit handlers run last-in
    first-out): the last step's decision broadcast, which no next step waited for, completes
    on every rank — a rank that exited with it pending would leave the others' without a
    peer. Not when the process dies of an exception: its peers may never get there."""
    if hasattr(sys, "last_value"):  # an uncaught exception ends this process
        return
    for engine in list(_ENGINES):
        if engine._incoming is not None:
            with contextlib.suppress(Exception):  # the world may already be gone
                engine.decision


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
        self._buckets = [_Bucket(i, names) for i, names in enumerate(self.layout.buckets)]
        self._bucket_of = {n: b for b in self._buckets for n in b.names}
        spec = self.agent.probe if self.agent is not None else None
        self.probe = GainProbe(spec, self.compressor, [
            (n, self.shapes[n].numel()) for n in self.names]) if spec is not None else None
        errors = self.agent.error_probe if self.agent is not None else None
        self.error_probe = ErrorProbe(errors, self.compressor, [
            (n, self.shapes[n].numel()) for n in self.names if n not in self.uncompressed]) \
            if errors is not None else None
        #: whether steps carry statistics for the agent (at the end of the carrier's first sum)
        self._measures = spec is not None or errors is not None
        #: the bucket whose first collective carries the agent's statistics: the one with the
        #: model's first tensor, which backprop reaches last
        self._carrier = self._bucket_of[self.names[0]] if self.names else None
        self.dense = C.NoCompression()
        self.communication = CommunicationStats()
        self.step_count = 0
        #: steps whose averaged gradient was not finite (not applied)
        self.skipped_steps = 0
        self._decision = self.agent.initial_decision() if self.agent is not None else None
        self._incoming: tuple[Handle, Tensor] | None = None  # the decision's broadcast
        #: the decision applied at each of the last RECENT_STEPS steps, on this rank
        self.decisions: deque[A.Decision] = deque(maxlen=A.RECENT_STEPS)
        self._callbacks: OrderedDict[int, Callable[[StepReport], None]] = OrderedDict()
        self._ladder_bytes: dict[float, float] | None = None
        self._last_sync = time.perf_counter()
        self._untimed = 0.0
        self._reset_step()
        if not _ENGINES:
            atexit.register(_receive_decisions_in_flight)
        _ENGINES.add(self)

    # -- the decision ------------------------------------------------------------------------
    @property
    def decision(self) -> A.Decision | None:
        """The decision for the next step (None without an agent); waits for its broadcast."""
        if self._incoming is not None:
            handle, _ = self._incoming
            self._incoming = None
            start = time.perf_counter()
            values = handle.wait()
            self._wait += time.perf_counter() - start
            self._decision = A.Decision.decode(values.tolist(), self.names)
        return self._decision

    @decision.setter
    def decision(self, value: A.Decision | dict[str, Any] | None) -> None:
        """A decision, or its dict from a state (``progress()``)."""
        if isinstance(value, dict):
            value = A.Decision(**value)
        self._incoming, self._decision = None, value

    # -- a step ------------------------------------------------------------------------------
    def _reset_step(self) -> None:
        self._applied: A.Decision | None = None
        self._begun: set[str] = set()
        self._sparse: list[_Sparse] = []
        self._flags: list[Tensor] = []
        self._stats: list[Tensor] = []
        self._wait = 0.0
        self._begin_s = 0.0
        self._link = 0.0
        self._rounds = 0
        self._link_steps = 0
        self._finish_start = 0.0
        self._device: torch.device | None = None
        for bucket in self._buckets:
            bucket.reset()
        for probe in (self.probe, self.error_probe):
            if probe is not None:
                probe.clear()

    def _start_step(self, device: torch.device) -> None:
        if self._applied is None and self.agent is not None:
            self._applied = self.decision
        if self._device is None:
            self._device = device
            self.compressor.bind(self.transport.rank, self.transport.size)

    def begin(self, name: str, grad: Tensor) -> Ticket:
        """Error feedback and compression of tensor ``name``; its bucket leaves once complete."""
        start = time.perf_counter()
        try:
            return self._begin(name, grad)
        finally:
            self._begin_s += time.perf_counter() - start

    def _begin(self, name: str, grad: Tensor) -> Ticket:
        self._arrive(name, grad.device)
        decision = self._applied
        if name in self.uncompressed:
            payload, ctx = self.dense.compress(grad, name)
            ticket = Ticket(name, self.dense, payload, ctx)
        else:
            compensated = self.memory.compensate(grad, name)
            if self.probe is not None and decision.measure_gain:
                self.probe.measure(name, grad, compensated, decision, self.step_count)
            if self.error_probe is not None and decision.measure_errors:
                self.error_probe.measure(name, compensated, decision, self.step_count)
            cf = decision.sent_cf_for(name) if decision is not None else None
            if cf == 1.0:  # dense, and the residual restarts at zero (GraVAC's third branch)
                self.memory.reset(name)
                payload, ctx = self.dense.compress(compensated, name)
                ticket = Ticket(name, self.dense, payload, ctx)
            else:
                kwargs = {} if cf is None else {"cf": cf}
                payload, ctx = self.compressor.compress(compensated, name, self.step_count,
                                                        **kwargs)
                ticket = Ticket(name, self.compressor, payload, ctx, compensated)
                if self.memory.keeps_state:  # to find this rank's culprits if skipped
                    ticket.finite = C.payload_is_finite(payload)
                self._take_residual(ticket)
        self.communication.record(name, 0, grad.numel())
        bucket = self._bucket_of[name]
        bucket.tickets[name] = ticket
        self._joined(bucket)
        return ticket

    def begin_sparse(self, name: str, grad: Tensor) -> None:
        """A torch sparse gradient: uncompressed, no error feedback, through the transport's
        sparse allreduce (Horovod's); it leaves at once."""
        self._arrive(name, grad.device)
        grad = grad.coalesce()
        handle = self.transport.sparse_allreduce(grad, f"{self.label}.sparse.{name}",
                                                 self.config.average)
        nbytes = C.wire_bytes((grad._indices(), grad._values()))
        self.communication.record(name, nbytes, grad.numel())
        self._started(C.Exchange.ALLGATHER, nbytes)
        self._rounds += 1
        self._sparse.append(_Sparse(name, handle))
        self._joined(self._bucket_of[name])

    def begun(self, name: str) -> bool:
        return name in self._begun

    @property
    def in_flight(self) -> bool:
        """A step has begun and not finished."""
        return bool(self._begun)

    def _arrive(self, name: str, device: torch.device) -> None:
        if name not in self._bucket_of:
            raise ValueError(f"unknown tensor {name!r}: the engine was built for "
                             f"{len(self.names)} tensors ({', '.join(self.names[:4])}, ...)")
        if name in self._begun:
            raise RuntimeError(f"tensor {name!r} began twice in one step")
        self._start_step(device)
        self._begun.add(name)
        self._bucket_of[name].arrived.add(name)

    def _joined(self, bucket: _Bucket) -> None:
        """Launch what is complete: ``bucket``, and the carrier once every tensor began."""
        if bucket.complete and not bucket.rounds and \
                (bucket is not self._carrier or not self._measures or self._all_begun):
            self._launch(bucket, 0)
        carrier = self._carrier
        if carrier is not bucket and carrier.complete and not carrier.rounds and self._all_begun:
            self._launch(carrier, 0)

    @property
    def _all_begun(self) -> bool:
        return len(self._begun) == len(self.names)

    def _take_residual(self, ticket: Ticket) -> None:
        """Error feedback once the last round's payload exists (before it is exchanged)."""
        if ticket.compensated is not None and ticket.round == ticket.ctx.rounds - 1:
            self.memory.update(ticket.name, ticket.compensated, ticket.compressor,
                               ticket.payload, ticket.ctx)
            ticket.compensated = None

    def _launch(self, bucket: _Bucket, rnd: int) -> None:
        """Start the fused collectives of ``bucket``'s round ``rnd``."""
        active = [bucket.tickets[n] for n in bucket.names
                  if n in bucket.tickets and bucket.tickets[n].ctx.rounds > rnd]
        stats = self._take_statistics() if rnd == 0 and bucket is self._carrier else None
        sums: dict[torch.dtype, list[Ticket]] = {}
        gathers: list[Ticket] = []
        scatters: list[Ticket] = []
        for t in active:
            if t.ctx.exchange is C.Exchange.ALLGATHER:
                gathers.append(t)
            elif t.ctx.exchange is C.Exchange.ALLTOALL:
                if t.ctx.varying_size:
                    raise ValueError(f"{t.compressor.name}: an alltoall payload must have the "
                                     "same size on every rank")
                scatters.append(t)
            else:
                if len(t.payload) != 1:
                    raise ValueError(f"{t.compressor.name}: a summed payload must be one tensor")
                sums.setdefault(t.payload[0].dtype, []).append(t)
        messages, label = [], f"{self.label}.b{bucket.index}.r{rnd}"
        if stats is not None and torch.float32 not in sums and not gathers:
            sums[torch.float32] = []  # nothing to ride on: the statistics alone
        for dtype, tickets in sums.items():
            # summed in place: payloads are fresh tensors, or the gradient itself (as Horovod)
            parts = [t.payload[0] for t in tickets]
            if parts and self.config.predivide != 1.0:
                torch._foreach_mul_(parts, 1.0 / self.config.predivide)
            carried = 0
            if stats is not None and dtype == torch.float32:
                parts.append(stats)
                carried, stats = stats.numel(), None
            for t in tickets:
                self.communication.record(t.name, C.wire_bytes(t.payload))
            self.communication.record(None, 4 * carried)
            self._started(C.Exchange.ALLREDUCE, sum(C.wire_bytes((p,)) for p in parts))
            messages.append(_Message(self.transport.allreduce(parts, f"{label}.sum.{dtype}"),
                                     tickets, C.Exchange.ALLREDUCE, stats=carried))
        if gathers:
            tensors = [x for t in gathers for x in t.payload]
            carried = 0
            if stats is not None:
                tensors.append(stats)
                carried = stats.numel()
            varying = any(t.ctx.varying_size for t in gathers)
            buffer = pack(tensors, header=varying)
            for t in gathers:
                self.communication.record(t.name, sum(align(x.numel() * x.element_size())
                                                      for x in t.payload))
            payload_bytes = sum(align(x.numel() * x.element_size()) for t in gathers
                                for x in t.payload)
            self.communication.record(None, buffer.numel() - payload_bytes)
            self._started(C.Exchange.ALLGATHER, buffer.numel())
            messages.append(_Message(
                self.transport.allgather(buffer, f"{label}.gather", same_size=not varying),
                gathers, C.Exchange.ALLGATHER, stats=carried, dtypes=[x.dtype for x in tensors],
                counts=None if varying else [x.numel() for x in tensors]))
        if scatters:  # one row per rank: row j of every payload tensor to rank j
            size = self.transport.size
            tensors = [x for t in scatters for x in t.payload]
            buffer = pack_rows(tensors, size)
            for t in scatters:
                self.communication.record(t.name, sum(
                    size * align(x.numel() // size * x.element_size()) for x in t.payload))
            self._started(C.Exchange.ALLTOALL, buffer.numel())
            messages.append(_Message(
                self.transport.alltoall(buffer, f"{label}.alltoall"), scatters,
                C.Exchange.ALLTOALL, dtypes=[x.dtype for x in tensors],
                counts=[x.numel() // size for x in tensors]))
        bucket.rounds.append(messages)
        self._rounds += bool(messages)

    def _started(self, exchange: C.Exchange | None, payload_bytes: float) -> None:
        """Account a collective this rank started (``None``: the decision's broadcast, whose
        few bytes are not counted): its link bytes and ring message steps."""
        size = self.transport.size
        if exchange is not None:
            self._link += link_bytes(exchange, payload_bytes, size)
        self._link_steps += link_steps(exchange, size)

    def _take_statistics(self) -> Tensor | None:
        """This step's statistics for the agent as one vector: the gain terms (every step
        of an agent with a probe), then the plan's errors (the steps that measure them)."""
        parts = [] if self.probe is None else [self.probe.take(self._device)]
        if self.error_probe is not None and self._applied.measure_errors:
            parts.append(self.error_probe.take(self._device))
        return torch.cat(parts) if parts else None

    def _receive(self, bucket: _Bucket, rnd: int) -> None:
        """Wait for ``bucket``'s round ``rnd``; advance its tensors (next payload or result)."""
        size = self.transport.size
        average = 1.0 / size if self.config.average else 1.0
        for message in bucket.rounds[rnd]:
            start = time.perf_counter()
            result = message.handle.wait()
            self._wait += time.perf_counter() - start
            if message.kind is C.Exchange.ALLTOALL:  # every rank's row for this rank
                received = unpack_rows(result, message.dtypes, message.counts)
                offset = 0
                for t in message.tickets:
                    k = len(t.payload)
                    self._advance(t, tuple(received[offset:offset + k]))
                    offset += k
                continue
            if message.kind is C.Exchange.ALLREDUCE:  # the payloads themselves, summed
                if message.stats:
                    self._stats.append(result[-1])
                reduced = result[:len(message.tickets)]
                if reduced:
                    self._flags.append(C.scale_and_check(reduced,
                                                         average * self.config.predivide))
                for t, tensor in zip(message.tickets, reduced):
                    self._advance(t, (tensor,))
                continue
            per_rank = [unpack(part, message.dtypes, message.counts)[0] for part in result]
            if message.stats:
                self._stats.append(torch.stack([p[-1] for p in per_rank]).sum(0))
            offset = 0
            for t in message.tickets:
                k = len(t.payload)
                payloads = [tuple(p[offset:offset + k]) for p in per_rank]
                offset += k
                t.result = t.compressor.aggregate(payloads, t.ctx, out=self._destination(t.name))
            if message.tickets:  # the sums averaged and checked in one pass
                self._flags.append(C.scale_and_check([t.result for t in message.tickets],
                                                     average))

    def _advance(self, ticket: Ticket, reduced: C.Payload) -> None:
        if ticket.round + 1 < ticket.ctx.rounds:
            ticket.payload = ticket.compressor.next_round(reduced, ticket.ctx)
            ticket.round += 1
            self._take_residual(ticket)
        else:
            ticket.result = ticket.compressor.aggregate([reduced], ticket.ctx,
                                                        out=self._destination(ticket.name))

    def finish(self, write_back: Callable[[str, Tensor], None], lr: float | None = None,
               destination: Callable[[str], Tensor | None] | None = None,
               variance_change: float | None = None) -> StepOutcome:
        """Complete the step (every tensor must have begun): further rounds, results to
        ``write_back(name, averaged)``, the verdict, the agent, the report.

        ``destination(name)``: a tensor of the gradient's shape and dtype that the averaged
        gradient may be decoded into (the one ``write_back`` gets then), or None.
        ``lr`` and ``variance_change`` (an Adam-family exchange's measurement, see
        :class:`~horovod_gravac.agents.StepStats`) are handed to the agent."""
        self._destination = destination or (lambda name: None)
        missing = [n for n in self.names if n not in self._begun]
        if missing:
            raise RuntimeError(f"finish() before every tensor began; missing: {missing[:5]}")
        self._finish_start = time.perf_counter() - self._wait  # less the waits before
        for bucket in self._buckets:  # the carrier may still wait for the last tensor
            if not bucket.rounds:
                self._launch(bucket, 0)
        # later rounds bucket by bucket in the layout's order, the same on every rank: each
        # bucket's next round leaves as soon as its previous one is back
        rounds = max((t.ctx.rounds for b in self._buckets for t in b.tickets.values()),
                     default=1)
        for rnd in range(1, rounds):
            for bucket in self._buckets:
                if any(t.ctx.rounds > rnd for t in bucket.tickets.values()):
                    self._receive(bucket, rnd - 1)
                    self._launch(bucket, rnd)
        for bucket in self._buckets:
            self._receive(bucket, len(bucket.rounds) - 1)
        for sparse in self._sparse:
            start = time.perf_counter()
            sparse.result = sparse.handle.wait()
            self._wait += time.perf_counter() - start
            self._flags.append(C.is_finite(sparse.result.coalesce()._values()))
        return self._conclude(write_back, lr, variance_change)

    def _results(self) -> list[tuple[str, Tensor]]:
        """(name, averaged gradient) of every tensor, in model order."""
        out = {t.name: t.result for b in self._buckets for t in b.tickets.values()}
        out.update({s.name: s.result for s in self._sparse})
        return [(n, out[n]) for n in self.names]

    def _conclude(self, write_back: Callable[[str, Tensor], None], lr: float | None,
                  variance_change: float | None) -> StepOutcome:
        results = self._results()
        device = self._device or torch.device("cpu")
        wants_norms = self.agent is not None and self.agent.needs_layer_norms and \
            self.transport.rank == 0
        pieces = [torch.stack([f.to(device) for f in self._flags]).double()
                  if self._flags else torch.ones(0, dtype=torch.float64, device=device)]
        stats = self._stats[0].to(device).double() if self._stats else None
        if stats is not None:
            pieces.append(stats)
        if wants_norms:
            pieces.append(torch.stack([torch.linalg.vector_norm(
                r.coalesce()._values() if r.is_sparse else r, dtype=torch.float64).to(device)
                for _, r in results]))
        values = torch.cat(pieces).tolist()  # the one host read of a step
        n_flags = len(self._flags)
        finite = all(v == 1.0 for v in values[:n_flags])
        culprits = [] if finite else self._culprits()
        for name in culprits:  # a NaN/Inf never stays in a residual
            self.memory.reset(name)
        for name, averaged in results:
            write_back(name, averaged)
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
            offset = n_flags
            terms = values[offset:offset + stats.numel()] if stats is not None else None
            offset += stats.numel() if stats is not None else 0
            norms = dict(zip(self.names, values[offset:])) if wants_norms else {}
            agent_stats = self._statistics(applied, terms, norms, iter_time, lr,
                                           variance_change)
            row = self._consult(agent_stats, applied)
        report = StepReport(step=self.step_count, bytes=self.communication.last_bytes,
                            dense_bytes=self.communication.last_dense_bytes, skipped=skipped,
                            decision=applied, stats=agent_stats, agent_row=row,
                            wait_s=self._wait, begin_s=self._begin_s,
                            finish_s=time.perf_counter() - self._finish_start - self._wait,
                            link_bytes=self._link, rounds=self._rounds,
                            link_steps=self._link_steps, _next=lambda: self.decision)
        error = self.nonfinite_error(culprits) \
            if skipped and self.config.on_nonfinite == "raise" else None
        self._reset_step()
        for callback in list(self._callbacks.values()):
            callback(report)
        self.step_count += 1
        return StepOutcome(skipped, culprits, report, error)

    def _culprits(self) -> list[str]:
        """This rank's tensors whose residual a NaN/Inf reached: their first payload was
        not finite (a skipped step only: one more host read)."""
        tickets = [t for b in self._buckets for t in b.tickets.values() if t.finite is not None]
        if not tickets:
            return []
        flags = torch.stack([t.finite.to(self._device) for t in tickets]).tolist()
        order = {n: i for i, n in enumerate(self.names)}
        return sorted((t.name for t, ok in zip(tickets, flags) if not ok), key=order.get)

    def _statistics(self, applied: A.Decision, terms: list[float] | None,
                    norms: dict[str, float], iter_time: float, lr: float | None,
                    variance_change: float | None) -> A.StepStats:
        spec = self.probe.spec if self.probe is not None else None
        gain_terms = spec.width if spec is not None else 0
        gains = spec.decode(terms[:gain_terms]) if spec is not None and terms is not None else {}
        errors_measured = applied.measure_errors and self.error_probe is not None and \
            terms is not None
        errors = self.error_probe.spec.decode(terms[gain_terms:], self.error_probe.names) \
            if errors_measured else {}
        candidate_bytes = {n: self._link_bytes_at(n, self.error_probe.spec.cfs(applied.cf))
                           for n in errors} if errors_measured and self.transport.rank == 0 \
            else {}
        ladder = self._ladder_link_bytes() if spec is not None and spec.ladder \
            and self.transport.rank == 0 else {}
        measured = applied.measure_gain and spec is not None
        return A.StepStats(
            step=self.step_count, iter_time=iter_time, world_size=self.transport.size,
            gain_measured=measured, lr=lr, sent=applied.send, layer_norms=norms,
            wait_time=self._wait, link_bytes=self._link,
            **{k: v for k, v in gains.items() if measured},
            ladder_link_bytes=ladder if measured else {},
            errors_measured=errors_measured, layer_errors=errors,
            candidate_link_bytes=candidate_bytes, variance_change=variance_change)

    def _link_bytes_at(self, name: str, cfs: Sequence[float]) -> tuple[float, ...]:
        """The link bytes compressed tensor ``name`` costs at each CF (from its shape; CF 1
        goes dense, as ``begin`` sends it)."""
        shape, priced = self.shapes[name], []
        for cf in cfs:
            rounds = ((4 * shape.numel(), C.Exchange.ALLREDUCE),) if cf == 1.0 else \
                self.compressor.expected_rounds(shape, cf)
            priced.append(sum(link_bytes(kind, nbytes, self.transport.size)
                              for nbytes, kind in rounds))
        return tuple(priced)

    def _ladder_link_bytes(self) -> dict[float, float]:
        """Per ladder CF, the link bytes of a step at it: from the shapes alone, so computed
        once."""
        if self._ladder_bytes is None:
            ladder, size = self.probe.spec.ladder, self.transport.size
            fixed = sum(link_bytes(C.Exchange.ALLREDUCE, 4 * self.shapes[n].numel(), size)
                        for n in self.names if n in self.uncompressed)
            per_tensor = {n: self._link_bytes_at(n, ladder) for n in self.names
                          if n not in self.uncompressed}
            total = {cf: fixed + sum(row[i] for row in per_tensor.values())
                     for i, cf in enumerate(ladder)}
            self._ladder_bytes = total
        return self._ladder_bytes

    def _consult(self, stats: A.StepStats, applied: A.Decision) -> dict[str, Any]:
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
            if decided.variance_frozen and not applied.variance_frozen:
                log.info("step %d: Adam's second moment freezes; the preconditioned momentum "
                         "is exchanged compressed from the next step", self.step_count)
            if decided.sent_cf != applied.sent_cf:
                log.info("step %d: %s sends CF %s from the next step (was %s)", self.step_count,
                         agent.name, _cf_text(decided.sent_cf), _cf_text(applied.sent_cf))
            row = dict(agent.history[-1]) if agent.history else {}
        buffer = buffer.to(self.transport.control_device)
        self._incoming = (self.transport.broadcast(buffer, f"{self.label}.decision"), buffer)
        self._started(None, 0)
        self._rounds += 1
        return row

    # -- around the steps -----------------------------------------------------------------------
    def register_step_callback(self, callback: Callable[[StepReport], None]) -> RemovableHandle:
        """Call ``callback(report)`` on every rank after each step (a :class:`StepReport`).
        Returns a handle whose ``remove()`` unregisters it."""
        handle = RemovableHandle(self._callbacks)
        self._callbacks[handle.id] = callback
        return handle

    @contextlib.contextmanager
    def untimed(self) -> Iterator[None]:
        """Time spent inside is not part of the step time agents see."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._untimed += time.perf_counter() - start

    def nonfinite_error(self, culprits: list[str]) -> NonFiniteGradientError:
        culprit = (f"this rank's gradient of {', '.join(culprits)} is non-finite"
                   if culprits else "another rank's gradient is non-finite"
                   if self.memory.keeps_state else "a rank's gradient is non-finite")
        return NonFiniteGradientError(
            f"step {self.step_count}: the averaged gradient contains NaN/Inf ({culprit}); "
            "lower the learning rate or use on_nonfinite='skip'")

    def forget_step_in_flight(self) -> None:
        """Drop a half-done step and any decision in flight (a Horovod world that is gone)."""
        self._incoming = None
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
