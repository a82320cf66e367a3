"""Gradient accumulation: ``backward_passes_per_step`` micro-batches per exchange.

    horovodrun -np 2 -H localhost:2 --gloo python examples/accumulation.py

As with Horovod, the hooks count backward passes and compress and send each gradient once,
after its last micro-batch; the error-feedback residual is added once per exchange. Scale
each micro-batch loss by 1/passes so the step sees the mean gradient.
"""
import horovod.torch as hvd
import torch

import horovod_gravac as hg

PASSES = 4
hvd.init()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
opt = hg.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                              named_parameters=model.named_parameters(), compression="topk:10",
                              backward_passes_per_step=PASSES)
gen = torch.Generator().manual_seed(hvd.rank())
for step in range(30):
    opt.zero_grad()
    for _ in range(PASSES):
        x, y = torch.randn(8, 32, generator=gen), torch.randint(4, (8,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x), y) / PASSES
        loss.backward()
    opt.step()
if hvd.rank() == 0:
    print(f"{opt.communication.steps} exchanges for {30 * PASSES} backward passes")
