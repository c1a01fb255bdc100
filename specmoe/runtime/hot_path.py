"""The hot path of one MoE layer call, over explicit state: route, then compute on what the scheduler yields.

`HotPath` is what the installed `hooks.ExpertsHook`s call. Per MoE layer call (the router has just chosen):

- `start_pass`: the wrapper's pass-start hook (`hooks.PassMarker`) hands on the index of each forward pass;
- `route`: record the routing, run the predictor, and with ONE device->host sync learn the routed experts and
  the predictor's ranked candidates; hand both to the scheduler (`Scheduler.begin`);
- `fused_forward` (experts stored as stacked tensors): compute on the slots the scheduler yields, with the
  chosen compute strategy (`compute.py`), summing partial outputs over chunks and host-computed experts;
- `modulelist_forward` (one module per expert): the model's own loop runs; `expert_hooks` bind each expert to
  its slot (or its host tensors) as the loop reaches it.

Every decision (what to fetch, evict, prefetch, chunk, or compute on the host) is the scheduler's.
"""

# Shape legend: T tokens, E experts, H hidden, k top-k, L MoE layers, n target layers, m prefetch width

from __future__ import annotations

from collections import Counter

import torch

from ..predictors.base import rank_by_votes, top_candidates
from .adapters import MoELayer
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
        self.predictor = None
        self.host_syncs = 0
        self.pass_index = 0  # the forward pass running, as the wrapper's pass-start hook counts them
        self.reset()

    def start_pass(self, index: int) -> None:
        """Forward pass `index` starts (the wrapper's one pass-start signal, `hooks.PassMarker`)."""
        self.pass_index = index
        self._history = None

    def reset(self) -> None:
        """Forget the current pass (a new generate call)."""
        self._history: torch.Tensor | None = None  # [T, L, k] ids routed in the current pass
        self._call = ListCall()  # the ModuleList layer call running (none: empty)

    def route(self, layer: int, hidden: torch.Tensor, ids: torch.Tensor) -> LayerPlan:
        """Record routing, run the predictor, and with one host sync learn the routed and predicted experts;
        returns the scheduler's plan of this call (`Scheduler.plan`)."""
        geo = self.geometry
        L = geo.num_layers
        T = hidden.shape[0]
        ids = ids.reshape(T, -1)  # [T, k]
        predictor = self.predictor
        if predictor is not None:
            if self._history is None or self._history.shape[0] != T:  # a pass started (or an inner module ran alone)
                self._history = torch.full((T, L, geo.top_k), -1, dtype=torch.long, device=ids.device)
            self._history[:, layer] = ids
            if not self.scheduler.wants_prediction():  # admission says its guesses would not be copied
                predictor = None
        if predictor is None:
            host = ids.flatten().tolist()  # the one device->host sync of this layer
            self.host_syncs += 1
            needed = sorted(set(host))
            if needed and needed[0] < 0:  # -1: a route to no expert
                needed = needed[1:]
            sched = self.scheduler
            return sched.plan(self.pass_index, layer, needed, (), Counter(host) if sched.misses != "fetch" else None)
        ids = ids.long()
        targets: list[int] = []
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
        needed = sorted(set(host[:n]) - {-1})
        candidates = []
        if targets:
            m = (len(host) - n) // (len(targets) * T)
            for i, t in enumerate(targets):
                candidates.extend((t % L, e) for e in rank_by_votes(host[n + i * T * m : n + (i + 1) * T * m], m))
        sched = self.scheduler
        return sched.plan(self.pass_index, layer, needed, candidates,
                          Counter(host[:n]) if sched.misses != "fetch" else None)  # expert -> tokens routed to it

    def fused_forward(self, layer: MoELayer, args: tuple, kwargs: dict) -> torch.Tensor:
        hidden, ids, weights = layer.layout.routing(layer.experts, args, kwargs, self.geometry.top_k)
        plan = self.route(layer.index, hidden, ids)
        compute, step = self.experts_compute.compute, self.scheduler.step
        if not plan.host and len(plan.device) <= self.num_slots:
            step(plan)  # acquire
            out = compute(layer, args, kwargs, ids, weights, plan.device, partial=False)
            step(plan)  # the compute is issued: prefetch while it runs, then release
            return out
        # Experts on the host, or more distinct experts than slots: sum partial outputs, masking the rest.
        job = self.host.submit(layer, hidden, ids.reshape(hidden.shape[0], -1), weights, plan.host) \
            if plan.host else None
        total = None  # the host starts at once on its worker; its output joins the device's at the end
        while step(plan):
            if plan.chunk:
                part = compute(layer, args, kwargs, ids, weights, plan.chunk, partial=True).float()
                total = part if total is None else total + part
        if job is not None:
            out = job.result().to(self.device, non_blocking=True)  # [T, H] float32
            total = out if total is None else total + out
        return total.to(hidden.dtype)

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
