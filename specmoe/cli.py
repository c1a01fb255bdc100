"""`specmoe collect | import-routing | train | eval | bench | simulate | demo`.

Each command lives with the component it drives: module M defines `add_<name>_arguments(parser)` and
`run_<name>(args) -> int`, imported only when that command runs (so `specmoe demo` never imports the
simulator, and a broken optional dependency only breaks its own command).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "collect": ("specmoe.traces.cli", "run a model over text and write routing traces"),
    "import-routing": ("specmoe.traces.cli", "write a trace directory from routing recorded elsewhere (vLLM, ...)"),
    "train": ("specmoe.training.cli", "train a speculation predictor on routing traces"),
    "eval": ("specmoe.training.cli", "evaluate predictors on held-out traces"),
    "bench": ("specmoe.bench.cli", "latency, hit-rate and memory benchmarks"),
    "simulate": ("specmoe.sim.cli", "replay traces on a hardware profile"),
    "demo": ("specmoe.reference.demo", "the built-in default: reference model, traces, wrapped generation"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="specmoe", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    # Import only the chosen command's module to add its arguments.
    if argv and argv[0] in COMMANDS:
        module = importlib.import_module(COMMANDS[argv[0]][0])
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        getattr(module, f"add_{argv[0].replace('-', '_')}_arguments")(sub.choices[argv[0]])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(args._module)
    return int(getattr(module, f"run_{args.command.replace('-', '_')}")(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
