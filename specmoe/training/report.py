"""Evaluation reports: JSON first, then a markdown table and a PNG made from that JSON only.

The JSON layout (what `build_report` returns and `write_report` writes):

    {"environment": {...}, "settings": {...},
     "predictors": {name: {"kind", "config", "parameters", "latency_us": {"decode", "batched_per_token"},
                           "lookahead": {"1": {"within": metrics, "cross": metrics | null,
                                               "per_layer": [metrics, ...]}, "2": ...}}}}
"""

from __future__ import annotations

import io
import math
from pathlib import Path

from ..io import read_json, write_bytes, write_json, write_text

MAIN_COLUMNS = ("recall@k", "recall@2k", "recall@4k", "precision@k", "top1", "top3", "top5", "top10", "exact")


def build_report(results: dict, descriptions: dict, settings: dict, environment: dict) -> dict:
    """Join `evaluate_predictors` results with predictor descriptions into the report JSON layout."""
    predictors = {}
    for name, res in results.items():
        predictors[name] = {**descriptions.get(name, {}), "latency_us": res["latency_us"],
                            "lookahead": {str(d): v for d, v in res["lookahead"].items()}}
    return {"environment": environment, "settings": settings, "predictors": predictors}


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def markdown(report: dict) -> str:
    """Markdown tables from a report: within-token and cross-token metrics per lookahead, recall@k per layer."""
    preds = report["predictors"]
    settings = report.get("settings", {})
    env = report.get("environment", {})
    head = "| predictor | d | " + " | ".join(MAIN_COLUMNS) + " | µs/token/layer (decode) | params |"
    rule = "|" + "---|" * (len(MAIN_COLUMNS) + 4)
    lines = []
    for d, g in report.get("goal", {}).items():
        lines.append(f"- {d} layer(s) ahead: best trained predictor ({g['best_trained']}) recall@k {g['recall@k']:.3f} "
                     f"vs pre-gate {g['pregate']:.3f} and history {g['history']:.3f}: goal "
                     f"{'met' if g['met'] else 'not met'}")
    if lines:
        lines.append("")
    for part, title in (("within", "Within the token (target layer l+d < L)"),
                        ("cross", "Across the token boundary (target = layer l+d-L of the next token)")):
        rows = []
        for name, p in preds.items():
            for d, look in p["lookahead"].items():
                m = look.get(part)
                if m is None:
                    continue
                lat = p.get("latency_us", {}).get("decode")
                rows.append(f"| {name} | {d} | " + " | ".join(_fmt(m.get(c)) for c in MAIN_COLUMNS)
                            + f" | {_fmt(lat)} | {p.get('parameters', '—')} |")
        if rows:
            lines += [f"**{title}**", "", head, rule, *rows, ""]
    d1 = {name: p["lookahead"].get("1") for name, p in preds.items() if p["lookahead"].get("1")}
    if d1:
        names = list(d1)
        L = len(next(iter(d1.values()))["per_layer"])
        lines += ["**recall@k one layer ahead, per source layer l**", "",
                  "| l | " + " | ".join(names) + " |", "|" + "---|" * (len(names) + 1)]
        for layer in range(L):
            lines.append(f"| {layer} | " + " | ".join(_fmt(d1[n]["per_layer"][layer]["recall@k"]) for n in names) + " |")
        lines.append("")
    geo = settings.get("geometry", {})
    lines.append(f"Model {settings.get('model', '?')} (L={geo.get('num_layers')} E={geo.get('num_experts')} "
                 f"k={geo.get('top_k')}), {settings.get('test_tokens', '?')} held-out tokens in "
                 f"{settings.get('test_sequences', '?')} sequences; {env.get('device_name', '?')}, "
                 f"torch {env.get('torch', '?')}, git {env.get('git_sha', '?')}. Latency: median of single-token "
                 "predict calls (noisy on a shared CPU).")
    return "\n".join(lines) + "\n"


def plot(report: dict) -> bytes:
    """PNG bytes: recall@k per source layer at each lookahead, and recall@k/2k/4k per predictor."""
    from ..measure.results import pyplot  # here, not at the top: specmoe.measure imports torch

    plt = pyplot()

    preds = report["predictors"]
    lookaheads = sorted({d for p in preds.values() for d in p["lookahead"]}, key=int)
    fig, axes = plt.subplots(1, len(lookaheads) + 1, figsize=(5 * (len(lookaheads) + 1), 4), squeeze=False)
    for ax, d in zip(axes[0], lookaheads):
        L = 0
        for name, p in preds.items():
            look = p["lookahead"].get(d)
            if look:
                L = len(look["per_layer"])
                ax.plot([m["recall@k"] for m in look["per_layer"]], marker=".", label=name)
        ax.axvline(L - int(d) - 0.5, color="gray", linestyle="--", linewidth=1)  # right of it: the next token
        ax.set(title=f"recall@k, {d} layer(s) ahead (past the line: next token)", xlabel="source MoE layer l",
               ylabel="recall@k", ylim=(0, 1))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    ax = axes[0][-1]
    names = list(preds)
    cols = [(d, c) for d in lookaheads for c in ("recall@k", "recall@2k", "recall@4k")]
    width = 0.8 / max(1, len(names))
    for i, name in enumerate(names):
        vals = [(preds[name]["lookahead"].get(d) or {}).get("within", {}).get(c, float("nan")) for d, c in cols]
        ax.bar([j + i * width for j in range(len(cols))], vals, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cols))], [f"d={d}\n{c}" for d, c in cols], fontsize=7)
    ax.set(title="recall within the token", ylim=(0, 1.2), yticks=[0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.legend(fontsize=7, ncol=3, loc="upper center")
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_report(report: dict, out_dir, stem: str = "eval") -> dict[str, Path]:
    """Write `stem`.json, then `stem`.md and `stem`.png generated from the JSON just written."""
    out_dir = Path(out_dir)
    paths = {"json": out_dir / f"{stem}.json", "md": out_dir / f"{stem}.md", "png": out_dir / f"{stem}.png"}
    write_json(paths["json"], report)
    loaded = read_json(paths["json"], what="evaluation report")
    write_text(paths["md"], markdown(loaded))
    write_bytes(paths["png"], plot(loaded))
    return paths
