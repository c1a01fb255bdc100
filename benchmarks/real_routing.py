"""Real routing, simulated: eviction policies x cache capacities x predictors on routing that real models
produced, imported with `specmoe import-routing` (no hidden states, so the predictors are the oracle and
those that read only the routing history: history, interlayer and affinity, the last also two layers ahead as
affinity-2).

Each trace's sequences are split by a seeded permutation (80/10/10), or with `--held-out DIR` the trace trains
(90/10 train/validation) and DIR's sequences are the test: history, interlayer and affinity are fitted on the
training sequences (the trained ones stop early on the validation ones) and every row is simulated on the
held-out test sequences only, replayed as decode (teacher-forced routing; a sequence of n tokens = n decode
steps) on the hardware profile with the model shape that matches the trace's geometry, once per `--misses` mode.
A trace of fewer than 3 sequences trains on its longest one (validating on it too) and tests on the others. The
candidates' precision at each rank (what admission calibrates) is reported next to the table. All figures are
simulated.

    specmoe import-routing moe-beyond DIR/training_data_eamc --out traces/deepseek
    specmoe import-routing speculative-moe DIR/humaneval_2_routing.jsonl --out traces/mixtral
    python benchmarks/real_routing.py traces/deepseek traces/mixtral   # about 15 min on 2 busy cores
    python benchmarks/real_routing.py traces/deepseek --policies default lru belady --name real_routing_default
    python benchmarks/real_routing.py traces/ds_train traces/mixtral --held-out traces/ds_test none \
        --policies default --misses fetch auto      # prompts 1-800 train, 801-1000 test (README's table)

Writes benchmarks/results/<name>.{json,md,png}.
"""

# Shape legend: N tokens, S sequences, L MoE layers, k top-k, E experts

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from specmoe.bench.environment import environment
from specmoe.io import read_json, write_json, write_text
from specmoe.predictors import load_predictor, save_predictor
from specmoe.sim.bounds import memory_plan
from specmoe.sim.hardware import HardwareProfile
from specmoe.sim.predictions import replay_oracle, replay_predictor
from specmoe.sim.report import environment_line, runs_table
from specmoe.sim.shapes import ModelShape, matching_presets
from specmoe.sim.policies import resolve_policy_name
from specmoe.sim.stream import RoutingStream
from specmoe.sim.sweep import SweepSettings, run_sweep
from specmoe.traces import load_traces
from specmoe.training.fit import fit_predictor
from specmoe.training.loop import TrainConfig

RESULTS = Path(__file__).parent / "results"
PREDICTORS = ("none", "oracle", "history", "interlayer", "affinity", "affinity-2", "affinity-wide", "affinity-new")
# how each trained predictor is fitted here: (kind, its options, the training loop's settings beyond the defaults,
# its lookahead: None for --lookahead). Training runs a fixed number of optimizer steps (early stopping on the
# validation split aside), so a rerun fits the same predictors whatever the machine's load; --train-steps replaces
# every one's steps, --train-minutes adds a wall-clock cap (not reproducible: the steps then depend on the load).
AFFINITY = ({"context": 4, "tokens": 4}, {"batch_size": 2048, "lr": 1e-2, "eval_every": 100, "steps": 1500})
FIT = {"history": ("history", {}, {"steps": 600}, None),
       "interlayer": ("interlayer", {"dim": 64, "layers": 2, "heads": 4, "ff": 128}, {"steps": 600}, None),
       "affinity": ("affinity", *AFFINITY, None),
       "affinity-2": ("affinity", *AFFINITY, 2),  # two layers ahead: copies that can land before use with misses=auto
       "affinity-wide": ("affinity", {"context": 12, "tokens": 8}, AFFINITY[1], None),  # more routing known
       "affinity-new": ("affinity", {**AFFINITY[0], "new": 1}, AFFINITY[1], None)}  # ranks only experts a copy can bring


def split(trace, seed: int, held_out=None) -> tuple[dict, str]:
    """{"train", "val", "test"} RoutingTraces of whole sequences, and how they were chosen. With `held_out` (a
    RoutingTrace of other sequences) that is the test split and `trace`'s sequences train (90 %) and validate."""
    if held_out is not None:
        if trace.num_sequences < 2:
            raise SystemExit("a trace of one sequence cannot also validate; give at least two")
        perm = torch.randperm(trace.num_sequences, generator=torch.Generator().manual_seed(seed))
        n_val = max(1, round(0.1 * trace.num_sequences))
        return ({"train": trace.select(perm[n_val:].sort().values), "val": trace.select(perm[:n_val].sort().values),
                 "test": held_out},
                f"trained on its {trace.num_sequences} sequences (seeded 90/10 train/validation split, seed {seed}), "
                f"tested on {held_out.num_sequences} other sequences")
    if trace.num_sequences >= 3:
        return trace.split((0.8, 0.1, 0.1), seed=seed), f"seeded split by sequence (seed {seed}): 80/10/10 %"
    if trace.num_sequences < 2:
        raise SystemExit("a trace of one sequence cannot hold out a test sequence; import more")
    lengths = (trace.offsets[1:] - trace.offsets[:-1]).tolist()
    longest = max(range(len(lengths)), key=lengths.__getitem__)
    rest = [s for s in range(len(lengths)) if s != longest]
    train = trace.select([longest])
    return ({"train": train, "val": train, "test": trace.select(rest)},
            f"{trace.num_sequences} sequences: the longest ({lengths[longest]} tokens) trains and validates, "
            "the others are tested")


def rank_precision(stream, candidates, k: int) -> dict:
    """How the candidates the simulator replays fare at the ranks admission calibrates (`runtime.admission`: rank r
    of a call's ranked keys): precision at each rank r < k (routed at its target layer's next call), and recall of
    the next layer's routed set within the candidates of that layer (decode: one token per pass)."""
    passes = [ids.tolist() for ids in stream.passes()]  # [P][T][L][k]
    hits, seen = [0] * k, [0] * k
    found = wanted = 0
    for p, per_layer in enumerate(candidates):
        for layer, keys in enumerate(per_layer):
            for r, (t, e) in enumerate(keys[:k]):
                q = p if t > layer else p + 1  # a target at or before the source layer is the next pass's
                if q < len(passes):
                    seen[r] += 1
                    hits[r] += any(e in token[t] for token in passes[q])
            nxt, q = (layer + 1) % len(passes[p][0]), p + (layer + 1 == len(passes[p][0]))
            if q < len(passes):
                routed = {e for token in passes[q] for e in token[nxt] if e >= 0}
                named = {e for t, e in keys if t == nxt}
                found += len(routed & named)
                wanted += len(routed)
    return {"precision_at_rank": [h / s if s else None for h, s in zip(hits, seen)],
            "named_at_rank": seen, "recall_next_layer": found / wanted if wanted else None}


def run_trace(directory: Path, args, held_out: Path | None = None) -> dict:
    t0 = time.perf_counter()
    trace = load_traces(directory, hidden=False)
    geo, manifest = trace.geometry, trace.manifest
    test_trace = load_traces(held_out, geometry=geo, hidden=False) if held_out is not None else None
    splits, how = split(trace, args.seed, test_trace)
    test = splits["test"]
    stream = RoutingStream.from_trace(test)
    if args.max_passes and stream.num_passes > args.max_passes:
        stream = stream.select_passes(0, args.max_passes)
    shapes = [s for s in matching_presets(stream) if ModelShape.from_name(s).geometry.num_experts == geo.num_experts]
    if not shapes:
        raise SystemExit(f"{directory}: no preset model shape has the trace's geometry {geo}")
    shape = ModelShape.from_name(shapes[0])
    replays, trained = [], {}
    for name in args.predictors:
        if name == "none":
            continue
        if name == "oracle":
            replays.append(replay_oracle(stream, geo.num_experts, args.lookahead))
            continue
        kind, options, loop, lookahead = FIT[name]
        lookahead = lookahead or args.lookahead
        if args.load_predictors is not None:  # fitted by an earlier run (--save-predictors): no training
            path = args.load_predictors / f"{directory.name}-{name}"
            if not path.is_dir():
                raise SystemExit(f"--load-predictors: no {path} (save it first with --save-predictors)")
            predictor = load_predictor(path, geo)
            trained[name] = {"kind": kind, "lookahead": lookahead, "options": options, "loaded_from": str(path),
                             "train_tokens": splits["train"].num_tokens, "val_tokens": splits["val"].num_tokens}
        else:
            loop = {**loop, **{k: v for k, v in (("steps", args.train_steps), ("max_minutes", args.train_minutes))
                               if v is not None}}
            config = TrainConfig(warmup_steps=max(1, min(100, loop["steps"] // 10)), device="cpu", seed=args.seed,
                                 **loop)
            predictor, record = fit_predictor(kind, splits, lookahead=lookahead, config=config, **options)
            if args.save_predictors is not None:
                save_predictor(predictor, args.save_predictors / f"{directory.name}-{name}")
            trained[name] = {k: record[k] for k in ("kind", "lookahead", "train_tokens", "val_tokens", "options")}
            if "result" in record:
                trained[name].update(best_val_recall=record["result"]["best_val_recall"],
                                     steps_run=record["result"]["steps_run"], stopped=record["result"]["stopped"])
        replays.append(replay_predictor(stream, predictor, geo, [None] * geo.num_layers, name))
    ranks = {rep.name: rank_precision(stream, rep.candidates, geo.top_k) for rep in replays}
    profile = HardwareProfile.from_name(args.profile)
    fits = memory_plan(shape, profile, (), context=SweepSettings().memory_context)["max_capacity"]
    capacities = tuple(c for c in args.capacities if c < fits)  # the largest that fits is added by the sweep
    policies = tuple(dict.fromkeys(map(resolve_policy_name, args.policies)))  # "default" -> the runtime's
    settings = SweepSettings(capacities=capacities, policies=policies,
                             prefetch_policies=tuple(p for p in policies if p != "belady"),
                             warmup_passes=args.warmup, context=args.context, misses=tuple(args.misses),
                             host=args.host if set(args.misses) - {"fetch"} else None)
    sweep = run_sweep(stream, [shape], [profile], settings, replays)
    return {
        "trace": str(directory), "held_out": str(held_out) if held_out is not None else None, "model": manifest.model, "geometry": geo.to_dict(), "shape": shape.name,
        "source_format": manifest.source.get("format"), "trace_tokens": trace.num_tokens,
        "trace_sequences": trace.num_sequences, "split": how,
        "split_tokens": {k: v.num_tokens for k, v in splits.items()},
        "split_sequences": {k: v.num_sequences for k, v in splits.items()},
        "simulated_passes": stream.num_passes, "trained": trained, "ranks": ranks, "sweep": sweep, "max_fit_capacity": fits,
        "capacities_left_out": [c for c in args.capacities if c not in capacities],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def governor_table(runs: list[dict]) -> list[str]:
    """Markdown lines: the share of layer calls at which each predictor ran (the governor, `runtime/admission.py`:
    it runs while its copies pay for its calls, else at probe calls that copy nothing), per capacity and mode."""
    runs = [r for r in runs if r["predictor"] != "none" and "predict_calls" in r]
    if not runs:
        return []
    names = list(dict.fromkeys(r["predictor"] for r in runs))
    lines = ["Layer calls at which the predictor ran (the rest it was skipped: its copies did not pay for its calls; "
             "some of those that ran were probes that copy nothing):", "",
             "| capacity | misses | " + " | ".join(names) + " |", "|---|---|" + "---:|" * len(names)]
    for cap, mode in dict.fromkeys((r["capacity"], r["misses_mode"]) for r in runs):
        cells = []
        for name in names:
            row = next((r for r in runs if (r["capacity"], r["misses_mode"], r["predictor"]) == (cap, mode, name)), None)
            n = row and row["predict_calls"] + row["predict_skipped"]
            cells.append(f"{row['predict_calls'] / n:.1%}" if n else "—")
        lines.append(f"| {cap:.3f} | {mode} | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(result: dict) -> str:
    s = result["settings"]
    parts = [f"**Real routing, simulated decode on {s['profile']}** (policies x capacities x predictors; tok/s and "
             "expert hit rate from the simulator, not measured on a GPU; 'of bound' is tok/s over "
             "max(compute, Belady-MIN miss bytes / PCIe)).", ""]
    for t in result["traces"]:
        parts += [f"*{t['model']} ({t['source_format']}, {t['trace_sequences']} sequences, {t['trace_tokens']} tokens) "
                  f"as {t['shape']}: {t['split']}; {t['simulated_passes']} held-out decode steps simulated "
                  f"(warm-up {s['warmup']} excluded)*", "",
                  runs_table(t["sweep"], s["profile"], t["shape"]), ""]
        if t["capacities_left_out"]:
            parts += [f"Capacities {t['capacities_left_out']} do not fit {s['profile']}'s memory with this model "
                      f"(largest: {t['max_fit_capacity']:.3f}) and are left out.", ""]
        if t.get("ranks"):
            k = t["geometry"]["top_k"]
            parts += ["Candidates on the simulated held-out steps, at the ranks admission calibrates (precision: "
                      "named at rank r and routed at its target; recall: the next layer's routed experts named; "
                      "resident or not):", "",
                      "| predictor | " + " | ".join(f"rank {r}" for r in range(k)) + " | recall, next layer |",
                      "|---|" + "---:|" * (k + 1)]
            for name, rk in t["ranks"].items():
                cells = ["—" if v is None else f"{v:.3f}" for v in rk["precision_at_rank"]]
                rec = rk["recall_next_layer"]
                parts.append(f"| {name} | " + " | ".join(cells) + f" | {'—' if rec is None else f'{rec:.3f}'} |")
            parts.append("")
        parts += governor_table(t["sweep"]["runs"])
        for name, rec in t["trained"].items():
            extra = f", val recall@k {rec['best_val_recall']:.3f} after {rec['steps_run']} steps" \
                if "best_val_recall" in rec else ""
            what = f" ({rec['kind']}, lookahead {rec['lookahead']}, {rec['options']})" if rec.get("lookahead") else ""
            how = f" (loaded from {rec['loaded_from']})" if rec.get("loaded_from") else ""
            parts.append(f"- {name}{what}: fitted on {rec['train_tokens']} training tokens{extra}{how}")
        parts.append("")
    parts.append(f"Settings: policies {', '.join(s['policies'])}; capacities {s['capacities']} + max fit; "
                 f"lookahead {s['lookahead']}; context {s['context']}; max passes {s['max_passes']}. "
                 f"Simulated on {environment_line(result['environment'])}.")
    return "\n".join(parts) + "\n"


def plot(result: dict, path: Path) -> bool:
    try:
        from specmoe.measure.results import pyplot

        plt = pyplot()
    except ImportError:
        return False
    traces = result["traces"]
    fig, axes = plt.subplots(1, len(traces), figsize=(6.5 * len(traces), 4.5), squeeze=False)
    for ax, t in zip(axes[0], traces):
        runs = t["sweep"]["runs"]
        for key in dict.fromkeys((r["policy"], r["predictor"]) for r in runs):
            rows = sorted((r for r in runs if (r["policy"], r["predictor"]) == key), key=lambda r: r["capacity"])
            style = "-" if key[1] == "none" else "--"
            ax.plot([r["capacity"] for r in rows], [r["tok_s"] for r in rows], style, marker="o",
                    label=key[0] if key[1] == "none" else f"{key[1]} + {key[0]}")
        bound = sorted({(r["capacity"], r["bound_tok_s"]) for r in runs})
        ax.plot([c for c, _ in bound], [b for _, b in bound], ":", color="black", label="bound")
        ax.set_title(f"{t['shape']} ({t['source_format']}), simulated {result['settings']['profile']}", fontsize=9)
        ax.set_xlabel("cache capacity (fraction of experts)")
        ax.set_ylabel("decode tok/s (simulated)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("traces", nargs="*", type=Path, help="trace directories written by specmoe import-routing")
    p.add_argument("--held-out", nargs="+", default=None, metavar="DIR",
                   help="one trace directory per trace ('none': that trace's own split): its sequences are the test "
                        "split, the trace's own train (90 %%) and validate (10 %%); default: a seeded 80/10/10 split "
                        "of each trace")
    p.add_argument("--misses", nargs="+", default=["fetch"], choices=("fetch", "host", "auto"),
                   help="where misses run (SpeculativeMoE's misses): each row once per mode")
    p.add_argument("--host", default="3090-box", help="host profile for misses host/auto")
    p.add_argument("--save-predictors", type=Path, default=None, metavar="DIR",
                   help="also save each fitted predictor to DIR/<trace>-<name> (config.json + model.safetensors)")
    p.add_argument("--policies", nargs="+", default=["lru", "lfu", "default", "belady"],
                   help="eviction policies (any `specmoe simulate --policies` name); belady runs without a predictor")
    p.add_argument("--capacities", type=float, nargs="+", default=[0.1, 0.25, 0.5],
                   help="fractions of all experts; the largest that fits the profile is added")
    p.add_argument("--predictors", nargs="+", default=list(PREDICTORS), choices=PREDICTORS)
    p.add_argument("--profile", default="rtx3090")
    p.add_argument("--lookahead", type=int, default=1)
    p.add_argument("--context", type=int, default=512, help="KV tokens read per decode step")
    p.add_argument("--warmup", type=int, default=16, help="decode steps replayed before measuring")
    p.add_argument("--max-passes", type=int, default=600, help="simulate the first N held-out decode steps")
    p.add_argument("--train-steps", type=int, default=None,
                   help="optimizer steps of every trained predictor, fewer only where validation stops it early "
                        "(default: FIT's: history and interlayer 600, affinity 1500)")
    p.add_argument("--train-minutes", type=float, default=None,
                   help="also cap each predictor's training at this wall time (default: none; with a cap the "
                        "steps run, and so the rows, depend on the machine's load)")
    p.add_argument("--load-predictors", type=Path, default=None, metavar="DIR",
                   help="load the fitted predictors from DIR/<trace>-<name> (an earlier run's --save-predictors) "
                        "instead of training them")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and of training")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (training)")
    p.add_argument("--name", default="real_routing")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--report-only", action="store_true", help="only remake the .md from the existing JSON")
    args = p.parse_args(argv)
    if args.report_only:
        json_path = args.out / f"{args.name}.json"
        write_text(json_path.with_suffix(".md"), markdown(read_json(json_path)))
        print(f"wrote {json_path.with_suffix('.md')}")
        return 0
    if not args.traces:
        p.error("give trace directories (or --report-only)")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    if args.held_out is not None and len(args.held_out) != len(args.traces):
        p.error(f"--held-out takes one directory per trace: {len(args.traces)} traces, {len(args.held_out)} given")
    held_out = [None if h in (None, "none") else Path(h) for h in (args.held_out or [None] * len(args.traces))]
    traces = [run_trace(d, args, h) for d, h in zip(args.traces, held_out)]
    result = {
        "environment": environment("cpu"),
        "settings": {"profile": args.profile, "misses": args.misses, "host": args.host, "policies": list(dict.fromkeys(map(resolve_policy_name, args.policies))), "capacities": args.capacities,
                     "predictors": args.predictors, "lookahead": args.lookahead, "context": args.context,
                     "warmup": args.warmup, "max_passes": args.max_passes, "train_steps": args.train_steps,
                     "train_minutes": args.train_minutes,
                     "load_predictors": None if args.load_predictors is None else str(args.load_predictors), "seed": args.seed, "threads": args.threads, "simulated": True,
                     "command": "python benchmarks/real_routing.py " + " ".join(sys.argv[1:] if argv is None else argv)},
        "traces": traces,
    }
    json_path = args.out / f"{args.name}.json"
    write_json(json_path, result)
    md = markdown(result)
    write_text(json_path.with_suffix(".md"), md)  # README embeds it under its own heading
    png = json_path.with_suffix(".png")
    wrote = [json_path, json_path.with_suffix(".md")] + ([png] if plot(result, png) else [])
    print(md)
    print("wrote " + ", ".join(map(str, wrote)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
