"""How a fused-experts MoE layer's routed experts are computed on the slot pool: small strategies, one interface.

``compute(layer, args, kwargs, ids, weights, chosen) -> [T, H]`` runs the routed experts, all in `chosen` and
resident: every route of the call goes to one of them (a layer call split over chunks or the host gives each part
only its own routes, one per row, and sums them with `accumulate`, as the model sums its routes; a part never
reads a slot outside its chunk).

- `GatherCompute`: the model's own experts implementation on a compact [n, ...] copy of the routed slots
  (dequantized when the slots are compressed).
- `PoolCompute`: the model's own implementation on all S slots, with expert ids remapped to slot ids, no copy.
- `KernelCompute`: the fused Triton kernel (`FusedKernelCompute`) reading slots through the expert->slot table,
  for the layers and shapes it is chosen for; one of the two above elsewhere. ``compute="triton"``: every MoE
  layer the kernel supports, always (compressed slots too: the kernel dequantizes in registers; "auto" then takes
  the kernel wherever Triton runs). ``compute="auto"`` (CUDA): only for the shapes where the tuned launch configs
  of this GPU (`specmoe/kernels/configs/<device>.json`) record that the kernel measured faster than
  transformers' experts implementation; elsewhere the model's implementation, and a log line saying so, once
  per shape.
  gpt-oss's experts (transposed, gate/up interleaved, biases, clamped SwiGLU) go through the kernel as
  "swiglu_oai" when their slots hold a publisher's format (MXFP4 as published, or compression="fp8-b.." /
  "gptq-int4-g.." / "mxfp4"), whose parts are [out, in]; in their own [in, out] layout they stay on the model's
  implementation.

`choose_compute` picks once, in the wrapper's constructor (before the experts leave their modules: the kernel
plans read them); `build_compute` makes the strategy once the pool exists. Every strategy's `kernel_name(layer)`
says what computes a layer's device experts and how it reads the slots: "triton-fused-mxfp4" (the kernel,
dequantizing MXFP4 in registers), "torch-reference-fp8-b128" (its PyTorch fallback where Triton cannot run),
"gather-dequantized-gptq-int4-g128" (the model's implementation on a dequantized scratch), "pool", ...
"""

# Shape legend: T tokens, E experts, H hidden, k top-k, S slots, n experts computed

from __future__ import annotations

import logging

import torch

from ..kernels.prequant import PrequantStack
from ..kernels.reference import OAI
from .adapters import FusedExperts, MoELayer
from .host_compute import oai_gate

COMPUTE = ("auto", "gather", "pool", "triton")
logger = logging.getLogger(__name__)


def to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor without a blocking copy (pinned staging, non_blocking)."""
    t = torch.tensor(values, dtype=torch.long, pin_memory=device.type == "cuda")
    return t.to(device, non_blocking=True)


def accumulate(experts, values: torch.Tensor, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[T, H] in `dtype` (the model's) the layer's output from each route's weighted output values [T, k, H]
    (expert output x routing weight, in their promoted dtype, unrounded: as the model computes them; 0 for a
    route to no expert) and ids [T, k], summed as the model's own experts implementation sums them, so that a
    layer call split over chunks and the host gives the unwrapped model's bits:

    - "grouped_mm" / "batched_mm" (transformers' default): ``values.sum(dim=1)`` (float32 accumulation in route
      order), cast once: the very ops those implementations end with;
    - the family's eager loop (``_experts_implementation`` "eager" or unset): ``index_add_`` expert after
      expert, ascending, of values cast to the model dtype: each token's routes added one by one in ascending
      expert order.

    Any other registered implementation (GPU-only kernels) is summed as "grouped_mm" does.
    """
    implementation = getattr(getattr(experts, "config", None), "_experts_implementation", None)
    if implementation not in (None, "eager"):
        return values.sum(dim=1).to(dtype)
    order = ids.masked_fill(ids < 0, torch.iinfo(ids.dtype).max).argsort(dim=1)  # [T, k] ascending expert id
    ordered = values.gather(1, order.unsqueeze(-1).expand_as(values)).to(dtype)  # [T, k, H]
    out = torch.zeros_like(ordered[:, 0])
    for j in range(ordered.shape[1]):
        out += ordered[:, j]
    return out


def _compressed_fallback(compute: str, model_compute: str) -> str:
    """What runs the model's experts implementation on compressed slots: it cannot read them in place
    ("pool"), so the routed slots are dequantized into a scratch ("gather")."""
    if model_compute == "pool":
        if compute == "pool":
            logger.info("compute='pool' cannot run the model's experts on compressed slots; dequantizing the "
                        "routed slots into a scratch instead (compute='gather')")
        return "gather"
    if compute in ("gather", "auto"):
        logger.info("compressed slots without the fused kernel (compute=%r): routed slots are dequantized into "
                    "a scratch for the model's experts implementation", compute)
    return model_compute


def choose_compute(compute: str | None, device: torch.device, compressed: bool,
                   layers: list[MoELayer]) -> tuple[str, str, FusedKernelCompute | None]:
    """(compute, what runs the model's implementation: "gather" or "pool", the kernel or None), validated; plans
    the kernel for the fused-experts layers it supports (reads their modules: call before the experts move)."""
    compute = compute or "auto"
    if compute not in COMPUTE:
        raise ValueError(f"compute must be one of {COMPUTE}, got {compute!r}")
    model_compute = compute if compute in ("gather", "pool") else "pool" if device.type == "cuda" else "gather"
    if compressed:
        model_compute = _compressed_fallback(compute, model_compute)
    kernel = None
    if compute == "triton" or (compute == "auto" and device.type == "cuda"):
        kernel = FusedKernelCompute(compute, device, model_compute, compressed=compressed)
        for layer in layers:
            if isinstance(layer.layout, FusedExperts):
                kernel.plan(layer)
    return compute, model_compute, kernel


class FusedKernelCompute:
    """Per-layer plans and per-call choice for the fused experts kernel.

    Args:
        mode: "triton" or "auto".
        device: the cache's device.
        fallback: what runs instead ("pool" or "gather"), for log messages.
        compressed: the slots hold compressed experts; the kernel reads them as they are, and the fallback
            dequantizes the routed slots into a scratch, so "auto" takes the kernel wherever it runs.
    """

    def __init__(self, mode: str, device: torch.device, fallback: str, compressed: bool = False):
        from .. import kernels  # imports triton: only when the kernel may be used

        self.kernels = kernels
        self.mode = mode
        self.device = device
        self.compressed = compressed
        self.fallback = (f"{fallback} on the routed slots dequantized into a scratch" if compressed else fallback)
        self.activation: dict[int, str] = {}  # MoE layer -> activation, for layers the kernel supports
        self.act_params: dict[int, tuple[float, float]] = {}  # gpt-oss layers -> (alpha, limit)
        self._why: dict[int, tuple[str, str]] = {}  # gpt-oss layers -> (name, why its own layout is not read)
        self._logged: set[str] = set()
        self._wanted: dict[tuple[int, int, int], bool] = {}  # (layer, tokens, k) -> kernel measured faster
        self.runs_here = kernels.triton_runs_on(device)  # else moe_experts falls back to the torch reference
        if mode == "auto" and not self.runs_here:
            logger.info("compute='auto': Triton cannot run on %s here; using %s", device, fallback)

    def plan(self, layer: MoELayer) -> None:
        activation, reason = self.kernels.kernel_activation(layer.experts)
        params = oai_gate(layer.experts) if activation is None else None
        if params is not None:  # gpt-oss: from slots in a publisher's format only (`bind` checks the pool's)
            activation, self.act_params[layer.index] = OAI, params
            self._why[layer.index] = (layer.name, reason)
        if activation is None:
            logger.info("MoE layer %s: the fused kernel does not support it (%s); using the model's experts "
                        "implementation (%s)", layer.name, reason, self.fallback)
        else:
            self.activation[layer.index] = activation

    def bind(self, weights: dict) -> None:
        """Called once the pool exists with its weights (views or stacks): gpt-oss's layers keep the kernel only
        where the slots hold a publisher's format, whose parts are [out, in] (its own layout, plain or int8 /
        int4, is [in, out])."""
        if isinstance(weights.get("gate_up_proj"), PrequantStack):
            return
        for index in list(self.act_params):
            del self.activation[index], self.act_params[index]
            name, why = self._why[index]
            logger.info("MoE layer %s: the fused kernel does not support it (%s); it computes gpt-oss's experts "
                        "from slots in a publisher's format (MXFP4, FP8, GPTQ), not in their own [in, out] layout; "
                        "using the model's experts implementation (%s)", name, why, self.fallback)

    def reads(self, layer: MoELayer, views: dict) -> bool:
        """Whether the kernel computes this layer from the pool's weights `views`."""
        return layer.index in self.activation and bool(views)  # no views: a format the kernel does not read

    def wanted(self, layer: MoELayer, ids: torch.Tensor, views: dict[str, torch.Tensor]) -> bool:
        """Whether this call (routed ids [T, k]) runs the kernel."""
        if not self.reads(layer, views):
            return False
        if self.mode == "triton":
            return True
        if not self.runs_here:
            return False
        if self.compressed:  # fewer bytes read than any dequantize-then-compute path
            return True
        tokens, top_k = ids.shape
        known = self._wanted.get((layer.index, tokens, top_k))  # looked up once per layer and call size
        if known is not None:
            return known
        gate_up, down = views["gate_up_proj"], views["down_proj"]  # [S, 2I, H], [S, H, I]
        key = self.kernels.shape_key(gate_up.dtype, gate_up.shape[-1], down.shape[-1], top_k)
        faster = self._wanted[(layer.index, tokens, top_k)] = \
            bool(self.kernels.launch_configs(self.device).kernel_faster(key, tokens))
        if faster:
            return True
        if key not in self._logged:
            self._logged.add(key)
            logger.info("compute='auto': no measurement on %s says the fused kernel beats the model's experts "
                        "implementation for %s at %d tokens; using %s", self.device, key, tokens, self.fallback)
        return False

    def __call__(self, layer: MoELayer, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor,
                 views: dict[str, torch.Tensor], table: torch.Tensor) -> torch.Tensor:
        """[T, H] routed experts' output for hidden [T, H], ids/weights [T, k], the pool's weights (views, or
        QuantizedStacks or PrequantStacks when compressed; gpt-oss's biases), table [E]."""
        gate = {}
        if layer.index in self.act_params:  # gpt-oss: biases in the slots, clamped SwiGLU
            gate = dict(gate_up_bias=views["gate_up_proj_bias"], down_bias=views["down_proj_bias"],
                        act_params=self.act_params[layer.index])
        return self.kernels.moe_experts(hidden, ids, weights, views["gate_up_proj"], views["down_proj"], table,
                                        self.activation[layer.index], **gate)


class ModelCompute:
    """The model's own experts implementation, on expert ids remapped into the pool (base of gather and pool).

    Args:
        pool: the `cache.SlotPool`.
        table: [L, E] expert -> slot (-1: not resident), the cache's table.
        num_experts: E.
    """

    name = ""
    kernel: FusedKernelCompute | None = None

    def __init__(self, pool, table: torch.Tensor, num_experts: int):
        self.pool, self.table, self.num_experts = pool, table, num_experts

    @property
    def model_compute(self) -> str:
        return self.name

    def prepare(self, layer: MoELayer) -> None:
        """Called once per fused-experts layer at install."""

    def kernel_name(self, layer: MoELayer) -> str:
        """What computes this layer's device experts: the model's implementation on the pool, or on a scratch
        of the routed slots dequantized from the pool's format."""
        return f"{self.name}-dequantized-{self.pool.codec.fmt}" if self.pool.compressed else self.name

    reads_chosen = True  # remap reads the chosen experts' ids on the device

    def remap(self, layer: MoELayer, ids: torch.Tensor, chosen_t: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def compute(self, layer: MoELayer, args, kwargs, ids, weights, chosen: list[int]) -> torch.Tensor:
        experts, layout = layer.experts, layer.layout
        # [n] on the device: only where it is read (pool compute of a whole call remaps through the table alone)
        chosen_t = to_device(chosen, ids.device) if self.reads_chosen else None
        new_ids = self.remap(layer, ids, chosen_t)  # [T, k]
        a, kw = layout.replace_call(args, kwargs, experts, new_ids, weights)
        return type(experts).forward(experts, *a, **kw)


class GatherCompute(ModelCompute):
    """The routed slots copied into a compact [n, ...] buffer (one gather, dequantized if compressed)."""

    name = "gather"

    def remap(self, layer, ids, chosen_t):
        table = self.table[layer.index]  # [E] expert -> slot
        lut = torch.zeros(self.num_experts, dtype=torch.long, device=ids.device)  # [E] expert -> compact index
        lut[chosen_t] = torch.arange(len(chosen_t), device=ids.device)
        layer.layout.bind_pool(layer.experts, self.pool.gather(table[chosen_t]))  # [n, ...]
        return lut[ids]

    def compute(self, layer, args, kwargs, ids, weights, chosen):
        try:
            return super().compute(layer, args, kwargs, ids, weights, chosen)
        finally:  # drop the compact copy now, not at the layer's next call: memory holds one layer's gather
            layer.layout.bind_pool(layer.experts, self._nothing())

    def _nothing(self) -> dict[str, torch.Tensor]:
        """Views of zero experts in the experts' own layout (what the module holds between calls)."""
        if getattr(self, "_empty", None) is None:
            layout = self.pool.codec.slot_layout if self.pool.compressed else self.pool.layout
            self._empty = layout.views(torch.empty(0, layout.nbytes, dtype=torch.uint8, device=self.pool.data.device))
        return self._empty


class PoolCompute(ModelCompute):
    """All S slots bound to the experts module once; ids become slot ids."""

    name = "pool"

    def prepare(self, layer):
        layer.layout.bind_pool(layer.experts, self.pool.views)

    reads_chosen = False

    def remap(self, layer, ids, chosen_t):
        return self.table[layer.index][ids]  # [T, k] slot ids


class KernelCompute:
    """The fused kernel where `kernel.wanted` says so for this call, `fallback` elsewhere."""

    def __init__(self, kernel: FusedKernelCompute, fallback: ModelCompute, top_k: int):
        self.kernel, self.fallback, self.top_k = kernel, fallback, top_k
        self.pool, self.table, self.num_experts = fallback.pool, fallback.table, fallback.num_experts

    @property
    def model_compute(self) -> str:
        return self.fallback.name

    def prepare(self, layer: MoELayer) -> None:
        self.fallback.prepare(layer)

    def kernel_name(self, layer: MoELayer) -> str:
        """What computes this layer's device experts: "triton-fused-<format>" (the kernel reading the slots in
        their format: plain, int8, int4-g64, mxfp4, fp8-b128, gptq-int4-g128, awq-int4-g128), with "-swiglu_oai"
        for gpt-oss's gate and biases ("triton-fused-mxfp4-swiglu_oai"), its PyTorch reference
        "torch-reference-<format>" where Triton cannot run, or the fallback's name; compute="auto" on plain
        slots: "triton-fused-plain|<fallback>", the kernel where measured faster."""
        weights = self.pool.weights
        if not self.kernel.reads(layer, weights):
            return self.fallback.kernel_name(layer)
        fmt = self.kernel.kernels.weight_format(weights["gate_up_proj"])
        if self.kernel.mode == "auto" and not self.kernel.runs_here:
            return self.fallback.kernel_name(layer)
        name = f"{'triton-fused' if self.kernel.runs_here else 'torch-reference'}-{fmt}"
        if self.kernel.activation[layer.index] == OAI:
            name += f"-{OAI}"
        if self.kernel.mode == "auto" and not self.kernel.compressed:
            return f"{name}|{self.fallback.kernel_name(layer)}"
        return name

    def compute(self, layer: MoELayer, args, kwargs, ids, weights, chosen: list[int]) -> torch.Tensor:
        if not self.kernel.wanted(layer, ids, self.pool.weights):
            return self.fallback.compute(layer, args, kwargs, ids, weights, chosen)
        hidden = layer.layout.routing(layer.experts, args, kwargs, self.top_k)[0]  # [T, H]
        return self.kernel(layer, hidden, ids, weights, self.pool.weights, self.table[layer.index])


def build_compute(model_compute: str, kernel: FusedKernelCompute | None, pool, table: torch.Tensor,
                  num_experts: int, top_k: int) -> ModelCompute | KernelCompute:
    strategy = (GatherCompute if model_compute == "gather" else PoolCompute)(pool, table, num_experts)
    if kernel is None:
        return strategy
    kernel.bind(pool.weights)
    return KernelCompute(kernel, strategy, top_k)
