"""Train the reference MoE language model on the standard library's sources, on CPU, in minutes.

    python -m specmoe.reference.train --out specmoe/reference/checkpoint             # 10 minutes, the default
    python -m specmoe.reference.train --out /tmp/ref --steps 300                       # a fixed number of steps
    python -m specmoe.reference.train --out /tmp/olmoe --preset olmoe

Everything happens inside the budget (`--minutes`, wall clock): corpus scan, BPE tokenizer, AdamW with a
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
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..bench import environment
from ..io import write_json
from ..runtime.adapters import find_moe_layers
from .corpus import CorpusConfig, load_corpus
from .data import encode_documents, eval_windows, random_windows
from .evaluation import evaluate_loss, unigram_loss
from ..sim.synthetic import build_random_model
from .model import PROMPTS_NAME, PRESETS, TRAINING_NAME, build_config, get_preset
from .tokenizer import train_tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """Settings of a training run (all recorded in training.json).

    Args:
        preset: model shape, a key of `specmoe.reference.model.PRESETS`.
        minutes: wall-clock budget of the whole run; the learning rate follows the elapsed share of it.
        steps: train exactly this many steps instead (the schedule follows steps; no time limit).
        batch_size, seq_len: windows per step and tokens per window.
        lr, min_lr_ratio, warmup_steps, weight_decay, grad_clip: AdamW and its cosine schedule.
        vocab_size: BPE vocabulary.
        eval_every_s: seconds between validation passes (time budget mode); eval_every_steps otherwise.
        val_tokens: validation tokens scored per pass.
        num_prompts, prompt_chars: held-out snippets saved for the demo.
        seed: seeds the weights, the batches and the corpus split.
    """

    preset: str = "qwen1.5-moe"
    minutes: float = 10.0
    steps: int | None = None
    batch_size: int = 8
    seq_len: int = 128
    lr: float = 6e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 20
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    vocab_size: int = 4096
    eval_every_s: float = 120.0
    eval_every_steps: int = 250
    val_tokens: int = 16384
    num_prompts: int = 8
    prompt_chars: int = 240
    seed: int = 0

    def __post_init__(self):
        get_preset(self.preset)
        if self.steps is None and not self.minutes > 0:
            raise ValueError(f"TrainConfig.minutes must be > 0 (or give steps), got {self.minutes}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"TrainConfig.steps must be >= 1, got {self.steps}")
        for name in ("batch_size", "seq_len", "vocab_size", "val_tokens", "num_prompts", "prompt_chars"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and 0 <= self.min_lr_ratio <= 1):
            raise ValueError("TrainConfig needs lr > 0 and min_lr_ratio in [0, 1]")
        if self.seq_len > get_preset(self.preset).max_positions:
            raise ValueError(f"TrainConfig.seq_len {self.seq_len} exceeds the preset's max_positions")


def lr_factor(step: int, progress: float, cfg: TrainConfig) -> float:
    """Linear warm-up over `warmup_steps`, then cosine from 1 to `min_lr_ratio` as progress goes 0 -> 1."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps)
    cos = 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return warm * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cos)


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


def train(cfg: TrainConfig, out, corpus: CorpusConfig | None = None, progress: bool = True) -> dict:
    """Run the whole recipe and write the checkpoint to `out`.

    Args:
        cfg: the training settings.
        out: output directory (replaced if it exists).
        corpus: which text (default: the standard library, split by file with `cfg.seed`).
        progress: show tqdm bars.

    Returns:
        The training record also written to `out/training.json`.
    """
    t0, cpu0 = time.perf_counter(), time.process_time()
    deadline = t0 + cfg.minutes * 60 if cfg.steps is None else math.inf
    out = Path(out)
    torch.manual_seed(cfg.seed)
    split = load_corpus(corpus or CorpusConfig(seed=cfg.seed))
    train_texts, val_texts = split.texts("train"), split.texts("val")
    preset = get_preset(cfg.preset)
    tokenizer = train_tokenizer(train_texts, cfg.vocab_size, model_max_length=preset.max_positions)
    train_stream = encode_documents(tokenizer, train_texts)
    val_stream = encode_documents(tokenizer, val_texts)
    val = eval_windows(val_stream, cfg.seq_len, max(1, cfg.val_tokens // cfg.seq_len))
    config = build_config(preset, len(tokenizer), tokenizer.eos_token_id)
    model = build_random_model(config, dtype=torch.float32, seed=cfg.seed, progress=False, trainable=True).train()
    geometry = find_moe_layers(model).geometry
    n_params = sum(p.numel() for p in model.parameters())
    logger.info("model %s, %s, %.2fM parameters; %d train tokens", cfg.preset, geometry, n_params / 1e6,
                train_stream.numel())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(cfg.seed)

    def validate(step: int) -> float:
        t = time.perf_counter()
        loss = evaluate_loss(model, val)
        evals.append({"step": step, "tokens": step * cfg.batch_size * cfg.seq_len,
                      "elapsed_s": round(time.perf_counter() - t0, 2), "val_loss": loss})
        return time.perf_counter() - t

    evals: list[dict] = []
    history: list[dict] = []
    eval_s = validate(0)
    reserve = 1.5 * eval_s + 15.0  # final validation + save, kept inside the budget
    loop_start = time.perf_counter()
    loop_budget = deadline - reserve - loop_start
    if loop_budget <= 0:
        raise ValueError(f"--minutes {cfg.minutes} leaves no time to train after preparation "
                         f"({loop_start - t0:.0f} s); give more minutes or --steps")
    bar = tqdm(total=cfg.steps or round(loop_budget), unit="step" if cfg.steps else "s", desc="train",
               disable=not progress)
    step, last_eval, window = 0, loop_start, []
    while True:
        now = time.perf_counter()
        progress_frac = step / cfg.steps if cfg.steps else (now - loop_start) / loop_budget
        if progress_frac >= 1.0:
            break
        factor = lr_factor(step, progress_frac, cfg)
        for group in opt.param_groups:
            group["lr"] = cfg.lr * factor
        x = random_windows(train_stream, cfg.batch_size, cfg.seq_len, gen)  # [B, T]
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
        due = (step % cfg.eval_every_steps == 0) if cfg.steps else (after - last_eval >= cfg.eval_every_s)
        if due and (cfg.steps or after + eval_s + reserve < deadline):
            validate(step)
            last_eval = time.perf_counter()
    bar.close()
    loop_s = time.perf_counter() - loop_start
    if evals[-1]["step"] != step:
        validate(step)
    model.eval()
    record = {
        "recipe": "python -m specmoe.reference.train --out DIR " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in asdict(cfg).items() if v is not None),
        "settings": asdict(cfg),
        "preset": {"name": cfg.preset, **asdict(preset)},
        "model_class": type(model).__name__,
        "geometry": geometry.to_dict(),
        "parameters": n_params,
        "corpus": split.describe(),
        "tokenizer": {"kind": "byte-level BPE (tokenizers)", "vocab_size": len(tokenizer),
                      "train_tokens": train_stream.numel(), "val_tokens": val_stream.numel()},
        "steps": step,
        "tokens_seen": step * cfg.batch_size * cfg.seq_len,
        "train_loop_s": round(loop_s, 1),
        "tokens_per_s": round(step * cfg.batch_size * cfg.seq_len / loop_s, 1),
        "val_windows": list(val.shape),
        "initial_val_loss": evals[0]["val_loss"],
        "final_val_loss": evals[-1]["val_loss"],
        "unigram_val_loss": unigram_loss(train_stream, val, len(tokenizer)),
        "evals": evals,
        "history": history,
        "environment": environment("cpu"),
    }
    _save(model, tokenizer, out, heldout_prompts(val_texts, cfg.num_prompts, cfg.prompt_chars), record)
    record["wall_time_s"] = round(time.perf_counter() - t0, 1)  # the whole run, the save included
    record["cpu_time_s"] = round(time.process_time() - cpu0, 1)  # all threads: what a shared machine gave us
    write_json(out / TRAINING_NAME, record)
    logger.info("saved %s in %.0f s", out, record["wall_time_s"])
    return record


def main(argv=None) -> int:
    defaults = TrainConfig()
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True, help="checkpoint directory to write (replaced)")
    for f in fields(TrainConfig):  # every setting is a flag, so training.json's recipe runs as written
        flag = f"--{f.name.replace('_', '-')}"
        if f.name == "preset":
            ap.add_argument(flag, default=defaults.preset, choices=sorted(PRESETS))
        elif f.name == "steps":
            ap.add_argument(flag, type=int, default=None, help="train this many steps instead of to a time budget")
        else:
            ap.add_argument(flag, type=type(getattr(defaults, f.name)), default=getattr(defaults, f.name))
    ap.add_argument("--corpus-root", type=Path, default=None, help="directory of *.py files (default: stdlib)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's; 1 is far faster on a machine shared with other jobs)")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})
    corpus = CorpusConfig(root=args.corpus_root, seed=cfg.seed)
    record = train(cfg, args.out, corpus, progress=not args.quiet)
    print(f"{record['steps']} steps, {record['tokens_seen']} tokens in {record['train_loop_s']} s; val loss "
          f"{record['initial_val_loss']:.3f} -> {record['final_val_loss']:.3f} (unigram "
          f"{record['unigram_val_loss']:.3f}); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
