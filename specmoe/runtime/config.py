"""`OffloadConfig`: every setting of expert offloading, in one frozen object validated once.

`SpeculativeMoE`, `load_offloaded`, the simulator's `simulate`, `specmoe bench` and the CLIs take one of these
(or the same names as keyword arguments, which build one): the runtime and the simulator read the same values,
with the same defaults, checked by the same code.

    cfg = OffloadConfig(capacity=0.25, misses="auto")
    smoe = SpeculativeMoE(model, predictor, config=cfg)        # or SpeculativeMoE(model, predictor, 0.25, misses="auto")
    run = simulate(stream, shape, profile, config=cfg, ops=ops)
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path

from ..kernels.host.experts import HOST_ACTIVATIONS
from ..kernels.prequant import PrequantFormat
from ..kernels.quant import QuantFormat
from .capacity import resolve_capacity
from .compiled import backend_name
from .compute import COMPUTE
from .misses import check_misses
from .policies import DEFAULT_POLICY
from .transfer import ENGINES as TRANSFERS

HOST_STORES = ("ram", "mmap")
SIMULATOR_POLICIES = ("belady",)  # policies that need the future: the simulator runs them, SpeculativeMoE cannot


@dataclass(frozen=True)
class OffloadConfig:
    """How a MoE model is offloaded.

    Args:
        capacity: a float in (0, 1] (fraction of all experts kept on the device), an int (slots in total), or a
            memory budget string such as "8GiB" (`load_offloaded` also takes "auto", resolved before the config).
        policy: eviction policy: a name of `runtime.policies.POLICIES` ("hit-density", the default, "lru", "lfu"),
            "default", a directory path a registered policy loads from, or an object with touch/forget/victim.
            The simulator also runs "belady" (Belady's MIN, which needs the future).
        misses: where routed experts that are not resident run: "fetch" (copied into a slot), "host" (computed
            on the host from the store), "auto" (per miss, whichever the measured costs say finishes first).
        compression: None, "int8", "int4" or "int4-g128": experts compressed in the store, over PCIe and in
            the slots.
        host_store: "ram" (experts copied into host memory) or "mmap" (read from the checkpoint files); only
            `load_offloaded` builds stores from files.
        max_prefetch_inflight: bound on prefetch copies in flight (None: 2 * top-k * the predictor's lookahead,
            `inflight`).
        prefetch_width: experts prefetched per token per target layer (None: top-k).
        host_threads: threads of the host's expert kernels (None: physical cores less one, at most 8:
            `specmoe.kernels.host.default_threads`).
        host_activations: "fp32" (default: exact, experts computed on the host give the dequantized expert's
            output to float rounding) or "int8": the host kernel rounds each token's hidden state and each
            expert's activations to int8, one scale per 32 columns, and multiplies them with the weights as
            integers (llama.cpp's MXFP4 x Q8_0). Faster, and it changes the numerics (opt-in). Only MXFP4 experts
            have that kernel; other formats keep float32 activations (the host logs which ran).
        transfer: the copy engine: "cuda" (streams and events; the default on CUDA), "thread" (a CPU worker) or
            "sync" (the default on CPU). The simulator models "sync" as the host waiting for each copy, the
            others as an asynchronous copy engine.
        compute: how the device computes experts on the slots (`runtime.compute`): "gather" (the model's experts
            implementation on a compact copy of the routed slots), "pool" (on all S slots, ids remapped, no
            copy), "triton" (the fused kernel on the slots), "auto" (default: "pool" on CUDA, the kernel where the
            tuned launch configs measured it faster, "gather" elsewhere).
        compile: compiled decode (`runtime.compiled`): the dense parts of each decode step as torch.compile
            graphs (CUDA graphs on a GPU), the MoE layer calls between them. True is inductor; "aot_eager" or
            "eager" names a cheaper backend (graphs and breaks checked without code generation). Default False.

    Raises:
        ValueError / TypeError: a value out of range or of the wrong type, saying what to change.
    """

    capacity: float | int | str = 0.5
    policy: object = DEFAULT_POLICY
    misses: str = "fetch"
    compression: str | None = None
    host_store: str = "ram"
    max_prefetch_inflight: int | None = None
    prefetch_width: int | None = None
    host_threads: int | None = None
    host_activations: str = "fp32"
    transfer: str | None = None
    compute: str | None = None
    compile: bool | str = False

    def __post_init__(self):
        resolve_capacity(self.capacity, 1, 2**62, 1)  # the checks that need no geometry (type, range, unit)
        _check_policy(self.policy)
        check_misses(self.misses)
        comp = self.compression
        if comp is not None and comp != "none" and not isinstance(comp, (QuantFormat, PrequantFormat)):
            if not isinstance(comp, str):
                raise TypeError(f"compression must be None, 'int8', 'int4' or 'int4-g128' (or a publisher's "
                                f"format: 'mxfp4', 'fp8-b128', 'gptq-int4-g128', 'awq-int4-g128'), got {comp!r}")
            if PrequantFormat.parse(comp) is None:
                QuantFormat.parse(comp)  # ValueError saying what to write
        if self.host_store not in HOST_STORES:
            raise ValueError(f"host_store must be one of {HOST_STORES}, got {self.host_store!r}")
        for name in ("max_prefetch_inflight", "prefetch_width", "host_threads"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.host_activations not in HOST_ACTIVATIONS:
            raise ValueError(f"host_activations must be one of {HOST_ACTIVATIONS} ('int8': the host kernel's "
                             f"int8 activations, MXFP4 experts only), got {self.host_activations!r}")
        if self.transfer is not None and self.transfer not in TRANSFERS:
            raise ValueError(f"transfer must be one of {TRANSFERS} or None (the device's default), got "
                             f"{self.transfer!r}")
        if self.compute is not None and self.compute not in COMPUTE:
            raise ValueError(f"compute must be one of {COMPUTE} or None, got {self.compute!r}")
        backend_name(self.compile)  # ValueError naming the choices

    # ---- derived values: computed here, once, for the runtime and the simulator ---------------------------------
    def inflight(self, top_k: int, lookahead: int = 1) -> int:
        """The bound on prefetch copies in flight: the setting, else 2 * top-k * lookahead."""
        return self.max_prefetch_inflight if self.max_prefetch_inflight is not None else 2 * top_k * lookahead

    def width(self, top_k: int) -> int:
        """Experts prefetched per token per target layer: the setting, else top-k."""
        return self.prefetch_width if self.prefetch_width is not None else top_k

    @property
    def asynchronous(self) -> bool:
        """Whether copies overlap compute (every engine but "sync"; None: the device's default, simulated as one
        that overlaps)."""
        return self.transfer != "sync"

    def replace(self, **changes) -> "OffloadConfig":
        return replace(self, **changes)

    @classmethod
    def build(cls, config: "OffloadConfig | None" = None, **settings) -> "OffloadConfig":
        """`config` (default: the defaults) with `settings` (OffloadConfig field names; None values are skipped)
        applied: how the keyword arguments of `SpeculativeMoE`, `load_offloaded` and `simulate` become one.

        Raises:
            TypeError: a name that is no setting (the valid names listed).
        """
        names = {f.name for f in fields(cls)}  # None leaves a setting whose default is None at its default
        unknown = sorted(set(settings) - names)
        if unknown:
            raise TypeError(f"unknown offloading setting(s) {unknown}; OffloadConfig has {sorted(names)}")
        defaults = {f.name: f.default for f in fields(cls)}
        given = {k: v for k, v in settings.items() if v is not None or defaults[k] is not None}
        if config is None:
            return cls(**given)
        if not isinstance(config, cls):
            raise TypeError(f"config must be an OffloadConfig, got {type(config).__name__}")
        return replace(config, **given) if given else config

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if not isinstance(out["policy"], (str, Path)):
            out["policy"] = getattr(out["policy"], "name", type(out["policy"]).__name__)
        out["policy"] = str(out["policy"])
        if out["compression"] is not None:
            out["compression"] = str(out["compression"])
        return out


def _check_policy(policy) -> None:
    from .policies import POLICIES  # a policy's module may import heavy things: only where a name is checked

    if isinstance(policy, (str, Path)):
        name = str(policy)
        if name in POLICIES or name == "default" or name in SIMULATOR_POLICIES or Path(name).is_dir():
            return
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {sorted(POLICIES)}, 'default', or a "
                         "directory a learned policy was saved to")
    if not all(callable(getattr(policy, m, None)) for m in ("touch", "forget", "victim")):
        raise TypeError("an eviction policy needs touch(slot), forget(slot) and victim(allowed) methods")
