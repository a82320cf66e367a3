"""The two-stage compressed allreduce on real ranks (mpirun or horovodrun --gloo), through
``DistributedOptimizer``: many checks in one launch.

* constructed gradients on which both quantizations are exact: the step applied equals the
  dense average (or sum) bit for bit; random ones: near it, and the same on every rank;
* a short training of each quantizer: identical parameters everywhere, the loss falls, the
  link bytes of a step;
* NaN on rank 1 at NAN_STEP, Inf on rank 0 at INF_STEP: skipped on every rank, no residual
  keeps a non-finite value;
* checkpoint/resume (``horovod_gravac.checkpoint``) bit for bit with both residuals;
* a bad ``exchange`` refused at construction; ``"auto"``'s choice at this world size.

argv: checkpoint directory
"""
import sys
from pathlib import Path

import horovod.torch as hvd
import torch

import horovod_gravac as hg
from horovod_gravac import checkpoint
from horovod_gravac import compression as C
from tests.multirank import init_with_digits_shard, poison, report

RANK, SIZE, X, Y = init_with_digits_shard()
DIRECTORY = Path(sys.argv[1])
SPECS = {"8bit": "8bit:exchange=two_stage", "qsgd": "qsgd:exchange=two_stage",
         "qsgd_buckets": "qsgd:exchange=two_stage,bucket_size=96",
         "natural": "natural:exchange=two_stage", "onebit": "onebit:exchange=two_stage"}
MEMORY = {"qsgd": "residual", "qsgd_buckets": "residual", "natural": "residual"}
SHAPES = {"a": (1001,), "b": (37, 29), "c": (10,), "d": (3,)}  # c, d: small, sent dense
STEPS, NAN_STEP, INF_STEP, SPLIT = 20, 5, 9, 11


# -- constructed gradients ---------------------------------------------------------------------
def on_8bit_grid(numel, size, seed):
    """Every rank's gradient: integers with a 127 in each chunk of each rank (0 there on the
    others), sums within ±127 — both 8-bit quantizations are exact."""
    gen = torch.Generator().manual_seed(seed)
    grads = [torch.randint(-(127 // size), 127 // size + 1, (numel,), generator=gen).float()
             for _ in range(size)]
    for start, _ in C.chunk_bounds(numel, size):
        for i in range(size):
            for k, g in enumerate(grads):
                g[start + i] = 127.0 if k == i else 0.0
    return grads


def disjoint_powers_of_two(numel, size, seed):
    """Powers of two, each element non-zero on one rank: natural compression is exact."""
    gen = torch.Generator().manual_seed(seed)
    owner = torch.randint(0, size, (numel,), generator=gen)
    values = torch.ldexp(torch.ones(numel), torch.randint(-10, 10, (numel,), generator=gen))
    values *= torch.where(torch.rand(numel, generator=gen) < 0.5, -1.0, 1.0)
    return [torch.where(owner == i, values, torch.zeros(numel)) for i in range(size)]


def two_values_per_chunk(numel, size, seed):
    """The same tensor on every rank, one positive and one negative value per chunk: 1-bit
    quantization is exact."""
    x = torch.empty(numel)
    for j, (start, stop) in enumerate(C.chunk_bounds(numel, size)):
        x[start:stop] = torch.where(torch.arange(stop - start) % 3 == seed % 3,
                                    2.0 ** -(j + 1), -(2.0 ** j))
    return [x.clone() for _ in range(size)]


def gradients(construct, seed):
    """{name: every rank's gradient}; the small tensors (sent dense) random integers."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i, (name, shape) in enumerate(SHAPES.items()):
        numel = torch.Size(shape).numel()
        grads = construct(numel, SIZE, seed + i) if numel >= 1000 else \
            [torch.randint(-9, 10, (numel,), generator=gen).float() for _ in range(SIZE)]
        out[name] = [g.view(shape) for g in grads]
    return out


def one_step(spec, grads, **kw):
    """-(parameters after one SGD step of lr 1 from zero): the gradient the exchange applied."""
    params = {name: torch.zeros(shape, requires_grad=True) for name, shape in SHAPES.items()}
    opt = hg.DistributedOptimizer(torch.optim.SGD(params.values(), lr=1.0),
                                  named_parameters=params.items(), compression=spec,
                                  **{"min_compress_numel": 100, **kw})
    sum((p * grads[name][RANK]).sum() for name, p in params.items()).backward()
    opt.step()
    for h in opt._hooks:
        h.remove()
    return {name: -p.detach().clone() for name, p in params.items()}, opt


exact = {}
for label, spec, construct in (("8bit", SPECS["8bit"], on_8bit_grid),
                               ("natural", SPECS["natural"], disjoint_powers_of_two),
                               ("onebit", SPECS["onebit"], two_values_per_chunk)):
    for op, bucket_cap_mb in ((hvd.Average, 25.0), (hvd.Sum, 25.0), (hvd.Average, 1e-6)):
        grads = gradients(construct, seed=3)
        applied, opt = one_step(spec, grads, op=op, bucket_cap_mb=bucket_cap_mb,
                                memory="residual")
        dense = {n: torch.stack(g).sum(0) * (1.0 / SIZE if op == hvd.Average else 1.0)
                 for n, g in grads.items()}
        exact[(label, op == hvd.Average, bucket_cap_mb)] = {
            "equal": all(torch.equal(applied[n], dense[n]) for n in SHAPES),
            "max_diff": max((applied[n] - dense[n]).abs().max().item() for n in SHAPES),
            "buckets": len(opt.engine.layout.buckets), "uncompressed": sorted(opt.uncompressed),
            "residuals_zero": all(not r.any() for r in opt.memory.residuals.values()),
            "owner_residuals_zero": all(not r.any()
                                        for r in opt.compressor.owner_residuals.values())}

near = {}
gen = torch.Generator().manual_seed(11)
random_grads = {name: [torch.randn(shape, generator=gen) * (1 + i) for i in range(SIZE)]
                for name, shape in SHAPES.items()}
dense_average = {n: torch.stack(g).sum(0) / SIZE for n, g in random_grads.items()}
for label, spec in SPECS.items():
    for exchange in ("two_stage", "allgather"):
        applied, _ = one_step(spec.replace("two_stage", exchange), random_grads)
        near[(label, exchange)] = {
            "applied": applied,
            "relative_error": max(((applied[n] - dense_average[n]).norm() /
                                   dense_average[n].norm()).item() for n in ("a", "b"))}


# -- training ----------------------------------------------------------------------------------
def build(spec, memory=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(),
                                torch.nn.Linear(32, 10))
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = hg.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                  named_parameters=model.named_parameters(), compression=spec,
                                  memory=memory, min_compress_numel=0)  # biases too: 10, 32
    torch.manual_seed(1000 + RANK)
    return model, opt


def train(model, opt, start, stop, poisoned=False):
    step, links, losses, unchanged = [0], [], [], {}
    if poisoned:
        handle = model[0].weight.register_hook(poison(step, RANK, NAN_STEP, INF_STEP))
    callback = opt.register_step_callback(
        lambda r: links.append((r.link_bytes, r.rounds, r.link_steps)))
    for step[0] in range(start, stop):
        before = [p.detach().clone() for p in model.parameters()]
        idx = torch.randint(0, len(X), (32,),
                            generator=torch.Generator().manual_seed(step[0] * 97 + RANK))
        x = X[idx] + 0.01 * torch.randn(32, 64)  # the global RNG: restored on resume
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), Y[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())  # this rank's
        unchanged[step[0]] = all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    callback.remove()
    if poisoned:
        handle.remove()
    return links, losses, unchanged


def tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, dict):
        for v in tree.values():
            yield from tensors(v)


def summary(model, opt, links=(), losses=(), unchanged=None):
    state = opt.state_dict()["horovod_gravac"]
    return {"params": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "links": list(links), "losses": list(losses), "unchanged": unchanged or {},
            "skipped": opt.skipped_steps, "bytes": opt.communication.last_bytes,
            "owner_residuals": sorted(opt.compressor.owner_residuals),
            "finite": all(bool(torch.isfinite(t).all()) for t in
                          tensors({"m": state["memory"], "c": state["compressor"]}))}


training, poisoned = {}, {}
for label, spec in SPECS.items():
    model, opt = build(spec, MEMORY.get(label))
    training[label] = summary(model, opt, *train(model, opt, 0, STEPS))
    model, opt = build(spec, MEMORY.get(label))
    poisoned[label] = summary(model, opt, *train(model, opt, 0, STEPS, poisoned=True))
model, opt = build("8bit:exchange=allgather")
training["8bit_allgather"] = summary(model, opt, *train(model, opt, 0, STEPS))

# -- checkpoint / resume -----------------------------------------------------------------------
resume = {}
for label in ("8bit", "qsgd", "onebit"):
    spec, memory = SPECS[label], MEMORY.get(label)
    model, opt = build(spec, memory)
    train(model, opt, 0, STEPS)
    whole = summary(model, opt)
    model, opt = build(spec, memory)
    train(model, opt, 0, SPLIT)
    path = DIRECTORY / f"{label}.pt"
    checkpoint.save(path, model, opt, step=SPLIT)
    model, opt = build(spec, memory)
    extra = checkpoint.load(path, model, opt)
    loaded = sorted(opt.compressor.owner_residuals)
    train(model, opt, extra["step"], STEPS)
    resumed = summary(model, opt)
    model, opt = build(spec, memory)  # the same, less the owner residuals
    extra = checkpoint.load(path, model, opt)
    opt.compressor.owner_residuals.clear()
    train(model, opt, extra["step"], STEPS)
    resume[label] = {"whole": whole["params"], "resumed": resumed["params"], "loaded": loaded,
                     "without_owner": summary(model, opt)["params"]}

# -- settings ----------------------------------------------------------------------------------
bad = {}
try:
    build("8bit:exchange=ring")
except ValueError as exc:
    bad["ring"] = str(exc)
try:
    build("signsgd:exchange=two_stage")
except ValueError as exc:
    bad["signsgd"] = str(exc)
_, opt = build("onebit")
auto = {"two_stage": opt.compressor.two_stage, "world_size": opt.compressor.world_size}

report(RANK, size=SIZE, exact=exact, near=near, training=training, poisoned=poisoned,
       resume=resume, bad=bad, auto=auto)
