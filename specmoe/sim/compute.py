"""How long compute takes: the device side from bytes and FLOPs (roofline), the host side from op counts.

Decoding one token at batch 1 in PyTorch eager is often bound by the host launching kernels, not by the GPU
running them, so the simulator keeps two clocks. Host time is (aten ops) x (seconds per op) plus the
runtime's own bookkeeping; the op counts are calibration data (`calibration/op_counts.json`, read by
`load_op_counts`), measured by `benchmarks/op_counts.py` on a tiny model of each family under a counting
dispatch mode, and so is the bookkeeping (`calibration/bookkeeping.json`, read by `load_bookkeeping`: the hot
path's Python per MoE layer call and per expert copy, for each eviction policy, and per predicted call, measured
by `benchmarks/hot_path_cost.py`). Device time is max(bytes / bandwidth, FLOPs / FLOP/s), each derated by
an efficiency. The per-op and efficiency constants are the uncertain part: `specmoe simulate --validate`
fits the host scale to a GPU measurement and reports the error before and after.
"""

# Shape legend: T tokens, E experts, H hidden, k top-k, L MoE layers

from __future__ import annotations

import functools
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from ..io import read_json
from .hardware import HardwareProfile
from .shapes import ModelShape

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class OpCounts:
    """Aten ops the host dispatches, measured on a tiny model of one family (see `load_op_counts`).

    Args:
        layer: per decoder layer, outside the experts call (norms, attention, router, shared experts).
        experts: per experts call.
        per_pass: per forward pass outside the decoder layers, generate's loop included.
        wrapper: added per MoE layer call by SpeculativeMoE (no predictor).
        predictor: added per MoE layer call by a one-layer-ahead pre-gate predictor (its own `predict` and
            the runtime's ranking of the scores).
        pregate_predict: of `predictor`, the pre-gate's own `predict` (the rest is the runtime's).
    """

    layer: float
    experts: float
    per_pass: float
    wrapper: float = 0.0
    predictor: float = 0.0
    pregate_predict: float = 0.0
    source: str = ""

    def for_predictor(self, predict_ops: float) -> "OpCounts":
        """These counts with another predictor, whose `predict` dispatches `predict_ops` ops per MoE layer
        (see `count_predictor_ops`), in place of the pre-gate."""
        return replace(self, predictor=max(0.0, self.predictor - self.pregate_predict) + predict_ops)

    def __post_init__(self):
        for name in ("layer", "experts", "per_pass", "wrapper", "predictor", "pregate_predict"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
                raise ValueError(f"OpCounts.{name} must be a number >= 0, got {value!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ComputeModel:
    """Software constants of the compute model.

    Args:
        name: preset name.
        op_s: host seconds to dispatch one aten op (and launch its kernel).
        sync_s: one device->host synchronisation (generate's per step, the runtime's per MoE layer).
        wrapper_s: the runtime's Python bookkeeping per MoE layer call, besides its ops: the default policy's,
            without a predictor or copies (each policy, predictor and copy is charged relative to it from the
            measured `Bookkeeping`, `bookkeeping_charges`; what `specmoe simulate --validate` fits).
        copy_issue_s: host seconds to issue one expert copy (cudaMemcpyAsync + event record).
        mem_efficiency: achieved fraction of peak device memory bandwidth when streaming weights.
        flops_efficiency: achieved fraction of peak bf16 FLOP/s.
        source: where the constants come from.
        segment_s: compiled decode only: host seconds per compiled region entered (dynamo's guards, the
            compiled wrapper); the dense parts then cost what compiled code costs the host instead of ops x op_s.
        segments_per_layer, segments_per_pass: compiled regions entered per MoE layer and per pass (0: eager),
            measured by benchmarks/compiled_decode.py (`calibration/compiled_decode.json`).
        experts_op_s: host seconds of one experts call from compiled code (the `specmoe::experts` op's dispatch),
            besides the runtime's own cost (wrapper_s).
        replay_s: host seconds per CUDA-graph replay (cudaGraphLaunch + cudagraph trees' bookkeeping).
        replays_per_layer, replays_per_pass: CUDA-graph replays per MoE layer and per pass.
    """

    name: str = "hf-eager"
    op_s: float = 5e-6
    sync_s: float = 15e-6
    wrapper_s: float = 60e-6
    copy_issue_s: float = 8e-6
    mem_efficiency: float = 0.8
    flops_efficiency: float = 0.6
    source: str = ""
    segment_s: float = 0.0
    segments_per_layer: float = 0.0
    segments_per_pass: float = 0.0
    experts_op_s: float = 0.0
    replay_s: float = 0.0
    replays_per_layer: float = 0.0
    replays_per_pass: float = 0.0

    @property
    def compiled(self) -> bool:
        """Compiled decode: the dense parts cost compiled regions and replays, not ops."""
        return self.segments_per_layer > 0 or self.segments_per_pass > 0

    def __post_init__(self):
        for name in ("op_s", "sync_s", "wrapper_s", "copy_issue_s", "segment_s", "experts_op_s", "replay_s"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not (0 <= value < 1e-1):
                raise ValueError(f"ComputeModel.{name} must be seconds in [0, 0.1), got {value!r}")
        for name in ("mem_efficiency", "flops_efficiency"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not (0 < value <= 1):
                raise ValueError(f"ComputeModel.{name} must be a fraction in (0, 1], got {value!r}")

    def scale_host(self, factor: float) -> "ComputeModel":
        """The same model with every host-side constant multiplied by `factor` (for calibration)."""
        if not (factor > 0 and math.isfinite(factor)):
            raise ValueError(f"host scale factor must be positive, got {factor}")
        return replace(self, name=f"{self.name} (host x{factor:.3g})", op_s=self.op_s * factor,
                       sync_s=self.sync_s * factor, wrapper_s=self.wrapper_s * factor,
                       copy_issue_s=self.copy_issue_s * factor, segment_s=self.segment_s * factor,
                       experts_op_s=self.experts_op_s * factor, replay_s=self.replay_s * factor)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_name(cls, name: str) -> "ComputeModel":
        if name not in COMPUTE_MODELS:
            raise ValueError(f"unknown compute model {name!r}; choose one of {sorted(COMPUTE_MODELS)}")
        return COMPUTE_MODELS[name]


# ---- the runtime's bookkeeping: calibration data -----------------------------------------------------------------
CALIBRATION_DIR = Path(__file__).parent / "calibration"
BOOKKEEPING_FILE = CALIBRATION_DIR / "bookkeeping.json"  # written by benchmarks/hot_path_cost.py
ASSUMED_WRAPPER_S = 60e-6  # what hf-eager charged per MoE layer call before the bookkeeping was measured
HOST_PYTHON_SCALE = 1.0  # the GPU host's Python speed relative to the CPU that measured it (assumed, see below)


@dataclass(frozen=True)
class Bookkeeping:
    """The runtime's measured bookkeeping (`benchmarks/hot_path_cost.py`: hot path + scheduler + policy + candidate
    ranking, without expert compute or byte copies), as a line per eviction policy through the capacities it was
    measured at: `per_call_s[policy] + per_copy_s[policy] * copies`, and per predictor the extra per predicted call
    (its candidates ranked, queued, admitted; the predictor's own `predict` is in the op counts).

    Args:
        default: the policy `wrapper_s` stands for (the runtime's default).
        per_call_s / per_copy_s: policy -> seconds per MoE layer call / per expert copy started.
        predictor_s: predictor -> seconds per MoE layer call that runs it, beyond none.
        source: how it was measured (command, machine).
    """

    default: str
    per_call_s: dict
    per_copy_s: dict
    predictor_s: dict
    source: str = ""

    def charges(self, policy: str, predictor: str | None, wrapper_s: float,
                host_scale: float | None = None) -> tuple[float, float, float]:
        """(seconds per MoE layer call, per expert copy, per predicted call) for `policy` and `predictor`: the
        per-call figure scaled so that the default policy's is `wrapper_s` (the compute model's, possibly fitted by
        validation), the per-copy and per-prediction figures by `host_scale` (the model's host speed against the
        machine they were measured on; default: the per-call scale too), so that a fitted `wrapper_s`, which also
        absorbs what a model leaves out, does not multiply them. A policy or predictor not measured gets the
        default's / the mean over the predictors measured (a learned policy adds its own measured extra,
        `LearnedPolicy.host_s_per_call`)."""
        base = self.per_call_s[self.default]
        scale = wrapper_s / base if base > 0 else 0.0
        other = scale if host_scale is None else host_scale
        call = self.per_call_s.get(policy, base)
        copy = self.per_copy_s.get(policy, self.per_copy_s[self.default])
        if predictor is None or predictor not in self.predictor_s:
            pred = sum(self.predictor_s.values()) / len(self.predictor_s) if self.predictor_s else 0.0
        else:
            pred = self.predictor_s[predictor]
        return max(0.0, call * scale), max(0.0, copy * other), max(0.0, pred * other)


@functools.lru_cache(maxsize=None)
def load_bookkeeping(path: Path | None = None) -> Bookkeeping | None:
    """The measured bookkeeping (`BOOKKEEPING_FILE`, written by `benchmarks/hot_path_cost.py`); None without it."""
    path = Path(path) if path is not None else BOOKKEEPING_FILE
    if not path.is_file():
        return None
    d = read_json(path, what="bookkeeping calibration")
    pol = d["policies"]
    return Bookkeeping(d["default_policy"], {k: v["per_call_s"] for k, v in pol.items()},
                       {k: v["per_copy_s"] for k, v in pol.items()},
                       {k: v["per_call_s"] for k, v in d.get("predictors", {}).items()},
                       f"{d['command']} on {d['environment']['device_name']}")


def bookkeeping_charges(model: "ComputeModel", policy: str, predictor: str | None) -> tuple[float, float, float]:
    """What `model` charges for the runtime's bookkeeping (see `Bookkeeping.charges`): the measured figures where
    the calibration file is there, else `wrapper_s` per call for every policy and nothing per copy or prediction
    beyond the op counts."""
    book = load_bookkeeping()
    if book is None:
        return model.wrapper_s, 0.0, 0.0
    # the host's speed: the model's per-op cost against the preset's (scale_host multiplies both; roofline: 0)
    host_scale = model.op_s / ComputeModel.op_s * HOST_PYTHON_SCALE if model.wrapper_s > 0 else 0.0
    return book.charges(policy, predictor, model.wrapper_s, host_scale)


def _eager_model() -> ComputeModel:
    """The "hf-eager" preset: assumed per-op and efficiency constants, the runtime's bookkeeping as measured."""
    book = load_bookkeeping()
    assumed = ("~5 us per eager aten op on a GPU host (PyTorch dispatch + kernel launch); 80% of peak memory "
               "bandwidth, 60% of peak FLOP/s (assumed; not measured on a GPU yet: `specmoe simulate --validate` "
               "fits the host scale to a measurement)")
    if book is None:
        return ComputeModel("hf-eager", wrapper_s=ASSUMED_WRAPPER_S,
                            source=f"{assumed}; {ASSUMED_WRAPPER_S * 1e6:.0f} us of runtime Python per MoE layer (assumed)")
    wrapper_s = book.per_call_s[book.default] * HOST_PYTHON_SCALE
    return ComputeModel(
        "hf-eager", wrapper_s=wrapper_s,
        source=f"{assumed}; the runtime's Python bookkeeping per MoE layer call measured on this CPU ({book.source}): "
               f"{wrapper_s * 1e6:.1f} us for {book.default} without a predictor (was an assumed "
               f"{ASSUMED_WRAPPER_S * 1e6:.0f} us), each policy, predictor and copy charged its own measured figure; "
               f"the RTX 3090 box's host (Ryzen 9 5950X) is assumed to run that Python at x{HOST_PYTHON_SCALE:g} "
               "this CPU's speed")


COMPUTE_MODELS = {
    "hf-eager": _eager_model(),
    "roofline": ComputeModel(
        "roofline", op_s=0.0, sync_s=0.0, wrapper_s=0.0, copy_issue_s=0.0, mem_efficiency=1.0, flops_efficiency=1.0,
        source="hardware limits only: no host overhead, peak bandwidth and FLOP/s"),
}


COMPILED_FILE = Path(__file__).parent / "calibration" / "compiled_decode.json"  # benchmarks/compiled_decode.py


def _compiled_model() -> ComputeModel | None:
    """The "compiled" preset: hf-eager's constants for what stays eager, the dense parts charged as the file says
    (compiled regions and experts-op calls per layer and pass, their host cost measured on a CPU; CUDA-graph
    replays, their count and cost assumed until a GPU run measures them); None without the file."""
    if not COMPILED_FILE.is_file():
        return None
    c = read_json(COMPILED_FILE, what="compiled decode calibration")
    op_s = COMPUTE_MODELS["hf-eager"].op_s  # the measured costs are multiples of an eager op: the same host scale
    segment_s, experts_op_s = c["segment_in_eager_ops"] * op_s, c["experts_op_in_eager_ops"] * op_s
    return ComputeModel(
        "compiled", wrapper_s=COMPUTE_MODELS["hf-eager"].wrapper_s,  # the hot path stays eager
        segment_s=segment_s, segments_per_layer=c["segments_per_layer"],
        segments_per_pass=c["segments_per_pass"], experts_op_s=experts_op_s * c["experts_op_calls_per_layer"],
        replay_s=c["replay_s"], replays_per_layer=c["replays_per_layer"], replays_per_pass=c["replays_per_pass"],
        source=f"hf-eager's constants for what stays eager (the runtime's experts calls, syncs); the dense parts as "
        f"{c['segments_per_pass']:.0f} compiled region per pass + {c['segments_per_layer']:.2f} per MoE layer, "
        f"{c['segment_in_eager_ops']:.1f} eager ops' host time each, and {c['experts_op_calls_per_layer']:.0f} "
        f"experts op call per layer, {c['experts_op_in_eager_ops']:.1f} eager ops each ({c['host_costs_source']}; "
        f"x {op_s * 1e6:.0f} us per op: {segment_s * 1e6:.1f} and {experts_op_s * 1e6:.1f} us); "
        f"{c['replays_per_layer']:.0f} CUDA-graph "
        f"replay per layer + {c['replays_per_pass']:.0f} per pass at {c['replay_s'] * 1e6:.0f} us each "
        f"({c['replay_source']})")


if (_compiled := _compiled_model()) is not None:
    COMPUTE_MODELS["compiled"] = _compiled


@dataclass(frozen=True)
class PassCosts:
    """Host and device seconds of the pieces of one forward pass of T tokens (see `pass_costs`)."""

    host_layer: float  # per MoE layer, outside the experts call
    dev_layer: float
    host_experts: float  # per experts call
    dev_expert: float  # device seconds per distinct expert (its weights) ...
    dev_expert_tokens: float  # ... plus per token-expert pair (its FLOPs)
    host_pass: float  # per pass: dense layers, embedding, head, generate loop
    dev_pass: float
    host_wrapper: float  # per MoE layer call, wrapped only (sync included)
    host_predictor: float
    sync: float
    copy_issue: float


def _device_seconds(nbytes: float, flops: float, profile: HardwareProfile, model: ComputeModel) -> float:
    return max(nbytes / (profile.memory_bytes_per_s * model.mem_efficiency),
               flops / (profile.bf16_flops * model.flops_efficiency))


def pass_costs(shape: ModelShape, profile: HardwareProfile, model: ComputeModel, ops: OpCounts, tokens: int,
               context: int) -> PassCosts:
    """Costs of one forward pass of `tokens` new tokens after `context` cached ones."""
    T, b = tokens, shape.dtype_bytes
    ctx = context + tokens
    layer_params = shape.layer_nonexpert_params
    kv_read = ctx * shape.kv_values_per_token * b
    score_flops = 4 * shape.attention_heads * shape.attention_head_dim * T * ctx
    dev_layer = _device_seconds(layer_params * b + kv_read, 2 * T * layer_params + score_flops, profile, model)
    dense = shape.dense_layers * (shape.attention_params + shape.norm_params + shape.dense_mlp_params)
    head = shape.lm_head_params or shape.embed_params  # generate computes logits of the last token only
    dev_pass = _device_seconds((dense + head + shape.final_norm_params) * b + shape.dense_layers * kv_read,
                               2 * T * dense + 2 * head, profile, model)
    eff_bw = profile.memory_bytes_per_s * model.mem_efficiency
    eff_flops = profile.bf16_flops * model.flops_efficiency
    compiled = model.compiled  # the dense parts run compiled code and replay graphs; the experts calls stay eager
    return PassCosts(
        host_layer=(model.segments_per_layer * model.segment_s + model.experts_op_s + model.replays_per_layer *
                    model.replay_s) if compiled else ops.layer * model.op_s,
        dev_layer=dev_layer,
        host_experts=ops.experts * model.op_s,
        dev_expert=(shape.slot_bytes if shape.compression != "none" else shape.expert_bytes) / eff_bw,  # bytes read
        dev_expert_tokens=2 * shape.expert_params / eff_flops,
        host_pass=(model.segments_per_pass * model.segment_s + model.replays_per_pass * model.replay_s if compiled else
                   (ops.per_pass + shape.dense_layers * ops.layer) * model.op_s) + model.sync_s,
        dev_pass=dev_pass,
        host_wrapper=ops.wrapper * model.op_s + model.wrapper_s + model.sync_s,
        host_predictor=ops.predictor * model.op_s,
        sync=model.sync_s,
        copy_issue=model.copy_issue_s,
    )


def expert_device_seconds(costs: PassCosts, distinct: int, pairs: int) -> float:
    """Device time of an experts call reading `distinct` experts for `pairs` token-expert pairs."""
    return max(distinct * costs.dev_expert, pairs * costs.dev_expert_tokens)


# ---- op counts: calibration data ------------------------------------------------------------------------------
OP_COUNTS_FILE = CALIBRATION_DIR / "op_counts.json"  # written by benchmarks/op_counts.py


@functools.lru_cache(maxsize=None)
def load_op_counts(model_type: str, path: Path | None = None) -> OpCounts:
    """The op counts of `model_type`, from the calibration file that `benchmarks/op_counts.py` writes.

    Raises:
        ValueError: the file has no counts for this family (the message says how to add them).
    """
    path = Path(path) if path is not None else OP_COUNTS_FILE
    families = read_json(path, what="op-count calibration").get("families", {})
    if model_type not in families:
        raise ValueError(f"no op counts for model family {model_type!r} in {path} (it has {', '.join(sorted(families))});"
                         f" count them with `python benchmarks/op_counts.py --families {model_type}`")
    return OpCounts(**families[model_type])


count_ops = load_op_counts  # the name callers used when the counting ran here


def op_counter(regions: tuple[str, ...] = ("all",)):
    """A TorchDispatchMode counting the aten ops dispatched while it is active, by `.region` (the first of
    `regions` to begin with; set it to attribute ops to another): `.n[region]`. Made lazily (the mode class
    is private PyTorch API). The one op counter of the project (the predictors' cost here, the model families'
    calibration in benchmarks/op_counts.py)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class OpCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.region, self.n = regions[0], dict.fromkeys(regions, 0)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n[self.region] += 1
            return func(*args, **(kwargs or {}))

    return OpCounter()


def count_predictor_ops(predictor, geometry, routers=()) -> float:
    """Aten ops one decode-step `predict` call dispatches, averaged over the MoE layers (hidden and history
    random, one token). Binds the predictor to `geometry` (and `routers`) first."""
    predictor.bind(geometry, list(routers))
    predictor.reset()
    g = torch.Generator().manual_seed(0)
    history = torch.randint(0, geometry.num_experts, (1, geometry.num_layers, geometry.top_k), generator=g)
    counter = op_counter()
    with torch.no_grad():
        for layer in range(geometry.num_layers):
            hidden = torch.randn(1, geometry.hidden_size, generator=g)
            with counter:
                predictor.predict(layer, hidden, history[:, : layer + 1])
    return counter.n["all"] / geometry.num_layers
