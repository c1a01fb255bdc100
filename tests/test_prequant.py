"""Pre-quantized experts stay as published (issue 22 item 1): MXFP4 (gpt-oss), block-scaled FP8 (DeepSeek-V3,
Qwen3-FP8), GPTQ int4 (act-order too) and AWQ int4 (AutoAWQ's GEMM layout) checkpoints, written by the tests in their publishers' layouts, load with their experts
in their own bytes in the host store, over the copy and in the slots; the tokens are transformers' own
(dequantized) load's; host memory never holds a bf16 copy of all experts."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from prequant_ckpt import QUANT, dequantized_reference, write_checkpoint
from safetensors.torch import load_file

from specmoe import load_offloaded
from specmoe.kernels.host import available as host_kernel_available
from specmoe.kernels.prequant import (AWQ_ORDER, PrequantFormat, awq_to_gptq, dequantize_awq, dequantize_fp8,
                                      dequantize_gptq, quantize, quantize_awq)
from specmoe.runtime.store import FileStore, HostStore

KINDS = ("mxfp4", "fp8", "gptq", "awq")
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    base = tmp_path_factory.mktemp("prequant")
    return {kind: write_checkpoint(kind, base / kind) for kind in KINDS}


def test_formats_match_transformers_dequantization():
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 256, 192, generator=g)  # [E, N, K]
    mx = PrequantFormat.parse("mxfp4")
    parts = [quantize(w[e], mx) for e in range(3)]
    blocks, scales = torch.stack([p["_blocks"] for p in parts]), torch.stack([p["_scales"] for p in parts])
    ours = mx.dequantize({"_blocks": blocks, "_scales": scales}, torch.bfloat16)  # [E, N, K]
    theirs = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)  # [E, K, N]: gpt-oss's layout
    assert torch.equal(ours.transpose(1, 2), theirs)
    assert (ours.float() - w).abs().max() < 1.0  # 2 bits of mantissa: a coarse but honest code
    fp8 = PrequantFormat.parse("fp8-b128")
    p = quantize(w[0, :, :128].repeat(1, 3), fp8)  # [256, 384]: whole blocks, as the publishers' matrices
    assert p[""].dtype == torch.float8_e4m3fn and p["_scale_inv"].shape == (2, 3)
    assert torch.equal(dequantize_fp8(p[""], p["_scale_inv"], 128, torch.bfloat16),  # transformers' load path
                       Fp8Dequantize(None)._dequantize_one(p[""], p["_scale_inv"], torch.bfloat16))
    gptq = PrequantFormat.parse("gptq-int4-g64")
    p = quantize(w[0], gptq)
    assert {k: tuple(v.shape) for k, v in p.items()} == {".qweight": (24, 256), ".qzeros": (3, 32),
                                                         ".scales": (3, 256), ".g_idx": (192,)}
    assert (gptq.dequantize(p) - w[0]).abs().max() < 0.5


def test_awq_packs_as_autoawq_does():
    """AutoAWQ's `WQLinear_GEMM.from_linear` packing, written out as it is there (intweight [in, out], eight
    columns per int32 in order_map order), and its `unpack_awq` + `reverse_awq_order` dequantization."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(32, 64, generator=g)  # [N, K]
    group = 16
    p = quantize_awq(w, group)
    assert {k: (tuple(v.shape), v.dtype) for k, v in p.items()} == {
        ".qweight": ((64, 4), torch.int32), ".qzeros": ((4, 4), torch.int32), ".scales": ((4, 32), torch.float16)}
    scales = p[".scales"].float()  # [K/G, N]
    zeros = torch.stack([(p[".qzeros"] >> (4 * i)) & 0xF for i in range(8)], -1)  # [K/G, N/8, 8] nibble order
    zeros = zeros[..., [0, 4, 1, 5, 2, 6, 3, 7]].reshape(4, 32)  # AutoAWQ's REVERSE_AWQ_PACK_ORDER
    intweight = torch.round(w.T / scales.repeat_interleave(group, 0) + zeros.repeat_interleave(group, 0))
    intweight = intweight.clamp(0, 15).to(torch.int32)  # [K, N]
    qweight = torch.zeros(64, 4, dtype=torch.int32)
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    assert tuple(order_map) == AWQ_ORDER
    for col in range(32 // 8):
        for i in range(8):
            qweight[:, col] |= intweight[:, col * 8 + order_map[i]] << (i * 4)
    assert torch.equal(qweight, p[".qweight"])
    fmt = PrequantFormat.parse(f"awq-int4-g{group}")
    want = ((intweight - zeros.repeat_interleave(group, 0)).float() * scales.repeat_interleave(group, 0)).T
    assert torch.equal(fmt.dequantize(p), want)
    assert (want - w).abs().max() < 0.5


def test_quantization_configs():
    assert str(PrequantFormat.from_quantization_config(QUANT["gptq"])) == "gptq-int4-g32"
    assert str(PrequantFormat.from_quantization_config(QUANT["fp8"])) == "fp8-b128"
    assert str(PrequantFormat.from_quantization_config(QUANT["awq"])) == "awq-int4-g32"
    assert str(PrequantFormat.from_quantization_config(QUANT["gptq-act"])) == "gptq-int4-g32"  # act-order read
    assert PrequantFormat.parse("awq-int4-g128") == PrequantFormat("awq-int4", 128)
    assert PrequantFormat.from_quantization_config(None) is None
    for bad, match in [({"quant_method": "gptq", "bits": 8}, "8 bits"),
                       ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "'gemv' is not supported"),
                       ({"quant_method": "awq", "bits": 4, "zero_point": False}, "zero_point"),
                       ({"quant_method": "awq", "bits": 8}, "8 bits"),
                       ({"quant_method": "gptq", "bits": 4, "group_size": -1}, "group_size"),
                       ({"quant_method": "fp8", "weight_block_size": [128, 64]}, "not square"),
                       ({"quant_method": "bitsandbytes"}, "bitsandbytes")]:
        with pytest.raises(ValueError, match=match):
            PrequantFormat.from_quantization_config(bad)


@pytest.mark.parametrize("host_store", ["ram", "mmap"])
@pytest.mark.parametrize("kind", KINDS)
def test_tokens_equal_transformers_load(checkpoints, kind, host_store):
    path = checkpoints[kind]
    ref = dequantized_reference(kind, path)
    ids = torch.tensor([[3, 5, 7, 9, 11, 2], [4, 4, 8, 15, 16, 23]])
    with torch.no_grad():
        ref_tokens = ref.generate(ids, max_new_tokens=6, do_sample=False)
        ref_logits = ref(ids).logits
    smoe = load_offloaded(path, cache_capacity=0.25, host_store=host_store, device="cpu")
    with torch.no_grad():
        tokens = smoe.generate(ids, max_new_tokens=6, do_sample=False)
        logits = smoe(ids).logits
    assert torch.equal(tokens, ref_tokens)
    assert torch.equal(logits, ref_logits)  # the same bf16 weights: dequantization is exact in bf16
    # the published bytes, not a bf16 copy: in the store, in each slot, in each copy
    codec = smoe.codec
    published = PrequantFormat.from_quantization_config(QUANT[kind])
    assert codec.fmt == (PrequantFormat("gptq-int4", published.block) if kind == "awq" else published)
    assert smoe.store.layout.nbytes == codec.layout.nbytes == smoe.pool.layout.nbytes
    assert codec.layout.nbytes < codec.slot_layout.nbytes / (1.8 if kind == "awq" else 1.9)  # AWQ: + g_idx
    direct = kind in ("mxfp4", "fp8")  # GPTQ's / AWQ's gate and up concatenate along the output channels: RAM
    assert isinstance(smoe.store, FileStore if host_store == "mmap" and direct else HostStore)
    stats = smoe.stats.total
    assert stats.misses > 0 and stats.bytes_moved == stats.misses * codec.layout.nbytes  # each copy: published
    state = load_file(str(path / "model.safetensors"))
    packed = codec.layout.unpack(smoe.store[(1, 3)])
    if kind == "mxfp4":
        assert torch.equal(packed["gate_up_proj_blocks"], state["model.layers.1.mlp.experts.gate_up_proj_blocks"][3])
        assert torch.equal(packed["down_proj_scales"], state["model.layers.1.mlp.experts.down_proj_scales"][3])
    elif kind == "fp8":
        stem = "model.layers.1.mlp.experts.3."
        assert torch.equal(packed["gate_up_proj"].view(torch.uint8), torch.cat(
            [state[stem + "gate_proj.weight"], state[stem + "up_proj.weight"]]).view(torch.uint8))
        assert torch.equal(packed["down_proj_scale_inv"], state[stem + "down_proj.weight_scale_inv"])
    elif kind == "gptq":
        stem = "model.layers.1.mlp.experts.3."
        assert torch.equal(packed["gate_up_proj.qweight"], torch.cat(
            [state[stem + "gate_proj.qweight"], state[stem + "up_proj.qweight"]], dim=-1))
        assert torch.equal(packed["down_proj.g_idx"], state[stem + "down_proj.g_idx"])
    else:  # AWQ's [K, N/8] parts, concatenated along N, held in GPTQ's layout ([K/8, N], g_idx k // G)
        stem = "model.layers.1.mlp.experts.3."
        awq = {sfx: torch.cat([state[stem + p + sfx] for p in ("gate_proj", "up_proj")], dim=-1)
               for sfx in (".qweight", ".qzeros", ".scales")}
        assert torch.equal(packed["gate_up_proj.qweight"], awq_to_gptq(awq, 32)[".qweight"])
        assert packed["gate_up_proj.qweight"].shape == (64 // 8, 2 * 64)
        assert torch.equal(packed["down_proj.g_idx"], torch.arange(64, dtype=torch.int32) // 32)
    model = smoe.unwrap()  # experts back dequantized: the reference's
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref_logits)


HOST_KERNEL = {"mxfp4": "mxfp4", "fp8": "fp8", "gptq": "gptq", "awq": "gptq"}  # what computes host misses


@pytest.mark.parametrize("kind", ["mxfp4", "gptq", "awq"])
def test_host_misses_read_the_published_store(checkpoints, kind):
    """misses="host": the host kernel computes the misses from the store's bytes (AWQ's too, held in GPTQ's
    layout), with the tokens of fetching them and of the dequantized model (FP8: tests/test_host_kernels.py)."""
    path = checkpoints[kind]
    ref = dequantized_reference(kind, path)
    ids = torch.tensor([[3, 5, 7, 9, 11, 2]])
    with torch.no_grad():
        expected = ref.generate(ids, max_new_tokens=5, do_sample=False)
        fetched = load_offloaded(path, cache_capacity=0.25, device="cpu").generate(ids, max_new_tokens=5,
                                                                                   do_sample=False)
    assert torch.equal(fetched, expected)
    smoe = load_offloaded(path, cache_capacity=0.25, device="cpu", misses="host")
    with torch.no_grad():
        assert torch.equal(smoe.generate(ids, max_new_tokens=5, do_sample=False), expected)
    host = smoe.hot.host
    assert smoe.stats.total.host_computed > 0 and host.calls > 0
    if host_kernel_available():
        assert {host.kernel_name(layer) for layer in smoe.moe.layers} == {f"{host.kernel.name}-{HOST_KERNEL[kind]}"}


def test_readme_formats_table_matches_the_tests():
    """README's table of pre-quantized formats: one row per format these tests load (KINDS), each naming the
    device kernel and the host kernel the tests assert ran (`HOST_KERNEL`; gpt-oss's gate on both)."""
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| experts (`quantization_config`)"):]
    rows = [r for r in table[: table.index("\n\n")].splitlines()[2:]]
    methods = {r.split("(`", 1)[1].split("`", 1)[0]: r.split(" | ") for r in rows}
    assert set(methods) == {QUANT[k]["quant_method"] for k in KINDS} == set(KINDS)
    for kind, cells in methods.items():
        assert cells[2].startswith("fused Triton kernel"), cells
        assert cells[3].startswith(f"host kernel (`{HOST_KERNEL[kind]}`"), cells
    assert "gpt-oss's own experts too" in methods["mxfp4"][2] and "gpt-oss's gate" in methods["mxfp4"][3]


def test_awq_converts_to_gptq_without_loss():
    """`awq_to_gptq`: AWQ parts with every code and zero point 0..15 (zero 0 has no GPTQ nibble: written negated)
    dequantize to the same bits in GPTQ's layout, for one matrix and a stack; the host kernel reads the result
    (float64 reference of the AWQ dequantization)."""
    g = torch.Generator().manual_seed(3)
    n, k, group = 32, 64, 16
    awq = {".qweight": torch.randint(-2**31, 2**31 - 1, (k, n // 8), generator=g, dtype=torch.int32),
           ".qzeros": torch.randint(-2**31, 2**31 - 1, (k // group, n // 8), generator=g, dtype=torch.int32),
           ".scales": (torch.rand(k // group, n, generator=g) * 0.02 + 0.001).half()}
    awq[".qzeros"][0, 0] = 0  # eight zero points 0 in one word
    zeros = torch.stack([(awq[".qzeros"] >> s) & 15 for s in range(0, 32, 4)])
    assert (zeros == 0).any() and (zeros == 15).any()
    gptq = awq_to_gptq(awq, group)
    assert {s: (tuple(t.shape), t.dtype) for s, t in gptq.items()} == {
        ".qweight": ((k // 8, n), torch.int32), ".qzeros": ((k // group, n // 8), torch.int32),
        ".scales": ((k // group, n), torch.float16), ".g_idx": ((k,), torch.int32)}
    want = dequantize_awq(awq[".qweight"], awq[".qzeros"], awq[".scales"], group)
    assert torch.equal(dequantize_gptq(*(gptq[s] for s in (".qweight", ".qzeros", ".scales", ".g_idx"))), want)
    stacked = awq_to_gptq({s: torch.stack([t, t]) for s, t in awq.items()}, group)
    assert all(torch.equal(stacked[s][1], gptq[s]) for s in gptq)
    if host_kernel_available():
        from specmoe.kernels.host import HostExpertsKernel, prequant_matrix

        fmt = PrequantFormat("gptq-int4", group)
        down = awq_to_gptq(quantize_awq(torch.randn(k, n // 2, generator=g), group), group)  # [H = k, I = n / 2]
        mats = [(prequant_matrix(gptq, (n, k), fmt), prequant_matrix(down, (k, n // 2), fmt))]
        x = torch.randn(3, k, generator=g)
        out = HostExpertsKernel(1)("gptq", "silu", x, torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1), [0],
                                   mats, n // 2, group)
        gu = x.double() @ want.double().T  # [3, 2I]
        h = torch.nn.functional.silu(gu[:, : n // 2]) * gu[:, n // 2:]
        ref = h @ fmt.dequantize(down, torch.float64).T
        assert (out.double() - ref).abs().max() < 2e-5 * ref.abs().max()


def test_gptq_act_order(tmp_path):
    """desc_act=True: g_idx maps columns to groups out of order (the same map for gate_proj and up_proj, which
    share their input); it is kept as published and read as it is: the tokens and logits are those of the model
    with its experts dequantized. A checkpoint whose gate_proj and up_proj have different g_idx (no GPTQ run
    writes one) is refused in one line."""
    path = write_checkpoint("gptq-act", tmp_path / "act")
    ref = dequantized_reference("gptq-act", path)
    ids = torch.tensor([[3, 5, 7, 9, 11, 2]])
    with torch.no_grad():
        want_tokens, want_logits = ref.generate(ids, max_new_tokens=5, do_sample=False), ref(ids).logits
    smoe = load_offloaded(path, cache_capacity=0.25, device="cpu")
    g_idx = smoe.codec.layout.unpack(smoe.store[(0, 1)])["gate_up_proj.g_idx"]
    assert (g_idx.diff() < 0).any()  # not monotone: act-order's
    with torch.no_grad():
        assert torch.equal(smoe.generate(ids, max_new_tokens=5, do_sample=False), want_tokens)
        assert torch.equal(smoe(ids).logits, want_logits)
    bad = write_checkpoint("gptq-act", tmp_path / "split", split_g_idx=True)
    with pytest.raises(ValueError, match="gate_proj and up_proj have different GPTQ g_idx") as err:
        load_offloaded(bad, cache_capacity=0.25, device="cpu")
    assert "\n" not in str(err.value)


def test_compression_conflict_is_refused(checkpoints):
    with pytest.raises(ValueError, match="published as mxfp4"):
        load_offloaded(checkpoints["mxfp4"], cache_capacity=0.5, device="cpu", compression="int8")


BIG = {"mxfp4": dict(num_local_experts=16, intermediate_size=512, hidden_size=512),
       "awq": dict(num_experts=16, moe_intermediate_size=512, hidden_size=512)}


@pytest.mark.parametrize("kind", ["mxfp4", "awq"])
def test_host_rss_holds_no_bf16_copy_of_the_experts(tmp_path, kind):
    """A checkpoint whose bf16 experts would be 48 MiB (12.8 MiB as MXFP4, 13.9 MiB as AWQ-g32, whose store is
    built in RAM by concatenating gate_proj and up_proj), in a fresh process: loading raises peak RSS by the
    published experts (x1.1, + 3 MiB), and generating on a CPU (where the slot pool and the dequantized scratch
    of the routed experts are host memory too) stays under the bf16 size. The checkpoint is written here,
    before; a tiny one is loaded first (imports, first-call set-up); the peak (VmHWM) is reset through
    /proc/self/clear_refs."""
    path = write_checkpoint(kind, tmp_path / "big", **BIG[kind])
    warm = write_checkpoint(kind, tmp_path / "warm")
    script = textwrap.dedent(f"""
        import gc, json
        import torch
        torch.set_num_threads(1)
        from specmoe import load_offloaded
        def status(field):
            line = next(x for x in open("/proc/self/status") if x.startswith(field))
            return int(line.split()[1]) * 1024
        with torch.no_grad():
            load_offloaded({str(warm)!r}, cache_capacity=0.25, device="cpu").generate(
                torch.tensor([[3, 5, 7]]), max_new_tokens=3, do_sample=False)
        gc.collect()
        base = status("VmRSS:")
        open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
        smoe = load_offloaded({str(path)!r}, cache_capacity=0.25, device="cpu")
        loaded = status("VmHWM:") - base
        with torch.no_grad():
            smoe.generate(torch.tensor([[3, 5, 7]]), max_new_tokens=3, do_sample=False)
        print(json.dumps({{"load": loaded, "generate": status("VmHWM:") - base, "store": smoe.store.nbytes,
                          "bf16": smoe.codec.slot_layout.nbytes * len(smoe.store)}}))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                         cwd=ROOT, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["published"] = sum(t.nbytes for k, t in load_file(str(path / "model.safetensors")).items() if ".experts." in k)
    print("rss", r)
    assert r["bf16"] > 3.4 * r["published"]
    assert r["store"] < 1.01 * r["published"]  # AWQ's store in GPTQ's layout: + g_idx, 0.9 % here
    # the fixed part (~1 MiB of set-up and non-expert weights, and the allocator keeping one expert's read and
    # conversion scratch) does not grow with the checkpoint: 2.0-2.8 MiB here and at 3x the experts
    assert r["load"] < 1.1 * r["published"] + 3 * 2**20, r
    assert r["generate"] < 0.9 * r["bf16"], r


@pytest.mark.parametrize("scheme", ["mxfp4", "fp8-b32", "gptq-int4-g32"])
def test_publishers_formats_as_compression_of_a_bf16_model(scheme):
    """compression="mxfp4" (or "fp8-b32", "gptq-int4-g32") on a model loaded in bf16: the experts are encoded
    into that format (lossy, like int8/int4), and the wrapped model computes with exactly the dequantized codes
    (gpt-oss's experts are transposed: [in, out])."""
    from prequant_ckpt import tiny_model

    from specmoe import SpeculativeMoE

    model = tiny_model("mxfp4", dtype=torch.bfloat16)  # gpt-oss, H = I = 64
    ids = torch.tensor([[3, 5, 7, 9, 11, 2]])
    smoe = SpeculativeMoE(model, None, cache_capacity=0.25, compression=scheme)
    assert smoe.codec.transposed and str(smoe.codec.fmt) == scheme
    with torch.no_grad():
        tokens = smoe.generate(ids, max_new_tokens=5, do_sample=False)
        logits = smoe(ids).logits
    with pytest.warns(UserWarning, match="dequantized"):
        back = smoe.unwrap()  # now holds the dequantized codes: the same function
    with torch.no_grad():
        assert torch.equal(back.generate(ids, max_new_tokens=5, do_sample=False), tokens)
        assert torch.equal(back(ids).logits, logits)
