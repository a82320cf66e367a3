"""Adaptive compression agents: decisions only, no tensors.

``create("gravac", theta_min=10, ...)`` or an agent object; ``AGENTS`` is the registry.
"""
from __future__ import annotations

from typing import Any

from .accordion import Accordion
from .choice import CodecChoice
from .costmodel import CodecCosts, Link, Traffic, fit_link
from .base import (COMPENSATED, GRADIENT, RECENT_STEPS, SEND_CHOICES, SEND_COMPRESSED, SEND_DENSE,
                   SEND_MIN, Agent, Decision, ErrorSpec, GainMeasure, ProbeSpec, StepStats,
                   Wrapper)
from .gravac import GAINS, SCALING_POLICIES, GraVAC
from .phases import FROZEN, WARMUP, AdamPhases, FreezeRule
from .plan import LayerPlan, plan_layers
from .static import Static

AGENTS: dict[str, type[Agent]] = {cls.name: cls for cls in (Static, GraVAC, Accordion,
                                                              CodecChoice)}


def create(spec: str | Agent | None, **params: Any) -> Agent | None:
    """An agent by name with parameters; ``None``/"none" for no agent."""
    if spec is None or isinstance(spec, Agent):
        return spec
    if spec == "none":
        return None
    cls = AGENTS.get(spec)
    if cls is None:
        raise ValueError(f"unknown agent {spec!r}; valid agents: none, {', '.join(AGENTS)}")
    try:
        return cls(**params)
    except TypeError as exc:
        raise ValueError(f"bad parameters for agent {spec!r}: {exc}") from None


__all__ = ["AGENTS", "Agent", "Accordion", "CodecChoice", "CodecCosts", "Link", "Traffic",
           "fit_link", "AdamPhases", "FROZEN", "FreezeRule", "WARMUP", "COMPENSATED", "Decision", "ErrorSpec", "GAINS",
           "GRADIENT", "GainMeasure", "GraVAC", "LayerPlan", "ProbeSpec", "RECENT_STEPS",
           "SCALING_POLICIES", "SEND_CHOICES", "SEND_COMPRESSED", "SEND_DENSE", "SEND_MIN", "Static", "StepStats",
           "Wrapper", "create", "plan_layers"]
