"""An optimizer around another one, as Horovod's ``DistributedOptimizer`` is: its
``param_groups`` and ``state`` *are* the wrapped optimizer's, so learning-rate schedulers,
``add_param_group`` and the wrapped optimizer's own ``load_state_dict`` act on one object."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


class WrappedOptimizer(torch.optim.Optimizer):
    """Base class of the optimizers that wrap ``optimizer`` (kept as ``self.optimizer``).

    Arguments:
        optimizer: the optimizer whose parameters, groups and state this one shares.
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ValueError("optimizer must be a torch.optim.Optimizer, got "
                             f"{type(optimizer).__name__}")
        super().__init__(optimizer.param_groups, optimizer.defaults)
        self.optimizer = optimizer
        # what torch.optim.Optimizer.__init__ built before there was a wrapped one
        self.__dict__.pop("_before_wrapping", None)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self._wrapped("param_groups")

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self._set_wrapped("param_groups", value)

    @property
    def state(self) -> dict[Tensor, Any]:
        return self._wrapped("state")

    @state.setter
    def state(self, value: dict[Tensor, Any]) -> None:
        self._set_wrapped("state", value)

    def _wrapped(self, name: str) -> Any:
        inner = self.__dict__.get("optimizer")
        if inner is None:
            return self.__dict__["_before_wrapping"][name]
        return getattr(inner, name)

    def _set_wrapped(self, name: str, value: Any) -> None:
        inner = self.__dict__.get("optimizer")
        if inner is None:
            self.__dict__.setdefault("_before_wrapping", {})[name] = value
        else:
            setattr(inner, name, value)
