"""The same compression, error feedback and agents for ``torch.distributed``: a DDP
communication hook::

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    from horovod_gravac import ddp

    dist.init_process_group("gloo")          # or "nccl"; launched by torchrun
    model = DDP(model)
    state = ddp.register_comm_hook(model, compression="topk:100", agent="gravac")
    for x, y in loader:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()      # each bucket: compressed layer by layer, sent
        optimizer.step()

How a step goes (Vogels et al.'s PowerSGD hook is the model for the state object):

1. DDP calls :func:`compression_hook` for each of its buckets, in the same order on every
   rank. Each parameter's gradient — layer-wise, not DDP's flat bucket — is handed to the
   step engine (:class:`~horovod_gravac.engine.StepEngine`, shared with the Horovod
   optimizer): error feedback (g + residual), compression at the agent's current CF, and
   the engine's own buckets (consecutive parameters in backward order up to
   ``bucket_cap_mb``, a pure function of the model: DDP rebuilds its buckets after the first
   step, and Gloo's sums depend on the buffer layout, so a resumed run would not match an
   uninterrupted one bit for bit on DDP's) leave in one collective per kind as they complete.
   The hook returns a future at once, so backprop and communication overlap.
2. A callback the first hook queues on the autograd engine runs when backward is done,
   before DDP's own end of backward: the engine runs the compressors' further rounds
   (PowerSGD's Q, one allreduce per bucket, in one order on every rank), averages, writes
   the averaged gradients into each DDP bucket and completes its future with it — DDP then
   writes ``p.grad`` from it, once, as with its built-in hooks.
3. The end of the step, as in the Horovod optimizer (the same engine): one host read
   decides whether the averaged gradient is finite. If not, every rank sets the gradients of
   this step to ``None`` after DDP wrote them — ``optimizer.step()`` then changes nothing —
   and counts a skipped step (``on_nonfinite="skip"``), or raises
   :class:`NonFiniteGradientError` out of ``backward()`` (``"raise"``); the rank whose
   gradient it was restarts that residual at zero. The agent's statistics rode in the last
   bucket's collective; rank 0 decides and the decision is broadcast without blocking, to
   be applied from the next step.

``model.no_sync()`` accumulation needs nothing: DDP calls no hook inside it, and the next
synchronised backward exchanges the accumulated gradients. Unused parameters
(``find_unused_parameters=True``) are exchanged as zeros, like DDP.
"""
# No "from __future__ import annotations": DDP checks the hook's annotations are the real
# dist.GradBucket and torch.futures.Future[torch.Tensor].
import copy
import dataclasses
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd import Variable
from torch.utils.hooks import RemovableHandle

from . import adam
from . import agents as A
from . import compression as C
from .adam import AdamExchange
from .transport.torch_distributed import TorchTransport
from .engine import (CommunicationStats, NonFiniteGradientError, StepEngine, StepOutcome,
                     StepReport, engine_state, load_engine_state)
from .settings import HOOK_COMPRESSION, Settings
from .wrapped import WrappedOptimizer

__all__ = ["AdamExchangeOptimizer", "DDPCompressionState", "NonFiniteGradientError",
           "compression_hook", "register_comm_hook"]


class DDPCompressionState:
    """Everything :func:`compression_hook` keeps between steps, for one model.

    Arguments:
        module: the model (or the DDP model around it) whose parameters the hook will see;
            DDP keeps the same parameter objects, so the state can be made before DDP wraps
            the model.
        process_group, optimizer: as for :func:`register_comm_hook`.
        settings, given: the :class:`~horovod_gravac.settings.Settings` (one object, and/or its
            keyword arguments: ``compression="powersgd", agent="gravac"``; the compression
            defaults to ``"topk:100"``).

    ``engine`` holds the compressor, the error-feedback memory, the agent and its decision,
    byte counts (``state.communication``) and the step counter. The state pickles
    (``torch.save(state, f)``) without its process group and model, like PyTorch's
    ``PowerSGDState``; ``register_comm_hook(model, state=torch.load(f, weights_only=False))``
    (or ``state.attach(module)``) binds it to a model again and training continues bit for
    bit.
    """

    def __init__(self, module: torch.nn.Module, process_group: dist.ProcessGroup | None = None,
                 *, optimizer: torch.optim.Optimizer | None = None,
                 settings: Settings | None = None, **given: Any) -> None:
        if not (process_group is None or isinstance(process_group, dist.ProcessGroup)):
            raise ValueError(f"process_group must be a torch.distributed ProcessGroup or None, "
                             f"got {process_group!r}; the settings (compression=..., "
                             "agent=...) are keyword arguments")
        self.settings = Settings.of(settings, **given).or_compression(HOOK_COMPRESSION)
        self.config, _ = self.settings.build()
        #: whether the last step's averaged gradient was non-finite (gradients set to None)
        self.last_step_skipped = False
        self.engine: StepEngine | None = None
        #: the Adam-family exchange an :class:`AdamExchangeOptimizer` runs through this hook
        self.adam: AdamExchange | None = None
        self._saved_progress: dict[str, Any] | None = None
        self._reset_step()
        self.attach(module, process_group, optimizer)

    compressor = property(lambda self: self.config.compressor)
    memory = property(lambda self: self.config.memory)
    agent = property(lambda self: self.config.agent)
    communication: CommunicationStats = property(lambda self: self.engine.communication)

    def _reset_step(self) -> None:
        self._queued = False
        self._views: dict[str, Tensor] = {}  # name → its gradient inside DDP's bucket
        self._futures: list[tuple[torch.futures.Future, Tensor]] = []

    def attach(self, module: torch.nn.Module, process_group: dist.ProcessGroup | None = None,
               optimizer: torch.optim.Optimizer | None = None) -> None:
        """Bind to ``module``'s parameters and a process group (None: the default group)."""
        ignored: set[str] = set()
        if isinstance(module, torch.nn.parallel.DistributedDataParallel):
            if module.static_graph:
                raise ValueError(
                    "DistributedDataParallel(static_graph=True) is not supported: DDP then "
                    "calls the hooks from its own end of backward, which waits for futures "
                    "this hook completes only after backward; use static_graph=False")
            process_group = process_group or module.process_group
            ignored = set(module.parameters_to_ignore)  # DDP never hands these to a hook
            module = module.module
        if not isinstance(module, torch.nn.Module):
            raise ValueError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer or None, got "
                             f"{type(optimizer).__name__}")
        named = [(n, p) for n, p in module.named_parameters()
                 if p.requires_grad and n not in ignored]
        self._names = {p: n for n, p in named}
        self._params = dict(named)
        self._optimizer = optimizer
        if self.engine is not None:  # attached again, live: go on from where it is
            self._saved_progress = self.engine.progress()
        self.engine = StepEngine(self.config, TorchTransport(process_group),
                                 [(n, p.shape, p.element_size()) for n, p in named])
        if self._saved_progress is not None:  # unpickled: the objects hold the rest
            self.engine.load_progress(self._saved_progress)
            self._saved_progress = None
        self._attached = (module, process_group)

    def use_adam_exchange(self, exchange: AdamExchange, optimizer: torch.optim.Optimizer) -> None:
        """Exchange ``optimizer``'s preconditioned gradient once its variance is frozen
        (:mod:`horovod_gravac.adam`): the agent becomes
        :class:`~horovod_gravac.agents.AdamPhases` over the configured one, the memory error
        feedback (unless one was given), and ``compression="auto"`` the set without
        sparsifiers (``C.ADAM_CANDIDATES``). :class:`AdamExchangeOptimizer` calls it."""
        if self.engine is not None and self.engine.in_flight:
            raise RuntimeError("use_adam_exchange() during a step (after backward began)")
        config = self.config
        compressor = config.compressor
        adam_set = C.for_optimizer(self.settings.compression, under_exchange=True)
        if adam_set != self.settings.compression and compressor.name != adam_set:
            compressor = C.create(adam_set)
        agent = config.agent if isinstance(config.agent, A.AdamPhases) else \
            A.AdamPhases(config.agent, exchange.rule)
        memory = adam.create_memory(config.memory if self.settings.memory is not None else None,
                                    compressor, exchange)
        if type(memory) is type(config.memory) and compressor is config.compressor:
            memory = config.memory  # with its residuals (a state loaded from a checkpoint)
        self.adam = exchange
        if self._optimizer is None:
            self._optimizer = optimizer
        if agent is not config.agent or memory is not config.memory or \
                compressor is not config.compressor:
            self.config = dataclasses.replace(config, compressor=compressor, agent=agent,
                                              memory=memory)
            if self.engine is not None:  # the same model and group, the new settings
                self.attach(*self._attached, self._optimizer)

    def register_step_callback(self, callback: Callable[[StepReport], None]) -> RemovableHandle:
        """Call ``callback(report)`` on every rank after each step (a
        :class:`~horovod_gravac.engine.StepReport`); ``remove()`` on the handle unregisters."""
        return self.engine.register_step_callback(callback)

    def untimed(self):
        """Context manager: time spent inside is not part of the step time agents see."""
        return self.engine.untimed()

    def _lr(self) -> float | None:
        return self._optimizer.param_groups[0].get("lr") if self._optimizer is not None else None

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The engine's state (:meth:`~horovod_gravac.engine.StepEngine.state_dict`: step,
        decision, residuals, compressor, agent), attached to a model or not."""
        if self.engine is not None:
            return self.engine.state_dict()
        return engine_state(self.config, self._saved_progress)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load :meth:`state_dict` (before a step is in flight)."""
        if self.engine is not None:
            self.engine.load_state_dict(state)
        else:
            self._saved_progress = load_engine_state(self.config, state)

    # -- pickling (torch.save / torch.load) --------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        # the compressor, memory and agent pickle with their state; the engine adds its own
        return {"settings": self.settings, "config": self.config,
                "last_step_skipped": self.last_step_skipped,
                "_saved_progress": self.engine.progress() if self.engine is not None
                else self._saved_progress}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "settings" not in state:  # saved before the settings were kept: from its config
            config = state["config"]
            state["settings"] = Settings(
                config.compressor, config.memory if state.pop("_memory_given", False) else None,
                config.agent.agent if isinstance(config.agent, A.AdamPhases) else config.agent,
                on_nonfinite=config.on_nonfinite, min_compress_numel=config.min_compress_numel,
                compress_patterns=config.compress_patterns, bucket_cap_mb=config.bucket_cap_mb)
        self.__dict__.update(state)
        self.engine = None
        self.adam = None  # an AdamExchangeOptimizer around the loaded state sets it again
        self._reset_step()

    # -- the step ------------------------------------------------------------------------------
    def start_bucket(self, bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
        """The hook's work for one DDP bucket: each gradient to the engine; a future that
        holds the averaged bucket once backward is done (the step finishes in a callback
        queued, at the step's first bucket, before DDP's own end of backward)."""
        if self.engine is None:
            raise ValueError("this DDPCompressionState is not attached to a model (it was "
                             "loaded): state.attach(model) or register_comm_hook(ddp_model, "
                             "state=state)")
        if not self._queued:
            # DDP queues its own end of backward (which waits for every bucket's future and
            # writes p.grad from it) after its last bucket's hook, i.e. after this one
            _after_backward(self._end_of_backward)
            self._queued = True
        for p, grad in zip(bucket.parameters(), bucket.gradients()):
            name = self._names.get(p)
            if name is None:
                raise ValueError("a bucket holds a parameter that is not in the model this "
                                 "state was attached to: call register_comm_hook(ddp_model) "
                                 "with the DDP model itself")
            self._views[name] = grad
            self.engine.begin(name, self._exchanged(p, grad))
        buffer = bucket.buffer()  # a CUDA future records the stream its value is made on
        future: torch.futures.Future[Tensor] = torch.futures.Future(
            devices=[buffer.device] if buffer.is_cuda else None)
        self._futures.append((future, buffer))
        return future

    def _exchanged(self, p: Tensor, grad: Tensor) -> Tensor:
        """What goes to the engine for ``p``: its gradient, or once Adam's variance is
        frozen its preconditioned gradient (:meth:`AdamExchange.exchanged`)."""
        exchange = self.adam
        if exchange is None:
            return grad
        if not self.engine.in_flight and self.engine.decision.variance_frozen \
                and not exchange.frozen:  # the step's first tensor: the decision's phase
            exchange.freeze()
        return exchange.exchanged(p, grad) if exchange.frozen else grad

    def _end_of_backward(self) -> None:
        """Before DDP's end of backward: finish the step, complete every bucket's future with
        its averaged gradients."""
        views, futures = self._views, self._futures
        self._reset_step()
        def write_back(name: str, averaged: Tensor) -> None:  # no copy where decoded in place
            C.write_into(views[name], averaged)

        outcome = self.engine.finish(write_back, self._lr(), views.get,
                                     self.adam.take_variance_change() if self.adam is not None else None)
        for future, buffer in futures:
            future.set_result(buffer)
        self.last_step_skipped = outcome.skipped
        if outcome.skipped:  # after DDP has written p.grad from the futures
            _after_backward(lambda: self._skip(outcome))

    def _skip(self, outcome: StepOutcome) -> None:
        for p in self._params.values():  # optimizer.step() then changes nothing, on every rank
            p.grad = None
        if outcome.error is not None:
            raise outcome.error


def compression_hook(state: DDPCompressionState,
                     bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP communication hook: hand each parameter of ``bucket`` to the state's engine
    (error feedback, compression, fused collectives); the future holds the averaged bucket
    once backward is done.

    Register it with :func:`register_comm_hook` (which builds ``state``), or directly:
    ``model.register_comm_hook(state, compression_hook)`` with an attached state.
    """
    return state.start_bucket(bucket)


def _after_backward(callback: Callable[[], None]) -> None:
    """Run ``callback`` when the autograd engine finishes this backward pass — the hook DDP
    itself uses to end its backward (PyTorch has no public one)."""
    Variable._execution_engine.queue_callback(callback)


def register_comm_hook(ddp_model: torch.nn.parallel.DistributedDataParallel,
                       process_group: dist.ProcessGroup | None = None, *,
                       optimizer: torch.optim.Optimizer | None = None,
                       state: DDPCompressionState | None = None,
                       settings: Settings | None = None, **given: Any) -> DDPCompressionState:
    """Compress ``ddp_model``'s gradients layer by layer, with error feedback and an agent.

    Arguments:
        ddp_model: a ``torch.nn.parallel.DistributedDataParallel`` model.
        process_group: the group to exchange on (default: the DDP model's).
        optimizer: whose first learning rate the agents see (Accordion and GraVAC react to
            a learning-rate decay); optional.
        state: a state from ``torch.load`` to continue from (then give no settings: the
            state carries its own).
        settings, given: the :class:`~horovod_gravac.settings.Settings` — one object, and/or its
            keyword arguments (``compression="topk:100", agent="gravac",
            bucket_cap_mb=25``); the compression defaults to ``"topk:100"``. A non-finite
            step skipped (``on_nonfinite="skip"``) leaves every gradient None, counted in
            ``state.engine.skipped_steps``. ``bucket_cap_mb`` sizes this library's buckets,
            not DDP's. For Adam/AdamW, wrap the optimizer in :class:`AdamExchangeOptimizer`.

    Returns the :class:`DDPCompressionState`; save it with ``torch.save`` to resume.
    """
    if not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
        raise ValueError("ddp_model must be a torch.nn.parallel.DistributedDataParallel, got "
                         f"{type(ddp_model).__name__}")
    if state is None:
        state = DDPCompressionState(ddp_model, process_group, optimizer=optimizer,
                                    settings=settings, **given)
    elif not isinstance(state, DDPCompressionState):
        raise ValueError(f"state must be a DDPCompressionState, got {type(state).__name__}")
    elif any(v is not None for v in given.values()) or settings is not None:
        named = ", ".join([*(k for k, v in given.items() if v is not None),
                           *(["settings"] if settings is not None else [])])
        raise ValueError(f"give either state (to continue from a saved one) or settings, not "
                         f"both: the state carries its own, but {named} was given too")
    else:
        state.attach(ddp_model, process_group, optimizer)
    ddp_model.register_comm_hook(state, compression_hook)
    return state


class AdamExchangeOptimizer(WrappedOptimizer):
    """Adam/AdamW under the Adam-family exchange (:mod:`horovod_gravac.adam`) of a DDP model
    whose gradients ``state``'s hook exchanges — as PyTorch's ``PostLocalSGDOptimizer``
    goes with its hook::

        state = ddp.register_comm_hook(model, compression="powersgd", agent="gravac")
        optimizer = ddp.AdamExchangeOptimizer(torch.optim.AdamW(model.parameters()), state)

    Until rank 0 freezes Adam's second moment the hook sends gradients dense and this
    optimizer steps the wrapped one; from then on the hook sends each rank's preconditioned
    momentum, compressed with error feedback under the agent's decisions, and ``step()``
    applies the frozen-variance update. A step the hook skipped (non-finite) changes nothing.
    Step this optimizer, never the wrapped one (its ``state_dict()`` carries the phase).

    Arguments:
        optimizer: a ``torch.optim.Adam`` or ``AdamW`` over the model's parameters.
        state: the hook's :class:`DDPCompressionState` (before a step is in flight).
        exchange: the :class:`~horovod_gravac.adam.AdamExchange` (the freeze rule); default:
            the hook's ``adam_exchange`` setting where it is one, else ``AdamExchange()``.
    """

    #: the key of the exchange's part of ``state_dict()``
    STATE_KEY = "horovod_gravac_adam"

    def __init__(self, optimizer: torch.optim.Optimizer, state: DDPCompressionState,
                 exchange: AdamExchange | None = None) -> None:
        if not isinstance(state, DDPCompressionState):
            raise ValueError(f"state must be a DDPCompressionState, got {type(state).__name__}")
        if exchange is None:
            if state.settings.adam_exchange in (adam.OFF, None):
                raise ValueError("the hook's settings say adam_exchange='off': give an "
                                 "AdamExchange here, or build the hook without it")
            chosen = state.settings.adam_exchange  # a copy: the settings stay unbound
            exchange = copy.deepcopy(chosen) if isinstance(chosen, AdamExchange) else \
                AdamExchange()
        if not isinstance(exchange, AdamExchange):
            raise ValueError(f"exchange must be an AdamExchange or None, got {exchange!r}")
        exchange.bind(optimizer)  # a ValueError for anything but Adam/AdamW
        super().__init__(optimizer)
        self.exchange, self.hook_state = exchange, state
        state.use_adam_exchange(exchange, optimizer)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Run ``closure`` (forward and backward: the hook exchanges) if given, then the
        exchange's update — unless the hook skipped this step on every rank."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if not self.hook_state.last_step_skipped:  # skipped: the gradients are None
            self.exchange.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {**self.optimizer.state_dict(), self.STATE_KEY: self.exchange.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        ours = state_dict.pop(self.STATE_KEY, None)
        self.optimizer.load_state_dict(state_dict)
        if ours is not None:
            self.exchange.load_state_dict(ours)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({type(self.optimizer).__name__}, {self.exchange!r})"
