"""`specmoe plan`: the settings a model runs best with on a machine (GPU, RAM, disk), simulated (`sim.plan`)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..io import write_json
from ..runtime.capacity import parse_bytes
from .hardware import PROFILES, HardwareProfile
from .host import HOST_PROFILES, HostProfile
from .plan import Machine, make_plan
from .shapes import PRESETS, ModelShape


def add_plan_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="PATH_OR_ID_OR_CONFIG",
                   help=f"a model directory or its config.json, a hub id in the local cache, or a preset "
                        f"({', '.join(sorted(PRESETS))})")
    p.add_argument("--gpu", default="rtx3090", metavar="PROFILE_OR_SIZE",
                   help=f"a GPU profile ({', '.join(sorted(PROFILES))}) or a memory size such as 24GiB (then "
                        "--gpu-profile's link and compute figures)")
    p.add_argument("--gpu-profile", default="rtx3090", choices=sorted(PROFILES),
                   help="link and compute figures for --gpu SIZE (default rtx3090)")
    p.add_argument("--ram", required=True, metavar="SIZE", help="host RAM, e.g. 64GiB")
    p.add_argument("--host", default="ddr5-desktop", metavar="PROFILE",
                   help=f"host profile: {', '.join(sorted(HOST_PROFILES))} or this-machine (measured here)")
    p.add_argument("--disk-gbps", type=float, default=3.0,
                   help="read rate of the disk holding the checkpoint, GB/s (default 3, an NVMe SSD)")
    p.add_argument("--lossless", action="store_true", help="keep the experts as published (no int8/int4)")
    p.add_argument("--context", type=int, default=2048, help="KV tokens per sequence (default 2048)")
    p.add_argument("--trace", type=Path, help="routing of this model's geometry to simulate on (default: synthetic)")
    p.add_argument("--out", type=Path, help="also write the plan as JSON here")


def resolve_shape(model: str) -> ModelShape:
    """A preset name, a config.json (or a directory holding one), or a hub id found in the local cache."""
    if model.lower() in PRESETS:
        return ModelShape.from_name(model)
    path = Path(model)
    if path.exists():
        return ModelShape.from_file(path)
    from ..hub import resolve_model

    return ModelShape.from_file(resolve_model(model), name=model)


def run_plan(args: argparse.Namespace) -> int:
    if re.fullmatch(r"[a-z0-9_-]+", args.gpu.lower()) and not re.search(r"\d+\s*[kmgt]i?b$", args.gpu.lower()):
        gpu = HardwareProfile.from_name(args.gpu)
    else:
        base = HardwareProfile.from_name(args.gpu_profile)
        gpu = base.with_(name=f"{base.name}@{args.gpu}", memory_bytes=parse_bytes(args.gpu))
    machine = Machine(gpu, HostProfile.from_name(args.host), parse_bytes(args.ram), args.disk_gbps * 1e9)
    stream = None
    if args.trace:
        from .stream import load_stream

        stream = load_stream(args.trace)
    plan = make_plan(resolve_shape(args.model), machine, lossy=not args.lossless, stream=stream,
                     context=args.context)
    print(plan.summary())
    if args.out:
        write_json(args.out, plan.to_dict())
        print(f"wrote {args.out}")
    return 0
