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
  it is used more often than not (p_r >= 1/2: a used copy saves a demand copy, a wasted one costs one), with
  "auto"/"host" never (the host computes the miss meanwhile, beside the device);
- experts computed on the host with misses="auto" are queued for copying too (so they are resident the next
  time); their p is the calibrated chance that such an expert is routed at its layer's next visit.

The predictor itself runs only while its admitted copies are expected to save more than its own host time
(`predict_s`, per call) and some rank could pass; else at probe calls. Costs (`copy_s`, `layer_s`: seconds
between consecutive MoE layer calls, `predict_s`) come from the cost object the scheduler is given (`misses.MissCosts`-like; the simulator's `sim.clock.HostMissCosts` carries both); without a
positive `layer_s` there is no admission: every candidate is prefetched, as before.
"""

# Shape legend: L MoE layers, R calibrated ranks

from __future__ import annotations

Key = tuple[int, int]  # (layer, expert)


class PrefetchAdmission:
    """Online calibration and the admission rule (see the module docstring).

    Args:
        num_layers: L.
        copy_s / layer_s: one expert's copy; one MoE layer call to the next.
        late_ok: whether a copy that lands after its use may be admitted (misses="fetch").
        ranks: ranks calibrated apart (later ranks share the last).
    """

    REUSE = -1  # the "rank" of an expert computed on the host, queued to be resident at its layer's next visit

    def __init__(self, num_layers: int, copy_s: float, layer_s: float, late_ok: bool, ranks: int = 16,
                 host_s: float | None = None, host_call_s: float = 0.0, predict_s: float = 0.0,
                 smoothing: float = 0.05):
        self.L, self.copy_s, self.layer_s, self.late_ok, self.R = num_layers, copy_s, layer_s, late_ok, ranks
        self.host_s, self.host_call_s, self.predict_s, self.smoothing = host_s, host_call_s, predict_s, smoothing
        # what a used prefetch saves: a demand copy, or (misses="auto") the host's compute of the expert
        self.saving = copy_s if late_ok or host_s is None else min(copy_s, host_s)
        self.gain = predict_s  # expected seconds saved per predicted call (moving average; starts at break-even)
        self.used = [0] * (ranks + 1)  # [R + 1] candidates routed at their target (index R: REUSE)
        self.seen = [0] * (ranks + 1)
        self.victim_reused = self.victims = 0
        self._watch: dict[int, list[tuple[int, int]]] = {}  # target layer -> [(expert, rank index)]
        self._victims: dict[int, list[int]] = {}  # layer -> experts evicted for a prefetch, not yet revisited
        self.period = layer_s  # seconds per MoE layer call (moving average of what the calls needed)
        self.demand = 0.0  # link seconds of demand copies per call (moving average)
        self.admitted = self.refused = 0
        self._every = self._wait = self.PROBE  # calls between probes, and until the next
        self._expected = 0.0  # sum of p over the copies admitted in the current pump
        self._best = 0.5  # the highest p among the ranks seen (the prior before any)

    def call_done(self, fetched: int, on_host: int) -> None:
        """A layer call fetched `fetched` experts on demand and computed `on_host` on the host: its length is at
        least the device's layer, the demand copies in a row, and the host's experts."""
        demand = fetched * self.copy_s
        t = max(self.layer_s, demand)
        if on_host and self.host_s is not None:
            t = max(t, self.host_call_s + on_host * self.host_s)
        a = self.smoothing
        self.period += a * (t - self.period)
        self.demand += a * (demand - self.demand)

    def reset(self) -> None:
        """Forget what waits for its target (a new generate call); the calibration stays."""
        self._watch.clear()
        self._victims.clear()

    def _index(self, rank: int) -> int:
        return self.R if rank == self.REUSE else min(rank, self.R - 1)

    def routed(self, layer: int, routed: list[int]) -> None:
        """Layer `layer` was just routed to `routed`: settle the candidates and victims that waited for it."""
        watched = self._watch.pop(layer, None)
        victims = self._victims.pop(layer, None)
        if watched is None and victims is None:
            return
        chosen = set(routed)
        if watched:
            used, seen = self.used, self.seen
            for e, i in watched:
                seen[i] += 1
                if e in chosen:
                    used[i] += 1
            self._best = max((used[r] + 1) / (seen[r] + 2) for r in range(self.R) if seen[r]) \
                if any(seen[: self.R]) else 0.5
        if victims:
            self.victims += len(victims)
            self.victim_reused += sum(1 for e in victims if e in chosen)

    def watch(self, candidates, host_queued=()) -> None:
        """The candidates of this call, best first (keys), and experts queued after host compute: check each
        at its target layer's next call."""
        watch = self._watch
        for rank, (t, e) in enumerate(candidates):
            watch.setdefault(t, []).append((e, self._index(rank)))
        for t, e in host_queued:
            watch.setdefault(t, []).append((e, self.R))

    def evicted(self, key: Key) -> None:
        """The policy evicted `key` (for a demand fetch or a prefetch): was it needed at its layer's next visit?"""
        self._victims.setdefault(key[0], []).append(key[1])

    MARGIN = 0.15  # a late copy also arrives late: of its saving only part is saved (chosen on the development routing)
    PROBE = 32  # while no rank is worth a copy, the predictor still runs at probe calls (calibration)

    def worth_predicting(self) -> bool:
        """Whether the predictor should run at this call: its admitted copies have paid for its host time and
        some rank's calibrated p could pass `admit`, or this is a probe call (every PROBE calls, the interval
        doubling, up to 64 x, while probes find it not worth it). A predictor that is often wrong then costs its
        host time at a few calls only; one whose copies can never land in time under misses="auto" at none."""
        best, q = self._best, self.q()  # the best calibrated rank the predictor has named
        if not self.late_ok and self.period < self.copy_s:
            return False  # no copy lands before the next layer's call, whatever the predictor says
        if self.late_ok:
            could = best >= (1 + q) / 2 + self.MARGIN or (self.period - self.demand >= self.copy_s and best >= q)
        else:
            could = best >= (1 + q) / 2 + self.MARGIN
        worth = could and self.gain >= self.predict_s
        self._wait -= 1
        if self._wait <= 0:  # a probe keeps the calibration going
            self._every = self.PROBE if worth else min(self._every * 2, 64 * self.PROBE)
            self._wait = self._every
            return True
        return worth

    def pumped(self, expected_used: float) -> None:
        """A predicted call's admitted copies are expected to be used `expected_used` times (sum of their p)."""
        self.gain += self.smoothing * (expected_used * self.saving - self.gain)

    def p(self, rank: int) -> float:
        i = self._index(rank)
        return (self.used[i] + 1) / (self.seen[i] + 2)

    def q(self) -> float:
        return (self.victim_reused + 1) / (self.victims + 2)

    def admit(self, layer: int, key: Key, rank: int, n: int, backlog_s: float) -> bool:
        """Whether to copy `key` (rank `rank`) now, at layer `layer`'s call, with `n` copies admitted before it
        in this pump and `backlog_s` of copies queued on the link."""
        copy = self.copy_s
        d = (key[0] - layer) % self.L or self.L  # layer calls until its use
        # link time left idle before the target call: d periods, less what is queued and the demand copies
        # the calls until then need
        p, q = self.p(rank), self.q()
        if not self.late_ok:  # misses go to the host: a copy is worth it only if it lands before its use (demand
            # copies behind it are few, and split_misses sends them to the host when the link is busy)
            ok = backlog_s + (n + 1) * copy <= d * self.period and p >= (1 + q) / 2 + self.MARGIN
        elif copy <= d * self.period - backlog_s - d * self.demand - n * copy:
            ok = p >= q  # lands in time on a link that would idle: it costs the slot it evicts
        else:  # it takes link time from demand copies: a used copy saves one, a wasted one costs one and a slot
            ok = p >= (1 + q) / 2 + self.MARGIN
        if ok:
            self.admitted += 1
            self._expected += p
        else:
            self.refused += 1
        return ok
