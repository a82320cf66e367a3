"""Horovod elastic for :class:`~horovod_gravac.optimizer.DistributedOptimizer`.

Importing this module registers a state handler in Horovod's elastic handler registry, so
``hvd.elastic.TorchState(model=model, optimizer=opt, ...)`` (re-exported here as
:class:`TorchState`) handles the optimizer correctly:

* ``commit``/``save`` keeps a copy of the whole optimizer state, error-feedback memories
  included; ``restore`` (after a failure) rolls every rank back to its own copy, as often as
  failures come before the next commit.
* ``sync`` (at start and after every reset of the world) takes from rank 0 what must be the
  same everywhere — the wrapped optimizer's state, the step, a shared compressor state
  (PowerSGD's Q) and the agent with its current decision — and **keeps each rank's own
  residuals** (and per-rank compressor state such as Signum's momentum): they are per rank by construction and never overwritten by rank 0's. A rank
  that joins starts with empty (zero) residuals; a removed rank's residual is dropped.
"""
from __future__ import annotations

import copy

from horovod.torch.elastic import TorchState
from horovod.torch.elastic.state import StateHandler, get_handler_registry, set_handler_registry

from .transport import horovod as horovod_transport
from .engine import rank_0_keys, with_rank_0_state
from .optimizer import DistributedOptimizer
from .optimizer import STATE_KEY as _OURS

__all__ = ["TorchState", "OptimizerStateHandler"]


class OptimizerStateHandler(StateHandler):
    """Saves, restores and synchronizes a :class:`DistributedOptimizer` for Horovod elastic."""

    def __init__(self, optimizer: DistributedOptimizer) -> None:
        super().__init__(optimizer)
        self._saved = copy.deepcopy(optimizer.state_dict())

    def save(self) -> None:
        self._saved = copy.deepcopy(self.value.state_dict())

    def restore(self) -> None:
        # a copy: ``torch.optim.Optimizer.load_state_dict`` keeps the tensors it is given (the
        # momentum buffers), so the steps after a restore would otherwise update the saved
        # state in place and a second failure before the next commit would roll back to it
        self.value.load_state_dict(copy.deepcopy(self._saved))

    def sync(self) -> None:
        state = self.value.state_dict()
        ours = state.pop(_OURS)
        compressor = self.value.compressor
        root = horovod_transport.broadcast_object(
            {"optimizer": state, **{k: ours[k] for k in rank_0_keys(compressor) if k in ours}})
        merged = root.pop("optimizer")
        merged[_OURS] = with_rank_0_state(ours, root, compressor)  # residuals stay this rank's
        self.value.load_state_dict(merged)


def _register() -> None:
    registry = [(t, h) for t, h in get_handler_registry() if h is not OptimizerStateHandler]
    set_handler_registry([(DistributedOptimizer, OptimizerStateHandler), *registry])


_register()
