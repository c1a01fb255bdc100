"""Published MoE models the simulator knows: the config.json values their shapes are derived from.

Each entry is the subset of the model's config.json that `ModelShape.from_config` needs, copied from the file
named in `source` (the parameter counts they give match each model card's total). Where the config.json could
not be read here (no network), `source` also names where the values were checked: transformers' own config
class, whose defaults are that model, or a public file found by search.
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
    "gpt-oss-120b": {
        "source": _HF.format("openai/gpt-oss-120b") + " (values = transformers 5.24 GptOssConfig defaults, 'similar "
                  "to GPT-OSS-120B'; experts in MXFP4 as published, quantization_config quant_method mxfp4)",
        "config": dict(model_type="gpt_oss", vocab_size=201088, hidden_size=2880, intermediate_size=2880,
                       num_hidden_layers=36, num_attention_heads=64, num_key_value_heads=8, head_dim=64,
                       num_local_experts=128, num_experts_per_tok=4, attention_bias=True, sliding_window=128,
                       tie_word_embeddings=False, quantization_config={"quant_method": "mxfp4"},
                       layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(36)]),
    },
    "glm-4.5-air": {
        "source": _HF.format("zai-org/GLM-4.5-Air") + " (transformers 5.24 Glm4MoeConfig defaults are this model; "
                  "head_dim 128, attention_bias true as in zyzshishui/slime scripts/models/glm4.5-106B-A12B.sh "
                  "--kv-channels 128 --add-qkv-bias; its 1 MTP layer is not counted)",
        "config": dict(model_type="glm4_moe", vocab_size=151552, hidden_size=4096, intermediate_size=10944,
                       num_hidden_layers=46, num_attention_heads=96, num_key_value_heads=8, head_dim=128,
                       partial_rotary_factor=0.5, attention_bias=True, moe_intermediate_size=1408,
                       num_experts_per_tok=8, n_shared_experts=1, n_routed_experts=128, n_group=1, topk_group=1,
                       first_k_dense_replace=1, use_qk_norm=False, tie_word_embeddings=False),
    },
    "qwen3-235b-a22b": {
        "source": _HF.format("Qwen/Qwen3-235B-A22B") + " (94 layers, 64 Q / 4 KV heads, 128 experts, 8 active as "
                  "the model card; hidden 4096, ffn 12288, moe ffn 1536, kv-channels 128, vocab 151936 as in "
                  "zyzshishui/slime scripts/models/qwen3-235B-A22B.sh)",
        "config": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                       num_hidden_layers=94, num_attention_heads=64, num_key_value_heads=4, head_dim=128,
                       num_experts=128, num_experts_per_tok=8, moe_intermediate_size=1536, decoder_sparse_step=1,
                       mlp_only_layers=[], attention_bias=False, tie_word_embeddings=False),
    },
    "deepseek-v3": {
        "source": _HF.format("deepseek-ai/DeepSeek-V3") + " (values = transformers 5.24 DeepseekV3Config defaults, "
                  "'similar to DeepSeek-V3'; FP8 e4m3 experts with 128x128 weight_scale_inv blocks as published, "
                  "quantization_config quant_method fp8; the 1 MTP layer of the 685B checkpoint not counted)",
        "config": dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                       moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
                       num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256, kv_lora_rank=512,
                       q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8,
                       topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3, tie_word_embeddings=False,
                       quantization_config={"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                            "weight_block_size": [128, 128]}),
    },
    "qwen3-next-80b-a3b": {
        "source": _HF.format("Qwen/Qwen3-Next-80B-A3B-Instruct") + " (values = transformers 5.24 Qwen3NextConfig "
                  "defaults but intermediate_size 5120 as the published config.json; 3 Gated-DeltaNet layers per "
                  "full-attention layer)",
        "config": dict(model_type="qwen3_next", vocab_size=151936, hidden_size=2048, intermediate_size=5120,
                       num_hidden_layers=48, num_attention_heads=16, num_key_value_heads=2, head_dim=256,
                       linear_conv_kernel_dim=4, linear_key_head_dim=128, linear_value_head_dim=128,
                       linear_num_key_heads=16, linear_num_value_heads=32, decoder_sparse_step=1,
                       moe_intermediate_size=512, shared_expert_intermediate_size=512, num_experts_per_tok=10,
                       num_experts=512, mlp_only_layers=[], tie_word_embeddings=False,
                       layer_types=["full_attention" if (i + 1) % 4 == 0 else "linear_attention" for i in range(48)]),
    },
    "llama-4-scout": {
        "source": _HF.format("meta-llama/Llama-4-Scout-17B-16E") + " text_config (values = transformers 5.24 "
                  "Llama4TextConfig defaults, which are Scout's; the 109B of the model card includes the vision "
                  "encoder)",
        "config": dict(model_type="llama4_text", vocab_size=202048, hidden_size=5120, intermediate_size=8192,
                       intermediate_size_mlp=16384, num_hidden_layers=48, num_attention_heads=40,
                       num_key_value_heads=8, head_dim=128, num_experts_per_tok=1, num_local_experts=16,
                       interleave_moe_layer_step=1, use_qk_norm=True, attention_chunk_size=8192,
                       tie_word_embeddings=False,
                       layer_types=["full_attention" if (i + 1) % 4 == 0 else "chunked_attention" for i in range(48)]),
    },
}
