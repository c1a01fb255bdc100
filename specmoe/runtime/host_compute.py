"""Experts computed where they live: routed experts that are not resident run on the host, from the store.

At batch-1 decode a missed expert costs its bytes over PCIe when it is copied, but only its bytes over the
host's memory bus when the host computes it (Fiddler, kTransformers, llama.cpp's ``--n-cpu-moe``). With
``misses="host"`` (or ``"auto"`` deciding so) the wrapper hands those experts to `HostExperts`: the layer's
hidden states cross to the host once, a worker thread computes the host experts from the store's buffers
while the device computes the resident ones, and the partial outputs are summed on the device.

Where the layer's experts are the common fused layout (gate/up concatenated, SiLU/GELU, no biases: what
`kernels.kernel_activation` accepts; or gpt-oss's, with its clamped gate and biases, held in a publisher's format)
and the store holds fp32/bf16/fp16, int8, int4 or a publisher's MXFP4 / FP8 / GPTQ int4 experts, the host runs the
compiled host kernel (`specmoe.kernels.host`): every chosen expert of the layer in one call, straight from
the store's bytes (compressed bytes read once, nothing dequantized into memory), on `threads` cores. Elsewhere
(gpt-oss's experts stored unquantized ([in, out]) or int8/int4, ModuleList experts, no compiler) it runs the family's own (eager) experts
code on views of the store, a compressed store decoded expert by expert with torch ops first. Which ran is
`HostExperts.kernel_name(layer)`; `benchmarks/host_kernels.py` and `benchmarks/host_compute.py` measure both.
"""

# Shape legend: T tokens, E experts, H hidden, k top-k, n experts computed here, B bytes per expert

from __future__ import annotations

import copy
import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from ..kernels.host import (INT8_FORMATS, HostExpertsKernel, available, check_threads, kernel_format,
                            kernel_group, matrix, prequant_matrix)
from ..measure import time_fn
from .adapters import FusedExperts, MoELayer
from .compression import PrequantCodec
from .misses import MissCosts, hottest
from .store import HostStore

logger = logging.getLogger(__name__)


def model_forward(experts: nn.Module):
    """The experts implementation the model runs (`use_experts_implementation` dispatches on the config's
    ``_experts_implementation``; the family's eager loop where it is "eager"): the host's routes then have the
    model's own bits where the host's kernels are the model's (a model on the CPU). Each touches only the
    experts that tokens were routed to."""
    return type(experts).forward


def oai_gate(experts: nn.Module) -> tuple[float, float] | None:
    """(alpha, limit) of gpt-oss's clamped SwiGLU when `experts` is transformers' `GptOssExperts` (gate/up
    interleaved, biases), which the host kernel computes as "swiglu_oai"; else None."""
    try:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    except ImportError:
        return None
    gate = getattr(GptOssExperts, "_apply_gate", None)  # the gate the kernel's "swiglu_oai" reproduces
    if gate is None or not isinstance(experts, GptOssExperts) or getattr(type(experts), "_apply_gate", None) is not gate:
        return None
    return float(experts.alpha), float(experts.limit)


def only(ids: torch.Tensor, weights: torch.Tensor, chosen: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing restricted to `chosen` experts: other routes get weight 0 and point at chosen[0], so no other
    expert is read. ids [T, k] long, weights [T, k] -> the same shapes."""
    member = torch.zeros(int(max(ids.max().item(), max(chosen))) + 1, dtype=torch.bool, device=ids.device)
    member[torch.tensor(chosen, device=ids.device)] = True
    keep = member[ids.clamp_min(0)] & (ids >= 0)  # [T, k]
    new_ids = torch.where(keep, ids, torch.full_like(ids, chosen[0]))
    return new_ids, weights * keep


class HostExperts:
    """Compute routed experts on the host from a `HostStore`, on one worker thread.

    Args:
        store: the host store (uncompressed slot layout, or a codec's compressed layout).
        codec: the store's `ExpertCodec` when compressed, else None.
        threads: cores the host kernel uses per call (None: `kernels.host.default_threads()`, physical cores
            less one, at most 8).
        activations: "fp32" (exact) or "int8" (`OffloadConfig.host_activations`: the kernel's int8 activations
            where the experts' format has them, `kernels.host.INT8_FORMATS`; float32 elsewhere).

    The worker is one thread: host experts of one layer are computed in order, one layer at a time, which is
    how the wrapper uses it (submit, compute the resident experts on the device, then `result`).
    """

    def __init__(self, store, codec=None, threads: int | None = None, activations: str = "fp32"):
        self.store = store
        self.activations = activations
        self.codec = codec
        self.threads = check_threads(threads)
        self.kernel = HostExpertsKernel(self.threads) if available() else None
        self._plans: dict[int, tuple | None] = {}  # layer -> (format, activation, group, I, params, activations)
        # or None: torch
        self._mats: dict[tuple[int, int], tuple] = {}  # (layer, e) -> (gate_up Mat, down Mat) of a RAM store
        self._clones: dict[int, nn.Module] = {}
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="specmoe-host")
        self.busy_s = 0.0  # seconds the worker spent computing (its own clock)
        self.calls = 0

    # ---- what the worker runs -------------------------------------------------------------------------------
    def __deepcopy__(self, memo):
        raise TypeError("a SpeculativeMoE with misses='host' or 'auto' cannot be deep-copied (its host worker "
                        "cannot); deep-copy the model before wrapping, or after unwrap(), and wrap the copy")

    def _module(self, layer: MoELayer) -> nn.Module:
        """A shallow clone of the layer's experts module whose tensors the host binds (the original keeps the
        device's). Made once per layer."""
        with self._lock:
            clone = self._clones.get(layer.index)
            if clone is None:
                clone = copy.copy(layer.experts)
                clone.__dict__ = dict(layer.experts.__dict__)
                clone.__dict__.pop("forward", None)  # the wrapper's patched forward stays on the original
                self._clones[layer.index] = clone
            return clone

    def plan(self, layer: MoELayer) -> tuple | None:
        """(format, activation, group, I, act params, activations) when the host kernel computes this layer, else
        None (torch path)."""
        if layer.index in self._plans:
            return self._plans[layer.index]
        plan, why = None, "the host kernel is not available here"
        if self.kernel is not None:
            from ..kernels import kernel_activation

            probe = copy.copy(layer.experts)  # its expert tensors live in the store now: stand-ins of their rank
            probe.__dict__ = dict(layer.experts.__dict__)
            probe.__dict__.update(gate_up_proj=torch.empty(1, 1, 1, device="meta"),
                                  down_proj=torch.empty(1, 1, 1, device="meta"))
            activation, why = kernel_activation(probe)
            params, tensors = None, {"gate_up_proj", "down_proj"}
            published = isinstance(self.codec, PrequantCodec)  # a publisher's parts: [out, in]
            if activation is None and oai_gate(layer.experts) is not None:
                params, tensors = oai_gate(layer.experts), tensors | {"gate_up_proj_bias", "down_proj_bias"}
                activation, why = ("swiglu_oai", "") if published else \
                    (None, "gpt-oss experts stored as [in, out] (the kernel reads them in a publisher's format)")
            specs = {s.name: s for s in (self.codec.slot_layout if self.codec else self.store.layout).specs}
            gate_up, down = specs.get("gate_up_proj"), specs.get("down_proj")
            fmt = self.codec.fmt if self.codec is not None else None
            kind = kernel_format(gate_up.dtype, fmt) if gate_up is not None else None
            if activation is not None and kind is None:
                why = f"experts stored as {gate_up.dtype if fmt is None else fmt}"
            elif activation is not None and set(specs) != tensors:
                why = f"expert tensors {sorted(specs)}"
            elif activation is not None:
                inter = self.codec._nk(down)[1] if published else down.shape[1]
                acts = self.activations if kind in INT8_FORMATS else "fp32"
                if acts != self.activations:
                    logger.info("MoE layer %s: host_activations=%r asked, but the %s kernel has float32 activations "
                                "only (int8: %s)", layer.name, self.activations, kind, ", ".join(INT8_FORMATS))
                plan = (kind, activation, kernel_group(fmt), inter, params, acts)
        self._plans[layer.index] = plan
        logger.info("MoE layer %s: host experts run %s", layer.name,
                    f"{self.kernel.name} ({plan[0]}, {plan[5]} activations, {self.threads} threads)" if plan else
                    f"the model's torch code ({why})")
        return plan

    def kernel_name(self, layer: MoELayer) -> str:
        """Which implementation computes this layer's host experts ("-int8act" where the activations are int8)."""
        plan = self.plan(layer)
        return f"{self.kernel.name}-{plan[0]}" + ("-int8act" if plan[5] == "int8" else "") if plan else "torch-eager"

    def _matrices(self, layer: int, e: int, keep: list) -> tuple:
        """(gate_up Mat, down Mat) of expert e read in place from the store (cached for a RAM store, whose
        buffers never move); tensors a file store read for this call go into `keep`."""
        mats = self._mats.get((layer, e))
        if mats is not None:
            return mats
        row = self.store[(layer, e)]  # [B] uint8: a view of RAM, or this call's read of a file
        keep.append(row)
        if isinstance(self.codec, PrequantCodec):  # a publisher's parts, [out, in]
            packed = self.codec.layout.unpack(row)
            specs = {s.name: s for s in self.codec.slot_layout.specs}
            mats = tuple(prequant_matrix({sfx: packed[n + sfx] for sfx in self.codec.fmt.suffixes},
                                         self.codec._nk(specs[n]), self.codec.fmt, packed.get(n + "_bias"))
                         for n in ("gate_up_proj", "down_proj"))
        elif self.codec is None:
            parts = self.store.layout.unpack(row)
            specs = {s.name: s for s in self.store.layout.specs}
            mats = tuple(matrix(parts[n], specs[n].shape) for n in ("gate_up_proj", "down_proj"))
        else:
            packed = self.codec.layout.unpack(row)
            specs = {s.name: s for s in self.codec.slot_layout.specs}
            mats = tuple(matrix(self.codec._parts(packed, n), specs[n].shape, self.codec.fmt)
                         for n in ("gate_up_proj", "down_proj"))
        if isinstance(self.store, HostStore):
            self._mats[(layer, e)] = mats
        return mats

    def tensors(self, layer: int, chosen: list[int]) -> tuple[dict[str, torch.Tensor], list[int] | None]:
        """The host tensors of `chosen` experts of `layer`: (name -> [E or n, *shape], lut) where lut maps
        expert ids to rows (None: rows are expert ids, views of the store without a copy)."""
        if self.codec is None:
            return self.store.layer_tensors(layer), None
        decoded = [self.codec.decode_tensors(self.store[(layer, e)]) for e in chosen]  # n x name -> [*shape]
        return {name: torch.stack([d[name] for d in decoded]) for name in decoded[0]}, chosen

    def compute(self, layer: MoELayer, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                chosen: list[int]) -> torch.Tensor:
        """The routed experts in `chosen` for hidden [T, H], ids/weights [T, k] (host tensors): [T, H] float32.

        Raises:
            TypeError: a layer whose experts are not the fused layout (modulelist experts run per expert,
                see the wrapper's hooks).
        """
        if not isinstance(layer.layout, FusedExperts):
            raise TypeError(f"host compute of a whole layer needs fused experts; {layer.name} is {layer.layout.name}")
        start = time.perf_counter()
        try:
            plan = self.plan(layer)
            if plan is not None:
                fmt, activation, group, inter, params, acts = plan
                keep: list = []
                mats = [self._matrices(layer.index, e, keep) for e in chosen]
                return self.kernel(fmt, activation, hidden, ids, weights, chosen, mats, inter, group,
                                   act_params=params, activations=acts)
            views, lut = self.tensors(layer.index, chosen)
            ids, weights = only(ids, weights, chosen)
            if lut is not None:  # compact rows: expert id -> row
                table = torch.zeros(int(ids.max().item()) + 1, dtype=torch.long)
                table[torch.tensor(lut)] = torch.arange(len(lut))
                ids = table[ids]
            module = self._module(layer)
            layer.layout.bind_pool(module, views)
            with torch.no_grad():
                out = model_forward(module)(module, hidden, ids, weights)  # [T, H]
            return out.float()
        finally:
            self.busy_s += time.perf_counter() - start
            self.calls += 1

    # ---- what the wrapper calls -----------------------------------------------------------------------------
    def submit(self, layer: MoELayer, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
               chosen: list[int]) -> Future:
        """Start computing `chosen` experts on the worker. hidden [T, H], ids/weights [T, k] on any device:
        they cross to the host here (once). Returns a future of the [T, H] float32 host output."""
        host = torch.device("cpu")
        hidden, ids, weights = (t.to(host) for t in (hidden, ids, weights))
        return self._pool.submit(self.compute, layer, hidden, ids, weights, list(chosen))

    def bind_expert(self, layer: MoELayer, module: nn.Module, e: int) -> None:
        """Bind expert `e`'s host tensors to its module (ModuleList layouts: it runs on the host, in the family's
        own loop)."""
        tensors, rows = self.tensors(layer.index, [e])  # name -> [E, *shape], or [1, *shape]
        layer.layout.bind_expert(module, tensors, e if rows is None else 0)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._clones.clear()


def place_hottest(frequencies, num_layers: int, num_slots: int, cache, engine, pool, store) -> None:
    """Load the hottest experts of routing frequencies [L][E] into the slots (a static placement, as llama.cpp's:
    with misses="host" and no predictor nothing is ever copied again)."""
    freq = torch.as_tensor(frequencies)
    if tuple(freq.shape) != (num_layers, cache.num_experts):
        raise ValueError(f"placement must be routing frequencies [L, E] = "
                         f"{[num_layers, cache.num_experts]}, got {list(freq.shape)}")
    for key in hottest(freq.tolist(), num_slots):
        slot, _ = cache.assign(key, lambda s: True)
        engine.copy_in(slot, pool.data[slot], store[key], demand=True)
    engine.synchronize()


def measure_miss_costs(host: HostExperts, layer: MoELayer, engine, pool, store, hidden_size: int, top_k: int,
                       device, repeats: int = 3) -> MissCosts:
    """Time one expert copy into a slot and one expert of `layer` computed on the host (1 and k tokens), here."""
    def best(fn) -> float:  # seconds, the fastest of `repeats` after a warm-up (host clock: fn synchronizes)
        return time_fn(fn, "cpu", warmup=1, repeats=repeats, flush_l2=False)["min_us"] / 1e6

    def copy():
        engine.copy_in(0, pool.data[0], store[(layer.index, 0)], demand=True)
        engine.synchronize()

    dtype = next(s.dtype for s in pool.layout.specs if s.dtype.is_floating_point)
    k = max(2, top_k)

    def on_host(tokens):
        hidden = torch.randn(tokens, hidden_size).to(dtype)
        if isinstance(layer.layout, FusedExperts):
            ids, w = torch.zeros(tokens, 1, dtype=torch.long), torch.ones(tokens, 1)
            return lambda: host.compute(layer, hidden, ids, w, [0])
        expert = layer.layout.experts_list(layer.experts)[0]
        tensors, rows = host.tensors(layer.index, [0])

        def run():
            layer.layout.bind_expert(expert, tensors, 0)
            with torch.no_grad():
                type(expert).forward(expert, hidden)
        return run

    copy_s = best(copy)
    one, many = best(on_host(1)), best(on_host(k))
    costs = MissCosts(copy_s, one, max(0.0, many - one) / (k - 1),
                      source=f"measured at start-up on {device}: one expert copied, one computed on the host")
    logger.info("misses='auto': %s", costs)
    return costs
