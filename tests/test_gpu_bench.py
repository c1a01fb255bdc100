"""The benchmark's CUDA paths: event timing, peak memory from torch and NVML, accelerate's device_map offload,
pinned copy rate. Skipped without CUDA."""

import importlib.util

import pytest
import torch
from conftest import build_tiny, make_inputs

from specmoe.bench.compare import BenchSettings, run_benchmark
from specmoe.measure import DeviceMemoryMonitor, measure_h2d

pytestmark = pytest.mark.gpu


def test_memory_monitor_and_copy_rate_on_cuda():
    with DeviceMemoryMonitor("cuda") as mem:
        x = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
        del x
    r = mem.result()
    assert r["torch_peak_bytes"] >= 64 * 2**20
    if importlib.util.find_spec("pynvml") is not None:
        assert r["nvml_peak_used_bytes"] >= r["torch_peak_bytes"] and r["nvml_total_bytes"] > 0
    rate = measure_h2d(16 * 2**20, "cuda", repeats=5)
    assert rate["pinned_h2d_bytes_per_s"] > 1e9 and rate["pinned_h2d_bytes_per_s"] >= 0.5 * rate["pageable_h2d_bytes_per_s"]


def test_run_benchmark_on_cuda():
    model = build_tiny("qwen2_moe", dtype=torch.bfloat16)
    model.generation_config.eos_token_id = None
    prompts = [make_inputs(model, batch=1, length=8, seed=s) for s in range(2)]
    settings = BenchSettings(capacities=(0.5,), predictors=("none", "oracle"), new_tokens=4, warmup=1,
                             accelerate_new_tokens=3)
    result = run_benchmark(model, prompts, settings, "cuda", progress=False)
    kinds = [v["kind"] for v in result["variants"]]
    assert kinds == ["unwrapped", "accelerate", "specmoe", "specmoe"]
    for v in result["variants"]:
        assert v["decode_tok_s"] > 0 and v["memory"]["torch_peak_bytes"] > 0
    assert result["variants"][1]["placement"]["budget_bytes"] > 0
    oracle = result["variants"][3]
    assert oracle["stats"]["prefetch_precision"] == 1.0 and oracle["bound"]["tok_s"] > 0
    assert next(model.parameters()).device.type == "cpu"  # left where it was
