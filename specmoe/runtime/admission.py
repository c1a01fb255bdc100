"""Prefetch admission: a predicted expert is copied only when the copy is expected to pay for itself.

A prefetch of an expert that the predictor ranks r-th, for a layer d layer calls ahead, is worth its copy when

    p_r x (the stall it avoids)  >=  (what it costs the link) + (what it costs the slot it evicts)

- p_r, the probability that a candidate of rank r is routed at its target, is calibrated online from the
  routing itself: every candidate (admitted or not) is checked at its target layer's next call;
- the link is idle before its use for `d * period - backlog - d * demand - n * copy_s` (d layer calls ahead,
  `period` and `demand` the moving averages of a call's length and of its demand copies' link time, n copies
  admitted before it in this pump). A copy that fits there costs no link time, only the slot it evicts: the
  chance q that the policy's victim is routed at its layer's next visit (counted online); it is admitted when
  p_r >= q. One that does not fit takes link time from demand copies: with misses="fetch" it is admitted when
  it is used more often than not (p_r >= 1/2: a used copy saves a demand copy, a wasted one costs one), and
  only while the copies admitted in this pump fit in the device compute of the d calls before its use (the link
  idles there; past it a copy only moves link time ahead of the demand copies queued behind it), unless it is all
  but sure (p_r >= SURE); with "auto"/"host" when it lands before the host would have computed the expert
  (`backlog + (n + 1) copy_s <= d * period + host_call_s + host_s`: its use waits for it less than for the host,
  and it stays resident after) and p_r >= (1 + q) / 2 + MARGIN;
- experts computed on the host with misses="auto" are queued for copying too, behind the candidates (REUSE
  copies: resident at their layer's next visit). One lands long before that visit, so what it costs is the
  slot and the link: it is admitted when p >= q_v + rho, all three in units of one miss. p is the calibrated
  chance that such an expert is routed at its layer's next visit; q_v that of the victim the policy would
  evict for it (0 for a free slot), from the victim's recency (`ReuseByRecency`: the hazard of its gap, counted
  online); rho the link's load, the share of a call's period that demand copies would take on an idle link
  (counted as if no copy were queued, so it does not fall as copies push misses to the host) plus the
  predicted copies admitted: a copy holding the link delays the copies due meanwhile (a delayed demand copy is
  computed on the host instead, or waited for). Where demand copies keep the link busy (DeepSeek-V2-Lite's
  small experts at capacity 0.1: rho about 0.8, p about 0.2) they are refused: admitted, they pushed the
  demand copies onto the host, which became the bottleneck. Where the link idles beside the host (Mixtral int4
  at max fit: rho below 0.1, p about 0.3) they are admitted, and the cache learns what the host computed.

The predictor itself is governed (`worth_predicting`): it is judged dry before any of its copies goes. While a
cache slot is free it does not run; then it runs dry at every call while it calibrates (CALIBRATE candidates,
WARM calls): its candidates are checked and what their copies would have been credited is counted (`dry_run`),
nothing is copied and the policy is not told of them, so the cache goes exactly as without a predictor. It goes
live once some rank could pass and what its copies save per predicted call (`gain`) is ENTER x its own host time
(`predict_s`), and stays live while that pays for the host time; otherwise it runs dry at probe calls only, at
most PROBE_SHARE of decode's time (PAID_SHARE once it has paid live: a lull may end). What copies save is
counted as it happens: a predicted copy that is used saves a demand copy (`copy_s`, with `auto` too: an expert
the host computed is not resident after, so its next visits miss again; one still in flight a layer's device
time at most), one evicted unused cost the link time it took (x the link's load), and a victim evicted for it
that its layer's next visit routes costs a miss times the share of predicted copies wasted (a used copy stood in
for a demand copy, which would have evicted too); `gain` is the moving average of that net saving per predicted
call, every predicted call counted (one with nothing to copy saves nothing). With misses="host" only predicted
copies fill the cache: a hit on one after its first use saves the host's compute again (`copies_kept`), and the
predictor calibrates live (`admit` refuses what its calibration does not back yet; dry, every miss would stay on
the host). So a predictor that never earns a live call costs decode its host time at the calibration and probe
calls only (`benchmarks/governor_floor.py` prices that). Costs (`copy_s`, `layer_s`: seconds between consecutive
MoE layer calls, `host_s`, `host_call_s`, `predict_s`) come from the cost object the scheduler is given
(`misses.MissCosts`-like; the simulator's `sim.clock.HostMissCosts` carries them all); without a positive `layer_s`
there is no admission: every candidate is prefetched, as before.
"""

# Shape legend: L MoE layers, R calibrated ranks

from __future__ import annotations

Key = tuple[int, int]  # (layer, expert)


class ReuseByRecency:
    """The chance that an expert is routed at its layer's next visit given its recency r (visits of its layer since
    it was last routed there: 0 = at the latest), counted online from the routing itself: the hazard of the gap
    between two visits that route it, P(gap = r + 1 | gap > r), from a histogram of gaps (capped at G), with one
    pseudo-count of the prior 1 / (r + 2) (the longer unused, the less likely next; never routed: r = G - 2)."""

    G = 64

    def __init__(self) -> None:
        self.visits: dict[int, int] = {}  # layer -> visits so far
        self.last: dict[int, dict[int, int]] = {}  # layer -> expert -> the visit that last routed it
        self.gaps = [0] * (self.G + 1)  # [G + 1] gaps seen (index G: G or more)
        self._tail: list[int] | None = None  # [G + 2] suffix sums of gaps (made again after REFRESH visits)
        self._stale = 0

    REFRESH = 256

    def routed(self, layer: int, routed) -> None:
        v = self.visits[layer] = self.visits.get(layer, 0) + 1
        last, gaps, G = self.last.setdefault(layer, {}), self.gaps, self.G
        for e in routed:
            u = last.get(e)
            if u is not None:
                gaps[min(v - u, G)] += 1
            last[e] = v
        self._stale += 1

    def p(self, key: Key) -> float:
        """P(`key` is routed at its layer's next visit), from its recency (never routed: the longest)."""
        layer, e = key
        u = self.last.get(layer, {}).get(e)
        r = self.G - 2 if u is None else min(self.visits[layer] - u, self.G - 2)  # index G lumps the longest gaps
        if self._tail is None or self._stale >= self.REFRESH:
            tail, acc = [0] * (self.G + 2), 0
            for g in range(self.G, -1, -1):
                acc += self.gaps[g]
                tail[g] = acc
            self._tail, self._stale = tail, 0
        return (self.gaps[r + 1] + 1 / (r + 2)) / (self._tail[r + 1] + 1)  # prior: a hazard of 1 / (r + 2)


class PrefetchAdmission:
    """Online calibration and the admission rule (see the module docstring).

    Args:
        num_layers: L.
        copy_s / layer_s: one expert's copy; one MoE layer call to the next.
        late_ok: whether a copy that lands after its use may be admitted (misses="fetch").
        ranks: ranks calibrated apart (later ranks share the last).
        copies_fill: only predicted copies fill the cache (misses="host"; see `copies_kept`).
    """

    REUSE = -1  # the "rank" of an expert computed on the host, queued to be resident at its layer's next visit

    def __init__(self, num_layers: int, copy_s: float, layer_s: float, late_ok: bool, ranks: int = 16,
                 host_s: float | None = None, host_call_s: float = 0.0, predict_s: float = 0.0,
                 smoothing: float = 0.05, copies_fill: bool = False):
        self.copies_fill = copies_fill  # only predicted copies fill the cache (misses="host"): none is left dry
        self.L, self.copy_s, self.layer_s, self.late_ok, self.R = num_layers, copy_s, layer_s, late_ok, ranks
        self.host_s, self.host_call_s, self.predict_s, self.smoothing = host_s, host_call_s, predict_s, smoothing
        # what a used prefetch saves: a demand copy, or (misses="auto") the host's compute of the expert
        self.saving = copy_s if late_ok or host_s is None else min(copy_s, host_s)
        self.host_done = 0.0 if host_s is None else host_call_s + host_s  # one expert's host compute, from its call
        self.gain = predict_s  # net seconds saved per predicted call, as seen (moving average; starts at break-even)
        self._credit = 0.0  # seconds saved (less those lost) by predicted copies since the last predicted call
        self._dry_credit = 0.0  # ... by the copies dry calls would have made (`dry_run`)
        self._live = False  # a call since the last sample copied (not dry): `_credit` is its sample's
        self._samples = 0  # predicted calls settled into `gain`
        self._paid = False  # it has been live (its probes then come at PAID_SHARE)
        self._on = False  # the predictor is live (it goes live at ENTER x its cost, off below 1 x)
        self.dry = False  # the call `worth_predicting` just allowed is a probe that copies nothing (`dry_run`)
        self._checked = 0  # candidates checked at their target (calibration samples, REUSE included)
        self.used = [0] * (ranks + 1)  # [R + 1] candidates routed at their target (index R: REUSE)
        self.seen = [0] * (ranks + 1)
        self._rank_p = [-1.0] * ranks  # [R] p of each rank, kept as they settle (-1: none seen yet), for `_best`
        self.victim_reused = self.victims = 0
        self._copies_used = self._copies_wasted = 0  # predicted copies settled: routed to, evicted unused
        self.recency = None if late_ok else ReuseByRecency()  # per-victim reuse (misses="auto"/"host")
        self._watch: dict[int, list[tuple[int, int]]] = {}  # target layer -> [(expert, rank index)]
        self._dry: dict[int, list[tuple[int, float, float]]] = {}  # target layer -> [(expert, saved, wasted)]
        self._victims: dict[int, list[tuple[int, bool]]] = {}  # layer -> [(expert evicted, for a predicted copy)]
        self.period = layer_s  # seconds per MoE layer call (moving average of what the calls needed)
        self.demand = 0.0  # link seconds of demand copies per call (moving average)
        self.wanted = 0.0  # link seconds per call that demand copies would take on an idle link (misses="auto")
        self._settled = 1.0  # (1 - smoothing) ** calls done: `wanted`'s start-up bias (it starts at 0)
        self._predicted_now = 0  # predicted copies admitted since the last call_done (they load the link too)
        self.admitted = self.refused = 0
        self._wait = self.PROBE  # calls until the next probe (while the predictor is off)
        self._best = 0.5  # the highest p among the ranks seen (the prior before any)

    def call_done(self, fetched: int, on_host: int, wanted: int | None = None, predicted: bool = False) -> None:
        """A layer call fetched `fetched` experts on demand and computed `on_host` on the host: its length is at
        least the device's layer, the demand copies in a row, and the host's experts. `wanted`: how many of its
        misses an idle link would have fetched (misses="auto": some went to the host only because copies were
        queued; default `fetched`). `predicted`: the predictor ran at this call (the governor's moving average of
        what its copies saved takes a sample)."""
        if predicted:  # a running mean over the first WARM samples, a moving average after
            self._samples += 1
            # (what copies made before the predictor went off save later is no probe's: not sampled)
            sample = self._dry_credit + (self._credit if self._live else 0.0)
            self.gain += max(self.GOVERNOR_SMOOTHING, 1.0 / self._samples) * (sample - self.gain)
            self._credit = self._dry_credit = 0.0
            self._live = False
        demand = fetched * self.copy_s
        wanted = (fetched if wanted is None else wanted) + self._predicted_now
        self._predicted_now = 0
        self.wanted += self.smoothing * (wanted * self.copy_s - self.wanted)
        self._settled *= 1.0 - self.smoothing
        t = max(self.layer_s, demand)
        if on_host and self.host_s is not None:
            t = max(t, self.host_call_s + on_host * self.host_s)
        a = self.smoothing
        self.period += a * (t - self.period)
        self.demand += a * (demand - self.demand)

    def reset(self) -> None:
        """Forget what waits for its target (a new generate call); the calibration stays."""
        self._watch.clear()
        self._dry.clear()
        self._victims.clear()

    def _index(self, rank: int) -> int:
        return self.R if rank == self.REUSE else min(rank, self.R - 1)

    def routed(self, layer: int, routed: list[int]) -> None:
        """Layer `layer` was just routed to `routed`: settle the candidates and victims that waited for it."""
        if self.recency is not None:
            self.recency.routed(layer, routed)
        watched = self._watch.pop(layer, None)
        victims = self._victims.pop(layer, None)
        dry = self._dry.pop(layer, None) if self._dry else None
        if watched is None and victims is None and dry is None:
            return
        chosen = set(routed)
        if dry:  # the copies a dry run would have made: what each would have saved, or cost unused
            for e, saved, wasted in dry:
                self._dry_credit += saved if e in chosen else -wasted
        if watched:
            used, seen, rank_p, R = self.used, self.seen, self._rank_p, self.R
            self._checked += len(watched)
            for e, i in watched:
                seen[i] += 1
                if e in chosen:
                    used[i] += 1
                if i < R:
                    rank_p[i] = (used[i] + 1) / (seen[i] + 2)  # p(i)
            best = max(rank_p)
            self._best = best if best >= 0 else 0.5
        if victims:
            self.victims += len(victims)
            for e, guess in victims:
                if e in chosen:
                    self.victim_reused += 1
                    if guess:  # a predicted copy evicted an expert needed now: it costs a miss (copied again: as
                        # a used copy saves), unless that copy is used: then it stood in for a demand copy, which
                        # would have evicted as well (the share of predicted copies wasted, counted)
                        self._credit -= min(self.copy_s, self.period) * self.wasted_share()

    def watch(self, candidates, host_queued=()) -> None:
        """The candidates of this call, best first (keys), and experts queued after host compute: check each
        at its target layer's next call."""
        watch, last, target, row = self._watch, self.R - 1, None, None
        for rank, (t, e) in enumerate(candidates):  # ranks past R - 1 share the last (`_index`)
            if t != target:
                target, row = t, watch.setdefault(t, [])
            row.append((e, rank if rank < last else last))
        for t, e in host_queued:
            watch.setdefault(t, []).append((e, self.R))

    def evicted(self, key: Key, guess: bool = False) -> None:
        """The policy evicted `key` (for a demand fetch or a prefetch; `guess`: for a predicted copy): was it needed
        at its layer's next visit?"""
        self._victims.setdefault(key[0], []).append((key[1], guess))

    def copies_used(self, used: int, late: int = 0) -> None:
        """`used` predicted copies were routed to; of them `late` were still in flight. One that had landed saved a
        miss; one in flight started about a layer call before a demand copy would have: it saved that, at most a
        miss."""
        self._credit += (used - late) * self.copy_s + late * min(self.copy_s, self.layer_s)
        self._copies_used += used

    def copies_kept(self, hits: int) -> None:
        """misses="host": `hits` on experts resident since an earlier use of their copy. Only predicted copies fill
        the cache there (without them every visit is computed on the host), so each saves the host's compute of its
        expert again: credited as it comes, like a first use."""
        self._credit += hits * self.saving

    def copy_wasted(self) -> None:
        """A predicted copy was evicted unused: it held the link for a copy, which delayed the copies due
        meanwhile by the link's load (rho) of it."""
        self._credit -= self.copy_s * self.link_load()
        self._copies_wasted += 1

    def wasted_share(self) -> float:
        """The share of the predicted copies settled so far that were evicted unused (prior: a half)."""
        return (self._copies_wasted + 1) / (self._copies_used + self._copies_wasted + 2)

    SURE = 0.97  # a late copy past the compute window is admitted only at this calibrated p (chosen on the development routing)
    MARGIN = 0.15  # a late copy also arrives late: of its saving only part is saved (chosen on the development routing)
    PROBE = 32  # calls between probes at least (while the predictor is off)
    PROBE_SHARE = 5e-5  # ... and at most this share of decode's time spent on probes (a probe's host time, `predict_s`)
    PAID_SHARE = 1e-3  # ... or this share, once it has been live
    CALIBRATE = 256  # candidates checked at their target before the calibration may stop the predictor
    WARM = 32  # predicted calls the governor sees before it judges what the copies save (they land calls later)
    ENTER = 1.5  # a predictor off goes live once its copies save this many times its host time
    GOVERNOR_SMOOTHING = 1 / 64  # of `gain`, per predicted call (slower than the link's: one call's copies are few)

    def worth_predicting(self, full: bool = True) -> bool:
        """Whether the predictor should run at this call (the governor), and whether its copies go (`dry`);
        `full`: no cache slot is free.

        While a slot is free it does not run (the scheduler says full with misses="host", where only its copies
        fill the cache): a copy there evicts nothing, which says nothing of the steady
        state, and a predictor that earned live calls there would leave the cache where no predictor leaves
        it. Then it runs dry (its candidates calibrated, what their copies would have saved counted, nothing
        copied: `dry_run`) at every call while it calibrates (the first CALIBRATE candidates and WARM predicted
        calls); then live once some rank's calibrated p could pass `admit` and what its copies save per
        predicted call (`gain`) is ENTER x its host time (`predict_s`: the dry estimate is optimistic, see
        `dry_run`), and while that gain pays for the host time; otherwise dry at probe calls only, at most
        PROBE_SHARE of decode's time (every `predict_s / (PROBE_SHARE x period)` calls, at least PROBE). So a
        predictor that never earns a live call leaves the cache as no predictor would and costs only its host
        time at the calibration and probe calls; one whose copies can never land before the host would have
        computed them (misses="auto") costs nothing."""
        if not full or (not self.late_ok and self.period + self.host_done < self.copy_s):
            return False  # a slot is free; or no copy lands before the host would have computed it
        if self._checked < self.CALIBRATE or self._samples < self.WARM:  # calibrating: at every call, dry (but
            # where only its copies fill the cache: dry, it would leave the host every miss; `admit` refuses the
            # copies its calibration does not yet back)
            self.dry = not self.copies_fill
            self._live = not self.dry
            self._wait = self._probe_every()
            return True
        best, q = self._best, self.q()  # the best calibrated rank the predictor has named
        if self.late_ok:
            could = best >= (1 + q) / 2 + self.MARGIN or (self.period - self.demand >= self.copy_s and best >= q)
        else:
            could = best >= (1 + q) / 2 + self.MARGIN
        self.dry = False
        if could and self.gain >= self.predict_s * (1.0 if self._on else self.ENTER):
            self._live = self._on = self._paid = True
            return True
        self._on = False
        self._wait -= 1
        if self._wait > 0:
            return False
        self._wait = self._probe_every()
        self.dry = True  # a probe keeps the calibration and the governor's sample going, copying nothing
        return True

    def _probe_every(self) -> int:
        """Calls between probes: PROBE_SHARE of decode's time at most (a probe costs `predict_s`), PROBE at least;
        PAID_SHARE once the predictor has paid live (a lull may end: what a probe can find is what it paid)."""
        share = self.PAID_SHARE if self._paid else self.PROBE_SHARE
        return max(self.PROBE, int(self.predict_s / (share * self.period)))

    def dry_run(self, layer: int, ranked, backlog_s: float = 0.0, room: int | None = None) -> None:
        """A dry call (calibrating, or a probe of a predictor switched off): its candidates `ranked` [(rank,
        key)], those not resident, best first, are calibrated (`watch`) but not copied, so that the call leaves
        the cache as it was. The governor's sample is what their copies would have been credited live
        (`copies_used`, `copy_wasted`, `routed`): each that `admit` would pass (behind `backlog_s` of copies on
        the link and those before it, at most `room` of them: the in-flight bound) is settled at its target
        layer's next call: routed there, a demand copy if it would have landed by then (d periods ahead), else
        (in flight) a layer call's device time at most; not routed, the link time a wasted copy takes (x rho);
        and its victim, unless the copy would be used (1 - p), costs that one's chance of reuse (q) of a miss, at once."""
        copy, period, L = self.copy_s, self.period, self.L
        rho, victim, late = self.link_load(), self.q() * min(copy, period), min(copy, self.layer_s)
        n, dry = 0, self._dry
        for rank, key in ranked:
            if room is not None and n >= room:
                break
            if not self._decide(layer, key, rank, n, backlog_s):
                continue
            d = (key[0] - layer) % L or L
            n += 1
            self._dry_credit -= victim * (1.0 - self.p(rank))  # a used copy's victim: a demand copy's anyway
            dry.setdefault(key[0], []).append((key[1], copy if backlog_s + n * copy <= d * period else late,
                                               copy * rho))

    def p(self, rank: int) -> float:
        i = self._index(rank)
        return (self.used[i] + 1) / (self.seen[i] + 2)

    def q(self) -> float:
        return (self.victim_reused + 1) / (self.victims + 2)

    def link_load(self) -> float:
        """rho: the share of the link that demand copies would take on an idle link, plus the predicted copies
        admitted (moving averages; it does not fall when queued copies push misses to the host). A copy that
        holds the link for copy_s delays the copies due meanwhile by about rho x copy_s; under misses="auto" a
        demand copy so delayed is computed on the host instead, or waited for: rho of a miss's cost."""
        if self._settled > 0.99:
            return 1.0  # no call done yet: nothing known of the demand, so no copy is taken to be free
        return min(1.0, self.wanted / (1.0 - self._settled) / self.period)

    def admit(self, layer: int, key: Key, rank: int, n: int, backlog_s: float, victim=None) -> bool:
        """Whether to copy `key` (rank `rank`, or REUSE) now, at layer `layer`'s call, with `n` copies admitted
        before it in this pump and `backlog_s` of copies queued on the link. `victim()`, where given, says what the
        copy would evict: None (a free slot), a key, or False (no slot may go); not given: the calibrated q."""
        ok = self._decide(layer, key, rank, n, backlog_s, victim)
        if ok:
            self.admitted += 1
            if rank != self.REUSE:
                self._predicted_now += 1
        else:
            self.refused += 1
        return ok

    def _decide(self, layer: int, key: Key, rank: int, n: int, backlog_s: float, victim=None) -> bool:
        """`admit`'s rule, without counting."""
        copy = self.copy_s
        d = (key[0] - layer) % self.L or self.L  # layer calls until its use
        # link time left idle before the target call: d periods, less what is queued and the demand copies
        # the calls until then need
        i = self.R if rank == self.REUSE else rank if rank < self.R else self.R - 1  # p(rank), q(), inlined
        p, q = (self.used[i] + 1) / (self.seen[i] + 2), (self.victim_reused + 1) / (self.victims + 2)
        if not self.late_ok:  # misses go to the host: a copy is worth it only if it lands before the host would
            # have computed the expert (demand copies behind it are few, and split_misses sends them to the host
            # when the link is busy)
            landed = backlog_s + (n + 1) * copy
            if rank == self.REUSE:  # an expert the host just computed, resident at its layer's next visit: it
                # saves p misses, its own victim costs that one's chance of reuse, and the demand copies it delays
                # rho (all in units of a miss's cost)
                ok = landed <= d * self.period
                if ok:
                    if victim is not None:  # else the policy's victims' calibrated q
                        out = victim()
                        q = 1.0 if out is False else 0.0 if out is None else self.recency.p(out)
                    ok = p >= q + self.link_load()
            else:  # a predicted copy: its use waits for it at most the host's time for the expert, and it stays
                # resident after
                ok = landed <= d * self.period + self.host_done and p >= (1 + q) / 2 + self.MARGIN
        elif copy <= d * self.period - backlog_s - d * self.demand - n * copy:
            ok = p >= q  # lands in time on a link that would idle: it costs the slot it evicts
        else:  # it takes link time from demand copies: a used copy saves one, a wasted one costs one and a slot.
            # Only while the copies admitted in this pump fit in the device compute of the d calls before its use
            # (the link idles there; past it a copy only delays the demand copies queued behind it), unless it
            # is all but sure to be used
            ok = p >= (1 + q) / 2 + self.MARGIN and (n * copy < d * self.layer_s or p >= self.SURE)
        return ok
