"""Published MoE models the simulator knows: the config.json values their shapes are derived from.

Each entry is the subset of the model's config.json that `ModelShape.from_config` needs, copied from the file
named in `source` (the parameter counts they give match each model card's total).
"""

_HF = "https://huggingface.co/{}/blob/main/config.json"

PRESETS: dict[str, dict] = {
    "qwen1.5-moe-a2.7b": {
        "source": _HF.format("Qwen/Qwen1.5-MoE-A2.7B"),
        "config": dict(model_type="qwen2_moe", vocab_size=151936, hidden_size=2048, intermediate_size=5632,
                       num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16, num_experts=60,
                       num_experts_per_tok=4, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
                       decoder_sparse_step=1, mlp_only_layers=[], qkv_bias=True, tie_word_embeddings=False),
    },
    "mixtral-8x7b": {
        "source": _HF.format("mistralai/Mixtral-8x7B-v0.1"),
        "config": dict(model_type="mixtral", vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, num_local_experts=8,
                       num_experts_per_tok=2, tie_word_embeddings=False),
    },
    "olmoe-1b-7b": {
        "source": _HF.format("allenai/OLMoE-1B-7B-0924"),
        "config": dict(model_type="olmoe", vocab_size=50304, hidden_size=2048, intermediate_size=1024,
                       num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16, num_experts=64,
                       num_experts_per_tok=8, attention_bias=False, tie_word_embeddings=False),
    },
    "qwen3-30b-a3b": {
        "source": _HF.format("Qwen/Qwen3-30B-A3B"),
        "config": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                       num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                       num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, decoder_sparse_step=1,
                       mlp_only_layers=[], attention_bias=False, tie_word_embeddings=False),
    },
    "deepseek-v2-lite": {
        "source": _HF.format("deepseek-ai/DeepSeek-V2-Lite"),
        "config": dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                       num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64,
                       n_shared_experts=2, num_experts_per_tok=6, moe_intermediate_size=1408, first_k_dense_replace=1,
                       kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64,
                       v_head_dim=128, tie_word_embeddings=False),
    },
    "gpt-oss-20b": {
        "source": _HF.format("openai/gpt-oss-20b") + " (experts stored in MXFP4, the rest bf16)",
        "expert_dtype": "mxfp4",
        "config": dict(model_type="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880,
                       num_hidden_layers=24, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                       num_local_experts=32, num_experts_per_tok=4, attention_bias=True, sliding_window=128,
                       tie_word_embeddings=False,
                       layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(24)]),
    },
}
