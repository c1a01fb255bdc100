"""`specmoe collect | import-routing | train | eval | bench | simulate | demo | generate | serve`.

Each command lives with the component it drives: module M defines `add_<name>_arguments(parser)` and
`run_<name>(args) -> int`, imported only when that command runs (so `specmoe demo` never imports the
simulator, and a broken optional dependency only breaks its own command).

A user error (a missing file, an existing output, a bad value) prints one line and exits with status 2, as
argparse does for bad options; `-v` adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from ._version import __version__

COMMANDS: dict[str, tuple[str, str]] = {
    "collect": ("specmoe.traces.cli", "run a model over text and write routing traces"),
    "import-routing": ("specmoe.traces.cli", "write a trace directory from routing recorded elsewhere (vLLM, ...)"),
    "train": ("specmoe.training.cli", "train a speculation predictor on routing traces"),
    "eval": ("specmoe.training.cli", "evaluate predictors on held-out traces"),
    "bench": ("specmoe.bench.cli", "latency, hit-rate and memory benchmarks"),
    "simulate": ("specmoe.sim.cli", "replay traces on a hardware profile"),
    "plan": ("specmoe.sim.plan_cli", "choose capacity, compression, host store and misses for a model on a machine"),
    "demo": ("specmoe.reference.demo", "the built-in default: reference model, traces, wrapped generation"),
    "generate": ("specmoe.generate", "generate text from a prompt with the experts offloaded, streaming tokens"),
    "serve": ("specmoe.serve.cli", "an OpenAI-compatible HTTP server for one model with its experts offloaded"),
}

# What a user's input can cause: missing/existing files and directories, bad values, a model of the wrong kind.
USER_ERRORS = (OSError, ValueError, TypeError)

logger = logging.getLogger("specmoe")


class _UsageError(Exception):
    """A bad option or value, found by argparse."""

    def __init__(self, prog: str, message: str):
        super().__init__(message)
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad option is one line (like every other user error) instead of the usage and the error."""

    def error(self, message):
        raise _UsageError(self.prog, message)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def _common_parent() -> argparse.ArgumentParser:
    """Options of every command: -v (accepted after the command too, `specmoe demo -v`; SUPPRESS keeps a -v given
    before it) and --threads."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                   help="log at INFO level, and show the traceback of an error")
    p.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: OMP_NUM_THREADS if set, else half this machine's cores, 1 to 8: "
                        "on a machine shared with other jobs, spinning OpenMP threads make decode many times slower)")
    return p


def default_threads() -> int:
    """torch's CPU threads when --threads is not given: OMP_NUM_THREADS if set, else half the cores this process
    may use, between 1 and 8 (measured on a busy 2-core machine: `generate` 0.8 tok/s on torch's default of 2,
    30 tok/s on 1)."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) >= 1:
        return int(env)
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, min(8, cores // 2))


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="specmoe", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level, and show the traceback "
                        "of an error")
    parser.add_argument("--version", action="version", version=f"specmoe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[_common_parent()])
        p.set_defaults(_module=module)
    return parser


def _command_of(argv: list[str]) -> str | None:
    """The subcommand: the first argument that is not an option (the top level takes no option values)."""
    return next((a for a in argv if not a.startswith("-")), None)


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    if isinstance(err, KeyError):
        text = f"missing key {text}"
    return text


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    # Import only the chosen command's module to add its arguments.
    command = _command_of(argv)
    if command in COMMANDS:
        module = importlib.import_module(COMMANDS[command][0])
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        getattr(module, f"add_{command.replace('-', '_')}_arguments")(sub.choices[command])
    try:
        args = parser.parse_args(argv)
    except _UsageError as err:
        print(f"{err.prog}: error: {' '.join(str(err).split())} (--help lists the options)", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    module = importlib.import_module(args._module)
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads or default_threads())
    try:
        return int(getattr(module, f"run_{args.command.replace('-', '_')}")(args) or 0)
    except USER_ERRORS as err:
        message, error = _one_line(err), err
    except SystemExit as err:  # raise SystemExit("message") is a user error too; SystemExit(0/1) passes
        if not isinstance(err.code, str):
            raise
        message, error = " ".join(err.code.split()), err
    except KeyboardInterrupt:
        print(f"specmoe {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)  # as it was, for a caller in the same process
    prefix = f"specmoe {args.command}: "
    message = message[len(prefix):] if message.startswith(prefix) else message  # said once, below
    if args.verbose:
        logger.error("specmoe %s failed", args.command, exc_info=error)
    print(f"specmoe {args.command}: error: {message}" + ("" if args.verbose else " (-v shows the traceback)"),
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
