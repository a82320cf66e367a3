"""Mixed precision (torch.amp + GradScaler) with compressed gradients and error feedback.

    horovodrun -np 2 -H localhost:2 --gloo python examples/amp.py

The hooks compress the *scaled* gradients during backward, so residuals are in units of the
loss scale S. When the scaler changes S (halved after an overflow, doubled after a run of
good steps) the residuals are multiplied by the same factor, or they would count double or
half. On an overflow the averaged gradient holds Inf on every rank: the optimizer skips the
step (``opt.skipped_steps``), GradScaler skips its step too and lowers S, and the rank whose
gradient overflowed restarts that tensor's residual at zero.
"""
import horovod.torch as hvd
import torch

import horovod_gravac as hg

hvd.init()
torch.manual_seed(0)
device = "cuda" if torch.cuda.is_available() else "cpu"
dtype = torch.float16 if device == "cuda" else torch.bfloat16
model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)).to(device)
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
opt = hg.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                              named_parameters=model.named_parameters(), compression="topk:10")
scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 16, growth_interval=20)
gen = torch.Generator().manual_seed(hvd.rank())
for step in range(60):
    x = torch.randn(16, 32, generator=gen).to(device)
    y = torch.randint(4, (16,), generator=gen).to(device)
    opt.zero_grad()
    with torch.autocast(device, dtype=dtype):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    if step == 30:
        loss = loss * 1e38  # an overflow, as a too-large loss scale causes
    scaler.scale(loss).backward()
    opt.synchronize()                 # exchange the scaled gradients
    scaler.unscale_(opt)              # then unscale the averaged ones (finds the Inf)
    with opt.skip_synchronize():
        scaler.step(opt)              # skipped by GradScaler when it found Inf/NaN
    before = scaler.get_scale()
    scaler.update()
    if scaler.get_scale() != before:  # residuals follow the loss scale
        opt.memory.rescale(scaler.get_scale() / before)
        opt.compressor.rescale(scaler.get_scale() / before)  # a two-stage exchange's own
if hvd.rank() == 0:
    print(f"loss {loss.item():.3f}, skipped steps {opt.skipped_steps}, scale {scaler.get_scale():g}")
