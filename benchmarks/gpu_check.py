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

Output: at most three files in --out, whatever happens (a lent machine returns at most 8 files of at most
16 MiB): ``gpu_check_<device>.json`` (the summary), ``gpu_check_<device>.md`` (its table) and
``gpu_check_<device>_files.tar.gz`` (every step's own files and logs, largest left out first past 16 MiB).
All three are rewritten after every step, so a run killed from outside keeps the steps that finished.

To add a step, write `def my_step(ctx: Context) -> dict` below the others and decorate it with
`@step("my_step", timeout_s=..., smoke_timeout_s=..., collect=...)`: it runs its work with
`ctx.run("benchmarks/x.py", ...)` (CUDA stays out of this process), writes into `ctx.out` (the work directory
that is archived), and returns the figures to record; {"status": "failed", ...} marks a check that ran but did
not pass. `collect(ctx, timed_out)` (optional) reads what a step's commands wrote, also after a timeout or crash.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/gpu_check.py` on a bare checkout: this checkout's specmoe
    sys.path.insert(0, str(ROOT))
RESULTS = Path(__file__).parent / "results"
SHAPE = "qwen1.5-moe-a2.7b"
MAX_FILE_BYTES = 16 * 2**20  # what a lent machine returns per file (and at most 8 files)
GPU_TESTS = ("-m", "gpu", "tests")  # pytest's selection for the gpu_tests step
RESERVE_S = 5.0  # of the budget, kept for writing the summary and the archive


class StepTimeout(Exception):
    """A step's command ran past the step's deadline (and was killed)."""


@dataclass(frozen=True)
class Context:
    """What a step knows: where to write, at which sizes, how to run a command, and its deadline."""

    smoke: bool
    out: Path  # the work directory: every file a step writes here goes into the archive
    tag: str  # device tag in file names: "h200", "h100", ..., "cpu_smoke"
    device: str  # "cuda" or "cpu"
    deadline: float = float("inf")  # time.perf_counter() value the step's commands must finish by
    name: str = "step"  # the running step: its commands' output goes to <out>/<name>.log

    @property
    def log(self) -> Path:
        return self.out / f"{self.name}.log"

    def run(self, *args: str) -> str:
        """Run `python args...` from the repository root (this checkout's specmoe first on the path), in its
        own process group, its output streamed to the step's log (kept if it is killed), killed at the step's
        deadline; returns the output's tail.

        Raises:
            RuntimeError: a non-zero exit (with the output's tail). StepTimeout: the deadline passed.
        """
        env = dict(os.environ, PYTHONUNBUFFERED="1",  # every line in the log as it is printed, if killed
                   PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        with open(self.log, "a") as log:
            log.write(f"$ python {' '.join(args)}\n")
            log.flush()
            start = log.tell()
            proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, text=True, start_new_session=True)
            try:
                proc.wait(timeout=max(0.0, self.deadline - time.perf_counter()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                raise StepTimeout(f"`python {' '.join(args)}` killed at the step's deadline:\n"
                                  f"{self._tail(start, 2000)}") from None
        tail = self._tail(start, 4000)
        if proc.returncode != 0:
            raise RuntimeError(f"`python {' '.join(args)}` exited with {proc.returncode}:\n{tail}")
        return tail

    def _tail(self, start: int, n: int) -> str:
        with open(self.log, errors="replace") as f:
            f.seek(start)
            return f.read()[-n:]


@dataclass(frozen=True)
class Step:
    name: str
    fn: Callable[[Context], dict]
    timeout_s: float
    smoke_timeout_s: float
    collect: Callable[[Context, bool], dict] | None = None  # what the commands wrote, after a timeout too


STEPS: list[Step] = []


def step(name: str, timeout_s: float, smoke_timeout_s: float = 60.0, collect=None):
    """Register `fn(ctx) -> dict` as a step of the check (run in registration order); `collect(ctx, timed_out)`
    gives the step's figures from what its commands wrote, also when they ran out of time."""
    def register(fn):
        if any(s.name == name for s in STEPS):
            raise ValueError(f"two gpu_check steps are named {name!r}")
        STEPS.append(Step(name, fn, timeout_s, smoke_timeout_s, collect))
        return fn
    return register


def _read(path: Path) -> dict:
    from specmoe.io import read_json

    return read_json(path, what="step result")


# ---- the steps -------------------------------------------------------------------------------------------------
@step("nvml", timeout_s=15, smoke_timeout_s=20)
def nvml(ctx: Context) -> dict:
    from specmoe.measure.memory import nvml_devices

    devices = nvml_devices()
    if devices is None:
        return {"status": "skipped", "reason": "no NVML (nvidia-ml-py missing or no NVIDIA driver)"}
    return {"devices": devices}


_OUTCOME = re.compile(r"^(\S+\.py::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")  # pytest -v lines
_STARTED = re.compile(r"^(\S+\.py::\S+)\s*$")  # a test whose outcome is not written yet


def _test_outcomes(ctx: Context, timed_out: bool) -> dict:
    """Each GPU test's outcome from pytest's verbose lines in the step's log (the test running when a timeout
    killed pytest included), failure messages from the junit report when pytest finished."""
    import xml.etree.ElementTree as ET

    outcomes, running = {}, None
    for line in ctx.log.read_text(errors="replace").splitlines() if ctx.log.exists() else ():
        m = _OUTCOME.match(line)
        if m:
            outcomes[m.group(1)], running = m.group(2).lower(), None
        elif _STARTED.match(line):
            running = _STARTED.match(line).group(1)
    if timed_out and running:
        outcomes[running] = "running when killed"
    messages = {}
    junit = ctx.out / "gpu_tests.junit.xml"
    if junit.exists():
        for case in ET.parse(junit).getroot().iter("testcase"):
            bad = case.find("failure") if case.find("failure") is not None else case.find("error")
            if bad is not None:  # a classname-less case is a module that could not be collected
                cls = case.get("classname")
                name = f"{cls.replace('.', '/')}.py::{case.get('name')}" if cls else case.get("name", "?")
                messages[name] = (bad.get("message") or "")[:300]
                outcomes.setdefault(name, "error")
    counts = {k: sum(v == k for v in outcomes.values()) for k in ("passed", "failed", "error", "skipped")}
    failed = sorted(t for t, v in outcomes.items() if v in ("failed", "error", "running when killed"))
    return {"tests": len(outcomes), **counts, "failed": failed, "messages": messages, "outcomes": outcomes,
            "status": "timeout" if timed_out else "failed" if failed or not outcomes else "ok"}


@step("gpu_tests", timeout_s=150, smoke_timeout_s=90, collect=_test_outcomes)
def gpu_tests(ctx: Context) -> dict:
    try:
        # a test module that cannot be imported there (a package the machine lacks) must not stop the others
        ctx.run("-m", "pytest", "-v", "-p", "no:cacheprovider", "--continue-on-collection-errors",
                f"--junitxml={ctx.out / 'gpu_tests.junit.xml'}", *GPU_TESTS)
    except RuntimeError:  # failing tests: recorded per test below
        pass
    return _test_outcomes(ctx, timed_out=False)


def _wrapper_overhead_rows(ctx: Context, timed_out: bool) -> dict:
    out = ctx.out / f"wrapper_overhead_{ctx.tag}.json"
    r = _read(out)
    met = r["ratio_wrapped_over_unwrapped"] >= r["goal"]
    return {"file": out.name, "ratio": r["ratio_wrapped_over_unwrapped"], "ratio_median_of_pairs":
            r["ratio_median_of_pairs"], "goal": r["goal"], "met": met, "decode_tok_s": r["decode_tok_s"]}


@step("wrapper_overhead", timeout_s=40, smoke_timeout_s=60, collect=_wrapper_overhead_rows)
def wrapper_overhead(ctx: Context) -> dict:
    args = ["benchmarks/wrapper_overhead.py", "--device", ctx.device, "--out",
            str(ctx.out / f"wrapper_overhead_{ctx.tag}.json")]
    if ctx.smoke:
        args += ["--hidden", "32", "--layers", "4", "--repeats", "2", "--prompt-len", "8", "--new-tokens", "4"]
    ctx.run(*args)
    return _wrapper_overhead_rows(ctx, False)


def _moe_kernel_rows(ctx: Context, timed_out: bool) -> dict:
    out = ctx.out / f"moe_kernel_{ctx.tag}.json"
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


@step("moe_kernel", timeout_s=50, smoke_timeout_s=60, collect=_moe_kernel_rows)
def moe_kernel(ctx: Context) -> dict:
    args = ["benchmarks/moe_kernel.py", "--out", str(ctx.out / f"moe_kernel_{ctx.tag}.json"),
            "--implementations", "triton", "grouped_mm"]
    if ctx.smoke:
        args += ["--smoke", "--tokens", "1", "33"]
    else:
        args += ["--presets", SHAPE, "olmoe-1b-7b", "--tokens", "1", "8", "512", "2048", "--repeats", "20"]
    ctx.run(*args)
    return _moe_kernel_rows(ctx, False)


def _shape_real_json(ctx: Context) -> Path:
    return ctx.out / f"shape_real_{SHAPE}_{'cpu_smoke' if ctx.smoke else ctx.tag}.json"


def _run_shape_real(ctx: Context, *options: str, prompts: int) -> None:
    """benchmarks/shape_real.py on SHAPE with `options`, at tiny sizes on CPU with --smoke."""
    args = ["benchmarks/shape_real.py", "--shape", SHAPE, "--no-accelerate", "--out", str(ctx.out), *options]
    if ctx.smoke:
        args += ["--smoke", "--device", "cpu", "--prompts", "1", "--prompt-len", "6", "--new-tokens", "4",
                 "--warmup", "0"]
    else:
        args += ["--prompts", str(prompts), "--new-tokens", "24"]
    ctx.run(*args)


def _shape_real_rows(ctx: Context, timed_out: bool) -> dict:
    """The rows shape_real.py saved (it saves after each one, so a timeout keeps those that finished)."""
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
    ok = all(r["same_tokens"] is not False for r in rows)
    return {"file": _shape_real_json(ctx).name, "rows": rows, "goals": result.get("goals"),
            "h2d_bytes_per_s": rate, "status": "timeout" if timed_out else "ok" if ok else "failed"}


@step("shape_real", timeout_s=170, smoke_timeout_s=90, collect=_shape_real_rows)
def shape_real(ctx: Context) -> dict:
    _run_shape_real(ctx, "--capacities", "0.25", "0.5", "1.0", "--predictors", "none", "pregate", prompts=2)
    return _shape_real_rows(ctx, False)


@step("simulate_validate", timeout_s=20, smoke_timeout_s=40)
def simulate_validate(ctx: Context) -> dict:
    measured = _shape_real_json(ctx)
    if not measured.exists():
        raise FileNotFoundError(f"{measured.name} is missing: the shape_real step did not write it")
    # CPU has no hardware profile; the smoke run borrows the H100's to exercise the same path
    ctx.run("-m", "specmoe.cli", "simulate", "--validate", str(measured),
            *(["--validate-profile", "h100"] if ctx.smoke else []))
    report = _read(measured.with_name(measured.stem + ".validation.json"))
    return {"file": measured.stem + ".validation.json", "profile": report["profile"]["name"],
            "worst_abs_error": report["worst_abs_error"], "within_goal": report["within_goal"], "goal": report["goal"],
            "rows": [{k: r[k] for k in ("setting", "variant", "measured_tok_s", "simulated_tok_s", "error")}
                     for r in report["rows"]]}


def _host_misses_rows(ctx: Context, timed_out: bool) -> dict:
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
    ok = all(r["same_tokens"] is not False for r in rows)
    return {"file": path.name, "rows": rows, "status": "timeout" if timed_out else "ok" if ok else "failed"}


@step("host_misses", timeout_s=60, smoke_timeout_s=90, collect=_host_misses_rows)
def host_misses(ctx: Context) -> dict:
    """misses="auto" (copy or compute on the host, per miss) on the same shape, against the shape_real step's
    misses="fetch" rows at the same capacities (issue 12)."""
    _run_shape_real(ctx, "--capacities", "0.25", "0.5", "--predictors", "none", "--misses", "auto", prompts=1)
    return _host_misses_rows(ctx, False)


# ---- compiled decode (issue 20 item 4; its own script, benchmarks/compiled_decode.py) ----------------------------
def _compiled_json(ctx: Context) -> Path:
    return ctx.out / f"compiled_decode_{'cpu_smoke' if ctx.smoke else ctx.tag}.json"


@step("compiled_decode", timeout_s=150, smoke_timeout_s=150)
def compiled_decode(ctx: Context) -> dict:
    """Eager vs compiled decode (CUDA graphs) on SHAPE, wrapped at 1.0 / 0.5 and unwrapped through transformers'
    static-cache compile; goal: wrapped compiled at 1.0 >= 0.9x the unwrapped compiled model."""
    args = ["benchmarks/compiled_decode.py", "--shape", SHAPE, "--calibration", "", "--out", str(ctx.out),
            "--name", _compiled_json(ctx).stem]
    args += ["--smoke", "--device", "cpu", "--backend", "eager", "--capacities", "1.0", "--repeats", "1",
             "--new-tokens", "4", "--prompt-len", "6"] if ctx.smoke else \
        ["--capacities", "1.0", "0.5", "--repeats", "3", "--new-tokens", "24"]
    ctx.run(*args)
    r = _read(_compiled_json(ctx))
    ratio = r["ratio_wrapped_1_compiled_over_unwrapped_compiled"]
    return {"file": _compiled_json(ctx).name, "ratio_wrapped_1_compiled_over_unwrapped_compiled": ratio,
            "goal": 0.9, "rows": {k: {f: m[f] for f in ("decode_tok_s", "segments_per_token", "cuda_graph_replays_per_token",
                                                     "compile_s", "same_tokens")} for k, m in r["modes"].items()},
            "status": "ok" if all(m["same_tokens"] for m in r["modes"].values()) else "failed"}


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
