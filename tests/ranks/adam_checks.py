"""The Adam-family exchange on real Horovod ranks: every rank freezes at the same step and
ends with the same parameters and optimizer state; a job stopped before or after the freeze
and resumed from a checkpoint ends bit for bit like the whole one; NaN/Inf steps are skipped
on every rank in either phase.

argv: checkpoint-dir
"""
import sys
from pathlib import Path

import horovod.torch as hvd
import torch

import horovod_gravac as hg
from horovod_gravac import checkpoint
from horovod_gravac.adam import AdamExchange
from tests.multirank import init_with_digits_shard, poison, report

STEPS = 16
SPLITS = (3, 11)  # before the freeze, after it
INF_STEP, NAN_STEP = 2, 12  # a warm-up step (rank 0's Inf), a frozen step (rank 1's NaN)
RANK, SIZE, X, Y = init_with_digits_shard()
DIRECTORY = Path(sys.argv[1])

CONFIGS = {  # name → (compression, agent factory, the exchange's freeze rule)
    # frozen by the variance rule (its measurement every 2 steps, a loose tolerance)
    "topk_rule": ("topk:20", lambda: None, dict(warmup=4, tolerance=0.6, check_interval=2)),
    # GraVAC on PowerSGD after the freeze; omega_throughput=1 keeps its CF whatever the
    # measured times, so that two runs decide alike
    "powersgd_gravac": ("powersgd", lambda: hg.agents.GraVAC(
        theta_min=2, theta_max=64, epsilon=0.3, window=4, omega_throughput=1.0,
        settle_steps=0), dict(warmup=5, max_warmup=5)),
    # 8-bit two-stage: error feedback on the sender and on each chunk's owner
    "8bit_two_stage": (hg.compression.create("8bit", exchange="two_stage"), lambda: None,
                       dict(warmup=6, max_warmup=6)),
}


def build(name):
    compression, agent, rule = CONFIGS[name]
    if not isinstance(compression, str):  # a fresh compressor object for every job
        compression = hg.compression.create(compression.name, exchange="two_stage")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(),
                                torch.nn.Linear(64, 10))
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    base = torch.optim.AdamW(model.parameters(), lr=3e-3, eps=1e-6, weight_decay=0.01)
    opt = hg.DistributedOptimizer(base, named_parameters=model.named_parameters(),
                                  compression=compression, agent=agent(),
                                  adam_exchange=AdamExchange(**rule))
    hvd.broadcast_optimizer_state(base, root_rank=0)
    step = [0]
    model[0].weight.register_hook(poison(step, RANK, NAN_STEP, INF_STEP))
    return model, opt, step


def train(model, opt, step, start, stop, frozen_at):
    for s in range(start, stop):
        step[0] = s
        idx = torch.randint(0, len(X), (32,), generator=torch.Generator().manual_seed(s * 97 + RANK))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()
        opt.step()
        if opt.adam.frozen and frozen_at[0] is None:
            frozen_at[0] = s  # the step whose exchange first sent momenta


def summary(model, opt, frozen_at):
    state = opt.optimizer.state_dict()["state"]
    return {"params": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "optimizer": {f"{i}.{k}": v.clone() for i, s in state.items()
                          for k, v in s.items()},
            "frozen_at": frozen_at[0], "frozen_step": opt.adam.frozen_step,
            "skipped": opt.skipped_steps, "bytes": opt.communication.total_bytes,
            "dense_bytes": opt.communication.total_dense_bytes,
            "decisions": [(d.sent_cf, d.send, d.variance_frozen) for d in opt.decisions]}


results = {}
for name in CONFIGS:
    model, opt, step = build(name)
    frozen_at = [None]
    train(model, opt, step, 0, STEPS, frozen_at)
    results[name] = summary(model, opt, frozen_at)
    for split in SPLITS:
        model, opt, step = build(name)
        frozen = [None]
        train(model, opt, step, 0, split, frozen)
        path = DIRECTORY / f"{name}_{split}.pt"
        checkpoint.save(path, model, opt, step=split, frozen_at=frozen[0])
        model, opt, step = build(name)
        extra = checkpoint.load(path, model, opt)
        frozen = [extra["frozen_at"]]
        train(model, opt, step, extra["step"], STEPS, frozen)
        results[f"{name}_resumed_{split}"] = summary(model, opt, frozen)
report(RANK, **results)
