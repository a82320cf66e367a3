"""The Adam-family exchange through the DDP hook on real ranks (torchrun, Gloo):
``ddp.AdamExchangeOptimizer`` freezes at the same step on every rank, every rank ends with
the same parameters and Adam state, a job saved before or after the freeze and resumed
(``torch.save`` of the hook state and the optimizer's ``state_dict``) ends bit for bit like the
whole one, and NaN steps are skipped on every rank in either phase.
"""
import io

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch.nn.parallel import DistributedDataParallel as DDP

import horovod_gravac as hg
from horovod_gravac import ddp
from horovod_gravac.adam import AdamExchange
from tests.multirank import report

dist.init_process_group("gloo")
torch.set_num_threads(1)
RANK, SIZE = dist.get_rank(), dist.get_world_size()
STEPS, SPLITS = 16, (3, 11)
NAN_STEPS = (2, 12)  # a warm-up step, a frozen step (the last rank's loss)
x_all, y_all = load_digits(return_X_y=True)
X = torch.tensor(x_all, dtype=torch.float32)[RANK::SIZE] / 16.0
Y = torch.tensor(y_all)[RANK::SIZE]

CONFIGS = {  # name → (hook settings, the exchange's freeze rule)
    "topk_rule": (dict(compression="topk:20"), dict(warmup=4, tolerance=0.6, check_interval=2)),
    "powersgd_gravac": (dict(compression="powersgd", agent=lambda: hg.agents.GraVAC(
        theta_min=2, theta_max=64, epsilon=0.3, window=4, omega_throughput=1.0,
        settle_steps=0)), dict(warmup=5, max_warmup=5)),
}


def model_and_adam():
    torch.manual_seed(0)
    model = DDP(torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(),
                                    torch.nn.Linear(64, 10)), bucket_cap_mb=0.01)
    return model, torch.optim.AdamW(model.parameters(), lr=3e-3, eps=1e-6, weight_decay=0.01)


def build(name):
    hook, rule = CONFIGS[name]
    model, adam = model_and_adam()
    settings = {k: v() if callable(v) else v for k, v in hook.items()}
    state = ddp.register_comm_hook(model, **settings)
    return model, ddp.AdamExchangeOptimizer(adam, state, AdamExchange(**rule)), state


def train(model, opt, start, stop, frozen_at):
    for step in range(start, stop):
        idx = torch.randint(0, len(X), (32,), generator=torch.Generator().manual_seed(step * 97 + RANK))
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X[idx]), Y[idx])
        if step in NAN_STEPS and RANK == SIZE - 1:
            loss = loss * float("nan")
        loss.backward()
        opt.step()
        if opt.exchange.frozen and frozen_at[0] is None:
            frozen_at[0] = step


def summary(model, opt, state, frozen_at):
    adam_state = opt.optimizer.state_dict()["state"]
    return {"params": {k: v.detach().clone() for k, v in model.module.state_dict().items()},
            "optimizer": {f"{i}.{k}": v.clone() for i, s in adam_state.items()
                          for k, v in s.items()},
            "frozen_at": frozen_at[0], "frozen_step": opt.exchange.frozen_step,
            "skipped": state.engine.skipped_steps,
            "decisions": [(d.sent_cf, d.send, d.variance_frozen) for d in state.engine.decisions]}


results = {}
for name in CONFIGS:
    model, opt, state = build(name)
    frozen = [None]
    train(model, opt, 0, STEPS, frozen)
    results[name] = summary(model, opt, state, frozen)
    for split in SPLITS:
        model, opt, state = build(name)
        frozen = [None]
        train(model, opt, 0, split, frozen)
        saved = io.BytesIO()
        torch.save({"model": model.module.state_dict(), "opt": opt.state_dict(), "hook": state,
                    "frozen_at": frozen[0]}, saved)
        saved.seek(0)
        loaded = torch.load(saved, weights_only=False)
        model, adam = model_and_adam()
        model.module.load_state_dict(loaded["model"])
        state = ddp.register_comm_hook(model, state=loaded["hook"])
        opt = ddp.AdamExchangeOptimizer(adam, state, AdamExchange(**CONFIGS[name][1]))
        opt.load_state_dict(loaded["opt"])
        frozen = [loaded["frozen_at"]]
        train(model, opt, split, STEPS, frozen)
        results[f"{name}_resumed_{split}"] = summary(model, opt, state, frozen)
report(RANK, **results)
