"""NaN on one rank, Inf on another: every compressor, every rank skips (or raises) alike.

Rank 1's gradient of the first layer gets a NaN at step NAN_STEP, rank 0's an Inf at
INF_STEP; the step must be skipped everywhere, no memory may hold a non-finite value, and
every rank must end with the same (finite) parameters.
"""
import horovod.torch as hvd
import torch

import horovod_gravac as hg
from horovod_gravac import compression as C
from tests.multirank import init_with_digits_shard, poison, report

STEPS, NAN_STEP, INF_STEP = 14, 5, 9
RANK, SIZE, X, Y = init_with_digits_shard()
SPECS = {n: f"{n}:cf=10" if C.create(n).adjustable_cf else n for n in C.names()}
MEMORY = {"dgc": "dgc"}


def tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from tensors(v)


def run(spec, agent=None, on_nonfinite="skip"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    name = spec.split(":")[0]
    opt = hg.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.01 if "sign" in name else 0.05,
                        momentum=0.0 if name in ("dgc", "signum") else 0.9),
        named_parameters=model.named_parameters(), compression=spec,
        memory=MEMORY.get(name), agent=agent, on_nonfinite=on_nonfinite)
    step = [0]
    model[0].weight.register_hook(poison(step, RANK, NAN_STEP, INF_STEP))
    unchanged, error = {}, None
    for step[0] in range(STEPS):
        before = [p.detach().clone() for p in model.parameters()]
        idx = torch.arange(step[0] * 16, step[0] * 16 + 16) % len(X)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()
        try:
            opt.step()
        except hg.NonFiniteGradientError as e:
            error = (step[0], str(e))
            break
        unchanged[step[0]] = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    state = opt.state_dict()["horovod_gravac"]
    return {"params": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "skipped": opt.skipped_steps, "unchanged": unchanged, "error": error,
            "memory_finite": all(bool(torch.isfinite(t).all()) for t in
                                 tensors({"m": state["memory"], "c": state["compressor"]})),
            "decisions": len(opt.decisions)}


runs = {spec: run(spec) for spec in SPECS.values()}
runs["gravac"] = run("topk", agent=hg.agents.GraVAC(theta_min=2, theta_max=50, window=3,
                                                               settle_steps=1))
runs["raise"] = run("topk:10", on_nonfinite="raise")
report(RANK, runs=runs)
