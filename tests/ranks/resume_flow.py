"""Horovod's resume flow with this library's optimizer: one training step on every rank, rank 0
saves, every rank builds a fresh model and optimizer, rank 0 alone loads the checkpoint, then
``hvd.broadcast_parameters`` and ``hvd.broadcast_optimizer_state`` on every rank (which makes
the ranks without state call ``step()`` alone to create it), and training goes on.

Also ``broadcast_optimizer_state`` where the state is on every rank, on rank 0 only, on none,
and on some ranks but not others, for every ``torch.optim`` optimizer of Horovod's own test
(LBFGS and SparseAdam aside, as there; Muon aside: it fails for Horovod's own optimizer on
torch >= 2.9).

argv: directory for the checkpoint
"""
import inspect
import sys
from pathlib import Path

import horovod.torch as hvd
import torch

import horovod_gravac as hg
from tests.multirank import init_with_digits_shard, report

RANK, SIZE, X, Y = init_with_digits_shard()
CKPT = Path(sys.argv[1]) / "resume_flow.pt"


def build(compression, agent=None, optimizer=torch.optim.SGD, **opt_params):
    torch.manual_seed(RANK)  # deliberately different starts: the broadcast must fix them
    model = torch.nn.Sequential(torch.nn.Linear(64, 48), torch.nn.ReLU(), torch.nn.Linear(48, 10))
    params = {k: v for k, v in {"lr": 0.05, "momentum": 0.9, **opt_params}.items()
              if k in inspect.signature(optimizer.__init__).parameters}
    opt = hg.DistributedOptimizer(optimizer(model.parameters(), **params),
                                  named_parameters=model.named_parameters(),
                                  compression=compression, agent=agent, min_compress_numel=0)
    return model, opt


def train(model, opt, start, steps):
    for step in range(start, start + steps):
        idx = torch.randint(0, len(X), (32,), generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()
        opt.step()


def engine_state(opt):
    """What the state-initialising step must not touch: residuals, step, agent, bytes."""
    engine = opt.engine
    return {"residuals": {k: v.clone() for k, v in getattr(opt.memory, "residuals", {}).items()},
            "step": engine.step_count, "bytes": engine.communication.total_bytes,
            "exchanges": engine.communication.steps,
            "history": len(opt.agent.history) if opt.agent is not None else 0}


def unchanged(before, after):
    return before.keys() == after.keys() and all(
        torch.equal(before[k], after[k]) if isinstance(before[k], torch.Tensor) else
        (before[k].keys() == after[k].keys() and all(torch.equal(before[k][n], after[k][n])
                                                     for n in before[k]))
        if isinstance(before[k], dict) else before[k] == after[k] for k in before)


def gravac():
    return hg.agents.GraVAC(theta_min=2, theta_max=16, window=4, epsilon=0.3)


def resume(compression, agent_factory):
    model, opt = build(compression, agent_factory())
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    train(model, opt, 0, 3)
    if RANK == 0:
        torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, CKPT)
    hvd.allreduce(torch.zeros(1), name="saved")  # the file exists before rank 0 reads it
    model, opt = build(compression, agent_factory())
    if RANK == 0:
        checkpoint = torch.load(CKPT)  # weights_only=True: the state is plain containers
        model.load_state_dict(checkpoint["model"])
        opt.load_state_dict(checkpoint["optimizer"])
    before = engine_state(opt)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    hvd.broadcast_optimizer_state(opt, root_rank=0)
    kept = unchanged(before, engine_state(opt))
    train(model, opt, 3, 6)
    return {"params": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "engine_unchanged_by_broadcast": kept, "state_entries": len(opt.state),
            "steps": opt.step_count}


flows = {"topk": resume("topk:8", lambda: None),
         "powersgd": resume("powersgd", lambda: None),
         "gravac": resume("topk", gravac)}

OPTIMIZERS = sorted((c for c in torch.optim.Optimizer.__subclasses__()
                     if c.__module__.startswith("torch.optim") and c.__name__ not in
                     ("LBFGS", "SparseAdam", "Muon")), key=lambda c: c.__name__)


def flat_state(opt):
    return [(k, v.detach().clone() if torch.is_tensor(v) else v)
            for state in opt.state_dict()["state"].values() for k, v in sorted(state.items())]


cases = {}
for cls in OPTIMIZERS:
    # state on every rank, on rank 0 only (the others rebuilt), on none, or on some ranks
    # (the odd ones rebuilt: at 4 ranks two with state, two without)
    for where in ("all", "root", "none", "some"):
        model, opt = build("topk:4", optimizer=cls, weight_decay=0.1)
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        if where != "none":
            train(model, opt, 0, 1)
        if (where == "root" and RANK != 0) or (where == "some" and RANK % 2):
            opt.optimizer.state.clear()
        before = engine_state(opt)
        expected = hvd.broadcast_object(len(opt.state_dict()["state"]),
                                        name=f"n.{cls.__name__}.{where}")
        hvd.broadcast_optimizer_state(opt, root_rank=0)
        root_state = hvd.broadcast_object(flat_state(opt), name=f"s.{cls.__name__}.{where}")
        mine = flat_state(opt)
        kept = unchanged(before, engine_state(opt))
        # the state-creating step moves parameters for some optimizers (weight decay, ASGD)
        # on the ranks that make it, with Horovod's own optimizer too: broadcast them again
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        train(model, opt, 1, 2)  # and training goes on together
        cases[f"{cls.__name__}/{where}"] = {
            "entries_as_root": where == "none" or len(mine) > 0 and
            len(opt.state_dict()["state"]) == expected,
            "state_as_root": len(mine) == len(root_state) and all(
                k == k0 and (torch.equal(v, v0) if torch.is_tensor(v) else v == v0)
                for (k, v), (k0, v0) in zip(mine, root_state)),
            "engine_unchanged_by_broadcast": kept,
            "params": {k: v.detach().clone() for k, v in model.state_dict().items()}}

net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
unnamed = hg.DistributedOptimizer(torch.optim.SGD(
    [{"params": net[0].parameters()}, {"params": net[1].parameters()}], lr=0.1))

def skipped_backward():
    """The last rank skips one backward (its gradients None after zero_grad) but still calls
    step(), with an optimizer that never has state: that is not broadcast_optimizer_state's
    call, so it exchanges zeros as Horovod's optimizer does instead of stepping alone."""
    model, opt = build("topk:4", momentum=0.0)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    for step in range(3):
        opt.zero_grad()
        if not (step == 1 and RANK == SIZE - 1):
            idx = torch.randint(0, len(X), (32,), generator=torch.Generator().manual_seed(step))
            torch.nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()
        opt.step()
    return {"params": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "steps": opt.step_count}


report(RANK, flows=flows, cases=cases, optimizers=[c.__name__ for c in OPTIMIZERS],
       unnamed=sorted(unnamed._parameter_names.values()), skipped_backward=skipped_backward())
