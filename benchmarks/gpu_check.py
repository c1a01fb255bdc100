"""One command for a session lent a GPU: everything only a GPU can show, inside a 15-minute lease.

    python benchmarks/gpu_check.py --out "$OUT"        # on the lent GPU: 480 s of steps by default (--budget-s)
    python benchmarks/gpu_check.py --smoke --out DIR   # the same path on CPU at tiny sizes (a test runs it)
    python benchmarks/gpu_check.py --only gpu_tests wrapper_overhead --out DIR
    python benchmarks/gpu_check.py --list

It installs nothing and needs no install: it puts its own checkout first on the path (and on each command's
PYTHONPATH), so it runs from a bare copy of the repository on a machine with torch, transformers and triton
(the lent machines: torch 2.11, transformers 5.17, triton 3.6, no network).

Steps, in order (each with its own timeout, all inside the total --budget-s, checked against the clock before
each step; a step's work runs in commands started with `ctx.run`, killed at the step's deadline). The timeouts
are estimates (no GPU has run this yet); a step that runs out of time keeps what its commands wrote so far:

* ``nvml``: the device as NVML sees it; every step also records NVML's peak "used" memory while it ran.
* ``gpu_tests``: `pytest -v -m gpu` (first: the first run on a GPU is for crashes), each test's outcome read
  from pytest's per-test lines, so a step cut short still says which tests passed, failed, or were running.
* ``wrapper_overhead``: SpeculativeMoE at capacity 1.0 with no predictor vs the unwrapped model (goal >= 0.97).
* ``moe_kernel``: the fused experts kernel (bf16, int8 and int4-g128 slots) against transformers' grouped_mm
  at decode (1, 8) and prefill (512, 2048) tokens (benchmarks/moe_kernel.py).
* ``shape_real``: Qwen1.5-MoE-A2.7B's shapes, random bf16 weights, at capacities 0.25 / 0.5 / 1.0 with no
  predictor and the pre-gate, plus the unwrapped model (benchmarks/shape_real.py, which saves after each row);
  per row decode tok/s, hit rate, stall and overlap (1 - stall / (bytes moved / measured pinned H2D rate)).
* ``simulate_validate``: `specmoe simulate --validate` on that run.
* ``host_misses``: shape_real again at 0.25 / 0.5 with misses="auto", against the fetch rows.
* ``compiled_decode``: eager vs compiled decode (CUDA graphs) on the same shape (benchmarks/compiled_decode.py;
  last: it runs when the budget has room).
* ``compiled_validate``: shape_real again with ``--compile`` at 1.0 / 0.5 and `specmoe simulate --validate` on it
  (the simulator's "compiled" compute model against the measured compiled rows; last, when the budget has room).

Output: at most three files in --out, whatever happens (a lent machine returns at most 8 files of at most
16 MiB): ``gpu_check_<device>.json`` (the summary), ``gpu_check_<device>.md`` (its table) and
``gpu_check_<device>_files.tar.gz`` (every step's own files and logs, largest left out first past 16 MiB).
All three are rewritten after every step, so a run killed from outside keeps the steps that finished.

The steps live in `gpu_check_steps.py` (its docstring says how to add one); this file runs them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/gpu_check.py` on a bare checkout: this checkout's specmoe
    sys.path.insert(0, str(ROOT))
import benchmarks.gpu_check_steps as steps  # noqa: E402  (the step table; benchmarks/ is a namespace package)
from benchmarks.gpu_check_steps import SHAPE, STEPS, Context, Step, StepTimeout, step  # noqa: E402,F401

RESULTS = Path(__file__).parent / "results"
MAX_FILE_BYTES = 16 * 2**20  # what a lent machine returns per file (and at most 8 files)
RESERVE_S = 5.0  # of the budget, kept for writing the summary and the archive


# ---- running ---------------------------------------------------------------------------------------------------
class _NvmlPeak:
    """NVML's peak "used" memory of every device while open (None without NVML); the parent never touches CUDA."""

    def __init__(self, poll_s: float = 0.05):
        from specmoe.measure.memory import nvml_devices

        self.poll_s, self.peak, self._stop = poll_s, None, threading.Event()
        self._probe = nvml_devices
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self):
        while not self._stop.is_set():
            devices = self._probe()
            if devices is None:
                return
            used = sum(d["used_bytes"] for d in devices)
            self.peak = used if self.peak is None else max(self.peak, used)
            self._stop.wait(self.poll_s)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=2)


def _run_step(s: Step, ctx: Context, timeout_s: float) -> dict:
    """`s` with its commands bounded by `timeout_s`; an exception is recorded, never raised. After a timeout the
    step's `collect` reads what its commands wrote so far."""
    t0 = time.perf_counter()
    ctx = replace(ctx, deadline=t0 + timeout_s, name=s.name)
    with _NvmlPeak() as mem:
        try:
            result, error, status = s.fn(ctx), None, None
        except Exception as err:
            timed_out = isinstance(err, StepTimeout)
            result, status = None, "timeout" if timed_out else "failed"
            error = str(err) if timed_out else traceback.format_exc()[-3000:]
            if s.collect is not None:  # what its commands wrote before the deadline (or the crash)
                try:
                    result = s.collect(ctx, timed_out)
                except Exception as partial_err:
                    error += f"\n(no partial results: {type(partial_err).__name__}: {partial_err})"
    record = {"seconds": round(time.perf_counter() - t0, 1), "timeout_s": round(timeout_s),
              "nvml_peak_used_bytes": mem.peak}
    if result is None:
        return {"status": status, **record, "error": error}
    result = json.loads(json.dumps(result, default=str))  # JSON-ready, whatever the step returned
    status = status or result.pop("status", "ok")
    result.pop("status", None)
    return {"status": status, **record, "result": result, **({"error": error} if error else {})}


def pack(work: Path, archive: Path, limit: int = MAX_FILE_BYTES) -> dict:
    """Every file under `work` into one tar.gz at `archive` (atomically), at most `limit` bytes: the largest
    files are left out first until it fits. Returns {"files": [...], "left_out": [...], "bytes": n}."""
    files = sorted((p for p in work.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    left_out = []
    while True:
        tmp = archive.with_name(f".{archive.name}.tmp")
        with tarfile.open(tmp, "w:gz") as tar:
            for f in files:
                tar.add(f, arcname=str(f.relative_to(work)))
        size = tmp.stat().st_size
        if size <= limit or not files:
            os.replace(tmp, archive)
            return {"files": [str(f.relative_to(work)) for f in files], "left_out": left_out, "bytes": size}
        biggest = files.pop()
        left_out.append(f"{biggest.relative_to(work)} ({biggest.stat().st_size} bytes)")


def _device_tag() -> tuple[str, str]:
    """("cuda", "h200") on a GPU (the simulator's profile name when it knows the card), ("cpu", "cpu") off one."""
    import torch

    if not torch.cuda.is_available():
        return "cpu", "cpu"
    name = torch.cuda.get_device_name(0)
    try:
        from specmoe.sim.hardware import HardwareProfile

        return "cuda", HardwareProfile.for_device_name(name).name
    except ValueError:
        return "cuda", name.lower().replace(" ", "-")


def markdown(report: dict) -> str:
    """The summary table, from the JSON."""
    from specmoe.measure.results import environment_line, fmt, markdown_table

    def figures(name: str, r: dict) -> str:
        if not r:
            return ""
        if name == "shape_real":
            return "; ".join(f"{x['name']}: {fmt(x['decode_tok_s'], '.1f')} tok/s, hit {fmt(x['hit_rate'], '.2f')}, "
                             f"overlap {fmt(x['overlap'], '.2f')}" for x in r["rows"])
        if name == "simulate_validate":
            return f"worst |error| {r['worst_abs_error']} (goal {r['goal']}) on {r['profile']}"
        if name == "wrapper_overhead":
            return f"ratio {r['ratio']:.3f} (goal >= {r['goal']}: {'met' if r['met'] else 'NOT met'})"
        if name == "moe_kernel":
            return "; ".join(f"{x['preset']} T={x['tokens']}: {x['speedup']:.2f}x" for x in r["speedups"])
        if name == "gpu_tests":
            return (f"{r['tests']} tests: {r['passed']} passed, {len(r['failed'])} failed, {r['skipped']} skipped"
                    + (f" ({', '.join(r['failed'])})"[:300] if r["failed"] else ""))
        if name == "nvml":
            return "; ".join(f"{d['name']}: {d['used_bytes'] / 2**30:.1f} / {d['total_bytes'] / 2**30:.1f} GiB"
                             for d in r.get("devices", []))
        return ", ".join(f"{k}: {v}" for k, v in r.items() if isinstance(v, (int, float, str)))[:300]

    rows = [[name, s["status"], fmt(s["seconds"], ".0f"),
             fmt(s["nvml_peak_used_bytes"] / 2**30, ".1f") if s.get("nvml_peak_used_bytes") else None,
             figures(name, s.get("result")) or (s.get("error", "").strip().splitlines() or [""])[-1][:200]]
            for name, s in report["steps"].items()]
    left = report.get("archive", {}).get("left_out")
    title = "GPU check" + (" (smoke run on CPU: tests the script, not a result)" if report["settings"]["smoke"] else "")
    return (f"# {title}\n\n" + markdown_table(["step", "status", "s", "NVML peak GiB", "figures"], rows)
            + f"\n\n{report['total_seconds']:.0f} s in all. {environment_line(report['environment'])}.\n"
            + (f"\nLeft out of the archive (over {MAX_FILE_BYTES >> 20} MiB): {', '.join(left)}.\n" if left else ""))


def _write(out: Path, tag: str, report: dict, work: Path) -> None:
    """The three output files, rewritten after every step: summary JSON, its markdown, the archive."""
    from specmoe.io import write_json, write_text

    report["archive"] = pack(work, out / f"gpu_check_{tag}_files.tar.gz")
    write_json(out / f"gpu_check_{tag}.json", report)
    write_text(out / f"gpu_check_{tag}.md", markdown(report))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="the same path on CPU at tiny sizes (tests the script)")
    ap.add_argument("--only", nargs="+", default=None, help="run these steps only")
    ap.add_argument("--list", action="store_true", help="list the steps and exit")
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of all steps together")
    ap.add_argument("--out", type=Path, default=RESULTS,
                    help="where the three output files go (summary JSON, markdown, archive of the rest)")
    args = ap.parse_args(argv)
    if args.list:
        for s in STEPS:
            print(f"{s.name:20s} timeout {s.timeout_s:.0f} s (smoke {s.smoke_timeout_s:.0f} s)")
        return 0
    unknown = sorted(set(args.only or ()) - {s.name for s in STEPS})
    if unknown:
        raise SystemExit(f"unknown steps {unknown}; choose from {[s.name for s in STEPS]}")
    start = time.perf_counter()
    device, tag = ("cpu", "cpu_smoke") if args.smoke else _device_tag()
    if device == "cpu" and not args.smoke:
        raise SystemExit("no CUDA device: gpu_check is for a GPU session (use --smoke to test the script on CPU)")
    from specmoe.measure import environment

    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)  # the steps' own files: archived, never loose in --out
        ctx = Context(args.smoke, work, tag, device)
        report = {"benchmark": "gpu_check", "environment": environment(device),
                  "settings": {"smoke": args.smoke, "budget_s": args.budget_s, "shape": SHAPE,
                               "steps": [{"name": s.name, "timeout_s": s.timeout_s,
                                          "smoke_timeout_s": s.smoke_timeout_s} for s in STEPS]},
                  "steps": {}, "total_seconds": 0.0}
        for s in STEPS:
            if args.only and s.name not in args.only:
                continue
            left = args.budget_s - RESERVE_S - (time.perf_counter() - start)
            timeout = min(s.smoke_timeout_s if args.smoke else s.timeout_s, left)
            if timeout < 1:
                report["steps"][s.name] = {"status": "skipped", "seconds": 0.0,
                                           "error": f"out of budget ({args.budget_s:.0f} s)"}
            else:
                print(f"[gpu_check] {s.name} (timeout {timeout:.0f} s) ...", flush=True)
                report["steps"][s.name] = _run_step(s, ctx, timeout)
                print(f"[gpu_check] {s.name}: {report['steps'][s.name]['status']} in "
                      f"{report['steps'][s.name]['seconds']:.0f} s", flush=True)
            report["total_seconds"] = time.perf_counter() - start
            _write(args.out, tag, report, work)  # after every step: a run cut short keeps what ran
        report["total_seconds"] = time.perf_counter() - start
        _write(args.out, tag, report, work)
    print(markdown(report))
    print(f"wrote {', '.join(f'gpu_check_{tag}{x}' for x in ('.json', '.md', '_files.tar.gz'))} into {args.out}")
    return 0 if all(s["status"] in ("ok", "skipped") for s in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
