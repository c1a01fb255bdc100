"""Evidence that the reference model learned: validation loss next to a unigram baseline, and its routing
next to a random-weight model of the same shape.

    python benchmarks/reference_model.py                  # -> results/reference_model.{json,md,png}
    python benchmarks/reference_model.py --from-json      # remake the markdown and PNGs from the JSON only

Held-out text: the validation files of the corpus (split by file, as in training), tokenized with the
model's tokenizer, cut into non-overlapping windows spread over the stream. The random-weight model has the
checkpoint's config and transformers' own initialisation.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
from transformers import AutoConfig

from specmoe.measure import environment
from specmoe.io import read_json, write_json
from specmoe.reference.corpus import CorpusConfig, load_corpus
from specmoe.reference.data import encode_documents, eval_windows
from specmoe.reference.evaluation import evaluate_loss, unigram_loss
from specmoe.reference.model import CHECKPOINT_DIR, TRAINING_NAME, load_reference_model, load_reference_tokenizer
from specmoe.reference.routing_stats import plot_routing, routing_statistics
from specmoe.sim.synthetic import build_random_model

RESULTS = Path(__file__).parent / "results"
NAME = "reference_model"


def measure(args) -> dict:
    training = read_json(args.checkpoint / TRAINING_NAME, what="training record")
    print("loading the corpus and the models ...")
    split = load_corpus(CorpusConfig(seed=training["settings"]["seed"]))
    corpus = split.describe()
    tokenizer = load_reference_tokenizer(args.checkpoint)
    val_stream = encode_documents(tokenizer, split.texts("val"))
    windows = eval_windows(val_stream, args.seq_len, args.windows)  # [N, T]
    train_stream = encode_documents(tokenizer, split.texts("train"))
    trained = load_reference_model("cpu", torch.float32, path=args.checkpoint)
    random = build_random_model(AutoConfig.from_pretrained(str(args.checkpoint), local_files_only=True),
                                dtype=torch.float32, seed=args.seed, progress=False)
    models = {"trained": trained, "random weights": random}
    losses = {name: evaluate_loss(m, windows, progress=True) for name, m in models.items()}
    losses["unigram"] = unigram_loss(train_stream, windows, len(tokenizer))
    stats = {name: routing_statistics(m, windows, progress=True).to_dict() for name, m in models.items()}
    return {
        "benchmark": NAME,
        "checkpoint": str(args.checkpoint),
        "training": {k: training.get(k) for k in (
            "recipe", "model_class", "geometry", "parameters", "steps", "tokens_seen", "train_loop_s",
            "tokens_per_s", "wall_time_s", "cpu_time_s", "initial_val_loss", "final_val_loss",
            "unigram_val_loss")},
        "training_curve": {"evals": training.get("evals", []), "history": training.get("history", [])},
        "training_environment": training.get("environment"),
        "corpus": corpus,
        "corpus_matches_training": corpus["fingerprint"] == training["corpus"]["fingerprint"],
        "settings": {"windows": int(windows.shape[0]), "seq_len": args.seq_len, "random_seed": args.seed,
                     "tokens": int(windows.numel())},
        "environment": environment("cpu"),
        "val_loss": losses,
        "routing": stats,
    }


def render_markdown(result: dict) -> str:
    loss = result["val_loss"]
    tr = result["training"]
    geo = tr["geometry"]
    rows = [
        "| model | val loss (nats/token) | perplexity |",
        "|---|---:|---:|",
        *(f"| {name} | {loss[name]:.3f} | {math.exp(loss[name]):.1f} |" for name in ("trained", "random weights",
                                                                                  "unigram")),
        "",
        "| routing, mean over layers | trained | random weights |",
        "|---|---:|---:|",
    ]
    labels = {
        "router_entropy": "router entropy / log E (1 = uniform)",
        "load_entropy": "expert load entropy / log E (1 = even)",
        "max_expert_share": "busiest expert's share of a layer",
        "top1_next_accuracy": "layer l top-1 predicts layer l+1 top-1",
        "top1_next_baseline": "... always the most frequent top-1",
        "next_token_reuse": "experts reused by the next token",
    }
    a, b = (result["routing"][n]["summary"] for n in ("trained", "random weights"))
    rows += [f"| {label} | {a[key]:.3f} | {b[key]:.3f} |" for key, label in labels.items()]
    c, s, env = result["corpus"], result["settings"], result["environment"]
    rows += [
        "",
        f"{tr['model_class']} L={geo['num_layers']} E={geo['num_experts']} k={geo['top_k']} "
        f"H={geo['hidden_size']}, {tr['parameters'] / 1e6:.1f}M parameters, trained {tr['steps']} steps "
        f"({tr['tokens_seen'] / 1e6:.2f}M tokens) in {tr['wall_time_s'] / 60:.1f} min wall, "
        f"{tr['cpu_time_s'] / 60:.1f} min CPU time on {result['training_environment']['device_name']}. "
        f"Held-out: {s['windows']} windows x "
        f"{s['seq_len']} tokens from {c['val_files']} validation files of the Python {c['python']} standard "
        f"library (corpus {'matches' if result['corpus_matches_training'] else 'DIFFERS FROM'} training's). "
        f"{env['device_name']}, torch {env['torch']}, transformers {env['transformers']}, git {env['git_sha']}.",
    ]
    return "\n".join(rows) + "\n"


def plot_training(result: dict, path) -> None:
    from specmoe.measure.results import pyplot

    plt = pyplot()

    curve = result["training_curve"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    h = curve["history"]
    ax.plot([x["step"] for x in h], [x["train_loss"] for x in h], label="train (LM loss, 10-step means)", lw=1)
    e = curve["evals"]
    ax.plot([x["step"] for x in e], [x["val_loss"] for x in e], "o-", label="validation")
    ax.axhline(result["val_loss"]["unigram"], color="k", ls="--", lw=1, label="unigram baseline")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.set_title("reference model training", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(result: dict, out: Path) -> None:
    out.with_suffix(".md").write_text(render_markdown(result))
    geo = result["training"]["geometry"]
    plot_routing(result["routing"], out.with_suffix(".png"),
                 title=f"routing over {result['settings']['tokens']} held-out tokens: reference model "
                       f"(L={geo['num_layers']} E={geo['num_experts']} k={geo['top_k']}) trained vs random weights")
    plot_training(result, out.with_name(out.stem + "_training.png"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", type=Path, default=CHECKPOINT_DIR)
    ap.add_argument("--windows", type=int, default=128, help="held-out windows")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0, help="seed of the random-weight model")
    ap.add_argument("--out", type=Path, default=RESULTS / f"{NAME}.json")
    ap.add_argument("--from-json", action="store_true", help="only remake the markdown and PNGs from --out")
    args = ap.parse_args(argv)
    if args.from_json:
        result = read_json(args.out, what="reference model results")
    else:
        result = measure(args)
        write_json(args.out, result)
    write_reports(result, args.out)
    print(render_markdown(result))
    print(f"wrote {args.out} and its .md / .png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
