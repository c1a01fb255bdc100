"""Load a checkpoint (a local directory or a hub id) with its experts in a host store and the rest on the device,
never holding the whole model in host memory.

1. The model is built on the meta device (parameters only; buffers such as rotary tables are computed).
2. The non-expert weights are read tensor by tensor from the safetensors shards, straight to the target device,
   and put in place with ``load_state_dict(..., assign=True)`` (as gpt-fast does); tied weights are re-tied.
3. The experts are never materialised in the model: `CheckpointExperts` gives `SpeculativeMoE` a host store
   built from the files (`specmoe.runtime.checkpoint.ExpertPlan` replays transformers' key conversions):

   * ``host_store="ram"``: an arena in host memory, filled expert by expert (direct byte ranges read into
     their rows; other layouts built with tensor ops); with ``compression``, each expert is quantized as it is
     read, so the peak is about the compressed store plus one expert.
   * ``host_store="mmap"``: the experts stay in the checkpoint files (`runtime.store.FileStore`); each copy reads
     the expert's byte ranges through the OS page cache, the RAM tier. This needs every expert tensor to be a
     plain byte range of the files (the hub's per-expert keys, or fused tensors stored as the model holds them)
     and no compression; otherwise the store is built in RAM expert by expert, and the log and
     ``smoe.store_path`` say so and why.

   A checkpoint with pre-quantized experts (config.json `quantization_config`: MXFP4 as gpt-oss publishes it,
   block-scaled FP8 as DeepSeek-V3 and Qwen3-FP8, GPTQ int4 with or without act-order, AWQ int4 in AutoAWQ's GEMM
   layout) keeps them as published: the store holds the
   published parts (`compression.PrequantCodec`, `prequant_checkpoint.PrequantPlan`), read as byte ranges of
   the files where they are (gpt-oss's fused tensors, FP8's per-expert tensors; "mmap" serves them from the
   files) or concatenated without loss (GPTQ's and AWQ's gate and up along the output channels); the host never
   holds a dequantized copy of all experts. AWQ's experts are rewritten as they are read into GPTQ's layout
   (`prequant.awq_to_gptq`: the same dequantized bits, g_idx = k // G), which both the device and the host
   kernels read; so the store's format (`CheckpointExperts.store_format`) is "gptq-int4-g<G>" for them. Their
   quantized non-expert linears (FP8, GPTQ, AWQ attention) are dequantized on load.

   Not done here: a pinned staging ring for CUDA copies from the files (copies read into pageable buffers), and
   read-ahead of prefetched experts from disk on worker threads.

A model whose conversions specmoe does not replay, or with ModuleList experts, loads through transformers'
`from_pretrained` on the CPU instead (the whole model in host memory once), with a warning.
"""

# Shape legend: L MoE layers, E experts, B bytes per expert (padded)

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path

import torch
import transformers
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from ..kernels.prequant import PrequantFormat, awq_to_gptq, dequantize_fp8
from .adapters import FusedExperts, ModelMoE, find_moe_layers
from .checkpoint import ExpertPlan, SafetensorsCheckpoint
from .checks import indexed_device
from .compression import PrequantCodec, make_codec
from .config import HOST_STORES, OffloadConfig  # noqa: F401 (HOST_STORES: loading's old name)
from .prequant_checkpoint import PrequantPlan
from .store import ExpertLayout, FileStore, HostStore
from .wrapper import SpeculativeMoE

logger = logging.getLogger(__name__)

AUTO_RESERVE_BYTES = 2**30  # device memory kept free by cache_capacity="auto" beside 10% of what is free


def _model_class(config):
    for name in getattr(config, "architectures", None) or ():
        cls = getattr(transformers, name, None)
        if cls is not None:
            return cls
    return AutoModelForCausalLM


class CheckpointExperts:
    """The experts of a checkpoint, as `SpeculativeMoE(expert_source=...)` wants them."""

    def __init__(self, checkpoint: SafetensorsCheckpoint, plan: ExpertPlan | PrequantPlan, kind: str):
        self.checkpoint, self.plan, self.kind = checkpoint, plan, kind
        self.path = ""  # which store was built, and why: set by build_store
        self.prequant = isinstance(plan, PrequantPlan)  # the files hold the published parts, not the model's

    @property
    def store_format(self) -> PrequantFormat | None:
        """The format the store holds pre-quantized experts in: the published one, except AWQ's, converted into
        GPTQ's layout without loss as they are read (`prequant.awq_to_gptq`); None for unquantized experts."""
        if not self.prequant:
            return None
        fmt = self.plan.codec.fmt
        return PrequantFormat("gptq-int4", fmt.block) if fmt.kind == "awq-int4" else fmt

    def _ranges(self, moe: ModelMoE, layout: ExpertLayout):
        """(layer, e) -> per tensor the byte ranges that make it, or (None, reason)."""
        out = {}
        for layer in moe.layers:
            for e in range(moe.geometry.num_experts):
                parts = []
                for spec in layout.specs:
                    r = self.plan.direct_ranges(f"{layer.name}.{spec.name}", e, spec.shape, spec.dtype)
                    if r is None:
                        return None, f"{layer.name}.{spec.name} is not stored as plain bytes of the files " \
                                     "(transposed, concatenated on another dim, or of another dtype)"
                    parts.append(r)
                out[(layer.index, e)] = parts
        return out, ""

    def build_store(self, moe: ModelMoE, layout: ExpertLayout, codec):
        geo = moe.geometry
        if self.prequant:
            if not isinstance(codec, PrequantCodec):
                raise ValueError("the checkpoint's experts are pre-quantized; load them with their own format "
                                 "(load_offloaded does), not another compression")
            if codec.fmt != self.store_format:
                raise ValueError(f"the store of these {self.plan.codec.fmt} experts holds {self.store_format}, "
                                 f"not {codec.fmt}")
            # the published parts are the store's tensors: read, not encoded (AWQ's: converted to GPTQ's)
            convert = codec.fmt != self.plan.codec.fmt
            store_layout, layout, codec = codec.layout, self.plan.codec.layout, None
        else:
            convert, store_layout = False, None
        ranges, why = self._ranges(moe, layout)
        if convert:
            ranges, why = None, "AWQ's parts are converted into GPTQ's layout as they are read"
        if self.kind == "mmap" and ranges is not None and codec is None:
            self.path = "mmap: experts read from the checkpoint files at copy time"
            logger.info(self.path)
            return FileStore(layout, geo.num_layers, geo.num_experts, self.checkpoint, ranges)
        if self.kind == "mmap":
            why = "compression re-encodes them" if codec is not None else why
            self.path = f"ram: built expert by expert from the checkpoint, because {why}"
            logger.warning("host_store='mmap' cannot serve copies from the files (%s); the experts are built into "
                           "host memory instead", why)
        else:
            self.path = "ram: built expert by expert from the checkpoint" + (
                " (byte ranges read into place)" if ranges is not None and codec is None else
                f" ({why})" if convert else "")
        store = HostStore(codec.layout if codec else store_layout or layout, geo.num_layers, geo.num_experts)
        reader = FileStore(layout, geo.num_layers, geo.num_experts, self.checkpoint, ranges) if ranges else None
        big = layout.nbytes * len(store) > 2**30
        for layer in tqdm(moe.layers, desc="experts -> host store", unit="layer", disable=not big, leave=False):
            for e in range(geo.num_experts):
                key = (layer.index, e)
                if reader is not None and codec is None:
                    reader.read_into(key, store[key])  # the files' bytes straight into the arena row
                    continue
                tensors = {s.name: self.plan.expert_tensor(f"{layer.name}.{s.name}", e, s.shape, s.dtype)
                           for s in layout.specs}
                store.write(key, codec.encode(tensors) if codec else self._as_gptq(tensors) if convert else tensors)
        self.checkpoint.close()  # the files are not read again
        return store

    def _as_gptq(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One expert's AWQ tensors (published names) -> the same expert in GPTQ's parts (biases kept)."""
        published, out = self.plan.codec, {}
        for spec in published.slot_layout.specs:
            if spec.name in published.compressed:
                parts = awq_to_gptq({sfx: tensors[spec.name + sfx] for sfx in published.fmt.suffixes},
                                    published.fmt.block)
                out.update({spec.name + sfx: t for sfx, t in parts.items()})
            else:
                out[spec.name] = tensors[spec.name]
        return out


def _meta_model(path: Path, config, dtype: torch.dtype) -> nn.Module:
    from accelerate import init_empty_weights

    cls = _model_class(config)
    with init_empty_weights(include_buffers=False):
        if hasattr(cls, "_from_config"):
            model = cls._from_config(config, dtype=dtype)
        else:
            model = cls.from_config(config, dtype=dtype)
    if (path / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    return model.eval()


def _checkpoint_dtype(checkpoint: SafetensorsCheckpoint, config) -> torch.dtype:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    if isinstance(dtype, torch.dtype):
        return dtype
    return next((e.dtype for e in checkpoint.entries.values() if e.dtype.is_floating_point), torch.float32)


def _load_nonexpert(model: nn.Module, plan: ExpertPlan, expert_keys: set[str], device, dtype,
                    fmt: PrequantFormat | None = None) -> None:
    """Read every non-expert tensor to `device` and assign it into the meta model. Block-scaled FP8 weights
    (DeepSeek-V3 quantizes its attention too) are dequantized with their ``weight_scale_inv``, as transformers
    does on a machine without FP8 kernels; so are GPTQ / AWQ linears (their builds quantize attention and
    shared experts too: ``q_proj.qweight`` ... in place of ``q_proj.weight``)."""
    wanted = [k for k in model.state_dict() if k not in expert_keys]
    missing = [k for k in wanted if k not in plan.nonexpert]
    state = {}
    for key in wanted:
        if key in plan.nonexpert:
            t = plan.checkpoint.read(plan.nonexpert[key])
            if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                scale = plan.nonexpert.get(key + "_scale_inv")
                if fmt is None or fmt.kind != "fp8" or scale is None:
                    raise ValueError(f"{plan.checkpoint.directory}: {key} is FP8 without a weight_scale_inv "
                                     "specmoe can apply")
                t = dequantize_fp8(t, plan.checkpoint.read(scale), fmt.block, torch.float32)
            state[key] = t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
        elif fmt is not None and fmt.kind in ("gptq-int4", "awq-int4") and key.endswith(".weight") and \
                key[: -len("weight")] + "qweight" in plan.nonexpert:
            stem = key[: -len(".weight")]
            parts = {sfx: plan.checkpoint.read(plan.nonexpert[stem + sfx]) for sfx in fmt.suffixes}
            state[key] = fmt.dequantize(parts, torch.float32).to(device=device, dtype=dtype)  # [out, in]
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    still = [n for n, p in model.named_parameters() if p.device.type == "meta" and n not in expert_keys]
    if still:
        raise KeyError(f"the checkpoint has no tensors for {still[:5]}{' ...' if len(still) > 5 else ''} "
                       f"(keys looked for: {missing[:5]})")
    for module in model.modules():  # buffers computed at construction (rotary tables) follow to the device
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.device != indexed_device(device):
                module._buffers[name] = buf.to(device)


def prequant_format(config) -> PrequantFormat | None:
    """The publisher's format of a config's pre-quantized experts (None: not quantized). Raises ValueError for
    a quantization specmoe does not read."""
    return PrequantFormat.from_quantization_config(getattr(config, "quantization_config", None))


def load_streaming(path: Path, *, device, dtype=None, host_store: str = "ram"):
    """(meta model with the non-expert weights on `device`, CheckpointExperts, the experts' PrequantFormat or
    None). Raises NotImplementedError where a conversion is not replayed, TypeError for a model without fused
    MoE experts."""
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    fmt = prequant_format(config)
    checkpoint = SafetensorsCheckpoint(path)
    dtype = dtype or _checkpoint_dtype(checkpoint, config)
    model = _meta_model(path, config, dtype)
    moe = find_moe_layers(model)
    if not all(isinstance(layer.layout, FusedExperts) for layer in moe.layers):
        raise NotImplementedError("ModuleList experts")
    expert_keys = {f"{layer.name}.{s.name}" for layer in moe.layers for s in moe.specs}
    if fmt is None:
        plan = experts_plan = ExpertPlan(checkpoint, model, sorted(expert_keys))
    else:
        plan = ExpertPlan(checkpoint, model, [])  # the non-expert tensors
        codec = make_codec(fmt, ExpertLayout(moe.specs), moe.transposed)
        experts_plan = PrequantPlan(checkpoint, model, moe, codec)
    _load_nonexpert(model, plan, expert_keys, device, dtype, fmt)
    return model, CheckpointExperts(checkpoint, experts_plan, host_store), fmt


def _meminfo_available() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def auto_capacity(model: nn.Module, device: torch.device, compression=None) -> int:
    """Slots for cache_capacity="auto": what the device has free once the non-expert weights are on it.

    On CUDA: free memory (`torch.cuda.mem_get_info`) less 1 GiB and 10% of it (KV cache, activations, the
    dequantized scratch of compressed experts: a margin, not a measurement). On a CPU, where the slot pool is
    host memory beside the host store: a quarter of what MemAvailable leaves once the store is counted.

    Raises:
        ValueError: not one expert fits (the message gives both sizes).
    """
    moe = find_moe_layers(model)
    layout = ExpertLayout(moe.specs)
    codec = make_codec(compression, layout, moe.transposed)
    slot = (codec.layout if codec else layout).nbytes
    total = moe.geometry.num_layers * moe.geometry.num_experts
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        experts = {id(p) for layer in moe.layers for p in layer.experts.parameters()}
        pending = sum(p.nbytes for p in model.parameters()  # weights the wrapper has yet to move there
                      if id(p) not in experts and p.device.type not in ("meta", device.type))
        budget = free - pending - AUTO_RESERVE_BYTES - free // 10
        where = f"{free / 2**30:.2f} GiB free on {device}"
    else:
        available = _meminfo_available()
        budget = (available - total * slot) // 4
        where = f"{available / 2**30:.2f} GiB of host memory available, the store taking {total * slot / 2**30:.2f} GiB"
    slots = min(total, max(0, budget) // slot)
    if slots < 1:
        raise ValueError(f"cache_capacity='auto': {where} leaves no room for one expert ({slot / 2**20:.1f} MiB); "
                         "give a smaller model, compression, or an explicit capacity")
    logger.info("cache_capacity='auto': %d of %d experts (%s)", slots, total, where)
    return int(slots)


def load_offloaded(path, *, device=None, cache_capacity=None, predictor=None, dtype=None, config: OffloadConfig | None = None,
                   **wrapper_kwargs):
    """Load a checkpoint straight into a `SpeculativeMoE`, streaming it from its safetensors files.

    Args:
        path: a local directory with config.json and safetensors weights, or a hub id ("org/name", resolved
            through huggingface_hub's cache; HF_HUB_OFFLINE is respected).
        device: the compute device (default: CUDA when present, else CPU).
        cache_capacity: as for `SpeculativeMoE` (default: the config's, 0.5), or "auto": as many slots as the
            device's free memory holds once the non-expert weights are on it (`auto_capacity`; `specmoe plan`
            sizes a machine ahead).
        predictor: as for `SpeculativeMoE`.
        dtype: load in this dtype (default: the checkpoint's); pre-quantized experts are dequantized to it on use.
        config: an `OffloadConfig`; its `host_store` is "ram" (experts copied into host memory) or "mmap"
            (experts read from the checkpoint files; see the module docstring for when that falls back to "ram").
        **wrapper_kwargs: `OffloadConfig` settings (host_store, compression, policy, ...), overriding `config`,
            and the rest of `SpeculativeMoE`'s keyword arguments (placement, miss_costs). A checkpoint whose
            config.json has a `quantization_config` (MXFP4, block-scaled FP8, GPTQ / AWQ int4 experts) sets
            compression to its format: the experts stay as published (see the module docstring).

    Returns:
        The wrapped model, ready for `.generate`; ``smoe.store_path`` says which host store was built.

    Raises:
        FileNotFoundError: `path` is neither a checkpoint directory nor a hub id in the cache.
        TypeError / ValueError: as `SpeculativeMoE` (dense model, bad capacity, ...), or a bad `host_store`.
    """
    from ..hub import resolve_model

    names = {f.name for f in dataclasses.fields(OffloadConfig)}
    settings = {k: wrapper_kwargs.pop(k) for k in list(wrapper_kwargs) if k in names}
    auto = isinstance(cache_capacity, str) and cache_capacity == "auto"  # sized below, once the model is built
    if cache_capacity is not None and not auto:
        settings["capacity"] = cache_capacity
    config = OffloadConfig.build(config, **settings)  # validated before anything is read
    host_store = config.host_store
    path = resolve_model(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint directory (no config.json); "
                                "load_offloaded reads what save_pretrained writes")
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = indexed_device(device)  # "cuda" -> cuda:N: compared with where tensors are
    t0 = time.perf_counter()
    try:
        model, source, fmt = load_streaming(path, device=device, dtype=dtype, host_store=host_store)
        if fmt is not None:  # pre-quantized experts stay in their format: store, copies, slots
            asked = config.compression
            if asked not in (None, "none", str(fmt), str(source.store_format), fmt, source.store_format):
                raise ValueError(f"{path}: the experts are published as {fmt}; compression={asked!r} would "
                                 "re-quantize them (leave compression unset)")
            config = dataclasses.replace(config, compression=source.store_format)
    except NotImplementedError as err:
        logger.warning("cannot stream %s (%s not replayed); loading it whole on the CPU with from_pretrained", path,
                       err)
        model = _model_class(AutoConfig.from_pretrained(path, local_files_only=True)).from_pretrained(
            path, dtype=dtype if dtype is not None else "auto", device_map="cpu", local_files_only=True
        ).eval()
        source = None
    if auto:
        config = dataclasses.replace(config, capacity=auto_capacity(model, device, config.compression))
    smoe = SpeculativeMoE(model, predictor, config=config, device=device, expert_source=source, **wrapper_kwargs)
    smoe.store_path = source.path if source is not None else "ram: copied from the model loaded by from_pretrained"
    logger.info("loaded %s in %.1f s; host store: %s", path, time.perf_counter() - t0, smoe.store_path)
    return smoe
