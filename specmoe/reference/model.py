"""The reference MoE model: its shape presets and loading the packaged checkpoint.

The default preset is Qwen1.5-MoE-A2.7B's routing geometry (24 MoE layers, 60 routed experts, top-4, a
shared expert) in `Qwen2MoeForCausalLM` at a small hidden size. The checkpoint in `checkpoint/` was made by
`python -m specmoe.reference.train --out specmoe/reference/checkpoint`; its training.json says how.
"""

# Shape legend: L MoE layers, E experts, k top-k, H hidden, I expert intermediate

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ..io import read_json

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = Path(__file__).parent / "checkpoint"
PROMPTS_NAME = "prompts.json"
TRAINING_NAME = "training.json"
_REBUILD = "python -m specmoe.reference.train --out specmoe/reference/checkpoint"


@dataclass(frozen=True)
class ModelPreset:
    """Shape of a reference model.

    Args:
        architecture: transformers `model_type` ("qwen2_moe", "olmoe" or "mixtral").
        num_layers: L, decoder layers, every one an MoE layer.
        num_experts: E, routed experts per layer.
        top_k: k, experts per token.
        hidden_size: H.
        expert_intermediate: I, width of one routed expert.
        shared_intermediate: width of the shared expert (qwen2_moe only; 0 for none).
        num_heads: attention heads (head size H / num_heads).
        max_positions: the longest sequence.
        router_aux_loss_coef: weight of the load-balancing loss in training.
    """

    architecture: str
    num_layers: int
    num_experts: int
    top_k: int
    hidden_size: int = 64
    expert_intermediate: int = 32
    shared_intermediate: int = 0
    num_heads: int = 4
    max_positions: int = 512
    router_aux_loss_coef: float = 0.01

    def __post_init__(self):
        if self.architecture not in ("qwen2_moe", "olmoe", "mixtral"):
            raise ValueError(f"ModelPreset.architecture must be qwen2_moe, olmoe or mixtral, got {self.architecture!r}")
        if self.shared_intermediate and self.architecture != "qwen2_moe":
            raise ValueError("ModelPreset.shared_intermediate needs architecture='qwen2_moe'; set it to 0")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"ModelPreset.top_k must be in 1..num_experts ({self.num_experts}), got {self.top_k}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"ModelPreset.hidden_size ({self.hidden_size}) must be a multiple of num_heads "
                             f"({self.num_heads})")
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"ModelPreset.router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")


PRESETS: dict[str, ModelPreset] = {
    # Qwen1.5-MoE-A2.7B's routing: 24 layers x 60 experts, top-4, shared expert 4x a routed one.
    "qwen1.5-moe": ModelPreset("qwen2_moe", 24, 60, 4, expert_intermediate=32, shared_intermediate=128),
    # OLMoE-1B-7B's routing: 16 layers x 64 experts, top-8.
    "olmoe": ModelPreset("olmoe", 16, 64, 8, expert_intermediate=32),
    # Mixtral-8x7B's routing: 32 layers x 8 experts, top-2 (few, wide experts).
    "mixtral": ModelPreset("mixtral", 32, 8, 2, expert_intermediate=128),
}


def get_preset(name: str) -> ModelPreset:
    """The preset called `name`. Raises ValueError naming the known ones."""
    if name not in PRESETS:
        raise ValueError(f"unknown reference model preset {name!r}; known: {sorted(PRESETS)}")
    return PRESETS[name]


def build_config(preset: ModelPreset, vocab_size: int, eos_token_id: int):
    """A transformers config of `preset`'s shape (weights tied, eos = pad = `eos_token_id`)."""
    from transformers import AutoConfig

    p = preset
    common = dict(
        vocab_size=vocab_size, hidden_size=p.hidden_size, num_hidden_layers=p.num_layers,
        num_attention_heads=p.num_heads, num_key_value_heads=p.num_heads, head_dim=p.hidden_size // p.num_heads,
        max_position_embeddings=p.max_positions, tie_word_embeddings=True, num_experts_per_tok=p.top_k,
        router_aux_loss_coef=p.router_aux_loss_coef, output_router_logits=False,
        bos_token_id=eos_token_id, eos_token_id=eos_token_id, pad_token_id=eos_token_id,
    )
    if p.architecture == "qwen2_moe":
        extra = dict(num_experts=p.num_experts, moe_intermediate_size=p.expert_intermediate,
                     shared_expert_intermediate_size=p.shared_intermediate, intermediate_size=p.shared_intermediate,
                     decoder_sparse_step=1, mlp_only_layers=[], norm_topk_prob=False)
    elif p.architecture == "olmoe":
        extra = dict(num_experts=p.num_experts, intermediate_size=p.expert_intermediate, norm_topk_prob=False)
    else:
        extra = dict(num_local_experts=p.num_experts, intermediate_size=p.expert_intermediate)
    return AutoConfig.for_model(p.architecture, **common, **extra)


def _checked_dir(path) -> Path:
    path = Path(path) if path is not None else CHECKPOINT_DIR
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        f = path / name
        if not f.is_file():
            raise FileNotFoundError(f"the reference checkpoint is incomplete: {f} is missing; "
                                    f"rebuild it with `{_REBUILD}` (about 10 minutes on 2 CPU cores)")
    with open(path / "model.safetensors", "rb") as f:
        if f.read(64).startswith(b"version https://git-lfs"):
            raise ValueError(f"{path / 'model.safetensors'} is a Git LFS pointer, not the weights; run "
                             f"`git lfs pull` or rebuild it with `{_REBUILD}`")
    return path


def default_dtype(device) -> torch.dtype:
    """float32 on CPU (fast matmuls there), bfloat16 on accelerators."""
    return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16


def load_reference_model(device=None, dtype: torch.dtype | None = None, path=None) -> torch.nn.Module:
    """Load the packaged reference model (nothing is downloaded).

    Args:
        device: where to put it (default: CPU; `SpeculativeMoE` moves what it needs to its own device).
        dtype: weights' dtype (default: float32 on CPU, bfloat16 elsewhere; the checkpoint is bfloat16).
        path: another checkpoint directory written by `specmoe.reference.train`.

    Returns:
        The `Qwen2MoeForCausalLM` (or the preset's class) in eval mode.

    Raises:
        FileNotFoundError: the checkpoint is missing (the message says how to rebuild it).
        ValueError: the weights file is a Git LFS pointer.
    """
    from transformers import AutoModelForCausalLM

    path = _checked_dir(path)
    device = torch.device(device if device is not None else "cpu")
    dtype = dtype or default_dtype(device)
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    logger.info("loaded the reference model from %s (%s, %s)", path, dtype, device)
    return model.to(device).eval()


def load_reference_tokenizer(path=None):
    """The reference model's BPE tokenizer, a `PreTrainedTokenizerFast`.

    Raises:
        FileNotFoundError: the checkpoint is missing.
    """
    from .tokenizer import load_tokenizer

    return load_tokenizer(_checked_dir(path))


def load_reference_prompts(path=None) -> list[str]:
    """Held-out snippets saved with the checkpoint (from validation files, never trained on).

    Raises:
        FileNotFoundError / ValueError: prompts.json is missing or malformed.
    """
    path = Path(path) if path is not None else CHECKPOINT_DIR
    data = read_json(path / PROMPTS_NAME, what="reference prompts")
    prompts = data.get("prompts") if isinstance(data, dict) else None
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"{path / PROMPTS_NAME} has no list of prompt strings under 'prompts'")
    return prompts
