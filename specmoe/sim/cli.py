"""`specmoe simulate`: replay a routing stream on hardware profiles with real model shapes, or check the
simulator against a GPU measurement (`--validate`)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..bench.environment import environment
from ..io import write_json, write_text
from .hardware import PROFILES, HardwareProfile
from .policies import POLICY_NAMES, resolve_policy_name
from .shapes import PRESETS, ModelShape
from .stream import load_stream
from .sweep import SweepSettings, run_sweep


def add_simulate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", type=Path, help="a routing stream (.safetensors from specmoe bench / capture) or a "
                   "trace directory from `specmoe collect` (its windows replayed as decode)")
    p.add_argument("--shapes", nargs="+", default=["qwen1.5-moe-a2.7b"], choices=sorted(PRESETS), metavar="SHAPE",
                   help=f"model shapes: {', '.join(sorted(PRESETS))}")
    p.add_argument("--profiles", nargs="+", default=["rtx3090"], choices=sorted(PROFILES), metavar="PROFILE",
                   help=f"hardware profiles: {', '.join(sorted(PROFILES))}")
    p.add_argument("--compression", nargs="+", default=["none"], metavar="SCHEME",
                   help="host storage of experts to simulate: none, int8, int4-g128, ... (each shape once per scheme)")
    p.add_argument("--capacities", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--policies", nargs="+", default=["lru", "lfu", "default", "belady"], choices=POLICY_NAMES,
                   metavar="POLICY", help=f"eviction policies without a predictor: {', '.join(POLICY_NAMES)} "
                   "(default: the runtime's default)")
    p.add_argument("--prefetch-policies", nargs="+", default=["lru", "default"], metavar="POLICY",
                   choices=[name for name in POLICY_NAMES if name != "belady"],
                   help="eviction policies run with each predictor")
    p.add_argument("--predictors", nargs="+", default=["oracle"],
                   help="oracle, pregate, or directories of saved predictors (pregate and saved predictors need "
                        "--model for routers and hidden states in the trace)")
    p.add_argument("--model", help="model whose routers the pre-gate uses (default: the reference model)")
    p.add_argument("--lookahead", type=int, default=1, help="lookahead of the oracle and the pre-gate")
    p.add_argument("--compute", default="hf-eager", choices=["hf-eager", "roofline"])
    p.add_argument("--context", type=int, default=512, help="KV tokens read per decode step")
    p.add_argument("--warmup", type=int, default=64, help="passes replayed before measuring")
    p.add_argument("--max-passes", type=int, default=None, help="replay only the first N passes")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default: specmoe-sim/, or the measured JSON's directory with --validate)")
    p.add_argument("--name", default="simulate")
    p.add_argument("--validate", type=Path, metavar="RESULT_JSON",
                   help="compare the simulator with a measured run (benchmarks/shape_real.py output) instead")
    p.add_argument("--validate-profile", choices=sorted(PROFILES),
                   help="profile for --validate (default: matched from the measured device's name)")


def _routers(model_path: str | None):
    from ..runtime.adapters import find_moe_layers

    if model_path:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_path, local_files_only=True)
    else:
        try:
            from ..reference.model import load_reference_model
        except ImportError:
            raise SystemExit("the pre-gate needs a model's routers: pass --model PATH") from None
        model = load_reference_model(device="cpu")
    moe = find_moe_layers(model)
    return moe.geometry, [layer.router for layer in moe.layers]


def _replays(stream, names, lookahead, model_path, num_experts):
    """The named predictors replayed on `stream`."""
    from ..predictors import PreGatePredictor, load_predictor
    from .predictions import replay_oracle, replay_predictor

    out = []
    geometry = routers = None
    for name in names:
        if name == "none":
            continue
        if name == "oracle":
            out.append(replay_oracle(stream, num_experts, lookahead))
            continue
        if geometry is None:
            geometry, routers = _routers(model_path)
        if name == "pregate":
            out.append(replay_predictor(stream, PreGatePredictor(lookahead=lookahead), geometry, routers, "pregate"))
        else:
            out.append(replay_predictor(stream, load_predictor(name, geometry=geometry), geometry, routers,
                                        Path(name).name))
    return out


def run_simulate(args: argparse.Namespace) -> int:
    if args.out is None:
        args.out = args.validate.parent if args.validate else Path("specmoe-sim")
    if args.validate:
        from .validate import validate_measurement, validation_table

        profile = HardwareProfile.from_name(args.validate_profile) if args.validate_profile else None
        report = validate_measurement(args.validate, profile=profile)
        json_path = args.out / f"{args.validate.stem}.validation.json"
        md_path = json_path.with_suffix(".md")
        write_json(json_path, {"environment": environment("cpu"), **report})
        text = validation_table(report)
        write_text(md_path, f"# Simulator validation\n\n{text}\n")
        print(text)
        print(f"\nwrote {json_path}, {md_path}")
        return 0
    shapes = [ModelShape.from_name(s).compressed(c) for s in args.shapes for c in args.compression]
    profiles = [HardwareProfile.from_name(p) for p in args.profiles]
    settings = SweepSettings(capacities=tuple(args.capacities),
                             policies=tuple(dict.fromkeys(map(resolve_policy_name, args.policies))),
                             prefetch_policies=tuple(dict.fromkeys(map(resolve_policy_name, args.prefetch_policies))),
                             context=args.context, warmup_passes=args.warmup, compute=args.compute)
    stream, predictors, described = None, [], "none (memory and ceilings only)"
    if args.trace:
        stream = load_stream(args.trace)
        if args.max_passes:
            stream = stream.select_passes(0, min(args.max_passes, stream.num_passes))
        matching = [s for s in shapes if stream.matches(s.moe_layers, s.top_k, s.num_experts)]
        if not matching:
            raise SystemExit(f"the trace has L={stream.num_layers} k={stream.top_k} E={stream.num_experts or '?'}; "
                             f"none of {args.shapes} has that routing geometry (without --trace their memory rows "
                             "are still computed)")
        num_experts = matching[0].num_experts
        predictors = _replays(stream, args.predictors, args.lookahead, args.model, num_experts)
        described = f"{args.trace} ({stream.num_passes} passes, {stream.num_tokens} tokens)"
    sweep = run_sweep(stream, shapes, profiles, settings, predictors)
    sweep.update(environment=environment("cpu"), stream={"description": described})
    json_path = args.out / f"{args.name}.json"
    write_json(json_path, sweep)
    from .report import sweep_markdown, write_sweep_report

    md, png = write_sweep_report(json_path)
    print(sweep_markdown(sweep))
    print("wrote " + ", ".join(str(p) for p in (json_path, md, png) if p is not None))
    return 0
