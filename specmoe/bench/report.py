"""The `specmoe bench` report: its markdown tables and PNG plot, made from its JSON (never typed by hand).

Generic result-file helpers live in `specmoe.measure.results` (re-exported here for old imports)."""

from __future__ import annotations

from pathlib import Path

from ..io import read_json, write_text
from ..measure.results import MiB, environment_line, markdown_table, pyplot, save_figure
from ..measure.results import fmt as _fmt


def bench_table(result: dict) -> str:
    """The side-by-side table of a `specmoe bench` result, with ratios to the unwrapped model, accelerate and
    no predictor (on demand only) at the same capacity."""
    variants = result["variants"]
    ref = {v["kind"]: v for v in variants if v["kind"] in ("unwrapped", "accelerate")}
    lru = {v["capacity"]: v for v in variants if v["kind"] == "specmoe" and v["predictor"] == "none"}
    rows = []
    for v in variants:
        tok = v["decode_tok_s"]
        s = v.get("stats") or {}
        mem = v.get("memory") or {}
        base = lru.get(v["capacity"]) if v["kind"] == "specmoe" else None
        rows.append([
            v["name"], _fmt(tok, ".1f"), _fmt(v["ttft_s"] * 1e3, ".1f"),
            _fmt(tok / ref["unwrapped"]["decode_tok_s"], ".2f") if "unwrapped" in ref else None,
            _fmt(tok / ref["accelerate"]["decode_tok_s"], ".1f") if "accelerate" in ref else None,
            _fmt(tok / base["decode_tok_s"], ".2f") if base else None,
            _fmt(s.get("hit_rate"), ".3f"), _fmt(s.get("prefetch_precision"), ".2f"),
            _fmt(s.get("prefetch_recall"), ".2f"),
            f"{s['misses'] - s.get('host_computed', 0)} / {s.get('host_computed', 0)}" if "misses" in s else None,
            _fmt(s["bytes_moved"] / MiB, ".0f") if "bytes_moved" in s else None,
            _fmt(s["stall_s"] * 1e3, ".1f") if "stall_s" in s else None,
            _fmt(mem["torch_peak_bytes"] / MiB, ".0f") if mem.get("torch_peak_bytes") else None,
            _fmt(mem["nvml_peak_used_bytes"] / MiB, ".0f") if mem.get("nvml_peak_used_bytes") else None,
            _fmt(v["bound"]["tok_s"], ".1f") if v.get("bound") else None,
            _fmt(100 * v["fraction_of_bound"], ".0f") + "%" if v.get("bound") else None,
            {True: "yes", False: "NO", None: None}[v.get("same_tokens")],
        ])
    headers = ["variant", "decode tok/s", "TTFT ms", "× unwrapped", "× accelerate", "× on demand", "hit rate",
               "pf precision", "pf recall", "misses fetched / host", "MiB moved", "stall ms", "peak MiB (torch)", "peak MiB (NVML)",
               "bound tok/s", "of bound", "same tokens"]
    s = result["settings"]
    note = (f"\n\n{result.get('model', '')}, {result['geometry']}. Decode tok/s and TTFT are medians over "
            f"{len(result['variants'][0].get('decode_tok_s_runs', []))} prompts ({s['new_tokens']} new tokens, "
            f"warm-up excluded; accelerate: {s['accelerate_new_tokens']}). Hit rate, prefetch precision/recall, "
            "bytes and stall are over all timed calls. Bound: max(compute time per token (fastest run with every "
            "expert resident), Belady-MIN miss bytes per token / measured host->device rate) on the recorded routing. "
            f"{environment_line(result['environment'])}.")
    return markdown_table(headers, rows) + note


def goals_table(goals: dict) -> str:
    """Ratios at the goal capacity per predictor, against the issue's targets."""
    t = goals["targets"]
    rows = [[("none (on demand)" if p == "none" else Path(p).name), _fmt(r["decode_tok_s"], ".1f"),
             _fmt(r["vs_unwrapped"], ".2f"), _fmt(r["vs_accelerate"], ".1f"), _fmt(r["vs_lru"], ".2f")]
            for p, r in goals["per_predictor"].items()]
    met = ", ".join(f"{k}: {'—' if v is None else ('met' if v else 'NOT met')}" for k, v in goals["met"].items())
    return (f"Goals at capacity {goals['capacity']}: × unwrapped >= {t['vs_unwrapped']}, × accelerate >= "
            f"{t['vs_accelerate']}, × on demand >= {t['vs_lru']}.\n\n"
            + markdown_table(["predictor", "decode tok/s", "× unwrapped", "× accelerate", "× on demand"], rows)
            + f"\n\nBest predictor: {goals['best_predictor']} ({met}).")


def bench_plot(result: dict, path) -> None:
    """Decode tok/s and hit rate against capacity, one line per predictor; unwrapped/accelerate as levels."""
    plt = pyplot()

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    wrapped = [v for v in result["variants"] if v["kind"] == "specmoe"]
    for pred in dict.fromkeys(v["predictor"] for v in wrapped):
        pts = sorted((v["capacity"], v["decode_tok_s"], v["stats"]["hit_rate"]) for v in wrapped if v["predictor"] == pred)
        label = next(v.get("label", pred) for v in wrapped if v["predictor"] == pred)
        ax1.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        ax2.plot([p[0] for p in pts], [p[2] for p in pts], marker="o", label=label)
    for v, style in ((next((v for v in result["variants"] if v["kind"] == "unwrapped"), None), "--"),
                     (next((v for v in result["variants"] if v["kind"] == "accelerate"), None), ":")):
        if v is not None:
            ax1.axhline(v["decode_tok_s"], linestyle=style, color="gray", label=v["name"])
    ax1.set(xlabel="cache capacity (fraction of experts)", ylabel="decode tokens/s", title="decode speed")
    ax2.set(xlabel="cache capacity (fraction of experts)", ylabel="hit rate", title="expert hit rate", ylim=(0, 1.02))
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.suptitle(f"{result.get('model', '')} on {result['environment'].get('device_name')}", fontsize=9)
    save_figure(fig, path)


def write_bench_report(json_path) -> tuple[Path, Path]:
    """Write <stem>.md and <stem>.png next to a bench JSON file, from it alone."""
    json_path = Path(json_path)
    result = read_json(json_path, what="bench result")
    md, png = json_path.with_suffix(".md"), json_path.with_suffix(".png")
    text = f"**{result.get('model', 'benchmark')}**\n\n{bench_table(result)}\n"
    if result.get("goals"):
        text += "\n" + goals_table(result["goals"]) + "\n"
    write_text(md, text)
    bench_plot(result, png)
    return md, png


__all__ = ["MiB", "bench_plot", "bench_table", "environment_line", "goals_table", "markdown_table", "save_figure",
           "write_bench_report"]
