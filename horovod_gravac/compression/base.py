"""The compression API: ``compress(tensor) -> (payload, ctx)``, ``decompress(payload, ctx)``.

Pure torch, no collectives. A *payload* is the tuple of tensors a rank puts on the wire; a
*ctx* is what stays local to rebuild the tensor (shape, dtype, indices a peer need not see)
and says how the payload must be exchanged (:class:`Exchange`) and in how many rounds
(``ctx.rounds``). The engine reads only those two and never needs to know which compressor it
is moving: a tensor of several rounds (PowerSGD: P, then Q from the reduced P) gets each next
payload from :meth:`Compressor.next_round`.

The compression factor (CF) is the paper's unit: original size / size sent, so CF 100 keeps 1%
of a sparsified tensor. :func:`num_selected` is the one place CF becomes an element count.
"""
from __future__ import annotations

import enum
import zlib
from dataclasses import dataclass, field
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor

from ..validation import check_number

Payload = tuple[Tensor, ...]


class Exchange(enum.Enum):
    """How a payload travels between ranks."""

    ALLREDUCE = "allreduce"  # same shape on every rank and summable: summed over ranks
    ALLGATHER = "allgather"  # per-rank sizes or scales differ: gather all, then ``aggregate``
    #: one row per rank: every tensor of the payload has a leading dimension of N (the world
    #: size), row j goes to rank j; each rank receives tensors of the same shapes whose row i
    #: came from rank i (the first round of a two-stage exchange, ``twostage``)
    ALLTOALL = "alltoall"


@dataclass
class Ctx:
    """What a rank keeps to decompress its own or its peers' payloads."""

    shape: torch.Size
    dtype: torch.dtype
    #: how this round's payload travels; ``next_round`` may set the next round's (a two-stage
    #: exchange: ALLTOALL, then ALLGATHER)
    exchange: Exchange
    extra: dict[str, Any] = field(default_factory=dict)
    #: True when the payload's size depends on the data (thresholds), so ranks' sizes differ;
    #: False when it depends only on the shape and CF, the same on every rank
    varying_size: bool = False
    #: exchange rounds of this tensor (PowerSGD's matrices: 2, P then Q); the engine asks
    #: ``next_round`` for each payload after the first
    rounds: int = 1

    @property
    def numel(self) -> int:
        return self.shape.numel()


#: every tensor of a packed message starts at a multiple of this many bytes (``transport``)
WIRE_ALIGN = 8


def align(nbytes: int) -> int:
    """``nbytes`` rounded up to the alignment every packed tensor starts at."""
    return nbytes + (-nbytes) % WIRE_ALIGN


def wire_bytes(payload: Payload) -> int:
    """Exact bytes the payload puts on the wire."""
    return sum(t.numel() * t.element_size() for t in payload)


def num_selected(numel: int, cf: float) -> int:
    """Elements a sparsifier keeps at compression factor ``cf``: k = max(1, ⌊n / cf⌋)."""
    return max(1, int(numel // cf)) if numel else 0


def validate_cf(cf: Any) -> float:
    """CF ≥ 1 as a float, or a ValueError that says what is allowed."""
    return check_number("cf (compression factor; CF 100 keeps 1%)", cf, 1.0)


#: Device types whose values the host reads without waiting for queued work. On the others
#: (CUDA, …) compressors take paths whose output sizes do not depend on the data, so that
#: nothing in the backward hooks blocks the host (no ``.item()``, ``nonzero``, ``bool(t)``).
HOST_DEVICES = frozenset({"cpu"})


def sizes_may_depend_on_data(where: Tensor | torch.device) -> bool:
    """True on devices where data-dependent output sizes cost no host sync (the CPU)."""
    device = where.device if isinstance(where, Tensor) else torch.device(where)
    return device.type in HOST_DEVICES


def is_finite(tensor: Tensor) -> Tensor:
    """A 0-dim bool tensor: ``tensor`` holds no NaN/Inf. Nothing is read back to the host.

    The extremes carry every NaN (``aminmax`` propagates it) and every ±Inf; one reduction
    pass is ~10x cheaper than ``torch.isfinite(tensor).all()``, which writes a bool per element.
    """
    if tensor.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=tensor.device)
    return torch.isfinite(torch.stack(torch.aminmax(tensor))).all()


def write_into(out: Tensor, tensor: Tensor) -> Tensor:
    """``tensor``'s values in ``out`` (no copy when it is ``out`` already); returns ``out``."""
    if tensor.data_ptr() != out.data_ptr() or tensor.shape != out.shape:
        out.copy_(tensor.view_as(out))
    return out


def scale_and_check(tensors: list[Tensor], scale: float) -> Tensor:
    """Multiply ``tensors`` (floating, on one device) by ``scale`` in place; a 0-dim bool
    tensor: all were finite. One fused pass over them all (the kernel ``GradScaler``
    unscales with), nothing read back to the host."""
    found = torch.zeros(1, device=tensors[0].device)
    torch._amp_foreach_non_finite_check_and_unscale_(
        tensors, found, torch.full((1,), scale, device=found.device))
    return found[0] == 0


def payload_is_finite(payload: Payload) -> Tensor:
    """A 0-dim bool tensor: the payload's floating tensors hold no NaN/Inf (its values,
    scales or finiteness markers: every compressor keeps a bad gradient visible there)."""
    flags = [is_finite(t) for t in payload if t.is_floating_point()]
    return torch.stack(flags).all() if flags else torch.ones((), dtype=torch.bool,
                                                              device=payload[0].device)


def finite_marker(tensor: Tensor) -> Tensor:
    """A float32 scalar: 0 if ``tensor`` is all finite, NaN otherwise.

    Sent beside payloads that would otherwise turn NaN/Inf into finite-looking values (sign
    bits, random samples); decompression adds it, so a bad gradient stays visibly bad.
    """
    return (torch.sum(tensor, dtype=torch.float64) * 0).to(torch.float32).reshape(1)


def stable_seed(*parts: Any) -> int:
    """A seed from ``parts`` that is the same in every process (``hash`` is salted per run)."""
    return zlib.crc32(repr(parts).encode()) & 0x7FFF_FFFF


class Compressor:
    """Base class of all compressors.

    Subclasses set ``name`` (the registry key), ``exchange``, ``default_memory`` and
    implement ``compress``/``decompress``. ``aggregate`` turns every rank's payload into the
    *sum* over ranks of the decompressed tensors (what allreduce(Sum) would give); override
    it where plain summation is wrong (majority vote) or can be done cheaper.
    """

    name: ClassVar[str] = ""
    exchange: ClassVar[Exchange] = Exchange.ALLREDUCE
    default_memory: ClassVar[str] = "residual"
    #: True when the CF is a free parameter (sparsifiers); quantizers have a fixed one.
    adjustable_cf: ClassVar[bool] = False
    #: CF a float32 tensor gets; for adjustable compressors, the current setting.
    nominal_cf: ClassVar[float] = 1.0
    #: True when ``state_dict()`` is the same on every rank (PowerSGD's allreduced Q), so a
    #: joining rank may take rank 0's; False when it is per rank (Signum's local momentum).
    state_is_shared: ClassVar[bool] = False
    #: True when the averaged gradient is near enough to dense for Adam's second moment
    #: (identity, fp16): Adam/AdamW then need no Adam-family exchange (``horovod_gravac.adam``)
    preserves_adam: ClassVar[bool] = False
    #: this process's rank and the number of ranks that exchange, which the engine driving
    #: the compressor sets (:meth:`bind`) when it is made and at the start of every step
    process_rank: int = 0
    world_size: int = 1

    def __init__(self, cf: float | None = None) -> None:
        self._cf = self.nominal_cf
        if cf is not None:
            self.cf = cf

    def bind(self, rank: int, size: int) -> None:
        """The compressor works for rank ``rank`` of ``size`` ranks from now on (stochastic
        rounding keyed by the rank; a two-stage exchange's chunks and the chunk it owns)."""
        self.process_rank, self.world_size = rank, size

    @property
    def cf(self) -> float:
        """The compression factor (CF 100 = 1% of the elements)."""
        return self._cf

    @cf.setter
    def cf(self, value: float) -> None:
        value = validate_cf(value)
        if not self.adjustable_cf and value != self.nominal_cf:
            raise ValueError(f"compressor {self.name!r} has a fixed compression factor "
                             f"({self.nominal_cf:g}); it cannot be set to {value:g}")
        self._cf = value

    # -- the API ------------------------------------------------------------------------
    def compress(self, tensor: Tensor, name: str = "", step: int = 0) -> tuple[Payload, Ctx]:
        """Compress ``tensor``; ``name`` and ``step`` seed shared randomness and keep state.

        Compressors with an adjustable CF (sparsifiers) also take ``cf=``: the CF of this call
        (default: ``self.cf``), so a CF decided per step or per layer is an argument, never a
        change of the compressor's state.
        """
        raise NotImplementedError

    def decompress(self, payload: Payload, ctx: Ctx) -> Tensor:
        """A tensor of ``ctx.shape`` and ``ctx.dtype`` from one rank's payload."""
        raise NotImplementedError

    def aggregate(self, payloads: Sequence[Payload], ctx: Ctx,
                  out: Tensor | None = None) -> Tensor:
        """Sum over ranks of the decompressed payloads (gathered in rank order; one summed
        payload: its decompression), written into ``out`` (ctx's shape and dtype) if given."""
        total = self.decompress(payloads[0], ctx)
        if out is not None:
            total = write_into(out, total)
        elif len(payloads) > 1:
            total = total.clone()
        for p in payloads[1:]:
            total += self.decompress(p, ctx).view_as(total)
        return total

    def next_round(self, reduced: Payload, ctx: Ctx) -> Payload:
        """The payload of this tensor's next round, from the payload of the round just done
        summed over ranks (``reduced``). Called ``ctx.rounds − 1`` times, after which the last
        round's reduced payload goes to :meth:`aggregate`; one-round compressors never see it.
        """
        raise NotImplementedError(f"{self.name!r} exchanges in one round")

    def sent_norm_sq(self, payload: Payload, ctx: Ctx) -> Tensor:
        """‖decompress(payload)‖² as a 0-dim float tensor (GraVAC's compression gain)."""
        return self.decompress(payload, ctx).float().pow(2).sum()

    def energy_profile(self, tensor: Tensor, cfs: Sequence[float], name: str = "",
                       step: int = 0, sample: int | None = None) -> Tensor:
        """‖C(tensor, cf)‖² for each CF of the ascending ``cfs`` (GraVAC's gain numerators).

        Exact here, by multi-level compression: C(tensor, cfs[0]), then each higher CF within
        that selection (:meth:`recompress`). Compressors that can estimate it cheaply from at
        most ``sample`` elements override this (sparsifiers, PowerSGD); ``sample=None`` asks
        for the exact value.
        """
        payload, ctx = self.compress(tensor, name, step, cf=cfs[0])
        levels = [(payload, ctx)] + [self.recompress(payload, ctx, cf) for cf in cfs[1:]]
        return torch.stack([self.sent_norm_sq(*level).float() for level in levels])

    def settled_energy_profile(self, tensor: Tensor, cfs: Sequence[float], name: str = "",
                               step: int = 0, sample: int | None = None) -> Tensor:
        """:meth:`energy_profile` as it will be once this compressor has been sent for a
        while — the gain of a candidate not sent yet. The same for a compressor whose
        compression does not depend on its past (here); a warm-started one overrides it
        (PowerSGD)."""
        return self.energy_profile(tensor, cfs, name, step, sample=sample)

    def error_profile(self, tensor: Tensor, cfs: Sequence[float], name: str = "",
                      step: int = 0, sample: int | None = None) -> Tensor:
        """‖tensor − C(tensor, cf)‖² for each CF of the ascending ``cfs`` (a layer plan's
        compression errors, :class:`~horovod_gravac.agents.LayerPlan`).

        Exact here, one compression per CF (one-round compressors). Compressors whose C is an
        orthogonal projection take it from :meth:`energy_profile` instead
        (:meth:`projection_errors`: sparsifiers, PowerSGD), on ``sample`` elements.
        """
        errors = []
        for cf in cfs:
            payload, ctx = self.compress(tensor, name, step,
                                         **({"cf": cf} if self.adjustable_cf else {}))
            if ctx.rounds != 1:
                raise NotImplementedError(f"{self.name!r} exchanges in {ctx.rounds} rounds: "
                                          "override error_profile")
            approx = self.decompress(payload, ctx).reshape(tensor.shape)
            errors.append(torch.linalg.vector_norm(tensor.float() - approx.float()).square())
        return torch.stack(errors)

    def settled_error_profile(self, tensor: Tensor, cfs: Sequence[float], name: str = "",
                              step: int = 0, sample: int | None = None) -> Tensor:
        """:meth:`error_profile` as it will be once this compressor has been sent for a
        while (see :meth:`settled_energy_profile`): the same here; PowerSGD overrides it."""
        return self.error_profile(tensor, cfs, name, step, sample=sample)

    def projection_errors(self, tensor: Tensor, cfs: Sequence[float], name: str = "",
                          step: int = 0, sample: int | None = None,
                          settled: bool = False) -> Tensor:
        """:meth:`error_profile` where C(x) is an orthogonal projection of x (a sparsifier
        keeps some coordinates; PowerSGD projects onto the span of P̂): then
        ‖x − C(x)‖² = ‖x‖² − ‖C(x)‖², so the errors cost what the energies cost (the
        ``settled`` ones: :meth:`settled_energy_profile`'s)."""
        total = torch.linalg.vector_norm(tensor, dtype=torch.float32).square()
        profile = self.settled_energy_profile if settled else self.energy_profile
        energies = profile(tensor, cfs, name, step, sample=sample).float()
        return (total - energies).clamp_min(0)

    def expected_bytes(self, shape: torch.Size, cf: float | None = None) -> tuple[int, Exchange]:
        """(bytes this rank sends over all rounds for a float32 tensor of ``shape`` at ``cf``,
        how they travel), from the shape alone: what the cost model prices an untried CF by."""
        return int(shape.numel() * 4 / self.nominal_cf), self.exchange

    def expected_rounds(self, shape: torch.Size,
                        cf: float | None = None) -> tuple[tuple[int, Exchange], ...]:
        """Per exchange round, (bytes this rank hands the collective, how they travel), for
        a float32 tensor of ``shape`` at ``cf``: what the engine prices link bytes from. One
        entry of :meth:`expected_bytes` unless the rounds travel differently (a two-stage
        exchange: an alltoall, then an allgather)."""
        return (self.expected_bytes(shape, cf),)

    def error(self, compensated: Tensor, payload: Payload, ctx: Ctx) -> Tensor:
        """``compensated − decompress(payload)``: the error-feedback residual.

        May reuse ``compensated``'s storage (the memory owns it) unless the payload aliases
        it; sparsifiers override this to zero the sent positions in place instead of
        materialising a dense tensor.
        """
        return compensated.sub_(self.decompress(payload, ctx).reshape(compensated.shape))

    def recompress(self, payload: Payload, ctx: Ctx, cf: float) -> tuple[Payload, Ctx]:
        """Compress an already compressed tensor further, to total CF ``cf`` (multi-level).

        The default decompresses and compresses again at ``cf``; sparsifiers select within
        the values they kept, which is what makes GraVAC's C(C(g, θmin), θs) cheap.
        """
        return self.compress(self.decompress(payload, ctx), cf=cf)

    def state_dict(self) -> dict[str, Any]:
        """Compressor state that must survive a restart (e.g. PowerSGD's Q, Signum's
        momentum, a two-stage exchange's chunk-owner residuals)."""
        return {"cf": self._cf}

    def rescale(self, factor: float) -> None:
        """Multiply the residuals the compressor keeps (a two-stage exchange's chunk-owner
        residuals) by ``factor``, as :meth:`Memory.rescale` does the memory's: the
        gradients' units changed (a mixed precision loss scale)."""

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._cf = state.get("cf", self._cf)

    def scratch(self, like: Tensor, dtype: torch.dtype, slot: int = 0,
                numel: int | None = None) -> Tensor:
        """A flat buffer of ``like``'s size for intermediate results, reused from call to
        call (compressions run one after another; never for a payload, which lives until
        its bucket leaves): a fresh gradient-sized tensor per call costs page faults that
        dominate on the CPU. ``numel``: another size than ``like``'s. Not part of the state
        (dropped when pickled)."""
        numel = like.numel() if numel is None else numel
        buffers = self.__dict__.setdefault("_buffers", {})
        key = (dtype, like.device, slot)
        buffer = buffers.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = buffers[key] = torch.empty(numel, dtype=dtype, device=like.device)
        return buffer[:numel]

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "_buffers"}

    def __repr__(self) -> str:
        cf = f"cf={self.cf:g}" if self.adjustable_cf else f"nominal_cf={self.nominal_cf:g}"
        return f"{type(self).__name__}({cf})"


class SeededCompressor(Compressor):
    """A compressor that draws random numbers from its own generators, never the global RNG.

    ``seed`` fixes the stream; draws are keyed by (seed, name, step[, rank]) so a
    restarted job sees the same randomness at the same step. Draws that every rank must
    share (RandomK's positions) leave the rank out; draws meant to be independent across
    ranks (stochastic rounding, whose noise then averages out over N ranks) include
    ``process_rank``, which the engine driving this compressor sets to its process's rank.
    """

    def __init__(self, cf: float | None = None, seed: int = 0) -> None:
        super().__init__(cf)
        self.seed = check_number("seed", seed, integer=True)
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device, *key: Any) -> torch.Generator:
        """The generator for ``device``, reseeded from ``(seed, *key)``."""
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        gen.manual_seed(stable_seed(self.seed, *key))
        return gen
