"""What a step cost: bytes per tensor and in all (:class:`CommunicationStats`), this step's
waits, rounds and link traffic (:class:`StepCounters`), the report step callbacks get
(:class:`StepReport`), and the one pricing rule for a tensor's exchange
(:func:`exchange_rounds`) that the engine, the agents' statistics and the what-if model
(``benchmarks.whatif``) share."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from .. import agents as A
from .. import compression as C
from ..transport import link_bytes, link_steps


def exchange_rounds(compressor: C.Compressor, shape: torch.Size, cf: float | None,
                    dense: bool = False) -> tuple[tuple[int, C.Exchange], ...]:
    """``(payload bytes per rank, collective kind)`` of each round that one tensor of
    ``shape`` costs: a float32 allreduce when it goes ``dense`` or at CF 1 (as the engine
    sends it), else the compressor's rounds at ``cf`` (bound to the world size first)."""
    if dense or cf == 1.0:
        return ((4 * shape.numel(), C.Exchange.ALLREDUCE),)
    return tuple(compressor.expected_rounds(shape, cf))


def step_traffic(compressor: C.Compressor, shapes: dict[str, torch.Size],
                 uncompressed: frozenset[str], buckets: Sequence[Sequence[str]],
                 world_size: int, cf: float | None = None) -> A.Traffic:
    """The traffic of a step that sends every tensor not in ``uncompressed`` with
    ``compressor`` at ``cf`` (None: its own setting; the rest dense, summed) in the fused
    ``buckets``, on ``world_size`` ranks: a bucket's round is one round with one collective
    per kind of payload, as :class:`~.buckets.BucketExchange` sends it."""
    compressor.bind(compressor.process_rank, world_size)
    link = decoded = rounds = steps = 0.0
    for bucket in buckets:
        per_round: list[set[C.Exchange]] = []
        for name in bucket:
            for i, (nbytes, kind) in enumerate(exchange_rounds(
                    compressor, shapes[name], cf, dense=name in uncompressed)):
                link += link_bytes(kind, nbytes, world_size)
                decoded += world_size * nbytes if kind is C.Exchange.ALLGATHER else nbytes
                if i == len(per_round):
                    per_round.append(set())
                per_round[i].add(kind)
        rounds += len(per_round)
        steps += sum(link_steps(kind, world_size) for kinds in per_round for kind in kinds)
    return A.Traffic(link, decoded, rounds, steps)


def tensor_link_bytes(compressor: C.Compressor, shape: torch.Size, cf: float | None,
                      world_size: int, dense: bool = False) -> float:
    """Bytes one tensor's exchange puts on a rank's link (see :func:`exchange_rounds`)."""
    return sum(link_bytes(kind, nbytes, world_size)
               for nbytes, kind in exchange_rounds(compressor, shape, cf, dense))


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


@dataclass
class StepCounters:
    """This rank's step so far: seconds blocked on collectives (and on the decision's
    broadcast) and in ``begin``, the link bytes and ring message steps of the collectives it
    started, and its exchange rounds. Cleared when a step starts."""

    world_size: int
    wait_s: float = 0.0
    begin_s: float = 0.0
    link_bytes: float = 0.0
    rounds: int = 0
    link_steps: int = 0

    def clear(self, world_size: int) -> None:
        self.world_size = world_size
        self.wait_s = self.begin_s = self.link_bytes = 0.0
        self.rounds = self.link_steps = 0

    def started(self, exchange: C.Exchange | None, payload_bytes: float) -> None:
        """A collective this rank started (``None``: the decision's broadcast, whose few
        bytes are not counted)."""
        if exchange is not None:
            self.link_bytes += link_bytes(exchange, payload_bytes, self.world_size)
        self.link_steps += link_steps(exchange, self.world_size)

    def waiting(self) -> contextlib.AbstractContextManager[None]:
        """Time inside counts as blocked on a collective."""
        return timing(self._waited)

    def _waited(self, seconds: float) -> None:
        self.wait_s += seconds


@contextlib.contextmanager
def timing(add: Callable[[float], None]) -> Iterator[None]:
    """Hands ``add`` the seconds spent inside."""
    start = time.perf_counter()
    try:
        yield
    finally:
        add(time.perf_counter() - start)


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


def ladder_link_bytes(compressor: C.Compressor, shapes: dict[str, torch.Size],
                      uncompressed: frozenset[str], ladder: Sequence[float],
                      world_size: int) -> dict[float, float]:
    """Per CF of ``ladder``, the link bytes of a whole step that sends every compressed
    tensor at it (the uncompressed ones dense)."""
    return {cf: sum(tensor_link_bytes(compressor, shape, cf, world_size,
                                      dense=name in uncompressed)
                    for name, shape in shapes.items()) for cf in ladder}
