"""SpeculativeMoE: run a transformers MoE model with its experts in host memory and a device-side cache.

The wrapper is where mechanism (store, cache, copy engine) meets policy (the predictor). Per MoE layer l,
inside the experts call (the router has just chosen the top-k):

1. one device->host sync reads the routed experts and the predictor's best guesses for layers l+1..l+d;
2. routed experts that are not resident are fetched on demand (ahead of any queued prefetch); compute
   waits on their copies' events, not the host;
3. predicted experts that are not resident are prefetched, best first, with a bound on copies in flight;
4. the experts run on the slot pool: the model's own implementation with expert ids remapped to slot ids,
   or the fused Triton kernel (`specmoe.kernels`) reading slots through the expert->slot table.

Prefetches never change results: a wrong guess costs bandwidth, not correctness.
"""

# Shape legend: T tokens, E experts, H hidden, k top-k, L MoE layers, S slots, B bytes per expert

from __future__ import annotations

import logging
import time
import warnings
from collections import Counter
from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..predictors.base import Predictor, rank_by_votes, top_candidates
from .adapters import FusedExperts, ModelMoE, MoELayer, find_moe_layers
from .cache import ExpertCache, SlotPool
from .capacity import resolve_capacity
from .compression import make_codec
from .fused_compute import FusedKernelCompute
from .host_compute import HostExperts
from .misses import MissCosts, check_misses, hottest
from .stats import LayerStats, Stats
from .store import ExpertLayout, HostStore
from .scheduler import Scheduler
from .transfer import StoreToPool, make_engine

COMPUTE = ("auto", "gather", "pool", "triton")
logger = logging.getLogger(__name__)
_MISSING = object()  # an attribute that was not set on the instance


def _check_materialised(model: nn.Module, moe: ModelMoE, streamed: bool) -> None:
    """Refuse a model whose weights are on the meta device (accelerate's disk or CPU offload), before any change."""
    expert_ids = {id(p) for layer in moe.layers for p in layer.experts.parameters()} if streamed else set()
    meta = [n for n, p in model.named_parameters() if p.device.type == "meta" and id(p) not in expert_ids]
    if meta:
        raise ValueError(
            f"{len(meta)} weights of this model are on the meta device (e.g. {meta[0]}): it was loaded with "
            "accelerate offloading (device_map with 'disk' or 'cpu' entries), whose hooks load weights at each call. "
            "SpeculativeMoE offloads the experts itself: load the model without offloading, or let "
            "specmoe.load_offloaded(path) stream it from its safetensors files (it never holds the whole model in "
            "memory)")


def _model_devices(model: nn.Module) -> set[torch.device]:
    return {t.device for t in list(model.parameters()) + list(model.buffers())}


def resolve_device(model: nn.Module, device) -> torch.device:
    if device is not None:
        return torch.device(device)
    devices = {d for d in _model_devices(model) if d.type != "meta"}
    accel = [d for d in devices if d.type != "cpu"]
    if len(accel) > 1:
        raise ValueError(f"the model is spread over {sorted(map(str, accel))}; load it on one device "
                         "(or with specmoe.load_offloaded) before wrapping")
    if accel:
        return accel[0]
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def _check_predictor(predictor) -> None:
    if predictor is not None and not all(callable(getattr(predictor, m, None)) for m in ("predict", "bind", "reset")):
        raise TypeError(f"predictor must implement the specmoe Predictor protocol (bind/reset/predict), "
                        f"got {type(predictor).__name__}")


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


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """A small host list as a device tensor without a blocking copy (pinned staging, non_blocking)."""
    t = torch.tensor(values, dtype=torch.long, pin_memory=device.type == "cuda")
    return t.to(device, non_blocking=True)


class SpeculativeMoE:
    """Wrap a transformers MoE model: experts to host memory, a device cache of expert slots, and a
    predictor that prefetches the experts of upcoming layers.

    Args:
        model: a transformers MoE model (any family listed in `specmoe.runtime.adapters.SUPPORTED`).
        predictor: a `specmoe.predictors.Predictor`; None fetches experts on demand only (plain LRU).
        cache_capacity: a float in (0, 1] (fraction of all experts kept on the device), an int (slots in
            total), or a memory budget string such as "8GiB".
        device: where compute and the cache live. Default: the model's accelerator if it is on one, else
            CUDA when present, else CPU. Non-expert weights are moved there.
        policy: eviction policy, "lru" (default), "lfu", or an object with touch/forget/victim.
        transfer: copy engine, "cuda" (default on CUDA), "sync" (default on CPU) or "thread" (CPU worker).
        prefetch_width: experts prefetched per token per target layer (default: top-k).
        max_prefetch_inflight: bound on prefetch copies in flight (default: 2 * top-k * lookahead).
        compute: how experts are computed on the cache. "gather" copies the layer's routed slots into a
            compact [n, ...] buffer for the model's experts implementation (cost grows with n); "pool" runs
            the model's implementation on all S slots with no copy (cost of some implementations, e.g.
            grouped_mm on CPU, grows with S); "triton" runs the fused Triton kernel on the slots (CUDA; on
            CPU interpreted under TRITON_INTERPRET=1, else its PyTorch reference) for layers it supports
            (SiLU/GELU experts with concatenated gate/up, no bias), the model's implementation elsewhere;
            "auto" (default) is "pool" on CUDA, switching to the kernel for the shapes where the tuned
            launch configs (`specmoe/kernels/configs`) measured it faster, and "gather" elsewhere.
        compression: None (default) or "int8" / "int4" / "int4-g128": experts stay compressed
            (`specmoe.kernels.quant`) in the host store, over PCIe and in the cache slots, so a capacity
            budget holds 2-4x more experts; the fused kernel dequantizes in registers, and elsewhere the
            routed slots are dequantized into a scratch for the model's implementation. Changes numerics
            (`unwrap()` returns the dequantized experts, with a warning).
        expert_source: where the experts' bytes come from when the model's experts modules do not hold them
            (`specmoe.load_offloaded` builds the model with its experts on the meta device and passes a
            `runtime.loading.CheckpointExperts`); an object with ``build_store(moe, layout, codec)``.
        misses: where routed experts that are not resident run. "fetch" (default): copied into a slot.
            "host": computed on the host from the host store by a worker thread while the device computes
            the resident ones (`runtime.host_compute`). "auto": per miss, whichever a cost model says
            finishes first (`runtime.misses.split_misses`). Prefetches always go to the device.
        miss_costs: the `MissCosts` for "auto"; default: measured at start-up on this model's experts
            (a fraction of a second; `self.miss_costs` holds them to pass next time).
        placement: routing frequencies [L][E] (e.g. counted from a trace): the hottest experts are loaded
            into the slots at start-up, a static placement like llama.cpp's. With misses="host" and no
            predictor nothing is ever copied again.

    Raises:
        TypeError: not an MoE model of a supported layout, or a predictor/capacity of the wrong type.
        ValueError: a capacity or budget that cannot work, a predictor built for another geometry, a model
            wrapped twice, or a cache that does not fit on the device. The model is untouched in each case.
    """

    def __init__(
        self,
        model: nn.Module,
        predictor: Predictor | None = None,
        cache_capacity: float | int | str = 0.5,
        *,
        device=None,
        policy="hit-density",
        transfer: str | None = None,
        prefetch_width: int | None = None,
        max_prefetch_inflight: int | None = None,
        compute: str | None = None,
        compression: str | None = None,
        expert_source=None,
        misses: str = "fetch",
        miss_costs: MissCosts | None = None,
        placement=None,
    ):
        # ---- validate everything before touching the model ------------------------------------
        if getattr(model, "_specmoe_wrapper", None) is not None:
            raise ValueError("this model is already wrapped by SpeculativeMoE; call .unwrap() on that wrapper first")
        moe: ModelMoE = find_moe_layers(model)
        _check_materialised(model, moe, streamed=expert_source is not None)
        geo = moe.geometry
        _check_predictor(predictor)
        layout = ExpertLayout(moe.specs)
        self.codec = make_codec(compression, layout)  # compressed experts: store, copies and slots
        store_layout = self.codec.layout if self.codec else layout
        num_slots = resolve_capacity(cache_capacity, geo.num_layers, geo.num_experts, store_layout.nbytes)
        self.device = resolve_device(model, device)
        if predictor is not None:
            predictor.bind(geo, [layer.router for layer in moe.layers])
        scratch = geo.top_k * layout.nbytes if self.codec else 0  # dequantized routed experts (fallback path)
        self._check_device_memory(model, moe, num_slots * store_layout.nbytes + scratch)
        for name, value in (("prefetch_width", prefetch_width), ("max_prefetch_inflight", max_prefetch_inflight)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be an int >= 1 (or None for the default), got {value!r}")
        self.prefetch_width = prefetch_width if prefetch_width is not None else geo.top_k
        self._inflight_bound = max_prefetch_inflight  # None: follows the predictor's lookahead
        self.max_prefetch_inflight = self._default_inflight(predictor, geo)
        self.misses = check_misses(misses)
        self.compute = compute or "auto"
        if self.compute not in COMPUTE:
            raise ValueError(f"compute must be one of {COMPUTE}, got {compute!r}")
        # what runs where the fused kernel is not used: the model's implementation on the pool or a gather
        self._model_compute = (self.compute if self.compute in ("gather", "pool")
                               else "pool" if self.device.type == "cuda" else "gather")
        if self.codec is not None:
            self._model_compute = _compressed_fallback(self.compute, self._model_compute)
        use_kernel = self.compute == "triton" or (self.compute == "auto" and self.device.type == "cuda")
        self._fused = (FusedKernelCompute(self.compute, self.device, self._model_compute,
                                          compressed=self.codec is not None) if use_kernel else None)
        for layer in moe.layers if self._fused is not None else ():
            if isinstance(layer.layout, FusedExperts):
                self._fused.plan(layer)  # reads the experts module: before its tensors leave it

        self.model = model
        self.predictor = predictor
        self.moe = moe
        self.geometry = geo
        self.num_slots = num_slots
        self._orig_devices = _model_devices(model)
        self._orig_expert_device = [next(iter(layer.layout.expert_tensors(layer.experts, 0).values())).device
                                    for layer in moe.layers]
        # experts never materialised (streamed from a checkpoint) come back to host memory on unwrap()
        self._orig_expert_device = [torch.device("cpu") if d.type == "meta" else d for d in self._orig_expert_device]
        self._saved: list[dict] = []
        self._handles: list = []
        self._patches: list[tuple[nn.Module, str, object]] = []  # (module, attribute, what was there)

        # ---- move experts to the host store, the rest to the device -------------------------------
        try:
            if expert_source is not None:
                self.store = expert_source.build_store(moe, layout, self.codec)
                self._saved = [layer.layout.remove(layer.experts) for layer in moe.layers]  # meta tensors
            else:
                self.store = HostStore(self.codec.layout if self.codec else layout, geo.num_layers, geo.num_experts)
            big = self.store.nbytes > 2**30  # a progress bar only where it takes a while
            for layer in tqdm(moe.layers if expert_source is None else (), desc="experts -> host store",
                              unit="layer", disable=not big, leave=False):
                for e in range(geo.num_experts):
                    tensors = layer.layout.expert_tensors(layer.experts, e)
                    self.store.write((layer.index, e), self.codec.encode(tensors) if self.codec else tensors)
                self._saved.append(layer.layout.remove(layer.experts))  # frees the module's expert tensors
            model.to(self.device)
            if self.device.type == "cuda":
                self.store.pin()
            self.pool = SlotPool(self.store.layout, num_slots, self.device, self.codec)  # compressed if so
            self.cache = ExpertCache(num_slots, geo.num_layers, geo.num_experts, self.device, policy)
            self.engine = make_engine(transfer, num_slots, self.device)
            self.scheduler = Scheduler(self.cache, StoreToPool(self.engine, self.store, self.pool.data), geo.num_layers,
                                       self.max_prefetch_inflight, self.store.layout.nbytes)  # compressed bytes
            for layer in moe.layers:
                self._install(layer)
            self._host = HostExperts(self.store, self.codec) if self.misses != "fetch" else None
            self.miss_costs = miss_costs
            if self.misses == "auto" and miss_costs is None:
                self.miss_costs = self._measure_miss_costs()
            self.scheduler.misses, self.scheduler.miss_costs = self.misses, self.miss_costs
            if placement is not None:
                self._place(placement)
        except BaseException:
            self._restore_model()
            raise
        model._specmoe_wrapper = self
        self._reset_state()
        self.reset_stats()

    # ---- public API -----------------------------------------------------------------------------
    def _check_wrapped(self, what: str) -> None:
        if self.__dict__.get("pool") is None:
            raise RuntimeError(f"{what} on a SpeculativeMoE after unwrap(): the model is no longer offloaded; use "
                               "the model unwrap() returned, or wrap it again")

    def __call__(self, *args, **kwargs):
        self._check_wrapped("call")
        return self.model(*self._to_device(args), **self._to_device(kwargs))

    def generate(self, *args, **kwargs):
        """`model.generate` with the runtime in the loop; the predictor starts afresh."""
        self._check_wrapped("generate")
        self._reset_state()
        return self.model.generate(*self._to_device(args), **self._to_device(kwargs))

    def set_predictor(self, predictor: Predictor | None) -> None:
        """Swap the predictor (None: on demand only) without rewrapping; the cache stays warm.

        Raises:
            TypeError / ValueError: as the constructor, for a non-predictor or another geometry.
            RuntimeError: after `unwrap()`.
        """
        self._check_wrapped("set_predictor")
        if predictor is not None:
            _check_predictor(predictor)
            predictor.bind(self.geometry, [layer.router for layer in self.moe.layers])
        self.predictor = predictor
        self.max_prefetch_inflight = self._default_inflight(predictor, self.geometry)
        self._reset_state()

    def _default_inflight(self, predictor, geo) -> int:
        lookahead = getattr(predictor, "lookahead", 1) if predictor is not None else 1
        return self._inflight_bound if self._inflight_bound is not None else 2 * geo.top_k * lookahead

    @property
    def stats(self) -> Stats:
        return Stats(
            per_layer=[LayerStats(**vars(x)) for x in self.scheduler.stats],
            stall_s=self.engine.stall_seconds(),
            stall_waits=self.engine.waits,
            host_syncs=self._host_syncs,
            layer_calls=self.scheduler.layer_calls,
            chunked_calls=self.scheduler.chunked_calls,
        )

    def reset_stats(self) -> None:
        self.scheduler.reset_stats()
        self._host_syncs = 0
        self.engine.reset_stall()

    def memory(self) -> dict[str, int]:
        """Bytes: non-expert weights on the device, the cache pool, and the host store. With compression a
        slot holds an expert's compressed bytes (`slot_bytes` = `host_expert_bytes` < `expert_bytes`)."""
        nonexpert = sum(t.numel() * t.element_size() for t in list(self.model.parameters()) + list(self.model.buffers())
                        if t.device == self.device)
        expert_layout = self.codec.slot_layout if self.codec else self.store.layout
        return {"nonexpert_bytes": nonexpert, "cache_bytes": self.pool.nbytes, "host_store_bytes": self.store.nbytes,
                "slot_bytes": self.pool.layout.nbytes, "host_expert_bytes": self.store.layout.nbytes,
                "expert_bytes": expert_layout.nbytes, "num_slots": self.num_slots}

    def unwrap(self) -> nn.Module:
        """Undo the wrapping: experts back in the model where they were, forwards restored. Returns the model.

        With compression the original experts were not kept: the model gets its experts back dequantized
        (what the wrapped model computed with), and a warning says so.
        """
        if self.pool is None:
            return self.model
        if self.codec is not None:
            warnings.warn(f"unwrap() after compression={str(self.codec.fmt)!r}: the model gets back its experts "
                          "dequantized, not the original weights (they were not kept)", UserWarning, stacklevel=2)
        self.engine.synchronize()
        self._restore_model()
        self.engine.close()
        if self._host is not None:
            self._host.close()
        self.pool = self.cache = None
        return self.model

    def __getattr__(self, name):
        model = self.__dict__.get("model")
        if model is None:
            raise AttributeError(name)
        return getattr(model, name)

    def __repr__(self) -> str:
        return (f"SpeculativeMoE({type(self.model).__name__}, {self.geometry}, slots={self.num_slots}, "
                f"predictor={self.predictor!r}, device={self.device})")

    # ---- install / restore --------------------------------------------------------------------------
    def _install(self, layer: MoELayer) -> None:
        experts = layer.experts
        if isinstance(layer.layout, FusedExperts):
            if self._model_compute == "pool":
                layer.layout.bind_pool(experts, self.pool.views)
            self._patch_forward(experts, lambda *a, _l=layer, **kw: self._fused_forward(_l, a, kw))
        else:
            self._patch_forward(experts, lambda *a, _l=layer, **kw: self._modulelist_forward(_l, a, kw))
            for e, expert in enumerate(layer.layout.experts_list(experts)):
                self._handles.append(expert.register_forward_pre_hook(self._expert_pre_hook(layer, e)))
                self._handles.append(expert.register_forward_hook(self._expert_post_hook(layer)))

    def _patch_forward(self, module: nn.Module, forward: Callable) -> None:
        """Route `module`'s calls to `forward`, composing with an accelerate hook as `add_hook_to_module` does:
        where a hook is installed, its `_old_forward` (what the hook calls) is replaced, so the hook's
        pre/post-forward keep running; elsewhere the instance's `forward`. `_restore_model` puts back exactly
        what was there."""
        attr = "_old_forward" if getattr(module, "_hf_hook", None) is not None and "_old_forward" in module.__dict__ \
            else "forward"
        self._patches.append((module, attr, module.__dict__.get(attr, _MISSING)))
        setattr(module, attr, forward)

    def _restore_model(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for module, attr, old in reversed(getattr(self, "_patches", [])):
            if old is _MISSING:
                module.__dict__.pop(attr, None)
            else:
                setattr(module, attr, old)
        self._patches = []
        for layer, saved in zip(self.moe.layers, self._saved):
            data = {}
            if self.codec is not None:  # decompressed copies
                host = self.codec.decode_layer(self.store, layer.index)
            else:  # strided views, no copy
                host = self.store.layer_tensors(layer.index)
            for name, view in host.items():  # [E, *shape]
                data[name] = torch.empty(view.shape, dtype=view.dtype, device=self._orig_expert_device[layer.index])
                data[name].copy_(view)
            layer.layout.restore(layer.experts, saved, data)
        self._saved = []
        if len(self._orig_devices) == 1:
            self.model.to(next(iter(self._orig_devices)))
        if getattr(self, "store", None) is not None:
            self.store.close()
        self.model._specmoe_wrapper = None

    def _place(self, frequencies) -> None:
        """Load the hottest experts of frequencies [L][E] into the slots (a static placement)."""
        freq = torch.as_tensor(frequencies)
        if tuple(freq.shape) != (self.geometry.num_layers, self.geometry.num_experts):
            raise ValueError(f"placement must be routing frequencies [L, E] = "
                             f"{[self.geometry.num_layers, self.geometry.num_experts]}, got {list(freq.shape)}")
        for key in hottest(freq.tolist(), self.num_slots):
            slot, _ = self.cache.assign(key, lambda s: True)
            self.engine.copy_in(slot, self.pool.data[slot], self.store[key], demand=True)
        self.engine.synchronize()

    def _measure_miss_costs(self, repeats: int = 3) -> MissCosts:
        """Time one expert copy into a slot and one expert computed on the host (1 and k tokens), here."""
        def best(fn) -> float:
            fn()  # warm-up
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                fn()
                times.append(time.perf_counter() - start)
            return min(times)

        def copy():
            self.engine.copy_in(0, self.pool.data[0], self.store[(0, 0)], demand=True)
            self.engine.synchronize()

        layer = self.moe.layers[0]
        dtype = next(s.dtype for s in self.pool.layout.specs if s.dtype.is_floating_point)
        k = max(2, self.geometry.top_k)

        def host(tokens):
            hidden = torch.randn(tokens, self.geometry.hidden_size).to(dtype)
            if isinstance(layer.layout, FusedExperts):
                ids, w = torch.zeros(tokens, 1, dtype=torch.long), torch.ones(tokens, 1)
                return lambda: self._host.compute(layer, hidden, ids, w, [0])
            expert = layer.layout.experts_list(layer.experts)[0]
            tensors, rows = self._host.tensors(0, [0])

            def run():
                layer.layout.bind_expert(expert, tensors, 0)
                with torch.no_grad():
                    type(expert).forward(expert, hidden)
            return run

        copy_s = best(copy)
        one, many = best(host(1)), best(host(k))
        costs = MissCosts(copy_s, one, max(0.0, many - one) / (k - 1),
                          source=f"measured at start-up on {self.device}: one expert copied, one computed on the host")
        logger.info("misses='auto': %s", costs)
        return costs

    def _check_device_memory(self, model: nn.Module, moe: ModelMoE, pool_bytes: int) -> None:
        """Refuse a cache that cannot fit next to the non-expert weights (CUDA only)."""
        if self.device.type != "cuda":
            return

        def nbytes(t):
            return t.numel() * t.element_size()

        expert = {id(p): p for layer in moe.layers for p in layer.experts.parameters()}
        freed = sum(nbytes(p) for p in expert.values() if p.device == self.device)
        moved_in = sum(nbytes(t) for t in list(model.parameters()) + list(model.buffers())
                       if id(t) not in expert and t.device != self.device)
        free, _ = torch.cuda.mem_get_info(self.device)
        if pool_bytes + moved_in - freed > free:
            raise ValueError(
                f"the cache ({pool_bytes / 2**30:.2f} GiB) and the non-expert weights ({moved_in / 2**30:.2f} GiB "
                f"to move) do not fit in the {(free + freed) / 2**30:.2f} GiB available on {self.device}; "
                "lower cache_capacity"
            )

    def _to_device(self, obj):
        if isinstance(obj, torch.Tensor):
            return obj.to(self.device)
        if isinstance(obj, dict):
            return {k: self._to_device(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in obj):
            return type(obj)(self._to_device(v) for v in obj)
        return obj

    # ---- the hot path: routing and prediction here, every decision in the scheduler -------------------------------
    def _reset_state(self) -> None:
        if self.predictor is not None:
            self.predictor.reset()
        self._last_layer: int | None = None
        self._history: torch.Tensor | None = None  # [T, L, k] ids routed in the current pass
        self.scheduler.max_inflight = self.max_prefetch_inflight
        self.scheduler.reset()
        self._chunks = iter(())  # modulelist layout: the scheduler's chunks of the current layer
        self._bound: dict[int, int] = {}  # modulelist layout: expert -> slot for the current chunk
        self._routed: set[int] = set()  # modulelist layout: experts routed at the current layer
        self._on_host: set[int] = set()  # modulelist layout: experts of the current layer computed on the host
        self._tokens: Counter = Counter()  # expert -> tokens routed to it in the current layer call

    def _route(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor) -> list[int]:
        """Record routing, run the predictor, and with one host sync learn the routed and predicted experts;
        hand both to the scheduler. Returns the distinct routed experts, ascending."""
        geo = self.geometry
        L = geo.num_layers
        T = hidden.shape[0]
        ids = ids.reshape(T, -1).long()  # [T, k]
        targets: list[int] = []
        parts = [ids.flatten()]
        if self.predictor is not None:
            if self._last_layer is None or layer <= self._last_layer or self._history.shape[0] != T:
                self._history = torch.full((T, L, geo.top_k), -1, dtype=torch.long, device=ids.device)
            self._history[:, layer] = ids
            scores = self.predictor.predict(layer, hidden.reshape(T, -1), self._history[:, : layer + 1])
            # encoder-decoder: the next pass starts elsewhere, so no target past the last layer
            targets = sorted(t for t in scores if t < L or not self.moe.first_decode_layer)
            if targets:
                m = min(self.prefetch_width, geo.num_experts)
                stacked = torch.stack([scores[t] for t in targets])  # [n_targets, T, E]
                parts.append(top_candidates(stacked, m).flatten())  # [n_targets * T * m], best first, -1: none
        self._last_layer = layer
        host = torch.cat(parts).tolist()  # the one device->host sync of this layer
        self._host_syncs += 1
        n = ids.numel()
        needed = sorted(set(host[:n]) - {-1})
        candidates = []
        if targets:
            m = (len(host) - n) // (len(targets) * T)
            for i, t in enumerate(targets):
                candidates.extend((t % L, e) for e in rank_by_votes(host[n + i * T * m : n + (i + 1) * T * m], m))
        self.scheduler.begin(layer, T, needed, candidates)
        self._tokens = Counter(host[:n])  # expert -> tokens routed to it in this call
        return needed

    def _fused_forward(self, layer: MoELayer, args: tuple, kwargs: dict) -> torch.Tensor:
        hidden, ids, weights = layer.layout.routing(layer.experts, args, kwargs, self.geometry.top_k)
        needed, host = self.scheduler.split(layer.index, self._route(layer.index, hidden, ids), self._tokens)
        if host:  # the host starts at once on its worker; its output joins the device's at the end
            job = self._host.submit(layer, hidden, ids.reshape(hidden.shape[0], -1), weights, host)
            total = None
            for chunk, _ in self.scheduler.run(layer.index, needed):
                if chunk:
                    part = self._compute(layer, args, kwargs, ids, weights, chunk, partial=True).float()
                    total = part if total is None else total + part
            out = job.result().to(self.device, non_blocking=True)  # [T, H] float32
            return (out if total is None else total + out).to(hidden.dtype)
        if len(needed) <= self.num_slots:
            for chosen, _ in self.scheduler.run(layer.index, needed):
                out = self._compute(layer, args, kwargs, ids, weights, chosen, partial=False)
            return out
        # More distinct experts than slots: compute in chunks of at most S experts, masking the rest.
        total = None
        for chunk, _ in self.scheduler.run(layer.index, needed):
            part = self._compute(layer, args, kwargs, ids, weights, chunk, partial=True).float()
            total = part if total is None else total + part
        return total.to(hidden.dtype)

    def _compute(self, layer: MoELayer, args, kwargs, ids, weights, chosen: list[int], partial: bool):
        """Run the model's own experts implementation for the routed experts in `chosen` (all resident).
        With `partial`, routes to other experts get weight 0 (their results are summed by the caller)."""
        experts, layout = layer.experts, layer.layout
        E = self.geometry.num_experts
        table = self.cache.table[layer.index]  # [E] expert -> slot
        if self._fused is not None and self._fused.wanted(layer, ids, self.pool.weights):
            hidden = layout.routing(experts, args, kwargs, self.geometry.top_k)[0]  # [T, H]
            if partial:  # experts outside the chunk contribute nothing: they are absent for the kernel
                member = torch.zeros(E, dtype=torch.bool, device=ids.device)
                member[_to_device(chosen, ids.device)] = True
                table = torch.where(member, table, torch.full_like(table, -1))
            return self._fused(layer, hidden, ids, weights, self.pool.weights, table)
        chosen_t = _to_device(chosen, ids.device)  # [n]
        if self._model_compute == "gather":
            lut = torch.zeros(E, dtype=torch.long, device=ids.device)  # [E] expert -> compact index
            lut[chosen_t] = torch.arange(len(chosen), device=ids.device)
            layout.bind_pool(experts, self.pool.gather(table[chosen_t]))  # [n, ...]: one gather (dequantized)
            new_ids = lut[ids]  # [T, k]
        else:
            new_ids = table[ids]  # [T, k] slot ids
        if partial:
            member = torch.zeros(E, dtype=torch.bool, device=ids.device)
            member[chosen_t] = True
            keep = member[ids]  # [T, k]
            new_ids = torch.where(keep, new_ids, torch.zeros_like(new_ids))  # any valid index; weight 0
            weights = weights * keep
        a, kw = layout.replace_call(args, kwargs, experts, new_ids, weights)
        return type(experts).forward(experts, *a, **kw)

    def _modulelist_forward(self, layer: MoELayer, args: tuple, kwargs: dict) -> torch.Tensor:
        """One call of the model's own forward; the per-expert hooks bind each expert to its slot, taking the
        scheduler's next chunk when an expert is not in the current one."""
        experts, layout = layer.experts, layer.layout
        hidden, ids, _ = layout.routing(experts, args, kwargs, self.geometry.top_k)
        needed, host = self.scheduler.split(layer.index, self._route(layer.index, hidden, ids), self._tokens)
        self._on_host = set(host)  # these run on the host, one by one, inside the family's loop (hooks below)
        self._chunks = self.scheduler.run(layer.index, needed)
        self._routed = set(needed)
        self._next_chunk()
        out = type(experts).forward(experts, *args, **kwargs)
        for _ in self._chunks:  # release the last chunk (and prefetch, after chunks)
            pass
        self._bound, self._routed, self._on_host = {}, set(), set()
        return out

    def _next_chunk(self) -> bool:
        chunk, slots = next(self._chunks, ((), ()))
        self._bound = dict(zip(chunk, slots))
        return bool(chunk)

    def _expert_pre_hook(self, layer: MoELayer, e: int):
        def hook(module, args):
            if e in self._on_host:  # computed from the host store: its input crosses to the host
                tensors, rows = self._host.tensors(layer.index, [e])  # name -> [E, *shape], or [1, *shape]
                layer.layout.bind_expert(module, tensors, e if rows is None else 0)
                module._specmoe_on_host = True
                return tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
            slot = self._bound.get(e)
            while slot is None and e in self._routed and self._next_chunk():  # in a later chunk
                slot = self._bound.get(e)
            if slot is None:  # not announced by the routing (or visited out of order): fetch it alone
                (slot,) = self.scheduler.acquire(layer.index, [e])
                module._specmoe_lazy_slot = slot
            layer.layout.bind_expert(module, *self.pool.expert_views(slot))

        return hook

    def _expert_post_hook(self, layer: MoELayer):
        def hook(module, args, output):
            if module.__dict__.pop("_specmoe_on_host", False):
                return output.to(self.device) if isinstance(output, torch.Tensor) else output
            slot = module.__dict__.pop("_specmoe_lazy_slot", None)
            if slot is not None:
                self.scheduler.release([slot])

        return hook
