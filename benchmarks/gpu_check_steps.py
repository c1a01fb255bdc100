"""The steps of `benchmarks/gpu_check.py` (its step table) and what a step is given: `Context`, `step`, `STEPS`.

Each step is `def my_step(ctx: Context) -> dict`, registered in run order with
`@step("my_step", timeout_s=..., smoke_timeout_s=..., collect=...)`: it runs its work with
`ctx.run("benchmarks/x.py", ...)` (CUDA stays out of the runner's process), writes into `ctx.out` (the work
directory that is archived), and returns the figures to record; {"status": "failed", ...} marks a check that
ran but did not pass. `collect(ctx, timed_out)` (optional) reads what a step's commands wrote, also after a
timeout or crash. The runner (budget, archive, summary) is `gpu_check.py`.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = "qwen1.5-moe-a2.7b"
GPU_TESTS = ("-m", "gpu", "tests")  # pytest's selection for the gpu_tests step


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
            "goal": 0.9, "rows": {k: {f: m.get(f) for f in (
                "decode_tok_s", "segments_per_token", "experts_op_calls_per_token", "cuda_graph_replays_per_token",
                "compile_s", "same_tokens")} for k, m in r["modes"].items()},
            "status": "ok" if all(m["same_tokens"] for m in r["modes"].values()) else "failed"}


@step("compiled_validate", timeout_s=150, smoke_timeout_s=120)
def compiled_validate(ctx: Context) -> dict:
    """`specmoe simulate --validate` on a compiled run (shape_real --compile: its routing recorded): the
    simulator's "compiled" compute model against the measured compiled rows (the eager ones: simulate_validate).
    Last: it runs when the budget has room (skipped, not cut short, when less is left than it needs)."""
    need = 60 if ctx.smoke else 120  # estimates: a compile of the shape, two rows, the replay
    if ctx.deadline - time.perf_counter() < need:
        return {"status": "skipped", "reason": f"under {need} s of the budget left"}
    measured = _shape_real_json(ctx).with_name(_shape_real_json(ctx).stem + "_compiled.json")
    _run_shape_real(ctx, "--capacities", "1.0", "0.5", "--predictors", "none", "--compile",
                    *(["eager"] if ctx.smoke else []), prompts=1)
    ctx.run("-m", "specmoe.cli", "simulate", "--validate", str(measured),
            *(["--validate-profile", "h100"] if ctx.smoke else []))
    report = _read(measured.with_name(measured.stem + ".validation.json"))
    return {"file": measured.stem + ".validation.json", "profile": report["profile"]["name"],
            "compiled_run": report["compiled_run"], "worst_abs_error": report["worst_abs_error"],
            "within_goal": report["within_goal"], "goal": report["goal"],
            "rows": [{k: r[k] for k in ("setting", "variant", "measured_tok_s", "simulated_tok_s", "error")}
                     for r in report["rows"]]}

