"""Train the reference MoE language model on the standard library's sources, on CPU, in minutes.

    python -m specmoe.reference.train --out specmoe/reference/checkpoint             # 10 minutes, the default
    python -m specmoe.reference.train --out /tmp/ref --steps 300                       # a fixed number of steps
    python -m specmoe.reference.train --out /tmp/olmoe --preset olmoe

Everything happens inside the budget (`--max-minutes`, wall clock): corpus scan, BPE tokenizer, AdamW with a
cosine learning rate that follows the elapsed share of the budget, periodic validation, and the save. The
router's load-balancing loss is on (`output_router_logits=True`, weight `router_aux_loss_coef`), so experts
are used. The output directory holds what `save_pretrained` writes (safetensors, weights in bfloat16), the
tokenizer, prompts.json (held-out snippets for the demo) and training.json (settings, corpus, losses, time,
machine).
"""

from __future__ import annotations

import argparse
import logging
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..measure import environment
from ..io import write_json
from ..runtime.adapters import find_moe_layers
from ..training.config import TrainConfig
from .corpus import CorpusConfig, load_corpus
from .data import encode_documents, eval_windows, random_windows
from .evaluation import evaluate_loss, unigram_loss
from ..sim.synthetic import build_random_model
from .model import PROMPTS_NAME, PRESETS, TRAINING_NAME, build_config, get_preset
from .tokenizer import train_tokenizer

logger = logging.getLogger(__name__)


# How the reference model is optimised (the one TrainConfig; `--max-minutes` or `--steps` change the budget).
DEFAULT_TRAINING = TrainConfig(steps=None, max_minutes=10.0, batch_size=8, lr=6e-3, min_lr_ratio=0.1, warmup_steps=20,
                               weight_decay=0.1, grad_clip=1.0, eval_every=250, val_tokens=16384, seed=0, device="cpu")


@dataclass(frozen=True)
class ReferenceRecipe:
    """What the reference model is and reads (all recorded in training.json); how it is optimised is a
    `specmoe.training.TrainConfig`.

    Args:
        preset: model shape, a key of `specmoe.reference.model.PRESETS`.
        seq_len: tokens per training window.
        vocab_size: BPE vocabulary.
        eval_every_s: seconds between validation passes when training to a time budget (the
            TrainConfig's eval_every steps otherwise).
        num_prompts, prompt_chars: held-out snippets saved for the demo.
    """

    preset: str = "qwen1.5-moe"
    seq_len: int = 128
    vocab_size: int = 4096
    eval_every_s: float = 120.0
    num_prompts: int = 8
    prompt_chars: int = 240

    def __post_init__(self):
        get_preset(self.preset)
        for name in ("seq_len", "vocab_size", "num_prompts", "prompt_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"ReferenceRecipe.{name} must be >= 1, got {getattr(self, name)}")
        if self.seq_len > get_preset(self.preset).max_positions:
            raise ValueError(f"ReferenceRecipe.seq_len {self.seq_len} exceeds the preset's max_positions")


def heldout_prompts(texts: list[str], count: int, chars: int) -> list[str]:
    """`count` snippets of whole lines, about `chars` long, from the middle of evenly spaced validation files."""
    prompts = []
    picks = sorted({round(i * (len(texts) - 1) / max(count - 1, 1)) for i in range(count)})
    for i in picks:
        text = texts[i]
        start = text.find("\n", len(text) // 2) + 1
        snippet = text[start : start + chars]
        cut = snippet.rfind("\n")
        snippet = snippet[:cut + 1] if cut > 0 else snippet
        if snippet.strip():
            prompts.append(snippet)
    return prompts


def _save(model, tokenizer, out: Path, prompts: list[str], record: dict) -> None:
    """Write the checkpoint next to `out`, then swap it in (a reader never sees half a checkpoint)."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    model.config.output_router_logits = False
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.eos_token_id
    model.to(torch.bfloat16).save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    write_json(tmp / PROMPTS_NAME, {"source": "middle of held-out (validation) files of the corpus, whole lines",
                                    "prompts": prompts})
    write_json(tmp / TRAINING_NAME, record)
    old = out.with_name(out.name + ".old")
    if out.exists():
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def train(recipe: ReferenceRecipe, cfg: TrainConfig = DEFAULT_TRAINING, out=None, corpus: CorpusConfig | None = None,
          progress: bool = True) -> dict:
    """Run the whole recipe and write the checkpoint to `out`.

    Args:
        recipe: the model and its data.
        cfg: the optimisation settings (steps or a time budget, AdamW, schedule; trained on the CPU).
        out: output directory (replaced if it exists).
        corpus: which text (default: the standard library, split by file with `cfg.seed`).
        progress: show tqdm bars.

    Returns:
        The training record also written to `out/training.json`.
    """
    if out is None:
        raise ValueError("train() needs out=, the checkpoint directory to write")
    t0, cpu0 = time.perf_counter(), time.process_time()
    deadline = t0 + cfg.max_minutes * 60 if cfg.max_minutes else math.inf
    out = Path(out)
    torch.manual_seed(cfg.seed)
    split = load_corpus(corpus or CorpusConfig(seed=cfg.seed))
    train_texts, val_texts = split.texts("train"), split.texts("val")
    preset = get_preset(recipe.preset)
    tokenizer = train_tokenizer(train_texts, recipe.vocab_size, model_max_length=preset.max_positions)
    train_stream = encode_documents(tokenizer, train_texts)
    val_stream = encode_documents(tokenizer, val_texts)
    val = eval_windows(val_stream, recipe.seq_len, max(1, cfg.val_tokens // recipe.seq_len))
    config = build_config(preset, len(tokenizer), tokenizer.eos_token_id)
    model = build_random_model(config, dtype=torch.float32, seed=cfg.seed, progress=False, trainable=True).train()
    geometry = find_moe_layers(model).geometry
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model %s, %s, %.2fM parameters; %d train tokens", recipe.preset, geometry, n_params / 1e6,
                train_stream.numel())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)

    def validate(step: int) -> float:
        t = time.perf_counter()
        loss = evaluate_loss(model, val)
        evals.append({"step": step, "tokens": step * cfg.batch_size * recipe.seq_len,
                      "elapsed_s": round(time.perf_counter() - t0, 2), "val_loss": loss})
        return time.perf_counter() - t

    evals: list[dict] = []
    history: list[dict] = []
    eval_s = validate(0)
    reserve = 1.5 * eval_s + 15.0  # final validation + save, kept inside the budget
    loop_start = time.perf_counter()
    loop_budget = deadline - reserve - loop_start
    if loop_budget <= 0:
        raise ValueError(f"--max-minutes {cfg.max_minutes} leaves no time to train after preparation "
                         f"({loop_start - t0:.0f} s); give more minutes or --steps")
    bar = tqdm(total=cfg.steps or round(loop_budget), unit="step" if cfg.steps else "s", desc="train",
               disable=not progress)
    step, last_eval, window = 0, loop_start, []
    while True:
        now = time.perf_counter()
        progress_frac = cfg.progress(step, now - loop_start, budget_s=loop_budget if cfg.max_minutes else None)
        if progress_frac >= 1.0:
            break
        factor = cfg.lr_factor(step, progress_frac)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * factor
        x = random_windows(train_stream, cfg.batch_size, recipe.seq_len, gen)  # [B, T]
        out_ = model(input_ids=x, labels=x, output_router_logits=True)
        opt.zero_grad(set_to_none=True)
        out_.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        aux = out_.aux_loss.item()
        window.append((out_.loss.item() - preset.router_aux_loss_coef * aux, aux))
        step += 1
        after = time.perf_counter()
        bar.update(1 if cfg.steps else round(after - loop_start) - bar.n)
        if step % 10 == 0:
            lm, ax = (sum(v) / len(v) for v in zip(*window))
            history.append({"step": step, "elapsed_s": round(after - t0, 2), "lr": cfg.lr * factor,
                            "train_loss": lm, "aux_loss": ax})
            bar.set_postfix(step=step, loss=f"{lm:.3f}", aux=f"{ax:.3f}")
            window = []
        due = (step % cfg.eval_every == 0) if cfg.steps else (after - last_eval >= recipe.eval_every_s)
        if due and (cfg.steps or after + eval_s + reserve < deadline):
            validate(step)
            last_eval = time.perf_counter()
    bar.close()
    loop_s = time.perf_counter() - loop_start
    if evals[-1]["step"] != step:
        validate(step)
    model.eval()
    settings = {**asdict(recipe), **{k: v for k, v in asdict(cfg).items() if k not in ("device", "patience")}}
    record = {
        "recipe": "python -m specmoe.reference.train --out DIR " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in settings.items() if v is not None),
        "settings": settings,
        "preset": {"name": recipe.preset, **asdict(preset)},
        "model_class": type(model).__name__,
        "geometry": geometry.to_dict(),
        "parameters": n_params,
        "corpus": split.describe(),
        "tokenizer": {"kind": "byte-level BPE (tokenizers)", "vocab_size": len(tokenizer),
                      "train_tokens": train_stream.numel(), "val_tokens": val_stream.numel()},
        "steps": step,
        "tokens_seen": step * cfg.batch_size * recipe.seq_len,
        "train_loop_s": round(loop_s, 1),
        "tokens_per_s": round(step * cfg.batch_size * recipe.seq_len / loop_s, 1),
        "val_windows": list(val.shape),
        "initial_val_loss": evals[0]["val_loss"],
        "final_val_loss": evals[-1]["val_loss"],
        "unigram_val_loss": unigram_loss(train_stream, val, len(tokenizer)),
        "evals": evals,
        "history": history,
        "environment": environment("cpu"),
    }
    _save(model, tokenizer, out, heldout_prompts(val_texts, recipe.num_prompts, recipe.prompt_chars), record)
    record["wall_time_s"] = round(time.perf_counter() - t0, 1)  # the whole run, the save included
    record["cpu_time_s"] = round(time.process_time() - cpu0, 1)  # all threads: what a shared machine gave us
    write_json(out / TRAINING_NAME, record)
    logger.info("saved %s in %.0f s", out, record["wall_time_s"])
    return record


_SKIPPED = ("device", "patience")  # the reference model trains on the CPU and never stops early
_ALIASES = {"max_minutes": ["--minutes"], "eval_every": ["--eval-every-steps"]}  # flags of older training.json


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="checkpoint directory to write (replaced)")
    # every setting is a flag, so training.json's recipe runs as written
    for defaults, f in [(ReferenceRecipe(), f) for f in fields(ReferenceRecipe)] + \
            [(DEFAULT_TRAINING, f) for f in fields(TrainConfig) if f.name not in _SKIPPED]:
        flags = [f"--{f.name.replace('_', '-')}", *_ALIASES.get(f.name, [])]
        if f.name == "preset":
            ap.add_argument(*flags, default=defaults.preset, choices=sorted(PRESETS))
        elif f.name == "steps":
            ap.add_argument(*flags, type=int, default=None, help="train this many steps instead of to a time budget")
        else:
            ap.add_argument(*flags, type=type(getattr(defaults, f.name)), default=getattr(defaults, f.name))
    ap.add_argument("--corpus-root", type=Path, default=None, help="directory of *.py files (default: stdlib)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's; 1 is far faster on a machine shared with other jobs)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    recipe = ReferenceRecipe(**{f.name: getattr(args, f.name) for f in fields(ReferenceRecipe)})
    cfg = replace(DEFAULT_TRAINING, **{f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name not in _SKIPPED})
    if cfg.steps is not None:  # --steps replaces the time budget (recorded recipes give both and mean steps)
        cfg = replace(cfg, max_minutes=None)
    corpus = CorpusConfig(root=args.corpus_root, seed=cfg.seed)
    record = train(recipe, cfg, args.out, corpus, progress=not args.quiet)
    print(f"{record['steps']} steps, {record['tokens_seen']} tokens in {record['train_loop_s']} s; val loss "
          f"{record['initial_val_loss']:.3f} -> {record['final_val_loss']:.3f} (unigram "
          f"{record['unigram_val_loss']:.3f}); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
