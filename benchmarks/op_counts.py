"""Op counts per model family: the host-side calibration data the simulator reads.

Decoding one token at batch 1 in PyTorch eager is often bound by the host dispatching ops, so the simulator
charges (aten ops) x (seconds per op). This script counts those ops: for each family it builds a tiny random
model, runs `generate` for 2 and 3 new tokens under a counting TorchDispatchMode (the difference is one decode
step with generate's loop), unwrapped, wrapped by SpeculativeMoE (capacity 1.0, compute="pool"), and wrapped
with a one-layer-ahead pre-gate, and splits the ops by region (decoder layer, experts call, the rest). About a
second per family on a CPU.

    python benchmarks/op_counts.py                       # every family below -> specmoe/sim/calibration/op_counts.json
    python benchmarks/op_counts.py --families olmoe      # count (or recount) one family, keep the others

The file records torch and transformers versions: counts move a little between versions; rerun after an upgrade.
"""

# Shape legend: L MoE layers, E experts, k top-k

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from specmoe.io import read_json, write_json
from specmoe.measure import environment
from specmoe.predictors import make_predictor
from specmoe.runtime.adapters import find_moe_layers
from specmoe.runtime.wrapper import SpeculativeMoE
from specmoe.sim.compute import OP_COUNTS_FILE, OpCounts, count_predictor_ops, op_counter

# the simulator's shape presets' families, and the other decoder-only families the runtime supports
FAMILIES = ("qwen2_moe", "mixtral", "olmoe", "qwen3_moe", "deepseek_v2", "gpt_oss", "granitemoe", "phimoe", "deepseek_v3",
            "glm4_moe", "qwen3_next", "llama4_text")

_TINY = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=48, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=256,
             shared_expert_intermediate_size=64, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=16,
             qk_rope_head_dim=8, v_head_dim=16, sliding_window=32, layer_types=None,
             full_attention_interval=2, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
             linear_value_head_dim=16)  # qwen3_next: one linear-attention and one full-attention layer


def tiny_model(model_type: str, num_layers: int = 2, num_experts: int = 8, top_k: int = 2) -> torch.nn.Module:
    values = dict(_TINY, num_hidden_layers=num_layers, num_experts_per_tok=top_k, num_experts=num_experts,
                  num_local_experts=num_experts, n_routed_experts=num_experts, n_shared_experts=1,
                  first_k_dense_replace=0, decoder_sparse_step=1, mlp_only_layers=[], n_group=1, topk_group=1)
    if model_type.startswith("deepseek"):
        values["num_key_value_heads"] = values["num_attention_heads"]  # MLA has no grouped KV heads
        values["head_dim"] = values["qk_rope_head_dim"]  # V3's config: head_dim is the rotary part
    config = AutoConfig.for_model(model_type, **values)
    config.pad_token_id = 0
    config.eos_token_id = None
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def count_ops(model_type: str) -> OpCounts:
    """The aten ops one decode step dispatches, per region, on a tiny random model of `model_type`."""
    model = tiny_model(model_type)
    moe = find_moe_layers(model)
    layers = [m for m in model.modules() if type(m).__name__.endswith("DecoderLayer")]
    ids = torch.randint(2, 128, (1, 6), generator=torch.Generator().manual_seed(0))

    def step_counts(generate) -> dict:
        out = {}
        with torch.no_grad():  # warm-up: lazy initialisation is not part of a step
            generate(input_ids=ids, max_new_tokens=2, min_new_tokens=2, do_sample=False)
        for n in (2, 3):
            counter = op_counter(("pass", "layer", "experts"))
            handles = []
            for layer in layers:
                handles.append(layer.register_forward_pre_hook(lambda *a: setattr(counter, "region", "layer")))
                handles.append(layer.register_forward_hook(lambda *a: setattr(counter, "region", "pass")))
            for m in moe.layers:
                handles.append(m.experts.register_forward_pre_hook(lambda *a: setattr(counter, "region", "experts")))
                handles.append(m.experts.register_forward_hook(lambda *a: setattr(counter, "region", "layer")))
            try:
                with torch.no_grad(), counter:
                    generate(input_ids=ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
            finally:
                for h in handles:
                    h.remove()
            out[n] = counter.n
        return {k: out[3][k] - out[2][k] for k in out[3]}

    plain = step_counts(model.generate)
    smoe = SpeculativeMoE(model, None, cache_capacity=1.0, compute="pool", device="cpu")  # same ops as `plain`
    wrapped = step_counts(smoe.generate)
    smoe.unwrap()
    smoe = SpeculativeMoE(model, make_predictor("pregate"), cache_capacity=1.0, compute="pool", device="cpu")
    predicted = step_counts(smoe.generate)
    smoe.unwrap()
    L = moe.geometry.num_layers
    pregate = count_predictor_ops(make_predictor("pregate"), moe.geometry, [layer.router for layer in moe.layers])
    total = lambda c: sum(c.values())  # noqa: E731
    env = environment("cpu")
    return OpCounts(
        layer=plain["layer"] / len(layers),
        experts=plain["experts"] / L,
        per_pass=plain["pass"],
        wrapper=max(0.0, (total(wrapped) - total(plain)) / L),
        predictor=max(0.0, (total(predicted) - total(wrapped)) / L),
        pregate_predict=pregate,
        source=f"counted on a tiny random {model_type} (transformers {env['transformers']}, torch "
               f"{env['torch']}), one decode step of generate (benchmarks/op_counts.py)",
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), help="model types to count")
    ap.add_argument("--out", type=Path, default=OP_COUNTS_FILE, help="the calibration file (merged into)")
    args = ap.parse_args(argv)
    old = read_json(args.out, what="op-count calibration") if args.out.exists() else {}
    families = dict(old.get("families", {}))
    for model_type in args.families:
        families[model_type] = count_ops(model_type).to_dict()
        print(f"{model_type}: {families[model_type]}")
    write_json(args.out, {
        "what": "aten ops the host dispatches per decode step, by region, per model family (see OpCounts)",
        "command": "python benchmarks/op_counts.py" + (f" --families {' '.join(args.families)}"
                                                       if list(args.families) != list(FAMILIES) else ""),
        "environment": environment("cpu"),
        "families": dict(sorted(families.items())),
    })
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
