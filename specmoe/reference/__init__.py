"""The project's own small MoE language model, trained here on local text: the built-in default model.

    from specmoe.reference import load_reference_model, load_reference_tokenizer
    model = load_reference_model()          # Qwen2MoeForCausalLM, 24 MoE layers x 60 experts, top-4

Modules: corpus (the standard library's sources, split by file), tokenizer (byte-level BPE), data (token
windows), model (presets, loading the packaged checkpoint), train (the recipe), evaluation (loss, unigram
baseline), routing_stats (is routing learned?), demo (`specmoe demo`).
"""

from .model import (PRESETS, ModelPreset, load_reference_model, load_reference_prompts,
                    load_reference_tokenizer)

__all__ = ["PRESETS", "ModelPreset", "load_reference_model", "load_reference_prompts", "load_reference_tokenizer"]
