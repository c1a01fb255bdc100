"""The host experts kernel (`specmoe.kernels.host`): every format (specmoe's and the publishers' MXFP4, FP8 and
GPTQ int4, gpt-oss's clamped SwiGLU with biases), odd shapes, group sizes, token counts, thread counts and builds
(AVX-512 / AVX2 / portable, those this CPU runs) against a float64 PyTorch reference; the runtime computes host
misses with it (same tokens as the dequantized model, as fetching), falls back with one log line where it cannot
be had, and caches its build."""

import logging

import pytest
import torch
from conftest import build_tiny, make_inputs
from test_wrapper import greedy, logits_of

from specmoe import SpeculativeMoE
from specmoe.kernels.host import (HostExpertsKernel, build, check_threads, default_threads, kernel_group, matrix,
                                  prequant_matrix)
from specmoe.kernels.prequant import PrequantFormat
from specmoe.kernels.prequant import quantize as prequantize
from specmoe.kernels.quant import QuantFormat, dequantize, quantize

ISAS = [isa for isa in build.ISAS if build.NEEDS[isa] <= build.cpu_flags() or isa == "scalar"]
PLAIN = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ACT = {"silu": torch.nn.functional.silu, "gelu": torch.nn.functional.gelu,
       "gelu_tanh": lambda x: torch.nn.functional.gelu(x, approximate="tanh")}


def _experts(fmt: str, n: int, hidden: int, inter: int, seed: int = 0):
    """n experts in `fmt`: (kernel format, group, [(gate_up, down) Mats], [(gate_up, down) float64], keep)."""
    g = torch.Generator().manual_seed(seed)
    mats, exact, keep = [], [], []
    for _ in range(n):
        gu = torch.randn(2 * inter, hidden, generator=g) * 0.2
        dn = torch.randn(hidden, inter, generator=g) * 0.2
        if fmt in PLAIN:
            gu, dn = gu.to(PLAIN[fmt]), dn.to(PLAIN[fmt])
            keep += [gu, dn]
            mats.append((matrix(gu, tuple(gu.shape)), matrix(dn, tuple(dn.shape))))
            exact.append((gu.double(), dn.double()))
            kind, group = fmt, 64
        else:
            q = QuantFormat.parse(fmt)
            pg, pd = quantize(gu, q), quantize(dn, q)
            keep += [pg, pd]
            mats.append((matrix(pg, tuple(gu.shape), q), matrix(pd, tuple(dn.shape), q)))
            exact.append((dequantize(pg, q, tuple(gu.shape), torch.float64),
                          dequantize(pd, q, tuple(dn.shape), torch.float64)))
            kind, group = q.scheme, q.group_size
    return kind, group, mats, exact, keep


CHOSEN = [0, 3, 4]  # the experts the kernel computes; 1 and 2 are routed to but computed elsewhere


def _tokens(g: torch.Generator, tokens: int, hidden: int, num_experts: int = 5, top_k: int = 2):
    """x [T, H], each token's top_k of num_experts ids [T, k] and their weights [T, k], drawn from g."""
    x = torch.randn(tokens, hidden, generator=g)
    ids = torch.stack([torch.randperm(num_experts, generator=g)[:top_k] for _ in range(tokens)])
    return x, ids, torch.rand(tokens, top_k, generator=g)


def _reference(x, ids, w, chosen, exact, inter, activation):
    out = torch.zeros(x.shape, dtype=torch.float64)  # [T, H]
    for i, e in enumerate(chosen):
        gu, dn = exact[i]
        for t, j in (ids == e).nonzero().tolist():
            h = gu @ x[t].double()  # [2I]
            out[t] += float(w[t, j]) * (dn @ (ACT[activation](h[:inter]) * h[inter:]))
    return out


CASES = [  # (format, H, I, T, activation)
    ("fp32", 67, 45, 1, "silu"), ("bf16", 130, 37, 3, "gelu"), ("fp16", 64, 96, 17, "gelu_tanh"),
    ("int8", 67, 45, 5, "silu"), ("int8", 129, 200, 64, "silu"),
    ("int4-g32", 67, 45, 1, "silu"), ("int4-g64", 130, 37, 9, "gelu"), ("int4-g128", 200, 129, 4, "silu"),
    ("int4-g16", 40, 33, 2, "silu"), ("bf16", 2048, 24, 2, "silu"),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[0]}-H{c[1]}-I{c[2]}-T{c[3]}-{c[4]}")
def test_kernel_matches_float64_reference(isa, threads, case):
    fmt, hidden, inter, tokens, activation = case
    kind, group, mats, exact, keep = _experts(fmt, len(CHOSEN), hidden, inter)
    chosen = CHOSEN
    x, ids, w = _tokens(torch.Generator().manual_seed(tokens), tokens, hidden)
    kernel = HostExpertsKernel(threads, isa=isa)
    assert kernel.isa == isa
    out = kernel(kind, activation, x, ids, w, chosen, mats, inter, group)
    ref = _reference(x, ids, w, chosen, exact, inter, activation)
    scale = ref.abs().max().item() + 1e-12
    assert (out.double() - ref).abs().max().item() / scale < 2e-5
    again = kernel(kind, activation, x, ids, w, chosen, mats, inter, group, out=torch.zeros_like(out))
    assert torch.equal(again, out)  # reused scratch, same result; accumulates into a given out


def test_kernel_rejects_bad_arguments():
    kernel = HostExpertsKernel(1)
    kind, group, mats, _, keep = _experts("bf16", 1, 16, 8)
    x, ids, w = torch.randn(1, 16), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1)
    with pytest.raises(ValueError, match="formats"):
        kernel("int3", "silu", x, ids, w, [0], mats, 8)
    with pytest.raises(ValueError, match="matrix pairs"):
        kernel(kind, "silu", x, ids, w, [0, 1], mats, 8)
    with pytest.raises(ValueError, match="row-contiguous"):
        matrix(torch.randn(8, 16).t(), (16, 8))
    with pytest.raises(ValueError, match="part .qzero"):
        matrix({".qweight": torch.zeros(4, 32, dtype=torch.uint8), ".qscale": torch.zeros(4, 1, dtype=torch.half)},
               (4, 64), QuantFormat("int4", 64))
    with pytest.raises(ValueError, match="host_threads must be a positive int"):
        check_threads(0)
    assert 1 <= default_threads() <= 8


@pytest.mark.parametrize("family,compression,dtype", [
    ("mixtral", "int4", torch.float32), ("qwen3_moe", "int8", torch.float32), ("deepseek_v3", "int4-g32", torch.float32),
    ("olmoe", None, torch.bfloat16), ("qwen2_moe", None, torch.float32),
])
def test_runtime_host_misses_run_the_kernel_same_tokens(family, compression, dtype):
    """misses="host" through the kernel: the tokens (and logits) of fetching the same experts (the dequantized
    model when compressed), with 2 host threads."""
    model = build_tiny(family, dtype=dtype)
    inputs = make_inputs(model, batch=2, left_pad=True)
    fetched = SpeculativeMoE(model, None, cache_capacity=0.25, compression=compression)
    ref_tokens, ref_logits = greedy(fetched.generate, inputs), logits_of(fetched, model, inputs)
    with pytest.warns(UserWarning) if compression else _nothing():
        fetched.unwrap()
    model = build_tiny(family, dtype=dtype)
    smoe = SpeculativeMoE(model, None, cache_capacity=0.25, compression=compression, misses="host", host_threads=2)
    layers = smoe.hot.host  # HostExperts
    assert smoe.host_threads == 2 and layers.kernel is not None
    tokens, logits = greedy(smoe.generate, inputs), logits_of(smoe, model, inputs)
    names = {layers.kernel_name(layer) for layer in find_layers(smoe)}
    t = smoe.stats.total
    with pytest.warns(UserWarning) if compression else _nothing():
        smoe.unwrap()
    kind = compression[:4] if compression else {torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype]
    assert names == {f"{layers.kernel.name}-{kind}"}
    assert t.host_computed > 0 and t.bytes_moved == 0
    assert torch.equal(tokens, ref_tokens)
    tol = dict(atol=2e-5, rtol=1e-4) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    torch.testing.assert_close(logits.float(), ref_logits.float(), **tol)


def find_layers(smoe):
    return smoe.moe.layers


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_gpt_oss_and_no_compiler_fall_back_with_one_log_line(monkeypatch, caplog, tmp_path):
    model = build_tiny("gpt_oss")
    inputs = make_inputs(model, batch=2, left_pad=True)
    ref = greedy(model.generate, inputs)
    with caplog.at_level(logging.INFO, logger="specmoe.runtime.host_compute"):
        smoe = SpeculativeMoE(model, None, cache_capacity=0.25, misses="host")
        assert torch.equal(greedy(smoe.generate, inputs), ref)
    assert any("torch code" in r.getMessage() and "gpt-oss experts stored as [in, out]" in r.getMessage()
               for r in caplog.records)
    assert {smoe.hot.host.kernel_name(layer) for layer in find_layers(smoe)} == {"torch-eager"}
    smoe.unwrap()

    monkeypatch.setenv("SPECMOE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(build, "_compiler", lambda: None)
    monkeypatch.setattr(build, "_LOADED", {})
    monkeypatch.setattr(build, "_SAID", set())
    with caplog.at_level(logging.WARNING, logger="specmoe.kernels.host.build"):
        assert build.load("avx2") is None and build.load("avx2") is None
    said = [r for r in caplog.records if "unavailable" in r.getMessage()]
    assert len(said) == 1 and "no C++ compiler" in said[0].getMessage()


def test_build_is_cached_by_source_and_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECMOE_CACHE_DIR", str(tmp_path))
    first = build.build("scalar")
    assert first.parent == tmp_path / "host_kernels" and first.exists()
    stamp = first.stat().st_mtime_ns
    assert build.build("scalar") == first and first.stat().st_mtime_ns == stamp  # not rebuilt
    assert not list(first.parent.glob("*.tmp"))  # the atomic write left nothing behind
    monkeypatch.setenv("SPECMOE_HOST_ISA", "avx7")
    with pytest.raises(ValueError, match="SPECMOE_HOST_ISA must be one of"):
        build.choose_isa()
    monkeypatch.setenv("SPECMOE_HOST_ISA", "off")
    assert build.choose_isa() is None


# ---- the publishers' formats ------------------------------------------------------------------------------------
OAI = (1.702, 7.0)  # gpt-oss's swiglu_alpha, swiglu_limit
PRE_CASES = [  # (format, H, I, T, activation, biases, gptq zeros / g_idx)
    ("mxfp4", 64, 32, 1, "silu", False, None), ("mxfp4", 96, 64, 5, "swiglu_oai", True, None),
    ("mxfp4", 160, 96, 64, "swiglu_oai", True, None),
    ("fp8-b128", 200, 130, 3, "silu", False, None), ("fp8-b32", 67, 45, 17, "gelu", False, None),
    ("gptq-int4-g32", 64, 64, 1, "silu", False, "sym"), ("gptq-int4-g16", 144, 80, 7, "silu", False, "asym"), ("gptq-int4-g64", 128, 192, 4, "gelu", False, "asym"),
    ("gptq-int4-g32", 96, 64, 2, "silu", False, "act-order"), ("gptq-int4-g32", 64, 96, 3, "swiglu_oai", True, "asym"),
]


def _prequant_experts(fmt: PrequantFormat, n: int, hidden: int, inter: int, biases: bool, zeros, g):
    """n experts in a publisher's format: ([(gate_up, down) Mats], [(gate_up, down, b_gu, b_d) float64], keep).
    GPTQ "sym": every stored zero 7 (zero point 8); "act-order": a permuted g_idx (each group G columns
    scattered over K) with random codes, scales and zeros."""
    mats, exact, keep = [], [], []
    for _ in range(n):
        pair, ref = [], []
        for shape in ((2 * inter, hidden), (hidden, inter)):
            parts = prequantize(torch.randn(*shape, generator=g) * 0.2, fmt)
            if zeros == "sym":
                parts[".qzeros"].fill_(0x77777777)
            elif zeros == "act-order":
                k, groups = shape[1], shape[1] // fmt.block
                parts[".g_idx"] = (torch.randperm(k, generator=g) // fmt.block).to(torch.int32)
                parts[".qweight"] = torch.randint(-2**31, 2**31 - 1, parts[".qweight"].shape, generator=g,
                                                  dtype=torch.int32)
                parts[".qzeros"] = torch.randint(-2**31, 2**31 - 1, (groups, shape[0] // 8), generator=g,
                                                 dtype=torch.int32)
                parts[".scales"] = (torch.rand(groups, shape[0], generator=g) * 0.02).half()
            bias = (torch.randn(shape[0], generator=g) * 0.1).to(torch.bfloat16) if biases else None
            keep += [parts, bias]
            pair.append(prequant_matrix(parts, shape, fmt, bias))
            ref.append((fmt.dequantize(parts, torch.float64), None if bias is None else bias.double()))
        mats.append(tuple(pair))
        exact.append((ref[0][0], ref[1][0], ref[0][1], ref[1][1]))
    return mats, exact, keep


def _prequant_reference(x, ids, w, chosen, exact, inter, activation):
    out = torch.zeros(x.shape, dtype=torch.float64)
    for i, e in enumerate(chosen):
        gu, dn, bg, bd = exact[i]
        for t, j in (ids == e).nonzero().tolist():
            h = gu @ x[t].double() + (0 if bg is None else bg)  # [2I]
            if activation == "swiglu_oai":  # transformers' GptOssExperts._apply_gate
                gate, up = h[0::2].clamp(max=OAI[1]), h[1::2].clamp(-OAI[1], OAI[1])
                a = (up + 1) * gate * torch.sigmoid(gate * OAI[0])
            else:
                a = ACT[activation](h[:inter]) * h[inter:]
            out[t] += float(w[t, j]) * (dn @ a + (0 if bd is None else bd))
    return out


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", PRE_CASES, ids=lambda c: f"{c[0]}-H{c[1]}-I{c[2]}-T{c[3]}-{c[4]}-{c[6] or ''}")
def test_publishers_formats_match_float64_reference(isa, threads, case):
    """MXFP4, FP8 (128 and 32 blocks, K and N not multiples of the block), GPTQ int4 (sym and asym zeros, a
    sorted and an act-order g_idx, N not a multiple of a vector): the kernel reads their own bytes and gives the
    reference dequantizer's expert (float64) to float32 rounding, with gpt-oss's gate and biases where given."""
    name, hidden, inter, tokens, activation, biases, zeros = case
    fmt = PrequantFormat.parse(name)
    g = torch.Generator().manual_seed(tokens)
    chosen = CHOSEN
    mats, exact, keep = _prequant_experts(fmt, len(chosen), hidden, inter, biases, zeros, g)
    x, ids, w = _tokens(g, tokens, hidden)
    kernel = HostExpertsKernel(threads, isa=isa)
    kind = {"mxfp4": "mxfp4", "fp8": "fp8", "gptq-int4": "gptq"}[fmt.kind]
    params = OAI if activation == "swiglu_oai" else None
    out = kernel(kind, activation, x, ids, w, chosen, mats, inter, kernel_group(fmt), act_params=params)
    ref = _prequant_reference(x, ids, w, chosen, exact, inter, activation)
    assert (out.double() - ref).abs().max().item() / (ref.abs().max().item() + 1e-12) < 2e-5
    again = kernel(kind, activation, x, ids, w, chosen, mats, inter, kernel_group(fmt), act_params=params)
    assert torch.equal(again, out)


def test_publishers_parts_are_checked():
    fmt = PrequantFormat.parse("mxfp4")
    parts = prequantize(torch.randn(64, 64), fmt)
    with pytest.raises(ValueError, match="part '_scales'"):
        prequant_matrix({**parts, "_scales": parts["_scales"].float()}, (64, 64), fmt)
    with pytest.raises(ValueError, match="bias of shape"):
        prequant_matrix(parts, (64, 64), fmt, torch.zeros(63))
    kernel = HostExpertsKernel(1)
    x, ids, w = torch.randn(1, 64), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1)
    mats = [(prequant_matrix(parts, (64, 64), fmt), prequant_matrix(parts, (64, 64), fmt))]
    with pytest.raises(ValueError, match="act_params"):
        kernel("mxfp4", "swiglu_oai", x, ids, w, [0], mats, 32, 32)


@pytest.mark.parametrize("kind", ["mxfp4", "fp8", "gptq"])
def test_published_checkpoints_host_misses_run_the_kernel(kind, tmp_path):
    """The tiny checkpoints in the publishers' layouts (gpt-oss MXFP4 with its clamped gate and biases, Qwen3-MoE
    FP8 and GPTQ): misses="host" computes every host miss with the kernel, from the published bytes, and gives
    the tokens of fetching the same experts."""
    from prequant_ckpt import write_checkpoint

    from specmoe import load_offloaded

    path = write_checkpoint(kind, tmp_path / kind)
    ids = torch.tensor([[3, 5, 7, 9, 11, 2], [4, 4, 8, 15, 16, 23]])
    fetched = load_offloaded(path, cache_capacity=0.25, device="cpu")
    with torch.no_grad():
        expected = fetched.generate(ids, max_new_tokens=6, do_sample=False)
    smoe = load_offloaded(path, cache_capacity=0.25, device="cpu", misses="host", host_threads=2)
    with torch.no_grad():
        tokens = smoe.generate(ids, max_new_tokens=6, do_sample=False)
    host = smoe.hot.host
    assert {host.kernel_name(layer) for layer in find_layers(smoe)} == {f"{host.kernel.name}-{kind}"}
    assert smoe.stats.total.host_computed > 0 and host.calls > 0
    assert torch.equal(tokens, expected)


def test_simulator_charges_each_published_format_its_own_kernel(caplog):
    """The desktop presets carry the MXFP4 / FP8 / GPTQ kernels' measured rates (calibrated beside int4 / int8);
    experts as published are charged those; a profile without them falls back to int4 / int8 and says so."""
    from specmoe.sim.host import HOST_PROFILES, HostKernel, HostProfile, expert_format

    assert [expert_format(d, "none") for d in ("mxfp4", "fp8-b128", "gptq-int4-g128")] == ["mxfp4", "fp8", "gptq"]
    assert expert_format("mxfp4", "int4-g128") == "int4"  # re-encoded: specmoe's kernel
    desk = HOST_PROFILES["ddr5-desktop"]
    assert "measured beside the int4 / int8 kernel" in desk.source
    for fmt, ref in (("mxfp4", "int4"), ("fp8", "int8"), ("gptq", "int4")):
        assert desk.kernel(fmt) != desk.kernel(ref) and desk.kernel(fmt).bytes_per_s > 0
    old = HostProfile("old", 5e10, 8, 1e12, tuple((f, HostKernel(1e10 * (i + 1), 1e11)) for i, f in
                                                   enumerate(("bf16", "int8", "int4"))))
    with caplog.at_level(logging.WARNING, logger="specmoe.sim.host"):
        assert old.kernel("mxfp4") == old.kernel("int4") and old.kernel("fp8") == old.kernel("int8")
    assert any("no measured mxfp4 kernel" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="no host kernel"):
        old.kernel("int3")


def test_simulator_charges_int8_activations_only_where_asked(caplog):
    """host_activations="int8" picks the MXFP4 int8-activation kernel (measured beside the exact one, labelled in
    the calibration), other formats keep theirs; a profile without it is charged the exact kernel's rate and says
    so; the setting is validated once, in OffloadConfig."""
    from specmoe.runtime.config import OffloadConfig
    from specmoe.sim.calibrate import SyntheticExpert
    from specmoe.sim.host import CALIBRATION, HOST_PROFILES, HostKernel, HostProfile, expert_format
    from specmoe.io import read_json

    assert expert_format("mxfp4", "none", "int8") == "mxfp4-int8act" and expert_format("mxfp4", "none") == "mxfp4"
    assert [expert_format(d, c, "int8") for d, c in (("bf16", "none"), ("fp8-b128", "none"), ("bf16", "int4"))] == \
        ["bf16", "fp8", "int4"]
    entry = read_json(CALIBRATION)["builds"]["avx2"]["kernels"]["mxfp4-int8act"]
    assert entry["activations"] == "int8" and "changes the numerics" in entry["label"] and entry["vs_exact"]
    desk = HOST_PROFILES["ddr5-desktop"]
    assert desk.kernel("mxfp4-int8act").bytes_per_s > desk.kernel("mxfp4").bytes_per_s
    nbytes, weights = 13_236_736, 3 * 2880 * 2880  # one gpt-oss expert
    assert desk.expert_seconds(nbytes, weights, 1, "mxfp4-int8act") < desk.expert_seconds(nbytes, weights, 1, "mxfp4")
    old = HostProfile("old2", 5e10, 8, 1e12, tuple((f, HostKernel(1e10 * (i + 1), 1e11)) for i, f in
                                                    enumerate(("bf16", "int8", "int4", "mxfp4"))))
    with caplog.at_level(logging.WARNING, logger="specmoe.sim.host"):
        assert old.kernel("mxfp4-int8act") == old.kernel("mxfp4")
    assert any("no measured mxfp4-int8act kernel" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="host_activations must be one of"):
        OffloadConfig(host_activations="int4")
    expert = SyntheticExpert("gptq", 128, 128, activations="int8")  # no int8 kernel: float32, and said
    try:
        assert expert.kernel.endswith("-gptq")
    finally:
        expert.close()
