"""PyTorch Lightning: compress the gradients of ``Trainer(strategy="ddp")`` on any device.

    import lightning.pytorch as pl
    from horovod_gravac.agents import GraVAC
    from horovod_gravac.lightning import CompressionCallback

    compression = CompressionCallback("topk:100", agent=GraVAC(window=100))
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", callbacks=[compression])
    trainer.fit(lit_module, loader)
    stats = compression.communication          # bytes this rank sent, and the dense equivalent
    print(stats.total_bytes, stats.total_dense_bytes)

Why a callback and not ``DDPStrategy(ddp_comm_state=..., ddp_comm_hook=...)``: Lightning
(2.6) registers that hook only when the strategy's device is CUDA, so on CPU (Gloo) the
model trains uncompressed and nothing says so. The callback registers
:func:`horovod_gravac.ddp.register_comm_hook` on ``trainer.strategy.model`` — the
``DistributedDataParallel`` model Lightning has made — in ``on_fit_start``, whatever the
device and backend, and fails loudly where it cannot: a strategy that is not Lightning's
``DDPStrategy`` (single device, FSDP, DeepSpeed) or a model that has a hook already.

Checkpoints: the compression state (every rank's residuals, the compressor's state, the
agent and its decision, the step and byte counters) is written into Lightning's checkpoint
— gathered from every rank, because residuals differ per rank — and a fit resumed with
``trainer.fit(..., ckpt_path=...)`` continues from it: each rank from its own residuals and
what rank 0 decides (step, agent, decision;
:func:`~horovod_gravac.engine.with_rank_0_state`),
as Horovod's checkpoints and elastic do. The checkpoint holds it as bytes, so
Lightning's default ``weights_only`` loading reads the file; the callback then unpickles its
own entry allowing only horovod_gravac's classes, tensors and standard containers. A
checkpoint written with another number of processes is refused (residuals are per rank).

AdamW: with an Adam/AdamW from ``configure_optimizers`` and a compressor beyond fp16, the
callback (``adam_exchange="auto"``) runs the Adam-family exchange (:mod:`horovod_gravac.adam`):
it wraps the trainer's optimizer in :class:`~horovod_gravac.ddp.AdamExchangeOptimizer`, so
Adam steps dense until its second moment settles, then the preconditioned gradient is
exchanged compressed. Lightning's checkpoints keep the phase with the optimizer's state.
``adam_exchange="off"`` compresses AdamW's gradients instead.

Needs ``lightning`` (``pip install lightning``, or ``pip install 'horovod-gravac[test]'``),
the package that provides ``lightning.pytorch``.
"""
from __future__ import annotations

import copy
import importlib
import io
import logging
import pickle
import types
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

try:
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import DDPStrategy
except ImportError as exc:  # pragma: no cover - exercised only without lightning
    raise ImportError("horovod_gravac.lightning needs PyTorch Lightning's `lightning.pytorch`: "
                      "pip install lightning (or pip install 'horovod-gravac[test]')") from exc

from . import adam
from . import compression as C
from .transport.torch_distributed import gather_to_rank0
from .ddp import AdamExchangeOptimizer, DDPCompressionState, register_comm_hook
from .engine import with_rank_0_state
from .settings import HOOK_COMPRESSION, Settings

__all__ = ["CHECKPOINT_KEY", "CompressionCallback", "communication", "load_state_bytes",
           "state_bytes"]

log = logging.getLogger(__name__)

#: the key of the compression state in a Lightning checkpoint dict
CHECKPOINT_KEY = "horovod_gravac"
FORMAT = "horovod_gravac.lightning/1"


def communication(state: DDPCompressionState) -> Any:
    """The byte counters of ``state`` (``total_bytes``: what this rank sent;
    ``total_dense_bytes``: what float32 allreduce of the same gradients would have sent)."""
    if state.engine is None:
        raise ValueError("this DDPCompressionState is not attached to a model yet, so it has "
                         "no byte counters: attach it (register_comm_hook) first")
    return state.communication


# -- the state as bytes, read back with an allowlist --------------------------------------------
_BUILTINS = frozenset(("set", "frozenset", "list", "dict", "tuple", "int", "float", "complex",
                       "bool", "str", "bytes", "bytearray", "slice", "range"))
_ALLOWED = frozenset({
    ("collections", "OrderedDict"), ("collections", "deque"), ("collections", "Counter"),
    ("torch", "device"), ("torch", "Size"), ("torch", "Generator"), ("torch._C", "Generator"),
    ("torch._utils", "_rebuild_tensor"), ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor_v3"), ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"), ("torch._tensor", "_rebuild_from_type_v2"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
})


class _AllowlistUnpickler(pickle.Unpickler):
    """Finds only what a compression state is made of: horovod_gravac's own classes (not its
    application's), tensors, torch dtypes/devices/generators, NumPy arrays and scalars, and
    builtin and ``collections`` containers. Anything else is refused by name."""

    def find_class(self, module: str, name: str) -> Any:
        if (module == "builtins" and name in _BUILTINS) or (module, name) in _ALLOWED:
            return super().find_class(module, name)
        obj = None
        if "." not in name:
            if module.split(".")[0] == "horovod_gravac" and module.split(".")[:2] != \
                    ["horovod_gravac", "app"]:
                obj = getattr(importlib.import_module(module), name, None)
                if not (isinstance(obj, type) and obj.__module__ == module):
                    obj = None
            elif module == "torch":
                obj = getattr(torch, name, None)
                if not isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                    obj = None
            elif module == "numpy.dtypes":
                obj = getattr(importlib.import_module(module), name, None)
                if not (isinstance(obj, type) and obj.__module__ == module):
                    obj = None
        if obj is None:
            raise pickle.UnpicklingError(
                f"the compression state in this checkpoint refers to {module}.{name}, which "
                "horovod_gravac.lightning does not load (only horovod_gravac's classes, "
                "tensors and standard containers): the checkpoint was not written by this "
                "callback, or comes from another version of horovod_gravac")
        return obj


def _allowlist_load(file: Any, **kwargs: Any) -> Any:
    return _AllowlistUnpickler(file, **kwargs).load()


# what torch.load(pickle_module=...) uses: the zip format's Unpickler, the legacy format's load
_allowlist_pickle = types.ModuleType("horovod_gravac_allowlist_pickle")
_allowlist_pickle.Unpickler = _AllowlistUnpickler  # type: ignore[attr-defined]
_allowlist_pickle.load = _allowlist_load  # type: ignore[attr-defined]


def state_bytes(state: DDPCompressionState) -> bytes:
    """``state`` as ``torch.save`` writes it, in memory."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def load_state_bytes(blob: bytes,
                     map_location: str | torch.device | None = None) -> DDPCompressionState:
    """A state from :func:`state_bytes`, unpickled with the allowlist above (not attached to
    a model: ``register_comm_hook(model, state=...)`` does that)."""
    state = torch.load(io.BytesIO(blob), map_location=map_location, weights_only=False,
                       pickle_module=_allowlist_pickle)
    if not isinstance(state, DDPCompressionState):
        raise ValueError(f"expected a DDPCompressionState, got {type(state).__name__}")
    return state


class CompressionCallback(pl.Callback):
    """Register horovod_gravac's DDP communication hook on the model Lightning trains.

    Arguments:
        compression: a compressor, registry name or ``"name:value"`` string
            (``"topk:100"``, the default; ``"powersgd"``).
        settings, given: the rest of the :class:`~horovod_gravac.settings.Settings` — one object,
            and/or its keyword arguments (``agent="gravac"``, ``bucket_cap_mb=25``, ...).
            A non-finite step skipped (``on_nonfinite="skip"``) leaves every gradient None, so
            the optimizer step changes nothing. ``adam_exchange`` wraps the trainer's first
            optimizer (an Adam/AdamW) in :class:`~horovod_gravac.ddp.AdamExchangeOptimizer`.

    Compressor, memory and agent objects are copied, so one object can serve several
    callbacks. The agents see the learning rate of the trainer's first optimizer. On a fit
    resumed from a checkpoint that holds a compression state, that state is used and these
    arguments are not (the state carries its own compressor, memory and agent). A second
    ``fit`` with the same callback continues from the state the first ended with.

    ``state`` is the :class:`~horovod_gravac.ddp.DDPCompressionState` (None before the first
    fit); ``communication`` its byte counters.
    """

    def __init__(self, compression: str | C.Compressor | None = None, *,
                 settings: Settings | None = None, **given: Any) -> None:
        super().__init__()
        # copies: an agent or compressor object keeps state, and the same object in two
        # callbacks (or trainers) would start ranks from different decisions; bad names or
        # settings fail here, before the processes start, not at fit
        self.settings = copy.deepcopy(Settings.of(settings, compression=compression, **given)
                                      .or_compression(HOOK_COMPRESSION))
        self._state: DDPCompressionState | None = None
        self._loaded: bytes | None = None  # this rank's state from a checkpoint, until the fit
        self._hooked: DistributedDataParallel | None = None  # the model of the running fit

    @property
    def state(self) -> DDPCompressionState | None:
        """The compression state: residuals, compressor, agent, step and byte counters."""
        return self._state

    @property
    def communication(self) -> Any:
        """Byte counters of :attr:`state` (``total_bytes``, ``total_dense_bytes``, ...)."""
        if self._state is None:
            raise ValueError("no compression state yet: it is made when trainer.fit starts")
        return communication(self._state)

    # -- registering ---------------------------------------------------------------------------
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        strategy = trainer.strategy
        if not isinstance(strategy, DDPStrategy):
            raise ValueError(
                f"CompressionCallback needs Lightning's DDPStrategy (Trainer(strategy='ddp') "
                f"or strategy=DDPStrategy(...)), which trains a torch DistributedDataParallel "
                f"model; this trainer's strategy is {type(strategy).__name__}")
        model = strategy.model
        if not isinstance(model, DistributedDataParallel):
            raise ValueError(
                f"CompressionCallback needs the model of {type(strategy).__name__} to be a "
                f"torch DistributedDataParallel, got {type(model).__name__}")
        others = [cb for cb in trainer.callbacks
                  if isinstance(cb, CompressionCallback) and cb is not self]
        if others:
            raise ValueError(
                f"the trainer has {len(others) + 1} CompressionCallback instances; a DDP model "
                "takes one communication hook: pass one CompressionCallback")
        optimizer = trainer.optimizers[0] if trainer.optimizers else None
        # the state of the checkpoint, or the one a previous fit ended with (a copy: binding
        # a state to a model keeps the progress of an unbound one only), or a new one
        blob = self._loaded if self._loaded is not None else \
            state_bytes(self._state) if self._state is not None else None
        try:
            if blob is None:
                state = register_comm_hook(model, optimizer=optimizer,
                                           settings=copy.deepcopy(self.settings))
            else:
                state = register_comm_hook(model, state=load_state_bytes(
                    blob, strategy.root_device), optimizer=optimizer)
        except RuntimeError as exc:
            if "only be called once" not in str(exc):
                raise
            raise ValueError(
                "the DDP model already has a communication hook (another callback, the "
                "LightningModule, or DDPStrategy(ddp_comm_hook=...) on CUDA registered one); "
                "DDP takes one: use CompressionCallback alone") from exc
        self._state, self._loaded, self._hooked = state, None, model
        self._wrap_adam(trainer, state)

    def _wrap_adam(self, trainer: pl.Trainer, state: DDPCompressionState) -> None:
        """The Adam-family exchange around the trainer's first optimizer, where it applies."""
        optimizers = trainer.strategy.optimizers
        if not optimizers or isinstance(optimizers[0], AdamExchangeOptimizer):
            return
        exchange = adam.create(copy.deepcopy(self.settings.adam_exchange), optimizers[0],
                               state.compressor)
        if exchange is None:
            return
        if trainer.gradient_clip_val:
            raise ValueError(
                "gradient_clip_val clips the averaged gradient, which the Adam-family exchange "
                "does not form once Adam's variance is frozen (the gradients then hold the "
                "exchanged update): drop gradient_clip_val, or give "
                "CompressionCallback(adam_exchange='off')")
        trainer.strategy.optimizers = [AdamExchangeOptimizer(optimizers[0], state, exchange),
                                       *optimizers[1:]]

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._hooked = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                     exception: BaseException) -> None:
        self._hooked = None

    # -- checkpoints ---------------------------------------------------------------------------
    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Every rank's state, gathered to global rank 0 (which writes the file). Lightning
        calls this on every rank, as it must: ``trainer.save_checkpoint`` is collective."""
        if self._state is None:
            return
        mine = state_bytes(self._state)
        size = trainer.world_size
        everyone = gather_to_rank0(mine) if size > 1 and dist.is_available() \
            and dist.is_initialized() else [mine]
        if trainer.global_rank == 0:
            checkpoint[CHECKPOINT_KEY] = {"format": FORMAT, "world_size": size,
                                          "ranks": everyone}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        entry = checkpoint.get(CHECKPOINT_KEY)
        if entry is None:
            log.info("the checkpoint holds no compression state: compression starts afresh")
            self._state = self._loaded = None
            return
        if self._hooked is not None:
            raise RuntimeError("this strategy restores checkpoints after the fit has started; "
                               "CompressionCallback needs them restored before (DDPStrategy)")
        if not isinstance(entry, dict) or entry.get("format") != FORMAT:
            raise ValueError(f"checkpoint[{CHECKPOINT_KEY!r}] is not a compression state "
                             f"written by horovod_gravac.lightning ({FORMAT})")
        if entry["world_size"] != trainer.world_size:
            raise ValueError(
                f"the checkpoint's compression state was written by {entry['world_size']} "
                f"processes, this fit has {trainer.world_size}: error-feedback residuals are "
                "per rank, so resume with the same number of processes (or delete "
                f"checkpoint[{CHECKPOINT_KEY!r}] from the file to start compression afresh)")
        device = trainer.strategy.root_device
        own = load_state_bytes(entry["ranks"][trainer.global_rank], device)  # bad: fails here
        rank_0 = own if trainer.global_rank == 0 else load_state_bytes(entry["ranks"][0], device)
        # what rank 0 decides is everyone's (the same schema as Horovod's checkpoints)
        own.load_state_dict(with_rank_0_state(own.state_dict(), rank_0.state_dict(),
                                              own.compressor))
        self._loaded = state_bytes(own)  # registered with the hook when the fit starts
