"""horovod-gravac: communicate less, adaptively, in data-parallel PyTorch on Horovod."""

__version__ = "0.1.0"
