"""A set of codecs to choose among, step by step: ``"dense|fp16|powersgd:1|topk:100"``.

An agent that chooses the codec (:class:`~horovod_gravac.agents.CodecChoice`) names one by
its index in the set (``Decision.codec``); the engine compresses each tensor with that
candidate (:meth:`Candidates.pick`) and exchanges it the way the candidate does. Every
candidate is built once and kept, with its own state (PowerSGD's warm-start Q), so a switch
costs nothing but the next step's different exchange.

**Residuals across a switch.** The error-feedback memory is the set's, not a candidate's:
the residual e = x − C(x) a candidate left is added to the next gradient whatever candidate
compresses it next (error feedback only needs e to be what was not sent); a dense step
sends g + e whole and restarts e at zero, as GraVAC's dense branch does. Candidates that keep
a memory of their own kind (EF-SignSGD's scaled one, DGC's momentum) are refused.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from .base import Compressor, Ctx, Payload

#: what separates the candidates in a spec
SEPARATOR = "|"
#: the candidates of ``compression="auto"``: dense and fp16 where compression does not pay,
#: PowerSGD for summed low-rank exchanges, TopK for gathered sparse ones
DEFAULT_CANDIDATES = "dense|fp16|powersgd:1|powersgd:4|topk:100|topk:1000"
#: ``"auto"`` under the Adam-family exchange: no sparsifier. Measured on gpt4x256 with AdamW
#: (the variance frozen, the preconditioned gradient exchanged): TopK 100x ends 1.15-1.24x
#: dense's perplexity against PowerSGD rank 1's 1.08x, and when the codec choice sent it,
#: admitted by its gain, the perplexity stalled for its 29 steps
ADAM_CANDIDATES = "dense|fp16|powersgd:1|powersgd:4"
#: the name that means "exchange the tensor as it is" in a set (``"none"`` works too)
DENSE = "dense"


class Candidates(Compressor):
    """The codecs an agent chooses among (see the module docstring).

    Arguments:
        candidates: the compressors, built from their specs by
            :func:`~horovod_gravac.compression.create`; ``"dense"`` is the identity.
        specs: their specs, as the user wrote them (the names logs and metrics show).
    """

    name = "candidates"  # an instance's is its set, "dense|fp16|topk:100"

    def __init__(self, candidates: Sequence[Compressor], specs: Sequence[str]) -> None:
        super().__init__()
        self.candidates = tuple(candidates)
        self.specs = tuple(specs)
        #: the set as written (what a checkpoint must match to resume)
        self.name = SEPARATOR.join(self.specs)
        own = sorted({c.default_memory for c in self.candidates} - {"none", "residual"})
        if own:
            raise ValueError(f"compression candidates {list(self.specs)} include compressors "
                             f"that keep a memory of their own ({', '.join(own)}); a set shares "
                             "one residual: leave them out")

    # -- what the set is ---------------------------------------------------------------------
    @property
    def default_memory(self) -> str:  # type: ignore[override]
        """Error feedback where any candidate drops something."""
        return "residual" if any(c.default_memory == "residual" for c in self.candidates) \
            else "none"

    @property
    def preserves_adam(self) -> bool:  # type: ignore[override]
        return all(c.preserves_adam for c in self.candidates)

    @property
    def state_is_shared(self) -> bool:  # type: ignore[override]
        return all(c.state_is_shared for c in self.candidates)

    def pick(self, codec: int) -> Compressor:
        """Candidate ``codec``."""
        return self.candidates[codec]

    def is_dense(self, codec: int) -> bool:
        """Whether candidate ``codec`` sends the tensor as it is (a dense allreduce)."""
        return self.candidates[codec].name == "none"

    def energies(self, tensor: Tensor, name: str = "", step: int = 0,
                 sample: int | None = None, sent: int | None = None) -> Tensor:
        """‖C_k(tensor)‖² for every candidate k at its own setting (the agent's gains): from
        ``sample`` elements where the candidate estimates it (sparsifiers, PowerSGD); ‖x‖²
        for those near enough to dense for Adam (the identity, fp16), uncompressed. The
        candidates other than the one ``sent`` are measured as they would be once sent for a
        while (:meth:`~horovod_gravac.compression.Compressor.settled_energy_profile`: a
        PowerSGD never sent still has its seeded Q)."""
        rows = []
        whole = torch.linalg.vector_norm(tensor, dtype=torch.float32).square()
        for k, candidate in enumerate(self.candidates):
            if candidate.preserves_adam:
                rows.append(whole)
            elif candidate.adjustable_cf:
                profile = candidate.energy_profile if k == sent else \
                    candidate.settled_energy_profile
                rows.append(profile(tensor, [candidate.cf], name, step, sample=sample)[0].float())
            else:
                payload, ctx = candidate.compress(tensor, name, step)
                rows.append(candidate.sent_norm_sq(payload, ctx).float())
        return torch.stack(rows)

    def errors(self, tensor: Tensor, name: str = "", step: int = 0,
               sample: int | None = None, sent: int | None = None) -> Tensor:
        """‖tensor − C_k(tensor)‖² for every candidate k at its own setting (a layer plan's
        errors, per codec): 0 for the identity; a candidate with a CF from its
        :meth:`~horovod_gravac.compression.Compressor.error_profile` on ``sample`` elements
        (those not ``sent``, as they would settle, as in :meth:`energies`); any other from
        what error feedback would keep of one compression (fp16's rounding, a quantizer's
        error)."""
        rows = []
        for k, candidate in enumerate(self.candidates):
            if self.is_dense(k):
                rows.append(torch.zeros((), device=tensor.device))
            elif candidate.adjustable_cf:
                profile = candidate.error_profile if k == sent else \
                    candidate.settled_error_profile
                rows.append(profile(tensor, [candidate.cf], name, step, sample=sample)[0].float())
            else:
                payload, ctx = candidate.compress(tensor, name, step)
                kept = candidate.error(tensor.clone(), payload, ctx)
                rows.append(torch.linalg.vector_norm(kept, dtype=torch.float32).square())
        return torch.stack(rows)

    # -- the compressor interface, forwarded to every candidate ---------------------------------
    def bind(self, rank: int, size: int) -> None:
        super().bind(rank, size)
        for candidate in self.candidates:
            candidate.bind(rank, size)

    def compress(self, tensor: Tensor, name: str = "", step: int = 0) -> tuple[Payload, Ctx]:
        raise RuntimeError("a set of candidates compresses nothing itself: the engine "
                           "compresses with pick(decision.codec)")

    def state_dict(self) -> dict[str, Any]:
        return {"candidates": [c.state_dict() for c in self.candidates]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("candidates", [])
        if len(saved) != len(self.candidates):
            raise ValueError(f"the saved state has {len(saved)} compression candidates, this "
                             f"run {len(self.candidates)} ({SEPARATOR.join(self.specs)}): "
                             "resume with the same --compression")
        for candidate, ours in zip(self.candidates, saved):
            candidate.load_state_dict(ours)

    def rescale(self, factor: float) -> None:
        for candidate in self.candidates:
            candidate.rescale(factor)

    def __repr__(self) -> str:
        return f"Candidates({SEPARATOR.join(self.specs)!r})"
