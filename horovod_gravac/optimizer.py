"""``DistributedOptimizer``: layer-wise compressed gradient exchange with error feedback.

Drop-in for ``hvd.DistributedOptimizer``. A post-accumulate-grad hook on every parameter
compresses its gradient (after error feedback) and starts the asynchronous collective as soon
as backprop produces it, overlapping communication with the rest of the backward pass;
``step()`` waits, decompresses, averages, writes ``p.grad`` and steps the wrapped optimizer.
"""
from __future__ import annotations

import contextlib
import time
import warnings
from collections import defaultdict, deque
from typing import Any, Iterable, Iterator

import horovod.torch as hvd
import torch
from torch import Tensor

from . import agents as A
from . import compression as C
from .communication import Communicator, Pending
from .validation import check_number

GRANULARITIES = ("layer", "model")
NONFINITE_ACTIONS = ("skip", "raise")
MODEL_TENSOR = "__model__"
#: the key of this library's part of ``state_dict()`` (memories, compressor, agent, step)
STATE_KEY = "horovod_gravac"


class NonFiniteGradientError(FloatingPointError):
    """Raised on every rank when ``on_nonfinite="raise"`` and a step's gradient is not finite."""


class CommunicationStats:
    """Bytes each rank put on the wire: per step, per tensor, and cumulative.

    ``dense_bytes`` is what an uncompressed float32 exchange of the same gradients sends, so
    ``dense_bytes / bytes`` is the achieved compression factor.
    """

    def __init__(self) -> None:
        self.steps = 0
        self.total_bytes = 0
        self.total_dense_bytes = 0
        self.last_step: dict[str, int] = {}
        self._current: dict[str, int] = {}
        self._current_dense = 0
        self.last_dense_bytes = 0

    def record(self, name: str, wire_bytes: int, numel: int) -> None:
        self._current[name] = self._current.get(name, 0) + wire_bytes
        self._current_dense += 4 * numel

    def end_step(self) -> None:
        self.last_step, self._current = self._current, {}
        self.last_dense_bytes, self._current_dense = self._current_dense, 0
        self.total_bytes += sum(self.last_step.values())
        self.total_dense_bytes += self.last_dense_bytes
        self.steps += 1

    @property
    def last_bytes(self) -> int:
        return sum(self.last_step.values())

    @property
    def float32_equivalents(self) -> float:
        """Cumulative bytes sent, in float32 elements."""
        return self.total_bytes / 4

    def state_dict(self) -> dict[str, Any]:
        return {"steps": self.steps, "total_bytes": self.total_bytes,
                "total_dense_bytes": self.total_dense_bytes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = state["steps"]
        self.total_bytes = state["total_bytes"]
        self.total_dense_bytes = state["total_dense_bytes"]


class DistributedOptimizer(torch.optim.Optimizer):
    """Wraps ``optimizer`` so gradients are compressed, exchanged and averaged across ranks.

    Arguments mean what they mean for ``hvd.DistributedOptimizer``; in addition
    ``compression`` is a :class:`~horovod_gravac.compression.Compressor`, a registry name or a
    ``"name:value"`` string (``"topk:100"``), ``memory`` the error-feedback memory (default:
    the compressor's own), and ``granularity="model"`` compresses all gradients flattened into
    one vector once per step instead of layer by layer.

    A NaN/Inf gradient never enters a residual: the rank that has it sends it without error
    feedback, the averaged gradient then is non-finite on every rank, and every rank skips
    the step (``on_nonfinite="skip"``, counted in ``skipped_steps``) or raises
    :class:`NonFiniteGradientError` (``"raise"``). Finite ranks keep their residuals.
    """

    def __init__(self, optimizer: torch.optim.Optimizer,
                 named_parameters: Iterable[tuple[str, Tensor]] | None = None,
                 compression: str | C.Compressor = "none",
                 backward_passes_per_step: int = 1,
                 op=hvd.Average,
                 gradient_predivide_factor: float = 1.0,
                 process_set=hvd.global_process_set,
                 granularity: str = "layer",
                 memory: str | C.Memory | None = None,
                 agent: str | A.Agent | None = None,
                 on_nonfinite: str = "skip") -> None:
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
        if on_nonfinite not in NONFINITE_ACTIONS:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_ACTIONS}, got {on_nonfinite!r}")
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
        agent = A.create(agent)
        if agent is not None:
            C.check_adjustable(self.compressor, agent.name)

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
        self.on_nonfinite = on_nonfinite
        self.agent = agent
        self.communicator = Communicator(op, gradient_predivide_factor, process_set)
        self.communication = CommunicationStats()
        ids = {id(p) for p in params}
        self._names = {p: n for n, p in named if id(p) in ids}
        self._requires_update = [p for p in params if p.requires_grad]
        self._passes: dict[Tensor, int] = defaultdict(int)
        self._pending: dict[Tensor, tuple[Pending, Tensor, Any]] = {}
        self._synchronized = False
        self._should_synchronize = True
        self.step_count = 0
        #: steps whose averaged gradient was not finite (not applied), and this rank's culprits
        self.skipped_steps = 0
        self._nonfinite_local: list[str] = []
        self._skip = False
        self.decision = agent.initial_decision() if agent is not None else None
        #: the decision applied at each of the last RECENT_STEPS steps, on this rank
        self.decisions: deque[A.Decision] = deque(maxlen=A.RECENT_STEPS)
        self._dense = C.NoCompression()
        self._gain_terms: list[Tensor] = []
        self._last_sync = time.perf_counter()
        self._untimed = 0.0  # seconds inside untimed() since the last synchronize()
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready)
                       for p in self._requires_update] if granularity == "layer" else []

    # -- backprop hooks ------------------------------------------------------------------
    def _on_grad_ready(self, p: Tensor) -> None:
        self._passes[p] += 1
        if self._passes[p] < self.backward_passes_per_step:
            return
        if p in self._pending:
            raise RuntimeError(
                f"gradient of {self._names[p]} was computed more than backward_passes_per_step="
                f"{self.backward_passes_per_step} time(s) before step(); call step() or "
                "synchronize() after every backward_passes_per_step backward passes")
        self._start(p, self._names[p], self._gradient(p))

    @staticmethod
    def _gradient(p: Tensor) -> Tensor:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        elif p.grad.is_sparse:  # embedding(sparse=True): exchanged dense, as sparse_as_dense
            p.grad = p.grad.to_dense()
        return p.grad

    def _start(self, key: Any, name: str, grad: Tensor) -> None:
        finite = bool(torch.isfinite(grad).all())
        if finite:
            compensated = self.memory.compensate(grad, name)
        else:  # sent as is (NaN stays visible to every rank); the memory never sees it
            self._nonfinite_local.append(name)
            compensated = grad
        compressor, decision = self.compressor, self.decision
        if decision is None:
            payload, ctx = compressor.compress(compensated, name, self.step_count)
        elif self.agent.needs_gain_stats:
            payload, ctx, compressor = self._multilevel(grad, compensated, name, decision, finite)
        else:
            compressor.cf = decision.cf_for(name)
            payload, ctx = compressor.compress(compensated, name, self.step_count)
        # The residual is taken before the collective starts: allreduces run in place on
        # the payload, so reading it afterwards would race with Horovod.
        if not finite:
            compensated = None
        elif compressor is self._dense:  # GraVAC's dense branch: the residual restarts at 0
            self.memory.reset(name)
            compensated = None
        elif ctx.exchange is not C.Exchange.LOWRANK:  # PowerSGD's error needs phase 2 first
            self.memory.update(name, compensated, compressor, payload, ctx)
            compensated = None
        pending = self.communicator.start(name, compressor, payload, ctx)
        self._pending[key] = (pending, compensated, grad)

    def _levels(self, tensor: Tensor, name: str, decision: A.Decision, second: bool = True):
        """Multi-level compression: C(x, θmin), then (if ``second``) C(C(x, θmin), θs)
        within that selection."""
        c = self.compressor
        c.cf = decision.theta_min
        p_min, ctx_min = c.compress(tensor, name, self.step_count)
        return (p_min, ctx_min), c.recompress(p_min, ctx_min, decision.cf) if second else None

    def _multilevel(self, grad: Tensor, g_o: Tensor, name: str, decision: A.Decision,
                    finite: bool):
        """GraVAC's step: send the decided level of g_o; measure the gain terms if asked.

        What is sent is always C(g_o) with error feedback; the gain may be measured on the
        fresh gradient instead (``GainMeasure``), which costs a second compression of it.
        """
        measure = self.agent.gain_measure if decision.measure_gain and finite else None
        on_compensated = measure is not None and measure.compressed == A.COMPENSATED
        sent_levels = None
        if decision.send != A.SEND_DENSE:
            sent_levels = self._levels(g_o, name, decision,
                                       second=on_compensated or decision.send == A.SEND_COMPRESSED)
        if measure is not None:
            levels = sent_levels if on_compensated and sent_levels else \
                self._levels(g_o if on_compensated else grad, name, decision)
            reference = g_o if measure.reference == A.COMPENSATED else grad
            c = self.compressor
            terms = torch.stack([torch.linalg.vector_norm(reference).float().square(),
                                 c.sent_norm_sq(*levels[0]), c.sent_norm_sq(*levels[1])])
            self._gain_terms.append((terms.sqrt() if measure.power == 1 else terms).double())
        if decision.send == A.SEND_COMPRESSED:
            return (*sent_levels[1], self.compressor)
        if decision.send == A.SEND_MIN:
            return (*sent_levels[0], self.compressor)
        payload, ctx = self._dense.compress(g_o, name)
        return payload, ctx, self._dense

    # -- the Horovod optimizer API ---------------------------------------------------------
    def synchronize(self) -> None:
        """Wait for every exchange and write the averaged gradients into ``p.grad``."""
        if self.granularity == "model":
            self._start_model()
        else:
            for p in self._requires_update:  # no gradient on this rank: send zeros, never hang
                if p not in self._pending:
                    self._start(p, self._names[p], self._gradient(p))
        lowrank = [(k, v) for k, v in self._pending.items()
                   if v[0].ctx.exchange is C.Exchange.LOWRANK]
        for key, (pending, compensated, grad) in lowrank:
            q = self.communicator.start_second_phase(pending)
            if compensated is not None:
                self.memory.update(pending.name, compensated, self.compressor, q, pending.ctx)
        for key, (pending, _, grad) in self._pending.items():
            reduced = self.communicator.finish(pending)
            self.communication.record(pending.name, pending.wire_bytes, grad.numel())
            if key == MODEL_TENSOR:
                self._scatter_model(reduced)
            elif reduced.data_ptr() != grad.data_ptr():  # dense in place: already there
                grad.copy_(reduced.view_as(grad))
        self.communication.end_step()
        self._pending.clear()
        self._passes.clear()
        self._synchronized = True
        self._skip = not self._averaged_finite()
        if self.agent is not None:
            self.decisions.append(self.decision)
        local, self._nonfinite_local = self._nonfinite_local, []
        if self._skip:
            self._gain_terms.clear()
            if self.on_nonfinite == "raise":
                culprit = (f"this rank's gradient of {', '.join(local)} is non-finite" if local
                           else "another rank's gradient is non-finite")
                raise NonFiniteGradientError(
                    f"step {self.step_count}: the averaged gradient contains NaN/Inf ({culprit}); "
                    "lower the learning rate or use on_nonfinite='skip'")
            return
        if self.agent is not None:
            self._consult_agent(self._layer_norms())

    def _averaged_finite(self) -> bool:
        """One check of all averaged gradients: identical on every rank, so is the verdict."""
        grads = [p.grad for p in self._requires_update]
        if not grads:
            return True
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())

    def _layer_norms(self) -> dict[str, float] | None:
        """Norms of the averaged gradients (identical on all ranks), for Accordion on rank 0."""
        if not self.agent.needs_layer_norms or self.communicator.rank != 0:
            return None
        params = self._requires_update
        norms = torch.stack([torch.linalg.vector_norm(p.grad, dtype=torch.float64) for p in params])
        return dict(zip((self._names[p] for p in params), norms.tolist()))

    def _consult_agent(self, layer_norms: dict[str, float] | None) -> None:
        """Combine statistics, let rank 0 decide, broadcast: every rank applies the same."""
        now = time.perf_counter()
        iter_time, self._last_sync = now - self._last_sync - self._untimed, now
        self._untimed = 0.0
        gains = [0.0, 0.0, 0.0]
        if self.agent.needs_gain_stats:
            local = torch.stack(self._gain_terms).sum(0).tolist() if self._gain_terms else gains
            gains = self.communicator.combine(local + [iter_time])
            iter_time = gains.pop() / self.communicator.size
        self._gain_terms.clear()
        stats = A.StepStats(step=self.step_count, iter_time=iter_time,
                            world_size=self.communicator.size, gain_reference=gains[0],
                            gain_min=gains[1], gain_compressed=gains[2],
                            gain_measured=self.decision.measure_gain,
                            lr=self.param_groups[0].get("lr"), sent=self.decision.send,
                            layer_norms=layer_norms or {})
        if not self.agent.adaptive:
            self.decision = self.agent.decide(stats)
            return
        decision = self.agent.decide(stats) if self.communicator.rank == 0 else None
        self.decision = self.communicator.broadcast_decision(decision)

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

    @contextlib.contextmanager
    def untimed(self) -> Iterator[None]:
        """Context manager: time spent inside is not part of the step time agents see.

        Wrap evaluation, checkpointing and logging between steps in it, so GraVAC's
        throughput per CF measures training steps only.
        """
        start = time.perf_counter()
        try:
            yield
        finally:
            self._untimed += time.perf_counter() - start

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
        self.step_count += 1
        if self._skip:
            self._skip = False
            self.skipped_steps += 1
            return None
        return self.optimizer.step(closure)

    def zero_grad(self, set_to_none: bool = True) -> None:
        if self._pending:
            raise AssertionError("optimizer.zero_grad() was called after loss.backward() "
                                 "but before optimizer.step() or optimizer.synchronize()")
        self.optimizer.zero_grad(set_to_none=set_to_none)

    # -- state -----------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state = self.optimizer.state_dict()
        state[STATE_KEY] = {
            "step": self.step_count,
            "skipped_steps": self.skipped_steps,
            "memory": self.memory.state_dict(),
            "compressor": self.compressor.state_dict(),
            "communication": self.communication.state_dict(),
            "agent": self.agent.state_dict() if self.agent is not None else None,
            "decision": self.decision,
        }
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        ours = state_dict.pop(STATE_KEY, None)
        self.optimizer.load_state_dict(state_dict)
        self._forget_step_in_flight()
        if ours is not None:
            self.step_count = ours["step"]
            self.skipped_steps = ours.get("skipped_steps", 0)
            self.memory.load_state_dict(ours["memory"])
            self.compressor.load_state_dict(ours["compressor"])
            self.communication.load_state_dict(ours["communication"])
            if self.agent is not None and ours.get("agent") is not None:
                self.agent.load_state_dict(ours["agent"])
                self.decision = ours["decision"]

    def _forget_step_in_flight(self) -> None:
        """Drop a half-done step (exchanges of a Horovod world that is gone, after elastic)."""
        self._pending.clear()
        self._passes.clear()
        self._gain_terms.clear()
        self._nonfinite_local = []
        self._synchronized = self._skip = False

    def __repr__(self) -> str:
        return (f"{type(self).__name__}({type(self.optimizer).__name__}, "
                f"compression={self.compressor!r}, granularity={self.granularity!r})")


from . import elastic as _elastic  # noqa: E402,F401  registers the Horovod-elastic state handler
