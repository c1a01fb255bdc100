"""How good must a predictor be? Simulated decode tok/s of degraded oracles as a function of their quality, on
held-out real routing, with the trained predictors placed on the same curves.

A degraded oracle (`degraded_candidates`) names, for each target layer, each expert the routing really chooses there
with probability r (its recall) and adds experts not chosen there, drawn uniformly, so that a named expert is routed
with probability p (its precision): E[false] = named * (1 - p) / p, stochastically rounded. Draws are made once per
(pass, target layer) from a seeded generator, so every source layer that looks at a target names the same set (as
the oracle does) and a rerun gives the same candidates. The order of a target's candidates is either `shuffled`
(every rank has precision p: nothing for admission's per-rank calibration to separate) or `true-first` (the routed
ones first: a perfectly ranked predictor of that recall, its precision falling with rank as a trained one's does).

Every row is the simulator (`sim.sweep.run_sweep`, as `benchmarks/real_routing.py` runs it: the default eviction
policy, warm-up passes excluded, the runtime's admission and governor) at one capacity, misses `fetch` and `auto`;
degraded oracles are charged a trained predictor's host cost (the affinity predictor's aten ops) and the oracle
rows the oracle's. The trained predictors (loaded from `--load-predictors DIR/<trace>-<name>`, e.g. saved by
real_routing.py's `--save-predictors`) are replayed on the same held-out steps, and their recall and precision are
measured the same way (target layer l+1 named from layer l).

Prefetching can only help with an expert that is not resident when the copy would start, so next to the recall of
every routed expert the table gives the recall of the *new* ones: routed at a layer and not routed there in any of
the W tokens before (a routing-only stand-in for "not resident"; W is chosen so that the share of new experts is
closest to the no-predictor run's miss rate). A degraded oracle's new-expert recall is r by construction; a trained
predictor's is what it knows about the experts a copy can help with.

    python benchmarks/predictor_quality.py /work/tmp/traces_imported/ds_test \
        --load-predictors /work/tmp/admit2/preds2 --trained affinity affinity-2 history interlayer

Writes benchmarks/results/<name>.{json,md,png}. All tok/s figures are simulated.
"""

# Shape legend: P passes, T tokens of a pass, L MoE layers, k top-k, E experts, D lookahead

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

from specmoe.bench.environment import environment
from specmoe.io import read_json, write_json, write_text
from specmoe.measure.results import first_crossing
from specmoe.predictors import load_predictor
from specmoe.runtime.admission import PrefetchAdmission
from specmoe.sim.hardware import HardwareProfile
from specmoe.sim.policies import resolve_policy_name
from specmoe.sim.predictions import PredictorReplay, replay_oracle, replay_predictor
from specmoe.sim.report import environment_line
from specmoe.sim.shapes import ModelShape, matching_presets
from specmoe.sim.stream import RoutingStream
from specmoe.sim.sweep import SweepSettings, run_sweep
from specmoe.traces import load_traces

RESULTS = Path(__file__).parent / "results"
ORDERS = ("shuffled", "true-first")
TARGET_GAIN = 0.10  # issue 18: the best trained predictor > no predictor by >= 10 % at capacity 0.25


def degraded_candidates(stream: RoutingStream, num_experts: int, recall: float, precision: float,
                        lookahead: int = 1, order: str = "shuffled", seed: int = 0) -> list:
    """Candidates [pass][layer] -> ranked (layer, expert) keys of a degraded oracle (see the module docstring):
    targets l+1..l+lookahead, past the last layer the next pass's first layers, as `oracle_candidates`."""
    if not (0.0 <= recall <= 1.0 and 0.0 < precision <= 1.0) or lookahead < 1 or order not in ORDERS:
        raise ValueError(f"need 0 <= recall <= 1, 0 < precision <= 1, lookahead >= 1 and order in {ORDERS}; got "
                         f"recall={recall}, precision={precision}, lookahead={lookahead}, order={order!r}")
    passes = [ids.tolist() for ids in stream.passes()]  # [P][T][L][k]
    L, E = stream.num_layers, num_experts
    named: dict[tuple[int, int], list[int]] = {}

    def target(q: int, t: int) -> list[int]:
        got = named.get((q, t))
        if got is None:
            rng = random.Random(f"{seed}:{q}:{t}")  # a str seed is hashed with sha512: the same draws in every run
            routed = sorted({e for token in passes[q] for e in token[t] if e >= 0})
            true = [e for e in routed if rng.random() < recall]
            want = len(true) * (1.0 - precision) / precision
            n_false = int(want) + (rng.random() < want - int(want))
            others = [e for e in range(E) if e not in set(routed)]
            false = rng.sample(others, min(n_false, len(others)))
            got = true + false
            if order == "shuffled":
                rng.shuffle(got)
            named[(q, t)] = got
        return got

    out = []
    for p in range(len(passes)):
        per_layer = []
        for layer in range(L):
            keys = []
            for d in range(1, lookahead + 1):
                q, t = (p, layer + d) if layer + d < L else (p + 1, layer + d - L)
                if q < len(passes) and t < L:
                    keys += [(t, e) for e in target(q, t)]
            per_layer.append(keys)
        out.append(per_layer)
    return out


def recent_experts(stream: RoutingStream, window: int) -> list[list[set[int]]]:
    """[P][L] the experts routed at each layer in any of the `window` passes before (within the same sequence: a
    sequence's first pass knows no earlier one). Routed experts outside it are "new"; a named one outside it is
    one a copy would be issued for (a routing-only stand-in for "not resident")."""
    passes = [ids.tolist() for ids in stream.passes()]
    starts, off = set(stream.seq_offsets.tolist()), stream.pass_offsets.tolist()
    first_pass = []  # the pass each pass's sequence starts at
    for p in range(len(passes)):
        first_pass.append(p if off[p] in starts else first_pass[-1])
    return [[{e for q in range(max(first_pass[p], p - window), p) for token in passes[q] for e in token[t] if e >= 0}
             for t in range(stream.num_layers)] for p in range(len(passes))]


def quality(stream: RoutingStream, candidates: list, recent: list[list[set[int]]]) -> dict:
    """Recall and precision of the next layer's candidates (named at layer l for layer l+1, past the last layer the
    next pass's layer 0); and the same counting only what is outside `recent` (`recent_experts`): the recall of the
    new experts, and the precision of the named experts a copy would be issued for; and the precision at each of
    the first k ranks of a call's list (what admission calibrates: `runtime.admission`)."""
    passes = [ids.tolist() for ids in stream.passes()]
    L = stream.num_layers
    found = wanted = named_n = new_found = new_wanted = new_named = 0
    K = max(1, stream.top_k)
    rank_hit, rank_seen = [0] * K, [0] * K  # the next layer's candidates at ranks 0..k-1 of the call's list
    for p, per_layer in enumerate(candidates):
        for layer, keys in enumerate(per_layer):
            t, q = (layer + 1) % L, p + (layer + 1 == L)
            if q >= len(passes):
                continue
            routed = {e for token in passes[q] for e in token[t] if e >= 0}
            named = {e for tl, e in keys if tl == t}
            new, old = routed - recent[q][t], recent[q][t]
            found += len(routed & named)
            wanted += len(routed)
            named_n += len(named)
            new_found += len(new & named)
            new_wanted += len(new)
            new_named += len(named - old)
            for r, (tl, e) in enumerate(keys[:K]):
                if tl == t:
                    rank_seen[r] += 1
                    rank_hit[r] += e in routed
    ratio = lambda a, b: a / b if b else None  # noqa: E731
    return {"recall": ratio(found, wanted), "precision": ratio(found, named_n),
            "new_recall": ratio(new_found, new_wanted), "new_precision": ratio(new_found, new_named),
            "named_per_layer": named_n / max(1, sum(map(len, candidates))),
            "precision_at_rank": [ratio(h, n) for h, n in zip(rank_hit, rank_seen)]}


THRESHOLDS = (0.8, 0.9, 0.95, 0.97, 0.99)


def confidence(stream: RoutingStream, predictor, recent: list[list[set[int]]], thresholds=THRESHOLDS) -> dict:
    """For a predictor whose sigmoid(score) is a calibrated probability (affinity's): at each threshold, of the
    experts not in `recent` that it gives at least that probability at layer l for layer l+1, the share routed
    there (precision) and the share of the new experts so named (recall). Admission calibrates ranks, not scores:
    this is what the predictor knows with that confidence, whatever rank it sits at."""
    from specmoe.predictors.replay import replay_stateful

    passes = [ids.tolist() for ids in stream.passes()]
    L = stream.num_layers
    hit = {t: 0 for t in thresholds}
    named = {t: 0 for t in thresholds}
    new_n = 0
    steps = replay_stateful(predictor, stream.ids, {}, stream.pass_offsets.tolist(), set(stream.seq_offsets.tolist()),
                            predictor.geometry.hidden_size, dtype=torch.float32)
    for p, per_layer in steps:
        for layer, scores in enumerate(per_layer):
            t, q = (layer + 1) % L, p + (layer + 1 == L)
            if q >= len(passes) or (layer + 1 == L and not predictor.wrap):
                continue
            prob = torch.sigmoid(scores[layer + 1].float()).amax(0)  # [E] the pass's tokens' best
            old = recent[q][t]
            routed = {e for token in passes[q] for e in token[t] if e >= 0}
            new = routed - old
            new_n += len(new)
            for th in thresholds:
                sure = {e for e in torch.nonzero(prob >= th).flatten().tolist() if e not in old}
                named[th] += len(sure)
                hit[th] += len(sure & new)
    return {str(th): {"precision_new": hit[th] / named[th] if named[th] else None,
                      "recall_new": hit[th] / new_n if new_n else None} for th in thresholds}


def choose_window(stream: RoutingStream, miss_rate: float, windows=range(1, 17)) -> tuple[int, dict]:
    """The W whose share of new experts is closest to `miss_rate`, and every W's share."""
    routed = [[{e for token in ids.tolist() for e in token[t] if e >= 0} for t in range(stream.num_layers)]
              for ids in stream.passes()]
    n_all = sum(len(x) for row in routed for x in row)
    shares = {}
    for w in windows:
        recent = recent_experts(stream, w)
        shares[str(w)] = sum(len(x - r) for row, rrow in zip(routed, recent) for x, r in zip(row, rrow)) / n_all
    best = min(shares, key=lambda w: abs(shares[w] - miss_rate))
    return int(best), shares


def run(args) -> dict:
    t0 = time.perf_counter()
    trace = load_traces(args.trace, hidden=False)
    geo = trace.geometry
    stream = RoutingStream.from_trace(trace)
    if args.max_passes and stream.num_passes > args.max_passes:
        stream = stream.select_passes(0, args.max_passes)
    shapes = [s for s in matching_presets(stream) if ModelShape.from_name(s).geometry.num_experts == geo.num_experts]
    if not shapes:
        raise SystemExit(f"{args.trace}: no preset model shape has the trace's geometry {geo}")
    shape, profile = ModelShape.from_name(shapes[0]), HardwareProfile.from_name(args.profile)
    policy = resolve_policy_name(args.policy)
    settings = SweepSettings(capacities=(args.capacity,), policies=(policy,), prefetch_policies=(policy,),
                             warmup_passes=args.warmup, context=args.context, misses=tuple(args.misses),
                             host=args.host if set(args.misses) - {"fetch"} else None, add_max_fit=False)
    trained, replays, predictors = {}, [], {}
    for name in args.trained:
        path = args.load_predictors / f"{args.train_name}-{name}"
        if not path.is_dir():
            raise SystemExit(f"--load-predictors: no {path}")
        predictor = load_predictor(path, geo)
        replays.append(replay_predictor(stream, predictor, geo, [None] * geo.num_layers, name, progress=False))
        trained[name] = {"loaded_from": str(path), "lookahead": replays[-1].lookahead,
                         "predict_ops": replays[-1].predict_ops, "kind": predictor.kind}
        predictors[name] = predictor
    ops = replays[0].predict_ops if replays else None  # a trained predictor's cost for the degraded oracles
    grid = []
    for la in args.oracle_lookaheads:
        rep = replay_oracle(stream, geo.num_experts, la)
        rep.name = f"oracle-{la}"
        replays.append(rep)
    for order in args.orders:
        for la in args.lookaheads:
            for p in args.precisions:
                for r in args.recalls:
                    name = f"degraded r={r:g} p={p:g} d={la} {order}"
                    cands = degraded_candidates(stream, geo.num_experts, r, p, la, order, args.seed)
                    replays.append(PredictorReplay(name, cands, la, ops))
                    grid.append({"name": name, "recall_set": r, "precision_set": p, "lookahead": la, "order": order})
    sweep = run_sweep(stream, [shape], [profile], settings, replays, progress=not args.quiet)
    runs = {(r["predictor"], r["misses_mode"]): r for r in sweep["runs"]}
    base = {m: runs[("none", m)]["tok_s"] for m in args.misses}
    miss_rate = 1.0 - runs[("none", "fetch" if "fetch" in args.misses else args.misses[0])]["hit_rate"]
    window, shares = choose_window(stream, miss_rate)
    recent = recent_experts(stream, window)

    def row(rep) -> dict:
        q = quality(stream, rep.candidates, recent)
        out = {"predictor": rep.name, "lookahead": rep.lookahead, **q}
        for m in args.misses:
            r = runs[(rep.name, m)]
            out[m] = {"tok_s": r["tok_s"], "gain": r["tok_s"] / base[m] - 1.0, "hit_rate": r["hit_rate"],
                      "prefetch_issued": r["prefetch_issued"], "prefetch_used": r["prefetch_used"],
                      "predict_calls": r["predict_calls"], "predict_skipped": r["predict_skipped"]}
        return out

    rows = [row(rep) for rep in replays]
    for r in rows:  # what the calibrated ones know with high confidence
        if r["predictor"] in trained and trained[r["predictor"]]["kind"] == "affinity" \
                and not getattr(predictors[r["predictor"]], "confident", 0):  # (its scores are clamped)
            r["confidence"] = confidence(stream, predictors[r["predictor"]], recent)
    by_name = {r["predictor"]: r for r in rows}
    for g in grid:
        g.update(by_name[g["name"]])
    needed = []
    for m in args.misses:
        for order in args.orders:
            for la in args.lookaheads:
                for p in args.precisions:
                    pts = [(g["recall"], g[m]["gain"]) for g in grid
                           if (g["order"], g["lookahead"], g["precision_set"]) == (order, la, p)]
                    needed.append({"misses": m, "order": order, "lookahead": la, "precision_set": p,
                                   "recall_needed": first_crossing(pts, TARGET_GAIN),
                                   "best_gain": max(g for _, g in pts)})
    out = {"trace": str(args.trace), "model": trace.manifest.model,
            "sure": PrefetchAdmission.SURE, "margin": PrefetchAdmission.MARGIN, "geometry": geo.to_dict(), "shape": shape.name,
            "capacity": args.capacity, "policy": policy, "passes": stream.num_passes, "none": base,
            "none_miss_rate": miss_rate, "new_window": window, "new_share_by_window": shares,
            "trained": [by_name[n] | trained[n] for n in trained],
            "oracles": [by_name[f"oracle-{la}"] for la in args.oracle_lookaheads],
            "grid": grid, "needed": needed, "target_gain": TARGET_GAIN,
            "seconds": round(time.perf_counter() - t0, 1)}
    out["summary"] = summarize(out, args.misses)
    return out


def summarize(res: dict, modes) -> dict:
    """Per misses mode: the best trained predictor's gain, the best oracle's (and by lookahead), the best degraded
    oracle's whose precision, the same at every rank (shuffled), is under admission's SURE; and each trained
    predictor's best rank precision."""
    summary = {}
    sure = res["sure"]
    for m in modes:
        below = [g for g in res["grid"] if g["precision_set"] < sure and g["order"] == "shuffled"]
        best_below = max(below, key=lambda g: g[m]["gain"]) if below else None
        best_trained = max(res["trained"], key=lambda r: r[m]["gain"], default=None)
        summary[m] = {"best_trained": best_trained and best_trained["predictor"],
                      "best_trained_gain": best_trained and best_trained[m]["gain"],
                      "best_gain_below_sure": best_below and best_below[m]["gain"],
                      "best_below_sure": best_below and best_below["name"],
                      "best_oracle_gain": max(o[m]["gain"] for o in res["oracles"]),
                      "oracle_gain_by_lookahead": {str(o["lookahead"]): o[m]["gain"] for o in res["oracles"]}}
    summary["best_rank_precision"] = {r["predictor"]: max((v for v in r["precision_at_rank"] if v is not None),
                                                          default=None) for r in res["trained"]}
    return summary



def markdown(result: dict) -> str:
    s, res = result["settings"], result["result"]
    modes = s["misses"]
    pct = lambda g: "—" if g is None else f"{100 * g:+.1f} %"  # noqa: E731
    f3 = lambda v: "—" if v is None else f"{v:.3f}"  # noqa: E731
    parts = [f"**How good must a predictor be?** {res['model']} as {res['shape']}, {res['passes']} held-out decode "
             f"steps ({res['trace']}), capacity {res['capacity']}, {res['policy']}, simulated on {s['profile']} "
             f"(host {s['host']}); no predictor: " + ", ".join(f"{m} {res['none'][m]:.2f} tok/s" for m in modes) +
             f". Gains are over no predictor in the same mode. Simulated, not measured.", "",
             "Answer, per misses mode: " + "; ".join(
                 f"{m}: best trained {res['summary'][m]['best_trained']} {pct(res['summary'][m]['best_trained_gain'])}, "
                 f"best oracle {pct(res['summary'][m]['best_oracle_gain'])}, best degraded oracle whose precision (the "
                 f"same at every rank) is under admission's SURE ({res['sure']}) {pct(res['summary'][m]['best_gain_below_sure'])} "
                 f"({res['summary'][m]['best_below_sure']})" for m in modes if res['summary'][m]['best_trained'])
             + f" (goal {pct(res['target_gain'])}).", "", why(res, modes, pct), "",
             f"New experts: routed at a layer and not routed there in the {res['new_window']} tokens before "
             f"({100 * res['new_share_by_window'][str(res['new_window'])]:.1f} % of routed experts; the no-predictor "
             f"fetch run misses {100 * res['none_miss_rate']:.1f} %).", "",
             "| predictor | lookahead | recall | precision | new-expert recall | precision of the new named | "
             "precision at ranks 0.. | " + " | ".join(f"{m} tok/s | {m} gain" for m in modes) + " |",
             "|---|---:|---:|---:|---:|---:|---|" + "---:|---:|" * len(modes)]
    for r in res["oracles"] + res["trained"]:
        ranks = " / ".join("—" if v is None else f"{v:.2f}" for v in r["precision_at_rank"])
        parts.append(f"| {r['predictor']} | {r['lookahead']} | {f3(r['recall'])} | {f3(r['precision'])} | "
                     f"{f3(r['new_recall'])} | {f3(r['new_precision'])} | {ranks} | "
                     + " | ".join(f"{r[m]['tok_s']:.2f} | {pct(r[m]['gain'])}" for m in modes)
                     + " |")
    conf = [r for r in res["trained"] if r.get("confidence")]
    if conf:
        ths = list(conf[0]["confidence"])
        parts += ["", "What the calibrated predictors know with high confidence, whatever the rank (admission calibrates "
                  "ranks, not scores): of the experts outside the recent tokens they give probability >= x for the "
                  "next layer, precision / recall of the new experts:", "",
                  "| predictor | " + " | ".join(f">= {t}" for t in ths) + " |", "|---|" + "---|" * len(ths)]
        for r in conf:
            parts.append(f"| {r['predictor']} | " + " | ".join(
                f"{f3(c['precision_new'])} / {f3(c['recall_new'])}" for c in r["confidence"].values()) + " |")
    parts += ["", "Degraded oracles (recall r and precision p as set, and measured so to within the draws; their false "
              "candidates are drawn from every expert not routed, so the precision of the new ones they name is "
              "lower than p):", "",
              "| order | lookahead | p | r | new-expert recall | precision of the new named | " +
              " | ".join(f"{m} gain" for m in modes) + " |",
              "|---|---:|---:|---:|---:|---:|" + "---:|" * len(modes)]
    for g in res["grid"]:
        parts.append(f"| {g['order']} | {g['lookahead']} | {g['precision_set']:g} | {g['recall_set']:g} | "
                     f"{f3(g['new_recall'])} | {f3(g['new_precision'])} | " +
                     " | ".join(pct(g[m]["gain"]) for m in modes) + " |")
    parts += ["", f"Recall a degraded oracle needs for {pct(res['target_gain'])} (interpolated between grid points; "
              "— : no recall up to 1 reaches it):", "",
              "| misses | order | lookahead | p | recall needed | best gain on the grid |", "|---|---|---:|---:|---:|---:|"]
    for n in res["needed"]:
        rn = "—" if n["recall_needed"] is None else f"{n['recall_needed']:.2f}"
        parts.append(f"| {n['misses']} | {n['order']} | {n['lookahead']} | {n['precision_set']:g} | {rn} | "
                     f"{pct(n['best_gain'])} |")
    parts += ["", f"Command: `{s['command']}`. Simulated on {environment_line(result['environment'])}; "
              f"{res['seconds']} s."]
    return "\n".join(parts) + "\n"


def why(res: dict, modes, pct) -> str:
    """The paragraph that reads the grid: what admission lets through, and where the trained predictors sit."""
    sure, summ = res["sure"], res["summary"]
    out = [f"Why: `runtime/admission.py` admits a copy that takes link time from demand copies only at a calibrated "
           f"rank precision >= (1 + q) / 2 + {res['margin']} (q: the chance the evicted expert is needed at its "
           f"next visit), and per call only the copies that fit the device compute before its use, unless the rank's "
           f"precision is >= SURE = {sure}."]
    for m in modes:
        rows = [n for n in res["needed"] if n["misses"] == m]
        flat = [n for n in rows if n["order"] == "shuffled" and n["precision_set"] < sure]
        ranked = [n for n in rows if n["order"] == "true-first" and n["recall_needed"] is not None]
        part = f"With misses={m}:"
        if flat:
            part += " every rank at one precision p < SURE (shuffled): " + ", ".join(
                f"p={n['precision_set']:g} " + (f"needs recall {n['recall_needed']:.2f}" if n["recall_needed"] is not None
                                               else f"at most {pct(n['best_gain'])}") for n in flat) + ";"
        if ranked:
            part += (" with the routed experts ranked first (true-first: precision 1 at the top ranks, 0 below), "
                     + ", ".join(f"p={n['precision_set']:g} needs recall {n['recall_needed']:.2f}" for n in ranked)
                     + f" for {pct(res['target_gain'])};")
        elif any(n["order"] == "true-first" for n in rows):
            part += f" no degraded oracle reaches {pct(res['target_gain'])};"
        by_la = summ[m]["oracle_gain_by_lookahead"]
        part += " the oracle " + ", ".join(f"{pct(g)} at lookahead {la}" for la, g in by_la.items()) + "."
        out.append(part)
    if summ["best_rank_precision"]:
        out.append("The trained predictors' best rank precision: " + ", ".join(
            f"{n} {v:.2f}" for n, v in summ["best_rank_precision"].items() if v is not None) +
            ".")
    return " ".join(out)


def plot(result: dict, path: Path) -> bool:
    try:
        from specmoe.measure.results import pyplot

        plt = pyplot()
    except ImportError:
        return False
    res, modes = result["result"], result["settings"]["misses"]
    fig, axes = plt.subplots(1, len(modes), figsize=(6.5 * len(modes), 4.5), squeeze=False)
    for ax, m in zip(axes[0], modes):
        series = dict.fromkeys((g["order"], g["lookahead"], g["precision_set"]) for g in res["grid"])
        for order, la, p in series:
            pts = sorted((g["new_recall"], 100 * g[m]["gain"]) for g in res["grid"]
                         if (g["order"], g["lookahead"], g["precision_set"]) == (order, la, p))
            ax.plot([x for x, _ in pts], [y for _, y in pts], "-" if order == "shuffled" else "--", marker="o",
                    markersize=3, label=f"degraded p={p:g} d={la} {order}")
        for r in res["trained"] + res["oracles"]:
            ax.plot(r["new_recall"], 100 * r[m]["gain"], "k*" if r in res["trained"] else "rs", markersize=9)
            ax.annotate(r["predictor"], (r["new_recall"], 100 * r[m]["gain"]), fontsize=7,
                        xytext=(4, 4), textcoords="offset points")
        ax.axhline(100 * res["target_gain"], color="gray", linestyle=":")
        ax.set_xlabel(f"recall of new experts (not routed in the {res['new_window']} tokens before)")
        ax.set_ylabel(f"decode tok/s gain over no predictor, % (simulated, misses={m})")
        ax.set_title(f"{res['shape']} capacity {res['capacity']}, {res['policy']}, {m}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("trace", type=Path, nargs="?", help="held-out trace directory (specmoe import-routing)")
    p.add_argument("--load-predictors", type=Path, default=None, metavar="DIR",
                   help="trained predictors DIR/<train-name>-<name> (real_routing.py --save-predictors)")
    p.add_argument("--train-name", default="ds_train", help="the training trace's name in the saved predictors' dirs")
    p.add_argument("--trained", nargs="*", default=[], help="names of the saved predictors to place on the curves")
    p.add_argument("--recalls", type=float, nargs="+", default=[0.2, 0.4, 0.6, 0.8, 0.9, 1.0])
    p.add_argument("--precisions", type=float, nargs="+", default=[0.3, 0.5, 0.7, 1.0])
    p.add_argument("--lookaheads", type=int, nargs="+", default=[1])
    p.add_argument("--orders", nargs="+", default=["shuffled"], choices=ORDERS)
    p.add_argument("--oracle-lookaheads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--capacity", type=float, default=0.25)
    p.add_argument("--policy", default="default")
    p.add_argument("--misses", nargs="+", default=["fetch", "auto"], choices=("fetch", "host", "auto"))
    p.add_argument("--profile", default="rtx3090")
    p.add_argument("--host", default="3090-box")
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--warmup", type=int, default=16)
    p.add_argument("--max-passes", type=int, default=600, help="the first N held-out decode steps (real_routing's)")
    p.add_argument("--seed", type=int, default=0, help="seed of the degraded oracles' draws")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--name", default="predictor_quality")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--report-only", action="store_true", help="only remake the summary and the .md from the JSON")
    args = p.parse_args(argv)
    json_path = args.out / f"{args.name}.json"
    if args.report_only:
        result = read_json(json_path)
        result["result"]["summary"] = summarize(result["result"], result["settings"]["misses"])
        write_json(json_path, result)
        write_text(json_path.with_suffix(".md"), markdown(result))
        print(f"wrote {json_path} and {json_path.with_suffix('.md')}")
        return 0
    if args.trace is None:
        p.error("give the held-out trace directory (or --report-only)")
    if args.trained and args.load_predictors is None:
        p.error("--trained needs --load-predictors")
    result = {"environment": environment("cpu"),
              "settings": {"profile": args.profile, "host": args.host, "misses": args.misses, "seed": args.seed,
                           "simulated": True,
                           "command": "python benchmarks/predictor_quality.py " + " ".join(sys.argv[1:] if argv is None else argv)},
              "result": run(args)}
    write_json(json_path, result)
    md = markdown(result)
    write_text(json_path.with_suffix(".md"), md)
    png = json_path.with_suffix(".png")
    wrote = [json_path, json_path.with_suffix(".md")] + ([png] if plot(result, png) else [])
    print(md)
    print("wrote " + ", ".join(map(str, wrote)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
