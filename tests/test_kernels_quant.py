"""Compressed experts: int8 / int4 round trips within their error bounds, the dequantize kernel against the
reference, the codec's byte layouts (the runtime with compressed slots: test_compressed_runtime.py)."""

# Shape legend: N rows, K columns, G group size

import contextlib

import pytest
import torch
from conftest import build_tiny

from specmoe import SpeculativeMoE
from specmoe.kernels import QuantFormat, dequantize, dequantize_into, fake_quantize, quantize
from specmoe.kernels.jit import triton_runs_on
from specmoe.kernels import quant
from specmoe.runtime.adapters import ExpertTensorSpec, find_moe_layers
from specmoe.runtime.compression import ExpertCodec
from specmoe.runtime.store import ExpertLayout

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
FORMATS = [QuantFormat("int8"), QuantFormat("int4", 16), QuantFormat("int4", 64)]


@contextlib.contextmanager
def reference_dequant():
    """Slots rebuilt by the PyTorch reference (the interpreted kernel is slow for whole-model tests)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(quant, "triton_runs_on", lambda device: False)
        yield


def ulp(x: torch.Tensor) -> torch.Tensor:
    """One unit in the last place of x's dtype, elementwise (for |x| >= the smallest normal)."""
    eps = torch.finfo(x.dtype).eps
    return x.float().abs().clamp_min(torch.finfo(x.dtype).tiny) * eps


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS, ids=str)
def test_round_trip_error_is_within_half_a_step(fmt, dtype):
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(37, 75, generator=g) * 0.05).to(dtype)  # K = 75: not a multiple of any group
    w[3] = 0.0  # an all-zero row: scale must not be 0
    parts = quantize(w, fmt)
    for sfx, (shape, dt) in fmt.parts((37, 75)).items():
        assert parts[sfx].shape == shape and parts[sfx].dtype == dt
    back = dequantize(parts, fmt, (37, 75), dtype)
    assert back.shape == w.shape and back.dtype == dtype
    assert torch.all(back[3] == 0)
    if fmt.scheme == "int8":
        step = parts[".qscale"][:, None].expand(37, 75)  # [N, K]
    else:
        step = parts[".qscale"].float().repeat_interleave(fmt.group_size, dim=1)[:, :75]
    bound = step / 2 + ulp(back) + 1e-3 * step  # half a quantization step, the dtype's rounding, fp16 scales
    err = (back.float() - w.float()).abs()
    assert torch.all(err <= bound), (err - bound).max()
    assert err.max() > 0  # it did quantize
    assert torch.equal(fake_quantize(w, fmt), back)


def test_int4_packs_even_columns_in_the_low_nibble():
    fmt = QuantFormat("int4", 16)
    codes = torch.arange(16).float()  # one group: codes 0..15 with scale 1, zero 0
    w = codes[None, :].repeat(2, 1)
    parts = quantize(w, fmt)
    assert parts[".qweight"][0].tolist() == [c0 | (c1 << 4) for c0, c1 in zip(range(0, 16, 2), range(1, 16, 2))]
    assert parts[".qscale"].float().tolist() == [[1.0], [1.0]] and parts[".qzero"].float().tolist() == [[0.0], [0.0]]
    assert torch.equal(dequantize(parts, fmt, (2, 16), torch.float32), w)


@pytest.mark.skipif(not triton_runs_on(DEVICE), reason="Triton cannot run here")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("fmt", FORMATS[:2], ids=str)
def test_dequant_kernel_matches_reference(fmt, dtype):
    g = torch.Generator().manual_seed(1)
    w = (torch.randn(37, 75, generator=g) * 0.05).to(dtype)
    parts = {k: v.to(DEVICE) for k, v in quantize(w, fmt).items()}
    ref = dequantize(parts, fmt, (37, 75), dtype)
    slot = torch.full((40, 80), float("nan"), dtype=dtype, device=DEVICE)  # a strided view, as in a slot
    out = slot[:37, :75]
    dequantize_into(out, parts, fmt)
    assert not out.isnan().any() and slot[37:].isnan().all() and slot[:, 75:].isnan().all()
    # float32 math then one rounding; triton's interpreter rounds to bfloat16 by truncation: one ulp apart
    assert torch.all((out.float() - ref.float()).abs() <= (ulp(ref) if dtype == torch.bfloat16 else 0))


def test_dequant_checks_parts():
    fmt = QuantFormat("int4", 16)
    parts = quantize(torch.randn(8, 32), fmt)
    with pytest.raises(ValueError, match="qweight"):
        dequantize_into(torch.empty(8, 48), parts, fmt)


def test_format_parse_and_validation():
    assert QuantFormat.parse("int4-g128") == QuantFormat("int4", 128)
    assert str(QuantFormat.parse("int8")) == "int8"
    for bad in ("int3", "int4-g48", "int4-gx"):
        with pytest.raises(ValueError, match="int4-g128"):
            QuantFormat.parse(bad)


@pytest.mark.parametrize("scheme,low,high", [("int8", 1.9, 2.0), ("int4", 3.4, 3.6), ("int4-g128", 3.6, 3.8)])
def test_compressed_bytes(scheme, low, high):
    """bf16 experts: int8 halves the bytes a swap moves, int4 cuts them 3.5-3.8x (scales and a bias included)."""
    specs = (ExpertTensorSpec("gate_up_proj", (512, 256), torch.bfloat16),
             ExpertTensorSpec("down_proj", (256, 256), torch.bfloat16), ExpertTensorSpec("bias", (512,), torch.bfloat16))
    codec = ExpertCodec(ExpertLayout(specs), QuantFormat.parse(scheme))
    assert low <= codec.ratio <= high


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_codec_round_trip(scheme):
    """decode(encode) is the quantize-dequantize of each matrix; other tensors (biases) pass unchanged."""
    model = build_tiny("gpt_oss", dtype=torch.bfloat16)
    moe = find_moe_layers(model)
    layer = moe.layers[0]
    codec = ExpertCodec(ExpertLayout(moe.specs), QuantFormat.parse(scheme))
    tensors = layer.layout.expert_tensors(layer.experts, 3)
    src = torch.zeros(codec.layout.nbytes, dtype=torch.uint8)
    codec.layout.pack(src, codec.encode(tensors))
    dst = torch.zeros(codec.slot_layout.nbytes, dtype=torch.uint8)
    with reference_dequant():
        codec.decode(dst, src)
    for name, got in codec.slot_layout.unpack(dst).items():
        want = tensors[name] if tensors[name].dim() == 1 else fake_quantize(tensors[name], codec.fmt)
        assert torch.equal(got, want), name


def test_unknown_compression_is_refused_before_touching_the_model():
    model = build_tiny("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="compression scheme"):
        SpeculativeMoE(model, None, compression="fp4")
    assert getattr(model, "_specmoe_wrapper", None) is None
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
