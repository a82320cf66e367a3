"""A rank dies mid-training (SIGKILL, or an exception from bad data); the others must not hang.

argv: how (kill | raise)
"""
import os
import signal
import sys

import horovod.torch as hvd
import torch

import horovod_gravac as hg

hvd.init()
torch.set_num_threads(1)
RANK = hvd.rank()
HOW = sys.argv[1]
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
opt = hg.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05),
                              named_parameters=model.named_parameters(), compression="topk:10",
                              agent=hg.agents.GraVAC(theta_min=2, theta_max=50, window=5))
for step in range(100_000):
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))
    if step == 20 and RANK == 1:
        print(f"rank 1 dies at step {step} ({HOW})", flush=True)
        if HOW == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        y = torch.full((32,), 10)  # a label out of range: cross_entropy raises
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
