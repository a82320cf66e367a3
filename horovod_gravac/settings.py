"""What to compress and how: the settings every front-end and ``gravac-train`` build their
engine from, each written here once.

:class:`~horovod_gravac.optimizer.DistributedOptimizer`, :func:`~horovod_gravac.ddp.register_comm_hook`
(and :class:`~horovod_gravac.ddp.DDPCompressionState`),
:class:`~horovod_gravac.lightning.CompressionCallback` and ``gravac-train`` take these settings
as keyword arguments (or one :class:`Settings` as ``settings=``) and check them here, when they
are made — before any process group, hook or training step exists.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from . import agents as A
from . import compression as C
from . import adam
from .adam import AUTO, OFF, AdamExchange
from .engine import DEFAULT_BUCKET_CAP_MB, EngineConfig

#: what the DDP hook and the Lightning callback compress with when nothing is given
HOOK_COMPRESSION = "topk:100"


@dataclass(frozen=True)
class Settings:
    """How gradients are compressed and exchanged.

    Arguments:
        compression: a :class:`~horovod_gravac.compression.Compressor`, a registry name or a
            ``"name:value"`` string (``"topk:100"``, ``"powersgd:2"``), or a set of
            candidates for ``agent="choice"`` (``"auto"`` or
            ``"dense|fp16|powersgd:1|topk:100"``). None: the front-end's default —
            ``"none"`` for :class:`~horovod_gravac.optimizer.DistributedOptimizer` and
            ``gravac-train``, :data:`HOOK_COMPRESSION` (``"topk:100"``) for the DDP hook and
            the Lightning callback.
        memory: the error-feedback memory (a name such as ``"residual"`` or a
            :class:`~horovod_gravac.compression.Memory`; None: the compressor's own).
        agent: ``"static"``, ``"gravac"``, ``"accordion"``, ``"choice"``, an agent object,
            or None (the compressor's fixed setting). Rank 0 decides; the decision is
            broadcast, so every rank applies it at the same step.
        on_nonfinite: ``"skip"`` (a step whose averaged gradient is not finite changes no
            parameter on any rank; counted in ``skipped_steps``) or ``"raise"``
            (:class:`~horovod_gravac.engine.NonFiniteGradientError`).
        min_compress_numel: gradients with fewer elements are sent uncompressed, without a
            residual (biases, norm scales); 0 compresses every tensor.
        compress_patterns: parameter-name patterns → always (True) / never (False) compress
            (``{"*.bias": False, "decoder.*": True}``; the first matching pattern decides,
            see :func:`~horovod_gravac.compression.uncompressed_tensors`).
        bucket_cap_mb: gradient megabytes whose compressed payloads travel in one fused
            collective per kind (the bucket, in backward order; Horovod's fusion threshold,
            DDP's ``bucket_cap_mb``); > 0.
        adam_exchange: with a ``torch.optim.Adam``/``AdamW`` whose gradients are compressed
            by more than fp16 does, ``"auto"`` runs the Adam-family exchange
            (:mod:`horovod_gravac.adam`: dense Adam steps until rank 0 sees the second moment
            settle, then the preconditioned gradient compressed with error feedback);
            ``"off"`` exchanges gradients as for any optimizer; an
            :class:`~horovod_gravac.adam.AdamExchange` sets the freeze rule.
            :class:`~horovod_gravac.optimizer.DistributedOptimizer` and the Lightning callback apply it
            to the optimizer they step; with :func:`~horovod_gravac.ddp.register_comm_hook`,
            wrap the optimizer in :class:`~horovod_gravac.ddp.AdamExchangeOptimizer`.

    Objects given (a compressor, memory, agent or ``AdamExchange``) are used as they are and
    keep their state: give each model its own (an ``AdamExchange`` is copied when an
    optimizer is bound to it). ``None`` for ``compression``, ``on_nonfinite``,
    ``min_compress_numel`` or ``bucket_cap_mb`` means the default.
    """

    compression: Any = None
    memory: str | C.Memory | None = None
    agent: str | A.Agent | None = None
    on_nonfinite: str = "skip"
    min_compress_numel: int = C.DEFAULT_MIN_COMPRESS_NUMEL
    compress_patterns: Mapping[str, bool] | None = None
    bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB
    adam_exchange: str | AdamExchange | None = AUTO

    def __post_init__(self) -> None:
        if not (self.adam_exchange in (AUTO, OFF, None) or
                isinstance(self.adam_exchange, AdamExchange)):
            raise ValueError("adam_exchange must be 'auto', 'off' or an AdamExchange, got "
                             f"{self.adam_exchange!r}")
        if self.compress_patterns is not None and not isinstance(self.compress_patterns,
                                                                 Mapping):
            raise ValueError("compress_patterns must map name patterns to True/False, got "
                             f"{self.compress_patterns!r}")
        for name in _NONE_IS_DEFAULT:  # None: the default (compression's: the front-end's)
            if getattr(self, name) is None and name != "compression":
                object.__setattr__(self, name, _DEFAULTS[name])
        if self.compress_patterns is not None:  # a plain dict: it pickles and compares
            object.__setattr__(self, "compress_patterns", dict(self.compress_patterns))
        self.build()  # bad names and values fail here, before anything runs

    @classmethod
    def of(cls, settings: "Settings | None" = None, **given: Any) -> "Settings":
        """``settings`` (default: the defaults) with the keyword arguments ``given`` in
        place of its values (None, where it means the default, replaces nothing); an unknown
        keyword is a ValueError naming the known ones."""
        given = {k: v for k, v in given.items() if v is not None or k not in _NONE_IS_DEFAULT}
        known = set(_DEFAULTS)
        unknown = sorted(set(given) - known)
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}; the settings are "
                             f"{', '.join(sorted(known))}")
        if settings is None:
            return cls(**given)
        if not isinstance(settings, cls):
            raise ValueError(f"settings must be a horovod_gravac.Settings, got "
                             f"{type(settings).__name__}")
        return dataclasses.replace(settings, **given) if given else settings

    def or_compression(self, default: str) -> "Settings":
        """These settings, compressing with ``default`` where no compression was given."""
        return self if self.compression is not None else \
            dataclasses.replace(self, compression=default)

    def build(self, optimizer: torch.optim.Optimizer | None = None, average: bool = True,
              predivide: float = 1.0) -> tuple[EngineConfig, AdamExchange | None]:
        """The engine's configuration (compressor, memory and agent built and checked
        together) and, where ``adam_exchange`` applies to ``optimizer``, the Adam-family
        exchange bound to it (None: gradients are exchanged): its agent then runs in
        :class:`~horovod_gravac.agents.AdamPhases` and its memory is error feedback. There
        ``compression="auto"`` is the set without sparsifiers (``C.ADAM_CANDIDATES``)."""
        compression = C.for_optimizer(
            "none" if self.compression is None else self.compression,
            self.adam_exchange not in (None, OFF) and optimizer is not None and
            adam.is_adam_family(optimizer))
        compressor = C.create(compression)
        exchange = None if optimizer is None else \
            adam.create(copy.deepcopy(self.adam_exchange), optimizer, compressor)
        agent = A.create(self.agent)
        config = EngineConfig(
            compressor, adam.create_memory(self.memory, compressor, exchange),
            agent if exchange is None else A.AdamPhases(agent, exchange.rule),
            on_nonfinite=self.on_nonfinite, min_compress_numel=self.min_compress_numel,
            compress_patterns=dict(self.compress_patterns or {}),
            bucket_cap_mb=self.bucket_cap_mb, average=average, predivide=predivide)
        return config, exchange


#: every setting's default, by name
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(Settings)}
#: the settings for which None means the default (others: None is a value of its own)
_NONE_IS_DEFAULT = ("compression", "on_nonfinite", "min_compress_numel", "bucket_cap_mb")
