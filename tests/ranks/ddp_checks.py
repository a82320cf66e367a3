"""The DDP communication hook on real ranks (torchrun, Gloo), deliberately different data per
rank; each configuration trains from the same start and reports what it ended with.

argv: steps
"""
import contextlib
import io
import os
import sys

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch.nn.parallel import DistributedDataParallel as DDP

import horovod_gravac as hg
from horovod_gravac import ddp
from tests.multirank import report

dist.init_process_group("gloo")
torch.set_num_threads(1)
RANK, SIZE = dist.get_rank(), dist.get_world_size()
STEPS = int(sys.argv[1])
NAN_STEP = 7
x_all, y_all = load_digits(return_X_y=True)
X = torch.tensor(x_all, dtype=torch.float32)[RANK::SIZE] / 16.0 * (1 + RANK)
Y = torch.tensor(y_all)[RANK::SIZE]


class Net(torch.nn.Module):
    """Two layers big enough to compress (64x64, 64x32) and one small head, plus a branch
    that only some steps use (find_unused_parameters)."""

    def __init__(self, branch=False):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                        torch.nn.Linear(64, 32), torch.nn.ReLU())
        self.head = torch.nn.Linear(32, 10)
        self.extra = torch.nn.Linear(32, 32) if branch else None

    def forward(self, x, use_extra=False):
        h = self.body(x)
        return self.head(self.extra(h) if use_extra else h)


def batch(step):
    idx = torch.randint(0, len(X), (32,), generator=torch.Generator().manual_seed(step * 97 + RANK))
    return X[idx], Y[idx]


def build(unused=False, **hook):
    torch.manual_seed(0)
    model = DDP(Net(unused), bucket_cap_mb=0.01, find_unused_parameters=unused)  # several buckets
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    state = ddp.register_comm_hook(model, optimizer=opt, **hook) if hook else None
    return model, opt, state


def train(model, opt, state, start, stop, accumulate=1, unused=False, nan_at=None):
    errors = []
    for step in range(start, stop):
        opt.zero_grad()
        try:
            for micro in range(accumulate):
                x, y = batch(step * accumulate + micro)
                # forward and backward of all micro-batches but the last inside no_sync()
                with model.no_sync() if micro < accumulate - 1 else contextlib.nullcontext():
                    loss = torch.nn.functional.cross_entropy(
                        model(x, unused and step % 2 == 0), y)
                    if step == nan_at and RANK == SIZE - 1:
                        loss = loss * float("nan")
                    loss.backward()
        except hg.NonFiniteGradientError as exc:
            errors.append((step, str(exc)))
            break
        opt.step()
    return errors


def result(model, state, errors=()):
    out = {"params": {k: v.detach().clone() for k, v in model.module.state_dict().items()},
           "errors": list(errors)}
    if state is not None:
        ex = state.engine
        out.update(steps=ex.step_count, skipped=ex.skipped_steps,
                   bytes=ex.communication.total_bytes, dense=ex.communication.total_dense_bytes,
                   exchanges=ex.communication.steps,
                   decisions=[(d.cf, d.theta_min, d.send,
                               tuple(sorted((d.layer_cf or {}).items())), d.codec)
                              for d in ex.decisions],
                   memory_finite=all(bool(torch.isfinite(r).all())
                                     for r in getattr(ex.memory, "residuals", {}).values()))
    return out


def run(unused=False, accumulate=1, nan_at=None, **hook):
    model, opt, state = build(unused, **hook)
    errors = train(model, opt, state, 0, STEPS, accumulate, unused, nan_at)
    return result(model, state, errors)


def gravac():
    return hg.agents.GraVAC(theta_min=2, theta_max=64, epsilon=0.3, window=10, omega=0.0,
                            omega_throughput=0.0, settle_steps=1, policy="geometric",
                            search="throughput")


runs = {
    "plain": run(),
    "none": run(compression="none"),
    "topk": run(compression="topk:10"),
    "dgc": run(compression="dgc:10", memory="dgc"),
    "powersgd": run(compression="powersgd"),
    "gravac": run(compression="topk", agent=gravac()),
    "gravac_powersgd": run(compression="powersgd", agent=gravac()),
    # the cost-model search on PowerSGD's ranks, every tensor compressed
    "gravac_cost": run(compression="powersgd", min_compress_numel=0,
                       agent=hg.agents.GraVAC(theta_min=2, theta_max=64, epsilon=0.3, window=10,
                                              settle_steps=1, search="cost_model")),
    "accordion": run(compression="topk", agent=hg.agents.Accordion(low_cf=2, high_cf=20,
                                                                    interval=10)),
    "plan": run(compression="topk", min_compress_numel=0,
                agent=hg.agents.LayerPlan(hg.agents.Static(cf=10), plan_interval=8)),
    "static": run(compression="topk", agent="static"),
    # the codec among candidates: TopK 50x is below ε=0.99 (its gain), so at the first
    # choice (after 1 untimed and 9 timed steps) every rank switches to dense or fp16 at the
    # same step
    "choice": run(compression="topk:50|dense|fp16", min_compress_numel=0,
                  agent=hg.agents.CodecChoice(epsilon=0.99, interval=10, gain_interval=1,
                                              settle_steps=1, trial_steps=9)),
    "no_sync": run(accumulate=2, compression="topk:10"),
    "unused": run(unused=True, compression="topk:10"),
    "nan_skip": run(nan_at=NAN_STEP, compression="topk:10"),
    "nan_raise": run(nan_at=NAN_STEP, compression="topk:10", on_nonfinite="raise"),
}

# As Lightning's DDPStrategy(ddp_comm_state=state, ddp_comm_hook=compression_hook) does: the
# state made from the plain module before DDP wraps it, the hook registered by DDP itself.
torch.manual_seed(0)
net = Net()
prebuilt = ddp.DDPCompressionState(net, compression="topk:10")
model = DDP(net, bucket_cap_mb=0.01)
model.register_comm_hook(prebuilt, ddp.compression_hook)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
train(model, opt, prebuilt, 0, STEPS)
runs["prebuilt_state"] = result(model, prebuilt)

# Resume: train half, torch.save the hook state (and model, optimizer), start a new model
# from them, train the rest: the same as the whole run, bit for bit.
half = STEPS // 2
model, opt, state = build(compression="topk", agent=gravac())
train(model, opt, state, 0, half)
saved = io.BytesIO()
torch.save({"model": model.module.state_dict(), "opt": opt.state_dict(), "hook": state}, saved)
saved.seek(0)
loaded = torch.load(saved, weights_only=False)
torch.manual_seed(0)
model = DDP(Net(), bucket_cap_mb=0.01)
model.module.load_state_dict(loaded["model"])
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
opt.load_state_dict(loaded["opt"])
state = ddp.register_comm_hook(model, state=loaded["hook"], optimizer=opt)
train(model, opt, state, half, STEPS)
runs["resumed_gravac"] = result(model, state)

# The live state attached to a new model halfway (register_comm_hook(model, state=state)):
# it goes on from where it was, as an uninterrupted run.
model, opt, state = build(compression="topk", agent=gravac())
train(model, opt, state, 0, half)
again = DDP(Net(), bucket_cap_mb=0.01)
again.module.load_state_dict(model.module.state_dict())
opt_again = torch.optim.SGD(again.parameters(), lr=0.05, momentum=0.9)
opt_again.load_state_dict(opt.state_dict())
ddp.register_comm_hook(again, state=state, optimizer=opt_again)
train(again, opt_again, state, half, STEPS)
runs["reattached_gravac"] = result(again, state)

# A parameter DDP is told to ignore never reaches a hook: the state leaves it out.
torch.manual_seed(0)
net = Net()
DDP._set_params_and_buffers_to_ignore_for_model(net, ["head.bias"])
model = DDP(net, bucket_cap_mb=0.01)
opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
state = ddp.register_comm_hook(model, compression="topk:10", optimizer=opt)
errors = train(model, opt, state, 0, 5)
runs["ignored_parameter"] = dict(result(model, state, errors), names=state.engine.names)


def one_step_grads(**hook):
    """The averaged gradients of one step, and what each bucket's future held."""
    torch.manual_seed(0)
    model = DDP(Net(), bucket_cap_mb=0.01)
    state = ddp.DDPCompressionState(model, min_compress_numel=0, **hook)
    futures = []

    def recording_hook(state, bucket):
        future = ddp.compression_hook(state, bucket)
        return future.then(lambda f: futures.append(
            {n: g.clone() for n, g in zip((state._names[p] for p in bucket.parameters()),
                                          bucket.gradients())}) or f.value())

    model.register_comm_hook(state, recording_hook)
    x, y = batch(0)
    torch.nn.functional.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.module.named_parameters()}
    held = {n: g for f in futures for n, g in f.items()}
    return {"grads": grads, "future_equals_grad": held.keys() == grads.keys() and all(
        torch.equal(held[n], grads[n]) for n in grads), "buckets": len(state.engine.layout.buckets)}


fused = {spec: {"fused": one_step_grads(compression=spec),
                "per_tensor": one_step_grads(compression=spec, bucket_cap_mb=1e-9)}
         for spec in ("none", "topk:10", "powersgd", "qsgd", "randomk:4", "fp16")}

bad = {}
for kwargs in ({"compression": "topk:0.5"}, {"agent": "gravac", "compression": "qsgd"},
               {"on_nonfinite": "zero"}, {"min_compress_numel": -1}, {"bucket_cap_mb": 0},
               {"compress_patterns": {"nope.*": False}}):
    try:
        build(**kwargs)
    except ValueError as exc:
        bad[str(sorted(kwargs))] = str(exc)
try:
    ddp.register_comm_hook(Net())
except ValueError as exc:
    bad["not ddp"] = str(exc)
try:
    ddp.register_comm_hook(DDP(Net(), static_graph=True))
except ValueError as exc:
    bad["static_graph"] = str(exc)
_, _, live = build(compression="topk:10")
try:
    ddp.register_comm_hook(DDP(Net()), state=live, compression="topk:100", bucket_cap_mb=5)
except ValueError as exc:
    bad["state and settings"] = str(exc)
report(RANK, runs=runs, bad=bad, fused=fused,
       torchrun=os.environ.get("TORCHELASTIC_RUN_ID") is not None)
dist.destroy_process_group()
