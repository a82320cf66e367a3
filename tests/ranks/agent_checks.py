"""Agents on real ranks with deliberately different data: the same decisions everywhere.

argv: steps
"""
import sys

import horovod.torch as hvd
import torch
from sklearn.datasets import load_digits

import horovod_gravac as hg
from tests.multirank import report

hvd.init()
torch.set_num_threads(1)
RANK, SIZE = hvd.rank(), hvd.size()
STEPS = int(sys.argv[1])
x_all, y_all = load_digits(return_X_y=True)
# Different data per rank: its own shard, its own input scale and label noise.
X = torch.tensor(x_all, dtype=torch.float32)[RANK::SIZE] / 16.0 * (1 + RANK)
Y = torch.tensor(y_all)[RANK::SIZE]
noisy = torch.rand(len(Y), generator=torch.Generator().manual_seed(RANK)) < 0.1 * RANK
Y[noisy] = torch.randint(0, 10, (int(noisy.sum()),), generator=torch.Generator().manual_seed(RANK))


def train(agent, compression="topk", memory=None, **options):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    opt = hg.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
                                  named_parameters=model.named_parameters(),
                                  compression=compression, agent=agent, memory=memory,
                                  **options)
    for step in range(STEPS):
        idx = torch.randint(0, len(X), (32,), generator=torch.Generator().manual_seed(step * 97 + RANK))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X[idx]), Y[idx]).backward()
        opt.step()
    decisions = [(d.cf, d.theta_min, d.send, tuple(sorted((d.layer_cf or {}).items())),
                  d.codec, tuple(sorted((d.layer_codec or {}).items())))
                 for d in opt.decisions]
    return {"decisions": decisions, "params": {k: v.detach().clone() for k, v in model.state_dict().items()},
            "bytes": opt.communication.total_bytes, "dense_bytes": opt.communication.total_dense_bytes,
            "history": opt.agent.history if RANK == 0 else None}


runs = {
    "gravac_exp": train(hg.agents.GraVAC(theta_min=2, theta_max=500, epsilon=0.3, window=25,
                                         policy="exponential", search="throughput")),
    "gravac_geo_dgc": train(hg.agents.GraVAC(theta_min=2, theta_max=200, epsilon=0.3, window=40,
                                             policy="geometric", search="throughput"),
                            compression="dgc", memory="dgc"),
    # PowerSGD's rank chosen by GraVAC: CF 2 → rank 16 on the 64×64 layer, … CF 32 → rank 1
    "gravac_powersgd": train(hg.agents.GraVAC(theta_min=2, theta_max=32, epsilon=0.3, window=25,
                                              policy="geometric", search="throughput"),
                             compression="powersgd"),
    # the cost-model search (every tensor compressed: two weights, two biases)
    "gravac_cost": train(hg.agents.GraVAC(theta_min=2, theta_max=64, epsilon=0.3, window=25,
                                          search="cost_model"), min_compress_numel=0),
    # error-budgeted layer plans under a static CF and under GraVAC (PowerSGD's ranks)
    "plan_static": train(hg.agents.LayerPlan(hg.agents.Static(cf=20), plan_interval=25),
                         min_compress_numel=0),
    "plan_gravac_powersgd": train(hg.agents.LayerPlan(
        hg.agents.GraVAC(theta_min=2, theta_max=32, epsilon=0.3, window=25), plan_interval=20),
        compression="powersgd", min_compress_numel=0),
    "accordion": train(hg.agents.Accordion(low_cf=2, high_cf=20, interval=50)),
    "static": train(hg.agents.Static(cf=20)),
    # the codec among candidates, measured costs and gains: TopK 50x starts and is below
    # ε=0.99, so the first interval's end leaves it for dense, fp16 or PowerSGD
    "choice": train(hg.agents.CodecChoice(epsilon=0.99, interval=15, gain_interval=1),
                    compression="topk:50|dense|fp16|powersgd:2", min_compress_numel=0),
    # a codec per tensor under the choice's (every candidate admissible at ε = 0.05), within
    # 1.25x its error: the biases PowerSGD sends whole go to TopK 50x
    "plan_choice": train(hg.agents.LayerPlan(hg.agents.CodecChoice(epsilon=0.05, interval=15,
                                                                   gain_interval=1),
                                             alpha=1.25, plan_interval=10, measure_steps=2),
                         compression="powersgd:2|topk:50|topk:4", min_compress_numel=0),
}
report(RANK, runs=runs, mpi=hvd.mpi_enabled())
