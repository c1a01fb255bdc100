"""The demo's table and figure, made from its result dict alone (what demo.json holds)."""

from __future__ import annotations


def format_table(result: dict) -> str:
    """A markdown table of the demo's rows, with the settings and machine under it."""
    s = result["settings"]
    geo = result["model"]["geometry"]
    lines = [
        "| predictor | hit rate | misses | MiB moved | MiB / token | decode tok/s | tokens = unwrapped |",
        "|---|---:|---:|---:|---:|---:|:---:|",
    ]
    decode_tokens = (s["new_tokens"] - 1) * s["prompts"]
    spreads = []
    for row in result["rows"]:
        d = row["decode"]
        mib = d["bytes_moved"] / 2**20
        lines.append(f"| {row['predictor']} | {d['hit_rate']:.3f} | {d['misses']} | {mib:.1f} | "
                     f"{mib / decode_tokens:.3f} | {_tok_s(row['decode_tok_s'], _measured(row), spreads)} | "
                     f"{'yes' if row['tokens_match'] else 'NO'} |")
    lines.append(f"| all experts resident (unwrapped) | 1 | 0 | 0 | 0 | "
                 f"{result['unwrapped']['decode_tok_s']:.1f} | - |")
    env = result["environment"]
    lines += [
        "",
        f"Reference model {result['model']['class']} L={geo['num_layers']} E={geo['num_experts']} "
        f"k={geo['top_k']} H={geo['hidden_size']} ({result['model']['dtype']}); cache {s['capacity']:.0%} of "
        f"experts = {s['num_slots']} slots of {s['slot_bytes'] / 1024:.1f} KiB, eviction policy "
        f"{s.get('policy', 'the default')} (the runtime's default) in every row; decode phase of {s['prompts']} "
        f"held-out prompts x {s['new_tokens'] - 1} tokens (after a warm-up prompt), batch 1, greedy with "
        f"repetition penalty {s['repetition_penalty']}; "
        f"tok/s: median (min-max) over the {s['prompts']} measured prompts, {_spread_note(spreads)}. "
        f"{env['device_name']}, torch {env['torch']}, transformers "
        f"{env['transformers']}, git {env['git_sha']}.",
    ]
    return "\n".join(lines)


def _measured(row: dict) -> list[float]:
    """The decode tok/s of the measured prompts (the first prompt warms up)."""
    return [r["decode_tok_s"] for r in row.get("runs", [])[1:]]


def _tok_s(median: float, runs: list[float], spreads: list[float]) -> str:
    if len(runs) < 2:
        return f"{median:.1f}"
    spreads.append((max(runs) - min(runs)) / median if median else 0.0)
    return f"{median:.1f} ({min(runs):.1f}-{max(runs):.1f})"


def _spread_note(spreads: list[float]) -> str:
    """Says how far apart repeats were: differences between rows smaller than this are noise."""
    if not spreads:
        return "one prompt: no spread measured, so differences in tok/s between rows may be noise"
    return (f"repeats spread up to {max(spreads):.0%} of the median; tok/s differences between rows smaller than "
            "that are noise (on a shared CPU timings drift)")


def plot_demo(result: dict, path) -> None:
    """Bars per predictor: decode hit rate, MiB moved per decoded token, decode tokens/s."""
    from ..measure.results import pyplot  # here, not at the top: specmoe.measure imports torch

    plt = pyplot()

    s = result["settings"]
    rows = result["rows"]
    names = [r["predictor"].split(" (")[0] for r in rows]
    decode_tokens = (s["new_tokens"] - 1) * s["prompts"]
    panels = [
        ("hit rate (decode)", [r["decode"]["hit_rate"] for r in rows], None),
        ("MiB moved host -> device per token", [r["decode"]["bytes_moved"] / 2**20 / decode_tokens for r in rows],
         None),
        ("decode tokens/s", [r["decode_tok_s"] for r in rows], result["unwrapped"]["decode_tok_s"]),
    ]
    # the tok/s bars show the spread of the measured prompts (min-max), as the table does
    runs = [_measured(r) for r in rows]
    spread = None
    if all(len(m) >= 2 for m in runs):
        spread = [[r["decode_tok_s"] - min(m) for r, m in zip(rows, runs)],
                  [max(m) - r["decode_tok_s"] for r, m in zip(rows, runs)]]
        panels[2] = ("decode tokens/s (median; bars: min-max over prompts)", panels[2][1], panels[2][2])
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for i, (ax, (title, values, line)) in enumerate(zip(axes, panels)):
        ax.bar(range(len(values)), values, color=[f"C{i}" for i in range(len(values))],
               yerr=spread if i == 2 else None, capsize=4 if i == 2 else 0)
        ax.set_xticks(range(len(values)), names, rotation=20, ha="right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if line is not None:
            ax.axhline(line, color="k", ls="--", lw=1, label="all experts resident")
            ax.legend(fontsize=8)
    geo = result["model"]["geometry"]
    fig.suptitle(f"specmoe demo: reference model L={geo['num_layers']} E={geo['num_experts']} k={geo['top_k']}, "
                 f"cache {s['capacity']:.0%} of experts, {result['environment']['device_name']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
