"""The hot path of one MoE layer call, over explicit state: route, then compute on what the scheduler yields.

`HotPath` is what the installed `hooks.ExpertsHook`s call. Per MoE layer call (the router has just chosen):

- `start_pass`: the wrapper's pass-start hook (`hooks.PassMarker`) hands on the index of each forward pass;
- `route`: record the routing, run the predictor (while the scheduler's admission wants its guesses), and with
  ONE device->host sync learn the routed experts and the predictor's ranked candidates; the scheduler turns them
  into the call's plan (`Scheduler.plan`);
- `fused_forward` (experts stored as stacked tensors): execute the plan: host experts submitted, then each device
  step (`Scheduler.step`: acquire; after the compute is issued, prefetch and release) computed on its slots, with the
  chosen compute strategy (`compute.py`); a call split over chunks and the host computes each route once where
  its expert is, and sums the routes as the model does (`compute.accumulate`);
- `modulelist_forward` (one module per expert): the model's own loop runs; `expert_hooks` bind each expert to
  its slot (or its host tensors) as the loop reaches it.

Every decision (what to fetch, evict, prefetch, chunk, or compute on the host) is the scheduler's
(`scheduler.py`); the simulator (`sim/engine.py`) executes the same plans on its clock. What this hot path costs
itself per layer call is measured by `benchmarks/hot_path_cost.py`, and the simulator charges that.
"""

# Shape legend: T tokens, E experts, H hidden, k top-k, L MoE layers, n target layers, m prefetch width

from __future__ import annotations

from collections import Counter

import torch

from ..predictors.base import rank_by_votes, top_candidates
from .adapters import MoELayer
from .compute import accumulate, to_device
from .scheduler import LayerPlan, Scheduler


class ListCall:
    """The state of one ModuleList layer call, which its experts' hooks read: the scheduler's plan (stepped chunk
    by chunk), the routed experts, those computed on the host, and expert -> slot of the current chunk."""

    def __init__(self, scheduler=None, plan: LayerPlan | None = None):
        self.scheduler, self.plan = scheduler, plan
        self.routed = set(plan.device) if plan is not None else set()
        self.on_host = set(plan.host) if plan is not None else set()
        self.slots: dict[int, int] = {}

    def next_chunk(self) -> bool:
        if self.plan is None or not self.scheduler.step(self.plan):
            self.slots = {}
            return False
        self.slots = dict(zip(self.plan.chunk, self.plan.slots))
        return bool(self.plan.chunk)


class HotPath:
    """The per-call state of the runtime and the functions over it.

    Args:
        scheduler: the one scheduler of the slot cache.
        experts_compute: the compute strategy of fused-experts layers (`compute.build_compute`).
        pool: the slot pool (ModuleList layouts bind expert views of it).
        host: `host_compute.HostExperts` where misses may run on the host, else None.
        geometry: the model's MoE geometry.
        device: the cache's device.
        prefetch_width: experts prefetched per token per target layer.
        wrap: keep prediction targets past the last layer (the next pass's first layers); False for
            encoder-decoder models, whose next pass starts elsewhere.
    """

    def __init__(self, scheduler: Scheduler, experts_compute, pool, host, geometry, device: torch.device,
                 prefetch_width: int, wrap: bool):
        self.scheduler, self.experts_compute, self.pool, self.host = scheduler, experts_compute, pool, host
        self.geometry, self.device, self.prefetch_width, self.wrap = geometry, device, prefetch_width, wrap
        self.num_slots = scheduler.num_slots
        self._predictor = None
        self.host_syncs = 0
        self.pass_index = 0  # the forward pass running, as the wrapper's pass-start hook counts them
        self.reset()

    @property
    def predictor(self):
        """The predictor (None: demand fetching only); the scheduler is told whether there is one."""
        return self._predictor

    @predictor.setter
    def predictor(self, predictor) -> None:
        self._predictor = predictor
        self.scheduler.predicting = predictor is not None

    def start_pass(self, index: int) -> None:
        """Forward pass `index` starts (the wrapper's one pass-start signal, `hooks.PassMarker`)."""
        self.pass_index = index
        self._history = None

    def reset(self) -> None:
        """Forget the current pass (a new generate call)."""
        self._history: torch.Tensor | None = None  # [T, L, k] ids routed in the current pass
        self._call = ListCall()  # the ModuleList layer call running (none: empty)
        self._routes: list[int] = []  # [T * k] the routed expert of each route of the layer call running

    def route(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor) -> LayerPlan:
        """Record routing, run the predictor (while the scheduler wants its guesses), and with one host sync learn
        the routed and predicted experts; returns the scheduler's plan of this call (`Scheduler.plan`)."""
        geo = self.geometry
        L = geo.num_layers
        T = hidden.shape[0]
        ids = ids.reshape(T, -1)  # [T, k]
        predictor, sched = self.predictor, self.scheduler
        if predictor is not None:
            ids = ids.long()
            if self._history is None or self._history.shape[0] != T:  # a pass started (or an inner module ran alone)
                self._history = torch.full((T, L, geo.top_k), -1, dtype=torch.long, device=ids.device)
            width = self._history.shape[2]  # the top-k predictors were bound with
            if ids.shape[1] == width:
                self._history[:, layer] = ids
            else:  # a router's top_k changed after wrapping: its best first are kept, or -1 (no expert) pads
                self._history[:, layer, : ids.shape[1]] = ids[:, :width]
                self._history[:, layer, ids.shape[1]:] = -1
            if not sched.wants_prediction():  # admission says its guesses would not be copied
                if getattr(predictor, "stateful", False):  # it keeps the previous tokens' routing: it sees this call
                    predictor.observe(layer, self._history[:, : layer + 1])
                predictor = None
        if predictor is None:
            host = self._routes = ids.flatten().tolist()  # the one device->host sync of this layer
            self.host_syncs += 1
            needed = sorted(set(host))
            if needed and needed[0] < 0:  # -1: a route to no expert
                needed = needed[1:]
            return sched.plan(self.pass_index, layer, needed, (), Counter(host) if sched.misses != "fetch" else None)
        parts = [ids.flatten()]
        scores = predictor.predict(layer, hidden.reshape(T, -1), self._history[:, : layer + 1])
        # encoder-decoder: the next pass starts elsewhere, so no target past the last layer
        targets = sorted(t for t in scores if t < L or self.wrap)
        if targets:
            m = min(self.prefetch_width, geo.num_experts)
            stacked = torch.stack([scores[t] for t in targets])  # [n_targets, T, E]
            parts.append(top_candidates(stacked, m).flatten())  # [n_targets * T * m], best first, -1: none
        host = torch.cat(parts).tolist()  # the one device->host sync of this layer
        self.host_syncs += 1
        n = ids.numel()
        self._routes = host[:n]
        needed = sorted(set(host[:n]) - {-1})
        candidates = []
        if targets:
            m = (len(host) - n) // (len(targets) * T)
            for i, t in enumerate(targets):
                candidates.extend((t % L, e) for e in rank_by_votes(host[n + i * T * m : n + (i + 1) * T * m], m))
        return sched.plan(self.pass_index, layer, needed, candidates,
                          Counter(host[:n]) if sched.misses != "fetch" else None)  # expert -> tokens routed to it

    def fused_forward(self, layer: MoELayer, args: tuple, kwargs: dict) -> torch.Tensor:
        hidden, ids, weights = layer.layout.routing(layer.experts, args, kwargs, self.geometry.top_k)
        plan = self.route(layer.index, hidden, ids)
        compute, step = self.experts_compute.compute, self.scheduler.step
        if not plan.host and len(plan.device) <= self.num_slots:
            step(plan)  # acquire
            out = compute(layer, args, kwargs, ids, weights, plan.device)
            step(plan)  # the compute is issued: prefetch while it runs, then release
            return out
        # Experts on the host, or more distinct experts than slots: each route is computed once, where its expert
        # is (a chunk of slots or the host), in a call of one route per row with weight 1 (its expert's output,
        # exact in the model dtype); the routing weight is applied here and the routes are summed as the model's
        # experts implementation does (`compute.accumulate`), so the output has the unwrapped model's bits.
        T = hidden.shape[0]
        ids = ids.reshape(T, -1)  # [T, k]
        k = ids.shape[1]
        flat_ids, ones = ids.reshape(T * k, 1), torch.ones_like(weights.reshape(T * k, 1))  # [T*k, 1]
        out = hidden.new_zeros(T * k, hidden.shape[-1])  # [T*k, H] each route's expert output (unweighted)

        def rows(experts):  # the routes to `experts`, as device indices (from the host copy: no sync)
            wanted = set(experts)
            return to_device([i for i, e in enumerate(self._routes) if e in wanted], self.device)

        job = None  # the host starts at once on its worker; its routes join the device's at the end
        if plan.host:
            on_host = rows(plan.host)
            job = self.host.submit(layer, hidden[on_host // k], flat_ids[on_host], ones[on_host], plan.host)
        while step(plan):
            if plan.chunk:
                r = rows(plan.chunk)
                a, kw = layer.layout.replace_call(args, kwargs, layer.experts, flat_ids[r], ones[r],
                                                  hidden=hidden[r // k])
                out[r] = compute(layer, a, kw, flat_ids[r], ones[r], plan.chunk).to(out.dtype)
        if job is not None:
            out[on_host] = job.result().to(self.device, out.dtype, non_blocking=True)  # [R, H]
        values = out.view(T, k, -1) * weights.reshape(T, k, 1)  # [T, k, H] as the model weights its routes
        return accumulate(layer.experts, values, ids, hidden.dtype)

    def modulelist_forward(self, layer: MoELayer, args: tuple, kwargs: dict) -> torch.Tensor:
        """One call of the model's own forward; the per-expert hooks bind each expert to its slot, taking the
        scheduler's next chunk when an expert is not in the current one."""
        experts, layout = layer.experts, layer.layout
        hidden, ids, _ = layout.routing(experts, args, kwargs, self.geometry.top_k)
        plan = self.route(layer.index, hidden, ids)
        # experts on the host run one by one inside the family's loop, as the others (hooks below)
        call = self._call = ListCall(self.scheduler, plan)
        call.next_chunk()
        out = type(experts).forward(experts, *args, **kwargs)
        while self.scheduler.step(plan):  # release the last chunk (and prefetch, after chunks)
            pass
        self._call = ListCall()
        return out

    def expert_hooks(self, layer: MoELayer, e: int):
        """(forward pre-hook, forward hook) of expert e of a ModuleList layer: bind it to its slot (or to its host
        tensors), and after a lone fetch release the slot / bring a host output back."""
        def pre(module, args):
            call = self._call
            if e in call.on_host:  # computed from the host store: its input crosses to the host
                self.host.bind_expert(layer, module, e)
                module._specmoe_on_host = True
                return tuple(a.cpu() if isinstance(a, torch.Tensor) else a for a in args)
            slot = call.slots.get(e)
            while slot is None and e in call.routed and call.next_chunk():  # in a later chunk
                slot = call.slots.get(e)
            if slot is None:  # not announced by the routing (or visited out of order): fetch it alone
                (slot,) = self.scheduler.acquire(layer.index, [e])
                module._specmoe_lazy_slot = slot
            layer.layout.bind_expert(module, *self.pool.expert_views(slot))

        def post(module, args, output):
            if module.__dict__.pop("_specmoe_on_host", False):
                return output.to(self.device) if isinstance(output, torch.Tensor) else output
            slot = module.__dict__.pop("_specmoe_lazy_slot", None)
            if slot is not None:
                self.scheduler.release([slot])

        return pre, post
