"""The runtime with the fused kernel (compute="triton", interpreted on CPU), the data-driven choice of
compute="auto", and launch configurations read from JSON with a logged fallback to defaults."""

import json
import logging

import pytest
import torch
from conftest import build_tiny, make_inputs

from specmoe import SpeculativeMoE
from specmoe.kernels import MoEKernelConfig, launch_config, shape_key
from specmoe.kernels.jit import triton_runs_on
from specmoe.runtime.adapters import find_moe_layers
from specmoe.runtime.compute import FusedKernelCompute

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.skipif(not triton_runs_on(DEVICE), reason="Triton cannot run here")
@pytest.mark.parametrize("family,capacity", [("mixtral", 0.5), ("qwen2_moe", 2)])
def test_triton_compute_gives_the_models_tokens(family, capacity):
    """capacity 2 (one slot per layer) makes prefill compute in chunks: experts outside a chunk are masked."""
    model = build_tiny(family)
    inputs = make_inputs(model, batch=2, length=5, left_pad=True)
    with torch.no_grad():
        want_tokens = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        want_logits = model(**inputs).logits
    smoe = SpeculativeMoE(model, None, cache_capacity=capacity, device=DEVICE, compute="triton")
    assert sorted(smoe.experts_compute.kernel.activation) == [0, 1]  # the kernel computes every MoE layer
    with torch.no_grad():
        tokens = smoe.generate(**inputs, max_new_tokens=3, do_sample=False)
        logits = smoe(**inputs).logits
    stats = smoe.stats
    smoe.unwrap()
    assert torch.equal(tokens.cpu(), want_tokens)
    torch.testing.assert_close(logits.cpu(), want_logits, atol=1e-4, rtol=1e-4)
    assert (stats.chunked_calls > 0) == (capacity == 2)


def test_triton_compute_falls_back_for_unsupported_layers(caplog):
    model = build_tiny("gpt_oss")  # transposed experts with biases and a custom gate
    inputs = make_inputs(model, batch=1, length=4)
    with torch.no_grad():
        want = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    with caplog.at_level(logging.INFO, logger="specmoe.runtime.compute"):
        smoe = SpeculativeMoE(model, None, cache_capacity=0.5, compute="triton")
    assert smoe.experts_compute.kernel.activation == {}
    assert "does not support it (is_concatenated=False)" in caplog.text
    with torch.no_grad():
        assert torch.equal(smoe.generate(**inputs, max_new_tokens=2, do_sample=False), want)
    smoe.unwrap()


def test_compute_modes():
    model = build_tiny("mixtral")
    smoe = SpeculativeMoE(model, None, device="cpu")
    assert smoe.compute == "auto" and smoe.experts_compute.model_compute == "gather" and smoe.experts_compute.kernel is None
    smoe.unwrap()
    with pytest.raises(ValueError, match="compute must be one of"):
        SpeculativeMoE(model, None, compute="fast")


def write_tuned(directory, device_name, key, buckets):
    data = {"format": 1, "device_name": device_name, "shapes": {key: {
        str(b): {"config": MoEKernelConfig(block_t=1 if b <= 8 else 16, block_k=32).to_dict(), "faster": faster,
                 "kernel_us": 1.0, "grouped_mm_us": 2.0 if faster else 0.5}
        for b, faster in buckets.items()}}}
    path = directory / f"{launch_config.device_slug(device_name)}.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def config_dir(tmp_path, monkeypatch):
    monkeypatch.setattr(launch_config, "CONFIG_DIR", tmp_path)
    launch_config.clear_cache()
    yield tmp_path
    launch_config.clear_cache()


def test_tuned_file_gives_configs_and_decisions_by_bucket(config_dir):
    key = shape_key(torch.bfloat16, 4096, 14336, 2)
    write_tuned(config_dir, "cpu", key, {1: True, 8: True, 64: False})
    table = launch_config.launch_configs("cpu")
    assert table.kernel_faster(key, 1) is True
    assert table.kernel_faster(key, 5) is True  # bucket 8
    assert table.kernel_faster(key, 40) is False  # bucket 64
    assert table.kernel_faster(key, 5000) is False  # past the last bucket: the last one
    assert table.config_for(key, 3).block_t == 1 and table.config_for(key, 3).block_k == 32
    other = shape_key(torch.bfloat16, 2048, 1408, 4)
    assert table.kernel_faster(other, 1) is None  # never measured
    assert table.config_for(other, 1) == launch_config.read_defaults()[8]


def test_missing_device_file_falls_back_to_defaults_and_logs(config_dir, caplog):
    with caplog.at_level(logging.INFO, logger="specmoe.kernels.launch_config"):
        table = launch_config.launch_configs("cpu")
        cfg = table.config_for(shape_key(torch.float16, 64, 48, 2), 200)
    assert cfg == launch_config.read_defaults()[4096]
    assert "no tuned launch configs for cpu" in caplog.text


@pytest.mark.parametrize("content,match", [
    ("{not json", "is not valid JSON"),
    ('{"format": 1, "shapes": {"k": {"1": {"config": {"block_t": 8}}}}}', "block_t must be 1 or a power of two"),
    ('{"format": 1, "shapes": {"k": {"1": {"config": {}, "faster": "yes"}}}}', "'faster' must be"),
    ('{"format": 0, "shapes": {}}', "re-run benchmarks/autotune_moe_kernel.py"),
])
def test_bad_config_files_are_named(config_dir, content, match):
    path = config_dir / "cpu.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=match) as err:
        launch_config.launch_configs("cpu")
    assert str(path) in str(err.value)


def test_config_validation():
    with pytest.raises(ValueError, match="block_i must be a power of two"):
        MoEKernelConfig(block_i=48)
    with pytest.raises(ValueError, match="num_warps"):
        MoEKernelConfig(num_warps=3)
    assert MoEKernelConfig.from_dict(MoEKernelConfig(block_t=1).to_dict()) == MoEKernelConfig(block_t=1)


def test_auto_uses_the_kernel_only_where_measured_faster(config_dir, caplog):
    model = build_tiny("mixtral")
    layer = find_moe_layers(model).layers[0]
    fused = FusedKernelCompute("auto", torch.device("cpu"), "pool")
    fused.plan(layer)
    views = {"gate_up_proj": layer.experts.gate_up_proj, "down_proj": layer.experts.down_proj}
    key = shape_key(torch.float32, 64, 96, 2)
    write_tuned(config_dir, "cpu", key, {8: True, 64: False})
    with caplog.at_level(logging.INFO, logger="specmoe.runtime.compute"):
        assert fused.wanted(layer, torch.zeros(1, 2, dtype=torch.long), views)
        assert not fused.wanted(layer, torch.zeros(40, 2, dtype=torch.long), views)
        assert not fused.wanted(layer, torch.zeros(50, 2, dtype=torch.long), views)
    assert caplog.text.count("no measurement on cpu says the fused kernel beats") == 1  # logged once
