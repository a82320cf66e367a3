"""Many DistributedOptimizer checks in one launch (a launch costs ~5 s)."""
import horovod.torch as hvd
import torch

import horovod_gravac as hg
from horovod_gravac import compression as C
from tests.multirank import init_with_digits_shard, report

RANK, SIZE, X, Y = init_with_digits_shard()

# Settings for the small MLP (64-32-10): sparsifiers at CF 10 (RandomK, which ignores
# magnitudes, at CF 4); sign methods need a small step size.
SPECS = {name: f"{name}:{4 if name == 'randomk' else 10}" if C.create(name).adjustable_cf
         else name for name in C.names()}
LR = {"signsgd": 0.01, "signum": 0.01}
MOMENTUM = {"signum": 0.0}  # Signum keeps its momentum in the compressor


class MLP(torch.nn.Module):
    def __init__(self, unused: bool = False):
        super().__init__()
        self.fc1 = torch.nn.Linear(64, 32)
        self.fc2 = torch.nn.Linear(32, 10)
        self.extra = torch.nn.Linear(32, 10) if unused else None

    def forward(self, x, use_extra=False):
        h = torch.relu(self.fc1(x))
        out = self.fc2(h)
        return out + self.extra(h) if use_extra else out


def params(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train(make_opt, steps=60, lr=0.1, passes=1, unused=False, momentum=0.9):
    torch.manual_seed(0)
    model = MLP(unused)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = make_opt(torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum), model)
    losses = []
    for step in range(steps):
        opt.zero_grad()
        for micro in range(passes):
            idx = torch.arange((step * passes + micro) * 32, (step * passes + micro) * 32 + 32) % len(X)
            # the extra head is used only on rank 0, on odd steps: no gradient elsewhere
            loss = torch.nn.functional.cross_entropy(
                model(X[idx], use_extra=unused and RANK == 0 and step % 2 == 1), Y[idx])
            loss.backward()
        opt.step()
        losses.append(hvd.allreduce(loss.detach(), name="loss").item())
    return params(model), losses, opt


def ours(compression="none", **kw):
    return lambda opt, model: hg.DistributedOptimizer(
        opt, named_parameters=model.named_parameters(), compression=compression, **kw)


def horovods(**kw):
    return lambda opt, model: hvd.DistributedOptimizer(
        opt, named_parameters=model.named_parameters(), **kw)


results = {}
ref, ref_losses, _ = train(horovods(), steps=20)
mine, _, opt = train(ours("none"), steps=20)
results["none_vs_horovod"] = max((ref[k] - mine[k]).abs().max().item() for k in ref)
results["none_bytes_per_step"] = opt.communication.last_bytes
results["dense_bytes_per_step"] = opt.communication.last_dense_bytes

topk1, _, _ = train(ours("topk:1"), steps=20)
results["topk1_vs_none"] = max((topk1[k] - mine[k]).abs().max().item() for k in mine)

ref2, _, _ = train(horovods(backward_passes_per_step=2), steps=10, passes=2)
mine2, _, _ = train(ours("none", backward_passes_per_step=2), steps=10, passes=2)
results["bpps2_vs_horovod"] = max((ref2[k] - mine2[k]).abs().max().item() for k in ref2)

whole, whole_losses, _ = train(ours("topk:10", granularity="model"))
results["model_granularity_losses"] = whole_losses
unused_params, unused_losses, _ = train(ours("topk:10"), unused=True)

per_compressor = {}
for name in C.names():
    p, losses, opt = train(ours(SPECS[name]), lr=LR.get(name, 0.1),
                           momentum=MOMENTUM.get(name, 0.9))
    per_compressor[name] = {"params": p, "losses": losses, "bytes": opt.communication.total_bytes,
                            "dense_bytes": opt.communication.total_dense_bytes}

def averaged_once(spec, bucket_cap_mb):
    """The averaged gradient of one step (min_compress_numel=0: every tensor compressed)."""
    torch.manual_seed(0)
    model = MLP()
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = hg.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                  named_parameters=model.named_parameters(), compression=spec,
                                  min_compress_numel=0, bucket_cap_mb=bucket_cap_mb)
    idx = torch.arange(32) + 32 * RANK
    torch.nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()
    opt.synchronize()
    return len(opt.engine.layout.buckets), {n: p.grad.clone() for n, p in model.named_parameters()}


# every compressor with its payloads fused in one bucket, and with a bucket per tensor
fused = {name: {"fused": averaged_once(SPECS[name], 25.0),
                "per_tensor": averaged_once(SPECS[name], 1e-9)} for name in C.names()}

state = opt.state_dict()
report(RANK, size=SIZE, results=results, per_compressor=per_compressor, fused=fused,
       params={"whole": whole, "unused": unused_params, "none": mine},
       unused_losses=unused_losses, state_keys=sorted(state["horovod_gravac"]))
