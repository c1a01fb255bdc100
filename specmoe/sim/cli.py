"""`specmoe simulate`: replay a routing stream on hardware profiles with real model shapes, or check the
simulator against a GPU measurement (`--validate`)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from ..measure import environment
from ..io import check_outputs, check_stem, write_json, write_text
from ..runtime.capacity import capacity_arg
from .hardware import PROFILES, HardwareProfile
from .host import HOST_PROFILES
from .policies import POLICY_NAMES, is_known_policy, resolve_policy_name
from .shapes import PRESETS, ModelShape, matching_presets
from .stream import load_stream
from .sweep import SweepSettings, run_sweep


def add_simulate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trace", type=Path, help="a routing stream (.safetensors from specmoe bench / capture) or a "
                   "trace directory from `specmoe collect` (its windows replayed as decode)")
    p.add_argument("--shapes", nargs="+", default=None, choices=sorted(PRESETS), metavar="SHAPE",
                   help=f"model shapes: {', '.join(sorted(PRESETS))} (default: those of the trace's routing "
                        f"geometry, else {DEFAULT_SHAPE})")
    p.add_argument("--shape-config", nargs="+", type=Path, default=[], metavar="CONFIG_JSON",
                   help="model shapes from transformers config.json files (or model directories holding one): any "
                        "MoE model transformers builds, its quantization_config read (MXFP4, FP8, GPTQ int4)")
    p.add_argument("--profiles", nargs="+", default=["rtx3090"], choices=sorted(PROFILES), metavar="PROFILE",
                   help=f"hardware profiles: {', '.join(sorted(PROFILES))}")
    p.add_argument("--compression", nargs="+", default=["none"], metavar="SCHEME",
                   help="host storage of experts to simulate: none, int8, int4-g128, ... (each shape once per scheme)")
    p.add_argument("--capacities", type=capacity_arg, nargs="+", default=[0.25, 0.5, 0.75],
                   help="cache capacities, fractions of all experts in (0, 1] (default 0.25 0.5 0.75; one fraction "
                        "fits every shape, a slot count or budget would not)")
    p.add_argument("--misses", nargs="+", default=["fetch"], choices=["fetch", "host", "auto"],
                   help="where missed experts run: copied to the device (fetch), computed on the host (host), or "
                        "per miss by the cost model (auto); host/auto need --host")
    p.add_argument("--host", default=None, metavar="PROFILE",
                   help=f"host profile for misses run on the host: {', '.join(sorted(HOST_PROFILES))} or "
                        "this-machine (measured here, a few seconds)")
    p.add_argument("--host-threads", type=int, default=None,
                   help="host threads this-machine is measured on (default: the runtime's, physical cores - 1, at "
                        "most 8)")
    p.add_argument("--placement", action="store_true",
                   help="also run a static placement (the trace's hottest experts resident, misses on the host, "
                        "never copied: llama.cpp's --n-cpu-moe baseline); needs --host")
    p.add_argument("--policies", nargs="+", default=["lru", "lfu", "default", "belady"], type=_policy,
                   metavar="POLICY", help=f"eviction policies without a predictor: {', '.join(POLICY_NAMES)} or "
                   "learned policy directories (specmoe train --policy learned) "
                   "('default' is the runtime's policy; default: lru lfu default belady)")
    p.add_argument("--prefetch-policies", nargs="+", default=["lru", "default"], metavar="POLICY", type=_policy,
                   help="eviction policies run with each predictor (default: lru default)")
    p.add_argument("--predictors", nargs="+", default=["oracle"],
                   help="oracle, pregate, or directories of saved predictors (pregate and hidden-state predictors "
                        "need --model for routers and hidden states in the trace; history and interlayer do not)")
    p.add_argument("--model", help="model whose routers the pre-gate uses: a directory or hub id (default: the reference model)")
    p.add_argument("--lookahead", type=int, default=1, help="lookahead of the oracle and the pre-gate")
    p.add_argument("--compute", default="hf-eager", choices=["hf-eager", "roofline", "compiled"],
                   help="compute-time model: hf-eager (transformers' eager kernels, default) or roofline")
    p.add_argument("--context", type=int, default=512, help="KV tokens read per decode step")
    p.add_argument("--warmup", type=int, default=64, help="passes replayed before measuring")
    p.add_argument("--max-passes", type=int, default=None, help="replay only the first N passes")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default: specmoe-sim/, or the measured JSON's directory with --validate)")
    p.add_argument("--name", default="simulate", help="file stem of the outputs (default: simulate)")
    p.add_argument("--overwrite", action="store_true", help="replace output files already in --out")
    p.add_argument("--validate", type=Path, metavar="RESULT_JSON",
                   help="compare the simulator with a measured run (benchmarks/shape_real.py output) instead")
    p.add_argument("--validate-profile", choices=sorted(PROFILES) + ["this-machine"],
                   help="profile for --validate (default: matched from the measured device's name; this-machine: "
                        "this CPU as the device, measured here, for a CPU run)")


DEFAULT_SHAPE = "qwen1.5-moe-a2.7b"


def shape_of_geometry(stream, like: str = DEFAULT_SHAPE) -> ModelShape:
    """A shape for a stream whose routing geometry no preset has: `like`'s layer and expert sizes with the
    stream's L, k and E (E: the stream's, else its largest id + 1), labelled as assumed in its name and source."""
    E = stream.num_experts or (int(stream.ids.max()) + 1 if stream.ids.numel() else 1)
    return ModelShape.from_name(like).with_routing(stream.num_layers, max(E, stream.top_k), stream.top_k)


def resolve_shapes(args, stream) -> list[ModelShape]:
    """--shapes (presets) and --shape-config (config.json files), each once per --compression scheme; without
    either, the presets of the stream's geometry, else a shape of its geometry (`shape_of_geometry`)."""
    try:
        configs = [ModelShape.from_file(p) for p in args.shape_config]
    except (OSError, ValueError) as err:
        raise SystemExit(f"--shape-config: {err}") from None
    if args.shapes is None:
        if configs:
            args.shapes = []
        elif stream is None:
            args.shapes = [DEFAULT_SHAPE]
        else:
            args.shapes = matching_presets(stream)
            if not args.shapes:
                assumed = shape_of_geometry(stream)
                print(f"note: no published shape has the trace's routing geometry; replaying on {assumed.name} "
                      f"({assumed.source})")
                configs = [assumed]
    base = [ModelShape.from_name(s) for s in args.shapes] + configs
    return [s.compressed(c) for s in base for c in args.compression]


def _policy(name: str) -> str:
    """An eviction policy's name or a learned policy's directory (argparse type)."""
    if not is_known_policy(name):
        raise argparse.ArgumentTypeError(f"{name!r} is neither one of {', '.join(POLICY_NAMES)} nor a directory")
    return name



def _routers(model_path: str | None):
    from ..runtime.adapters import find_moe_layers

    if model_path:
        from transformers import AutoModelForCausalLM

        from ..hub import resolve_model
        from ..runtime.safetensors_header import check_model_dir

        path = resolve_model(model_path)
        check_model_dir(path)  # config.json and every shard's header, each a one-line error naming the file
        model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True)
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
    from ..predictors import load_predictor, make_predictor
    from ..predictors.base import READS_HIDDEN
    from .predictions import replay_oracle, replay_predictor

    out = []
    geometry = routers = None
    for name in names:
        if name == "none":
            continue
        if name == "oracle":
            out.append(replay_oracle(stream, num_experts, lookahead))
            continue
        saved = load_predictor(name) if name != "pregate" else None
        if saved is not None and saved.kind not in READS_HIDDEN and saved.geometry is not None:
            # routing history only: runs on routing-only traces, no model needed
            out.append(replay_predictor(stream, saved, saved.geometry, [None] * saved.geometry.num_layers,
                                        Path(name).name))
            continue
        if geometry is None:
            geometry, routers = _routers(model_path)
        predictor = make_predictor(name, lookahead=lookahead, geometry=geometry)
        out.append(replay_predictor(stream, predictor, geometry, routers, Path(name).name))
    return out


def run_simulate(args: argparse.Namespace) -> int:
    check_stem(args.name)  # the files stay inside --out
    other = [c for c in args.capacities if not isinstance(c, float)]
    if other:
        raise ValueError(f"--capacities {' '.join(map(str, other))}: simulate takes fractions of all experts in (0, 1] "
                         "(its shapes differ in expert count and size), e.g. 0.25")
    if args.out is None:
        args.out = args.validate.parent if args.validate else Path("specmoe-sim")
    if args.validate:
        from .validate import validate_measurement, validation_table

        stem = args.validate.stem
        check_outputs(args.out, [f"{stem}.validation.json", f"{stem}.validation.md"], args.overwrite)
        from .validate import this_machine_profile

        profile = this_machine_profile() if args.validate_profile == "this-machine" else \
            HardwareProfile.from_name(args.validate_profile) if args.validate_profile else None
        report = validate_measurement(args.validate, profile=profile)
        json_path = args.out / f"{args.validate.stem}.validation.json"
        md_path = json_path.with_suffix(".md")
        write_json(json_path, {"environment": environment("cpu"), **report})
        text = validation_table(report)
        write_text(md_path, f"**Simulator validation**\n\n{text}\n")  # a block README can include
        print(text)
        print(f"\nwrote {json_path}, {md_path}")
        return 0
    check_outputs(args.out, [f"{args.name}.{ext}" for ext in ("json", "md", "png")], args.overwrite)
    stream = load_stream(args.trace) if args.trace else None
    shapes = resolve_shapes(args, stream)
    profiles = [HardwareProfile.from_name(p) for p in args.profiles]
    settings = SweepSettings(capacities=tuple(args.capacities),
                             policies=tuple(dict.fromkeys(map(resolve_policy_name, args.policies))),
                             prefetch_policies=tuple(dict.fromkeys(map(resolve_policy_name, args.prefetch_policies))),
                             context=args.context, warmup_passes=args.warmup, compute=args.compute,
                             misses=tuple(args.misses), host=args.host, placement=args.placement,
                             host_threads=args.host_threads)
    predictors, described = [], "none (memory and ceilings only)"
    if stream is not None:
        if args.max_passes:
            stream = stream.select_passes(0, min(args.max_passes, stream.num_passes))
        matching = [s for s in shapes if stream.matches(s.moe_layers, s.top_k, s.num_experts)]
        if not matching:
            raise SystemExit(f"the trace has L={stream.num_layers} k={stream.top_k} E={stream.num_experts or '?'}; "
                             f"none of {[s.name for s in shapes]} has that routing geometry (without --trace their "
                             "memory rows are still computed; without --shapes/--shape-config a shape of the trace's "
                             "geometry is assumed)")
        if settings.warmup_passes >= stream.num_passes:  # a short trace: keep at least one measured pass
            warmup = stream.num_passes // 2
            print(f"note: the trace has {stream.num_passes} passes, not more than --warmup {settings.warmup_passes}; "
                  f"warming up on {warmup}")
            settings = dataclasses.replace(settings, warmup_passes=warmup)
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
