"""Soak: many steps of GraVAC changing the CF; memory (RSS) and pending handles must not grow.

argv: steps. Reports RSS every SAMPLE steps, the largest number of Horovod handles still
open after a step, and the CFs the agent chose.
"""
import resource
import sys

import horovod.torch as hvd
import torch
from horovod.torch import mpi_ops

import horovod_gravac as hg
from tests.multirank import init_with_digits_shard, report

STEPS, SAMPLE = int(sys.argv[1]), 50
RANK, SIZE, X, Y = init_with_digits_shard()
PAGE = resource.getpagesize()


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**20


torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
opt = hg.DistributedOptimizer(
    torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
    named_parameters=model.named_parameters(), compression="topk",
    # no throughput saturation: the search always walks the CFs up to theta_max
    agent=hg.agents.GraVAC(theta_min=2, theta_max=200, epsilon=0.3, window=50,
                           omega_throughput=0.0, search="throughput"))
rss, open_handles = [], 0
for step in range(STEPS):
    idx = torch.randint(0, len(X), (32,), generator=torch.Generator().manual_seed(step * 97 + RANK))
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()
    opt.step()
    open_handles = max(open_handles, len(mpi_ops._handle_map) + len(opt._pending))
    if step % SAMPLE == 0:
        rss.append((step, rss_mib()))
report(RANK, rss=rss, open_handles=open_handles, cfs=sorted({d.cf for d in opt.decisions}),
       params={k: v.detach().clone() for k, v in model.state_dict().items()},
       history_len=len(opt.agent.history), decisions_len=len(opt.decisions))
