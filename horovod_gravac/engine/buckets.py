"""The fused messages of a step: each bucket's round leaves as one collective per kind —
one allreduce (sum) per payload dtype for everything of fixed size (dense tensors, fp16,
RandomK, every PowerSGD P), one allgather for the per-rank payloads (sparsifiers' indices,
quantizers' scales), one alltoall for payloads of a row per rank (a two-stage exchange's
chunks) — and comes back as each tensor's next payload or averaged gradient.

The agent's statistics ride at the end of the *carrier*'s first message (the bucket of the
model's first tensor, which backprop reaches last) and are summed over ranks there.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor

from .. import compression as C
from ..transport import Handle, Transport, align, pack, pack_rows, unpack, unpack_rows
from .accounting import CommunicationStats, StepCounters
from .config import BucketLayout
from .encoding import Ticket


@dataclass
class Message:
    """One fused collective of a bucket round: a sum (one dtype), the gather or the alltoall."""

    handle: Handle
    tickets: list[Ticket]
    kind: C.Exchange
    stats: int = 0  # floats of statistics at the end
    #: gather of one size on every rank: elements per tensor; alltoall: elements per row
    counts: list[int] | None = None
    dtypes: list[torch.dtype] = field(default_factory=list)


class Bucket:
    """The tensors of one bucket in the step in flight, and the messages of its rounds."""

    def __init__(self, index: int, names: tuple[str, ...]) -> None:
        self.index, self.names = index, names
        self.tickets: dict[str, Ticket] = {}
        self.arrived: set[str] = set()
        self.rounds: list[list[Message]] = []  # per launched round

    @property
    def complete(self) -> bool:
        return len(self.arrived) == len(self.names)

    def reset(self) -> None:
        self.tickets, self.arrived, self.rounds = {}, set(), []


@dataclass
class SparseMessage:
    """A torch sparse gradient's own allreduce (Horovod's)."""

    name: str
    handle: Handle
    result: Tensor | None = None


class BucketExchange:
    """Every bucket's messages for one rank: launched as buckets complete, received in the
    layout's order, the same on every rank.

    Arguments:
        layout: the buckets.
        transport: the collectives.
        label: unique prefix of this engine's collective names.
        average: average over ranks (or sum).
        predivide: Horovod's ``gradient_predivide_factor``.
        communication: where the bytes are recorded.
        counters: this step's waits, rounds and link traffic.
        carrier: the tensor whose bucket carries the agent's statistics (the model's first,
            which backprop reaches last), or None.
    """

    def __init__(self, layout: BucketLayout, transport: Transport, label: str, average: bool,
                 predivide: float, communication: CommunicationStats,
                 counters: StepCounters, carrier: str | None) -> None:
        self.transport, self.label = transport, label
        self.average, self.predivide = average, predivide
        self.communication, self.counters = communication, counters
        self.buckets = [Bucket(i, names) for i, names in enumerate(layout.buckets)]
        self.bucket_of = {n: b for b in self.buckets for n in b.names}
        self.carrier = self.bucket_of[carrier] if carrier is not None else None
        self.sparse: list[SparseMessage] = []
        #: per message, whether the averaged gradients are finite (0-dim tensors)
        self.flags: list[Tensor] = []
        #: the agent's statistics summed over ranks (once the carrier is back)
        self.stats: list[Tensor] = []

    def reset(self) -> None:
        for bucket in self.buckets:
            bucket.reset()
        self.sparse, self.flags, self.stats = [], [], []

    def tickets(self) -> Iterator[Ticket]:
        return (t for b in self.buckets for t in b.tickets.values())

    def arrive(self, name: str) -> Bucket:
        bucket = self.bucket_of[name]
        bucket.arrived.add(name)
        return bucket

    def ready(self, bucket: Bucket, all_begun: bool, measures: bool) -> list[Bucket]:
        """The buckets to launch now that a tensor of ``bucket`` joined: ``bucket`` once
        complete, and the carrier — which waits for every tensor when it carries
        statistics."""
        carrier = self.carrier
        out = []
        if bucket.complete and not bucket.rounds and \
                (bucket is not carrier or not measures or all_begun):
            out.append(bucket)
        if carrier is not bucket and carrier.complete and not carrier.rounds and all_begun:
            out.append(carrier)
        return out

    def launch_sparse(self, name: str, grad: Tensor) -> None:
        """A torch sparse gradient: uncompressed, through the transport's sparse allreduce."""
        handle = self.transport.sparse_allreduce(grad, f"{self.label}.sparse.{name}",
                                                 self.average)
        nbytes = C.wire_bytes((grad._indices(), grad._values()))
        self.communication.record(name, nbytes, grad.numel())
        self.counters.started(C.Exchange.ALLGATHER, nbytes)
        self.counters.rounds += 1
        self.sparse.append(SparseMessage(name, handle))

    def launch(self, bucket: Bucket, rnd: int, stats: Tensor | None = None) -> None:
        """Start the fused collectives of ``bucket``'s round ``rnd`` (``stats`` at the end of
        its first float32 sum, or of its gather)."""
        active = [bucket.tickets[n] for n in bucket.names
                  if n in bucket.tickets and bucket.tickets[n].ctx.rounds > rnd]
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
        label = f"{self.label}.b{bucket.index}.r{rnd}"
        if stats is not None and torch.float32 not in sums and not gathers:
            sums[torch.float32] = []  # nothing to ride on: the statistics alone
        messages = []
        for dtype, tickets in sums.items():
            carried = stats if dtype == torch.float32 else None
            messages.append(self._sum(tickets, carried, f"{label}.sum.{dtype}"))
            stats = None if carried is not None else stats
        if gathers:
            messages.append(self._gather(gathers, stats, f"{label}.gather"))
        if scatters:
            messages.append(self._scatter(scatters, f"{label}.alltoall"))
        bucket.rounds.append(messages)
        self.counters.rounds += bool(messages)

    def _sum(self, tickets: list[Ticket], stats: Tensor | None, name: str) -> Message:
        # summed in place: payloads are fresh tensors, or the gradient itself (as Horovod)
        parts = [t.payload[0] for t in tickets]
        if parts and self.predivide != 1.0:
            torch._foreach_mul_(parts, 1.0 / self.predivide)
        carried = 0
        if stats is not None:
            parts.append(stats)
            carried = stats.numel()
        for t in tickets:
            self.communication.record(t.name, C.wire_bytes(t.payload))
        self.communication.record(None, 4 * carried)
        self.counters.started(C.Exchange.ALLREDUCE, sum(C.wire_bytes((p,)) for p in parts))
        return Message(self.transport.allreduce(parts, name), tickets, C.Exchange.ALLREDUCE,
                       stats=carried)

    def _gather(self, tickets: list[Ticket], stats: Tensor | None, name: str) -> Message:
        tensors = [x for t in tickets for x in t.payload]
        carried = 0
        if stats is not None:
            tensors.append(stats)
            carried = stats.numel()
        varying = any(t.ctx.varying_size for t in tickets)
        buffer = pack(tensors, header=varying)
        payload_bytes = 0
        for t in tickets:
            nbytes = sum(align(x.numel() * x.element_size()) for x in t.payload)
            self.communication.record(t.name, nbytes)
            payload_bytes += nbytes
        self.communication.record(None, buffer.numel() - payload_bytes)
        self.counters.started(C.Exchange.ALLGATHER, buffer.numel())
        return Message(self.transport.allgather(buffer, name, same_size=not varying), tickets,
                       C.Exchange.ALLGATHER, stats=carried, dtypes=[x.dtype for x in tensors],
                       counts=None if varying else [x.numel() for x in tensors])

    def _scatter(self, tickets: list[Ticket], name: str) -> Message:
        """One row per rank: row j of every payload tensor to rank j."""
        size = self.transport.size
        tensors = [x for t in tickets for x in t.payload]
        buffer = pack_rows(tensors, size)
        for t in tickets:
            self.communication.record(t.name, sum(
                size * align(x.numel() // size * x.element_size()) for x in t.payload))
        self.counters.started(C.Exchange.ALLTOALL, buffer.numel())
        return Message(self.transport.alltoall(buffer, name), tickets, C.Exchange.ALLTOALL,
                       dtypes=[x.dtype for x in tensors],
                       counts=[x.numel() // size for x in tensors])

    def complete_step(self, destination: Callable[[str], Tensor | None]) -> None:
        """Once every bucket's first round has left: the later rounds bucket by bucket in the
        layout's order (each bucket's next round leaves as soon as its previous one is back),
        and everything received; decoded gradients go into ``destination(name)`` where
        given."""
        rounds = max((t.ctx.rounds for t in self.tickets()), default=1)
        for rnd in range(1, rounds):
            for bucket in self.buckets:
                if any(t.ctx.rounds > rnd for t in bucket.tickets.values()):
                    self._receive(bucket, rnd - 1, destination)
                    self.launch(bucket, rnd)
        for bucket in self.buckets:
            self._receive(bucket, len(bucket.rounds) - 1, destination)
        for sparse in self.sparse:
            with self.counters.waiting():
                sparse.result = sparse.handle.wait()
            self.flags.append(C.is_finite(sparse.result.coalesce()._values()))

    def _receive(self, bucket: Bucket, rnd: int,
                 destination: Callable[[str], Tensor | None]) -> None:
        """Wait for ``bucket``'s round ``rnd``; advance its tensors (next payload or result)."""
        average = 1.0 / self.transport.size if self.average else 1.0
        for message in bucket.rounds[rnd]:
            with self.counters.waiting():
                result = message.handle.wait()
            if message.kind is C.Exchange.ALLTOALL:  # every rank's row for this rank
                received = unpack_rows(result, message.dtypes, message.counts)
                offset = 0
                for t in message.tickets:
                    k = len(t.payload)
                    t.advance(tuple(received[offset:offset + k]), destination(t.name))
                    offset += k
            elif message.kind is C.Exchange.ALLREDUCE:  # the payloads themselves, summed
                if message.stats:
                    self.stats.append(result[-1])
                reduced = result[:len(message.tickets)]
                if reduced:
                    self.flags.append(C.scale_and_check(reduced, average * self.predivide))
                for t, tensor in zip(message.tickets, reduced):
                    t.advance((tensor,), destination(t.name))
            else:
                self._aggregate_gathered(message, result, average, destination)

    def _aggregate_gathered(self, message: Message, result: list[Tensor], average: float,
                            destination: Callable[[str], Tensor | None]) -> None:
        per_rank = [unpack(part, message.dtypes, message.counts)[0] for part in result]
        if message.stats:
            self.stats.append(torch.stack([p[-1] for p in per_rank]).sum(0))
        offset = 0
        for t in message.tickets:
            k = len(t.payload)
            payloads = [tuple(p[offset:offset + k]) for p in per_rank]
            offset += k
            t.result = t.compressor.aggregate(payloads, t.ctx, out=destination(t.name))
        if message.tickets:  # the sums averaged and checked in one pass
            self.flags.append(C.scale_and_check([t.result for t in message.tickets], average))

    def results(self) -> dict[str, Tensor]:
        """Every tensor's averaged gradient by name."""
        out = {t.name: t.result for t in self.tickets()}
        out.update({s.name: s.result for s in self.sparse})
        return out
