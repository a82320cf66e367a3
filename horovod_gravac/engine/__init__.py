"""The step engine: one rank's side of a compressed, fused gradient exchange, shared by both
front-ends (``DistributedOptimizer`` on Horovod, the DDP communication hook on
torch.distributed), by responsibility:

* :mod:`.config` — what an engine is built from (:class:`EngineConfig`) and which tensors
  travel together (:class:`BucketLayout`);
* :mod:`.step` — the step (:class:`StepEngine`: ``begin`` per tensor during backprop,
  ``finish`` once all have begun; the verdict and the report);
* :mod:`.encoding` — one tensor's error feedback and compression at the decision's CF;
* :mod:`.buckets` — the fused collectives per bucket and round, and their results;
* :mod:`.verdict` — whether the averaged gradient is finite, and whose it was if not;
* :mod:`.control` — the agent's statistics, its decision and the decision's broadcast;
* :mod:`.accounting` — bytes, the step's counters, the report, the pricing of an exchange.
"""
from .accounting import (CommunicationStats, StepReport, exchange_rounds, ladder_link_bytes,
                         step_traffic, tensor_link_bytes)
from .config import DEFAULT_BUCKET_CAP_MB, NONFINITE_ACTIONS, BucketLayout, EngineConfig
from .step import (ADAM_STATE, RANK_0_STATE, StepEngine, StepOutcome, engine_state,
                   load_engine_state, rank_0_keys, with_rank_0_state)
from .verdict import NonFiniteGradientError

__all__ = ["ADAM_STATE", "BucketLayout", "CommunicationStats", "DEFAULT_BUCKET_CAP_MB",
           "EngineConfig", "NONFINITE_ACTIONS", "NonFiniteGradientError", "RANK_0_STATE",
           "StepEngine", "StepOutcome", "StepReport", "engine_state", "exchange_rounds",
           "ladder_link_bytes", "load_engine_state", "rank_0_keys", "step_traffic",
           "tensor_link_bytes", "with_rank_0_state"]
