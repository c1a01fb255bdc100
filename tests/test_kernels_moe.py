"""The fused experts kernel against the PyTorch reference (on CUDA when there is one, else interpreted on CPU:
conftest sets TRITON_INTERPRET=1), and the reference against transformers' own experts. Odd shapes (H, I not multiples of any block), T in {1, 3, 8, 33},
k in {1, 2, 4}, three dtypes with a tolerance each."""

# Shape legend: T tokens, E experts, H hidden, I intermediate, k top-k, S slots

import logging

import pytest
import torch
from conftest import build_tiny

from specmoe.kernels import (MoEKernelConfig, align_pairs, experts_reference, fused_experts, kernel_activation,
                             moe_experts)
import specmoe.kernels.experts_kernel as experts_kernel_module
from specmoe.kernels.jit import triton_runs_on
from specmoe.runtime.adapters import find_moe_layers
from specmoe.runtime.cache import ExpertCache, SlotPool
from specmoe.runtime.store import ExpertLayout

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
needs_triton = pytest.mark.skipif(not triton_runs_on(DEVICE), reason=f"Triton cannot run on {DEVICE} here "
                                  "(no triton, or CPU without TRITON_INTERPRET=1 at import)")

TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.float16: dict(atol=4e-3, rtol=4e-3),
       torch.bfloat16: dict(atol=3e-2, rtol=2e-2)}


def make_problem(T, k, H, I, E=6, S=5, dtype=torch.float32, seed=0, absent=(), pool_pad=48):
    """Hidden, routing and a strided slot pool (extra bytes between slots, as in the real pool)."""
    g = torch.Generator().manual_seed(seed)
    per = 2 * I * H + H * I + pool_pad  # elements per slot, not a multiple of anything
    buf = (torch.randn(S, per, generator=g) / H**0.5).to(dtype)  # [S, per]
    gate_up = buf[:, : 2 * I * H].view(S, 2 * I, H)  # [S, 2I, H], stride(0) = per
    down = buf[:, 2 * I * H : 2 * I * H + H * I].view(S, H, I)  # [S, H, I]
    table = torch.randperm(E, generator=g) % S  # [E] expert -> slot (two experts may share a slot)
    table[list(absent)] = -1
    ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])  # [T, k] distinct per token
    weights = torch.rand(T, k, generator=g)  # [T, k]
    hidden = torch.randn(T, H, generator=g).to(dtype)  # [T, H]
    return tuple(t.to(DEVICE) for t in (hidden, ids, weights, gate_up, down, table))


CASES = [(1, 1, 72, 40), (3, 2, 72, 40), (8, 4, 40, 24), (33, 2, 40, 24), (33, 4, 72, 40)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T,k,H,I", CASES)
@needs_triton
def test_kernel_matches_reference(T, k, H, I, dtype):
    p = make_problem(T, k, H, I, dtype=dtype, seed=T * 10 + k)
    out = fused_experts(*p)  # default launch config: decode path for T <= 8, sorted blocks above
    ref = experts_reference(*p)
    assert out.shape == (T, H) and out.dtype == dtype
    assert ref.abs().max() > 0.1  # a real signal, not zeros compared with zeros
    torch.testing.assert_close(out, ref, **TOL[dtype])


BLOCKS = {"gemv": MoEKernelConfig(block_t=1, block_k=64, block_i=32, block_h=64),
          "dot16": MoEKernelConfig(block_t=16, block_k=32, block_i=16, block_h=32),
          "dot32": MoEKernelConfig(block_t=32, block_k=64, block_i=32, block_h=16)}


@pytest.mark.parametrize("block,activation", [("gemv", "silu"), ("dot16", "silu"), ("dot32", "silu"),
                                              ("gemv", "gelu"), ("dot16", "gelu_tanh")])
@needs_triton
def test_every_path_and_activation(block, activation):
    """Absent experts (table -1) and negative ids contribute nothing, in each kernel path."""
    hidden, ids, weights, gate_up, down, table = make_problem(5, 2, 72, 40, absent=(1,), seed=7)
    ids[0, 1] = -1
    out = fused_experts(hidden, ids, weights, gate_up, down, table, activation, BLOCKS[block])
    ref = experts_reference(hidden, ids, weights, gate_up, down, table, activation)
    torch.testing.assert_close(out, ref, **TOL[torch.float32])
    dropped = (table[ids.clamp(min=0)] < 0) | (ids < 0)  # [T, k]
    assert dropped.any() and not dropped.all()
    keep = weights * ~dropped
    kept = experts_reference(hidden, torch.where(dropped, 0, ids), keep, gate_up, down, table.clamp(min=0),
                             activation)
    torch.testing.assert_close(out, kept, **TOL[torch.float32])


def test_align_pairs_groups_by_expert():
    E, bt = 7, 4
    ids = torch.tensor([[3, 0], [3, 6], [-1, 3], [0, 5], [3, 3]])  # [T, k]; -1: no expert
    flat = ids.reshape(-1)
    P = flat.numel()
    pairs, block_expert = align_pairs(flat, E, bt)
    assert block_expert.numel() == -(-P // bt) + min(E, P)
    assert pairs.numel() == block_expert.numel() * bt
    seen = []
    for b, e in enumerate(block_expert.tolist()):
        members = [p for p in pairs[b * bt : (b + 1) * bt].tolist() if p < P]
        if e < 0:
            assert not members
        else:
            assert members and all(flat[p] == e for p in members)
            seen += members
    assert sorted(seen) == [p for p in range(P) if flat[p] >= 0]  # each routed pair once, -1 nowhere


def test_reference_is_what_transformers_experts_compute():
    """experts_reference on the module's own tensors (table = identity) equals the module's forward."""
    model = build_tiny("qwen3_moe")
    experts = find_moe_layers(model).layers[0].experts
    g = torch.Generator().manual_seed(0)
    T, H, E = 9, 64, experts.gate_up_proj.shape[0]
    hidden = torch.randn(T, H, generator=g)
    ids = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(T)])
    weights = torch.rand(T, 2, generator=g)
    with torch.no_grad():
        want = experts(hidden, ids, weights)
    got = experts_reference(hidden, ids, weights, experts.gate_up_proj.detach(), experts.down_proj.detach(),
                            torch.arange(E), "silu")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@needs_triton
def test_kernel_on_a_real_slot_pool():
    """The entry point the runtime calls: SlotPool views and an ExpertCache table row, experts in some slots."""
    model = build_tiny("mixtral")
    moe = find_moe_layers(model)
    layer = moe.layers[1]
    layout = ExpertLayout(moe.specs)
    pool = SlotPool(layout, 5, DEVICE)
    cache = ExpertCache(5, moe.geometry.num_layers, moe.geometry.num_experts, DEVICE)
    for e in (6, 2, 5, 0, 3):  # slots 0..4, in that order
        slot, _ = cache.assign((1, e), lambda s: True)
        layout.pack(pool.data[slot], layer.layout.expert_tensors(layer.experts, e))
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, 64, generator=g)
    ids = torch.tensor([[6, 2], [5, 0], [3, 6], [0, 5]])
    weights = torch.rand(4, 2, generator=g)
    with torch.no_grad():
        want = layer.experts(hidden, ids, weights)
    hidden, ids, weights = hidden.to(DEVICE), ids.to(DEVICE), weights.to(DEVICE)
    got = moe_experts(hidden, ids, weights, pool.views["gate_up_proj"], pool.views["down_proj"], cache.table[1],
                      "silu")
    torch.testing.assert_close(got.cpu(), want, atol=2e-5, rtol=1e-5)


def test_without_triton_falls_back_to_reference(monkeypatch, caplog):
    monkeypatch.setattr(experts_kernel_module, "triton_runs_on", lambda device: False)
    monkeypatch.setattr(experts_kernel_module, "_WARNED", set())
    p = make_problem(3, 2, 40, 24)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        fused_experts(*p)
    with caplog.at_level(logging.INFO, logger="specmoe.kernels.experts_kernel"):
        out = moe_experts(*p)
    torch.testing.assert_close(out, experts_reference(*p))
    assert "PyTorch reference" in caplog.text


def test_bad_inputs_are_named():
    hidden, ids, weights, gate_up, down, table = make_problem(3, 2, 40, 24)
    with pytest.raises(ValueError, match="hidden size"):
        fused_experts(hidden[:, :32], ids, weights, gate_up, down, table)
    with pytest.raises(ValueError, match="share one of"):
        fused_experts(hidden, ids, weights, gate_up, down.double(), table)
    with pytest.raises(ValueError, match="contiguous along their last dim"):
        fused_experts(hidden, ids, weights, gate_up.transpose(1, 2).contiguous().transpose(1, 2), down, table)
    with pytest.raises(ValueError, match="activation"):
        fused_experts(hidden, ids, weights, gate_up, down, table, "relu")
    with pytest.raises(ValueError, match="integer"):
        fused_experts(hidden, ids.float(), weights, gate_up, down, table)
    with pytest.raises(ValueError, match="weights"):
        fused_experts(hidden, ids, weights[:, :1], gate_up, down, table)


@pytest.mark.parametrize("family,expected", [("mixtral", "silu"), ("deepseek_v3", "silu"), ("olmoe", "silu"),
                                             ("gpt_oss", None)])
def test_kernel_support_by_family(family, expected):
    experts = find_moe_layers(build_tiny(family)).layers[0].experts
    activation, reason = kernel_activation(experts)
    assert activation == expected
    assert (reason == "") == (expected is not None)


def test_gelu_variants_are_recognised():
    experts = find_moe_layers(build_tiny("mixtral")).layers[0].experts
    for act, want in ((torch.nn.GELU(), "gelu"), (torch.nn.GELU(approximate="tanh"), "gelu_tanh"),
                      (torch.nn.ReLU(), None)):
        experts.act_fn = act
        assert kernel_activation(experts)[0] == want
