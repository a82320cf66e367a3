"""``DistributedOptimizer``: layer-wise compressed gradient exchange with error feedback.

Drop-in for ``hvd.DistributedOptimizer``, a thin adapter over the step engine
(``engine.StepEngine``): a post-accumulate-grad hook on every parameter hands its gradient
to the engine as soon as backprop produces it (error feedback, compression; each bucket's
fused collectives start once it is complete, overlapping the rest of the backward pass);
``step()`` lets the engine finish the step, writes the averaged gradients into ``p.grad``
and steps the wrapped optimizer.
"""
from __future__ import annotations

import contextlib
import warnings
from collections import defaultdict
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from . import compression as C
from .transport.horovod import HorovodTransport, hvd  # hvd: a clear error when missing
from .engine import (ADAM_STATE, CommunicationStats, NonFiniteGradientError, StepEngine,
                     StepReport)
from .settings import Settings
from .validation import check_number
from .wrapped import WrappedOptimizer

__all__ = ["DistributedOptimizer", "CommunicationStats", "NonFiniteGradientError", "StepReport"]

GRANULARITIES = ("layer", "model")
MODEL_TENSOR = "__model__"
#: the key of this library's part of ``state_dict()`` (memories, compressor, agent, step)
STATE_KEY = "horovod_gravac"


def _parameter_names(optimizer: torch.optim.Optimizer,
                     named_parameters: Iterable[tuple[str, Tensor]] | None
                     ) -> list[tuple[str, Tensor]]:
    """``(name, parameter)`` of the optimizer's parameters, checked; without names,
    Horovod's (``allreduce.noname.<group>.<index>``), so that every rank agrees."""
    if named_parameters is None:
        return [(f"allreduce.noname.{i}.{j}", p) for i, group in enumerate(optimizer.param_groups)
                for j, p in enumerate(group["params"])]
    named = list(named_parameters)
    if any(not isinstance(n, str) or not isinstance(p, Tensor) for n, p in named):
        raise ValueError("named_parameters must yield (str, Tensor) pairs, as "
                         "model.named_parameters() does")
    names = [n for n, _ in named]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"parameter names must be unique; repeated: {duplicates}")
    missing = {id(p) for group in optimizer.param_groups for p in group["params"]} - \
        {id(p) for _, p in named}
    if missing:
        raise ValueError(f"{len(missing)} parameter(s) of the optimizer are missing "
                         "from named_parameters")
    return named


class DistributedOptimizer(WrappedOptimizer):
    """Wraps ``optimizer`` so gradients are compressed, exchanged and averaged across ranks.

    Arguments mean what they mean for ``hvd.DistributedOptimizer`` (same order; unnamed
    parameters get Horovod's names ``allreduce.noname.<group>.<index>``; ``groups`` makes
    the tensors of a group travel together, sparse gradients are exchanged sparse unless
    ``sparse_as_dense``, ranks outside ``process_set`` step on their local gradients).
    ``compression`` and the keyword arguments after the last of them are the
    :class:`~horovod_gravac.settings.Settings` (``memory``, ``agent``, ``on_nonfinite``,
    ``min_compress_numel``, ``compress_patterns``, ``bucket_cap_mb``, ``adam_exchange``),
    or ``settings=`` one :class:`~horovod_gravac.settings.Settings` (keywords given beside it
    replace its values). In addition ``granularity="model"`` compresses all gradients
    flattened into one vector once per step instead of layer by layer.

    A NaN/Inf gradient never stays in a residual: the averaged gradient then is non-finite
    on every rank (compressors keep NaN/Inf visible), every rank skips the step
    (``on_nonfinite="skip"``, counted in ``skipped_steps``) or raises
    :class:`NonFiniteGradientError` (``"raise"``), and the rank whose gradient it was
    restarts that tensor's residual at zero. The check reads one vector back to the host per
    step, never one per layer. With the Adam-family exchange, ``step()`` applies the
    frozen-variance update itself.

    ``hvd.broadcast_optimizer_state(opt, root_rank=0)`` works as with Horovod's optimizer:
    the ``step()`` it makes to create missing state (zero gradients, no backward pass since
    the last step, a wrapped optimizer without state) steps the wrapped optimizer on this
    rank alone, exchanging and compressing nothing.
    """

    def __init__(self, optimizer: torch.optim.Optimizer,
                 named_parameters: Iterable[tuple[str, Tensor]] | None = None,
                 compression: str | C.Compressor | None = None,
                 backward_passes_per_step: int = 1,
                 op=hvd.Average,
                 gradient_predivide_factor: float = 1.0,
                 num_groups: int = 0,
                 groups: int | list[list[Tensor]] | None = None,
                 sparse_as_dense: bool = False,
                 process_set=hvd.global_process_set,
                 granularity: str = "layer", *,
                 settings: Settings | None = None, **given: Any) -> None:
        backward_passes_per_step, groups = _check_arguments(
            optimizer, backward_passes_per_step, op, gradient_predivide_factor, num_groups,
            groups, sparse_as_dense, granularity)
        self.settings = Settings.of(settings, compression=compression, **given) \
            .or_compression("none")
        config, self.adam = self.settings.build(optimizer, average=op == hvd.Average,
                                                predivide=float(gradient_predivide_factor))
        if self.adam is not None and op != hvd.Average:
            raise ValueError("the Adam-family exchange averages the ranks' momenta: it needs "
                             "op=hvd.Average (or adam_exchange='off')")
        self.grads = HorovodGradients(optimizer, named_parameters, sparse_as_dense,
                                      granularity, groups)
        super().__init__(optimizer)
        self.backward_passes_per_step = backward_passes_per_step
        self.granularity = granularity
        self.sparse_as_dense = sparse_as_dense
        self.process_set = process_set
        self.on_nonfinite = self.settings.on_nonfinite
        #: parameter → its name, as Horovod's optimizer keeps it
        self._parameter_names = self.grads.names
        #: error feedback, compression, fused collectives and the agent's decisions
        self.engine = StepEngine(config, HorovodTransport(process_set), *self.grads.tensors())
        self.compressor, self.memory, self.agent = config.compressor, config.memory, config.agent
        self.communication = self.engine.communication
        self._passes: dict[Tensor, int] = defaultdict(int)
        self._synchronized = False
        self._should_synchronize = True
        self._skip = False
        #: False on ranks outside ``process_set``: they step on their own gradients, as
        #: with ``hvd.DistributedOptimizer``
        self.included = bool(process_set.included())
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready)
                       for p in self.grads.trainable] if self.included else []

    # -- backprop hooks ------------------------------------------------------------------
    def _on_grad_ready(self, p: Tensor) -> None:
        self._passes[p] += 1
        if self._passes[p] < self.backward_passes_per_step or self.granularity == "model":
            return
        if self.engine.begun(self._parameter_names[p]):
            raise RuntimeError(
                f"gradient of {self._parameter_names[p]} was computed more than "
                f"backward_passes_per_step={self.backward_passes_per_step} time(s) before "
                "step(); call step() or synchronize() after every backward_passes_per_step "
                "backward passes")
        self._begin(p)

    def _begin(self, p: Tensor) -> None:
        """Hand ``p``'s gradient to the engine (no gradient on this rank: zeros)."""
        name, grad = self._parameter_names[p], self.grads.gradient(p)
        if grad.is_sparse:  # Horovod's sparse path: uncompressed, no error feedback
            self.engine.begin_sparse(name, grad)
        else:
            self.engine.begin(name, self._exchanged(p, grad))

    def _exchanged(self, p: Tensor, grad: Tensor) -> Tensor:
        """What goes to the engine for ``p``: its gradient, or once Adam's variance is
        frozen its preconditioned gradient (:meth:`AdamExchange.exchanged`)."""
        if self.adam is None:
            return grad
        if not self.engine.in_flight and self.engine.decision.variance_frozen \
                and not self.adam.frozen:  # the step's first tensor: the decision's phase
            self.adam.freeze()
        return self.adam.exchanged(p, grad) if self.adam.frozen else grad

    # -- the Horovod optimizer API ---------------------------------------------------------
    def synchronize(self) -> None:
        """Wait for every exchange and write the averaged gradients into ``p.grad``."""
        if not self.included:  # outside the process set: nothing to exchange (as Horovod)
            self._synchronized = True
            return
        if self.granularity == "model":
            self.engine.begin(MODEL_TENSOR, self.grads.flattened(self._exchanged))
        else:  # gradients not begun yet: none on this rank
            for p in self.grads.trainable:
                if not self.engine.begun(self._parameter_names[p]):
                    self._begin(p)
        outcome = self.engine.finish(
            self.grads.write_back, self.param_groups[0].get("lr"), self.grads.destination,
            self.adam.take_variance_change() if self.adam is not None else None)
        self._passes.clear()
        self._synchronized = True
        # skipped steps are counted by the engine, not in step(): GradScaler skips step()
        self._skip = outcome.skipped
        if outcome.error is not None:
            raise outcome.error

    def register_step_callback(self, callback: Callable[[StepReport], None]) -> RemovableHandle:
        """Call ``callback(report)`` on every rank after each step's exchange (a
        :class:`StepReport`: bytes, the decision applied and the next, the agent's statistics
        and, on rank 0, its metrics row), to feed TensorBoard, W&B or a Lightning logger.
        Returns a handle whose ``remove()`` unregisters it."""
        return self.engine.register_step_callback(callback)

    def untimed(self):
        """Context manager: time spent inside is not part of the step time agents see.

        Wrap evaluation, checkpointing and logging between steps in it, so GraVAC's
        throughput per CF measures training steps only.
        """
        return self.engine.untimed()

    @contextlib.contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        """Context manager: ``step()`` inside it does not synchronize (call it yourself)."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def _initialising_state(self) -> bool:
        """``step()`` as ``hvd.broadcast_optimizer_state`` calls it to create missing
        state: no backward pass on this rank since the last step, no state yet, and a
        gradient (Horovod's zeros) on every trainable parameter. A rank that merely skipped
        its backward (gradients None after ``zero_grad()``) exchanges zeros instead, as
        Horovod's optimizer does, so its peers do not wait for it."""
        return (not self._passes and not self.engine.in_flight and not self.optimizer.state
                and all(p.grad is not None for group in self.optimizer.param_groups
                        for p in group["params"] if p.requires_grad))

    def step(self, closure=None):
        if self._should_synchronize:
            if self._synchronized:  # as Horovod: warn and step (the exchange is not repeated)
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() "
                              "context after optimizer.synchronize(); the gradients were "
                              "already exchanged and are used as they are. Use "
                              "optimizer.skip_synchronize() around step() after synchronize().")
            elif self._initialising_state():  # this rank alone: exchange nothing
                return self.optimizer.step(closure)
            else:
                self.synchronize()
        self._synchronized = False
        if self._skip:
            self._skip = False
            return None
        return self.adam.step(closure) if self.adam is not None else self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self.engine.in_flight:
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() "
                                 "but before optimizer.step() or optimizer.synchronize()")
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = self.optimizer.state_dict()
        state[STATE_KEY] = self.engine.state_dict()
        if self.adam is not None:
            state[STATE_KEY][ADAM_STATE] = self.adam.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        ours = state_dict.pop(STATE_KEY, None)
        self.optimizer.load_state_dict(state_dict)
        self._forget_step_in_flight()
        if ours is not None:
            self.engine.load_state_dict(ours)
            if self.adam is not None and ADAM_STATE in ours:
                self.adam.load_state_dict(ours[ADAM_STATE])

    def _forget_step_in_flight(self) -> None:
        """Drop a half-done step (exchanges of a Horovod world that is gone, after elastic)."""
        self._passes.clear()
        self.engine.forget_step_in_flight()
        self._synchronized = self._skip = False

    # -- what the engine keeps, as attributes of the optimizer -------------------------------
    step_count = property(lambda self: self.engine.step_count,
                          lambda self, v: setattr(self.engine, "step_count", v),
                          doc="steps taken (skipped ones included)")
    skipped_steps = property(lambda self: self.engine.skipped_steps,
                             doc="steps whose averaged gradient was not finite (not applied)")
    decision = property(lambda self: self.engine.decision,
                        lambda self, v: setattr(self.engine, "decision", v),
                        doc="the agent's decision for the next step (None without an agent)")
    decisions = property(lambda self: self.engine.decisions,
                         doc="the decision applied at each of the last RECENT_STEPS steps")
    uncompressed = property(lambda self: self.engine.uncompressed,
                            doc="names of the gradients sent uncompressed")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({type(self.optimizer).__name__}, "
                f"compression={self.compressor!r}, granularity={self.granularity!r})")


class HorovodGradients:
    """The optimizer's parameters as the engine's named tensors, the way Horovod's optimizer
    names and exchanges them: Horovod's names, torch sparse gradients (sent sparse, or dense
    with ``sparse_as_dense`` and handed back sparse), zeros for a parameter without a
    gradient on this rank, and ``granularity="model"``'s one flattened tensor.

    Arguments:
        optimizer, named_parameters, sparse_as_dense, granularity, groups: as for
            :class:`DistributedOptimizer` (``groups`` as :func:`_check_arguments` returns it).
    """

    def __init__(self, optimizer: torch.optim.Optimizer,
                 named_parameters: Iterable[tuple[str, Tensor]] | None, sparse_as_dense: bool,
                 granularity: str, groups: int | list[list[Tensor]] | None) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"]]
        ids = {id(p) for p in params}
        #: parameter → its name
        self.names = {p: n for n, p in _parameter_names(optimizer, named_parameters)
                      if id(p) in ids}
        #: the parameters that take gradients, in the optimizer's order
        self.trainable = [p for p in params if p.requires_grad]
        self.by_name = {self.names[p]: p for p in self.trainable}
        self.sparse_as_dense, self.granularity = sparse_as_dense, granularity
        self.groups = _form_groups(groups, params, self.trainable)
        self.sparse: set[Tensor] = set()  # parameters seen with a torch sparse gradient
        self.densified: dict[Tensor, int] = {}  # sparse_as_dense: param -> its sparse_dim

    def tensors(self) -> tuple[list[tuple[str, torch.Size, int]], list[list[str]] | None,
                               frozenset[str] | None]:
        """The engine's tensors, explicit buckets and uncompressed names (None: by the
        settings)."""
        if self.granularity == "model":
            numel = sum(p.numel() for p in self.trainable)
            return [(MODEL_TENSOR, torch.Size([numel]), 4)], None, frozenset()
        groups = None if self.groups is None else \
            [[self.names[p] for p in group] for group in self.groups]
        return [(self.names[p], p.shape, p.element_size()) for p in self.trainable], groups, None

    def flattened(self, exchanged: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """Every ``exchanged(p, gradient)`` as one vector (``granularity="model"``)."""
        grads = [exchanged(p, self.gradient(p)) for p in self.trainable]
        return torch.cat([g.reshape(-1) for g in grads]) if grads else torch.zeros(0)

    def gradient(self, p: Tensor) -> Tensor:
        """The tensor to exchange for ``p``: its gradient, dense unless exchanged sparse."""
        if p.grad is None:  # no gradient on this rank: send zeros of the kind others send
            if p in self.sparse:
                p.grad = torch.sparse_coo_tensor(
                    torch.zeros(1, 0, dtype=torch.int64, device=p.device),
                    p.new_zeros((0, *p.shape[1:])), p.shape)
            else:
                p.grad = torch.zeros_like(p)
        if not p.grad.is_sparse:
            return p.grad
        self.sparse.add(p)
        if not self.sparse_as_dense:
            return p.grad
        self.densified[p] = p.grad.sparse_dim()
        return p.grad.to_dense()

    def write_back(self, name: str, averaged: Tensor) -> None:
        """The engine's averaged gradient of ``name`` into ``p.grad``."""
        if name == MODEL_TENSOR:
            offset = 0
            for p in self.trainable:
                n = p.numel()
                p.grad.copy_(averaged[offset:offset + n].view_as(p))
                offset += n
            return
        p = self.by_name[name]
        if averaged.is_sparse:
            p.grad = averaged
        elif p in self.densified:  # sparse_as_dense: back to sparse, as Horovod
            p.grad = averaged.view(p.shape).to_sparse(self.densified.pop(p))
        else:  # no copy where it was decoded into p.grad (see destination)
            C.write_into(p.grad, averaged)

    def destination(self, name: str) -> Tensor | None:
        """Where the engine may decode ``name``'s averaged gradient: ``p.grad`` itself (its
        own gradient is no longer needed), unless it is exchanged sparse or densified."""
        p = self.by_name.get(name)
        if p is None or p in self.densified or p.grad is None or p.grad.is_sparse:
            return None
        return p.grad


def _check_arguments(optimizer: Any, backward_passes_per_step: Any, op: Any,
                     gradient_predivide_factor: Any, num_groups: Any, groups: Any,
                     sparse_as_dense: Any, granularity: Any) -> tuple[int, Any]:
    """Horovod's arguments checked before anything is built; returns the number of
    backward passes and the groups (``num_groups``, deprecated, folded into them)."""
    if not isinstance(optimizer, torch.optim.Optimizer):  # before reading its groups
        raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    backward_passes_per_step = check_number("backward_passes_per_step",
                                            backward_passes_per_step, 1, integer=True)
    if op not in (hvd.Average, hvd.Sum, hvd.Adasum):
        raise ValueError(f"op must be hvd.Average, hvd.Sum or hvd.Adasum, got {op!r}")
    if op == hvd.Adasum:
        raise ValueError("op=hvd.Adasum is not supported: Adasum combines full gradients "
                         "pairwise and cannot combine compressed payloads; use "
                         "hvd.DistributedOptimizer for Adasum")
    check_number("gradient_predivide_factor", gradient_predivide_factor, 0, low_open=True)
    if gradient_predivide_factor != 1.0 and op != hvd.Average:
        raise ValueError("gradient_predivide_factor not supported with op != Average")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    num_groups = check_number("num_groups", num_groups, 0, integer=True)
    if num_groups:
        warnings.warn("num_groups is deprecated, as in Horovod: use groups=<int>",
                      DeprecationWarning, stacklevel=3)
        groups = num_groups if groups is None else groups
    if groups is not None and granularity == "model":
        raise ValueError("groups is meaningless with granularity='model' (one tensor per "
                         "step); drop groups or use granularity='layer'")
    if not isinstance(sparse_as_dense, bool):
        raise ValueError(f"sparse_as_dense must be True or False, got {sparse_as_dense!r}")
    return backward_passes_per_step, groups


def _form_groups(groups: int | list[list[Tensor]] | None, params: list[Tensor],
                 trainable: list[Tensor]) -> list[list[Tensor]] | None:
    """Horovod's ``groups`` as lists of trainable parameters (None: no groups), each a bucket.

    An integer splits the trainable parameters, in the optimizer's order (the same on every
    rank that builds the same model), into that many groups of nearly equal size; a list of
    lists gives the groups explicitly (each parameter at most once; parameters without
    ``requires_grad`` are dropped, the rest go alone).
    """
    if groups is None:
        return None
    if isinstance(groups, bool) or not isinstance(groups, (int, list)):
        raise ValueError("groups must be None, an integer >= 1 or a list of lists of "
                         f"parameters, got {groups!r}")
    if isinstance(groups, int):
        from horovod.common.util import split_list  # after the transport's clear error
        chunks = split_list(trainable, check_number("groups", groups, 1, integer=True))
    else:
        known, seen, chunks = {id(p) for p in params}, set(), []
        trainable_ids = {id(p) for p in trainable}
        for i, group in enumerate(groups):
            if not isinstance(group, (list, tuple)) or \
                    not all(isinstance(p, Tensor) for p in group):
                raise ValueError(f"groups[{i}] must be a list of parameters (tensors), "
                                 f"got {group!r}")
            for p in group:
                if id(p) not in known:
                    raise ValueError(f"groups[{i}] holds a tensor that is not a parameter "
                                     "of the optimizer")
                if id(p) in seen:
                    raise ValueError("a parameter can only appear once in groups "
                                     f"(again in groups[{i}])")
                seen.add(id(p))
            chunks.append([p for p in group if id(p) in trainable_ids])
    return [list(chunk) for chunk in chunks if chunk]
