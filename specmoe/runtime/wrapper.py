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

from collections.abc import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..predictors.base import Predictor, rank_by_votes
from .adapters import FusedExperts, ModelMoE, MoELayer, find_moe_layers
from .cache import ExpertCache, SlotPool
from .capacity import resolve_capacity
from .compression import make_codec
from .fused_compute import FusedKernelCompute
from .stats import LayerStats, Stats
from .store import ExpertLayout, HostStore
from .transfer import make_engine

COMPUTE = ("auto", "gather", "pool", "triton")


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
        compression: None (default) or "int8" / "int4" / "int4-g128": the host keeps experts compressed
            (`specmoe.kernels.quant`), copies move the compressed bytes and slots are dequantized on the
            device. Changes numerics (and `unwrap()` returns the dequantized experts).

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
    ):
        # ---- validate everything before touching the model ------------------------------------
        if getattr(model, "_specmoe_wrapper", None) is not None:
            raise ValueError("this model is already wrapped by SpeculativeMoE; call .unwrap() on that wrapper first")
        moe: ModelMoE = find_moe_layers(model)
        geo = moe.geometry
        _check_predictor(predictor)
        layout = ExpertLayout(moe.specs)
        num_slots = resolve_capacity(cache_capacity, geo.num_layers, geo.num_experts, layout.nbytes)
        self.device = resolve_device(model, device)
        if predictor is not None:
            predictor.bind(geo, [layer.router for layer in moe.layers])
        self.codec = make_codec(compression, layout)
        staging = 2 * self.codec.layout.nbytes if self.codec else 0  # one per copy stream
        self._check_device_memory(model, moe, num_slots * layout.nbytes + staging)
        self.prefetch_width = prefetch_width or geo.top_k
        self._inflight_bound = max_prefetch_inflight  # None: follows the predictor's lookahead
        self.max_prefetch_inflight = self._default_inflight(predictor, geo)
        if self.prefetch_width < 1 or self.max_prefetch_inflight < 1:
            raise ValueError("prefetch_width and max_prefetch_inflight must be >= 1")
        self.compute = compute or "auto"
        if self.compute not in COMPUTE:
            raise ValueError(f"compute must be one of {COMPUTE}, got {compute!r}")
        # what runs where the fused kernel is not used: the model's implementation on the pool or a gather
        self._model_compute = (self.compute if self.compute in ("gather", "pool")
                               else "pool" if self.device.type == "cuda" else "gather")
        use_kernel = self.compute == "triton" or (self.compute == "auto" and self.device.type == "cuda")
        self._fused = FusedKernelCompute(self.compute, self.device, self._model_compute) if use_kernel else None
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
        self._saved: list[dict] = []
        self._handles: list = []

        # ---- move experts to the host store, the rest to the device -------------------------------
        try:
            self.store = HostStore(self.codec.layout if self.codec else layout, geo.num_layers, geo.num_experts)
            big = self.store.nbytes > 2**30  # a progress bar only where it takes a while
            for layer in tqdm(moe.layers, desc="experts -> host store", unit="layer", disable=not big, leave=False):
                for e in range(geo.num_experts):
                    tensors = layer.layout.expert_tensors(layer.experts, e)
                    self.store.write((layer.index, e), self.codec.encode(tensors) if self.codec else tensors)
                self._saved.append(layer.layout.remove(layer.experts))  # frees the module's expert tensors
            model.to(self.device)
            if self.device.type == "cuda":
                self.store.pin()
            self.pool = SlotPool(layout, num_slots, self.device)
            self.cache = ExpertCache(num_slots, geo.num_layers, geo.num_experts, self.device, policy)
            compressed = {"codec": self.codec} if self.codec else {}  # copies that rebuild slots from compressed bytes
            self.engine = make_engine(transfer, num_slots, self.device, **compressed)
            for layer in moe.layers:
                self._install(layer)
        except BaseException:
            self._restore_model()
            raise
        model._specmoe_wrapper = self
        self._reset_state()
        self.reset_stats()

    # ---- public API -----------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        return self.model(*self._to_device(args), **self._to_device(kwargs))

    def generate(self, *args, **kwargs):
        """`model.generate` with the runtime in the loop; the predictor starts afresh."""
        self._reset_state()
        return self.model.generate(*self._to_device(args), **self._to_device(kwargs))

    def set_predictor(self, predictor: Predictor | None) -> None:
        """Swap the predictor (None: on demand only) without rewrapping; the cache stays warm.

        Raises:
            TypeError / ValueError: as the constructor, for a non-predictor or another geometry.
        """
        if predictor is not None:
            _check_predictor(predictor)
            predictor.bind(self.geometry, [layer.router for layer in self.moe.layers])
        self.predictor = predictor
        self.max_prefetch_inflight = self._default_inflight(predictor, self.geometry)
        self._reset_state()

    def _default_inflight(self, predictor, geo) -> int:
        lookahead = getattr(predictor, "lookahead", 1) if predictor is not None else 1
        return self._inflight_bound or 2 * geo.top_k * lookahead

    @property
    def stats(self) -> Stats:
        return Stats(
            per_layer=[LayerStats(**vars(x)) for x in self._layer_stats],
            stall_s=self.engine.stall_seconds(),
            stall_waits=self.engine.waits,
            host_syncs=self._host_syncs,
            layer_calls=self._layer_calls,
            chunked_calls=self._chunked_calls,
        )

    def reset_stats(self) -> None:
        self._layer_stats = [LayerStats() for _ in range(self.geometry.num_layers)]
        self._host_syncs = self._layer_calls = self._chunked_calls = 0
        self.engine.reset_stall()

    def memory(self) -> dict[str, int]:
        """Bytes: non-expert weights on the device, the cache pool, and the host store."""
        nonexpert = sum(t.numel() * t.element_size() for t in list(self.model.parameters()) + list(self.model.buffers())
                        if t.device == self.device)
        slot_layout = self.codec.slot_layout if self.codec else self.store.layout
        return {"nonexpert_bytes": nonexpert, "cache_bytes": self.pool.nbytes, "host_store_bytes": self.store.nbytes,
                "slot_bytes": slot_layout.nbytes, "host_expert_bytes": self.store.layout.nbytes,
                "num_slots": self.num_slots}

    def unwrap(self) -> nn.Module:
        """Undo the wrapping: experts back in the model where they were, forwards restored. Returns the model."""
        if self.pool is None:
            return self.model
        self.engine.synchronize()
        self._restore_model()
        self.engine.close()
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
            experts.forward = lambda *a, _l=layer, **kw: self._fused_forward(_l, a, kw)
        else:
            experts.forward = lambda *a, _l=layer, **kw: self._modulelist_forward(_l, a, kw)
            for e, expert in enumerate(layer.layout.experts_list(experts)):
                self._handles.append(expert.register_forward_pre_hook(self._expert_pre_hook(layer, e)))
                self._handles.append(expert.register_forward_hook(self._expert_post_hook(layer)))

    def _restore_model(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        for layer, saved in zip(self.moe.layers, self._saved):
            layer.experts.__dict__.pop("forward", None)
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

    # ---- the hot path -----------------------------------------------------------------------------
    def _reset_state(self) -> None:
        if self.predictor is not None:
            self.predictor.reset()
        self._last_layer: int | None = None
        self._history: torch.Tensor | None = None  # [T, L, k] ids routed in the current pass
        self._queue: list[tuple[int, int]] = []  # prefetch candidates, best first
        self._predicted: set[tuple[int, int]] = set()  # what the latest prediction wants kept
        self._inflight: set[int] = set()  # slots with a prefetch copy that may not have landed
        self._prefetched: dict[int, tuple[int, int]] = {}  # slot -> key, prefetched and not yet used
        self._in_use: set[int] = set()  # slots the layer being computed reads
        self._bound: dict[int, int] = {}  # modulelist layout: expert -> slot for the current layer

    def _route(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor) -> list[int]:
        """Record routing, run the predictor, and with one host sync learn the routed and predicted experts.
        Returns the distinct routed experts; leaves prefetch candidates in self._queue."""
        geo = self.geometry
        L = geo.num_layers
        T = hidden.shape[0]
        ids = ids.reshape(T, -1).long()  # [T, k]
        self._layer_calls += 1
        targets: list[int] = []
        parts = [ids.flatten()]
        if self.predictor is not None:
            if self._last_layer is None or layer <= self._last_layer or self._history.shape[0] != T:
                self._history = torch.full((T, L, geo.top_k), -1, dtype=torch.long, device=ids.device)
            self._history[:, layer] = ids
            scores = self.predictor.predict(layer, hidden.reshape(T, -1), self._history[:, : layer + 1])
            if scores:
                targets = sorted(scores)
                m = min(self.prefetch_width, geo.num_experts)
                stacked = torch.stack([scores[t].float() for t in targets])  # [n_targets, T, E]
                parts.append(stacked.topk(m, dim=-1).indices.flatten())  # [n_targets * T * m], best first
        self._last_layer = layer
        host = torch.cat(parts).tolist()  # the one device->host sync of this layer
        self._host_syncs += 1
        n = ids.numel()
        needed = sorted(set(host[:n]) - {-1})
        queue = []
        if targets:
            m = (len(host) - n) // (len(targets) * T)
            for i, t in enumerate(targets):
                if t >= L:
                    if self.moe.first_decode_layer:  # encoder-decoder: the next pass starts elsewhere
                        continue
                    t -= L
                queue.extend((t, e) for e in rank_by_votes(host[n + i * T * m : n + (i + 1) * T * m], m))
        self._predicted = set(queue)
        self._queue = [key for key in queue if key not in self.cache.slot_of]
        return needed

    def _evictable(self, slot: int) -> bool:
        return slot not in self._in_use and self.engine.ready(slot)

    def _take_slot(self, key, demand: bool) -> int | None:
        """Assign `key` a slot and start its copy. Demand may wait for in-flight copies; prefetch never does."""
        if demand:
            allowed = self._evictable
        else:
            allowed = lambda s: self._evictable(s) and self.cache.key_of[s] not in self._predicted  # noqa: E731
        got = self.cache.assign(key, allowed)
        if got is None and demand:
            for s in range(self.num_slots):  # every other slot is in use or in flight: let copies land
                if s not in self._in_use and not self.engine.ready(s):
                    self.engine.wait_host(s)
            got = self.cache.assign(key, self._evictable)
            if got is None:
                raise RuntimeError(f"no cache slot for expert {key}: all {self.num_slots} slots are in use")
        if got is None:
            return None
        slot, evicted = got
        if slot in self._prefetched:
            self._layer_stats[self._prefetched.pop(slot)[0]].prefetch_wasted += 1
        self.engine.copy_in(slot, self.pool.data[slot], self.store[key], demand=demand)
        self._layer_stats[key[0]].bytes_moved += self.store.layout.nbytes  # compressed bytes when compressed
        return slot

    def _acquire(self, layer: int, experts: list[int]) -> list[int]:
        """Make the routed experts resident and pinned for this layer; compute waits for their copies."""
        stats = self._layer_stats[layer]
        slots = []
        for e in experts:
            key = (layer, e)
            slot = self.cache.lookup(key)
            if slot is not None:
                stats.hits += 1
                if not self.engine.ready(slot):
                    stats.hits_in_flight += 1
                if self._prefetched.pop(slot, None) is not None:
                    stats.prefetch_used += 1
                self.cache.touch(slot)
            else:
                stats.misses += 1
                slot = self._take_slot(key, demand=True)
            self._in_use.add(slot)
            slots.append(slot)
        self.engine.wait(slots)
        return slots

    def _release(self, slots: list[int]) -> None:
        self.engine.release(slots)
        self._in_use.difference_update(slots)

    def _pump(self) -> None:
        """Issue queued prefetches, best first, while fewer than the bound are in flight."""
        while self._queue:
            if len(self._inflight) >= self.max_prefetch_inflight:
                self._inflight = {s for s in self._inflight if not self.engine.ready(s)}
                if len(self._inflight) >= self.max_prefetch_inflight:
                    break
            key = self._queue.pop(0)
            if key in self.cache.slot_of:
                continue
            slot = self._take_slot(key, demand=False)
            if slot is None:  # nothing may be evicted for a guess
                self._queue.clear()
                break
            self._inflight.add(slot)
            self._prefetched[slot] = key
            self._layer_stats[key[0]].prefetch_issued += 1

    def _let_prefetches_land(self) -> None:
        for s in self._inflight:
            self.engine.wait_host(s)
        self._inflight.clear()

    def _fused_forward(self, layer: MoELayer, args: tuple, kwargs: dict) -> torch.Tensor:
        hidden, ids, weights = layer.layout.routing(layer.experts, args, kwargs, self.geometry.top_k)
        needed = self._route(layer.index, hidden, ids)
        if len(needed) <= self.num_slots:
            slots = self._acquire(layer.index, needed)
            self._pump()
            out = self._compute(layer, args, kwargs, ids, weights, needed, partial=False)
            self._release(slots)
            return out

        # More distinct experts than slots: compute in chunks of at most S experts, masking the rest.
        self._chunked_calls += 1
        self._let_prefetches_land()
        total = None
        for i in range(0, len(needed), self.num_slots):
            chunk = needed[i : i + self.num_slots]
            slots = self._acquire(layer.index, chunk)
            part = self._compute(layer, args, kwargs, ids, weights, chunk, partial=True).float()
            total = part if total is None else total + part
            self._release(slots)
        self._pump()
        return total.to(hidden.dtype)

    def _compute(self, layer: MoELayer, args, kwargs, ids, weights, chosen: list[int], partial: bool):
        """Run the model's own experts implementation for the routed experts in `chosen` (all resident).
        With `partial`, routes to other experts get weight 0 (their results are summed by the caller)."""
        experts, layout = layer.experts, layer.layout
        E = self.geometry.num_experts
        table = self.cache.table[layer.index]  # [E] expert -> slot
        if self._fused is not None and self._fused.wanted(layer, ids, self.pool.views):
            hidden = layout.routing(experts, args, kwargs, self.geometry.top_k)[0]  # [T, H]
            if partial:  # experts outside the chunk contribute nothing: they are absent for the kernel
                member = torch.zeros(E, dtype=torch.bool, device=ids.device)
                member[_to_device(chosen, ids.device)] = True
                table = torch.where(member, table, torch.full_like(table, -1))
            return self._fused(layer, hidden, ids, weights, self.pool.views, table)
        chosen_t = _to_device(chosen, ids.device)  # [n]
        if self._model_compute == "gather":
            lut = torch.zeros(E, dtype=torch.long, device=ids.device)  # [E] expert -> compact index
            lut[chosen_t] = torch.arange(len(chosen), device=ids.device)
            compact = self.pool.data.index_select(0, table[chosen_t])  # [n, B]: one gather of n experts
            layout.bind_pool(experts, self.pool.layout.views(compact))
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
        experts, layout = layer.experts, layer.layout
        hidden, ids, _ = layout.routing(experts, args, kwargs, self.geometry.top_k)
        needed = self._route(layer.index, hidden, ids)
        if len(needed) <= self.num_slots:
            slots = self._acquire(layer.index, needed)
            self._bound = dict(zip(needed, slots))
        else:  # experts are fetched one at a time by the per-expert hooks
            self._chunked_calls += 1
            self._let_prefetches_land()
            slots, self._bound = [], {}
        self._pump()
        out = type(experts).forward(experts, *args, **kwargs)
        self._release(slots)
        self._bound = {}
        return out

    def _expert_pre_hook(self, layer: MoELayer, e: int):
        def hook(module, args):
            slot = self._bound.get(e)
            if slot is None:  # not announced by the routing (or too many experts): fetch it alone
                (slot,) = self._acquire(layer.index, [e])
                module._specmoe_lazy_slot = slot
            layer.layout.bind_expert(module, self.pool.views, slot)

        return hook

    def _expert_post_hook(self, layer: MoELayer):
        def hook(module, args, output):
            slot = module.__dict__.pop("_specmoe_lazy_slot", None)
            if slot is not None:
                self._release([slot])

        return hook
