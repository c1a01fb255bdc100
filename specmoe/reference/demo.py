"""`specmoe demo`: the reference model, offloaded, with and without speculation, on held-out prompts.

1. Load the packaged reference model (Qwen1.5-MoE-A2.7B's routing geometry, trained here on the standard
   library's sources) and its held-out prompts.
2. Run the unwrapped model (all experts resident) once per prompt, recording its tokens and, with
   `specmoe.traces.capture_routing`, its routing (the oracle's replay); then once more, timed.
3. For each predictor (none = demand fetching only, the pre-gate, trained predictors given with --predictor, the
   oracle), wrap the model in `SpeculativeMoE` at one cache capacity and generate the same prompts in a row
   (the cache stays warm from prompt to prompt, as in a server; the first prompt only warms it up).
   Counters are split at the first new token: the table shows the decode phase.
4. Print a table; write demo.json, demo.md (the table) and demo.png.
"""

# Shape legend: T tokens, L MoE layers, k top-k

from __future__ import annotations

import logging
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..io import check_outputs, write_json, write_text
from ..measure import FirstTokenClock, environment
from ..predictors import make_predictor
from ..runtime.adapters import find_moe_layers
from ..runtime.capacity import capacity_arg, parse_capacity
from ..runtime.policies import DEFAULT_POLICY
from ..runtime.stats import Stats
from ..runtime.wrapper import SpeculativeMoE
from ..traces.capture import capture_routing
from .demo_report import format_table, plot_demo
from .model import CHECKPOINT_DIR, load_reference_model, load_reference_prompts, load_reference_tokenizer

logger = logging.getLogger(__name__)

# Trained predictors every demo compares (directories written by `save_predictor`); --predictor adds more.
DEFAULT_TRAINED_PREDICTORS: tuple[Path, ...] = (
    Path(__file__).parent / "predictors" / "hidden-l2",  # from benchmarks/predictors.py --package
)

COUNTERS = ("hits", "misses", "prefetch_issued", "prefetch_used", "prefetch_wasted", "bytes_moved")


@dataclass(frozen=True)
class DemoConfig:
    """Settings of a demo run.

    Args:
        device: compute device (default: CUDA when present, else CPU).
        dtype: weights' dtype (default: float32 on CPU, bfloat16 on CUDA).
        capacity: the device cache: a fraction of all experts in (0, 1], a slot count or a budget like "8GiB"
            (the result's settings record the fraction it came to, and this value as `capacity_given`).
        prompts: measured prompts (one more, the first, warms the cache and the clocks up).
        prompt_tokens: prompts are cut to this many tokens.
        new_tokens: tokens generated per prompt (greedy, never stopping early); at least 2.
        repetition_penalty: transformers' repetition penalty on the greedy choice (1.0 = plain greedy, which
            loops on a model this small, and loops flatter every cache figure).
        predictors: directories of trained predictors to compare besides the built-in ones.
        checkpoint: a reference checkpoint directory (default: the packaged one).
        compile: compiled decode of the wrapped rows (`SpeculativeMoE(..., compile=True)`).
    """

    device: str | None = None
    dtype: str | None = None
    capacity: float | int | str = 0.25
    prompts: int = 3
    prompt_tokens: int = 48
    new_tokens: int = 32
    repetition_penalty: float = 1.3
    predictors: tuple[Path, ...] = ()
    checkpoint: Path | None = None
    compile: bool = False

    def __post_init__(self):
        parse_capacity(str(self.capacity))  # the one reading of a capacity (ValueError: what to write)
        if self.prompts < 1 or self.prompt_tokens < 1:
            raise ValueError("DemoConfig.prompts and prompt_tokens must be >= 1")
        if self.new_tokens < 2:
            raise ValueError(f"DemoConfig.new_tokens must be >= 2 (decode is measured after the first), "
                             f"got {self.new_tokens}")
        if not self.repetition_penalty >= 1.0:
            raise ValueError(f"DemoConfig.repetition_penalty must be >= 1.0 (1.0 = none), "
                             f"got {self.repetition_penalty}")
        if self.dtype is not None and not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"DemoConfig.dtype must name a torch dtype such as 'float32' or 'bfloat16', "
                             f"got {self.dtype!r}")


def _counters(stats: Stats) -> dict[str, int]:
    return {c: getattr(stats.total, c) for c in COUNTERS}


def _delta(after: dict, before: dict) -> dict:
    return {c: after[c] - before[c] for c in COUNTERS}


def _with_rates(c: dict) -> dict:
    n = c["hits"] + c["misses"]
    return {**c, "hit_rate": c["hits"] / n if n else 0.0}


def _timed_generate(generate, ids: torch.Tensor, cfg: DemoConfig, device: torch.device, stats=lambda: None):
    """Greedy-generate exactly `cfg.new_tokens`; returns (new token ids, ttft s, decode tok/s, counters at the
    first token)."""

    clock = FirstTokenClock(device, on_first=stats)  # the runtime's counters at the first token
    t0 = clock.start()
    with torch.no_grad():
        out = generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=cfg.new_tokens,
                       min_new_tokens=cfg.new_tokens, do_sample=False, repetition_penalty=cfg.repetition_penalty,
                       streamer=clock)
    decode_s = max(clock.stop() - clock.first_s, 1e-9)
    return out[0, ids.shape[1]:].cpu(), clock.first_s - t0, (cfg.new_tokens - 1) / decode_s, clock.first_value


def _predictor_specs(cfg: DemoConfig, geometry, routing: list[list[torch.Tensor]]):
    """(name, make(prompt index) -> predictor or None, per_prompt) for each predictor compared."""
    specs = [("none (on demand)", lambda i: None, False),
             ("pre-gate", lambda i: make_predictor("pregate"), False)]
    for path in (*DEFAULT_TRAINED_PREDICTORS, *cfg.predictors):
        trained = make_predictor(path, geometry=geometry)  # fails here, before any run, on a bad file
        specs.append((f"{trained.kind} ({Path(path).name})", lambda i, p=trained: p, False))
    specs.append(("oracle (replays routing)", lambda i: make_predictor("oracle", routing=routing[i]), True))
    return specs


def run_demo_experiment(cfg: DemoConfig, progress: bool = True) -> dict:
    """Run the demo (see the module docstring) and return its results as a JSON-ready dict.

    Raises:
        FileNotFoundError: no reference checkpoint. ValueError: more prompts asked than the checkpoint has,
        or a trained predictor of another geometry.
    """
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, cfg.dtype) if cfg.dtype else None
    t_load = time.perf_counter()
    model = load_reference_model(device, dtype, path=cfg.checkpoint)
    tokenizer = load_reference_tokenizer(cfg.checkpoint)
    texts = load_reference_prompts(cfg.checkpoint)
    if len(texts) < cfg.prompts + 1:
        raise ValueError(f"the checkpoint has {len(texts)} prompts; --prompts can be at most {len(texts) - 1} "
                         "(one more warms up)")
    texts = texts[: cfg.prompts + 1]
    prompts = [tokenizer(t, return_tensors="pt")["input_ids"][:, : cfg.prompt_tokens].to(device) for t in texts]
    load_s = time.perf_counter() - t_load

    # ---- unwrapped: reference tokens, routing for the oracle, then timing --------------------------------
    reference, routing = [], []
    for ids in tqdm(prompts, desc="unwrapped: routing", disable=not progress, leave=False):
        with capture_routing(model) as cap:
            tokens, *_ = _timed_generate(model.generate, ids, cfg, device)
        reference.append(tokens)
        routing.append([p.ids for p in cap.passes])
    resident = [_timed_generate(model.generate, ids, cfg, device)[1:3] for ids in  # hooks off
                tqdm(prompts[1:], desc="unwrapped: timing", disable=not progress, leave=False)]

    rows = []
    geometry = find_moe_layers(model).geometry
    for name, make, per_prompt in _predictor_specs(cfg, geometry, routing):
        smoe = SpeculativeMoE(model, make(0), cfg.capacity, device=device, compile=cfg.compile)
        runs = []
        try:
            for i, ids in enumerate(tqdm(prompts, desc=name, disable=not progress, leave=False)):
                if per_prompt and i > 0:
                    smoe.set_predictor(make(i))
                before = _counters(smoe.stats)
                tokens, ttft, tok_s, at_first = _timed_generate(smoe.generate, ids, cfg, device,
                                                                stats=lambda: smoe.stats)
                after, first = _counters(smoe.stats), _counters(at_first)
                runs.append({"prompt": i, "ttft_s": ttft, "decode_tok_s": tok_s,
                             "tokens_match": bool(torch.equal(tokens, reference[i])),
                             "prefill": _delta(first, before), "decode": _delta(after, first)})
            memory = smoe.memory()
        finally:
            smoe.unwrap()
        measured = runs[1:]  # the first prompt warms up
        rows.append({
            "predictor": name,
            "decode": _with_rates({c: sum(r["decode"][c] for r in measured) for c in COUNTERS}),
            "prefill": _with_rates({c: sum(r["prefill"][c] for r in measured) for c in COUNTERS}),
            "decode_tok_s": statistics.median(r["decode_tok_s"] for r in measured),
            "ttft_s": statistics.median(r["ttft_s"] for r in measured),
            "tokens_match": all(r["tokens_match"] for r in runs),
            "runs": runs,
        })
    return {
        "demo": "specmoe demo",
        "model": {"checkpoint": str(cfg.checkpoint or CHECKPOINT_DIR), "class": type(model).__name__,
                  "geometry": geometry.to_dict(), "dtype": str(next(model.parameters()).dtype),
                  "parameters": sum(p.numel() for p in model.parameters())},
        "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
                     "predictors": [str(p) for p in (*DEFAULT_TRAINED_PREDICTORS, *cfg.predictors)],
                     "capacity": memory["num_slots"] / (geometry.num_layers * geometry.num_experts),
                     "capacity_given": cfg.capacity, "policy": DEFAULT_POLICY,
                     "device": str(device), "num_slots": memory["num_slots"], "slot_bytes": memory["slot_bytes"],
                     "measured": "decode phase (after the first new token) of prompts 1..n; prompt 0 warms up; "
                                 "tok/s and TTFT are medians over the measured prompts"},
        "environment": environment(device),
        "load_s": load_s,
        "prompt_tokens": [int(p.shape[1]) for p in prompts],
        "generations": [{"prompt": tokenizer.decode(p[0].cpu()), "generated": tokenizer.decode(t)}
                        for p, t in zip(prompts, reference)],
        "unwrapped": {"decode_tok_s": statistics.median(r[1] for r in resident),
                      "ttft_s": statistics.median(r[0] for r in resident)},
        "rows": rows,
    }


# ---- CLI ----------------------------------------------------------------------------------------------
DEFAULT_OUT = Path("specmoe-demo")
OUTPUTS = ("demo.json", "demo.md", "demo.png")


def ignored_output_dir(path: Path) -> Path:
    """Create the output directory; one the demo creates itself gets a `.gitignore` of `*`, so that a demo run in
    a checkout leaves `git status` clean (a directory that was already there gets nothing it did not ask for)."""
    if not path.exists():
        path.mkdir(parents=True)
        write_text(path / ".gitignore", "# written by specmoe: outputs of a run, not sources\n*\n")
    return path


def add_demo_arguments(parser) -> None:
    d = DemoConfig()
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when present)")
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16 (default: float32 on CPU, bf16 on GPU)")
    parser.add_argument("--capacity", type=capacity_arg, default=d.capacity,
                        help="device cache: a fraction of all experts in (0, 1], a slot count, or a budget like "
                             f"8GiB (default {d.capacity})")
    parser.add_argument("--prompts", type=int, default=d.prompts, help="measured held-out prompts (+1 warm-up)")
    parser.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens, help="prompts are cut to this many tokens")
    parser.add_argument("--new-tokens", type=int, default=d.new_tokens, help="tokens generated per prompt (>= 2)")
    parser.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty,
                        help="on the greedy choice; 1.0 = plain greedy")
    parser.add_argument("--predictor", type=Path, action="append", default=[], metavar="PATH",
                        help="a trained predictor directory to compare too (repeatable)")
    parser.add_argument("--checkpoint", type=Path, default=None, help="another reference checkpoint directory")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="where demo.json/.md/.png go (default: ./specmoe-demo; a directory the demo creates "
                             "holds a .gitignore of its own, so git ignores it)")
    parser.add_argument("--overwrite", action="store_true", help="replace demo.json/.md/.png already in --out")
    # --threads (every command's option) defaults to 1 here: the reference model's 64-wide matrices gain nothing
    # from more, and spinning OpenMP threads make a busy machine several times slower
    parser.set_defaults(threads=1)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--compile", action="store_true", help="compiled decode of the wrapped rows (torch.compile)")


def run_demo(args) -> int:
    check_outputs(args.out, OUTPUTS, args.overwrite)  # before any work
    for path in args.predictor:  # fail now, not after the unwrapped runs
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"--predictor {path}: not a saved predictor directory (no config.json)")
    cfg = DemoConfig(device=args.device, dtype=args.dtype, capacity=args.capacity, prompts=args.prompts,
                     prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                     repetition_penalty=args.repetition_penalty, predictors=tuple(args.predictor),
                     checkpoint=args.checkpoint, compile=args.compile)
    result = run_demo_experiment(cfg, progress=not args.quiet)
    ignored_output_dir(args.out)
    write_json(args.out / "demo.json", result)
    table = format_table(result)
    write_text(args.out / "demo.md", table + "\n")
    plot_demo(result, args.out / "demo.png")
    print(table)
    print(f"\nwrote demo.json, demo.md and demo.png in {args.out}")
    return 0 if all(r["tokens_match"] for r in result["rows"]) else 1
