"""What "a trained predictor is never slower than none" can cost at least: the governor's floor, from a result.

The governor (`runtime/admission.py`) judges a predictor dry before it copies anything: while it calibrates (its
ranks over `CALIBRATE` candidates, then `WARM` calls of a full cache) and at probe calls (at most `PROBE_SHARE`
of decode's time) it runs the predictor, counts what its copies would have saved and copies nothing. A
predictor it never lets go live therefore leaves the cache exactly as no predictor would (same hits and misses),
and the only difference is the predictor's own host time at those calls. This script reads a
`benchmarks/real_routing.py` result and, for every trained predictor's row:

- measures that host time per call where the row's cache went as none's (same hits, misses and copies):
  (time with the predictor - time without) / its calls;
- estimates the probes the governor makes over the measured calls (one per
  `predict_s / (PROBE_SHARE x period)` calls), besides its WARM calibration calls (in the measured calls where the
  cache filled after the warm-up: the governor waits for a full cache);
- and the loss a tie at the table's two decimals allows (tok/s rounds to none's), with the calls of that host
  time it affords.

Where the calls made (at least the probes, and the WARM calibration calls where they fall in the measured part)
cost more than the tie allows, "never slower" at two decimals needs a predictor call cheaper than measured, or
fewer calls than the calibration needs: no governor that must see a predictor's output before it trusts it can
meet it there. Rows whose cache did not go as none's had live copies: their loss is what those copies did.

    python benchmarks/governor_floor.py benchmarks/results/real_routing.json

Writes benchmarks/results/governor_floor.{json,md}.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from specmoe.bench.environment import environment
from specmoe.io import read_json, write_json, write_text
from specmoe.runtime.admission import PrefetchAdmission

RESULTS = Path(__file__).parent / "results"
TRAINED = ("history", "interlayer", "affinity", "affinity-2")


def tie_allowance(none_tok_s: float) -> float:
    """The largest relative loss whose tok/s still rounds (2 decimals) to at least none's rounded value."""
    lowest = round(none_tok_s, 2) - 0.005  # rounds up to round(none, 2)
    return max(0.0, (none_tok_s - lowest) / none_tok_s)


def rows_of(result: dict) -> list[dict]:
    out = []
    for trace in result["traces"]:
        runs = trace["sweep"]["runs"]
        none = {(r["capacity"], r["misses_mode"], r["policy"]): r for r in runs if r["predictor"] == "none"}
        for r in runs:
            base = none.get((r["capacity"], r["misses_mode"], r["policy"]))
            if r["predictor"] not in TRAINED or base is None or not r.get("predict_calls"):
                continue
            same = all(r[k] == base[k] for k in ("hits", "misses", "prefetch_issued", "host_computed"))
            calls = r["predict_calls"]
            period = r["time_s"] / r["layer_calls"]  # seconds per MoE layer call
            row = {"model": trace["model"], "capacity": r["capacity"], "misses": r["misses_mode"],
                   "policy": r["policy"], "predictor": r["predictor"], "tok_s": r["tok_s"], "none_tok_s": base["tok_s"],
                   "loss": 1 - r["tok_s"] / base["tok_s"], "predict_calls": calls, "layer_calls": r["layer_calls"],
                   "copies": r["prefetch_issued"] - r.get("reuse_issued", 0), "same_cache": same,
                   "tie_allowance": tie_allowance(base["tok_s"])}
            if same:  # the difference is the predictor's host time alone
                per_call = (r["time_s"] - base["time_s"]) / calls
                every = max(PrefetchAdmission.PROBE, per_call / (PrefetchAdmission.PROBE_SHARE * period))
                row.update(predict_s=per_call, probe_calls=math.floor(r["layer_calls"] / every),
                           tie_calls=math.floor(row["tie_allowance"] * r["time_s"] / per_call) if per_call > 0 else None)
            out.append(row)
    return out


def markdown(rows: list[dict], source: str, sha: str) -> str:
    lines = ["| model | capacity | misses | predictor | tok/s (none) | loss | calls | live copies | same cache as none "
             "| host time per call | probes (about) | a 2-decimal tie allows | within it |",
             "|---|---:|---|---|---|---:|---:|---:|---|---:|---:|---|---|"]
    for r in rows:
        per = f"{1e6 * r['predict_s']:.0f} µs" if "predict_s" in r else "—"
        tie = f"{100 * r['tie_allowance']:.3f} %" + (f" ({r['tie_calls']} calls)" if r.get("tie_calls") is not None
                                                     else "")
        lines.append(f"| {r['model'].split('/')[-1]} | {r['capacity']:.3g} | {r['misses']} | {r['predictor']} | "
                     f"{r['tok_s']:.2f} ({r['none_tok_s']:.2f}) | {100 * r['loss']:+.3f} % | {r['predict_calls']} | "
                     f"{r['copies']} | {'yes' if r['same_cache'] else 'no'} | {per} | {r.get('probe_calls', '—')} | "
                     f"{tie} | {'yes' if r['loss'] <= r['tie_allowance'] else 'no'} |")
    lines += ["", f"From `{source}` (simulated decode). *loss*: 1 - tok/s / none's (negative: faster). *calls*: layer "
              f"calls at which the predictor ran (dry while calibrating and at probes, live otherwise). *Same cache "
              f"as none*: hits, misses, copies and host-computed experts all equal none's, so the loss is the "
              f"predictor's host time alone, per call in the next column. *Probes (about)*: one per "
              f"predict_s / (PROBE_SHARE = {PrefetchAdmission.PROBE_SHARE:g} x period) measured calls (besides "
              f"WARM = {PrefetchAdmission.WARM} calibration calls where the cache filled after the warm-up). *A 2-decimal tie allows*: the loss at which tok/s still rounds to none's, and the "
              f"calls of that host time it affords. git {sha}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("result", type=Path, nargs="?", default=RESULTS / "real_routing.json")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    rows = rows_of(read_json(args.result))
    env = environment("cpu")
    result = {"benchmark": "governor_floor", "source": str(args.result), "rows": rows, "environment": env,
              "constants": {k: getattr(PrefetchAdmission, k) for k in ("WARM", "CALIBRATE", "PROBE", "PROBE_SHARE",
                                                                        "PAID_SHARE", "ENTER")}}
    out = args.out / "governor_floor.json"
    write_json(out, result)
    write_text(out.with_suffix(".md"), markdown(rows, args.result.name, env.get("git_sha")))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
