"""Model shapes for the simulator: parameter, byte and FLOP counts of real MoE models, from their configs.

Each preset holds the values of the model's published config.json (the file is named in its `source`), and
`ModelShape.from_config` derives every count the way transformers 5 builds that family, so the same code
gives the parameter count of a live model (the tests check it against tiny models of each family).
"""

# Shape legend: T tokens, E experts, H hidden, I expert intermediate, k top-k, L MoE layers, S slots

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from ..geometry import MoEGeometry
from ..kernels.prequant import PrequantFormat
from ..runtime.adapters import ExpertTensorSpec
from ..runtime.compression import make_codec
from ..runtime.prequant_layout import expert_specs_as, prequant_values
from ..runtime.store import ExpertLayout
from .published import PRESETS

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
EXPERT_DTYPES = (*DTYPE_BYTES, "mxfp4", "fp8-b128", "gptq-int4-g128")  # and fp8-b<B>, gptq-int4-g<G>
_TORCH_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass(frozen=True)
class ModelShape:
    """Sizes of one MoE model. Parameter counts are per layer unless named otherwise.

    Build it with `ModelShape.from_name("qwen1.5-moe-a2.7b")` or `ModelShape.from_config(config)`.
    """

    name: str
    model_type: str
    num_layers: int  # decoder layers, dense ones included
    moe_layers: int  # L
    hidden_size: int  # H
    num_experts: int  # E
    top_k: int  # k
    moe_intermediate_size: int  # I
    vocab_size: int
    attention_params: int  # one layer's attention block (projections, norms inside it, biases)
    norm_params: int  # one layer's norms outside attention
    router_params: int  # one MoE layer's router (weight and bias)
    shared_params: int  # one MoE layer's shared experts (0 if none) and their gate
    dense_mlp_params: int  # one dense layer's MLP (0 if none)
    embed_params: int
    lm_head_params: int  # 0 when tied to the embedding
    final_norm_params: int
    expert_specs: tuple[ExpertTensorSpec, ...]  # one expert's tensors as the runtime stores them
    kv_values_per_token: int  # per layer, K and V together
    attention_heads: int
    attention_head_dim: int  # query/key width per head, for the score FLOPs
    dtype: str = "bf16"  # everything but the routed experts
    expert_dtype: str = "bf16"
    sliding_window: int = 0  # 0: none
    sliding_layers: int = 0  # layers with a sliding window (their KV stops growing)
    compression: str = "none"  # experts in store and slots: "none", "int8", "int4-g128", ... (runtime.compression)
    other_params: int = 0  # non-expert parameters the per-layer counts leave out (layers that differ, MTP heads)
    source: str = ""
    config: dict = field(default_factory=dict, compare=False)  # the config values it was built from

    def __post_init__(self):
        ints = ("num_layers", "moe_layers", "hidden_size", "num_experts", "top_k", "moe_intermediate_size",
                "vocab_size", "attention_params", "embed_params", "kv_values_per_token", "attention_heads",
                "attention_head_dim")
        for name in ints:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelShape.{name} must be a positive int, got {value!r}")
        for name in ("norm_params", "router_params", "shared_params", "dense_mlp_params", "lm_head_params",
                     "final_norm_params", "sliding_window", "sliding_layers", "other_params"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ModelShape.{name} must be an int >= 0, got {value!r}")
        if self.moe_layers > self.num_layers:
            raise ValueError(f"ModelShape {self.name}: {self.moe_layers} MoE layers but only {self.num_layers} layers")
        if self.top_k > self.num_experts:
            raise ValueError(f"ModelShape {self.name}: top_k {self.top_k} exceeds num_experts {self.num_experts}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"ModelShape.dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.expert_dtype not in DTYPE_BYTES and PrequantFormat.parse(self.expert_dtype) is None:
            raise ValueError(f"ModelShape.expert_dtype must be one of {EXPERT_DTYPES}, got {self.expert_dtype!r}")
        if not self.expert_specs:
            raise ValueError(f"ModelShape {self.name}: an expert needs at least one tensor")
        if self.sliding_layers > self.num_layers:
            raise ValueError(f"ModelShape {self.name}: more sliding-window layers than layers")
        if self.compression != "none":
            self.transfer_bytes  # noqa: B018 -- a bad scheme or an incompressible expert fails here

    # ---- derived sizes -------------------------------------------------------------------------------
    @property
    def geometry(self) -> MoEGeometry:
        return MoEGeometry(self.moe_layers, self.num_experts, self.top_k, self.hidden_size)

    @property
    def dense_layers(self) -> int:
        return self.num_layers - self.moe_layers

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def expert_params(self) -> int:
        """Parameters of one routed expert (a pre-quantized matrix counts its values, not its scales)."""
        fmt = PrequantFormat.parse(self.expert_dtype)
        if fmt is None:
            return sum(_numel(spec.shape) for spec in self.expert_specs)
        return sum(prequant_values(fmt, spec) for spec in self.expert_specs)

    @property
    def expert_bytes(self) -> int:
        """Bytes of one routed expert's tensors, unpadded."""
        return sum(s.nbytes for s in self.expert_specs)

    @property
    def uncompressed_slot_bytes(self) -> int:
        """Bytes of one expert in its own layout as the runtime lays it out (tensors 256-B aligned)."""
        return ExpertLayout(self.expert_specs).nbytes

    @property
    def slot_bytes(self) -> int:
        """Bytes of one cache slot / host buffer: the expert's layout, or its compressed layout (compressed
        experts stay compressed in the store, over PCIe and in the slots)."""
        codec = make_codec(self.compression, ExpertLayout(self.expert_specs))
        return codec.layout.nbytes if codec else self.uncompressed_slot_bytes

    @property
    def transfer_bytes(self) -> int:
        """Bytes one expert copy moves host->device: one slot."""
        return self.slot_bytes

    def compressed(self, scheme: str) -> "ModelShape":
        """The same model with its experts compressed as `scheme` (store and slots), named "<name>+<scheme>"."""
        base = self.name.partition("+")[0]
        return replace(self, name=base if scheme == "none" else f"{base}+{scheme}", compression=scheme)

    def with_routing(self, moe_layers: int, num_experts: int, top_k: int) -> "ModelShape":
        """This model's layer sizes with another routing geometry (L, E, k), named "<name>@L<L>-E<E>-k<k>": the
        shape a trace of that geometry replays on when no published model has it (its source says so)."""
        per_expert_router = self.router_params // self.num_experts
        return replace(self, name=f"{self.name}@L{moe_layers}-E{num_experts}-k{top_k}", moe_layers=moe_layers,
                       num_layers=self.dense_layers + moe_layers, num_experts=num_experts, top_k=top_k,
                       router_params=per_expert_router * num_experts,
                       sliding_layers=min(self.sliding_layers, self.dense_layers + moe_layers),
                       source=f"assumed: {self.name}'s layer and expert sizes with the routing geometry L={moe_layers} "
                              f"E={num_experts} k={top_k} (no published shape has it; pass --shape-config)")

    @property
    def routed_expert_params(self) -> int:
        return self.moe_layers * self.num_experts * self.expert_params

    @property
    def routed_expert_bytes(self) -> int:
        return self.moe_layers * self.num_experts * self.expert_bytes

    @property
    def layer_nonexpert_params(self) -> int:
        """One MoE layer without its routed experts: attention, norms, router, shared experts."""
        return self.attention_params + self.norm_params + self.router_params + self.shared_params

    @property
    def nonexpert_params(self) -> int:
        """Everything but the routed experts: what stays on the device when they are offloaded."""
        return (self.moe_layers * self.layer_nonexpert_params
                + self.dense_layers * (self.attention_params + self.norm_params + self.dense_mlp_params)
                + self.embed_params + self.lm_head_params + self.final_norm_params + self.other_params)

    @property
    def nonexpert_bytes(self) -> int:
        return self.nonexpert_params * self.dtype_bytes

    @property
    def total_params(self) -> int:
        return self.nonexpert_params + self.routed_expert_params

    @property
    def total_bytes(self) -> int:
        return self.nonexpert_bytes + self.routed_expert_bytes

    @property
    def active_params(self) -> int:
        """Parameters one token reads: everything but the routed experts it is not routed to."""
        return self.nonexpert_params + self.moe_layers * self.top_k * self.expert_params

    def kv_bytes(self, context: int) -> int:
        """KV cache bytes for one sequence of `context` tokens (sliding-window layers capped)."""
        full = self.num_layers - self.sliding_layers
        windowed = min(context, self.sliding_window) if self.sliding_window else context
        return (full * context + self.sliding_layers * windowed) * self.kv_values_per_token * self.dtype_bytes

    def to_dict(self) -> dict:
        out = asdict(self)
        out["expert_specs"] = [{"name": s.name, "shape": list(s.shape), "dtype": str(s.dtype)} for s in self.expert_specs]
        out.update(expert_bytes=self.expert_bytes, slot_bytes=self.slot_bytes, transfer_bytes=self.transfer_bytes,
                   uncompressed_slot_bytes=self.uncompressed_slot_bytes,
                   nonexpert_bytes=self.nonexpert_bytes,
                   total_params=self.total_params, active_params=self.active_params)
        return out

    def summary(self) -> str:
        return (f"{self.name}: {self.total_params / 1e9:.2f}B params ({self.active_params / 1e9:.2f}B active), "
                f"L={self.moe_layers} E={self.num_experts} k={self.top_k}, expert {self.expert_bytes / 2**20:.2f} MiB "
                f"({self.expert_dtype}), non-expert {self.nonexpert_bytes / 2**30:.2f} GiB")

    # ---- construction ------------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, expert_dtype: str | None = None) -> "ModelShape":
        """A published model by name (see `PRESETS`), optionally with its experts in another dtype.

        Raises:
            ValueError: an unknown name; the message lists the known ones.
        """
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"unknown model shape {name!r}; choose one of {sorted(PRESETS)}")
        preset = PRESETS[key]
        return cls.from_config(preset["config"], name=key, source=preset["source"],
                               expert_dtype=expert_dtype or preset.get("expert_dtype"))

    @classmethod
    def from_config(cls, config: Any, name: str | None = None, source: str = "", dtype: str = "bf16",
                    expert_dtype: str | None = None) -> "ModelShape":
        """The shape of a transformers config (a PretrainedConfig or a plain dict of config.json values).

        The families in `FAMILIES` are counted by formula; any other MoE model type transformers knows is built
        on the meta device and counted (`sim.meta_shape`). The experts' dtype is read from the config's
        `quantization_config` (MXFP4, block-scaled FP8, GPTQ int4) unless `expert_dtype` says otherwise.

        Raises:
            ValueError: a config without a model type transformers knows, or without MoE layers specmoe finds.
        """
        values = config if isinstance(config, dict) else config.to_dict()
        quant = values.get("quantization_config")
        if values.get("hidden_size") is None and isinstance(values.get("text_config"), dict):
            values = dict(values["text_config"])  # a multimodal wrapper: its language model
            if quant and "quantization_config" not in values:
                values["quantization_config"] = quant
        model_type = values.get("model_type")
        if expert_dtype is None:
            fmt = PrequantFormat.from_quantization_config(values.get("quantization_config"))
            expert_dtype = str(fmt) if fmt is not None else "bf16"
        if model_type in FAMILIES:
            counts = FAMILIES[model_type](_Cfg(values))
            specs = counts.pop("expert_specs")(expert_dtype)
        else:
            from .meta_shape import count_on_meta

            counts = count_on_meta(values)
            specs = expert_specs_as(counts.pop("expert_specs"), expert_dtype, counts.pop("transposed"))
        return cls(name=name or model_type, model_type=model_type, dtype=dtype, expert_dtype=expert_dtype,
                   expert_specs=specs, source=source, config=dict(values), **counts)

    @classmethod
    def from_file(cls, path, name: str | None = None, expert_dtype: str | None = None) -> "ModelShape":
        """The shape of a config.json file (or of a model directory holding one), named after its directory.

        Raises:
            FileNotFoundError: no config.json there. ValueError: not JSON, or a config `from_config` refuses.
        """
        import json
        from pathlib import Path

        path = Path(path)
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise FileNotFoundError(f"no config.json at {path}")
        try:
            values = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not a JSON config: {err}") from None
        if not isinstance(values, dict):
            raise ValueError(f"{path} is not a JSON object (a transformers config.json)")
        return cls.from_config(values, name=name or path.parent.name or path.stem, source=str(path),
                               expert_dtype=expert_dtype)

    def to_config(self, **overrides):
        """A transformers config of this model (for building it on the meta device), with `overrides` applied."""
        from transformers import AutoConfig

        values = {k: v for k, v in self.config.items() if k not in ("model_type", "architectures", "transformers_version")}
        values.update(overrides)
        return AutoConfig.for_model(self.model_type, **values)


class _Cfg:
    """Config values with the defaults transformers uses when a key is absent."""

    def __init__(self, values: dict):
        self.v = values

    def get(self, key, default=None):
        value = self.v.get(key)
        return default if value is None else value

    def __getitem__(self, key):
        if self.v.get(key) is None:
            raise ValueError(f"config has no {key!r}; it is needed to count this model's parameters")
        return self.v[key]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _glu_expert_specs(hidden: int, inter: int, transposed: bool = False, bias: bool = False):
    """Fused experts as transformers stores them: gate_up [2I, H] and down [H, I] (or transposed), + biases."""

    def make(expert_dtype: str) -> tuple[ExpertTensorSpec, ...]:
        gate_up = (hidden, 2 * inter) if transposed else (2 * inter, hidden)
        down = (inter, hidden) if transposed else (hidden, inter)
        f = torch.float32
        specs = [ExpertTensorSpec("gate_up_proj", gate_up, f), ExpertTensorSpec("down_proj", down, f)]
        if bias:
            specs += [ExpertTensorSpec("gate_up_proj_bias", (2 * inter,), f),
                      ExpertTensorSpec("down_proj_bias", (hidden,), f)]
        return expert_specs_as(specs, expert_dtype, transposed)

    return make


def _gqa(c: _Cfg, qkv_bias: bool, o_bias: bool, q_norm: int = 0, k_norm: int = 0, sinks: bool = False):
    """Attention params, KV values per token, heads and head dim of grouped-query attention."""
    H, nh = c["hidden_size"], c["num_attention_heads"]
    nkv = c.get("num_key_value_heads", nh)
    hd = c.get("head_dim", H // nh)
    q, kv = nh * hd, nkv * hd
    params = H * q + 2 * H * kv + q * H + (q + 2 * kv if qkv_bias else 0) + (H if o_bias else 0)
    params += q_norm + k_norm + (nh if sinks else 0)
    return params, 2 * kv, nh, hd


def _moe_common(c: _Cfg, attention, num_experts: int, moe_layers: int, inter: int, specs, router_bias=False,
                shared: int = 0, dense_mlp: int = 0, lm_tied=None):
    H, V = c["hidden_size"], c["vocab_size"]
    attn, kv_values, heads, head_dim = attention
    tied = c.get("tie_word_embeddings", False) if lm_tied is None else lm_tied
    return dict(
        num_layers=c["num_hidden_layers"], moe_layers=moe_layers, hidden_size=H, num_experts=num_experts,
        top_k=c["num_experts_per_tok"], moe_intermediate_size=inter, vocab_size=V, attention_params=attn,
        norm_params=2 * H, router_params=num_experts * H + (num_experts if router_bias else 0), shared_params=shared,
        dense_mlp_params=dense_mlp, embed_params=V * H, lm_head_params=0 if tied else V * H, final_norm_params=H,
        expert_specs=specs, kv_values_per_token=kv_values, attention_heads=heads, attention_head_dim=head_dim,
    )


def _qwen2_moe(c: _Cfg):
    H, L = c["hidden_size"], c["num_hidden_layers"]
    step, only = c.get("decoder_sparse_step", 1), set(c.get("mlp_only_layers", []))
    moe = sum(1 for i in range(L) if i not in only and step > 0 and (i + 1) % step == 0)
    shared_i = c.get("shared_expert_intermediate_size", 0)
    shared = 3 * H * shared_i + H if shared_i else 0  # gate/up/down + shared_expert_gate [1, H]
    out = _moe_common(c, _gqa(c, qkv_bias=c.get("qkv_bias", True), o_bias=False), c["num_experts"], moe,
                      c["moe_intermediate_size"], _glu_expert_specs(H, c["moe_intermediate_size"]), shared=shared,
                      dense_mlp=3 * H * c["intermediate_size"] if moe < L else 0)
    return out


def _qwen3_moe(c: _Cfg):
    H, L = c["hidden_size"], c["num_hidden_layers"]
    hd = c.get("head_dim", H // c["num_attention_heads"])
    step, only = c.get("decoder_sparse_step", 1), set(c.get("mlp_only_layers", []))
    moe = sum(1 for i in range(L) if i not in only and step > 0 and (i + 1) % step == 0)
    E = c.get("num_experts", c.get("num_local_experts"))
    return _moe_common(c, _gqa(c, qkv_bias=c.get("attention_bias", False), o_bias=c.get("attention_bias", False),
                               q_norm=hd, k_norm=hd), E, moe, c["moe_intermediate_size"],
                       _glu_expert_specs(H, c["moe_intermediate_size"]),
                       dense_mlp=3 * H * c["intermediate_size"] if moe < L else 0)


def _mixtral(c: _Cfg):
    H = c["hidden_size"]
    return _moe_common(c, _gqa(c, qkv_bias=False, o_bias=False), c["num_local_experts"], c["num_hidden_layers"],
                       c["intermediate_size"], _glu_expert_specs(H, c["intermediate_size"]))


def _olmoe(c: _Cfg):
    H, nh = c["hidden_size"], c["num_attention_heads"]
    hd = c.get("head_dim", H // nh)
    nkv = c.get("num_key_value_heads", nh)
    bias = c.get("attention_bias", False)
    return _moe_common(c, _gqa(c, qkv_bias=bias, o_bias=bias, q_norm=nh * hd, k_norm=nkv * hd), c["num_experts"],
                       c["num_hidden_layers"], c["intermediate_size"], _glu_expert_specs(H, c["intermediate_size"]))


def _gpt_oss(c: _Cfg):
    H = c["hidden_size"]
    bias = c.get("attention_bias", True)
    out = _moe_common(c, _gqa(c, qkv_bias=bias, o_bias=bias, sinks=True), c["num_local_experts"],
                      c["num_hidden_layers"], c["intermediate_size"],
                      _glu_expert_specs(H, c["intermediate_size"], transposed=True, bias=True), router_bias=True)
    types = c.get("layer_types", None) or ["sliding_attention" if i % 2 == 0 else "full_attention"
                                           for i in range(c["num_hidden_layers"])]
    out.update(sliding_window=c.get("sliding_window", 0), sliding_layers=sum(t == "sliding_attention" for t in types))
    return out


def _deepseek_v2(c: _Cfg):
    """Multi-head latent attention (HF caches the decompressed K and V) + shared experts + dense first layers."""
    H, nh, L = c["hidden_size"], c["num_attention_heads"], c["num_hidden_layers"]
    nope, rope, vd = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    q_rank, kv_rank = c.get("q_lora_rank", 0), c["kv_lora_rank"]
    qd = nope + rope
    q = (H * q_rank + q_rank + q_rank * nh * qd) if q_rank else H * nh * qd
    kv = H * (kv_rank + rope) + kv_rank + kv_rank * nh * (nope + vd)
    attn = q + kv + nh * vd * H
    first_dense = c.get("first_k_dense_replace", 0)
    I = c["moe_intermediate_size"]
    shared = 3 * H * I * c.get("n_shared_experts", 0)
    return _moe_common(c, (attn, nh * (qd + vd), nh, qd), c["n_routed_experts"], L - first_dense, I,
                       _glu_expert_specs(H, I), shared=shared,
                       dense_mlp=3 * H * c["intermediate_size"] if first_dense else 0)


def _glm4_moe(c: _Cfg):
    """GLM-4.5: grouped-query attention (q/k/v biases with attention_bias, optional q/k norms), shared experts,
    dense first layers."""
    H, L, I = c["hidden_size"], c["num_hidden_layers"], c["moe_intermediate_size"]
    hd = c.get("head_dim", H // c["num_attention_heads"])
    qk_norm = hd if c.get("use_qk_norm", False) else 0
    first_dense = c.get("first_k_dense_replace", 0)
    return _moe_common(c, _gqa(c, qkv_bias=c.get("attention_bias", False), o_bias=False, q_norm=qk_norm,
                               k_norm=qk_norm), c["n_routed_experts"], L - first_dense, I, _glu_expert_specs(H, I),
                       shared=3 * H * I * c.get("n_shared_experts", 0),
                       dense_mlp=3 * H * c["intermediate_size"] if first_dense else 0)


def _qwen3_next(c: _Cfg):
    """Qwen3-Next: Gated DeltaNet (linear attention, a fixed state instead of KV) in 3 of 4 layers, gated
    full attention in the others; per-layer attention and KV are averages over the layers (the remainder of the
    attention average is `other_params`)."""
    H, L = c["hidden_size"], c["num_hidden_layers"]
    nh, nkv = c["num_attention_heads"], c.get("num_key_value_heads", c["num_attention_heads"])
    hd = c.get("head_dim", H // nh)
    types = c.get("layer_types", None) or ["full_attention" if (i + 1) % c.get("full_attention_interval", 4) == 0
                                           else "linear_attention" for i in range(L)]
    full = sum(t == "full_attention" for t in types)
    nk, nv = c["linear_num_key_heads"], c["linear_num_value_heads"]
    dk, dv = c["linear_key_head_dim"], c["linear_value_head_dim"]
    key, value = nk * dk, nv * dv
    linear = (H * (2 * key + 2 * value) + H * 2 * nv + (2 * key + value) * c.get("linear_conv_kernel_dim", 4)
              + 2 * nv + dv + value * H)
    gated = 2 * H * nh * hd + 2 * H * nkv * hd + nh * hd * H + 2 * hd
    attention = full * gated + (L - full) * linear
    step, only = c.get("decoder_sparse_step", 1), set(c.get("mlp_only_layers", []))
    moe = sum(1 for i in range(L) if i not in only and step > 0 and (i + 1) % step == 0)
    shared_i = c.get("shared_expert_intermediate_size", 0)
    out = _moe_common(c, (attention // L, -(-2 * nkv * hd * full // L), nh, hd), c["num_experts"], moe,
                      c["moe_intermediate_size"], _glu_expert_specs(H, c["moe_intermediate_size"]),
                      shared=3 * H * shared_i + H if shared_i else 0,
                      dense_mlp=3 * H * c["intermediate_size"] if moe < L else 0)
    out["other_params"] = attention - L * (attention // L)
    return out


def _llama4_text(c: _Cfg):
    """Llama-4's text model: MoE every `interleave_moe_layer_step` layers (routed experts stored transposed,
    [H, 2I] and [I, H]) with a shared expert; dense layers use `intermediate_size_mlp`; chunked-attention layers
    keep `attention_chunk_size` tokens of KV."""
    H, L, I = c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"]
    step = c.get("interleave_moe_layer_step", 1)
    moe_layers = c.get("moe_layers", None) or list(range(step - 1, L, step))
    out = _moe_common(c, _gqa(c, qkv_bias=c.get("attention_bias", False), o_bias=c.get("attention_bias", False)),
                      c["num_local_experts"], len(moe_layers), I, _glu_expert_specs(H, I, transposed=True),
                      shared=3 * H * I, dense_mlp=3 * H * c["intermediate_size_mlp"] if len(moe_layers) < L else 0)
    types = c.get("layer_types", None) or []
    out.update(sliding_window=c.get("attention_chunk_size", 0),
               sliding_layers=sum(t == "chunked_attention" for t in types))
    return out


FAMILIES = {"qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe, "mixtral": _mixtral, "olmoe": _olmoe,
            "gpt_oss": _gpt_oss, "deepseek_v2": _deepseek_v2, "deepseek_v3": _deepseek_v2,
            "llama4_text": _llama4_text, "glm4_moe": _glm4_moe, "qwen3_next": _qwen3_next}  # others: counted on the meta device (sim.meta_shape)


def matching_presets(routing) -> list[str]:
    """Names of the published shapes (`PRESETS`) whose routing geometry (MoE layers, top-k, experts) `routing`
    (anything with `matches(num_layers, top_k, num_experts)`, e.g. a RoutingStream) has, sorted."""
    shapes = [ModelShape.from_name(name) for name in sorted(PRESETS)]
    return [s.name for s in shapes if routing.matches(s.moe_layers, s.top_k, s.num_experts)]
