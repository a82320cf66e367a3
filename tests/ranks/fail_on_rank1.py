"""Rank 1 raises before a collective that rank 0 is waiting in: the job must not hang."""
import horovod.torch as hvd
import torch

hvd.init()
if hvd.rank() == 1:
    raise RuntimeError("rank 1 fails on purpose")
hvd.allreduce(torch.ones(1), name="never_completes")
