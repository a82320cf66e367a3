"""Dense Horovod training of a small MLP on each rank's shard of scikit-learn's digits."""
import horovod.torch as hvd
import torch
from sklearn.datasets import load_digits

from tests.multirank import report

hvd.init()
torch.manual_seed(0)
torch.set_num_threads(1)
x, y = load_digits(return_X_y=True)
x = torch.tensor(x, dtype=torch.float32)[hvd.rank()::hvd.size()] / 16.0
y = torch.tensor(y)[hvd.rank()::hvd.size()]

model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
hvd.broadcast_parameters(model.state_dict(), root_rank=0)
opt = hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters())

losses = []
for step in range(30):
    idx = torch.arange(step * 32, step * 32 + 32) % len(x)
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
    loss.backward()
    opt.step()
    losses.append(hvd.allreduce(loss.detach(), name="loss").item())

if hvd.rank() == 0:
    print(f"dense Horovod on {hvd.size()} ranks, digits MLP: loss {losses[0]:.3f} -> {losses[-1]:.3f} "
          f"in {len(losses)} steps", flush=True)
report(hvd.rank(), size=hvd.size(), losses=losses,
       params={k: v.detach().clone() for k, v in model.state_dict().items()})
