"""The Adam-family exchange: freeze Adam's variance, then compress the preconditioned update.

**Why not the raw gradient** (1-bit Adam, Tang et al., ICML 2021). Adam's second moment
v ← β2·v + (1 − β2)·ḡ² is not linear in the averaged gradient ḡ. With a compressed ḡ the
coordinates that are rarely sent get a v that decays towards 0, and the residual they carry
arrives, when it finally is sent, amplified by 1/√v; error feedback cannot cancel that,
because the update is no longer a sum of what was sent. Measured here (gpt4x256 on PTB, AdamW,
2 ranks, 250 steps): TopK at every CF and PowerSGD rank 1 ended near the unigram plateau
where dense training went on learning.

**The exchange**, for ``torch.optim.Adam`` and ``AdamW`` (the phases of DeepSpeed's 1-bit
Adam, with the freeze decided by a variance-stability rule as in 0/1 Adam):

1. *Warm-up.* Every step the gradient is averaged dense and the wrapped optimizer steps as
   always. Every ``check_interval`` steps the relative change of √v̂ over the interval is
   measured; rank 0's agent decides when it is small enough
   (:mod:`horovod_gravac.agents.phases`), and every rank freezes at the same step.
2. *Freeze* at step T: v̂ = v_T / (1 − β2^T) stays, and d = 1 / (√v̂ + ε) is kept per
   parameter. Adam's update d ⊙ m̂ is now linear in the momentum.
3. *Compressed, preconditioned exchange.* At every later step t, as backprop produces each
   gradient g_i of rank i (layer by layer, during backward), rank i sends (Adam's L2:
   g_i + λ·p; maximize: −g_i), in the units of the update::

       x_i = d ⊙ g_i                       (sends="gradient", the default)
       x_i = d ⊙ (β1·m + (1 − β1)·g_i)     (sends="momentum", 1-bit Adam's)

   and x_i goes to the engine as a gradient would: error feedback (x_i + e_i with this
   rank's residual), compression at the agent's decision, the average x̄ (a two-stage
   compressor keeps a second residual where each chunk is summed: error feedback on both
   stages). ``step()`` then applies the same x̄ on every rank::

       m ← β1·m + (1 − β1)·x̄ / d           (sends="gradient"; "momentum": m ← x̄ / d)
       1/d ← max(1/d, |m|)                 (the floor, below)
       p ← p − lr·λ·p                      (AdamW's decoupled weight decay)
       p ← p − lr / (1 − β1^t) · d ⊙ m

With a lossless exchange this is momentum SGD under Adam's frozen preconditioner; with a
lossy one the update is linear in x̄, so error feedback makes the sum of the updates follow
the sum of what the ranks meant to send.

**The floor.** A frozen v does not follow gradients that grow after the freeze: in a
Transformer on PTB, frozen at step 20, the attention weights' gradients grew past their
frozen √v̂ and single coordinates moved 7,000 × lr at step 28; the run diverged by step 55.
Dense Adam keeps |m̂| / √v̂ of order 1 (v follows g²). So the denominator 1/d = √v̂ + ε never
stays below the magnitude of the averaged momentum: where |m| outgrows it, it rises to |m|
and stays there (a running maximum, the same on every rank, since m is). Every coordinate's
update is then at most lr / (1 − β1^t); where the floor does not bind — almost everywhere —
the update is the frozen-variance one, linear in x̄. (A residual kept where the floor rose
is in the old, larger units of x: it is sent somewhat larger than meant, and bounded like
every update.)

**Why preconditioned** (1-bit Adam compresses m itself): scaled by d, a sparsifier keeps the
coordinates whose *update* is largest (those with a small v̂ move most under Adam), a low-rank
approximation is the best one in the update's norm, and a compression gain measured on what
is exchanged — GraVAC's δ = ‖C(x)‖² / ‖x‖² — is the share of the update's energy that
survives, so a CF that costs quality shows a low gain.

**Why the gradient by default.** Sending the momentum sends the shared β1·m again at every
step, and its compression error with it; sending d ⊙ g_i leaves m to be formed after the
average, identically on every rank, from what arrived. On gpt4x256 (PTB, AdamW, 2 ranks,
250 steps, frozen at step 60; ``benchmarks/adam_freeze.py``) the gradient sends ended at
perplexity 522 with PowerSGD rank 1 and 556 with TopK 100×, the momentum sends at 563 and
603 (dense 485; the frozen exchange without compression 492). 1-bit two-stage, whose scale
per chunk keeps every coordinate, went the other way: 528 with the gradient, 511 with the
momentum.

``exp_avg`` keeps Adam's units and ``exp_avg_sq`` the frozen v, so the wrapped optimizer's
``state_dict()`` reads as Adam's. After the freeze ``p.grad`` holds x̄ after the exchange
(clipping it clips the update). A parameter whose v is 0 at the freeze (no gradient during
the whole warm-up) moves at most lr / (1 − β1^t) a step when it gets one later (the
floor), as Adam's first step would. fp16 loss scaling (``GradScaler``) is not
supported after the freeze (the momentum would mix scaled and unscaled units); bf16
autocast is.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from . import compression as C
from .agents import FreezeRule

#: the optimizers the exchange steps (``AdamW`` is ``Adam`` with decoupled weight decay)
ADAM_FAMILY: tuple[type[torch.optim.Optimizer], ...] = (torch.optim.Adam, torch.optim.AdamW)
AUTO, OFF = "auto", "off"
#: what each rank compresses once v is frozen: its preconditioned local momentum (1-bit
#: Adam's), or its preconditioned gradient with the momentum taken after the average
MOMENTUM, GRADIENT = "momentum", "gradient"
SENDS = (MOMENTUM, GRADIENT)


def is_adam_family(optimizer: Any) -> bool:
    """Whether ``optimizer`` is a ``torch.optim.Adam`` or ``AdamW`` (or a subclass)."""
    return isinstance(optimizer, ADAM_FAMILY)


def _decoupled(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> bool:
    """Whether ``group``'s weight decay is AdamW's (on the parameter) or Adam's L2."""
    return bool(group.get("decoupled_weight_decay", isinstance(optimizer, torch.optim.AdamW)))


class AdamExchange:
    """The Adam-family exchange of one wrapped Adam/AdamW (see the module docstring).

    Arguments:
        warmup: dense Adam steps at least before the variance may freeze; >= 1.
        tolerance: the variance freezes once √v̂ changed by at most this much (relative, L1)
            over a check interval; > 0.
        check_interval: steps between two measurements of that change; >= 1.
        max_warmup: freeze after this many steps at the latest (None: only by the rule).
        sends: what each rank compresses once frozen: ``"gradient"`` (its preconditioned
            gradient, the momentum taken after the average: the shared β1·m is not sent
            again) or ``"momentum"`` (1-bit Adam's: its preconditioned local momentum).

    A front-end :meth:`bind` s it to the wrapped optimizer, hands the engine
    :meth:`exchanged` instead of each gradient while :attr:`frozen`, passes
    :meth:`take_variance_change` to the engine with each step's statistics, calls
    :meth:`freeze` when the decision says so, and :meth:`step` instead of the optimizer's
    own ``step``.
    """

    def __init__(self, warmup: int = 20, tolerance: float = 0.05, check_interval: int = 10,
                 max_warmup: int | None = None, sends: str = GRADIENT) -> None:
        self.rule = FreezeRule(warmup, tolerance, check_interval, max_warmup)
        if sends not in SENDS:
            raise ValueError(f"sends must be one of {SENDS}, got {sends!r}")
        self.sends = sends
        self.optimizer: torch.optim.Optimizer | None = None
        #: the wrapped optimizer's step count (read from its state at the first step after
        #: ``bind``, counted from then on: no host read during backward)
        self.steps = 0
        self._counting = False
        #: T, the step whose v is frozen (None: warming up)
        self.frozen_step: int | None = None
        self._roots: dict[Tensor, Tensor] = {}  # √v̂ at the last check (warm-up)
        self._change: float | None = None  # the last check's r, not handed on yet
        self._denominators: dict[Tensor, Tensor] = {}  # 1/d = √v̂_T + ε, floored (frozen)
        #: per parameter: (β1, Adam's L2 λ or 0, maximize), from its group
        self._local: dict[Tensor, tuple[float, float, bool]] = {}

    @property
    def frozen(self) -> bool:
        return self.frozen_step is not None

    def __repr__(self) -> str:
        rule = self.rule
        return (f"AdamExchange(warmup={rule.warmup}, tolerance={rule.tolerance:g}, "
                f"check_interval={rule.check_interval}, max_warmup={rule.max_warmup}, "
                f"sends={self.sends!r})")

    # -- set-up ------------------------------------------------------------------------------
    def bind(self, optimizer: torch.optim.Optimizer) -> None:
        """Step ``optimizer`` (a ``torch.optim.Adam``/``AdamW``); ValueError for anything it
        cannot run (another optimizer, AMSGrad, betas outside [0, 1), eps <= 0)."""
        if not is_adam_family(optimizer):
            raise ValueError(
                "the Adam-family exchange needs a torch.optim.Adam or torch.optim.AdamW, got "
                f"{type(optimizer).__name__}; use adam_exchange='off' to exchange gradients")
        for i, group in enumerate(optimizer.param_groups):
            if group.get("amsgrad"):
                raise ValueError(f"param_groups[{i}]: amsgrad=True is not supported by the "
                                 "Adam-family exchange (use amsgrad=False, or "
                                 "adam_exchange='off')")
            if group.get("differentiable"):
                raise ValueError(f"param_groups[{i}]: differentiable=True is not supported by "
                                 "the Adam-family exchange")
            betas = group["betas"]
            for j, beta in enumerate(betas):
                if not 0.0 <= float(beta) < 1.0:
                    raise ValueError(f"param_groups[{i}]: betas[{j}] must be in [0, 1), got "
                                     f"{float(beta)!r}")
            if not float(group["eps"]) > 0:
                raise ValueError(f"param_groups[{i}]: eps must be > 0 for the Adam-family "
                                 f"exchange (the frozen preconditioner is 1/(√v + eps)), "
                                 f"got {group['eps']!r}")
        self.optimizer = optimizer
        self._counting = False

    def _parameters(self) -> Iterator[tuple[dict[str, Any], Tensor]]:
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                yield group, p

    def _optimizer_steps(self) -> int:
        """The wrapped optimizer's step count (one host read; 0 before its first step)."""
        steps = [state["step"] for state in self.optimizer.state.values() if "step" in state]
        return int(max(float(s) for s in steps)) if steps else 0

    # -- the phases --------------------------------------------------------------------------
    def freeze(self) -> None:
        """Freeze v at the current step T (every rank at the same step: the decision's)."""
        if not self._counting:  # frozen before any step since bind
            self.steps, self._counting = self._optimizer_steps(), True
        self.frozen_step = self.steps
        with torch.no_grad():
            for group, p in self._parameters():
                state = self.optimizer.state[p]
                if "exp_avg_sq" not in state:  # no step yet: Adam's fresh state
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p,
                                                           memory_format=torch.preserve_format)
                self._denominators[p] = self._denominator(group, state["exp_avg_sq"])
        self._roots.clear()
        self._change = None
        self._read_groups()

    def _denominator(self, group: dict[str, Any], exp_avg_sq: Tensor) -> Tensor:
        correction = 1.0 - float(group["betas"][1]) ** max(self.frozen_step, 1)
        return exp_avg_sq.div(correction).sqrt_().add_(float(group["eps"]))

    def _read_groups(self) -> None:
        self._local = {}
        for group, p in self._parameters():
            l2 = 0.0 if _decoupled(self.optimizer, group) else float(group["weight_decay"])
            self._local[p] = (float(group["betas"][0]), l2, bool(group.get("maximize")))

    def exchanged(self, p: Tensor, grad: Tensor) -> Tensor:
        """What rank i sends for ``p`` once frozen: x_i = d ⊙ g_i — or, with
        ``sends="momentum"``, d ⊙ (β1·m + (1 − β1)·g_i) —, a new tensor (elementwise on the
        device: no host synchronisation)."""
        beta1, l2, maximize = self._local[p]
        if maximize:
            grad = grad.neg()
        if l2:
            grad = grad.add(p.detach(), alpha=l2)
        if self.sends == GRADIENT:
            return grad.div(self._denominators[p])
        local = torch.lerp(self.optimizer.state[p]["exp_avg"], grad, 1.0 - beta1)
        return local.div_(self._denominators[p])

    def take_variance_change(self) -> float | None:
        """The relative change of √v̂ measured at the last check, once (for the agent)."""
        change, self._change = self._change, None
        return change

    # -- the update --------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """The wrapped optimizer's step while warming up; the frozen-variance update of the
        exchanged x̄ (``p.grad``) after the freeze."""
        if not self.frozen:
            loss = self.optimizer.step(closure)
            # the wrapped optimizer may have stepped without us (Horovod's
            # broadcast_optimizer_state makes its state by a step): read its count once
            self.steps = self.steps + 1 if self._counting else self._optimizer_steps()
            self._counting = True
            if self.steps % self.rule.check_interval == 0:
                self._check_variance()
            return loss
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.steps += 1
        with torch.no_grad():
            for group in self.optimizer.param_groups:
                lr, weight_decay = float(group["lr"]), float(group["weight_decay"])
                decay = _decoupled(self.optimizer, group) and weight_decay != 0
                beta1 = float(group["betas"][0])
                step_size = lr / (1.0 - beta1 ** self.steps)
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    state, denominator = self.optimizer.state[p], self._denominators[p]
                    if self.sends == GRADIENT:  # m ← β1·m + (1 − β1)·ḡ, ḡ = z̄ / d
                        momentum = state["exp_avg"].mul_(beta1).addcmul_(
                            p.grad, denominator, value=1.0 - beta1)
                    else:
                        momentum = torch.mul(p.grad, denominator, out=state["exp_avg"])
                    torch.maximum(denominator, momentum.abs(), out=denominator)
                    if decay:
                        p.mul_(1.0 - lr * weight_decay)
                    p.addcdiv_(momentum, denominator, value=-step_size)
                    state["step"] += 1
        self._read_groups()
        return loss

    def _check_variance(self) -> None:
        """r = Σ|√v̂_t − √v̂_{t−k}| / Σ√v̂_t since the last check (one host read)."""
        steps = self.steps
        changed, total, compared = [], [], False
        with torch.no_grad():
            for group, p in self._parameters():
                state = self.optimizer.state.get(p, {})
                if "exp_avg_sq" not in state:
                    continue
                root = state["exp_avg_sq"].div(1.0 - float(group["betas"][1]) ** steps).sqrt_()
                total.append(root.sum(dtype=torch.float64))
                last = self._roots.get(p)
                if last is not None:
                    changed.append((root - last).abs_().sum(dtype=torch.float64))
                    last.copy_(root)
                    compared = True
                else:
                    self._roots[p] = root
        if compared and total:
            device = total[0].device
            sums = torch.stack([torch.stack([x.to(device) for x in changed]).sum(),
                                torch.stack([x.to(device) for x in total]).sum()]).tolist()
            self._change = sums[0] / sums[1] if sums[1] > 0 else 0.0

    # -- state -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The phase, the step count, the warm-up's last measurement and the floored
        denominators (plain containers and tensors, keyed by the parameter's index in the
        optimizer, as Adam's own state)."""
        index = {p: i for i, (_, p) in enumerate(self._parameters())}
        return {"steps": self.steps, "frozen_step": self.frozen_step, "change": self._change,
                "roots": {index[p]: r.clone() for p, r in self._roots.items()},
                "denominators": {index[p]: d.clone() for p, d in self._denominators.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (after the wrapped optimizer loaded its own)."""
        params = [p for _, p in self._parameters()]

        def by_parameter(tensors: dict[Any, Tensor]) -> dict[Tensor, Tensor]:
            return {params[int(i)]: t.clone().to(params[int(i)].device)
                    for i, t in tensors.items()}

        self._roots = by_parameter(state["roots"])
        self._denominators = by_parameter(state["denominators"])
        self._change = state["change"]
        self.frozen_step = state["frozen_step"]
        self.steps, self._counting = state["steps"], True
        if self.frozen:
            self._read_groups()


def create(spec: str | AdamExchange | None, optimizer: torch.optim.Optimizer,
           compressor: C.Compressor) -> AdamExchange | None:
    """The exchange a front-end runs for ``spec``: ``"auto"`` — one for an Adam/AdamW whose
    gradients ``compressor`` would compress by more than fp16 does, else none; ``"off"`` or
    None — none; an :class:`AdamExchange` — that one (bound to ``optimizer``)."""
    if spec is None or spec == OFF:
        return None
    if spec == AUTO:
        if not is_adam_family(optimizer) or compressor.preserves_adam:
            return None
        spec = AdamExchange()
    if not isinstance(spec, AdamExchange):
        raise ValueError(f"adam_exchange must be 'auto', 'off' or an AdamExchange, got {spec!r}")
    spec.bind(optimizer)
    return spec


def create_memory(memory: str | C.Memory | None, compressor: C.Compressor,
                  exchange: AdamExchange | None) -> C.Memory:
    """The error-feedback memory: under the exchange, the residual one unless another is
    given (the exchanged update needs error feedback whatever the compressor's own default), never
    DGC's (it keeps a momentum of its own)."""
    if exchange is None:
        return C.create_memory(memory, compressor)
    made = C.create_memory("residual" if memory is None else memory, compressor)
    if isinstance(made, C.DGCMemory):
        raise ValueError("memory='dgc' keeps a momentum of its own and cannot carry Adam's: "
                         "use memory='residual' with the Adam-family exchange, or "
                         "adam_exchange='off'")
    return made
