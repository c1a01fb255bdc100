"""Eviction policies on routing streams: LRU, aged LFU, the runtime's default, a learned policy (when given) and
Belady's MIN (demand fetching), and the deployable ones again with the oracle's prefetches, at each capacity
and at the largest that fits the profile. Simulated (`specmoe.sim`): hit rate, MiB moved per token, decode tok/s.

    python benchmarks/eviction_policies.py benchmarks/results/bench_reference_cpu.routing.safetensors
    python benchmarks/eviction_policies.py STREAM.safetensors ... --max-passes 3000 --capacities 0.1 0.25

    # a learned policy (specmoe train --policy learned), scored on sequences it was not trained on
    specmoe import-routing moe-beyond DIR/prompts_801-1000 --out traces/deepseek_test
    specmoe train traces/deepseek_train --policy learned --sequences 0:799 --out policies/deepseek
    python benchmarks/eviction_policies.py traces/deepseek_test --learned policies/deepseek --capacities 0.25 0.5

    # the reference model's own routing: generated over held-out text, trained on half its windows, scored on
    # the other half (nothing is downloaded; the trace and the policy go to --reference-dir)
    python benchmarks/eviction_policies.py --reference --capacities 0.25 0.5 --name eviction_learned_reference

Each TRACE is a routing stream written by `RoutingStream.save` or a trace directory (its windows replayed as
decode); `--sequences` keeps some of its sequences (the held-out ones). Its model shape is the preset with its
routing geometry (or --shapes, one per trace), once per --compression scheme. A learned policy's measured cost
beyond the default's is charged per MoE layer call (see `specmoe.training.eviction`). Writes
benchmarks/results/<name>.{json,md,png}: settings, environment and aggregate counters per run only (no routing).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specmoe.bench.environment import environment
from specmoe.bench.report import markdown_table
from specmoe.io import read_json, write_json, write_text
from specmoe.runtime.policies import DEFAULT_POLICY
from specmoe.sim.hardware import PROFILES, HardwareProfile
from specmoe.sim.predictions import replay_oracle
from specmoe.sim.shapes import PRESETS, ModelShape, matching_presets
from specmoe.sim.stream import RoutingStream, load_stream
from specmoe.sim.sweep import SweepSettings, run_sweep

RESULTS = Path(__file__).parent / "results"
DEMAND = ("lru", "lfu", DEFAULT_POLICY, "belady")
PREFETCH = ("lru", DEFAULT_POLICY)
MiB = 2**20


def shape_for(stream: RoutingStream, name: str | None) -> ModelShape:
    """The named preset, else the first preset whose routing geometry the stream has."""
    found = matching_presets(stream)
    names = [name] if name else sorted(PRESETS)
    for n in names:
        if n in found:
            return ModelShape.from_name(n)
    raise SystemExit(f"no shape among {names} has the stream's geometry L={stream.num_layers} k={stream.top_k} "
                     f"E={stream.num_experts}; pass --shapes")


def select(stream: RoutingStream, spec: str) -> tuple[RoutingStream, str]:
    """The sequences START:STOP of `stream` ("all": every one), and how to say which."""
    if spec == "all":
        return stream, f"all {stream.num_sequences} sequences"
    try:
        a, b = (int(v) for v in spec.split(":"))
    except ValueError:
        raise SystemExit(f"--sequences takes START:STOP or all, got {spec!r}") from None
    if not 0 <= a < b <= stream.num_sequences:
        raise SystemExit(f"--sequences {spec}: the trace has {stream.num_sequences} sequences")
    return stream.select_sequences(range(a, b)), f"sequences {a}:{b} of {stream.num_sequences}"


def label(run: dict, learned: str | None) -> str:
    policy = "learned" if learned and run["policy"] == learned else run["policy"]
    return policy if run["predictor"] == "none" else f"{run['predictor']} + {policy}"


def trace_markdown(entry: dict) -> str:
    rows = []
    learned = entry.get("learned", {}).get("path")
    for r in sorted(entry["runs"], key=lambda r: (r["capacity"], r["predictor"] != "none", label(r, learned))):
        rows.append([f"{r['capacity']:.3f}" + (" (max fit)" if r["max_fit"] else ""), label(r, learned),
                     f"{r['hit_rate']:.3f}", f"{r['bytes_moved'] / max(r['tokens'], 1) / MiB:.0f}", f"{r['tok_s']:.2f}",
                     f"{r['bound_tok_s']:.2f}"])
    head = (f"*{entry['trace']}* ({entry['shape']}, {entry['scored']}: {entry['passes']} passes, {entry['tokens']} "
            "tokens)\n\n")
    if learned:
        t = entry["learned"]
        head += (f"learned: `specmoe train --policy learned` on {t['trained_on']} of {t['traces']} "
                 f"({t['rule']}); scored on {entry['scored']}, none of them trained on; "
                 f"{t['cost_us']:.1f} us per MoE layer call measured at training "
                 f"(hit-density {t['hit_density_us']:.1f} us the same way), {t['charged_us']:.1f} us charged.\n\n")
    return head + markdown_table(["capacity", "policy", "hit rate", "MiB moved/token", "tok/s (simulated)",
                                  "bound tok/s"], rows)


def plot(out: dict, path: Path) -> bool:
    try:
        from specmoe.measure.results import pyplot

        plt = pyplot()
    except ImportError:
        return False
    traces = out["traces"]
    fig, axes = plt.subplots(len(traces), 2, figsize=(11, 4 * len(traces)), squeeze=False)
    for (ax_hit, ax_mib), t in zip(axes, traces):
        learned = t.get("learned", {}).get("path")
        demand = [r for r in t["runs"] if r["predictor"] == "none"]
        for name in dict.fromkeys(label(r, learned) for r in demand):
            rows = sorted((r for r in demand if label(r, learned) == name), key=lambda r: r["capacity"])
            style = dict(color="black", linestyle=":") if name == "belady" else {}
            caps = [r["capacity"] for r in rows]
            ax_hit.plot(caps, [r["hit_rate"] for r in rows], marker="o", label=name, **style)
            ax_mib.plot(caps, [r["bytes_moved"] / max(r["tokens"], 1) / MiB for r in rows], marker="o", label=name,
                        **style)
        for ax, what in ((ax_hit, "hit rate (demand fetching)"), (ax_mib, "MiB moved per token")):
            ax.set_title(f"{t['trace']} ({t['shape']}), simulated {out['settings']['profile']}", fontsize=9)
            ax.set_xlabel("cache capacity (fraction of experts)")
            ax.set_ylabel(what)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def learned_info(path: Path) -> dict:
    config = read_json(path / "config.json", what="learned policy config")
    training, cost, rule = config.get("training", {}), config.get("cost", {}), config.get("rule", {})
    return {"path": str(path), "traces": training.get("traces", "?"), "trained_on": training.get("sequences", "?"),
            "rule": f"hit density within {rule.get('horizon')} visits of a table of Belady's next use"
                    + (", the table updated online from the routing served (every {period} passes, prior weight "
                       "{prior:g})".format(**rule["online"]) if rule.get("online") else ""),
            "cost_us": cost.get("per_call_s", 0.0) * 1e6,
            "hit_density_us": cost.get("hit_density_per_call_s", 0.0) * 1e6,
            "charged_us": cost.get("charged_s", 0.0) * 1e6, "training": training}


def reference_routing(work: Path, windows: int, length: int) -> tuple[Path, Path, str]:
    """The packaged reference model's routing over `windows` windows of `length` tokens of its corpus's validation
    files (never trained on; `collect_traces` into work/routing), and a learned policy trained on the first half
    of those windows (work/policy). Returns (trace directory, policy directory, the scored sequences)."""
    import torch

    from specmoe.reference.corpus import CorpusConfig, load_corpus
    from specmoe.reference.data import encode_documents, eval_windows
    from specmoe.reference.model import CHECKPOINT_DIR, TRAINING_NAME, load_reference_model, load_reference_tokenizer
    from specmoe.sim.stream import load_stream
    from specmoe.traces.collect import collect_traces
    from specmoe.training.eviction import EvictionTrainConfig, train_learned_policy

    seed = read_json(CHECKPOINT_DIR / TRAINING_NAME, what="reference training record")["settings"]["seed"]
    split = load_corpus(CorpusConfig(seed=seed))
    tokens = encode_documents(load_reference_tokenizer(), split.texts("val"))
    rows = eval_windows(tokens, length, windows)  # [N, T]
    if rows.shape[0] < 2:
        raise SystemExit(f"the validation text holds {rows.shape[0]} windows of {length} tokens: need 2 or more")
    trace, policy = work / "reference_routing", work / "reference_policy"
    collect_traces(load_reference_model("cpu", torch.float32), rows, trace, model_name="specmoe reference model",
                   source={"text": "the corpus's validation files", "windows": int(rows.shape[0]), "tokens": length},
                   hidden_layers="none", overwrite=True, progress=False)
    half = rows.shape[0] // 2
    stream = load_stream(trace)
    train = stream.select_sequences(range(half))
    geometry = {"num_layers": stream.num_layers, "num_experts": stream.num_experts, "top_k": stream.top_k}
    train_learned_policy(train, geometry, policy, EvictionTrainConfig(),
                         {"traces": f"the reference model's routing ({trace.name})",
                          "sequences": f"sequences 0:{half} of {rows.shape[0]}"})
    return trace, policy, f"{half}:{rows.shape[0]}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("traces", nargs="*", type=Path, help="routing streams (.safetensors) or trace directories")
    ap.add_argument("--reference", action="store_true",
                    help="add the reference model's routing over held-out text, a policy trained on half of it")
    ap.add_argument("--reference-windows", type=int, default=64, help="--reference: windows of text")
    ap.add_argument("--reference-tokens", type=int, default=128, help="--reference: tokens per window")
    ap.add_argument("--reference-dir", type=Path, help="--reference: where its trace and policy go (default: a "
                    "temporary directory)")
    ap.add_argument("--shapes", nargs="+", choices=sorted(PRESETS),
                    help="model shape per trace (default: by geometry)")
    ap.add_argument("--compression", nargs="+", default=["none"],
                    help="expert storage schemes, each shape once per scheme")
    ap.add_argument("--sequences", nargs="+", help="per trace: START:STOP sequences to score, or all (default all)")
    ap.add_argument("--learned", nargs="+", type=Path, help="per trace: a learned policy directory (or none)")
    ap.add_argument("--profile", default="rtx3090", choices=sorted(PROFILES))
    ap.add_argument("--capacities", type=float, nargs="+", default=[0.25], help="the max-fit capacity is added")
    ap.add_argument("--max-passes", type=int, default=None, help="replay only the first N passes of each trace")
    ap.add_argument("--warmup", type=int, default=64, help="passes replayed before measuring")
    ap.add_argument("--no-prefetch", action="store_true", help="skip the runs with the oracle's prefetches")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default="eviction_policies")
    ap.add_argument("--render", action="store_true", help="only rewrite <name>.md/.png from <name>.json")
    args = ap.parse_args(argv)
    json_path = args.out / f"{args.name}.json"
    if args.render:
        write_report(read_json(json_path, what="eviction results"), json_path)
        return 0
    for opt in ("shapes", "sequences", "learned"):
        if getattr(args, opt) and len(getattr(args, opt)) != len(args.traces):
            ap.error(f"give one --{opt} entry per trace")
    if not args.traces and not args.reference:
        ap.error("give routing traces, --reference, or both")
    if args.reference:
        import tempfile

        work = args.reference_dir or Path(tempfile.mkdtemp(prefix="specmoe-reference-"))
        trace, policy, scored = reference_routing(work, args.reference_windows, args.reference_tokens)
        n = len(args.traces)
        args.traces.append(trace)
        args.sequences = (args.sequences or ["all"] * n) + [scored]
        args.learned = (args.learned or [Path("none")] * n) + [policy]
        args.shapes = args.shapes and args.shapes + [None]
    profile = HardwareProfile.from_name(args.profile)
    out = {"environment": environment("cpu"), "settings": {"profile": profile.name, "max_passes": args.max_passes,
           "default_policy": DEFAULT_POLICY, "compression": args.compression, "warmup_passes": args.warmup,
           "reference": {"windows": args.reference_windows, "tokens": args.reference_tokens} if args.reference
           else None},
           "traces": []}
    for i, path in enumerate(args.traces):
        stream, scored = select(load_stream(path), args.sequences[i] if args.sequences else "all")
        if args.max_passes and args.max_passes < stream.num_passes:
            stream = stream.select_passes(0, args.max_passes)
            scored += f", first {args.max_passes} passes"
        learned = args.learned[i] if args.learned and str(args.learned[i]) != "none" else None
        extra = (str(learned),) if learned else ()
        warmup = min(args.warmup, stream.num_passes // 2)
        settings = SweepSettings(capacities=tuple(args.capacities), policies=DEMAND[:-1] + extra + DEMAND[-1:],
                                 prefetch_policies=() if args.no_prefetch else PREFETCH + extra, warmup_passes=warmup)
        out["settings"].update(settings.to_dict())
        base = shape_for(stream, args.shapes[i] if args.shapes else None)
        predictors = [] if args.no_prefetch else [replay_oracle(stream, base.num_experts)]
        for scheme in args.compression:
            shape = base.compressed(scheme)
            sweep = run_sweep(stream, [shape], [profile], settings, predictors)
            keep = ("capacity", "max_fit", "policy", "predictor", "hit_rate", "tok_s", "hits", "misses",
                    "prefetch_issued", "prefetch_used", "prefetch_wasted", "bytes_moved", "stall_s", "tokens",
                    "num_slots", "bound_tok_s")
            entry = {"trace": path.name, "shape": shape.name, "scored": scored, "passes": stream.num_passes,
                     "tokens": stream.num_tokens, "warmup_passes": warmup,
                     "runs": [{k: r[k] for k in keep} for r in sweep["runs"]]}
            if learned:
                entry["learned"] = learned_info(learned)
            out["traces"].append(entry)
            print(trace_markdown(entry) + "\n", flush=True)
    write_json(json_path, out)
    write_report(out, json_path)
    return 0


def write_report(out: dict, json_path: Path) -> None:
    """<name>.md and <name>.png from the results."""
    env, s = out["environment"], out["settings"]
    md = [f"**Eviction policies, simulated decode on {s['profile']}** (hit rate, MiB moved per token and tok/s from "
          "the simulator, not measured on a GPU). "
          f"Default policy: {s['default_policy']}. git {env.get('git_sha', '?')}; warm-up {s['warmup_passes']} passes "
          "(at most half the stream)" + (f"; first {s['max_passes']} passes" if s.get("max_passes") else "") + ".\n"]
    md += [trace_markdown(t) + "\n" for t in out["traces"]]
    png = json_path.with_suffix(".png")
    if plot(out, png):
        md.append(f"Plot (hit rate and MiB moved per token against capacity, demand fetching): benchmarks/results/"
                  f"{png.name}.\n")
    write_text(json_path.with_suffix(".md"), "\n".join(md))
    print(f"wrote {json_path}, {json_path.with_suffix('.md')}")


if __name__ == "__main__":
    sys.exit(main())
