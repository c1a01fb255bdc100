"""The simulator's clocks for what the runtime measures: a copy engine on a clock (`ClockEngine`, the scheduler's
`SlotEngine`) and the cost of a missed expert copied or computed on the host (`HostMissCosts`, `runtime.misses`'
cost protocol) from hardware and host profiles."""

from __future__ import annotations

from .compute import ComputeModel, OpCounts, expert_device_seconds, pass_costs
from .hardware import HardwareProfile
from .host import HostProfile, expert_format
from .shapes import ModelShape


class ClockEngine:
    """The simulator's copy engine (`specmoe.runtime.scheduler.SlotEngine`): one FIFO copy queue on a clock.

    `h` is the host clock; a copy costs the host `issue_s` to issue and lands `copy_s` after the engine is free
    (with `sync`, the host waits for it: the runtime's synchronous engine). Compute waits are the compute model's
    (`_Replay.run` reads `ready_at`)."""

    def __init__(self, num_slots: int, copy_s: float, issue_s: float, sync: bool = False):
        self.copy_s, self.issue_s, self.sync = copy_s, issue_s, sync
        self.h = 0.0
        self.free = 0.0  # when the last copy issued lands
        self.ready_at = [0.0] * num_slots  # when the copy into each slot lands

    def ready(self, slot: int) -> bool:
        return self.ready_at[slot] <= self.h

    def copy_in(self, slot: int, key, demand: bool) -> None:
        self.h += self.issue_s
        self.free = (self.free if self.free > self.h else self.h) + self.copy_s
        self.ready_at[slot] = self.free
        if self.sync:
            self.h = self.free

    def wait(self, slots) -> None:
        pass

    def wait_host(self, slot: int) -> None:
        if self.ready_at[slot] > self.h:
            self.h = self.ready_at[slot]

    def release(self, slots) -> None:
        pass

    def backlog_s(self) -> float:
        """Copy time queued ahead of a copy issued now."""
        return max(0.0, self.free - self.h)


class HostMissCosts:
    """`runtime.misses` costs from profiles: one expert's copy, its host compute for a number of tokens (None
    host: fetching only), and `layer_s`, the seconds from one MoE layer call to the next (what prefetch
    admission compares a copy's landing with, `runtime.admission`; 0: no admission)."""

    def __init__(self, copy_s: float, host: HostProfile | None, shape: ModelShape, host_call_s: float = 0.0,
                 layer_s: float = 0.0, predict_s: float = 0.0, activations: str = "fp32"):
        self.copy_s, self.host, self.shape, self.host_call_s, self.layer_s = copy_s, host, shape, host_call_s, layer_s
        self.predict_s = predict_s  # the predictor's host time per call (what its copies must save)
        self.fmt = expert_format(shape.expert_dtype, shape.compression, activations)  # host_activations
        self._by_tokens: dict[int, float] = {}

    def host_seconds(self, tokens: int) -> float:
        t = self._by_tokens.get(tokens)
        if t is None:
            t = self._by_tokens[tokens] = self.host.expert_seconds(self.shape.transfer_bytes, self.shape.expert_params,
                                                                   tokens, self.fmt)
        return t


def replay_costs(shape: ModelShape, profile: HardwareProfile, compute: ComputeModel, ops: OpCounts,
                 host: HostProfile | None, context: int = 512, predictor_bookkeeping_s: float = 0.0,
                 host_activations: str = "fp32") -> HostMissCosts:
    """The miss costs the simulator's scheduler gets: one copy on `profile`'s link, the hidden state crossing
    both ways, the host's compute (if `host`), the layer period of one decode step without stalls (the
    host's launches or the device's layer + its top-k experts, whichever is longer), and the predictor's host
    time per call: its ops plus `predictor_bookkeeping_s`, the runtime's measured cost of a predicted call (what
    the replay charges for it, so admission weighs the predictor at that)."""
    copy_s = profile.copy_seconds(shape.transfer_bytes)  # compressed slots: the compressed bytes
    crossing = 2 * profile.copy_seconds(shape.hidden_size * shape.dtype_bytes)  # one token, both ways
    c = pass_costs(shape, profile, compute, ops, 1, context)
    k = shape.top_k
    layer_s = max(c.host_layer + c.host_wrapper + c.host_experts, c.dev_layer + expert_device_seconds(c, k, k))
    return HostMissCosts(copy_s, host, shape, crossing, layer_s, c.host_predictor + predictor_bookkeeping_s,
                         host_activations)
