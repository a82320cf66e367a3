"""Adam/AdamW under compression: the Adam-family exchange (``horovod_gravac.adam``).

    horovodrun -np 2 -H localhost:2 --gloo python examples/adam.py

Compressing AdamW's *gradients* breaks Adam: its second moment v is not linear in the
gradient, so the coordinates rarely sent get a v near zero and their delayed residuals
arrive amplified (TopK at every CF, PowerSGD rank 1 ended on PTB's unigram plateau in this
project's measurements). So with an Adam/AdamW and a compressor beyond fp16 the optimizer
runs, by default (``adam_exchange="auto"``), the exchange of 1-bit Adam:

1. dense steps of the wrapped AdamW until rank 0 sees v settle (its relative change over
   ``check_interval`` steps at most ``tolerance``, after at least ``warmup`` steps);
2. v frozen, every rank exchanges its preconditioned gradient d ⊙ g (d = 1/(√v̂ + ε)),
   compressed with error feedback under the agent's decisions, and ``step()`` applies the
   frozen-variance update (a floor keeps each coordinate's update at most lr / (1 − β1^t)
   where gradients outgrow the frozen v).

``adam_exchange="off"`` compresses the gradients as for SGD. The freeze is a decision rank 0
broadcasts; the phase is in ``opt.state_dict()`` and checkpoints. With DDP, Accelerate or
Lightning: ``horovod_gravac.ddp.AdamExchangeOptimizer`` and ``CompressionCallback``.
"""
import horovod.torch as hvd
import torch

import horovod_gravac as hg
from horovod_gravac.adam import AdamExchange

hvd.init()
torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
base = torch.optim.AdamW(model.parameters(), lr=3e-3, eps=1e-6, weight_decay=0.01)
opt = hg.DistributedOptimizer(base, named_parameters=model.named_parameters(),
                              compression="topk:10", agent="gravac",
                              adam_exchange=AdamExchange(warmup=10, tolerance=0.2))
hvd.broadcast_optimizer_state(opt, root_rank=0)
gen = torch.Generator().manual_seed(hvd.rank())
for step in range(60):
    x, y = torch.randn(16, 32, generator=gen), torch.randint(4, (16,), generator=gen)
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
if hvd.rank() == 0:
    print(f"loss {loss.item():.3f}; Adam's variance frozen at step {opt.adam.frozen_step}; "
          f"{opt.communication.total_dense_bytes / opt.communication.total_bytes:.1f}x fewer "
          "bytes than dense")
