"""The agent interface: statistics in, a decision for the next step out. No tensors here.

An agent tells the engine what to measure (:class:`ProbeSpec`, or None); the engine measures
it on each rank, sums it over ranks inside the step's last fused collective (no collective of
its own), and hands the agent on rank 0 the :class:`StepStats`. The returned
:class:`Decision` is broadcast without blocking and every rank applies it from the next step
on (the broadcast is waited for where that step first needs it). Agents are deterministic
functions of the statistics they saw, and their state is in ``state_dict()``, so a resumed
job continues the same schedule.
"""
from __future__ import annotations

import copy
from collections import deque
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .costmodel import Traffic

#: how many recent steps ``Agent.history`` and ``DistributedOptimizer.decisions`` keep: a job
#: that runs for days must not grow without bound (write the stream out, as gravac-train does)
RECENT_STEPS = 10_000

SEND_COMPRESSED, SEND_MIN, SEND_DENSE = "compressed", "min", "dense"
SEND_CHOICES = (SEND_COMPRESSED, SEND_MIN, SEND_DENSE)


@dataclass(frozen=True)
class Decision:
    """What every rank does at the next step.

    ``cf`` is the CF of the compressed level (GraVAC: θmin·θs; None: the compressor's own
    setting); ``theta_min`` the first level of multi-level compression; ``send`` which of the
    two levels (or dense) goes on the wire; ``layer_cf`` per-layer overrides (Accordion's
    per-layer mode, a layer plan); ``measure_gain`` whether the optimizer measures the
    compression gain at that step (GraVAC's ``gain_interval``), ``measure_errors`` whether it
    measures a layer plan's compression errors (:class:`ErrorSpec`); ``variance_frozen``
    whether the Adam-family exchange is past its warm-up (:class:`~.phases.AdamPhases`):
    Adam's second moment is frozen and the preconditioned momentum is exchanged. ``codec``:
    which of a set of candidates compresses every tensor (its index in
    :class:`~horovod_gravac.compression.Candidates`; :class:`~.choice.CodecChoice`), at the
    candidate's own setting; None: the compressor at ``cf``. ``layer_codec``: per-tensor
    overrides of ``codec`` (a layer plan over a codec choice).
    """

    cf: float | None
    theta_min: float | None = None
    send: str = SEND_COMPRESSED
    layer_cf: dict[str, float] | None = None
    measure_gain: bool = True
    measure_errors: bool = False
    variance_frozen: bool = False
    codec: int | None = None
    layer_codec: dict[str, int] | None = None

    @property
    def sent_cf(self) -> float | None:
        """The CF of what goes on the wire: the compressed level, θmin, or 1 (dense); None:
        the compressor's own setting."""
        return {SEND_COMPRESSED: self.cf, SEND_MIN: self.theta_min, SEND_DENSE: 1.0}[self.send]

    def cf_for(self, name: str) -> float | None:
        """The compressed level's CF for tensor ``name`` (per-tensor override or ``cf``)."""
        return self.layer_cf.get(name, self.cf) if self.layer_cf else self.cf

    def codec_for(self, name: str) -> int | None:
        """The candidate that compresses tensor ``name`` (per-tensor override or ``codec``)."""
        return self.layer_codec.get(name, self.codec) if self.layer_codec else self.codec

    def sent_cf_for(self, name: str) -> float | None:
        """The CF tensor ``name`` is sent at: its compressed level, θmin, or 1 (dense)."""
        if self.send == SEND_COMPRESSED:
            return self.cf_for(name)
        return self.theta_min if self.send == SEND_MIN else 1.0

    # A fixed-length vector of floats, so the decision travels as one small broadcast
    # (no pickling, no size exchange):
    # [cf, θmin, send, measure_gain, measure_errors, variance_frozen, codec, has layer_cf,
    #  has layer_codec, per layer its CF, per layer its codec].
    @staticmethod
    def encoded_length(layers: list[str]) -> int:
        return 9 + 2 * len(layers)

    def encode(self, layers: list[str]) -> list[float]:
        """This decision as ``encoded_length(layers)`` floats; NaN marks "not set"."""
        nan = float("nan")
        cfs, codecs = self.layer_cf or {}, self.layer_codec or {}
        for field_name, overrides in (("layer_cf", cfs), ("layer_codec", codecs)):
            unknown = set(overrides) - set(layers)
            if unknown:
                raise ValueError(f"{field_name} names unknown tensors: {sorted(unknown)}")
        return [nan if self.cf is None else float(self.cf),
                nan if self.theta_min is None else float(self.theta_min),
                float(SEND_CHOICES.index(self.send)), float(self.measure_gain),
                float(self.measure_errors), float(self.variance_frozen),
                nan if self.codec is None else float(self.codec),
                float(self.layer_cf is not None), float(self.layer_codec is not None),
                *(float(cfs.get(name, nan)) for name in layers),
                *(float(codecs.get(name, nan)) for name in layers)]

    @classmethod
    def decode(cls, values: list[float], layers: list[str]) -> "Decision":
        """The decision :meth:`encode` turned into ``values``."""
        cf, theta_min, send, measure_gain, measure_errors, frozen, codec, has_layer_cf, \
            has_layer_codec = values[:9]
        n = len(layers)
        layer_cf = {name: v for name, v in zip(layers, values[9:9 + n]) if v == v} \
            if has_layer_cf else None
        layer_codec = {name: int(v) for name, v in zip(layers, values[9 + n:]) if v == v} \
            if has_layer_codec else None
        return cls(cf=None if cf != cf else cf,
                   theta_min=None if theta_min != theta_min else theta_min,
                   send=SEND_CHOICES[int(send)], layer_cf=layer_cf,
                   measure_gain=bool(measure_gain), measure_errors=bool(measure_errors),
                   variance_frozen=bool(frozen), codec=None if codec != codec else int(codec),
                   layer_codec=layer_codec)


GRADIENT, COMPENSATED = "gradient", "compensated"


@dataclass(frozen=True)
class GainMeasure:
    """What the optimizer measures for a compression gain; the agent smooths and divides.

    Per layer, x is the fresh gradient g (``GRADIENT``) or the error-fed g_o = g + residual
    (``COMPENSATED``). ``compressed`` names the x whose compressions C(x, θmin) and
    C(C(x, θmin), θs) are measured, ``reference`` the x of the denominator, ``power`` 2 sums
    squared L2 norms (energies) and 1 sums L2 norms over layers. Measuring never changes what
    is sent: that stays C(g_o) with error feedback.
    """

    compressed: str
    reference: str
    power: int


@dataclass(frozen=True)
class ProbeSpec:
    """What the engine measures for an agent's gain, at the steps its decision marks
    (``Decision.measure_gain``): per tensor x (see :class:`GainMeasure`), ‖x_ref‖^p and
    ‖C(x, c)‖^p for each CF c — the decision's (θmin, cf), or a fixed ``ladder`` of CFs.

    ``sample`` bounds the elements a compressor may estimate each energy from (None: exact, by
    multi-level compression within the lowest CF's selection, as the paper defines it).
    ``per_codec``: instead of CFs, ‖C_k(x)‖² for every candidate k of a set
    (:class:`~horovod_gravac.compression.Candidates`), each at its own setting.
    The terms, summed over tensors, travel as one float vector of :meth:`width` values
    (:meth:`decode`), summed over ranks.
    """

    measure: GainMeasure
    ladder: tuple[float, ...] = ()
    sample: int | None = None
    per_codec: bool = False

    def cfs(self, decision: Decision) -> tuple[float, ...]:
        """The CFs measured under ``decision``, ascending."""
        if self.ladder:
            return self.ladder
        low = decision.theta_min if decision.theta_min is not None else decision.cf
        return (min(low, decision.cf), decision.cf)

    def width(self, codecs: int = 0) -> int:
        """Terms per row: the reference, then one per CF measured (or per one of ``codecs``
        candidates)."""
        return 1 + (codecs if self.per_codec else len(self.ladder) or 2)

    def decode(self, values: list[float]) -> dict[str, Any]:
        """The terms summed over tensors and ranks as :class:`StepStats` fields."""
        if self.per_codec:
            return {"gain_reference": values[0], "gain_codecs": dict(enumerate(values[1:]))}
        if not self.ladder:
            return {"gain_reference": values[0], "gain_min": values[1],
                    "gain_compressed": values[2]}
        return {"gain_reference": values[0], "gain_ladder": dict(zip(self.ladder, values[1:]))}


@dataclass(frozen=True)
class ErrorSpec:
    """What the engine measures for a layer plan, at the steps its decision marks
    (``Decision.measure_errors``): per compressed tensor, on this rank's error-fed tensor
    x = g + residual, ‖x‖² and the compression error ‖x − C(x, c)‖² for each candidate CF
    c = factor × the decision's CF (the compressor's ``error_profile``, estimated from
    ``sample`` elements a step shared among the tensors by size; None: exact) — or, with
    ``codecs`` > 0, for each of that many candidates of a set, at its own setting
    (:meth:`~horovod_gravac.compression.Candidates.errors`). One row per tensor, summed over
    ranks; only the marked steps carry it.
    """

    factors: tuple[float, ...] = ()
    sample: int | None = None
    codecs: int = 0

    def cfs(self, cf: float) -> tuple[float, ...]:
        """The candidate CFs around the uniform ``cf``, ascending (none below 1)."""
        return tuple(max(1.0, cf * f) for f in self.factors)

    @property
    def width(self) -> int:
        """Terms per row: ‖x‖², then one error per candidate."""
        return 1 + (self.codecs or len(self.factors))

    def decode(self, values: list[float], names: list[str]) -> dict[str, tuple[float, ...]]:
        """Per tensor, (‖x‖², error at each candidate), summed over ranks."""
        w = self.width
        return {name: tuple(values[i * w:(i + 1) * w]) for i, name in enumerate(names)}


@dataclass
class StepStats:
    """Statistics of one step, already combined across ranks.

    Gain terms are sums over layers and ranks of ‖·‖^power (see :class:`GainMeasure`):
    ``gain_reference`` of the reference tensor, ``gain_min`` of C(x, θmin) and
    ``gain_compressed`` of C(C(x, θmin), θs); ``gain_measured`` is False at steps whose
    decision skipped the measurement. ``iter_time`` excludes time spent in
    ``DistributedOptimizer.untimed()`` (evaluation, checkpoints, logging).
    ``layer_norms`` holds per-layer norms of the averaged gradient (same on every rank).
    ``wait_time``: seconds blocked on collectives; ``link_bytes``: bytes the rank's link
    carried (each collective's payload times its ring traffic factor). ``gain_ladder`` and
    ``ladder_link_bytes``: per CF of the agent's ``ladder`` (GraVAC's cost-model search), the
    gain term and the link bytes a step at that CF would carry. At steps whose decision measured a
    layer plan's errors (``errors_measured``), ``layer_errors`` holds per compressed tensor
    (‖x‖², error per candidate CF or codec) (see :class:`ErrorSpec`) and ``candidate_link_bytes``
    the link bytes each candidate would cost it. ``variance_change``: during an Adam-family
    exchange's warm-up, at the steps that measure it, the relative change of Adam's
    preconditioner over the last check interval (:class:`~horovod_gravac.adam.AdamExchange`;
    the same on every rank), else None. ``rounds`` and ``link_steps``: the exchange rounds
    and ring message steps of the step (:class:`~horovod_gravac.engine.StepReport`).
    With a set of candidates: ``codec`` the one sent, ``gain_codecs`` each candidate's gain
    term, and on rank 0 ``codec_traffic`` each candidate's priced step
    (:class:`~.costmodel.Traffic`).
    """

    step: int
    iter_time: float
    world_size: int
    gain_reference: float = 0.0
    gain_min: float = 0.0
    gain_compressed: float = 0.0
    gain_measured: bool = False
    lr: float | None = None
    sent: str = SEND_COMPRESSED
    layer_norms: dict[str, float] = field(default_factory=dict)
    wait_time: float = 0.0
    link_bytes: float = 0.0
    gain_ladder: dict[float, float] = field(default_factory=dict)
    ladder_link_bytes: dict[float, float] = field(default_factory=dict)
    errors_measured: bool = False
    layer_errors: dict[str, tuple[float, ...]] = field(default_factory=dict)
    candidate_link_bytes: dict[str, tuple[float, ...]] = field(default_factory=dict)
    variance_change: float | None = None
    rounds: int = 0
    link_steps: int = 0
    codec: int | None = None
    gain_codecs: dict[int, float] = field(default_factory=dict)
    codec_traffic: dict[int, Traffic] = field(default_factory=dict)


class Agent:
    """Base class. Subclasses implement ``initial_decision`` and ``decide``."""

    name: ClassVar[str] = ""
    #: the engine hands per-layer norms of the averaged gradient (on rank 0)
    needs_layer_norms: ClassVar[bool] = False
    #: False when the decision never depends on statistics (no broadcast needed)
    adaptive: ClassVar[bool] = True
    #: True when the decisions set the CF (the compressor must have an adjustable one)
    sets_cf: ClassVar[bool] = True
    #: True when the decisions set a CF per tensor themselves (Accordion's ``per_layer``)
    per_layer: bool = False
    #: True when the decisions name a codec of a set of candidates (``Decision.codec``)
    chooses_codec: ClassVar[bool] = False

    @property
    def probe(self) -> ProbeSpec | None:
        """What the engine measures for this agent on marked steps; None: nothing."""
        return None

    @property
    def error_probe(self) -> ErrorSpec | None:
        """What the engine measures for a layer plan on marked steps; None: nothing."""
        return None

    def __init__(self) -> None:
        self.history: deque[dict[str, Any]] = deque(maxlen=RECENT_STEPS)

    def initial_decision(self) -> Decision:
        raise NotImplementedError

    def use_candidates(self, names: tuple[str, ...], dense: tuple[bool, ...]) -> None:
        """The set of candidates the decisions' ``codec`` indexes (their specs, in order, and
        which of them send the tensor as it is); only agents that choose the codec take one."""
        raise ValueError(f"agent {self.name!r} does not choose among compression candidates "
                         f"({'|'.join(names)}): give agent='choice', or one compressor")

    def decide(self, stats: StepStats) -> Decision:
        raise NotImplementedError

    def record(self, stats: StepStats, decision: Decision, **extra: Any) -> None:
        """Append a row to the metrics stream (``history``, the last RECENT_STEPS rows)."""
        row = {"step": stats.step, "cf": decision.cf, "theta_min": decision.theta_min,
               "send": decision.send, "iter_time": stats.iter_time, **extra}
        self.history.append(row)

    def state_dict(self) -> dict[str, Any]:
        """A copy in plain containers (dicts, lists, numbers): later steps never change a
        state that was saved (elastic commits), and ``torch.load`` reads it with its default
        ``weights_only=True``. The agent's parts (a search, a tracker) become dicts."""
        return copy.deepcopy(plain(vars(self)))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        restore(self, copy.deepcopy(state))
        self.history = deque(self.history, maxlen=RECENT_STEPS)


class Wrapper(Agent):
    """An agent around another, ``agent``, that adjusts its decisions: the engine measures
    what the inner agent asks for, and the metrics stream is the inner agent's, the
    wrapper's figures added to its rows."""

    def __init__(self, agent: Agent) -> None:  # no history of its own: the inner agent's
        self.agent = agent

    probe = property(lambda self: self.agent.probe)
    needs_layer_norms = property(lambda self: self.agent.needs_layer_norms)
    history = property(lambda self: self.agent.history)
    chooses_codec = property(lambda self: self.agent.chooses_codec)
    sets_cf = property(lambda self: self.agent.sets_cf)

    def use_candidates(self, names: tuple[str, ...], dense: tuple[bool, ...]) -> None:
        self.agent.use_candidates(names, dense)


def plain(value: Any) -> Any:
    """``value`` with every object (its ``vars``) and deque turned into dicts and lists."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, deque)):
        return (tuple if isinstance(value, tuple) else list)(plain(v) for v in value)
    if hasattr(value, "__dict__") and not isinstance(value, type) and not callable(value):
        return {k: plain(v) for k, v in vars(value).items()}
    return value


def restore(target: Any, state: dict[str, Any]) -> None:
    """Load :func:`plain`'s dict of ``target`` back into it (its parts in place)."""
    for key, value in state.items():
        current = getattr(target, key, None)
        if isinstance(value, dict) and hasattr(current, "__dict__") and \
                not isinstance(current, (dict, type)) and not callable(current):
            restore(current, value)
        else:
            setattr(target, key, value)
