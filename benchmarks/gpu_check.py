"""One command for a session lent a GPU: everything only a GPU can show, in under 8 minutes, under results/.

    pip install --no-deps -e .                  # the device machine has no registry; torch/transformers/triton ship
    python benchmarks/gpu_check.py              # on the GPU (H100/H200: about 6-8 min, --budget-s 480)
    python benchmarks/gpu_check.py --smoke      # the same path on CPU at tiny sizes (CI: under 3 min)
    python benchmarks/gpu_check.py --only shape_real simulate_validate
    python benchmarks/gpu_check.py --list

Steps, in order (each with its own timeout, within the overall --budget-s; a step's work runs in commands
started with `ctx.run`, killed at its deadline):

* ``nvml``: the device as NVML sees it (name, driver, total and used memory); every step also records NVML's
  peak "used" while it ran (the CUDA context, the allocator's cache and the child processes included).
* ``shape_real``: Qwen1.5-MoE-A2.7B's shapes, random bf16 weights, at capacities 0.25 / 0.5 / 1.0 with no
  predictor and the pre-gate, plus the unwrapped model (benchmarks/shape_real.py); per row the decode tok/s,
  hit rate, stall and overlap (the share of copy time hidden behind compute: 1 - stall / (bytes moved / the
  measured pinned host->device rate)).
* ``simulate_validate``: `specmoe simulate --validate` on that run (the simulator against the measurement).
* ``wrapper_overhead``: SpeculativeMoE at capacity 1.0 with no predictor vs the unwrapped model (goal >= 0.97).
* ``moe_kernel``: the fused experts kernel, on bf16 slots and on int8 / int4-g128 compressed slots, against
  transformers' grouped_mm at decode (1, 8) and prefill (512, 2048) tokens (benchmarks/moe_kernel.py).
* ``gpu_tests``: `pytest -m gpu` (the GPU-marked tests).
* ``host_misses``: the shape_real run again at capacities 0.25 / 0.5 with misses="auto" (each miss copied or
  computed on the host, whichever the start-up cost model says is faster), against the fetch rows (issue 12).
  Last, so that a tight budget loses only it.

A step that raises, exits non-zero or runs out of time is recorded as such and the others still run. To add a
step (compressed slots, host compute of misses, ...), write `def my_step(ctx: Context) -> dict` below the
others and decorate it with `@step("my_step", timeout_s=..., smoke_timeout_s=...)`: it runs its work with
`ctx.run("benchmarks/x.py", ...)` (CUDA stays out of this process), reads what that wrote, and returns the
figures to record; {"status": "failed", ...} marks a check that ran but did not pass.

Writes benchmarks/results/gpu_check_<device>.json and .md (with --smoke: gpu_check_cpu_smoke.*), and each
step's own files next to them, every name carrying the device.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
SHAPE = "qwen1.5-moe-a2.7b"


class StepTimeout(Exception):
    """A step's command ran past the step's deadline (and was killed)."""


@dataclass(frozen=True)
class Context:
    """What a step knows: where to write, at which sizes, how to run a command, and its deadline."""

    smoke: bool
    out: Path  # results directory
    tag: str  # device tag in file names: "h200", "h100", ..., "cpu_smoke"
    device: str  # "cuda" or "cpu"
    deadline: float = float("inf")  # time.perf_counter() value the step's commands must finish by

    def run(self, *args: str) -> str:
        """Run `python args...` from the repository root (this checkout's specmoe first on the path), in its
        own process group, killed at the step's deadline; returns the output's tail.

        Raises:
            RuntimeError: a non-zero exit (with the output's tail). StepTimeout: the deadline passed.
        """
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            output, _ = proc.communicate(timeout=max(0.0, self.deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            raise StepTimeout(f"`python {' '.join(args)}` killed at the step's deadline:\n{output[-2000:]}") from None
        tail = output[-4000:]
        if proc.returncode != 0:
            raise RuntimeError(f"`python {' '.join(args)}` exited with {proc.returncode}:\n{tail}")
        return tail


@dataclass(frozen=True)
class Step:
    name: str
    fn: Callable[[Context], dict]
    timeout_s: float
    smoke_timeout_s: float


STEPS: list[Step] = []


def step(name: str, timeout_s: float, smoke_timeout_s: float = 60.0):
    """Register `fn(ctx) -> dict` as a step of the check (run in registration order)."""
    def register(fn):
        if any(s.name == name for s in STEPS):
            raise ValueError(f"two gpu_check steps are named {name!r}")
        STEPS.append(Step(name, fn, timeout_s, smoke_timeout_s))
        return fn
    return register


def _read(path: Path) -> dict:
    from specmoe.io import read_json

    return read_json(path, what="step result")


# ---- the steps -------------------------------------------------------------------------------------------------
@step("nvml", timeout_s=20, smoke_timeout_s=20)
def nvml(ctx: Context) -> dict:
    from specmoe.measure.memory import nvml_devices

    devices = nvml_devices()
    if devices is None:
        return {"status": "skipped", "reason": "no NVML (nvidia-ml-py missing or no NVIDIA driver)"}
    return {"devices": devices}


def _shape_real_json(ctx: Context) -> Path:
    return ctx.out / f"shape_real_{SHAPE}_{'cpu_smoke' if ctx.smoke else ctx.tag}.json"


def _run_shape_real(ctx: Context, *options: str, prompts: int) -> None:
    """benchmarks/shape_real.py on SHAPE with `options`, at tiny sizes on CPU with --smoke."""
    args = ["benchmarks/shape_real.py", "--shape", SHAPE, "--no-accelerate", "--out", str(ctx.out), *options]
    if ctx.smoke:
        args += ["--smoke", "--device", "cpu", "--prompts", "1", "--prompt-len", "6", "--new-tokens", "4",
                 "--warmup", "0"]
    else:
        args += ["--prompts", str(prompts), "--new-tokens", "32"]
    ctx.run(*args)


@step("shape_real", timeout_s=240, smoke_timeout_s=90)
def shape_real(ctx: Context) -> dict:
    _run_shape_real(ctx, "--capacities", "0.25", "0.5", "1.0", "--predictors", "none", "pregate", prompts=2)
    result = _read(_shape_real_json(ctx))
    copy = result.get("copy_microbenchmark", {})
    rate = copy.get("pinned_h2d_bytes_per_s") or copy.get("pageable_h2d_bytes_per_s")
    rows = []
    for v in result["variants"]:
        s = v.get("stats") or {}
        copy_s = s["bytes_moved"] / rate if rate and s.get("bytes_moved") else None
        rows.append({"name": v["name"], "capacity": v.get("capacity"), "predictor": v.get("predictor"),
                     "decode_tok_s": v["decode_tok_s"], "ttft_s": v["ttft_s"], "hit_rate": s.get("hit_rate"),
                     "stall_s": s.get("stall_s"), "copy_s_at_measured_rate": copy_s,
                     "overlap": None if not copy_s else min(1.0, max(0.0, 1.0 - s["stall_s"] / copy_s)),
                     "same_tokens": v.get("same_tokens")})
    return {"file": _shape_real_json(ctx).name, "rows": rows, "goals": result.get("goals"),
            "h2d_bytes_per_s": rate, "status": "ok" if all(r["same_tokens"] is not False for r in rows) else "failed"}


@step("simulate_validate", timeout_s=40, smoke_timeout_s=40)
def simulate_validate(ctx: Context) -> dict:
    measured = _shape_real_json(ctx)
    if not measured.exists():
        raise FileNotFoundError(f"{measured} is missing: the shape_real step did not write it")
    # CPU has no hardware profile; the smoke run borrows the H100's to exercise the same path
    ctx.run("-m", "specmoe.cli", "simulate", "--validate", str(measured),
            *(["--validate-profile", "h100"] if ctx.smoke else []))
    report = _read(measured.with_name(measured.stem + ".validation.json"))
    return {"file": measured.stem + ".validation.json", "profile": report["profile"]["name"],
            "worst_abs_error": report["worst_abs_error"], "within_goal": report["within_goal"], "goal": report["goal"],
            "rows": [{k: r[k] for k in ("setting", "variant", "measured_tok_s", "simulated_tok_s", "error")}
                     for r in report["rows"]]}


@step("wrapper_overhead", timeout_s=50, smoke_timeout_s=60)
def wrapper_overhead(ctx: Context) -> dict:
    out = ctx.out / f"wrapper_overhead_{ctx.tag}.json"
    args = ["benchmarks/wrapper_overhead.py", "--device", ctx.device, "--out", str(out)]
    if ctx.smoke:
        args += ["--hidden", "32", "--layers", "4", "--repeats", "2", "--prompt-len", "8", "--new-tokens", "4"]
    ctx.run(*args)
    r = _read(out)
    met = r["ratio_wrapped_over_unwrapped"] >= r["goal"]
    return {"file": out.name, "ratio": r["ratio_wrapped_over_unwrapped"], "ratio_median_of_pairs":
            r["ratio_median_of_pairs"], "goal": r["goal"], "met": met, "decode_tok_s": r["decode_tok_s"]}


@step("moe_kernel", timeout_s=60, smoke_timeout_s=60)
def moe_kernel(ctx: Context) -> dict:
    out = ctx.out / f"moe_kernel_{ctx.tag}.json"
    args = ["benchmarks/moe_kernel.py", "--out", str(out), "--implementations", "triton", "grouped_mm"]
    if ctx.smoke:
        args += ["--smoke", "--tokens", "1", "33"]
    else:
        args += ["--presets", SHAPE, "olmoe-1b-7b", "--tokens", "1", "8", "512", "2048", "--repeats", "20"]
    ctx.run(*args)
    r = _read(out)
    cells = {}
    for row in r["rows"]:
        cells.setdefault((row["preset"], row["tokens"]), {})[row["implementation"]] = row
    speedups = [{"preset": p, "tokens": t, "implementation": impl, "us": c[impl]["median_us"],
                 "grouped_mm_us": c["grouped_mm"]["median_us"],
                 "speedup": c["grouped_mm"]["median_us"] / c[impl]["median_us"],
                 "max_abs_diff": c[impl].get("max_abs_diff_vs_grouped_mm")}
                for (p, t), c in sorted(cells.items()) if "grouped_mm" in c
                for impl in sorted(c) if impl.startswith("triton")]  # bf16 slots and compressed slots
    return {"file": out.name, "launch_configs": r["settings"]["launch_configs"], "speedups": speedups}


@step("gpu_tests", timeout_s=100, smoke_timeout_s=90)
def gpu_tests(ctx: Context) -> dict:
    import xml.etree.ElementTree as ET

    with tempfile.TemporaryDirectory() as tmp:
        junit = Path(tmp) / "junit.xml"
        try:
            tail = ctx.run("-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", f"--junitxml={junit}", "tests")
        except RuntimeError as err:  # failures are recorded below, from the report
            tail = str(err)
        if not junit.exists():
            raise RuntimeError(f"pytest wrote no report:\n{tail}")
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        failed = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                  if case.find("failure") is not None or case.find("error") is not None]
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    return {**counts, "failed": failed, "status": "failed" if failed else "ok", "output_tail": tail[-1500:]}


@step("host_misses", timeout_s=120, smoke_timeout_s=90)
def host_misses(ctx: Context) -> dict:
    """misses="auto" (copy or compute on the host, per miss) on the same shape, against the shape_real step's
    misses="fetch" rows at the same capacities (issue 12)."""
    _run_shape_real(ctx, "--capacities", "0.25", "0.5", "--predictors", "none", "--misses", "auto", prompts=1)
    path = _shape_real_json(ctx).with_name(_shape_real_json(ctx).stem + "_misses-auto.json")
    result = _read(path)
    fetch = _read(_shape_real_json(ctx)) if _shape_real_json(ctx).exists() else {"variants": []}
    fetched = {(v.get("capacity"), v.get("predictor")): v["decode_tok_s"] for v in fetch["variants"]}
    rows = []
    for v in result["variants"]:
        s = v.get("stats") or {}
        base = fetched.get((v.get("capacity"), v.get("predictor")))
        rows.append({"name": v["name"], "capacity": v.get("capacity"), "decode_tok_s": v["decode_tok_s"],
                     "fetch_decode_tok_s": base, "auto_over_fetch": v["decode_tok_s"] / base if base else None,
                     "host_computed": s.get("host_computed"), "misses": s.get("misses"),
                     "same_tokens": v.get("same_tokens")})
    return {"file": path.name, "rows": rows,
            "status": "ok" if all(r["same_tokens"] is not False for r in rows) else "failed"}


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
    """`s` with its commands bounded by `timeout_s`; an exception is recorded, never raised."""
    t0 = time.perf_counter()
    with _NvmlPeak() as mem:
        try:
            result, error, status = s.fn(replace(ctx, deadline=t0 + timeout_s)), None, None
        except StepTimeout as err:
            result, error, status = None, str(err), "timeout"
        except Exception:
            result, error, status = None, traceback.format_exc()[-3000:], "failed"
    record = {"seconds": round(time.perf_counter() - t0, 1), "timeout_s": round(timeout_s),
              "nvml_peak_used_bytes": mem.peak}
    if result is None:
        return {"status": status, **record, "error": error}
    result = json.loads(json.dumps(result, default=str))  # JSON-ready, whatever the step returned
    return {"status": result.pop("status", "ok"), **record, "result": result}


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
            return f"{r['tests']} tests, {r['failures'] + r['errors']} failed, {r['skipped']} skipped"
        if name == "nvml":
            return "; ".join(f"{d['name']}: {d['used_bytes'] / 2**30:.1f} / {d['total_bytes'] / 2**30:.1f} GiB"
                             for d in r.get("devices", []))
        return ", ".join(f"{k}: {v}" for k, v in r.items() if isinstance(v, (int, float, str)))[:300]

    rows = [[name, s["status"], fmt(s["seconds"], ".0f"),
             fmt(s["nvml_peak_used_bytes"] / 2**30, ".1f") if s.get("nvml_peak_used_bytes") else None,
             figures(name, s.get("result")) or (s.get("error", "").strip().splitlines() or [""])[-1][:200]]
            for name, s in report["steps"].items()]
    title = "GPU check" + (" (smoke run on CPU: tests the script, not a result)" if report["settings"]["smoke"] else "")
    return (f"# {title}\n\n" + markdown_table(["step", "status", "s", "NVML peak GiB", "figures"], rows)
            + f"\n\n{report['total_seconds']:.0f} s in all. {environment_line(report['environment'])}.\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="the same path on CPU at tiny sizes (tests the script)")
    ap.add_argument("--only", nargs="+", default=None, help="run these steps only")
    ap.add_argument("--list", action="store_true", help="list the steps and exit")
    ap.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget of all steps together")
    ap.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = ap.parse_args(argv)
    if args.list:
        for s in STEPS:
            print(f"{s.name:20s} timeout {s.timeout_s:.0f} s (smoke {s.smoke_timeout_s:.0f} s)")
        return 0
    unknown = sorted(set(args.only or ()) - {s.name for s in STEPS})
    if unknown:
        raise SystemExit(f"unknown steps {unknown}; choose from {[s.name for s in STEPS]}")
    device, tag = ("cpu", "cpu_smoke") if args.smoke else _device_tag()
    if device == "cpu" and not args.smoke:
        raise SystemExit("no CUDA device: gpu_check is for a GPU session (use --smoke to test the script on CPU)")
    from specmoe.io import write_json, write_text
    from specmoe.measure import environment

    args.out.mkdir(parents=True, exist_ok=True)
    ctx = Context(args.smoke, args.out, tag, device)
    json_path = args.out / f"gpu_check_{tag}.json"
    report = {"benchmark": "gpu_check", "environment": environment(device),
              "settings": {"smoke": args.smoke, "budget_s": args.budget_s, "shape": SHAPE,
                           "steps": [asdict(s) | {"fn": s.fn.__name__} for s in STEPS]},
              "steps": {}, "total_seconds": 0.0}
    start = time.perf_counter()
    for s in STEPS:
        if args.only and s.name not in args.only:
            continue
        left = args.budget_s - (time.perf_counter() - start)
        timeout = min(s.smoke_timeout_s if args.smoke else s.timeout_s, left)
        if timeout < 1:
            report["steps"][s.name] = {"status": "skipped", "seconds": 0.0, "error": "out of budget"}
        else:
            print(f"[gpu_check] {s.name} (timeout {timeout:.0f} s) ...", flush=True)
            report["steps"][s.name] = _run_step(s, ctx, timeout)
            print(f"[gpu_check] {s.name}: {report['steps'][s.name]['status']} in "
                  f"{report['steps'][s.name]['seconds']:.0f} s", flush=True)
        report["total_seconds"] = time.perf_counter() - start
        write_json(json_path, report)  # after every step: a session cut short keeps what ran
    write_text(json_path.with_suffix(".md"), markdown(report))
    print(markdown(report))
    print(f"wrote {json_path} and {json_path.with_suffix('.md')}")
    return 0 if all(s["status"] in ("ok", "skipped") for s in report["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
