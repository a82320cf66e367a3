"""What an engine is built from: its settings (:class:`EngineConfig`) and which tensors
travel together (:class:`BucketLayout`)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .. import agents as A
from .. import compression as C
from ..validation import check_number

NONFINITE_ACTIONS = ("skip", "raise")
#: gradient bytes per bucket by default (PyTorch DDP's ``bucket_cap_mb`` default is 25)
DEFAULT_BUCKET_CAP_MB = 25.0


@dataclass(frozen=True)
class EngineConfig:
    """Everything a front-end builds its engine from (validated when made).

    Arguments:
        compressor: the :class:`~horovod_gravac.compression.Compressor` of every tensor.
        memory: the error-feedback :class:`~horovod_gravac.compression.Memory`.
        agent: the agent that sets the CF, or None.
        on_nonfinite: ``"skip"`` or ``"raise"`` when a step's averaged gradient is not finite.
        min_compress_numel: gradients with fewer elements are sent uncompressed, without a
            residual (biases, norm scales).
        compress_patterns: name patterns → always (True) / never (False) compress.
        bucket_cap_mb: gradient megabytes (2**20 bytes) per bucket; > 0.
        average: average over ranks (True) or sum (False).
        predivide: ``gradient_predivide_factor`` f: payloads are scaled by 1/f before the sum
            and by f/N after it (Horovod's split of the average).
    """

    compressor: C.Compressor
    memory: C.Memory
    agent: A.Agent | None = None
    on_nonfinite: str = "skip"
    min_compress_numel: int = C.DEFAULT_MIN_COMPRESS_NUMEL
    compress_patterns: Mapping[str, bool] | None = None
    bucket_cap_mb: float = DEFAULT_BUCKET_CAP_MB
    average: bool = True
    predivide: float = 1.0

    def __post_init__(self) -> None:
        if self.on_nonfinite not in NONFINITE_ACTIONS:
            raise ValueError(f"on_nonfinite must be one of {NONFINITE_ACTIONS}, got "
                             f"{self.on_nonfinite!r}")
        check_number("bucket_cap_mb", self.bucket_cap_mb, 0, low_open=True)
        check_number("min_compress_numel", self.min_compress_numel, 0, integer=True)
        check_number("gradient_predivide_factor", self.predivide, 0, low_open=True)
        check_candidates(self.compressor, self.agent)
        if self.agent is not None and self.agent.sets_cf:
            C.check_adjustable(self.compressor, self.agent.name)

    @classmethod
    def create(cls, compression: str | C.Compressor = "none",
               memory: str | C.Memory | None = None, agent: str | A.Agent | None = None,
               **settings: Any) -> "EngineConfig":
        """A config from names or objects (``"topk:100"``, ``"residual"``, ``"gravac"``)."""
        compressor = C.create(compression)
        return cls(compressor, C.create_memory(memory, compressor), A.create(agent), **settings)

    def uncompressed(self, sizes: Sequence[tuple[str, int]]) -> frozenset[str]:
        """Names of the tensors exchanged dense (see ``compression.uncompressed_tensors``)."""
        return C.uncompressed_tensors(sizes, self.min_compress_numel, self.compress_patterns)


def check_candidates(compressor: C.Compressor, agent: A.Agent | None) -> None:
    """A set of candidates needs an agent that chooses among them, and such an agent a set."""
    if isinstance(compressor, C.Candidates):
        if agent is None:
            raise ValueError(f"compression candidates {'|'.join(compressor.specs)} need an "
                             "agent that chooses among them: give agent='choice'")
        agent.use_candidates(compressor.specs, tuple(
            compressor.is_dense(k) for k in range(len(compressor.specs))))
    elif agent is not None and agent.chooses_codec:
        raise ValueError(f"agent {agent.name!r} chooses among compression candidates, and "
                         f"{compressor.name!r} is one compressor: give compression='auto' "
                         f"({C.DEFAULT_CANDIDATES}) or your own set like 'dense|fp16|topk:100'")


@dataclass(frozen=True)
class BucketLayout:
    """Which tensors travel together: buckets in the order backprop completes them.

    A pure function of the tensors (names, gradient bytes, in the model's order), the cap
    and the explicit groups: the same on every rank, and the same after a resume, so the
    fused buffers — and the order in which Gloo's ring sums their elements — never change.
    """

    buckets: tuple[tuple[str, ...], ...]

    @classmethod
    def by_size(cls, tensors: Sequence[tuple[str, int]], cap_bytes: float,
                groups: Sequence[Sequence[str]] | None = None) -> "BucketLayout":
        """Consecutive tensors in reverse model order (backprop's) up to ``cap_bytes`` of
        gradient each (a larger tensor alone); with ``groups``, each group is a bucket and
        every other tensor goes alone (Horovod's ``groups``)."""
        order = {name: i for i, (name, _) in enumerate(tensors)}
        if groups is not None:
            grouped = {n for g in groups for n in g}
            buckets = [tuple(g) for g in groups if g] + [(n,) for n, _ in tensors
                                                         if n not in grouped]
            buckets.sort(key=lambda b: -max(order[n] for n in b))
            return cls(tuple(buckets))
        buckets, current, size = [], [], 0
        for name, nbytes in reversed(tensors):
            if current and size + nbytes > cap_bytes:
                buckets.append(tuple(current))
                current, size = [], 0
            current.append(name)
            size += nbytes
        if current:
            buckets.append(tuple(current))
        return cls(tuple(buckets))
