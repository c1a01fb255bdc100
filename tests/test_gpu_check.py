"""benchmarks/gpu_check.py, the one command of a GPU session, runs its whole path on CPU (--smoke), records a
failing or stuck step and still runs the others."""

import importlib.util
import json
import os
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def gpu_check(monkeypatch):
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)  # before exec: its dataclasses look themselves up
    monkeypatch.delitem(sys.modules, "benchmarks.gpu_check_steps", raising=False)  # a fresh step table per test
    spec.loader.exec_module(module)
    return module


def test_a_failing_or_stuck_step_is_recorded_and_the_others_run(gpu_check, tmp_path):
    @gpu_check.step("boom", timeout_s=5, smoke_timeout_s=5)
    def boom(ctx):
        raise ValueError("this step is broken")

    @gpu_check.step("stuck", timeout_s=2, smoke_timeout_s=2)
    def stuck(ctx):
        ctx.run("-c", "import time; time.sleep(60)")
        return {}

    @gpu_check.step("fine", timeout_s=5, smoke_timeout_s=5)
    def fine(ctx):
        return {"answer": 42, "tag": ctx.tag}

    with pytest.raises(ValueError, match="two gpu_check steps"):
        gpu_check.step("fine", timeout_s=1)(lambda ctx: {})
    assert gpu_check.main(["--smoke", "--only", "boom", "stuck", "fine", "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "gpu_check_cpu_smoke.json").read_text())
    steps = report["steps"]
    assert list(steps) == ["boom", "stuck", "fine"]
    assert steps["boom"]["status"] == "failed" and "this step is broken" in steps["boom"]["error"]
    assert steps["stuck"]["status"] == "timeout" and steps["stuck"]["seconds"] < 10
    assert steps["fine"] == {**steps["fine"], "status": "ok", "result": {"answer": 42, "tag": "cpu_smoke"}}
    assert "| boom | failed |" in (tmp_path / "gpu_check_cpu_smoke.md").read_text()
    assert "stuck.log" in members(tmp_path)  # the killed command's output, archived


def members(out: Path) -> set[str]:
    """What a lent machine would bring back from `out`: at most 8 files of at most 16 MiB, no folders; the
    archive's member names."""
    files = sorted(p for p in out.iterdir())
    assert [p.name for p in files] == ["gpu_check_cpu_smoke.json", "gpu_check_cpu_smoke.md",
                                       "gpu_check_cpu_smoke_files.tar.gz"]
    assert all(p.is_file() and p.stat().st_size <= 16 * 2**20 for p in files)
    with tarfile.open(out / "gpu_check_cpu_smoke_files.tar.gz") as tar:
        return set(tar.getnames())


def test_a_timed_out_test_run_keeps_each_tests_outcome(gpu_check, tmp_path, monkeypatch):
    """pytest killed at the step's deadline: the tests that finished keep their outcomes, the one running is
    named, and the step says it timed out."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "test_fake.py").write_text(
        "import time\n\ndef test_fast():\n    pass\n\ndef test_fails():\n    assert 1 == 2\n\n"
        "def test_hangs():\n    time.sleep(120)\n")
    monkeypatch.setattr(gpu_check.steps, "GPU_TESTS", (str(fake / "test_fake.py"),))
    out = tmp_path / "out"
    gpu_check.main(["--smoke", "--only", "gpu_tests", "--budget-s", str(gpu_check.RESERVE_S + 25), "--out", str(out)])
    step = json.loads((out / "gpu_check_cpu_smoke.json").read_text())["steps"]["gpu_tests"]
    assert step["status"] == "timeout", step
    outcomes = {name.rpartition("::")[2]: v for name, v in step["result"]["outcomes"].items()}
    assert outcomes == {"test_fast": "passed", "test_fails": "failed", "test_hangs": "running when killed"}
    assert "gpu_tests.log" in members(out)


def test_the_archive_leaves_out_the_largest_files_past_the_limit(gpu_check, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "small.json").write_text("{}")
    (work / "noise.bin").write_bytes(os.urandom(2**20))  # 1 MiB that gzip cannot shrink
    info = gpu_check.pack(work, tmp_path / "a.tar.gz", limit=2**20)
    assert "small.json" in info["files"] and info["bytes"] <= 2**20
    assert any(x.startswith("noise.bin") for x in info["left_out"])


@pytest.mark.slow
def test_smoke_runs_every_step_on_cpu(gpu_check, tmp_path):
    """The same path a GPU session runs, at tiny sizes (about a minute of CPU time)."""
    assert gpu_check.main(["--smoke", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "gpu_check_cpu_smoke.json").read_text())
    steps = report["steps"]
    assert list(steps) == [s.name for s in gpu_check.STEPS] == [
        "nvml", "gpu_tests", "wrapper_overhead", "moe_kernel", "shape_real", "simulate_validate", "host_misses",
        "compiled_decode", "compiled_validate"]
    assert all(s["status"] in ("ok", "skipped") for s in steps.values()), steps
    rows = steps["shape_real"]["result"]["rows"]
    grid = {(r["capacity"], r["predictor"]) for r in rows if r["capacity"] is not None}
    assert grid == {(c, p) for c in (0.25, 0.5, 1.0) for p in ("none", "pregate")}
    assert all(r["same_tokens"] for r in rows if r["same_tokens"] is not None)
    assert any(r["stall_s"] is not None and r["overlap"] is not None for r in rows)
    assert steps["simulate_validate"]["result"]["rows"]
    assert steps["wrapper_overhead"]["result"]["ratio"] > 0
    assert {x["tokens"] for x in steps["moe_kernel"]["result"]["speedups"]} == {1, 33}
    assert {x["implementation"] for x in steps["moe_kernel"]["result"]["speedups"]} >= {"triton", "triton-int4-g128"}
    host = steps["host_misses"]["result"]["rows"]
    assert {r["capacity"] for r in host if r["capacity"] is not None} == {0.25, 0.5}
    assert all(r["same_tokens"] for r in host if r["same_tokens"] is not None)
    assert all(r["misses"] > 0 and r["host_computed"] is not None for r in host if r["capacity"] is not None)
    tests = steps["gpu_tests"]["result"]
    assert tests["tests"] > 0 and not tests["failed"]
    if steps["compiled_decode"]["status"] == "ok":  # last: it runs where the budget has room
        assert all(r["same_tokens"] for r in steps["compiled_decode"]["result"]["rows"].values())
    if steps["compiled_validate"]["status"] == "ok":
        assert steps["compiled_validate"]["result"]["compiled_run"] and steps["compiled_validate"]["result"]["rows"]
    archived = members(tmp_path)
    shape = "shape_real_qwen1.5-moe-a2.7b_cpu_smoke"
    for name in (f"{shape}.json", f"{shape}.validation.json", "wrapper_overhead_cpu_smoke.json",
                 "moe_kernel_cpu_smoke.json", "gpu_tests.junit.xml", "gpu_tests.log"):
        assert name in archived, name
    assert tests["outcomes"] and all(v in ("passed", "skipped") for v in tests["outcomes"].values())
