"""The two-stage compressed allreduce through the DDP communication hook (torchrun, Gloo):
torch.distributed's ``all_to_all_single`` and ``all_gather``.

* constructed gradients on the 8-bit grid: the averaged gradient equals the dense average
  bit for bit;
* a short training of each two-stage quantizer: identical parameters on every rank;
* a NaN on the last rank at NAN_STEP: skipped on every rank, residuals finite;
* the hook state saved with ``torch.save`` halfway and loaded into a new model: bit for bit.
"""
import io

import torch
import torch.distributed as dist
from sklearn.datasets import load_digits
from torch.nn.parallel import DistributedDataParallel as DDP

from horovod_gravac import compression as C
from horovod_gravac import ddp
from tests.multirank import report

dist.init_process_group("gloo")
torch.set_num_threads(1)
RANK, SIZE = dist.get_rank(), dist.get_world_size()
STEPS, NAN_STEP = 16, 7
SPECS = ("8bit", "qsgd", "natural", "onebit")
x_all, y_all = load_digits(return_X_y=True)
X = torch.tensor(x_all, dtype=torch.float32)[RANK::SIZE] / 16.0
Y = torch.tensor(y_all)[RANK::SIZE]


class Weights(torch.nn.Module):
    """Parameters whose gradient is the input: loss = Σ p·g."""

    def __init__(self, shapes):
        super().__init__()
        self.ps = torch.nn.ParameterDict({n: torch.nn.Parameter(torch.zeros(s))
                                          for n, s in shapes.items()})

    def forward(self, grads):
        return sum((p * grads[n]).sum() for n, p in self.ps.items())


def on_8bit_grid(numel, seed):
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randint(-(127 // SIZE), 127 // SIZE + 1, (numel,), generator=gen).float()
             for _ in range(SIZE)]
    for start, _ in C.chunk_bounds(numel, SIZE):
        for i in range(SIZE):
            for k, g in enumerate(grads):
                g[start + i] = 127.0 if k == i else 0.0
    return grads


shapes = {"a": (1001,), "b": (37, 29), "c": (5,)}
grads = {n: [g.view(s) for g in on_8bit_grid(torch.Size(s).numel(), i)]
         for i, (n, s) in enumerate(shapes.items()) if n != "c"}
grads["c"] = [torch.arange(5.0) * (1 + k) for k in range(SIZE)]  # small: sent dense
model = DDP(Weights(shapes))
state = ddp.register_comm_hook(model, compression="8bit:exchange=two_stage", memory="residual",
                               min_compress_numel=100)
model({n: g[RANK] for n, g in grads.items()}).backward()
applied = {n: p.grad.clone() for n, p in model.module.ps.items()}
dense = {n: torch.stack(g).sum(0) * (1.0 / SIZE) for n, g in grads.items()}
exact = {"equal": all(torch.equal(applied[n], dense[n]) for n in shapes),
         "max_diff": max((applied[n] - dense[n]).abs().max().item() for n in shapes),
         "owner_residuals": sorted(state.engine.compressor.owner_residuals)}


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                        torch.nn.Linear(64, 32), torch.nn.ReLU())
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.body(x))


def build(spec, **hook):
    torch.manual_seed(0)
    model = DDP(Net(), bucket_cap_mb=0.01)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    state = ddp.register_comm_hook(model, optimizer=opt, compression=f"{spec}:exchange=two_stage",
                                   memory="residual", min_compress_numel=0, **hook)
    return model, opt, state


def train(model, opt, state, start, stop, nan_at=None):
    for step in range(start, stop):
        idx = torch.randint(0, len(X), (32,),
                            generator=torch.Generator().manual_seed(step * 97 + RANK))
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X[idx]), Y[idx])
        if step == nan_at and RANK == SIZE - 1:
            loss = loss * float("nan")
        loss.backward()
        opt.step()


def result(model, state):
    engine = state.engine
    kept = list(getattr(engine.memory, "residuals", {}).values()) + \
        list(engine.compressor.owner_residuals.values())
    return {"params": {k: v.detach().clone() for k, v in model.module.state_dict().items()},
            "skipped": engine.skipped_steps, "steps": engine.step_count,
            "bytes": engine.communication.total_bytes,
            "finite": all(bool(torch.isfinite(t).all()) for t in kept),
            "owner_residuals": sorted(engine.compressor.owner_residuals)}


runs = {}
for spec in SPECS:
    model, opt, state = build(spec)
    train(model, opt, state, 0, STEPS)
    runs[spec] = result(model, state)
    model, opt, state = build(spec)
    train(model, opt, state, 0, STEPS, nan_at=NAN_STEP)
    runs[f"{spec}_nan"] = result(model, state)

resumed = {}
for spec in ("8bit", "onebit"):
    model, opt, state = build(spec)
    train(model, opt, state, 0, STEPS // 2)
    saved = io.BytesIO()
    torch.save({"model": model.module.state_dict(), "opt": opt.state_dict(), "hook": state},
               saved)
    saved.seek(0)
    loaded = torch.load(saved, weights_only=False)
    torch.manual_seed(0)
    model = DDP(Net(), bucket_cap_mb=0.01)
    model.module.load_state_dict(loaded["model"])
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    opt.load_state_dict(loaded["opt"])
    state = ddp.register_comm_hook(model, state=loaded["hook"], optimizer=opt)
    owners = sorted(state.engine.compressor.owner_residuals)
    train(model, opt, state, STEPS // 2, STEPS)
    resumed[spec] = dict(result(model, state), loaded=owners)

report(RANK, size=SIZE, exact=exact, runs=runs, resumed=resumed)
dist.destroy_process_group()
