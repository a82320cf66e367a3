"""One tensor's way onto the wire: error feedback (g + residual), compression at the CF the
decision sets for it — or dense, for the tensors the policy leaves uncompressed and at CF 1 —,
the agent's measurements on the error-fed tensor, and the residual, taken once the last
round's payload exists (:class:`Ticket`)."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .. import agents as A
from .. import compression as C
from ..probing import ErrorProbe, GainProbe


@dataclass
class Ticket:
    """One tensor of the step in flight: its compressor, this round's payload and, until the
    last round's payload exists, the error-fed tensor whose residual ``memory`` keeps."""

    name: str
    compressor: C.Compressor
    payload: C.Payload
    ctx: C.Ctx
    memory: C.Memory | None = None
    compensated: Tensor | None = None
    #: whether this rank's first payload was finite (0-dim bool; tensors with a residual)
    finite: Tensor | None = None
    round: int = 0
    result: Tensor | None = None

    def take_residual(self) -> None:
        """Error feedback once the last round's payload exists (before it is exchanged)."""
        if self.compensated is not None and self.round == self.ctx.rounds - 1:
            self.memory.update(self.name, self.compensated, self.compressor, self.payload,
                               self.ctx)
            self.compensated = None

    def advance(self, reduced: C.Payload, out: Tensor | None) -> None:
        """A round came back: the next round's payload, or the averaged gradient (into
        ``out`` where given)."""
        if self.round + 1 < self.ctx.rounds:
            self.payload = self.compressor.next_round(reduced, self.ctx)
            self.round += 1
            self.take_residual()
        else:
            self.result = self.compressor.aggregate([reduced], self.ctx, out=out)


class Encoder:
    """Error feedback and compression of each tensor, as the step's decision says.

    Arguments:
        compressor: every compressed tensor's compressor, or the set of candidates whose
            ``codec`` a decision names.
        memory: the error-feedback memory.
        uncompressed: names sent dense, without a residual.
        probe: the gain probe of an agent that asks for gains, or None.
        error_probe: a layer plan's error probe, or None.
    """

    def __init__(self, compressor: C.Compressor, memory: C.Memory, uncompressed: frozenset[str],
                 probe: GainProbe | None = None, error_probe: ErrorProbe | None = None) -> None:
        self.compressor, self.memory, self.uncompressed = compressor, memory, uncompressed
        self.probe, self.error_probe = probe, error_probe
        self.dense = C.NoCompression()

    def encode(self, name: str, grad: Tensor, decision: A.Decision | None,
               step: int) -> Ticket:
        """Tensor ``name``'s first payload at ``decision`` (None: the compressor's own CF)."""
        if name in self.uncompressed:
            return Ticket(name, self.dense, *self.dense.compress(grad, name))
        compensated = self.memory.compensate(grad, name)
        if self.probe is not None and decision.measure_gain:
            self.probe.measure(name, grad, compensated, decision, step)
        if self.error_probe is not None and decision.measure_errors:
            self.error_probe.measure(name, compensated, decision, step)
        cf = decision.sent_cf_for(name) if decision is not None else None
        codec = decision.codec_for(name) if decision is not None else None
        if cf == 1.0 or (codec is not None and self.compressor.is_dense(codec)):
            # dense, and the residual restarts at zero (GraVAC's third branch)
            self.memory.reset(name)
            return Ticket(name, self.dense, *self.dense.compress(compensated, name))
        compressor = self.compressor if codec is None else self.compressor.pick(codec)
        kwargs = {} if cf is None or codec is not None else {"cf": cf}
        payload, ctx = compressor.compress(compensated, name, step, **kwargs)
        ticket = Ticket(name, compressor, payload, ctx, self.memory, compensated)
        if self.memory.keeps_state:  # to find this rank's culprits if skipped
            ticket.finite = C.payload_is_finite(payload)
        ticket.take_residual()
        return ticket

    def clear(self) -> None:
        """A new step: the probes' partial sums restart."""
        for probe in (self.probe, self.error_probe):
            if probe is not None:
                probe.clear()
