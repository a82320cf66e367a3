"""Horovod's optimizer semantics against ours, in one launch: process sets, sparse gradients,
groups. Each case runs ``hvd.DistributedOptimizer`` and ours from the same start and reports
both final parameters (and ours under compression, which must agree across ranks)."""
import os

import horovod.torch as hvd
import torch

import horovod_gravac as hg
from tests.multirank import report

SIZE = int(os.environ.get("OMPI_COMM_WORLD_SIZE") or os.environ["HOROVOD_SIZE"])
EVEN = hvd.ProcessSet(list(range(0, SIZE, 2)))
ODD = hvd.ProcessSet(list(range(1, SIZE, 2)))
hvd.init(process_sets=[EVEN, ODD])
torch.set_num_threads(1)
RANK = hvd.rank()


class Net(torch.nn.Module):
    """An embedding (sparse or dense gradients) and three linear layers."""

    def __init__(self, sparse: bool = False):
        super().__init__()
        self.emb = torch.nn.Embedding(40, 16, sparse=sparse)
        self.fc1 = torch.nn.Linear(16, 32)
        self.fc2 = torch.nn.Linear(32, 32)
        self.out = torch.nn.Linear(32, 5)

    def forward(self, tokens):
        h = self.emb(tokens).mean(1)
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(h)))))


def train(make_opt, sparse=False, steps=8, adam=False):
    torch.manual_seed(0)
    model = Net(sparse)
    hvd.broadcast_parameters(model.state_dict(), root_rank=0)
    if adam:  # SparseAdam for the embedding, Adam for the rest
        base = [torch.optim.SparseAdam([model.emb.weight], lr=0.01),
                torch.optim.Adam([p for n, p in model.named_parameters() if n != "emb.weight"],
                                 lr=0.01)]
    else:
        base = [torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)]
    opts = [make_opt(b, model) for b in base]
    gen = torch.Generator().manual_seed(100 + RANK)  # every rank its own data
    for _ in range(steps):
        tokens = torch.randint(40, (8, 6), generator=gen)
        target = torch.randint(5, (8,), generator=gen)
        for o in opts:
            o.zero_grad()
        torch.nn.functional.cross_entropy(model(tokens), target).backward()
        for o in opts:
            o.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def named(opt, model):
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    return [(n, p) for n, p in model.named_parameters() if id(p) in ids]


def ours(**kw):
    return lambda opt, model: hg.DistributedOptimizer(opt, named_parameters=named(opt, model), **kw)


def horovods(**kw):
    return lambda opt, model: hvd.DistributedOptimizer(opt, named_parameters=named(opt, model),
                                                       **kw)


def explicit_groups(opt, model):
    """Horovod's list form: fc1 and fc2 together, the rest alone."""
    ids = {id(p) for g in opt.param_groups for p in g["params"]}
    return [[p for p in (*model.fc1.parameters(), *model.fc2.parameters()) if id(p) in ids]]


def with_groups(factory, groups_of, **kw):
    def make(opt, model):
        return factory(groups=groups_of(opt, model), **kw)(opt, model)
    return make


cases = {
    # process sets: built on every rank with the even set
    "process_set": (train(ours(process_set=EVEN)), train(horovods(process_set=EVEN))),
    "process_set_topk": (train(ours(process_set=EVEN, compression="topk:4")), None),
    # sparse gradients (SparseAdam refuses dense ones), exchanged sparse or dense
    "sparse": (train(ours(), sparse=True, adam=True),
               train(horovods(), sparse=True, adam=True)),
    "sparse_as_dense": (train(ours(sparse_as_dense=True), sparse=True, adam=True),
                        train(horovods(sparse_as_dense=True), sparse=True, adam=True)),
    "sparse_as_dense_topk": (train(ours(sparse_as_dense=True, compression="topk:4"),
                                   sparse=True, adam=True), None),
    # groups: an integer and Horovod's explicit list
    "groups_int": (train(ours(groups=3)), train(horovods(groups=3))),
    "groups_list": (train(with_groups(ours, explicit_groups)),
                    train(with_groups(horovods, explicit_groups))),
    "groups_topk": (train(ours(groups=2, compression="topk:4")), None),
    "groups_powersgd": (train(ours(groups=2, compression="powersgd")), None),
    "groups_gravac": (train(ours(groups=2, compression="topk", agent="gravac")), None),
}
report(RANK, cases=cases, in_even=EVEN.included())
