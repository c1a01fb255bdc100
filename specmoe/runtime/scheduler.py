"""The hot-path decisions of expert offloading, in one place for the runtime and the simulator.

Per MoE layer call, once the router has chosen and the predictor has ranked its candidates, ONE call makes the
plan and an executor carries it out (the runtime's hot path with streams and kernels, the simulator's replay with
its clock; neither holds a sequence of scheduler calls of its own):

    plan = scheduler.plan(pass_index, layer, routed, candidates, tokens)   # -> LayerPlan
    submit plan.host to the host                                             # misses computed on the host
    while scheduler.step(plan):                                              # acquire the next device chunk
        compute plan.chunk on plan.slots                                     # issue it; the next step releases

`plan` queues the candidates that are not resident (best first), lets the eviction policy observe the routing and
the prediction (`observe`, `observe_time`), and decides where each routed expert that is not resident runs
(`misses`: "fetch" copies it, "host" computes it on the host from the store, "auto" asks `misses.split_misses`
with `miss_costs` and the copy engine's backlog). `step` acquires the device experts (resident or in flight:
hits; the rest fetched on demand, ahead of any queued prefetch); once their compute is issued, the next `step`
pumps the queued prefetches within the in-flight bound while that compute runs, then releases the slots. A
layer that needs more distinct experts than there are slots lets its prefetches land and runs chunks of at most
S experts each, prefetching after the last.

A prefetch never evicts a slot that is in use, in flight or predicted; a demand fetch may wait for copies in
flight when nothing else can go. The scheduler owns the counters (per MoE layer: hits, misses, prefetches
issued/used/wasted, bytes moved) and drives the copies through a small engine protocol (`SlotEngine`): the
runtime's copy engines (`transfer.StoreToPool`: CUDA streams, a thread, or synchronous copies) or the
simulator's clock (`specmoe.sim.engine.ClockEngine`), so a simulated figure comes from the runtime's decisions.
"""

# Shape legend: L MoE layers, E experts, S slots

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from .admission import PrefetchAdmission
from .cache import ExpertCache
from .misses import MissCosts, check_misses, split_misses
from .stats import LayerStats

Key = tuple[int, int]  # (layer, expert)
_NOTHING: frozenset = frozenset()  # what the policy observes as predicted when nothing is


@dataclass(eq=False, slots=True)
class LayerPlan:
    """What one MoE layer call does (`Scheduler.plan`), carried out by an executor driving `Scheduler.step`:
    the runtime's hot path (streams and kernels) or the simulator's replay (its clock).

    Attributes:
        layer: the MoE layer.
        device: routed experts the device computes, ascending (in chunks of at most S when there are more).
        host: routed experts the host computes (misses="host"/"auto"), ascending.
        chunk, slots: the device step now acquired: its experts and their slots (None before the first step).
        single: all of `device` fits in the slots at once (one step).
    """

    layer: int
    device: list[int]
    host: Sequence[int]
    chunk: list[int] | None = None
    slots: list[int] | None = None
    single: bool = True
    next: int = 0
    done: bool = False


class SlotEngine(Protocol):
    """What the scheduler asks of copies into cache slots."""

    def ready(self, slot: int) -> bool:
        """Whether the last copy into `slot` has landed (without waiting)."""

    def copy_in(self, slot: int, key: Key, demand: bool) -> None:
        """Start copying expert `key` into `slot` (after the compute that last read it)."""

    def wait(self, slots: list[int]) -> None:
        """Compute about to read `slots` waits for their copies (the host need not)."""

    def wait_host(self, slot: int) -> None:
        """The host waits until the copy into `slot` has landed."""

    def release(self, slots: list[int]) -> None:
        """The compute issued so far is the last to read `slots`."""


class Scheduler:
    """Acquire, evict, prefetch and chunk for one slot cache (see the module docstring).

    Args:
        cache: the slot cache and its eviction policy (which the cache `bind`s, where it has that method); the
            policy's optional `observe(layer, predicted, routed)` and `observe_time(t)` are called at each
            `plan` (t = pass_index * L + layer, the pass index its caller hands on: the runtime's pass-start hook,
            the simulator's stream; `routed` is read-only).
        engine: the copies (`SlotEngine`).
        num_layers: L.
        max_inflight: bound on prefetch copies in flight.
        copy_bytes: bytes one copy moves (counted in `bytes_moved`).

    Attributes:
        predicting: whether the executor has a predictor (the runtime's `HotPath.predictor`, the simulator's
            candidates). Prefetch admission calibrates only while it has something to admit: a predictor's
            candidates, or (misses="auto") experts computed on the host queued for copying.
    """

    def __init__(self, cache: ExpertCache, engine: SlotEngine, num_layers: int, max_inflight: int, copy_bytes: int,
                 misses: str = "fetch", miss_costs: MissCosts | None = None):
        if max_inflight < 1:
            raise ValueError(f"max_inflight must be >= 1, got {max_inflight}")
        self.cache = cache
        self.engine = engine
        self.num_slots = cache.num_slots
        self.num_layers = num_layers
        self.max_inflight = max_inflight
        self.copy_bytes = copy_bytes
        self.misses = check_misses(misses)  # where routed experts that are not resident run (see `split`)
        self.admission: PrefetchAdmission | None = None  # made with costs that know the layer period
        self._adm: PrefetchAdmission | None = None  # the admission while it has something to admit, else None
        self._predicting = False
        self.miss_costs = miss_costs
        self._layer = 0  # the layer of the current call
        self._call_fetched = 0  # experts the current call fetched on demand
        self._candidates: Sequence[Key] = ()  # the current call's prediction, best first (a key's rank: its index)
        self._keys = [[(layer, e) for e in range(cache.num_experts)] for layer in range(num_layers)]  # made once
        policy = cache.policy  # bound to the cache by the cache (`bind`)
        self._observe = getattr(policy, "observe", None)
        self._observe_time = getattr(policy, "observe_time", None)
        self._read_ahead = getattr(engine, "read_ahead", None)  # only engines over a file-backed store
        self._backlog = getattr(engine, "backlog_s", None)  # only engines that know their queued copy time
        # The containers below are cleared in place, never rebound: the closures see them.
        self._queue: list[Key] = []  # prefetch candidates, best LAST (popped from the end)
        self._predicted: set[Key] = set()  # what the latest prediction wants kept
        self._inflight: set[int] = set()  # slots with a prefetch copy that may not have landed
        self._prefetched: dict[int, Key] = {}  # slot -> key, prefetched and not yet used
        self._reused: set[int] = set()  # of those, copies of experts the host computed (`_split`)
        self._reuse_keys: set[Key] = set()  # experts the current call's host computes, queued for copying
        self._in_use: set[int] = set()  # slots the layer being computed reads
        self._copying: set[int] = set()  # slots whose copy may not have landed (others have: no need to ask)
        self._bind_filters()
        self.reset()
        self.reset_stats()

    def _bind_filters(self) -> None:
        """The victim filters: closures over the containers above (rebuilt in a `copy.deepcopy`, whose closures
        would otherwise read the original's containers)."""
        in_use, copying, predicted, key_of = self._in_use, self._copying, self._predicted, self.cache.key_of
        ready = self.engine.ready

        def evictable(slot: int) -> bool:  # for a demand fetch: not in use, its copy landed
            if slot in in_use:
                return False
            if slot in copying:
                if not ready(slot):
                    return False
                copying.discard(slot)
            return True

        def evictable_for_guess(slot: int) -> bool:  # for a prefetch: never a predicted expert either
            return key_of[slot] not in predicted and evictable(slot)

        self._evictable, self._evictable_for_guess = evictable, evictable_for_guess

    def __deepcopy__(self, memo):
        import copy

        new = object.__new__(type(self))
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            if name not in ("_evictable", "_evictable_for_guess"):
                new.__dict__[name] = copy.deepcopy(value, memo)
        new._bind_filters()
        return new

    @property
    def miss_costs(self):
        return self._miss_costs

    @miss_costs.setter
    def miss_costs(self, costs) -> None:
        """Costs of a miss each way; with a positive `layer_s` (seconds between MoE layer calls) they also make
        prefetches pass admission (`admission.PrefetchAdmission`)."""
        self._miss_costs = costs
        layer_s, copy_s = getattr(costs, "layer_s", 0.0) or 0.0, getattr(costs, "copy_s", 0.0) or 0.0
        host_s = costs.host_seconds(1) if self.misses != "fetch" and layer_s > 0 else None
        self.admission = (PrefetchAdmission(self.num_layers, copy_s, layer_s, late_ok=self.misses == "fetch",
                                            host_s=host_s, host_call_s=getattr(costs, "host_call_s", 0.0),
                                            predict_s=getattr(costs, "predict_s", 0.0),
                                            copies_fill=self.misses == "host")
                          if layer_s > 0 and copy_s > 0 else None)
        self._adm = self.admission if self._predicting or self.misses == "auto" else None

    @property
    def predicting(self) -> bool:
        return self._predicting

    @predicting.setter
    def predicting(self, value: bool) -> None:
        self._predicting = bool(value)
        self._adm = self.admission if self._predicting or self.misses == "auto" else None

    def reset(self) -> None:
        """Forget the queue and prefetch bookkeeping (a new generate call); the cache stays warm."""
        for container in (self._queue, self._predicted, self._inflight, self._prefetched, self._reused,
                          self._reuse_keys, self._in_use):
            container.clear()
        self._guessing = False  # the current call came with prefetch candidates
        self._ran, self._call_predicted = None, False  # `wants_prediction`'s answer; the predictor ran this call
        self._candidates = ()
        if self.admission is not None:
            self.admission.reset()

    def reset_stats(self) -> None:
        self.stats = [LayerStats() for _ in range(self.num_layers)]
        self.layer_calls = 0
        self.chunked_calls = 0  # layer calls that needed more distinct experts than there are slots

    def totals(self) -> LayerStats:
        out = LayerStats()
        for s in self.stats:
            out.add(s)
        return out

    # ---- one MoE layer call ----------------------------------------------------------------------------------
    def plan(self, pass_index: int, layer: int, routed: list[int], candidates: Sequence[Key] = (),
             tokens: Mapping[int, int] | None = None) -> LayerPlan:
        """The plan of one MoE layer call: layer `layer` of forward pass `pass_index` (counted by the caller, never
        going back: the policy's clock only rises) was routed to `routed` (distinct, ascending); `candidates` are
        the prediction's keys, best first; `tokens` maps a routed expert to the tokens routed to it (needed only
        where misses may run on the host). Queues the candidates, lets the policy observe the call, and decides
        where each routed expert runs (`LayerPlan.device` / `.host`); the executor then drives `step`."""
        self.layer_calls += 1
        self._guessing = guessing = True if candidates else False
        ran = self._ran  # `wants_prediction`'s answer for this call (None: not asked)
        if ran is None:
            self._call_predicted = guessing
        else:
            self._ran = None
            if ran:
                self.stats[layer].predict_calls += 1
            else:
                self.stats[layer].predict_skipped += 1
            self._call_predicted = ran
        self._layer = layer
        self._call_fetched = 0
        self._call_wanted = None  # misses an idle link would have fetched, where copies were queued (`_split`)
        if self._reuse_keys:
            self._reuse_keys.clear()
        adm = self._adm
        if adm is not None:
            adm.routed(layer, routed)
            if candidates:
                adm.watch(candidates)
                if ran and adm.dry:  # calibrating, or a probe of a predictor switched off: sampled, not copied
                    slot_of = self.cache.slot_of
                    adm.dry_run(layer, [(r, k) for r, k in enumerate(candidates) if k not in slot_of],
                                self._link_backlog(), self.max_inflight - len(self._inflight))
                    candidates = ()
                    self._guessing = False
        self._candidates = candidates
        predicted, queue = self._predicted, self._queue
        if predicted:
            predicted.clear()
        if candidates:
            predicted.update(candidates)
            slot_of = self.cache.slot_of
            queue[:] = [key for key in reversed(candidates) if key not in slot_of]
        elif queue:
            queue.clear()
        if self._observe is not None:  # a snapshot: the scheduler's own set changes at the next call
            self._observe(layer, frozenset(predicted) if predicted else _NOTHING, routed)
        if self._observe_time is not None:
            self._observe_time(pass_index * self.num_layers + layer)
        if self.misses == "fetch" or not routed:
            return LayerPlan(layer, routed, ())
        device, host = self._split(layer, routed, tokens or {})
        return LayerPlan(layer, device, host)

    def wants_prediction(self) -> bool:
        """Whether to run the predictor at the call about to be planned (with admission: the governor's answer)."""
        adm = self._adm  # (misses="host": nothing but prefetches fills the cache, so it is never waited for)
        full = self.misses == "host" or len(self.cache.slot_of) >= self.num_slots
        self._ran = ran = adm is None or adm.worth_predicting(full)
        return ran

    def step(self, plan: LayerPlan) -> bool:
        """Advance `plan` by one device step. The first call acquires the first chunk (all of `plan.device` when
        it fits in the slots; else the prefetches in flight land and chunks of at most S experts follow):
        `plan.chunk` and `plan.slots` say what to compute on, and True is returned. Each later call means the
        compute on `plan.slots` has been issued: it releases them and acquires the next chunk (True), or, after
        the last, issues the queued prefetches (while that compute runs) and returns False."""
        if plan.done:
            return False
        device = plan.device
        if plan.slots is None:  # the first step
            if len(device) <= self.num_slots:  # all at once (the common case)
                plan.next = len(device) or 1
                plan.chunk, plan.slots = device, self.acquire(plan.layer, device)
                return True
            plan.single = False
            self.chunked_calls += 1
            self.land_prefetches()
        elif plan.next >= len(device):  # the last chunk's compute is issued
            plan.done = True
            if self._adm is not None:
                wanted = self._call_wanted
                self._adm.call_done(self._call_fetched, len(plan.host),
                                    None if wanted is None else max(wanted, self._call_fetched), self._call_predicted)
            if plan.single:
                if self._queue:
                    self.pump()  # the slots just computed on are still in use: no prefetch evicts them
                self.engine.release(plan.slots)  # release(), inlined
                self._in_use.difference_update(plan.slots)
            else:
                self.release(plan.slots)
                self.pump()
            return False
        else:
            self.release(plan.slots)
        S = self.num_slots
        chunk = device[plan.next : plan.next + S]
        plan.next += len(chunk) if chunk else 1
        plan.chunk, plan.slots = chunk, self.acquire(plan.layer, chunk)
        return True

    def _split(self, layer: int, routed: list[int], tokens: Mapping[int, int]) -> tuple[list[int], list[int]]:
        """(experts the device computes, experts the host computes) of `routed`. Only experts that are neither
        resident nor in flight can go to the host; those count as misses (and `host_computed`) here, the rest are
        acquired by `step`. With "auto" the experts the host computes are also queued for copying (as prefetches,
        behind the prediction's candidates: never evicting a busy slot), so they are resident the next time;
        admission (`PrefetchAdmission.admit`, REUSE) weighs each against its victim and the link's load. Without
        admission they are queued only at calls without a prediction (the link is left to the prediction)."""
        slot_of = self.cache.slot_of
        missing = [e for e in routed if (layer, e) not in slot_of]
        if not missing:
            return routed, []
        backlog = self._backlog() if self._backlog is not None else 0.0
        _, host = split_misses(missing, tokens, self.misses, self.miss_costs, copy_backlog_s=backlog)
        if backlog > 0 and self._adm is not None:  # what an idle link would have fetched (its load)
            self._call_wanted = len(missing) - len(split_misses(missing, tokens, self.misses, self.miss_costs)[1])
        if not host:
            return routed, []
        stats = self.stats[layer]
        stats.misses += len(host)
        stats.host_computed += len(host)
        if self.misses == "auto" and (not self._guessing or self._adm is not None):
            queued = [(layer, e) for e in reversed(host)]
            self._queue[:0] = queued  # behind the candidates: popped last
            self._reuse_keys.update(queued)
            if self._adm is not None:
                self._adm.watch((), queued)
        on_host = set(host)
        return [e for e in routed if e not in on_host], host

    # ---- the steps --------------------------------------------------------------------------------------------
    def acquire(self, layer: int, experts: list[int]) -> list[int]:
        """Make `experts` of `layer` resident and in use; compute waits for their copies. Returns their slots."""
        engine = self.engine
        slot_of, touch, ready = self.cache.slot_of, self.cache.policy.touch, engine.ready
        in_use, prefetched, copying, keys = self._in_use, self._prefetched, self._copying, self._keys[layer]
        inflight = self._inflight
        slots = []
        hits = in_flight = used = reused = misses = late_used = 0
        for e in experts:
            slot = slot_of.get(keys[e])
            if slot is None:
                if not misses:  # no routed expert of this step may be evicted by another of it
                    in_use.update(map(slot_of.get, map(keys.__getitem__, experts)))
                    in_use.discard(None)
                misses += 1
                slot = self._take_slot(keys[e], True)
                in_use.add(slot)  # nor one fetched for it already
            else:
                hits += 1
                late = False
                if slot in copying:
                    if ready(slot):
                        copying.discard(slot)
                        inflight.discard(slot)
                    else:
                        late = True
                        in_flight += 1
                if prefetched and slot in prefetched:
                    del prefetched[slot]
                    used += 1
                    late_used += late and slot not in self._reused  # the predictor's copy, still in flight
                    if slot in self._reused:
                        self._reused.discard(slot)
                        reused += 1
                touch(slot)
            slots.append(slot)
        in_use.update(slots)
        stats = self.stats[layer]
        if hits:
            stats.hits += hits
            if in_flight:
                stats.hits_in_flight += in_flight
            if used:
                stats.prefetch_used += used
                stats.reuse_used += reused
                if used > reused and self._adm is not None:  # the predictor's copies paid: the governor's credit
                    self._adm.copies_used(used - reused, late_used)
            if self.misses == "host" and hits > used and self._adm is not None:  # and pay again while resident
                self._adm.copies_kept(hits - used)
        if misses:
            self._call_fetched += misses
            stats.misses += misses
            stats.bytes_moved += misses * self.copy_bytes
        engine.wait(slots)
        return slots

    def release(self, slots: list[int]) -> None:
        self.engine.release(slots)
        self._in_use.difference_update(slots)

    def pump(self) -> None:
        """Issue queued prefetches, best first, while fewer than the bound are in flight. With misses="auto" and
        an engine that knows its backlog, not while the link is busy for longer than the host takes to compute
        an expert: a copy issued then would land after the host could have computed it."""
        queue, inflight, slot_of, bound = self._queue, self._inflight, self.cache.slot_of, self.max_inflight
        adm = self._adm
        backlog = self._backlog if self.misses == "auto" and adm is None else None
        if adm is not None:
            link_s, n, layer = self._link_backlog(), 0, self._layer
            predicted, rank_of, reuse = self._predicted, self._candidates.index, adm.REUSE
        while queue:
            if backlog is not None and backlog() > self.miss_costs.host_seconds(1):
                break
            if len(inflight) >= bound:
                ready, copying = self.engine.ready, self._copying
                for s in [s for s in inflight if ready(s)]:
                    inflight.discard(s)
                    copying.discard(s)
                if len(inflight) >= bound:
                    break
            key = queue.pop()
            if key in slot_of:
                continue
            if adm is not None:
                is_reuse = key in self._reuse_keys
                if not adm.admit(layer, key, reuse if is_reuse or key not in predicted else rank_of(key), n, link_s,
                                 self._victim):
                    stats = self.stats[key[0]]
                    stats.prefetch_refused += 1
                    if is_reuse:
                        stats.reuse_refused += 1
                    continue
                n += 1
            slot = self._take_slot(key, False)
            if slot is None:  # nothing may be evicted for a guess
                queue.clear()
                break
            inflight.add(slot)
            self._prefetched[slot] = key
            stats = self.stats[key[0]]
            stats.prefetch_issued += 1
            stats.bytes_moved += self.copy_bytes
            if key in self._reuse_keys:  # an expert `_split` sent to the host
                stats.reuse_issued += 1
                self._reused.add(slot)
        if self._read_ahead is not None:  # a file-backed store reads the waiting candidates from disk meanwhile
            self._read_ahead(queue[::-1])

    def _victim(self):
        """What a prefetch issued now would evict: None (a free slot), the policy's victim's key, or False."""
        cache = self.cache
        if len(cache.slot_of) < self.num_slots:
            return None
        slot = cache.policy.victim(self._evictable_for_guess)
        return False if slot is None else cache.key_of[slot]

    def _link_backlog(self) -> float:
        """Seconds of copies queued on the link: the engine's own figure where it keeps one (the simulator's
        clock), else the copies not landed times one copy's measured time."""
        if self._backlog is not None:
            return self._backlog()
        ready = self.engine.ready
        return sum(1 for s in self._copying if not ready(s)) * self._adm.copy_s

    def land_prefetches(self) -> None:
        """The host waits for every prefetch in flight (before a chunked layer needs every slot)."""
        for s in self._inflight:
            self.engine.wait_host(s)
        self._inflight.clear()

    # ---- slots ------------------------------------------------------------------------------------------------
    def _take_slot(self, key: Key, demand: bool) -> int | None:
        """Give `key` a slot and start its copy. A demand fetch may wait for copies in flight; a prefetch never
        does, and never evicts a predicted expert (None: no slot for it)."""
        cache = self.cache
        got = cache.assign(key, self._evictable if demand else self._evictable_for_guess)
        if got is None:
            if not demand:
                return None
            engine = self.engine
            for s in list(self._copying):  # every other slot is in use or in flight: let those copies land
                if s not in self._in_use and not engine.ready(s):
                    engine.wait_host(s)
            got = cache.assign(key, self._evictable)
            if got is None:
                raise RuntimeError(f"no cache slot for expert {key}: all {self.num_slots} slots are in use")
        slot, evicted = got
        adm = self._adm
        if adm is not None and evicted is not None:  # the policy's victims: how often needed again
            adm.evicted(evicted, not demand and key not in self._reuse_keys)
        wasted = self._prefetched.pop(slot, None) if self._prefetched else None
        if wasted is not None:
            if slot in self._reused:
                self._reused.discard(slot)
            elif adm is not None:  # a predicted copy never used: the governor's debit
                adm.copy_wasted()
            self.stats[wasted[0]].prefetch_wasted += 1
        self.engine.copy_in(slot, key, demand)
        self._copying.add(slot)
        return slot
