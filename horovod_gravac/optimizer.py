"""``DistributedOptimizer``: layer-wise compressed gradient exchange with error feedback.

Drop-in for ``hvd.DistributedOptimizer``. A post-accumulate-grad hook on every parameter
compresses its gradient (after error feedback) and starts the asynchronous collective as soon
as backprop produces it, overlapping communication with the rest of the backward pass;
``step()`` waits, decompresses, averages, writes ``p.grad`` and steps the wrapped optimizer.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict, defaultdict
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from . import agents as A
from . import compression as C
from .communication import Communicator, Pending, hvd  # hvd: a clear error when missing
from .exchange import CommunicationStats, GradientExchange, NonFiniteGradientError, StepReport
from .validation import check_number

__all__ = ["DistributedOptimizer", "CommunicationStats", "NonFiniteGradientError", "StepReport"]

GRANULARITIES = ("layer", "model")
MODEL_TENSOR = "__model__"
#: the key of this library's part of ``state_dict()`` (memories, compressor, agent, step)
STATE_KEY = "horovod_gravac"


class DistributedOptimizer(torch.optim.Optimizer):
    """Wraps ``optimizer`` so gradients are compressed, exchanged and averaged across ranks.

    Arguments mean what they mean for ``hvd.DistributedOptimizer`` (same order; ``groups``
    makes the tensors of a group start together as Horovod grouped collectives, sparse
    gradients are exchanged sparse unless ``sparse_as_dense``, ranks outside ``process_set``
    step on their local gradients); in addition ``compression`` is a
    :class:`~horovod_gravac.compression.Compressor`, a registry name or a ``"name:value"``
    string (``"topk:100"``), ``memory`` the error-feedback memory (default: the compressor's
    own), ``granularity="model"`` compresses all gradients flattened into one vector once per
    step instead of layer by layer, ``agent`` chooses the compression factor while training.
    Gradients with fewer than ``min_compress_numel`` elements (default 1024: biases, norm
    scales) are exchanged uncompressed, without a residual; ``compress_patterns`` overrides
    that per parameter name (``{"*.bias": False, "decoder.*": True}``; the first matching
    pattern decides, see :func:`~horovod_gravac.compression.uncompressed_tensors`). Both
    apply layer by layer; ``granularity="model"`` compresses the one flattened vector.

    A NaN/Inf gradient never stays in a residual: the averaged gradient then is non-finite
    on every rank (compressors keep NaN/Inf visible), every rank skips the step
    (``on_nonfinite="skip"``, counted in ``skipped_steps``) or raises
    :class:`NonFiniteGradientError` (``"raise"``), and the rank whose gradient it was
    restarts that tensor's residual at zero. Finite ranks keep their residuals. The check
    reads one flag vector back to the host per step, never one per layer.
    """

    def __init__(self, optimizer: torch.optim.Optimizer,
                 named_parameters: Iterable[tuple[str, Tensor]] | None = None,
                 compression: str | C.Compressor = "none",
                 backward_passes_per_step: int = 1,
                 op=hvd.Average,
                 gradient_predivide_factor: float = 1.0,
                 num_groups: int = 0,
                 groups: int | list[list[Tensor]] | None = None,
                 sparse_as_dense: bool = False,
                 process_set=hvd.global_process_set,
                 granularity: str = "layer",
                 memory: str | C.Memory | None = None,
                 agent: str | A.Agent | None = None,
                 on_nonfinite: str = "skip",
                 min_compress_numel: int = C.DEFAULT_MIN_COMPRESS_NUMEL,
                 compress_patterns: dict[str, bool] | None = None) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
        self.compressor = C.create(compression)
        self.memory = C.create_memory(memory, self.compressor)
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
        agent = A.create(agent)
        if agent is not None:
            C.check_adjustable(self.compressor, agent.name)
        num_groups = check_number("num_groups", num_groups, 0, integer=True)
        if num_groups:
            warnings.warn("num_groups is deprecated, as in Horovod: use groups=<int>",
                          DeprecationWarning, stacklevel=2)
            groups = num_groups if groups is None else groups
        if groups is not None and granularity == "model":
            raise ValueError("groups is meaningless with granularity='model' (one tensor per "
                             "step); drop groups or use granularity='layer'")
        if not isinstance(sparse_as_dense, bool):
            raise ValueError(f"sparse_as_dense must be True or False, got {sparse_as_dense!r}")

        params = [p for group in optimizer.param_groups for p in group["params"]]
        if named_parameters is None:
            named = [(f"param.{i}", p) for i, p in enumerate(params)]
        else:
            named = list(named_parameters)
            if any(not isinstance(n, str) or not isinstance(p, Tensor) for n, p in named):
                raise ValueError("named_parameters must yield (str, Tensor) pairs, as "
                                 "model.named_parameters() does")
            names = [n for n, _ in named]
            duplicates = sorted({n for n in names if names.count(n) > 1})
            if duplicates:
                raise ValueError(f"parameter names must be unique; repeated: {duplicates}")
            missing = {id(p) for p in params} - {id(p) for _, p in named}
            if missing:
                raise ValueError(f"{len(missing)} parameter(s) of the optimizer are missing "
                                 "from named_parameters")

        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.optimizer = optimizer
        self.param_groups = optimizer.param_groups
        self.state = optimizer.state
        self.backward_passes_per_step = backward_passes_per_step
        self.granularity = granularity
        self.sparse_as_dense = sparse_as_dense
        self.process_set = process_set
        self.on_nonfinite = on_nonfinite
        self.agent = agent
        self.communicator = Communicator(op, gradient_predivide_factor, process_set)
        ids = {id(p) for p in params}
        self._names = {p: n for n, p in named if id(p) in ids}
        self._requires_update = [p for p in params if p.requires_grad]
        self._group_of = _form_groups(groups, params, self._requires_update)
        #: error feedback, compression, byte accounting and the agent's decisions
        self.exchange = GradientExchange(
            self.compressor, self.memory, agent, self.communicator,
            layers=[self._names[p] for p in self._requires_update] + (
                [MODEL_TENSOR] if granularity == "model" else []),
            uncompressed=C.uncompressed_tensors(
                ((self._names[p], p.numel()) for p in self._requires_update),
                min_compress_numel, compress_patterns) if granularity == "layer" else frozenset(),
            on_nonfinite=on_nonfinite)
        self.communication = self.exchange.communication
        self._passes: dict[Tensor, int] = defaultdict(int)
        self._pending: dict[Tensor, tuple[Pending, Tensor, Any]] = {}
        self._ready: set[Tensor] = set()  # gradients waiting for the rest of their group
        self._sparse: set[Tensor] = set()  # parameters seen with a torch sparse gradient
        self._densified: dict[Tensor, int] = {}  # sparse_as_dense: param -> its sparse_dim
        self._synchronized = False
        self._should_synchronize = True
        self._skip = False
        # an OrderedDict, as torch keeps hooks: RemovableHandle holds a weak reference to it
        self._step_callbacks: OrderedDict[int, Callable[[StepReport], None]] = OrderedDict()
        #: False on ranks outside ``process_set``: they step on their own gradients, as
        #: with ``hvd.DistributedOptimizer``
        self.included = bool(process_set.included())
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready)
                       for p in self._requires_update] \
            if granularity == "layer" and self.included else []

    # -- backprop hooks ------------------------------------------------------------------
    def _on_grad_ready(self, p: Tensor) -> None:
        self._passes[p] += 1
        if self._passes[p] < self.backward_passes_per_step:
            return
        if p in self._pending or p in self._ready:
            raise RuntimeError(
                f"gradient of {self._names[p]} was computed more than backward_passes_per_step="
                f"{self.backward_passes_per_step} time(s) before step(); call step() or "
                "synchronize() after every backward_passes_per_step backward passes")
        group = self._group_of.get(p)
        if group is None:
            self._start(p, self._names[p], self._gradient(p))
            return
        self._ready.add(p)
        if self._ready.issuperset(group):
            self._start_group(group)

    def _gradient(self, p: Tensor) -> Tensor:
        """The tensor to exchange for ``p``: its gradient, dense unless exchanged sparse."""
        if p.grad is None:  # no gradient on this rank: send zeros of the kind others send
            if p in self._sparse:
                p.grad = torch.sparse_coo_tensor(
                    torch.zeros(1, 0, dtype=torch.int64, device=p.device),
                    p.new_zeros((0, *p.shape[1:])), p.shape)
            else:
                p.grad = torch.zeros_like(p)
        if not p.grad.is_sparse:
            return p.grad
        self._sparse.add(p)
        if not self.sparse_as_dense:
            return p.grad
        self._densified[p] = p.grad.sparse_dim()
        return p.grad.to_dense()

    def _start(self, key: Any, name: str, grad: Tensor) -> None:
        if grad.is_sparse:  # Horovod's sparse path: uncompressed, no error feedback
            self._pending[key] = (self.communicator.start_sparse(name, grad), None, grad)
            return
        pending, compensated = self.exchange.start(name, grad)
        self._pending[key] = (pending, compensated, grad)

    def _start_group(self, group: tuple[Tensor, ...]) -> None:
        """Start a group's exchanges together (members without a gradient send zeros)."""
        self._ready.difference_update(group)
        dense, prepared = [], []
        for p in group:
            grad = self._gradient(p)
            if grad.is_sparse:
                self._start(p, self._names[p], grad)
            else:
                compressor, payload, ctx, compensated = self.exchange.compress(self._names[p], grad)
                dense.append((p, compensated, grad))
                prepared.append((self._names[p], compressor, payload, ctx))
        if prepared:
            pendings = self.communicator.start_group(self._names[group[0]], prepared)
            for (p, compensated, grad), pending in zip(dense, pendings):
                self._pending[p] = (pending, compensated, grad)

    # -- the Horovod optimizer API ---------------------------------------------------------
    def synchronize(self) -> None:
        """Wait for every exchange and write the averaged gradients into ``p.grad``."""
        if not self.included:  # outside the process set: nothing to exchange (as Horovod)
            self._synchronized = True
            return
        if self.granularity == "model":
            self._start_model()
        else:  # gradients not started yet (none on this rank, or a group not complete)
            for p in self._requires_update:
                if p in self._pending:
                    continue
                group = self._group_of.get(p)
                if group is None:
                    self._start(p, self._names[p], self._gradient(p))
                else:
                    self._start_group(group)
        for pending, compensated, _ in self._pending.values():
            if pending.ctx is not None and pending.ctx.exchange is C.Exchange.LOWRANK:
                self.exchange.second_phase(pending, compensated)
        for key, (pending, _, grad) in self._pending.items():
            reduced = self.exchange.finish(pending, grad.numel())
            if key == MODEL_TENSOR:
                self._scatter_model(reduced)
            elif grad.is_sparse:
                key.grad = reduced
            else:
                if reduced.data_ptr() != grad.data_ptr():  # dense in place: already there
                    grad.copy_(reduced.view_as(grad))
                if key in self._densified:  # sparse_as_dense: back to sparse, as Horovod
                    key.grad = grad.to_sparse(self._densified.pop(key))
        self._pending.clear()
        self._passes.clear()
        self._synchronized = True
        # skipped steps are counted here, not in step(): GradScaler skips calling step()
        self._skip, culprits, stats = self.exchange.end_step(
            {self._names[p]: p.grad for p in self._requires_update},
            self.param_groups[0].get("lr"))
        if self._step_callbacks:
            report = self.exchange.report(self._skip, stats)
            for callback in list(self._step_callbacks.values()):
                callback(report)
        if self._skip and self.on_nonfinite == "raise":
            raise self.exchange.nonfinite_error(culprits)

    def register_step_callback(self, callback: Callable[[StepReport], None]) -> RemovableHandle:
        """Call ``callback(report)`` on every rank after each step's exchange (a
        :class:`StepReport`: bytes, the decision applied and the next, the agent's statistics
        and, on rank 0, its metrics row), to feed TensorBoard, W&B or a Lightning logger.
        Returns a handle whose ``remove()`` unregisters it."""
        handle = RemovableHandle(self._step_callbacks)
        self._step_callbacks[handle.id] = callback
        return handle

    def _start_model(self) -> None:
        grads = [self._gradient(p) for p in self._requires_update]
        flat = torch.cat([g.reshape(-1) for g in grads]) if grads else torch.zeros(0)
        self._start(MODEL_TENSOR, MODEL_TENSOR, flat)

    def _scatter_model(self, flat: Tensor) -> None:
        offset = 0
        for p in self._requires_update:
            n = p.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p))
            offset += n

    def untimed(self):
        """Context manager: time spent inside is not part of the step time agents see.

        Wrap evaluation, checkpointing and logging between steps in it, so GraVAC's
        throughput per CF measures training steps only.
        """
        return self.exchange.untimed()

    def skip_synchronize(self):
        """Context manager: ``step()`` inside it does not synchronize (call it yourself)."""
        optimizer = self

        class _Skip:
            def __enter__(self):
                optimizer._should_synchronize = False

            def __exit__(self, *exc):
                optimizer._should_synchronize = True

        return _Skip()

    def step(self, closure=None):
        if self._should_synchronize:
            if self._synchronized:  # as Horovod: warn and step (the exchange is not repeated)
                warnings.warn("optimizer.step() called without optimizer.skip_synchronize() "
                              "context after optimizer.synchronize(); the gradients were "
                              "already exchanged and are used as they are. Use "
                              "optimizer.skip_synchronize() around step() after synchronize().")
            else:
                self.synchronize()
        self._synchronized = False
        self.exchange.step_count += 1
        if self._skip:
            self._skip = False
            return None
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._pending or self._ready:
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() "
                                 "but before optimizer.step() or optimizer.synchronize()")
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = self.optimizer.state_dict()
        state[STATE_KEY] = self.exchange.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        ours = state_dict.pop(STATE_KEY, None)
        self.optimizer.load_state_dict(state_dict)
        self._forget_step_in_flight()
        if ours is not None:
            self.exchange.load_state_dict(ours)

    def _forget_step_in_flight(self) -> None:
        """Drop a half-done step (exchanges of a Horovod world that is gone, after elastic)."""
        self._pending.clear()
        self._ready.clear()
        self._passes.clear()
        self.exchange.forget_step_in_flight()
        self._synchronized = self._skip = False

    # -- what the exchange keeps, as attributes of the optimizer -------------------------------
    step_count = property(lambda self: self.exchange.step_count,
                          lambda self, v: setattr(self.exchange, "step_count", v),
                          doc="steps taken (skipped ones included)")
    skipped_steps = property(lambda self: self.exchange.skipped_steps,
                             doc="steps whose averaged gradient was not finite (not applied)")
    decision = property(lambda self: self.exchange.decision,
                        lambda self, v: setattr(self.exchange, "decision", v),
                        doc="the agent's decision for the next step (None without an agent)")
    decisions = property(lambda self: self.exchange.decisions,
                         doc="the decision applied at each of the last RECENT_STEPS steps")
    uncompressed = property(lambda self: self.exchange.uncompressed,
                            doc="names of the gradients sent uncompressed")

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({type(self.optimizer).__name__}, "
                f"compression={self.compressor!r}, granularity={self.granularity!r})")



def _form_groups(groups: int | list[list[Tensor]] | None, params: list[Tensor],
                 trainable: list[Tensor]) -> dict[Tensor, tuple[Tensor, ...]]:
    """Horovod's ``groups``: parameter -> the group it starts with (ungrouped: absent).

    An integer splits the trainable parameters, in the optimizer's order (the same on every
    rank that builds the same model), into that many groups of nearly equal size; a list of
    lists gives the groups explicitly (each parameter at most once; parameters without
    ``requires_grad`` are dropped, the rest go alone).
    """
    if groups is None:
        return {}
    if isinstance(groups, bool) or not isinstance(groups, (int, list)):
        raise ValueError("groups must be None, an integer >= 1 or a list of lists of "
                         f"parameters, got {groups!r}")
    if isinstance(groups, int):
        from horovod.common.util import split_list  # after .communication's clear error
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
    return {p: tuple(chunk) for chunk in chunks if chunk for p in chunk}
