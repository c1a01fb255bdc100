"""Compile the Triton kernels for a CUDA architecture without a GPU, to catch what the interpreter lets pass.

    TRITON_INTERPRET=0 python -m specmoe.kernels.compile_check --arch 90 80 [--dtypes bfloat16]

Triton's interpreter runs kernel bodies as NumPy and accepts code the compiler rejects (and the reverse);
this compiles every kernel variant the library launches (dtypes x paths x activations) to PTX and cubin with
triton's bundled ptxas. It needs triton's NVIDIA backend, not a GPU, and must run in a process where triton
was imported without TRITON_INTERPRET=1. Prints one line per variant; exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import sys

_DT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def variants(dtypes=tuple(_DT)):
    """(name, kernel, signature, constexprs, options) for every variant the library launches."""
    from .experts_kernel import FORMATS, _fused_experts_kernel
    from .quant import _dequant_kernel

    strides = [f"stride_{p}{m}{d}" for m in "12" for p, dims in (("w", "snk"), ("s", "snk"), ("z", "snk"), ("g", "s"))
               for d in dims]
    ints = ["H", "I", "P", "TOP_K", "stride_xt", "stride_ot", *strides, "stride_b1s", "stride_b2s"]
    # the slots' formats (experts_kernel.FORMATS): weight, scale, zero, g_idx pointer types
    parts = {0: None, 1: ("*i8", "*fp32", "*i8", "*i8"), 2: ("*u8", "*fp16", "*fp16", "*u8"),
             3: ("*u8", "*u8", "*u8", "*u8"), 4: ("*u8", "*fp32", "*u8", "*u8"), 5: ("*i32", "*fp16", "*i32", "*i32"),
             6: ("*i32", "*fp16", "*i32", "*i32")}
    for dtype in dtypes:
        dt = _DT[dtype]
        # plain slots, then compressed slots (int8 per channel, int4 groups of 128), then the publishers' formats
        # (MXFP4, FP8-b128, GPTQ and AWQ int4-g128), on the decode and dot paths; last gpt-oss's experts (act 3:
        # interleaved gate/up, biases, clamped SwiGLU) from MXFP4 as published, and from FP8 / GPTQ slots
        for fmt, block_t, act in ((0, 1, 0), (0, 16, 0), (0, 64, 1), (0, 16, 2), (1, 1, 0), (1, 16, 0),
                                  (2, 1, 0), (2, 64, 0), (3, 1, 0), (3, 16, 0), (4, 1, 0), (4, 16, 0),
                                  (5, 1, 0), (5, 16, 0), (6, 1, 0), (6, 16, 0),
                                  (3, 1, 3), (3, 16, 3), (4, 1, 3), (5, 16, 3)):
            w, s, z, g = parts[fmt] or (f"*{dt}",) * 4
            sig = {"x_ptr": f"*{dt}", "out_ptr": "*fp32", "w1_ptr": w, "w2_ptr": w, "s1_ptr": s, "z1_ptr": z,
                   "g1_ptr": g, "s2_ptr": s, "z2_ptr": z, "g2_ptr": g, "b1_ptr": f"*{dt}", "b2_ptr": f"*{dt}",
                   "table_ptr": "*i64", "pairs_ptr": "*i32", "block_expert_ptr": "*i32", "rw_ptr": "*fp32",
                   **{n: "i32" for n in ints}, "alpha": "fp32", "limit": "fp32"}
            const = {"ACT": act, "HAS_BIAS": act == 3, "FMT": fmt, "GROUP": 128, "DOT_F32": dtype == "float32",
                     "BLOCK_T": block_t, "BLOCK_K": 64, "BLOCK_I": 64, "BLOCK_H": 64}
            yield (f"fused_experts {dtype} fmt={FORMATS[fmt]} block_t={block_t} act={act}", _fused_experts_kernel,
                   sig, const, {"num_warps": 4, "num_stages": 3})
        for bits, q, s in ((8, "*i8", "*fp32"), (4, "*u8", "*fp16")):
            sig = {"q_ptr": q, "scale_ptr": s, "zero_ptr": s, "out_ptr": f"*{dt}",
                   **{n: "i32" for n in ("N", "K", "stride_qn", "stride_sn", "stride_on")}}
            const = {"GROUP": 64, "BITS": bits, "BLOCK_N": 32, "BLOCK_K": 128}
            yield f"dequant int{bits} -> {dtype}", _dequant_kernel, sig, const, {"num_warps": 4}


def compile_all(archs: list[int], dtypes=tuple(_DT)) -> list[tuple[str, str | None]]:
    """Compile every variant for every arch. Returns [(name, None or the error)]."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    results = []
    for arch in archs:
        for name, kernel, sig, const, options in variants(dtypes):
            if not isinstance(kernel, JITFunction):
                raise RuntimeError("the kernels were built for triton's interpreter; run with TRITON_INTERPRET=0")
            sig = {**sig, **{k: "constexpr" for k in const}}
            try:
                triton.compile(ASTSource(kernel, sig, const), target=GPUTarget("cuda", arch, 32), options=options)
                results.append((f"sm_{arch} {name}", None))
            except Exception as err:  # report every failure, not just the first
                results.append((f"sm_{arch} {name}", f"{type(err).__name__}: {str(err)[:2000]}"))
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", type=int, default=[90, 80], help="compute capabilities, e.g. 90 80")
    p.add_argument("--dtypes", nargs="+", default=list(_DT), choices=list(_DT))
    args = p.parse_args(argv)
    failed = 0
    for name, error in compile_all(args.arch, args.dtypes):
        print(f"{'FAIL' if error else 'ok  '} {name}" + (f"\n     {error}" if error else ""))
        failed += error is not None
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
