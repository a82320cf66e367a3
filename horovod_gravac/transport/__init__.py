"""The one place that calls collectives: what a transport provides and the wire format both
share (:mod:`.protocol`), Horovod's transport (:mod:`.horovod`, imported only where Horovod
is used) and torch.distributed's (:mod:`.torch_distributed`, the DDP hook's)."""
from .protocol import (HEADER_DTYPE, Handle, Transport, align, header_length, link_bytes,
                       link_steps, pack, pack_rows, unpack, unpack_rows)

__all__ = ["HEADER_DTYPE", "Handle", "Transport", "align", "header_length", "link_bytes",
           "link_steps", "pack", "pack_rows", "unpack", "unpack_rows"]
