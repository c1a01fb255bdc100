"""The host experts kernel's opt-in int8 activations (`activations="int8"`, `host_activations="int8"`): MXFP4 only,
every output within the bound the int8 rounding allows of the float64 expert and within float32 rounding of the
int8 path computed in float64, and the tiny gpt-oss MXFP4 checkpoint's tokens through host misses."""

import pytest
import torch
from test_host_kernels import (CHOSEN, ISAS, OAI, _experts, _prequant_experts, _prequant_reference, _tokens,
                               find_layers)

from specmoe.kernels.host import HostExpertsKernel
from specmoe.kernels.prequant import PrequantFormat

SILU_LIP = 1.0998  # sup |d/dz (z sigmoid(z))|: silu's, and (z/a) sigmoid(z)'s in z = a g (gpt-oss's gate)
DELTA = 0.5 + 2**-16  # an int8 activation is off by at most d / 2, plus the rounding of v / d (|v / d| <= 127)
U = 2.0**-24  # float32's unit roundoff


def _block_steps(v: torch.Tensor) -> torch.Tensor:
    """The int8 step d = max|v| / 127 of each column's block of 32 ([..., K] -> [..., K])."""
    d = v.abs().reshape(*v.shape[:-1], -1, 32).amax(-1) / 127
    return d.repeat_interleave(32, dim=-1)


def _int8_bound(x, ids, w, chosen, exact, inter, activation):
    """Per output element, how far the int8-activation kernel may be from the exact expert (float64), derived
    from the rounding: x and the activations rounded per 32 columns (each off by DELTA * d), that error carried
    through gate/up, the activation (Lipschitz: SILU_LIP, clamps 1) and down, plus float32 accumulation."""
    bound = torch.zeros(x.shape, dtype=torch.float64)
    for i, e in enumerate(chosen):
        gu, dn, bg, bd = exact[i]
        for t, j in (ids == e).nonzero().tolist():
            xt = x[t].double()
            ex = DELTA * _block_steps(xt) * (1 + 4 * U)  # |x^ - x| per column (d itself rounded in float32)
            h = gu @ xt + (0 if bg is None else bg)
            eh = gu.abs() @ ex + (xt.numel() / 32 + 16) * 2 * U * (gu.abs() @ (xt.abs() + ex)) + 2 * U * h.abs()
            wt = float(w[t, j])
            a, ea = _gated(h, eh, inter, activation)
            a, ea = a * wt, (ea + 16 * U * (a.abs() + ea)) * wt  # the activation's own float32 evaluation
            ehat = DELTA * _block_steps(a.abs() + ea) * (1 + 4 * U)  # the kernel's steps, from its own a^
            bound[t] += dn.abs() @ (ea + ehat) + (inter / 32 + 16) * 2 * U * (dn.abs() @ (a.abs() + ea + ehat))
            bound[t] += 2 * U * (dn @ a).abs() + (0 if bd is None else 2 * U * wt * bd.abs())
    return bound + 2 * U * bound  # the output's own accumulation over pairs


def _gated(h, eh, inter, activation):
    """The gated activation a of the gate/up values h [2 * inter] (float64) and how far it may be from the kernel's,
    given |h^ - h| <= eh: (a, ea)."""
    if activation == "swiglu_oai":
        g, u, eg, eu = h[0::2].clamp(max=OAI[1]), h[1::2].clamp(-OAI[1], OAI[1]), eh[0::2], eh[1::2]
        f = g * torch.sigmoid(g * OAI[0])
        return (u + 1) * f, SILU_LIP * eg * ((u + 1).abs() + eu) + f.abs() * eu
    g, u, eg, eu = h[:inter], h[inter:], eh[:inter], eh[inter:]
    f = torch.nn.functional.silu(g)
    return u * f, SILU_LIP * eg * (u.abs() + eu) + f.abs() * eu


def _q8(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's rounding of a float32 row v [K] (the same IEEE float32 operations): (q, d) per column, q
    integers in [-127, 127], d the column's block step; q * d is what the int8 path multiplies."""
    blocks = v.float().reshape(-1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.where(d > 0, torch.round(blocks / d.clamp_min(1e-45)), torch.zeros_like(blocks)).clamp(-127, 127)
    return q.reshape(-1).double(), d.expand_as(blocks).reshape(-1).double()


def _int8_emulated(x, ids, w, chosen, exact, inter, activation):
    """(out, bound): the int8 path computed in float64 (x rounded exactly as the kernel rounds it; the
    activations rounded from the float64 values), and per output element how far the kernel may be from it:
    float32 accumulation and evaluation, where its activations (within that of the float64 ones) change the
    block step, and the one step an activation within that of a rounding tie may go the other way."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    bound = torch.zeros(x.shape, dtype=torch.float64)
    for i, e in enumerate(chosen):
        gu, dn, bg, bd = exact[i]
        for t, j in (ids == e).nonzero().tolist():
            q, d = _q8(x[t])
            xq = q * d
            h = gu @ xq + (0 if bg is None else bg)
            eh = (x.shape[1] / 32 + 16) * 2 * U * (gu.abs() @ xq.abs()) + 2 * U * h.abs()
            wt = float(w[t, j])
            a, ea = _gated(h, eh, inter, activation)
            a, ea = a * wt, (ea + 16 * U * (a.abs() + ea)) * wt + U * a.abs()  # the kernel's a^: |a^ - a| <= ea
            d = _block_steps(a)
            q = torch.where(d > 0, torch.round(a / d.clamp_min(1e-300)), torch.zeros_like(a))
            dd = _block_steps(ea) + 2 * U * d  # |d^ - d|: a block's max moves at most as far as its values
            mu = (ea + a.abs() * dd / d.clamp_min(1e-300)) / (d - dd).clamp_min(1e-300) + 256 * U
            tie = ((a / d.clamp_min(1e-300)).frac().abs() - 0.5).abs() <= mu  # may round to the other side
            eq = q.abs() * dd + tie.double() * (d + dd)  # |q^ d^ - q d| per activation
            y = dn @ (q * d)
            out[t] += wt * (0 if bd is None else bd) + y
            bound[t] += dn.abs() @ eq + (inter / 32 + 16) * 2 * U * (dn.abs() @ (q * d).abs() + dn.abs() @ eq)
            bound[t] += 2 * U * (y.abs() + (0 if bd is None else wt * bd.abs()))
    return out, bound + 4 * U * (out.abs() + bound)  # the output's accumulation over pairs


Q8_CASES = [  # (H, I, T, activation, biases): K an odd number of blocks too (AVX-512's one-block tail)
    (64, 32, 1, "silu", False), (96, 160, 5, "swiglu_oai", True), (160, 96, 64, "swiglu_oai", True),
    (2880, 64, 2, "swiglu_oai", True),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", Q8_CASES, ids=lambda c: f"H{c[0]}-I{c[1]}-T{c[2]}-{c[3]}")
def test_mxfp4_int8_activations_within_their_rounding_bound(isa, threads, case):
    """activations="int8": every output within the bound the int8 rounding of x and of the activations allows
    of the float64 expert (`_int8_bound`, worst case), and within float32 rounding of the int8 path computed in
    float64 (`_int8_emulated`: the same roundings, so a far tighter bound); not the exact kernel's output."""
    hidden, inter, tokens, activation, biases = case
    fmt = PrequantFormat.parse("mxfp4")
    g = torch.Generator().manual_seed(tokens)
    chosen = CHOSEN
    mats, exact, keep = _prequant_experts(fmt, len(chosen), hidden, inter, biases, None, g)
    x, ids, w = _tokens(g, tokens, hidden)
    kernel = HostExpertsKernel(threads, isa=isa)
    params = OAI if activation == "swiglu_oai" else None
    out = kernel("mxfp4", activation, x, ids, w, chosen, mats, inter, 32, act_params=params, activations="int8")
    ref = _prequant_reference(x, ids, w, chosen, exact, inter, activation)
    bound = _int8_bound(x, ids, w, chosen, exact, inter, activation)
    assert ((out.double() - ref).abs() <= bound).all()  # the exact expert, within what the rounding allows
    emulated, tight = _int8_emulated(x, ids, w, chosen, exact, inter, activation)
    assert ((out.double() - emulated).abs() <= tight).all()  # the int8 path's own sums, to float32 rounding
    assert tight.median().item() < 0.01 * bound.median().item()  # far tighter (but where an activation sits near a tie)
    exact_out = kernel("mxfp4", activation, x, ids, w, chosen, mats, inter, 32, act_params=params)
    assert not torch.equal(exact_out, out)
    again = kernel("mxfp4", activation, x, ids, w, chosen, mats, inter, 32, act_params=params, activations="int8")
    assert torch.equal(again, out)


def test_int8_activations_are_mxfp4_only():
    kernel = HostExpertsKernel(1)
    kind, group, mats, _, keep = _experts("int4-g32", 1, 64, 32)
    x, ids, w = torch.randn(1, 64), torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1)
    with pytest.raises(ValueError, match="'int8' for"):
        kernel(kind, "silu", x, ids, w, [0], mats, 32, group, activations="int8")
    with pytest.raises(ValueError, match="activations"):
        kernel(kind, "silu", x, ids, w, [0], mats, 32, group, activations="int4")


def test_mxfp4_checkpoint_int8_activations_through_host_misses(tmp_path):
    """The tiny gpt-oss MXFP4 checkpoint with host_activations="int8": every host miss runs the int8 kernel, the
    greedy tokens are those of exact (float32) activations here, and the logits move (the int8 path ran), by
    less than a hundredth of their spread (measured: 0.006, 0.6 %, a few bf16 roundings of these logits)."""
    from prequant_ckpt import write_checkpoint

    from specmoe import load_offloaded

    path = write_checkpoint("mxfp4", tmp_path / "mxfp4")
    ids = torch.tensor([[3, 5, 7, 9, 11, 2], [4, 4, 8, 15, 16, 23]])
    runs = {}
    for acts in ("fp32", "int8"):
        smoe = load_offloaded(path, cache_capacity=0.25, device="cpu", misses="host", host_threads=2,
                              host_activations=acts)
        assert smoe.config.host_activations == acts
        host = smoe.hot.host
        names = {host.kernel_name(layer) for layer in find_layers(smoe)}
        assert names == {f"{host.kernel.name}-mxfp4" + ("-int8act" if acts == "int8" else "")}
        with torch.no_grad():
            runs[acts] = (smoe.generate(ids, max_new_tokens=6, do_sample=False), smoe(ids).logits)
        assert smoe.stats.total.host_computed > 0
    (tokens, logits), (tokens8, logits8) = runs["fp32"], runs["int8"]
    assert torch.equal(tokens8, tokens)
    moved = (logits8 - logits).abs().max().item()
    assert 0 < moved < 0.01 * (logits.max() - logits.min()).item()
