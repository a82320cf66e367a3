"""The same compression, error feedback and agents for ``torch.distributed``: a DDP
communication hook.

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

1. DDP calls :func:`compression_hook` for each bucket, in the same order on every rank. For
   each parameter of the bucket — layer-wise, not the flat bucket — the gradient gets error
   feedback (g + residual) and is compressed at the agent's current CF; its collective starts
   at once (``all_reduce`` for fixed-size payloads, ``all_gather`` for sparse ones, two
   ``all_reduce`` for PowerSGD). Tensors below ``min_compress_numel`` (biases, norms) get a
   dense ``all_reduce`` each — sums that do not depend on how DDP buckets them, so a resumed
   run equals an uninterrupted one bit for bit —; with ``compression="none"`` each bucket is
   one ``all_reduce``, exactly DDP's own.
2. The hook returns at once, so backprop and communication overlap. Results are written
   after DDP's end of backward, by a callback the hook queues on the autograd engine:
   PowerSGD's second phase (in bucket order: every rank issues the same collectives in the
   same order, which PyTorch's own PowerSGD hook does not guarantee on Gloo with several
   buckets), then each averaged gradient into ``p.grad``.
3. Then the end of the step, as in the Horovod optimizer (shared code,
   :class:`~horovod_gravac.exchange.GradientExchange`): one host read decides whether the
   averaged gradient is finite. If not, every rank sets the gradients of this step to
   ``None`` — ``optimizer.step()`` then changes nothing — and counts a skipped step
   (``on_nonfinite="skip"``), or raises :class:`NonFiniteGradientError` out of
   ``backward()`` (``"raise"``); the rank whose gradient it was restarts that residual at
   zero. Otherwise the agent's statistics are combined across ranks, rank 0 decides, the
   decision is broadcast, and every rank applies it from the next step.

``model.no_sync()`` accumulation needs nothing: DDP calls no hook inside it, and the next
synchronised backward exchanges the accumulated gradients. Unused parameters
(``find_unused_parameters=True``) are exchanged as zeros, like DDP.
"""
# No "from __future__ import annotations": DDP checks the hook's annotations are the real
# dist.GradBucket and torch.futures.Future[torch.Tensor].
from typing import Any, Mapping

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd import Variable

from . import agents as A
from . import compression as C
from .communication_torch import TorchCommunicator, TorchPending
from .exchange import GradientExchange, NonFiniteGradientError

__all__ = ["DDPCompressionState", "NonFiniteGradientError", "compression_hook",
           "register_comm_hook"]


class DDPCompressionState:
    """Everything :func:`compression_hook` keeps between steps, for one model.

    Arguments:
        module: the model (or the DDP model around it) whose parameters the hook will see;
            DDP keeps the same parameter objects, so the state can be made before DDP wraps
            the model (Lightning's ``DDPStrategy(ddp_comm_state=...)``).
        compression, memory, agent, process_group, on_nonfinite, min_compress_numel,
        compress_patterns, optimizer: as for :func:`register_comm_hook`.

    ``exchange`` holds the compressor, the error-feedback memory, the agent and its decision,
    byte counts (``state.exchange.communication``) and the step counter. The state pickles
    (``torch.save(state, f)``) without its process group and model, like PyTorch's
    ``PowerSGDState``; ``register_comm_hook(model, state=torch.load(f, weights_only=False))``
    (or ``state.attach(module)``) binds it to a model again and training continues bit for
    bit.
    """

    def __init__(self, module: torch.nn.Module, compression: str | C.Compressor = "topk:100",
                 memory: str | C.Memory | None = None, agent: str | A.Agent | None = None,
                 process_group: dist.ProcessGroup | None = None, *,
                 on_nonfinite: str = "skip",
                 min_compress_numel: int = C.DEFAULT_MIN_COMPRESS_NUMEL,
                 compress_patterns: Mapping[str, bool] | None = None,
                 optimizer: torch.optim.Optimizer | None = None) -> None:
        self.compressor = C.create(compression)
        self.memory = C.create_memory(memory, self.compressor)
        self.agent = A.create(agent)
        if self.agent is not None:
            C.check_adjustable(self.compressor, self.agent.name)
        self.on_nonfinite = on_nonfinite
        self.min_compress_numel = min_compress_numel
        self.compress_patterns = dict(compress_patterns or {})
        #: whether the last step's averaged gradient was non-finite (gradients set to None)
        self.last_step_skipped = False
        self.exchange: GradientExchange | None = None
        self._saved_progress: dict[str, Any] | None = None
        self._reset_step()
        self.attach(module, process_group, optimizer)

    def _reset_step(self) -> None:
        self._queued = False
        self._in_flight: list[tuple[list[tuple[str, Tensor]], TorchPending, Tensor | None]] = []

    def attach(self, module: torch.nn.Module, process_group: dist.ProcessGroup | None = None,
               optimizer: torch.optim.Optimizer | None = None) -> None:
        """Bind to ``module``'s parameters and a process group (None: the default group)."""
        if isinstance(module, torch.nn.parallel.DistributedDataParallel):
            process_group = process_group or module.process_group
            module = module.module
        if not isinstance(module, torch.nn.Module):
            raise ValueError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError(f"optimizer must be a torch.optim.Optimizer or None, got "
                             f"{type(optimizer).__name__}")
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self._names = {p: n for n, p in named}
        self._params = dict(named)
        self._optimizer = optimizer
        self.communicator = TorchCommunicator(process_group)
        uncompressed = C.uncompressed_tensors(((n, p.numel()) for n, p in named),
                                              self.min_compress_numel, self.compress_patterns)
        if isinstance(self.compressor, C.NoCompression):  # all of a bucket in one allreduce
            uncompressed = frozenset(self._params)
        self.exchange = GradientExchange(self.compressor, self.memory, self.agent,
                                         self.communicator, [n for n, _ in named], uncompressed,
                                         self.on_nonfinite)
        if self._saved_progress is not None:  # unpickled: the objects hold the rest
            self.exchange.load_progress(self._saved_progress)
            self._saved_progress = None

    def _lr(self) -> float | None:
        return self._optimizer.param_groups[0].get("lr") if self._optimizer is not None else None

    # -- pickling (torch.save / torch.load) --------------------------------------------------
    def __getstate__(self) -> dict[str, Any]:
        keep = ("compressor", "memory", "agent", "on_nonfinite", "min_compress_numel",
                "compress_patterns", "last_step_skipped")
        state = {k: getattr(self, k) for k in keep}
        # the compressor, memory and agent pickle with their state; the exchange adds its own
        state["_saved_progress"] = self.exchange.progress() if self.exchange is not None \
            else self._saved_progress
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.exchange = None
        self._reset_step()

    # -- the step ------------------------------------------------------------------------------
    def _start_bucket(self, bucket: dist.GradBucket) -> None:
        exchange, dense = self.exchange, []
        for p, grad in zip(bucket.parameters(), bucket.gradients()):
            name = self._names.get(p)
            if name is None:
                raise ValueError("a bucket holds a parameter that is not in the model this "
                                 "state was attached to: call register_comm_hook(ddp_model) "
                                 "with the DDP model itself")
            if name in exchange.uncompressed:
                dense.append((name, grad))
                continue
            pending, compensated = exchange.start(name, grad)
            self._in_flight.append(([(name, grad)], pending, compensated))
        if dense and len(dense) == len(bucket.parameters()) and \
                isinstance(self.compressor, C.NoCompression):  # DDP's own allreduce, exactly
            self._in_flight.append((dense, self.communicator.start_dense(
                dense[0][0], bucket.buffer()), None))
        else:  # one tensor at a time: the sums do not depend on DDP's bucketing (resume)
            for name, grad in dense:
                self._in_flight.append(([(name, grad)], self.communicator.start_dense(
                    name, grad), None))

    def _end_step(self) -> None:
        """After DDP's end of backward: finish every exchange, write ``p.grad``, end the step."""
        exchange, in_flight = self.exchange, self._in_flight
        self._reset_step()
        for _, pending, compensated in in_flight:  # PowerSGD's Q, in the order P was sent
            if pending.ctx is not None and pending.ctx.exchange is C.Exchange.LOWRANK:
                exchange.second_phase(pending, compensated)
        averaged = {}
        for members, pending, _ in in_flight:
            reduced = exchange.finish(pending, sum(g.numel() for _, g in members))
            offset = 0
            for name, grad in members:
                part = reduced.reshape(-1)[offset:offset + grad.numel()].view_as(grad)
                offset += grad.numel()
                p = self._params[name]
                if p.grad is not None:
                    if part.data_ptr() != p.grad.data_ptr():
                        p.grad.copy_(part)
                    averaged[name] = p.grad
        skip, culprits, _ = exchange.end_step(averaged, self._lr())
        exchange.step_count += 1
        self.last_step_skipped = skip
        if skip:  # optimizer.step() then changes nothing, on every rank
            for p in self._params.values():
                p.grad = None
            if self.on_nonfinite == "raise":
                raise exchange.nonfinite_error(culprits)


def compression_hook(state: DDPCompressionState,
                     bucket: dist.GradBucket) -> torch.futures.Future[Tensor]:
    """DDP communication hook: compress each parameter of ``bucket`` with error feedback and
    start its exchange; the averaged gradients are written at the end of backward.

    Register it with :func:`register_comm_hook` (which builds ``state``), or directly:
    ``model.register_comm_hook(state, compression_hook)`` with an attached state.
    """
    if state.exchange is None:
        raise ValueError("this DDPCompressionState is not attached to a model (it was "
                         "loaded): state.attach(model) or register_comm_hook(ddp_model, "
                         "state=state)")
    if not state._queued:
        # DDP queues its own end of backward (which copies each bucket's future value into
        # p.grad) when its last bucket is ready, i.e. after this; a callback queued from a
        # callback runs after every callback queued before it, so the averaged gradients
        # are written after DDP's copy, whatever the order of the first two.
        Variable._execution_engine.queue_callback(
            lambda: Variable._execution_engine.queue_callback(state._end_step))
        state._queued = True
    state.communicator.device = bucket.buffer().device
    state._start_bucket(bucket)
    future: torch.futures.Future[Tensor] = torch.futures.Future()
    future.set_result(bucket.buffer())  # overwritten in p.grad by state._end_step
    return future


def register_comm_hook(ddp_model: torch.nn.parallel.DistributedDataParallel,
                       compression: str | C.Compressor = "topk:100",
                       memory: str | C.Memory | None = None,
                       agent: str | A.Agent | None = None,
                       process_group: dist.ProcessGroup | None = None, *,
                       on_nonfinite: str = "skip",
                       min_compress_numel: int = C.DEFAULT_MIN_COMPRESS_NUMEL,
                       compress_patterns: Mapping[str, bool] | None = None,
                       optimizer: torch.optim.Optimizer | None = None,
                       state: DDPCompressionState | None = None) -> DDPCompressionState:
    """Compress ``ddp_model``'s gradients layer by layer, with error feedback and an agent.

    Arguments:
        ddp_model: a ``torch.nn.parallel.DistributedDataParallel`` model.
        compression: a compressor, registry name or ``"name:value"`` string (``"topk:100"``).
        memory: the error-feedback memory (default: the compressor's own).
        agent: ``"static"``, ``"gravac"``, ``"accordion"`` or an agent object; rank 0 of the
            process group decides, the decision is broadcast.
        process_group: the group to exchange on (default: the DDP model's).
        on_nonfinite: ``"skip"`` (the gradients of a non-finite step become None on every
            rank, counted in ``state.exchange.skipped_steps``) or ``"raise"``.
        min_compress_numel: gradients with fewer elements are sent uncompressed.
        compress_patterns: name patterns → always (True) / never (False) compress.
        optimizer: whose first learning rate the agents see (Accordion and GraVAC react to
            a learning-rate decay); optional.
        state: a state from ``torch.load`` to continue from (then give no compression,
            memory or agent: the state carries its own).

    Returns the :class:`DDPCompressionState`; save it with ``torch.save`` to resume.
    """
    if not isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel):
        raise ValueError("ddp_model must be a torch.nn.parallel.DistributedDataParallel, got "
                         f"{type(ddp_model).__name__}")
    if state is None:
        state = DDPCompressionState(ddp_model, compression, memory, agent, process_group,
                                    on_nonfinite=on_nonfinite,
                                    min_compress_numel=min_compress_numel,
                                    compress_patterns=compress_patterns, optimizer=optimizer)
    elif not isinstance(state, DDPCompressionState):
        raise ValueError(f"state must be a DDPCompressionState, got {type(state).__name__}")
    elif compression != "topk:100" or memory is not None or agent is not None:
        raise ValueError("give either state (to continue from a saved one) or compression/"
                         "memory/agent, not both: the state carries its own")
    else:
        state.attach(ddp_model, process_group, optimizer)
    ddp_model.register_comm_hook(state, compression_hook)
    return state
