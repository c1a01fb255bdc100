"""`specmoe train` and `specmoe eval`: fit a predictor on routing traces; compare predictors on held-out ones.

    specmoe train TRACES --predictor interlayer --out predictors/interlayer
    specmoe train TRACES --policy learned --out policies/learned       # an eviction policy (training/eviction.py)
    specmoe eval TRACES --predictor predictors/interlayer --out eval/
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

TRAINING_LOG = "training.json"


def _add_split_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("traces", type=Path, help="trace directory written by `specmoe collect`")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the train/val/test split by sequence")
    p.add_argument("--fractions", type=float, nargs=3, default=(0.8, 0.1, 0.1), metavar=("TRAIN", "VAL", "TEST"),
                   help="shares of the sequences for train/val/test (default 0.8 0.1 0.1)")
    p.add_argument("--max-tokens", type=int, default=None, help="load at most about this many trace tokens")
    p.add_argument("--lookahead", type=int, default=2, help="target layers l+1..l+D (default 2)")


def _load_splits(args, hidden: bool = True):
    import torch

    from ..traces.dataset import load_traces

    trace = load_traces(args.traces, hidden=hidden, max_tokens=args.max_tokens)
    for layer, h in trace.hidden.items():  # [N, H]
        bad = int((~torch.isfinite(h)).any(dim=-1).sum())
        if bad:
            raise ValueError(f"{args.traces}: {bad} of {h.shape[0]} hidden states entering MoE layer {layer} are "
                             "NaN or infinite; collect the trace again (e.g. with --dtype float32)")
    return trace.split(tuple(args.fractions), seed=args.split_seed)


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    from .fit import KINDS
    from .loop import TrainConfig

    d = TrainConfig()
    _add_split_arguments(p)
    p.add_argument("--predictor", choices=KINDS, help="what to train (or --policy)")
    p.add_argument("--policy", choices=("learned",), help="train an eviction policy instead: learned (imitates "
                   "Belady's MIN on the training sequences; SpeculativeMoE(policy=DIR), simulate --policies DIR)")
    p.add_argument("--sequences", default=None, metavar="START:STOP",
                   help="--policy: train on these sequences of TRACES instead of the split's train part")
    p.add_argument("--out", type=Path, required=True, help="directory for config.json + model.safetensors")
    p.add_argument("--overwrite", action="store_true", help="replace a predictor (or policy) already in --out")
    p.add_argument("--no-wrap", dest="wrap", action="store_false", help="do not predict the next token's layers")
    p.add_argument("--context", type=int, default=None,
                   help="known layers used (interlayer: 3, affinity: 3, history: 1)")
    p.add_argument("--tokens", type=int, default=None,
                   help="affinity: earlier tokens whose routing at the target layer is used (default 2)")
    p.add_argument("--hidden", type=int, default=None, help="affinity: hidden-layer width (default 0: logistic)")
    p.add_argument("--new", type=int, default=None,
                   help="affinity: train on and rank only experts not routed at the target layer in this many tokens "
                        "before (<= --tokens; default 0: every routed expert)")
    p.add_argument("--confident", type=float, default=None,
                   help="affinity: at decode name only experts of calibrated probability above this (default 0: the "
                        "top-k of every row)")
    p.add_argument("--dim", type=int, default=None, help="network width (interlayer/hidden)")
    p.add_argument("--layers", type=int, default=None, help="encoder layers (interlayer)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (interlayer)")
    p.add_argument("--ff", type=int, default=None, help="feed-forward width (interlayer)")
    p.add_argument("--no-router-init", dest="router_init", action="store_false",
                   help="hidden: start from random weights instead of the next layers' routers")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps at most (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="tokens per training batch (default %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr, help="peak learning rate (default %(default)s)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="AdamW weight decay (default %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps,
                   help="linear learning-rate warm-up steps (default %(default)s)")
    p.add_argument("--eval-every", type=int, default=d.eval_every,
                   help="validate every this many steps (default %(default)s)")
    p.add_argument("--patience", type=int, default=d.patience,
                   help="stop after this many validations without improvement (default %(default)s)")
    p.add_argument("--val-tokens", type=int, default=d.val_tokens,
                   help="validation tokens per evaluation (default %(default)s)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop training after this much wall time")
    p.add_argument("--seed", type=int, default=0, help="seeds weights, batches and dropout")
    p.add_argument("--device", default=None, help="default: cuda when present, else cpu")


def predictor_options(args) -> dict:
    """The predictor's own options given on the command line (unset ones keep the class defaults)."""
    names = {"history": ("context",), "interlayer": ("context", "dim", "layers", "heads", "ff"),
             "hidden": ("dim", "router_init"), "affinity": ("context", "tokens", "hidden", "new", "confident")}[args.predictor]
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def run_train(args: argparse.Namespace) -> int:
    from ..io import check_out_dir

    if (args.predictor is None) == (args.policy is None):
        raise SystemExit("give one of --predictor KIND or --policy learned")
    check_out_dir(args.out, args.overwrite)  # before any work
    if args.out.is_dir() and any(args.out.iterdir()) and not (args.out / "config.json").is_file():
        raise FileExistsError(f"--out {args.out} holds files that are not a saved predictor or policy; --overwrite "
                              "replaces such a directory (it is written whole), not other files")
    if args.policy is not None:
        from .eviction import run_train_policy

        return run_train_policy(args)
    from ..measure import environment
    from ..predictors import save_predictor
    from .fit import fit_predictor
    from .loop import TrainConfig


    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                         warmup_steps=args.warmup_steps, eval_every=args.eval_every, patience=args.patience,
                         val_tokens=args.val_tokens, seed=args.seed, device=args.device, max_minutes=args.max_minutes)
    splits = _load_splits(args, hidden=args.predictor == "hidden")
    from .evaluate import unavailable

    why = unavailable(args.predictor, splits["train"])
    if why and args.predictor == "hidden":
        raise SystemExit(f"{why} (a routing-only trace trains history or interlayer)")
    predictor, record = fit_predictor(args.predictor, splits, lookahead=args.lookahead, wrap=args.wrap,
                                      config=config, **predictor_options(args))
    record.update(traces=str(args.traces), split_seed=args.split_seed, fractions=list(args.fractions),
                  environment=environment(config.device or "cpu"))
    save_predictor(predictor, args.out, extra_json={TRAINING_LOG: record})
    result = record.get("result")
    summary = (f"val recall@k {result['best_val_recall']:.4f} (untrained {result['initial_val_recall']:.4f}), "
               f"{result['steps_run']} steps, stopped: {result['stopped']}" if result else "counted")
    print(f"{args.predictor}: {summary}; saved to {args.out}")
    return 0


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    _add_split_arguments(p)
    p.add_argument("--predictor", dest="predictors", type=Path, action="append", default=[],
                   help="a saved predictor directory (repeatable); pre-gate, history and random always run")
    p.add_argument("--out", type=Path, required=True, help="directory for eval.json, eval.md and eval.png")
    p.add_argument("--overwrite", action="store_true", help="replace output files already in --out")
    p.add_argument("--split", choices=("test", "val"), default="test", help="which held-out split to score")
    p.add_argument("--device", default="cpu", help="where predictors run (default cpu)")
    p.add_argument("--latency-calls", type=int, default=480, help="timed single-token predict calls per predictor")
    p.add_argument("--seed", type=int, default=0, help="seed of the random baseline")


def run_eval(args: argparse.Namespace) -> int:
    from ..measure import environment
    from ..io import read_json
    from ..predictors import load_predictor
    from .evaluate import (
        EvalConfig, baseline_predictors, bind_all, describe, eval_settings, evaluate_predictors, unavailable,
    )
    from ..io import check_outputs
    from .report import build_report, write_report

    check_outputs(args.out, ["eval.json", "eval.md", "eval.png"], args.overwrite)  # before any work
    splits = _load_splits(args)
    test = splits[args.split]
    if unavailable("pregate", test):
        print(f"note: skipping pregate: {unavailable('pregate', test)}")
    predictors = baseline_predictors(splits["train"], args.lookahead, seed=args.seed)
    for path in args.predictors:
        name = path.name
        if name in predictors:
            name = f"{name} ({path})"
        predictor = load_predictor(path, geometry=test.geometry)
        if unavailable(predictor.kind, test):
            print(f"note: skipping {path}: {unavailable(predictor.kind, test)}")
            continue
        predictors[name] = predictor
        log = path / TRAINING_LOG
        if log.is_file():
            trained = read_json(log, what="training log")
            if (trained.get("split_seed"), trained.get("fractions")) != (args.split_seed, list(args.fractions)):
                logger.warning("%s was trained with split seed %s / fractions %s, not %s / %s: its test "
                               "sequences may overlap its training ones", path, trained.get("split_seed"),
                               trained.get("fractions"), args.split_seed, list(args.fractions))
    bind_all(predictors, test)
    config = EvalConfig(lookahead=args.lookahead, device=args.device, latency_calls=args.latency_calls)
    results = evaluate_predictors(predictors, test, config)
    settings = eval_settings(config, test, {"split": args.split, "split_seed": args.split_seed,
                                            "fractions": list(args.fractions), "traces": str(args.traces)})
    report = build_report(results, {n: describe(p) for n, p in predictors.items()}, settings,
                          environment(args.device))
    paths = write_report(report, args.out)
    for name, res in results.items():
        w = res["lookahead"][1]["within"]
        print(f"{name:>24}: recall@k (1 layer ahead) {w['recall@k']:.4f}, top-1 {w['top1']:.4f}, "
              f"{res['latency_us'].get('decode', float('nan')):.1f} µs/token/layer")
    print(f"wrote {paths['json']}, {paths['md']}, {paths['png']}")
    return 0
