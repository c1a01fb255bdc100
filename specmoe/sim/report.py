"""Markdown tables and PNG plots of simulator sweeps, made from their JSON alone."""

from __future__ import annotations

from pathlib import Path

from ..measure.results import environment_line, markdown_table, pyplot, save_figure
from ..io import read_json, write_text

GiB, MiB = 2**30, 2**20


def _label(run: dict) -> str:
    label = run["policy"] if run["predictor"] == "none" else f"{run['predictor']} + {run['policy']}"
    mode = run.get("misses_mode", "fetch")
    return label if mode == "fetch" else f"{label}, misses={mode}"


def _fill_fits(sweep: dict) -> None:
    """Runs of sweeps written before runs carried "fits": whether their slots fit, from the memory plans."""
    plans = {(m["profile"], m["shape"]): m for m in sweep.get("memory", [])}
    for r in sweep.get("runs", []):
        if "fits" not in r and (r["profile"], r["shape"]) in plans:
            r["fits"] = bool(r["max_fit"] or r["capacity"] <= plans[r["profile"], r["shape"]]["max_capacity"] + 1e-12)


def deployable(run: dict) -> bool:
    """A run one could deploy: it fits the device's memory, and neither its policy nor its predictor needs the
    future (Belady-MIN and the oracle are bounds, not options)."""
    return run.get("fits", True) and run["policy"] != "belady" and run["predictor"] != "oracle"


def _bound_kind(run: dict) -> str:
    return "link" if run.get("misses_mode", "fetch") == "fetch" else "link+host"


def _capacity_label(c: float, given) -> str:
    """A capacity as asked for (0.25), or to 3 places where it was computed (the largest that fits)."""
    return f"{c:g}" if c in given else f"{c:.3f}"


def _hit_rate(run: dict) -> str:
    """The hit rate, and (where some hits waited on a copy in flight) the share of those."""
    n = run.get("hits", 0) + run.get("misses", 0)
    late = run.get("hits_in_flight", 0)
    return f"{run['hit_rate']:.3f}" + (f" ({late / n:.3f} in flight)" if late and n else "")


def runs_table(sweep: dict, profile: str, shape: str, capacities=None) -> str:
    """Every run of one profile and shape (at `capacities` only, if given; the max-fit capacity is named
    "max"): speed, cache figures, and distance to the bound."""
    _fill_fits(sweep)
    runs = [r for r in sweep["runs"] if r["profile"] == profile and r["shape"] == shape and
            (capacities is None or r["capacity"] in capacities or ("max" in capacities and r["max_fit"]))]
    rows = []
    for r in sorted(runs, key=lambda r: (r["capacity"], r["predictor"] != "none", r["predictor"], r["policy"])):
        per_tok = max(r["tokens"], 1)
        cap = f"{r['capacity']:.3f}" + (" (max fit)" if r["max_fit"] else "") + ("" if r.get("fits", True) else " ✗")
        rows.append([cap, _label(r) + ("" if r["policy"] != "belady" and r["predictor"] != "oracle" else " †"),
                     f"{r['tok_s']:.1f}",
                     _hit_rate(r), f"{r['prefetch_precision']:.2f}"
                     if r["prefetch_issued"] and r["predictor"] != "none" else None,
                     f"{(r['misses'] - r.get('host_computed', 0)) / per_tok:.2f} / "
                     f"{r.get('host_computed', 0) / per_tok:.2f}",
                     f"{r['bytes_moved'] / per_tok / MiB:.0f}", f"{1e3 * r['stall_s'] / per_tok:.2f}",
                     f"{r['bound_tok_s']:.1f} ({_bound_kind(r)})", f"{100 * r['fraction_of_bound']:.0f}%",
                     f"{r['device_bytes'] / GiB:.1f}"])
    note = ("\n\n✗: does not fit the device's memory (not deployable). †: needs the future (Belady-MIN, the "
            "oracle): a bound, not an option. Bound (link): max(compute, Belady-MIN miss bytes / host->device "
            "bandwidth); bound (link+host): the same with misses split at best between the link and the host; "
            "'of bound' is tok/s over the row's own bound.")
    # pf precision: of the predictor's prefetches, those used (no-predictor rows copy only host experts, with "auto")
    return markdown_table(["capacity", "policy / predictor", "tok/s", "hit rate", "pf precision",
                           "misses/token fetched / host", "MiB moved/token",
                           "stall ms/token", "bound tok/s (kind)", "of bound", "weights+cache GiB"], rows) + note


def memory_table(sweep: dict, profile: str) -> str:
    """Item 4: device memory unwrapped and wrapped per capacity, the largest capacity that fits, tok/s there."""
    _fill_fits(sweep)
    plans = [m for m in sweep["memory"] if m["profile"] == profile]
    if not plans:
        return ""
    caps = [row["capacity"] for row in plans[0]["wrapped"]]
    ceilings = {(c["shape"], c["profile"]): c["tok_s"] for c in sweep["ceilings"]}
    with_runs = any(r["profile"] == profile for r in sweep["runs"])
    rows = []
    for m in plans:
        at_max = [r for r in sweep["runs"] if r["profile"] == profile and r["shape"] == m["shape"] and r["max_fit"]]
        lru = next((r for r in at_max if r["policy"] == "lru" and r["predictor"] == "none"), None)
        real = [r for r in at_max if deployable(r)]  # fits, and needs no future (not MIN, not the oracle)
        best = max(real, key=lambda r: r["tok_s"]) if real else None
        row = [m["shape"], f"{m['slot_bytes'] / 2**20:.1f}",
               f"{m['unwrapped_bytes'] / GiB:.1f}" + ("" if m["unwrapped_fits"] else " ✗"),
               *[f"{w['device_bytes'] / GiB:.1f}" + ("" if w["fits"] else " ✗") for w in m["wrapped"]],
               f"{m['max_capacity']:.3f} ({m['max_slots']} slots)"]
        if with_runs:
            row += [f"{lru['tok_s']:.1f}" if lru else None, f"{best['tok_s']:.1f} ({_label(best)})" if best else None,
                    f"{best['bound_tok_s']:.1f}" if best else None]
        rows.append(row + [f"{ceilings.get((m['shape'], profile), 0):.1f}"])
    given = sweep.get("settings", {}).get("capacities", [])
    asked = given if len(given) == len(caps) else caps  # the capacities as asked (a plan row holds slots / all)
    headers = ["model", "slot MiB", "unwrapped GiB", *[f"wrapped @ capacity {_capacity_label(c, asked)} (GiB)"
                                                       for c in asked], "largest capacity that fits"]
    if with_runs:
        headers += ["tok/s there (LRU)", "tok/s there (best deployable)", "bound tok/s"]
    headers += ["all-resident tok/s (if it fit)"]
    m0 = plans[0]
    note = (f"\n\nDevice memory = weights on the device + KV cache of one {m0['context']}-token sequence + "
            f"{m0['reserve_bytes'] / GiB:.1f} GiB reserve (CUDA context, allocator, activations; assumed). "
            "✗: does not fit. A slot holds one expert (compressed, for '+int4'/'+int8' rows). "
            "All tok/s figures are simulated. All-resident tok/s is the compute-bound ceiling "
            "(routing-independent at batch 1)")
    note += ("; '—' where no trace of that model's routing geometry exists (hit rates need learned routing of the "
             "same L/E/k)." if with_runs else ".")
    return markdown_table(headers, rows) + note


def sweep_markdown(sweep: dict) -> str:
    env = sweep.get("environment", {})
    profiles = list(dict.fromkeys(m["profile"] for m in sweep["memory"]))
    intro = (f"Routing: {sweep.get('stream', {}).get('description', 'none')}. Compute model "
             f"`{sweep['compute']['name']}` ({sweep['compute']['source']}).")
    if sweep["runs"]:
        if any(r.get("misses_mode", "fetch") != "fetch" for r in sweep["runs"]):
            host = sweep.get("host") or {}
            intro += (f" Rows with misses=host/auto compute missed experts on the host (profile `{host.get('name')}`: "
                      f"{host.get('description', '')}); their bound is max(device compute, copied bytes / bandwidth, "
                      "host compute) for Belady-with-bypass misses split at best between the link and the host. "
                      "'static' is the stream's hottest experts resident, misses on the host, nothing copied.")
    parts = [f"**Simulated decode on {', '.join(profiles)}.** {intro}", ""]
    for profile in profiles:
        parts += [f"*{profile}: device memory*", "", memory_table(sweep, profile), ""]
        for shape in dict.fromkeys(r["shape"] for r in sweep["runs"] if r["profile"] == profile):
            parts += [f"*{profile}: {shape}*", "", runs_table(sweep, profile, shape), ""]
    goal = sweep.get("goal")
    if goal and goal.get("best"):
        b = goal["best"]
        parts += [f"Goal: {goal['shape']} within {goal['profile']}'s memory at >= {goal['tok_s']:g} tok/s: "
                  f"**{'met' if goal['met'] else 'not met'}** (largest capacity that fits: {goal['capacity']:.3f}; best "
                  f"{b['tok_s']:.1f} tok/s with {b['predictor']} + {b['policy']}).", ""]
    if env:
        parts.append(f"Simulated on {environment_line(env)}.")
    return "\n".join(parts) + "\n"


def sweep_summary(sweep: dict, profile: str, capacities=(0.25, "max")) -> str:
    """The short version for README: one profile's memory table and its runs at a few capacities."""
    intro = (f"**Simulated decode on {profile}.** Routing: {sweep.get('stream', {}).get('description', 'none')}. "
             f"Compute model `{sweep['compute']['name']}` (host overheads assumed, not yet checked on a GPU).")
    parts = [intro, "", memory_table(sweep, profile), ""]
    for shape in dict.fromkeys(r["shape"] for r in sweep["runs"] if r["profile"] == profile):
        parts += [f"*{profile}: {shape}, capacities {', '.join(map(str, capacities))}*", "",
                  runs_table(sweep, profile, shape, capacities), ""]
    goal = sweep.get("goal")
    if goal and goal.get("best") and goal["profile"] == profile:
        b = goal["best"]
        parts += [f"Goal: {goal['shape']} within {goal['profile']}'s memory at >= {goal['tok_s']:g} tok/s: "
                  f"**{'met' if goal['met'] else 'not met'}** (largest capacity that fits: {goal['capacity']:.3f}; best "
                  f"{b['tok_s']:.1f} tok/s with {b['predictor']} + {b['policy']}).", ""]
    if sweep.get("environment"):
        parts.append(f"Simulated on {environment_line(sweep['environment'])}.")
    return "\n".join(parts) + "\n"


def sweep_plot(sweep: dict, path) -> bool:
    """tok/s against capacity per policy/predictor, with the bound, one panel per (profile, shape) with runs.
    Returns False (and writes nothing) when there are no runs."""
    plt = pyplot()

    panels = list(dict.fromkeys((r["profile"], r["shape"]) for r in sweep["runs"]))
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (profile, shape) in zip(axes[0], panels):
        runs = [r for r in sweep["runs"] if r["profile"] == profile and r["shape"] == shape]
        for label in dict.fromkeys(_label(r) for r in runs):
            pts = sorted((r["capacity"], r["tok_s"]) for r in runs if _label(r) == label)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        bound = sorted({(r["capacity"], r["bound_tok_s"]) for r in runs})
        ax.plot([b[0] for b in bound], [b[1] for b in bound], "k--", label="bound")
        ax.set(xlabel="cache capacity (fraction of experts)", ylabel="decode tok/s (simulated)",
               title=f"{shape} on {profile}")
        ax.legend(fontsize=7)
    save_figure(fig, path)
    return True


def write_sweep_report(json_path) -> tuple[Path, Path | None]:
    """<stem>.md and <stem>.png (None without runs to plot) next to a sweep JSON, from it alone."""
    json_path = Path(json_path)
    sweep = read_json(json_path, what="simulation result")
    md, png = json_path.with_suffix(".md"), json_path.with_suffix(".png")
    write_text(md, sweep_markdown(sweep))
    return md, png if sweep_plot(sweep, png) else None
