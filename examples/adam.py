"""Adam/AdamW with compressed gradients and error feedback.

    horovodrun -np 2 -H localhost:2 --gloo python examples/adam.py

Error feedback works on gradients, before the optimizer: Adam sees the averaged compressed
gradient, whose coordinates are mostly zero at a high CF, so its second-moment estimate
shrinks for coordinates that are rarely sent and their occasional large (accumulated)
update is amplified. Keep the CF moderate (≤ 10–20) or raise ``eps``; with SGD the
residual's delay is the only effect. The optimizer state stays identical on every rank,
because every rank applies the same averaged gradient.
"""
import horovod.torch as hvd
import torch

import horovod_gravac as hg

hvd.init()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
base = torch.optim.AdamW(model.parameters(), lr=3e-3, eps=1e-6, weight_decay=0.01)
opt = hg.DistributedOptimizer(base, named_parameters=model.named_parameters(), compression="topk:10")
hvd.broadcast_optimizer_state(base, root_rank=0)
gen = torch.Generator().manual_seed(hvd.rank())
for step in range(60):
    x, y = torch.randn(16, 32, generator=gen), torch.randint(4, (16,), generator=gen)
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
if hvd.rank() == 0:
    print(f"loss {loss.item():.3f}")
