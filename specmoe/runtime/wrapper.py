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

This module only meets the parts: `checks` (validation, device, memory), `hooks` (experts offloaded into the
store and back, one `ExpertsHook` per MoE layer, and the `PassMarker` pass-start pre-hook), `scheduler` (every
decision), `hot_path` (steps 1-4 over explicit state), `compute` (gather / pool / kernel, chosen once) and
`host_compute` (misses computed on the host, static placement, miss costs).
"""

# Shape legend: T tokens, E experts, H hidden, k top-k, L MoE layers, S slots, B bytes per expert

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from ..kernels.host import check_threads
from ..predictors.base import Predictor
from .adapters import FusedExperts, ModelMoE, find_moe_layers
from .cache import ExpertCache, SlotPool
from .capacity import resolve_capacity
from .checks import check_device_memory, check_materialised, check_predictor, model_devices, resolve_device
from .compiled import CompiledDecode, backend_name, check_compilable, experts_wrap
from .compression import make_codec
from .compute import COMPUTE, build_compute, choose_compute
from .hooks import ExpertsHook, PassMarker, new_store, offload_experts, restore_experts
from .host_compute import HostExperts, measure_miss_costs, place_hottest
from .hot_path import HotPath
from .config import OffloadConfig
from .misses import MissCosts
from .stats import LayerStats, Stats
from .store import ExpertLayout
from .scheduler import Scheduler
from .transfer import StoreToPool, make_engine

__all__ = ["COMPUTE", "OffloadConfig", "SpeculativeMoE", "resolve_device"]
logger = logging.getLogger(__name__)
_FROM_CONFIG = object()  # cache_capacity not given: the config's (default 0.5)


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
        config: an `OffloadConfig` (policy, misses, compression, transfer, compute, prefetch width, in-flight
            bound, host threads: see its docstring); the same names may be given as keyword arguments
            (`settings`: ``policy="lru"``, ``misses="auto"``, ``transfer="thread"``, ``compression="int4"``,
            ``compute="pool"``, ``compile=True``, ``prefetch_width``, ``max_prefetch_inflight``, ``host_threads``,
            ``host_activations="int8"``), which override
            it. `cache_capacity`, when given, overrides its capacity. `self.config` holds the result.
        expert_source: where the experts' bytes come from when the model's experts modules do not hold them
            (`specmoe.load_offloaded` builds the model with its experts on the meta device and passes a
            `runtime.loading.CheckpointExperts`); an object with ``build_store(moe, layout, codec)``.
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
        cache_capacity: float | int | str = _FROM_CONFIG,
        *,
        config: OffloadConfig | None = None,
        device=None,
        expert_source=None,
        miss_costs: MissCosts | None = None,
        placement=None,
        **settings,
    ):
        if cache_capacity is not _FROM_CONFIG:
            settings["capacity"] = cache_capacity
        cfg = self.config = OffloadConfig.build(config, **settings)  # every setting validated here, once
        # ---- validate everything before touching the model ------------------------------------
        if getattr(model, "_specmoe_wrapper", None) is not None:
            raise ValueError("this model is already wrapped by SpeculativeMoE; call .unwrap() on that wrapper first")
        moe: ModelMoE = find_moe_layers(model)
        check_materialised(model, moe, streamed=expert_source is not None)
        geo = moe.geometry
        check_predictor(predictor)
        self._backend = backend_name(cfg.compile)  # compiled decode (None: eager)
        if self._backend is not None:
            check_compilable(model)
        layout = ExpertLayout(moe.specs)
        self.codec = make_codec(cfg.compression, layout, moe.transposed)  # compressed experts: store, copies, slots
        store_layout = self.codec.layout if self.codec else layout
        num_slots = resolve_capacity(cfg.capacity, geo.num_layers, geo.num_experts, store_layout.nbytes)
        self.device = resolve_device(model, device)
        if predictor is not None:
            predictor.bind(geo, [layer.router for layer in moe.layers])
        scratch = geo.top_k * layout.nbytes if self.codec else 0  # dequantized routed experts (fallback path)
        check_device_memory(model, moe, self.device, num_slots * store_layout.nbytes + scratch)
        self.prefetch_width = cfg.width(geo.top_k)
        self.max_prefetch_inflight = self._default_inflight(predictor, geo)
        self.misses = cfg.misses
        self.host_threads = check_threads(cfg.host_threads)  # None: the host kernels' default
        # how fused-experts layers compute: before the experts leave their modules (the kernel plans read them)
        self.compute, model_compute, kernel = choose_compute(cfg.compute, self.device, self.codec is not None, moe.layers)

        self.model = model
        self.predictor = predictor
        self.moe = moe
        self.geometry = geo
        self.num_slots = num_slots
        self._orig_devices = model_devices(model)
        # where each layer's experts go back on unwrap(): where they were, or host memory for experts never
        # materialised (streamed from a checkpoint, on the meta device)
        self._orig_expert_device = [
            d if d.type != "meta" else torch.device("cpu")
            for d in (next(iter(layer.layout.expert_tensors(layer.experts, 0).values())).device for layer in moe.layers)]
        self._saved: list[dict] = []
        self._hooks: list[ExpertsHook] = []
        self._passes: PassMarker | None = None
        self._compiled: CompiledDecode | None = None

        # ---- move experts to the host store, the rest to the device -------------------------------
        try:
            self.store = new_store(moe, layout, self.codec, expert_source)
            offload_experts(moe, self.store, self.codec, expert_source is not None, self._saved)
            model.to(self.device)
            if self.device.type == "cuda":
                self.store.pin()
            self.pool = SlotPool(self.store.layout, num_slots, self.device, self.codec)  # compressed if so
            self.cache = ExpertCache(num_slots, geo.num_layers, geo.num_experts, self.device, cfg.policy)
            self.engine = make_engine(cfg.transfer, num_slots, self.device)
            copies = StoreToPool(self.engine, self.store, self.pool.data, self.max_prefetch_inflight, geo.top_k)
            self.scheduler = Scheduler(self.cache, copies, geo.num_layers,
                                       self.max_prefetch_inflight, self.store.layout.nbytes,  # compressed bytes
                                       misses=self.misses)
            self.experts_compute = build_compute(model_compute, kernel, self.pool, self.cache.table, geo.num_experts,
                                                 geo.top_k)
            self._host = HostExperts(self.store, self.codec, self.host_threads, cfg.host_activations) \
                if self.misses != "fetch" else None
            self.hot = HotPath(self.scheduler, self.experts_compute, self.pool, self._host, geo, self.device,
                               self.prefetch_width, wrap=not moe.first_decode_layer)
            self._install()
            if self._backend is not None:
                self._compiled = CompiledDecode(model, geo.num_layers, self._backend, self.device,
                                                {h.redirect.layer.index: h.redirect for h in self._hooks})
            self.miss_costs = miss_costs
            if self.misses == "auto" and miss_costs is None:
                self.miss_costs = measure_miss_costs(self._host, moe.layers[0], self.engine, self.pool, self.store,
                                                     geo.hidden_size, geo.top_k, self.device)
            self.scheduler.miss_costs = self.miss_costs  # "auto" measures them on the engine and store just made
            if placement is not None:
                place_hottest(placement, geo.num_layers, num_slots, self.cache, self.engine, self.pool, self.store)
        except BaseException:
            self._restore_model()
            raise
        model._specmoe_wrapper = self
        self._passes = PassMarker.attach(model, self._start_pass)  # the one pass-start signal, removed at unwrap
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
        args, kwargs = self._to_device(args), self._to_device(kwargs)
        if self._compiled is not None:  # a static cache, reused: decode steps replay compiled graphs
            kwargs = self._compiled.generate_kwargs(args, kwargs)
        return self.model.generate(*args, **kwargs)

    def set_predictor(self, predictor: Predictor | None) -> None:
        """Swap the predictor (None: on demand only) without rewrapping; the cache stays warm.

        Raises:
            TypeError / ValueError: as the constructor, for a non-predictor or another geometry.
            RuntimeError: after `unwrap()`.
        """
        self._check_wrapped("set_predictor")
        if predictor is not None:
            check_predictor(predictor)
            predictor.bind(self.geometry, [layer.router for layer in self.moe.layers])
        self.predictor = predictor
        self.max_prefetch_inflight = self._default_inflight(predictor, self.geometry)
        self._reset_state()

    def _default_inflight(self, predictor, geo) -> int:
        return self.config.inflight(geo.top_k, getattr(predictor, "lookahead", 1) if predictor is not None else 1)

    @property
    def stats(self) -> Stats:
        return Stats(
            per_layer=[LayerStats(**vars(x)) for x in self.scheduler.stats],
            stall_s=self.engine.stall_seconds(),
            stall_waits=self.engine.waits,
            host_stall_s=getattr(self.engine, "host_wait_s", 0.0),  # engines from elsewhere may not count it
            host_stall_waits=getattr(self.engine, "host_waits", 0),
            host_syncs=self.hot.host_syncs,
            layer_calls=self.scheduler.layer_calls,
            chunked_calls=self.scheduler.chunked_calls,
        )

    @property
    def compile_stats(self) -> dict | None:
        """Compiled decode's costs (`runtime.compiled.CompiledDecode.stats`: compile seconds, graphs, steps run
        compiled and eager); None when decode is eager."""
        return self._compiled.stats() if self._compiled is not None else None

    def reset_stats(self) -> None:
        self.scheduler.reset_stats()
        self.hot.host_syncs = 0
        self.engine.reset_stall()

    def memory(self) -> dict[str, int]:
        """Bytes: non-expert weights on the device, the cache pool, and the host store. With compression a
        slot holds an expert's compressed bytes (`slot_bytes` = `host_expert_bytes` < `expert_bytes`).

        Raises:
            RuntimeError: after `unwrap()` (nothing is offloaded any more).
        """
        self._check_wrapped("memory()")
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
    def _install(self) -> None:
        wrap = experts_wrap(self.device) if self._backend is not None else None  # compiled decode's experts call
        for layer in self.moe.layers:
            if isinstance(layer.layout, FusedExperts):
                self.experts_compute.prepare(layer)
                self._hooks.append(ExpertsHook(layer, self.hot.fused_forward, wrap=wrap))
            else:  # the family's own loop and output: compiled, a graph break (never the op)
                self._hooks.append(ExpertsHook(layer, self.hot.modulelist_forward, self.hot.expert_hooks,
                                               wrap=torch.compiler.disable if wrap is not None else None))

    def _restore_model(self) -> None:
        if self._compiled is not None:
            self._compiled.remove()
            self._compiled = None
        if self._passes is not None:
            self._passes.detach(self.model, self._start_pass)
            self._passes = None
        for hook in reversed(self._hooks):
            hook.remove()
        self._hooks = []
        restore_experts(self.moe.layers, self._saved, getattr(self, "store", None), self.codec,
                        self._orig_expert_device)
        self._saved = []
        if len(self._orig_devices) == 1:
            self.model.to(next(iter(self._orig_devices)))
        if getattr(self, "store", None) is not None:
            self.store.close()
        self.model._specmoe_wrapper = None

    def _to_device(self, obj):
        if isinstance(obj, torch.Tensor):
            return obj.to(self.device)
        if isinstance(obj, dict):
            return {k: self._to_device(v) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in obj):
            return type(obj)(self._to_device(v) for v in obj)
        return obj

    def _start_pass(self, index: int) -> None:
        """A forward pass of the model starts: the hot path and the scheduler get its index (never going back),
        the predictor its index since its last reset."""
        self.hot.start_pass(index)
        start = getattr(self.predictor, "start_pass", None)
        if start is not None:
            start(index - self._first_pass)

    def _reset_state(self) -> None:
        self._first_pass = self._passes.index + 1  # the predictor counts passes from here
        if self.predictor is not None:
            self.predictor.reset()
        self.hot.predictor = self.predictor
        self.hot.reset()
        self.scheduler.max_inflight = self.max_prefetch_inflight
        self.scheduler.reset()
