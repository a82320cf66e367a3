"""The DDP hook on processes that share one device, over Gloo (with CUDA tensors on a GPU);
deliberately different data per rank. Each configuration trains from the same start and
reports what it ended with; an exception is reported, not raised, so that the others still
run (the test names the configuration that failed).

argv: device (cpu or cuda) steps
"""
import datetime
import io
import sys
import traceback

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from horovod_gravac import agents as A
from horovod_gravac import ddp
from horovod_gravac.compression import base
from tests.multirank import report

DEVICE = torch.device("cuda", 0) if sys.argv[1] == "cuda" else torch.device("cpu")
STEPS = int(sys.argv[2])
NAN_STEP = 3
# a collective left alone by a failing peer errors after a minute instead of hanging
dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
torch.set_num_threads(1)
RANK, SIZE = dist.get_rank(), dist.get_world_size()
if DEVICE.type == "cpu":  # the paths compressors take on accelerators
    base.HOST_DEVICES = frozenset()


def batch(step):
    gen = torch.Generator().manual_seed(step * 97 + RANK)
    x = torch.randn(32, 64, generator=gen) * (1 + RANK)
    return x.to(DEVICE), torch.randint(0, 10, (32,), generator=gen).to(DEVICE)


def wrap():
    """The same start on every rank: the DDP model on the device and its optimizer."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 32),
                              torch.nn.ReLU(), torch.nn.Linear(32, 10)).to(DEVICE)
    model = DDP(net, device_ids=[0] if DEVICE.type == "cuda" else None, bucket_cap_mb=0.01)
    return model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


def build(**hook):
    model, opt = wrap()
    return model, opt, ddp.register_comm_hook(model, optimizer=opt, bucket_cap_mb=0.01, **hook)


def train(model, opt, start, stop, nan_at=None):
    for step in range(start, stop):
        opt.zero_grad()
        x, y = batch(step)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if step == nan_at and RANK == SIZE - 1:
            loss = loss * float("nan")
        loss.backward()
        opt.step()


def result(model, state):
    engine = state.engine
    return {"params": {k: v.detach().cpu() for k, v in model.module.state_dict().items()},
            "device": next(model.parameters()).device.type, "steps": engine.step_count, "skipped": engine.skipped_steps,
            "bytes": engine.communication.total_bytes,
            "dense": engine.communication.total_dense_bytes,
            "decisions": [(d.cf, d.theta_min, d.send) for d in engine.decisions],
            "memory_finite": all(bool(torch.isfinite(r).all())
                                 for r in getattr(engine.memory, "residuals", {}).values()),
            "error": None}


def gravac():
    """GraVAC deciding on gains alone (no timing), so that a resumed run decides alike."""
    return A.GraVAC(theta_min=2, theta_max=64, epsilon=0.3, window=4, omega=0.0,
                    omega_throughput=0.0, settle_steps=1, policy="geometric",
                    search="throughput")


def run(nan_at=None, **hook):
    try:
        model, opt, state = build(**hook)
        train(model, opt, 0, STEPS, nan_at)
        return result(model, state)
    except Exception:  # reported: the test names the configuration
        return {"error": traceback.format_exc()}


def resumed():
    """Half the steps, the state through torch.save and torch.load, a new model, the rest."""
    try:
        model, opt, state = build(compression="topk", agent=gravac())
        train(model, opt, 0, STEPS // 2)
        saved = io.BytesIO()
        torch.save({"model": model.module.state_dict(), "opt": opt.state_dict(), "hook": state},
                   saved)
        saved.seek(0)
        loaded = torch.load(saved, weights_only=False)
        model, opt = wrap()
        model.module.load_state_dict(loaded["model"])
        opt.load_state_dict(loaded["opt"])
        state = ddp.register_comm_hook(model, state=loaded["hook"], optimizer=opt)
        train(model, opt, STEPS // 2, STEPS)
        return result(model, state)
    except Exception:  # reported: the test names the configuration
        return {"error": traceback.format_exc()}


runs = {"topk": run(compression="topk:10"),
        "dgc": run(compression="dgc:10", memory="dgc"),
        "powersgd": run(compression="powersgd"),
        "8bit": run(compression="8bit"),
        "qsgd_two_stage": run(compression="qsgd:exchange=two_stage"),
        "threshold": run(compression="threshold:threshold=0.05"),
        "gravac": run(compression="topk", agent=gravac()),
        "resumed_gravac": resumed(),
        "nan_skip": run(nan_at=NAN_STEP, compression="topk:10")}
report(RANK, runs=runs, backend=dist.get_backend())
dist.destroy_process_group()
