"""Predictor cost: each predictor's time per MoE layer at decode, against one wrapped MoE layer's time.

On one machine, in one run:

* layer: the median wall time of one MoE block (router + experts through SpeculativeMoE at cache capacity
  1.0, shared expert included) during greedy decoding (one token per step);
* predictor: the median wall time of one single-token `predict` call, over every MoE layer, on hidden
  states and routing captured from the same decoding;
* end to end: decode tokens/s of the wrapped model with each predictor vs with none (capacity 1.0, so no
  copies: what remains is the predictor plus the runtime's ranking of its scores).

Goal: predictor / layer <= 5%. Trained predictors cost the same untrained, so by default untrained ones of
the default sizes run; pass --predictor DIR for saved ones.

    python benchmarks/predictor_cost.py                         # the reference model, CPU
    python benchmarks/predictor_cost.py --model qwen15-random   # before the reference model exists
    python benchmarks/predictor_cost.py --model PATH --device cuda --predictor predictors/interlayer
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from specmoe import SpeculativeMoE
from specmoe.measure import environment, sync_device, time_generate
from specmoe.io import read_json, write_json, write_text
from specmoe.predictors import (
    AffinityPredictor, HiddenStatePredictor, HistoryPredictor, InterLayerPredictor, make_predictor,
)
from specmoe.runtime.adapters import find_moe_layers
from specmoe.traces import RoutingTrace, capture_routing
from specmoe.traces.cli import load_model_and_tokenizer
from specmoe.training.evaluate import decode_latency_us, describe

RESULTS = Path(__file__).parent / "results"


def moe_blocks(model, moe):
    """The module around each MoE layer's experts (router, experts, shared expert): what one MoE layer costs."""
    parent = {id(child): module for module in model.modules() for child in module.children()}
    return [parent[id(layer.experts)] for layer in moe.layers]


def time_moe_layers(smoe, blocks, inputs, new_tokens: int, device) -> list[float]:
    """Wall times (s) of every MoE block call during decode steps (calls on a single token)."""
    times, starts = [], {}

    def pre(module, args):
        sync_device(device)
        starts[id(module)] = time.perf_counter()

    def post(module, args, output):
        sync_device(device)
        if args and args[0].shape[-2] == 1:  # [B, 1, H]: a decode step
            times.append(time.perf_counter() - starts[id(module)])

    handles = [h for b in blocks for h in (b.register_forward_pre_hook(pre), b.register_forward_hook(post))]
    try:
        with torch.no_grad():
            smoe.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    finally:
        for h in handles:
            h.remove()
    return times


def captured_trace(model, moe, inputs, new_tokens: int) -> RoutingTrace:
    """Routing and hidden states of every MoE layer over prefill + decode, as one sequence."""
    geo = moe.geometry
    with torch.no_grad(), capture_routing(model, hidden_layers=range(geo.num_layers), moe=moe) as cap:
        model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    routing = cap.routing()
    return RoutingTrace(geo, routing.ids, routing.weights, routing.seq_offsets, routing.hidden,
                        routers=[layer.router for layer in moe.layers])


def markdown(result: dict) -> str:
    """The table of a predictor_cost JSON."""
    env, st = result["environment"], result["settings"]
    lines = ["| predictor | params | µs per MoE layer (decode) | share of one MoE layer | decode tok/s vs none |",
             "|---|---|---|---|---|"]
    for name, row in result["predictors"].items():
        lines.append(f"| {name} | {row['parameters']} | {row['predict_us']:.1f} | {100 * row['ratio_to_layer']:.1f}% | "
                     f"{row['decode_ratio_to_none']:.2f}x |")
    lines += ["", f"One wrapped MoE layer (router + experts + shared expert, capacity 1.0) took "
              f"{result['moe_layer_us']:.1f} µs per decode step (median of {result['moe_layer_calls_timed']} calls); "
              f"goal: a predictor costs at most {100 * result['goal_ratio']:.0f}% of it. Model {result['model']}, "
              f"{st['dtype']}, prompt {st['prompt_len']} + {st['new_tokens']} new tokens, medians of {st['repeats']} "
              f"interleaved repeats; {env['device_name']}, torch {env['torch']}, git {env['git_sha']}."]
    return "\n".join(lines) + "\n"


def load_model(spec: str, device):
    """'qwen15-random': Qwen1.5-MoE-A2.7B's routing geometry with random weights (costs only: routing of random
    weights is not what trained models do); otherwise as `specmoe collect --model`."""
    if spec != "qwen15-random":
        return load_model_and_tokenizer(spec, device)[::2]
    from wrapper_overhead import qwen15_geometry_model

    return qwen15_geometry_model(64, torch.float32).to(device), "qwen2_moe L=24 E=60 k=4 H=64 (random weights)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="reference",
                    help="'reference' (default), 'qwen15-random' or a save_pretrained directory")
    ap.add_argument("--predictor", dest="predictors", type=Path, action="append", default=[],
                    help="saved predictor directories (default: untrained ones of the default sizes)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1, as a decode step would use)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: results/predictor_cost_<device>.json)")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, name = load_model(args.model, device)
    model.generation_config.eos_token_id = None
    moe = find_moe_layers(model)
    geo = moe.geometry
    g = torch.Generator().manual_seed(0)
    inputs = {"input_ids": torch.randint(3, model.config.vocab_size, (1, args.prompt_len), generator=g).to(device)}
    trace = captured_trace(model, moe, inputs, args.new_tokens)

    predictors = {"pregate": make_predictor("pregate", lookahead=2, wrap=True),  # as specmoe eval scores it
                  "history": HistoryPredictor.fit(trace, lookahead=2, progress=False),
                  "random": make_predictor("random", lookahead=2)}
    if args.predictors:
        predictors.update({p.name: make_predictor(p, geometry=geo) for p in args.predictors})
    else:
        torch.manual_seed(0)
        predictors["interlayer"] = InterLayerPredictor(geo)
        predictors["hidden"] = HiddenStatePredictor(geo).init_from_routers(trace.routers)
        predictors["affinity"] = AffinityPredictor(geo, lookahead=2)
        predictors["affinity-new"] = AffinityPredictor(geo, lookahead=2, new=1)  # its scores masked: a few ops more
    for p in predictors.values():
        p.bind(geo, trace.routers)

    smoe = SpeculativeMoE(model, None, cache_capacity=1.0, device=device)
    blocks = moe_blocks(model, moe)
    layer_s = []
    for _ in range(args.repeats):
        layer_s += time_moe_layers(smoe, blocks, inputs, args.new_tokens, device)
    layer_us = statistics.median(layer_s) * 1e6

    predict_us = {n: [] for n in predictors}
    decode = {n: [] for n in ["none", *predictors]}
    for r in range(args.repeats):  # interleaved, so that drift on a shared machine hits every row alike
        for pname in decode:
            pred = predictors.get(pname)
            if pred is not None:
                predict_us[pname].append(decode_latency_us(pred, trace, calls=4 * geo.num_layers, device=device))
            smoe.set_predictor(pred)
            timing = time_generate(smoe.generate, inputs, args.new_tokens, repeats=1, warmup=1 if r == 0 else 0,
                                   device=device)
            decode[pname].append(timing.decode_tok_s)
    smoe.set_predictor(None)
    base = statistics.median(decode["none"])
    rows = {}
    for pname, pred in predictors.items():
        pred_us = statistics.median(predict_us[pname])
        tok_s = statistics.median(decode[pname])
        rows[pname] = {**describe(pred), "predict_us": pred_us, "ratio_to_layer": pred_us / layer_us,
                       "predict_us_runs": predict_us[pname], "decode_tok_s": tok_s,
                       "decode_ratio_to_none": tok_s / base, "decode_tok_s_runs": decode[pname]}
        print(f"{pname:>12}: {pred_us:8.1f} µs/layer = {100 * pred_us / layer_us:6.1f}% of a MoE layer; "
              f"decode {tok_s:.1f} tok/s ({tok_s / base:.2f}x of none)")
    smoe.unwrap()
    result = {
        "benchmark": "predictor_cost",
        "model": name,
        "geometry": geo.to_dict(),
        "settings": {"prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
                     "capacity": 1.0, "dtype": str(next(model.parameters()).dtype)},
        "environment": environment(device),
        "moe_layer_us": layer_us,
        "moe_layer_calls_timed": len(layer_s),
        "decode_tok_s_no_predictor": base,
        "decode_tok_s_no_predictor_runs": decode["none"],
        "predictors": rows,
        "goal_ratio": 0.05,
    }
    out = args.out or RESULTS / f"predictor_cost_{device.type}.json"
    write_json(out, result)
    write_text(out.with_suffix(".md"), markdown(read_json(out)))
    print(json.dumps({"moe_layer_us": layer_us, **{k: round(v["ratio_to_layer"], 4) for k, v in rows.items()}}))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
