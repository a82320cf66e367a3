"""The tensor side of an agent's :class:`~horovod_gravac.agents.ProbeSpec` and
:class:`~horovod_gravac.agents.ErrorSpec`.

An agent says what to measure (which tensor, which CFs, which power, summed or per tensor);
:class:`GainProbe` measures it on this rank's tensors, before error feedback changes them,
and hands the engine one float32 vector per step to sum over ranks. The energies come from
the compressor's :meth:`~horovod_gravac.compression.Compressor.energy_profile`, estimated on
a sample where the compressor can (no second compression of the gradient).
:class:`ErrorProbe` does the same for a layer plan's compression errors
(:meth:`~horovod_gravac.compression.Compressor.error_profile`).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .agents import COMPENSATED, Agent, Decision, ErrorSpec, ProbeSpec
from .compression import Compressor


#: the fewest elements a tensor's gain is estimated from (fewer: all of them)
MIN_SAMPLE = 1024


class Probe:
    """Per-tensor rows of measurements within a step, taken as one vector for the engine to
    sum over ranks; ``spec.sample`` elements a step shared among the tensors ``sizes``
    names."""

    def __init__(self, spec: ProbeSpec | ErrorSpec, compressor: Compressor,
                 sizes: list[tuple[str, int]]) -> None:
        self.spec, self.compressor = spec, compressor
        self.names = [name for name, _ in sizes]
        self.samples = shares(spec.sample, sizes)
        self._rows: dict[str, Tensor] = {}

    def clear(self) -> None:
        self._rows = {}


class GainProbe(Probe):
    """Measures ``spec`` for ``compressor`` on the tensors ``sizes`` names (every rank alike).

    ``spec.sample`` elements a step are shared among the tensors in proportion to their
    sizes (at least ``MIN_SAMPLE`` each), so that a model of many small tensors (ResNet's
    314) costs no more to measure than one of a few large ones.

    Arguments:
        spec: what the agent asks for.
        compressor: whose compressions are measured.
        sizes: ``(name, numel)`` of every tensor that may be measured.
    """

    @property
    def width(self) -> int:
        """Floats a step's terms take (:meth:`ProbeSpec.width`)."""
        return self.spec.width(len(self.compressor.candidates) if self.spec.per_codec else 0)

    def measure(self, name: str, grad: Tensor, compensated: Tensor, decision: Decision,
                step: int) -> None:
        """Record tensor ``name``'s row: [‖reference‖^p, ‖C(x, c)‖^p for each CF]."""
        spec = self.spec
        x = compensated if spec.measure.compressed == COMPENSATED else grad
        reference = compensated if spec.measure.reference == COMPENSATED else grad
        sample = self.samples[name]
        energies = self.compressor.energies(x, name, step, sample=sample,
                                            sent=decision.codec_for(name)) if spec.per_codec \
            else self.compressor.energy_profile(x, spec.cfs(decision), name, step, sample=sample)
        norm = torch.linalg.vector_norm(reference, dtype=torch.float32)
        row = torch.cat([norm.square().reshape(1), energies.float()])
        self._rows[name] = row.sqrt() if spec.measure.power == 1 else row

    def take(self, device: torch.device) -> Tensor:
        """This step's terms summed over tensors (:attr:`width` floats; zeros when
        nothing was measured); forgets them."""
        rows, self._rows = self._rows, {}
        if not rows:
            return torch.zeros(self.width, device=device)
        return torch.stack([r.to(device) for r in rows.values()]).sum(0)


def shares(sample: int | None, sizes: list[tuple[str, int]]) -> dict[str, int | None]:
    """``sample`` elements shared among tensors in proportion to their sizes (at least
    ``MIN_SAMPLE`` each; None: every element)."""
    total = max(1, sum(n for _, n in sizes))
    return {name: None if sample is None else max(MIN_SAMPLE, -(-sample * n // total))
            for name, n in sizes}


class ErrorProbe(Probe):
    """Measures ``spec`` (a layer plan's errors) for ``compressor`` on the tensors ``sizes``
    names, in that order (the compressed ones; every rank alike).

    Arguments:
        spec: what the plan asks for.
        compressor: whose compression errors are measured.
        sizes: ``(name, numel)`` of every tensor measured, in the order rows travel.
    """

    def measure(self, name: str, compensated: Tensor, decision: Decision, step: int) -> None:
        """Record tensor ``name``'s row: [‖x‖², ‖x − C(x, c)‖² per candidate], x = g + e
        (per candidate CF, or per candidate codec of a set)."""
        sample = self.samples[name]
        errors = self.compressor.errors(compensated, name, step, sample=sample,
                                        sent=decision.codec_for(name)) if self.spec.codecs \
            else self.compressor.error_profile(compensated, self.spec.cfs(decision.cf), name,
                                               step, sample=sample)
        norm = torch.linalg.vector_norm(compensated, dtype=torch.float32)
        self._rows[name] = torch.cat([norm.square().reshape(1), errors.float()])

    def take(self, device: torch.device) -> Tensor:
        """This step's rows as one vector (:attr:`ErrorSpec.width` floats per tensor; zeros
        for a tensor not measured); forgets them."""
        rows, self._rows = self._rows, {}
        zeros = torch.zeros(self.spec.width, device=device)
        return torch.cat([rows[n].to(device) if n in rows else zeros for n in self.names])


def probes(agent: Agent | None, compressor: Compressor, shapes: dict[str, torch.Size],
           uncompressed: frozenset[str]) -> tuple[GainProbe | None, ErrorProbe | None]:
    """The probes ``agent`` asks for (None where it asks for none): its gain over every
    tensor, a layer plan's errors over the compressed ones."""
    if agent is None:
        return None, None
    gain = GainProbe(agent.probe, compressor, [(n, s.numel()) for n, s in shapes.items()]) \
        if agent.probe is not None else None
    errors = ErrorProbe(agent.error_probe, compressor,
                        [(n, s.numel()) for n, s in shapes.items() if n not in uncompressed]) \
        if agent.error_probe is not None else None
    return gain, errors
