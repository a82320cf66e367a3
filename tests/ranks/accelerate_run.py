"""Hugging Face Accelerate under ``torchrun`` on CPU (``Accelerator(cpu=True)``, Gloo):
``accelerator.prepare`` hands back a DDP model, and horovod_gravac's hook is registered on it
with ``horovod_gravac.ddp.register_comm_hook``. TopK and PowerSGD, each under GraVAC.

argv: epochs
"""
import sys

import torch
from accelerate import Accelerator
from sklearn.datasets import load_digits
from torch.nn.parallel import DistributedDataParallel

from horovod_gravac import ddp
from horovod_gravac.adam import AdamExchange
from horovod_gravac.agents import GraVAC
from tests.multirank import report

torch.set_num_threads(1)
EPOCHS, SAMPLES, BATCH = int(sys.argv[1]), 640, 32   # 10 steps per epoch on each of 2 ranks
x_all, y_all = load_digits(return_X_y=True)
X = torch.tensor(x_all[:SAMPLES], dtype=torch.float32) / 16.0
Y = torch.tensor(y_all[:SAMPLES])

accelerator = Accelerator(cpu=True)


def full_loss(model):
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(X), Y).item()


def gravac():
    return GraVAC(theta_min=2, theta_max=64, epsilon=0.3, window=5, omega=0.0,
                  omega_throughput=0.0, settle_steps=1, policy="geometric", search="throughput")


results = {}
for name, compression in (("topk", "topk:100"), ("powersgd", "powersgd")):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    start_loss = full_loss(net)
    opt = torch.optim.SGD(net.parameters(), lr=0.2, momentum=0.9)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=BATCH)
    model, opt, loader = accelerator.prepare(net, opt, loader)  # each rank: its own shard
    state = ddp.register_comm_hook(model, compression=compression, agent=gravac(),
                                   min_compress_numel=0, optimizer=opt)
    for epoch in range(EPOCHS):
        for x, y in loader:
            opt.zero_grad()
            accelerator.backward(torch.nn.functional.cross_entropy(model(x), y))
            opt.step()
    stats = state.communication
    plain = accelerator.unwrap_model(model)
    results[name] = {"ddp": isinstance(model, DistributedDataParallel),
                     "params": {k: v.detach().clone() for k, v in plain.state_dict().items()},
                     "start_loss": start_loss, "loss": full_loss(plain),
                     "bytes": stats.total_bytes, "dense": stats.total_dense_bytes,
                     "exchanges": stats.steps}

# AdamW under the Adam-family exchange, the Accelerate guide's recipe: the hook state and the optimizer
# made before prepare, the hook registered on the DDP model prepare hands back
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
start_loss = full_loss(net)
state = ddp.DDPCompressionState(net, compression="topk:20", agent=gravac(), min_compress_numel=0)
opt = ddp.AdamExchangeOptimizer(torch.optim.AdamW(net.parameters(), lr=1e-2, eps=1e-6), state,
                                AdamExchange(warmup=4, max_warmup=4))
loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X, Y), batch_size=BATCH)
model, opt, loader = accelerator.prepare(net, opt, loader)
ddp.register_comm_hook(model, state=state)
for epoch in range(EPOCHS):
    for x, y in loader:
        opt.zero_grad()
        accelerator.backward(torch.nn.functional.cross_entropy(model(x), y))
        opt.step()
stats, plain = state.communication, accelerator.unwrap_model(model)
results["adamw"] = {"ddp": isinstance(model, DistributedDataParallel),
                    "params": {k: v.detach().clone() for k, v in plain.state_dict().items()},
                    "start_loss": start_loss, "loss": full_loss(plain),
                    "bytes": stats.total_bytes, "dense": stats.total_dense_bytes,
                    "exchanges": stats.steps, "frozen_step": state.adam.frozen_step}

report(accelerator.process_index, results=results,
       distributed_type=str(accelerator.distributed_type), processes=accelerator.num_processes)
accelerator.end_training()
