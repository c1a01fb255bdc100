"""Routing-real simulator figures: the reference model's learned routing (24 MoE layers, 60 experts, top-4:
Qwen1.5-MoE-A2.7B's geometry) replayed with Qwen1.5-MoE-A2.7B's real expert sizes on hardware profiles.

Held-out text windows are run through the model once (prefill) with `capture_routing`, keeping every
layer's hidden state; in a causal LM each window is exactly the routing of decoding it token by token, so
the windows, back to back, are a decode stream of `--tokens` steps with a warm cache. The simulator replays
it for every eviction policy, the oracle, the pre-gate and any trained predictor, at several capacities and
at the largest capacity that fits each GPU; every row shows its distance to the bound. The memory table
covers all six model shapes (tok/s only where a trace of that routing geometry exists).

    python benchmarks/simulate_routing_real.py          # reference model + its packaged trained predictor, 5 GPUs
    python benchmarks/simulate_routing_real.py --predictor .cache/predictors/X --predictor .cache/predictors/Y
    python benchmarks/simulate_routing_real.py --name simulate_compression --shapes qwen1.5-moe-a2.7b \
        --compression none int8 int4-g128 --profiles rtx3090 --capacities 0.25 0.5   # compressed experts

Writes benchmarks/results/simulate_routing_real.{json,md,png} and simulate_routing_real_<first profile>.md (the
short version README shows). Random-weight models must not be used for
these figures (their routing flatters caches); --model exists for other *trained* checkpoints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from specmoe.measure import environment
from specmoe.io import read_json, write_json, write_text
from specmoe.predictors import make_predictor
from specmoe.runtime.adapters import find_moe_layers
from specmoe.sim.hardware import HardwareProfile
from specmoe.sim.predictions import replay_oracle, replay_predictor
from specmoe.sim.report import deployable, sweep_markdown, sweep_summary, write_sweep_report
from specmoe.sim.shapes import PRESETS, ModelShape
from specmoe.sim.stream import RoutingStream
from specmoe.sim.sweep import SweepSettings, run_sweep
from specmoe.traces import capture_routing

RESULTS = Path(__file__).parent / "results"
GOAL = {"shape": "qwen1.5-moe-a2.7b", "profile": "rtx3090", "tok_s": 40.0}


def load_model_and_windows(args) -> tuple[torch.nn.Module, torch.Tensor, str]:
    """The model and held-out token windows [N, W] (the reference model's validation files by default)."""
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(args.model, local_files_only=True).float().eval()
        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        name = str(args.model)
    else:
        from specmoe.reference.model import load_reference_model, load_reference_tokenizer

        model, tokenizer, name = load_reference_model(device="cpu"), load_reference_tokenizer(), "reference model"
    if args.text:
        texts = [Path(p).read_text() for p in args.text]
        source = ", ".join(map(str, args.text))
    else:
        from specmoe.reference.corpus import load_corpus

        corpus = load_corpus()
        texts, source = corpus.texts("val"), "reference corpus, validation files (never trained on)"
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = torch.tensor([t for text in texts for t in tokenizer(text)["input_ids"] + eos], dtype=torch.long)
    n = min(args.tokens // args.window, ids.numel() // args.window)
    if n < 1:
        raise SystemExit(f"the text holds {ids.numel()} tokens, fewer than one window of {args.window}")
    starts = torch.linspace(0, ids.numel() - args.window, n).long()
    windows = torch.stack([ids[s : s + args.window] for s in starts.tolist()])  # [N, W], evenly spread
    return model, windows, f"{name}; {n} windows of {args.window} tokens from {source}"


def record_stream(model, windows: torch.Tensor) -> RoutingStream:
    """Prefill every window with all layers' hidden states kept; tokens back to back as decode steps."""
    geometry = find_moe_layers(model).geometry
    L = geometry.num_layers
    ids, hidden = [], {layer: [] for layer in range(L)}
    for w in tqdm(windows, desc="record routing", unit="window"):
        with torch.no_grad(), capture_routing(model, hidden_layers=range(L)) as cap:
            model(input_ids=w[None])
        (p,) = cap.passes
        ids.append(p.ids)
        for layer in range(L):
            hidden[layer].append(p.hidden[layer])
    offsets = torch.tensor([0] + [x.shape[0] for x in ids]).cumsum(0)
    return RoutingStream.from_sequences(torch.cat(ids), offsets, {k: torch.cat(v) for k, v in hidden.items()},
                                        num_experts=geometry.num_experts)


def packaged_predictors() -> list[Path]:
    """The trained predictors shipped with the reference model (see specmoe.reference.demo)."""
    try:
        from specmoe.reference.demo import DEFAULT_TRAINED_PREDICTORS
    except ImportError:
        return []
    return [p for p in DEFAULT_TRAINED_PREDICTORS if (Path(p) / "config.json").is_file()]


def goal_check(sweep: dict) -> dict:
    runs = [r for r in sweep["runs"] if r["shape"] == GOAL["shape"] and r["profile"] == GOAL["profile"] and r["max_fit"]
            and deployable(r)]  # MIN and the oracle need the future: bounds, not ways to run
    best = max(runs, key=lambda r: r["tok_s"], default=None)
    return {**GOAL, "capacity": best["capacity"] if best else None, "best": best and
            {"policy": best["policy"], "predictor": best["predictor"], "tok_s": best["tok_s"]},
            "met": bool(best and best["tok_s"] >= GOAL["tok_s"])}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, help="another trained checkpoint (default: the reference model)")
    ap.add_argument("--text", nargs="+", type=Path, help="text files (default: the reference corpus' validation split)")
    ap.add_argument("--tokens", type=int, default=4096, help="decode steps to replay")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--predictor", action="append", default=None,
                    help="a saved trained predictor (repeatable; default: the one packaged with the reference model)")
    ap.add_argument("--profiles", nargs="+", default=["rtx3090", "rtx4090", "a6000", "h100", "h200"])
    ap.add_argument("--capacities", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    ap.add_argument("--shapes", nargs="+", default=list(PRESETS), choices=list(PRESETS), metavar="SHAPE")
    ap.add_argument("--compression", nargs="+", default=["none"], metavar="SCHEME",
                    help="host storage of experts (none, int8, int4-g128, ...): each shape once per scheme")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--name", default="simulate_routing_real")
    ap.add_argument("--report-only", action="store_true", help="only remake the .md/.png from the existing JSON")
    args = ap.parse_args(argv)
    if args.predictor is None:
        args.predictor = [str(p) for p in packaged_predictors()] if not args.model else []
    json_path = args.out / f"{args.name}.json"
    if args.report_only:
        write_reports(json_path, args.profiles[0])
        return 0

    model, windows, described = load_model_and_windows(args)
    moe = find_moe_layers(model)
    geometry, routers = moe.geometry, [layer.router for layer in moe.layers]
    stream = record_stream(model, windows)
    predictors = [replay_oracle(stream, geometry.num_experts, lookahead=1),
                  replay_predictor(stream, make_predictor("pregate"), geometry, routers, "pregate")]
    for path in args.predictor:  # named by their type ("hidden", "interlayer", ...), the path if two share one
        predictor = make_predictor(path, geometry=geometry)
        name = predictor.kind if all(predictor.kind != p.name for p in predictors) else Path(path).name
        predictors.append(replay_predictor(stream, predictor, geometry, routers, name))
    shapes = [ModelShape.from_name(name).compressed(c) for name in args.shapes for c in args.compression]
    settings = SweepSettings(capacities=tuple(args.capacities))
    first, rest = args.profiles[0], args.profiles[1:]
    sweep = run_sweep(stream, shapes, [HardwareProfile.from_name(first)], settings, predictors)
    if rest:  # other GPUs: the largest capacity that fits only, fewer policies
        light = SweepSettings(capacities=(0.5,), policies=("lru", "belady"), prefetch_policies=("lru",))
        more = run_sweep(stream, shapes, [HardwareProfile.from_name(p) for p in rest], light, predictors)
        for key in ("runs", "memory", "ceilings"):
            sweep[key] += more[key]
    sweep.update(environment=environment("cpu"), model=described, geometry=geometry.to_dict(),
                 trained_predictors={p.name: str(path) for p, path in zip(predictors[2:], args.predictor)},
                 stream={"description": f"{described}: {stream.num_passes} decode steps"}, goal=goal_check(sweep))
    write_json(json_path, sweep)
    write_reports(json_path, first)
    print(sweep_markdown(sweep))
    return 0


def write_reports(json_path: Path, profile: str) -> None:
    """The full .md/.png and README's short version (<name>_<profile>.md), all from the JSON."""
    md, png = write_sweep_report(json_path)
    summary = json_path.with_name(f"{json_path.stem}_{profile}.md")
    write_text(summary, sweep_summary(read_json(json_path), profile))
    print(f"wrote {md}, {summary}, {png}")


if __name__ == "__main__":
    sys.exit(main())
