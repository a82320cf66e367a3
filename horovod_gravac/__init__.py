"""horovod-gravac: communicate less, adaptively, in data-parallel PyTorch on Horovod
(``DistributedOptimizer``) or PyTorch DDP (``horovod_gravac.ddp``)::

    import horovod.torch as hvd
    import horovod_gravac as hg

    hvd.init()
    opt = hg.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                  named_parameters=model.named_parameters(),
                                  compression="topk:100")
"""
from . import agents, compression

__version__ = "0.1.0"

_OPTIMIZER = ("DistributedOptimizer", "CommunicationStats", "NonFiniteGradientError",
              "StepReport")
__all__ = ["agents", "compression", "checkpoint", "ddp", "elastic", "Settings", *_OPTIMIZER,
           "__version__"]


def __getattr__(name: str):
    # These import horovod.torch; the compression layer stays importable without it.
    if name in _OPTIMIZER:
        from . import optimizer
        from . import elastic  # noqa: F401  registers the optimizer's state handler
        return getattr(optimizer, name)
    if name == "Settings":  # torch, not Horovod
        from .settings import Settings
        return Settings
    if name in ("checkpoint", "ddp", "elastic"):  # ddp needs torch.distributed, not Horovod
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'horovod_gravac' has no attribute {name!r}")
