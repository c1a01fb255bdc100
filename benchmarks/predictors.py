"""Predictor figures: traces of a model (default: the reference model), the history predictor counted and the
inter-layer and hidden-state predictors trained on them, everything evaluated on held-out sequences next to
the pre-gate and random baselines. Writes results/predictors.json, then .md and .png from that JSON; README
shows the .md through its `<!-- results:predictors -->` block (python benchmarks/update_readme.py).

    python benchmarks/predictors.py                              # reference model, CPU, about 15 minutes
    python benchmarks/predictors.py --model PATH --tokens 40000 --minutes 1 --out /tmp/figures

Traces and trained predictors are kept under --work (default .cache/predictors/) and reused when the
settings match (--recollect to collect again).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path

import torch

from specmoe.measure import environment
from specmoe.io import read_json
from specmoe.predictors import save_predictor
from specmoe.traces import collect_traces, load_traces, read_manifest, text_files, token_windows
from specmoe.traces.cli import default_text, load_model_and_tokenizer
from specmoe.training.evaluate import (
    EvalConfig, baseline_predictors, bind_all, describe, eval_settings, evaluate_predictors,
)
from specmoe.training.fit import fit_predictor
from specmoe.training.loop import TrainConfig
from specmoe.training.report import build_report, write_report

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results"
TRAINED = {"interlayer": {}, "hidden": {"router_init": True}}


def collect(args, work: Path) -> Path:
    """Collect traces unless a finished trace of the same model and settings is already in `work`."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", args.model).strip("-")
    out = work / f"traces-{slug}-{args.tokens}-{args.window}-s{args.seed}"
    want = {"model_arg": args.model, "tokens_asked": args.tokens, "window": args.window, "seed": args.seed}
    if not args.recollect:
        try:
            if {k: read_manifest(out).source.get(k) for k in want} == want:
                print(f"reusing traces in {out}")
                return out
        except (FileNotFoundError, ValueError):
            pass
    model, tokenizer, name = load_model_and_tokenizer(args.model, args.device)
    if args.text:
        files, described = text_files(args.text, "*.py"), {"paths": [str(p) for p in args.text]}
    else:
        files, described = default_text(args.model)
    windows, source = token_windows(tokenizer, files, args.window, args.tokens, seed=args.seed)
    source = {**described, **source, **want}
    collect_traces(model, windows, out, model_name=name, source=source, hidden_layers="all",
                   batch_size=args.batch_size, overwrite=True)
    return out


def goal_check(results: dict, lookaheads=(1, 2)) -> dict:
    """Does the best trained predictor beat both the pre-gate and the history predictor in recall@k?"""
    out = {}
    for d in lookaheads:
        recall = {n: r["lookahead"][d]["within"]["recall@k"] for n, r in results.items() if d in r["lookahead"]}
        best = max((n for n in recall if n in TRAINED), key=recall.get)
        out[str(d)] = {"best_trained": best, "recall@k": recall[best], "pregate": recall["pregate"],
                       "history": recall["history"], "met": recall[best] > max(recall["pregate"], recall["history"])}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="reference", help="'reference' (default) or a save_pretrained directory")
    ap.add_argument("--text", nargs="+", type=Path, default=None,
                    help="text (default: the reference model's held-out files, else the stdlib's sources)")
    ap.add_argument("--tokens", type=int, default=120_000, help="trace tokens to collect")
    ap.add_argument("--window", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--batch-size", type=int, default=8, help="windows per forward pass when collecting")
    ap.add_argument("--lookahead", type=int, default=2)
    ap.add_argument("--minutes", type=float, default=4.0, help="training budget per trained predictor")
    ap.add_argument("--steps", type=int, default=6000, help="training steps at most per trained predictor")
    ap.add_argument("--seed", type=int, default=0, help="seeds text order, split, weights and batches")
    ap.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads (default 1: on a busy machine OpenMP's spinning threads cost far more)")
    ap.add_argument("--work", type=Path, default=ROOT / ".cache" / "predictors", help="traces + trained predictors")
    ap.add_argument("--recollect", action="store_true", help="collect traces even if matching ones exist")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where predictors.json/.md/.png go")
    ap.add_argument("--package", type=Path, default=None, metavar="DIR",
                    help="also save the trained predictor with the best recall@k one layer ahead to DIR (the demo "
                         "ships specmoe/reference/predictors/hidden-l2 from this)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()

    traces = collect(args, args.work)
    splits = load_traces(traces).split(seed=args.seed)
    test = splits["test"]
    predictors = baseline_predictors(splits["train"], args.lookahead, seed=args.seed)
    records = {}
    config = TrainConfig(steps=args.steps, max_minutes=args.minutes, seed=args.seed, device=args.device)
    for kind, options in TRAINED.items():
        predictor, records[kind] = fit_predictor(kind, splits, lookahead=args.lookahead, config=config, **options)
        save_predictor(predictor, args.work / f"{traces.name}-{kind}")
        predictors[kind] = predictor
    bind_all(predictors, test)
    results = evaluate_predictors(predictors, test, EvalConfig(lookahead=args.lookahead))
    settings = eval_settings(EvalConfig(lookahead=args.lookahead), test, {
        "split_seed": args.seed, "fractions": [0.8, 0.1, 0.1], "train_tokens": splits["train"].num_tokens,
        "collect": read_manifest(traces).source, "training": records, "threads": args.threads,
        "wall_s": time.perf_counter() - start})
    report = build_report(results, {n: describe(p) for n, p in predictors.items()}, settings,
                          environment(args.device or ("cuda" if torch.cuda.is_available() else "cpu")))
    report["goal"] = goal_check(results, range(1, args.lookahead + 1))
    paths = write_report(report, args.out, stem="predictors")
    for d, g in read_json(paths["json"])["goal"].items():
        print(f"lookahead {d}: best trained {g['best_trained']} recall@k {g['recall@k']:.4f} vs pre-gate "
              f"{g['pregate']:.4f}, history {g['history']:.4f}: {'met' if g['met'] else 'NOT met'}")
    if args.package:
        best = read_json(paths["json"])["goal"]["1"]["best_trained"]
        save_predictor(predictors[best], args.package)
        print(f"saved the {best} predictor to {args.package}")
    print(f"wrote {paths['json']}, {paths['md']}, {paths['png']} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
