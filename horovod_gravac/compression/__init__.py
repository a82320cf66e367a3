"""Pluggable gradient compression (pure torch, no collectives).

    >>> from horovod_gravac import compression
    >>> c = compression.create("topk:100")          # or create("topk", cf=100)
    >>> payload, ctx = c.compress(grad)
    >>> approx = c.decompress(payload, ctx)

``names()`` lists every compressor; an unknown name or parameter raises ``ValueError``
naming the valid ones.
"""
from __future__ import annotations

import inspect
from typing import Any

from .base import (Compressor, Ctx, Exchange, Payload, SeededCompressor, finite_marker,
                   is_finite, num_selected, payload_is_finite, scale_and_check, validate_cf,
                   wire_bytes, write_into)
from .candidates import ADAM_CANDIDATES, DEFAULT_CANDIDATES, DENSE, SEPARATOR, Candidates
from .lowrank import PowerSGD
from .memory import MEMORIES, DGCMemory, EFSignSGDMemory, Memory, ResidualMemory
from .selection import DEFAULT_MIN_COMPRESS_NUMEL, uncompressed_tensors
from .quantizers import (FP16, QSGD, EFSignSGD, EightBit, Natural, NoCompression, OneBit,
                         SignSGD, Signum, TernGrad)
from .sparsifiers import DGC, SIDCo, RandomK, RedSync, Sparsifier, Threshold, TopK
from .twostage import (AUTO_TWO_STAGE_FROM, EXCHANGES, TwoStageQuantizer, chunk_bounds,
                       chunk_width)

COMPRESSORS: dict[str, type[Compressor]] = {cls.name: cls for cls in (
    NoCompression, FP16, EightBit, QSGD, TernGrad, Natural, SignSGD, Signum, EFSignSGD, OneBit,
    TopK, RandomK, Threshold, DGC, RedSync, SIDCo, PowerSGD)}


def names() -> list[str]:
    """Every registered compressor name."""
    return sorted(COMPRESSORS)


def _parameters(cls: type) -> list[str]:
    params: list[str] = []
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            for p in list(inspect.signature(klass.__init__).parameters)[1:]:
                if p not in params and p not in ("args", "kwargs"):
                    params.append(p)
    return params


def _parse_value(text: str) -> Any:
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    return text.strip()


def parse_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"topk:100"`` → ("topk", {"cf": 100}); ``"qsgd:levels=16,bucket_size=512"`` → kwargs.

    A bare value after the colon is the compressor's main knob, its first parameter (``cf``
    for sparsifiers; ``powersgd:2`` is rank 2, ``qsgd:16`` 16 levels).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"compression spec must be a non-empty string like 'topk:100', got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    params: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            cls = COMPRESSORS.get(name)
            if cls is None:
                break  # reported below with the list of names
            key, value = (_parameters(cls) or ["cf"])[0], item
        params[key.strip()] = _parse_value(value)
    return name, params


def create(spec: str | Compressor, **params: Any) -> Compressor:
    """A compressor from its name (or ``"name:value"`` string) and parameters; a set of
    candidates an agent chooses among from ``"dense|fp16|topk:100"`` (``"auto"``:
    :data:`DEFAULT_CANDIDATES`)."""
    if isinstance(spec, Compressor):
        if params:
            raise ValueError("parameters can't be given with a compressor object")
        return spec
    if isinstance(spec, str) and (SEPARATOR in spec or _is_auto(spec)):
        if params:
            raise ValueError(f"parameters can't be given with a set of candidates ({spec!r}): "
                             "write them into each candidate, e.g. 'topk:cf=100,value_dtype=fp16'")
        return create_candidates(DEFAULT_CANDIDATES if _is_auto(spec) else spec)
    name, parsed = parse_spec(spec)
    cls = COMPRESSORS.get(name)
    if cls is None:
        raise ValueError(f"unknown compressor {name!r}; valid names: {', '.join(names())}")
    parsed.update(params)
    valid = _parameters(cls)
    unknown = sorted(set(parsed) - set(valid))
    if "exchange" in unknown:
        two_stage = sorted(n for n, c in COMPRESSORS.items() if issubclass(c, TwoStageQuantizer))
        raise ValueError(f"compressor {name!r} has no choice of exchange (two stages need a "
                         "quantizer whose chunks can be averaged and quantized again: see "
                         "horovod_gravac.compression.twostage); the ones that have it: "
                         f"{', '.join(two_stage)}")
    if unknown:
        raise ValueError(f"compressor {name!r} has no parameter {', '.join(map(repr, unknown))}; "
                         f"valid parameters: {', '.join(valid) or 'none'}")
    try:
        return cls(**parsed)
    except TypeError as exc:
        raise ValueError(f"bad parameters for compressor {name!r}: {exc}") from None


def for_optimizer(spec: str | Compressor, under_exchange: bool) -> str | Compressor:
    """``spec`` as a run with (``under_exchange``) or without the Adam-family exchange means
    it: ``"auto"`` is :data:`ADAM_CANDIDATES` under the exchange (no sparsifier), else as
    written."""
    return ADAM_CANDIDATES if _is_auto(spec) and under_exchange else spec


def _is_auto(spec: str | Compressor) -> bool:
    """Whether ``spec`` names the default set of candidates (``"auto"``)."""
    return isinstance(spec, str) and spec.strip().lower() == "auto"


def create_candidates(spec: str) -> Candidates:
    """The set ``"dense|fp16|powersgd:1"``: each candidate built once (``"dense"`` is
    ``"none"``); an empty set, an empty candidate, a duplicate or a set within a set is a
    ``ValueError`` naming it."""
    specs = [part.strip() for part in spec.split(SEPARATOR)]
    if len(specs) < 2 or not all(specs):
        raise ValueError(f"compression candidates must be two or more specs separated by "
                         f"{SEPARATOR!r}, like {DEFAULT_CANDIDATES!r}; got {spec!r}")
    built, seen = [], {}
    for text in specs:
        if text.lower() == "auto":
            raise ValueError(f"compression candidates {spec!r}: 'auto' is itself a set "
                             f"({DEFAULT_CANDIDATES}); list candidates instead")
        try:
            compressor = create("none" if text.lower() == DENSE else text)
        except ValueError as exc:
            raise ValueError(f"compression candidates {spec!r}: {exc}") from None
        key = repr(compressor) + repr(sorted(vars(compressor).items(), key=lambda kv: kv[0]))
        if key in seen:
            raise ValueError(f"compression candidates {spec!r}: {text!r} repeats {seen[key]!r}")
        seen[key] = text
        built.append(compressor)
    return Candidates(built, specs)


def check_adjustable(compressor: Compressor, agent_name: str) -> None:
    """An agent sets the CF: refuse a compressor whose CF is fixed, naming those that fit."""
    if not compressor.adjustable_cf:
        adjustable = [n for n in names() if COMPRESSORS[n].adjustable_cf]
        raise ValueError(f"agent {agent_name!r} sets the compression factor, which "
                         f"{compressor.name!r} does not have; use one of {', '.join(adjustable)}")


def create_memory(name: str | Memory | None, compressor: Compressor, **params: Any) -> Memory:
    """The error-feedback memory ``name`` (default: the compressor's own) for ``compressor``."""
    if isinstance(name, Memory):
        return name
    name = compressor.default_memory if name is None else name
    cls = MEMORIES.get(name)
    if cls is None:
        raise ValueError(f"unknown memory {name!r}; valid memories: {', '.join(sorted(MEMORIES))}")
    if cls is DGCMemory and not isinstance(compressor, Sparsifier):
        raise ValueError(f"the 'dgc' memory needs a sparsifier; {compressor.name!r} is not one")
    return cls(**params)


__all__ = [
    "ADAM_CANDIDATES", "COMPRESSORS", "MEMORIES", "Candidates", "DEFAULT_CANDIDATES",
    "create_candidates", "for_optimizer",
    "Compressor", "Ctx", "Exchange", "Memory", "Payload",
    "ResidualMemory", "DGCMemory", "EFSignSGDMemory", "SeededCompressor", "check_adjustable",
    "create", "create_memory", "names", "parse_spec", "num_selected",
    "DEFAULT_MIN_COMPRESS_NUMEL", "uncompressed_tensors", "validate_cf", "wire_bytes",
    "finite_marker", "is_finite", "payload_is_finite", "scale_and_check", "write_into",
    "AUTO_TWO_STAGE_FROM", "EXCHANGES", "TwoStageQuantizer", "chunk_bounds", "chunk_width",
    *(cls.__name__ for cls in COMPRESSORS.values()),
]
