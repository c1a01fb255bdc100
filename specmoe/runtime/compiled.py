"""Compiled decode: each decode step as one compiled graph, the runtime's MoE experts calls inside it as an op.

`SpeculativeMoE(..., compile=True)` installs a `CompiledDecode` on the model:

- the model's `forward` becomes a dispatcher: a decode step (one new token per row, a static cache) runs
  `torch.compile(forward)`; prefill and anything else run eagerly (prompts of every length would otherwise
  each compile a graph);
- each MoE layer's experts call is the runtime's, as one opaque custom op in the graph (`specmoe::experts`,
  `experts_wrap`): dynamo traces a decode step as ONE graph with the op inside at each MoE layer (its fake impl
  gives the output's shape; it mutates nothing the graph sees), and the op runs the runtime's eager hot path
  (routing ids to the host, copies, the experts compute) from inside the compiled code. On CUDA the op is tagged
  `cudagraph_unsafe` and inductor's graph partition (torch >= 2.8) splits the step's CUDA graphs around it
  (``L + 1`` graph replays per step, one compiled region). Where that cannot work (CUDA on a torch without graph
  partition, ModuleList experts, or an experts call that is not ``(hidden, ids, weights)``), the call is a
  `torch.compiler.disable` graph break instead (one log line): compiled segments around each experts call (54
  per step on the 24-layer reference model, with dynamo's nested graph breaks) and the hot path between them;
- `generate` gets a `transformers.StaticCache` kept by this object and reused (reset) across calls: its length
  is a power of two >= `MIN_CACHE_LEN` that holds prompt + new tokens, so calls of other lengths replay the
  same graphs; a longer call makes a longer cache (one recompilation, logged). Graph shapes are static
  (``dynamic=False``): CUDA graphs on a GPU (``mode="reduce-overhead"``), inductor's C++ on a CPU.

`stats()` reports what it cost: seconds spent in decode steps that compiled (the compile time), graphs
compiled (torch's own `counters["stats"]["unique_graphs"]`), and decode steps run compiled / eager.

What cannot work is refused with one line (`check_compilable`): encoder-decoder models (their cross-attention
cache is built by `generate` from the encoder output, not by us), torch without `torch.compiler`.
"""

# Shape legend: B batch rows, T tokens per row, N static cache length

from __future__ import annotations

import inspect
import logging
import threading
import time

import torch
import torch._inductor.config as inductor_config

logger = logging.getLogger(__name__)

MIN_CACHE_LEN = 256  # the shortest static cache made: generate calls up to this length share one set of graphs
BACKENDS = ("inductor", "aot_eager", "eager")  # compile=True is "inductor"; the others check graphs cheaply
_MISSING = object()


def backend_name(compile) -> str | None:
    """The torch.compile backend of an OffloadConfig.compile value (None: eager decode).

    Raises:
        ValueError: neither a bool nor one of `BACKENDS`.
    """
    if compile is False or compile is None:
        return None
    if compile is True:
        return "inductor"
    if isinstance(compile, str) and compile in BACKENDS:
        return compile
    raise ValueError(f"compile must be True, False or a backend name in {BACKENDS}, got {compile!r}")


def check_compilable(model) -> None:
    """Refuse, with one line, a model or torch where compiled decode cannot work.

    Raises:
        ValueError: an encoder-decoder model, or a torch without `torch.compiler.disable`.
    """
    if not hasattr(torch, "compiler") or not hasattr(torch.compiler, "disable"):
        raise ValueError(f"compile=True needs torch >= 2.3 (torch.compiler.disable); this is torch {torch.__version__}")
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ValueError(f"compile=True supports decoder-only models; {type(model).__name__} is encoder-decoder "
                         "(generate builds its cross-attention cache from the encoder run); use compile=False")


# ---- the experts call: an opaque custom op ------------------------------------------------------------------
_ACTIVE = threading.local()  # .calls: {layer index: runtime redirect} of the CompiledDecode whose step runs now
_TAGS = (torch._C.Tag.cudagraph_unsafe,) if hasattr(torch._C.Tag, "cudagraph_unsafe") else ()
OP_NAME = "specmoe::experts"


def _experts_op(hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, layer: int) -> torch.Tensor:
    """Layer `layer`'s experts call ``(hidden [T, H], ids [T, k], weights [T, k]) -> [T, H]``, run by the runtime
    of the compiled decode step running now (its slots, copies and host state are its own, not graph inputs)."""
    out = _calls()[layer](hidden, ids, weights)
    if out.untyped_storage().data_ptr() == hidden.untyped_storage().data_ptr():
        out = out.clone()  # a custom op's output may not alias its input
    return out.to(hidden.dtype).contiguous()  # [T, H], as the fake impl says


def _experts_fake(hidden, ids, weights, layer):
    return hidden.new_empty(hidden.shape)  # [T, H], contiguous


_CUSTOM_OP = getattr(torch.library, "custom_op", None)  # torch >= 2.4 (the floor); tags= from torch 2.8
if _CUSTOM_OP is not None:
    _kw = {"tags": _TAGS} if "tags" in inspect.signature(_CUSTOM_OP).parameters else {}
    experts_op = _CUSTOM_OP(OP_NAME, mutates_args=(), **_kw)(_experts_op)
    experts_op.register_fake(_experts_fake)


def partition_supported() -> bool:
    """Inductor can split CUDA graphs around a `cudagraph_unsafe` op (graph partition: torch >= 2.8)."""
    return bool(_TAGS) and _CUSTOM_OP is not None and "graph_partition" in inductor_config.get_config_copy()


def _calls() -> dict:
    calls = getattr(_ACTIVE, "calls", None)
    if calls is None:
        raise RuntimeError(f"{OP_NAME} runs only inside a compiled decode step (CompiledDecode): call the wrapped "
                           "model's top-level forward or generate")
    return calls


class ExpertsOp:
    """The experts module's forward under compiled decode, one object per layer index shared by every wrapped
    model (`ExpertsOp.of`; dynamo guards on its identity, so a new wrapper replays the same graphs): inside a
    compiled frame, ``(hidden, ids, weights)`` calls become `specmoe::experts` (layer `index`); other calls, and
    eager ones, run the runtime's redirect of the CompiledDecode whose step runs now (a graph break when
    compiling)."""

    _made: dict[int, "ExpertsOp"] = {}

    def __init__(self, index: int):
        self.index = index
        self.eager = torch.compiler.disable(self._redirect)

    @classmethod
    def of(cls, index: int) -> "ExpertsOp":
        if index not in cls._made:
            cls._made[index] = cls(index)
        return cls._made[index]

    def __reduce__(self):  # copies of a wrapped model share it too
        return (ExpertsOp.of, (self.index,))

    def _redirect(self, *args, **kwargs):
        return _calls()[self.index](*args, **kwargs)

    def __call__(self, *args, **kwargs):
        if torch.compiler.is_compiling() and not kwargs and len(args) == 3 and \
                all(isinstance(a, torch.Tensor) for a in args):
            return torch.ops.specmoe.experts(args[0], args[1], args[2], self.index)
        return self.eager(*args, **kwargs)


def _op_wrap(redirect) -> ExpertsOp:
    return ExpertsOp.of(redirect.layer.index)


def experts_wrap(device: torch.device):
    """How each experts call is installed for compiled decode on `device` (`hooks.ExpertsHook(wrap=...)`): the
    custom op (`ExpertsOp`), or on CUDA without graph partition a `torch.compiler.disable` break (logged)."""
    if _CUSTOM_OP is None:
        logger.info("compiled decode: torch %s has no torch.library.custom_op; each experts call is a graph break",
                    torch.__version__)
        return torch.compiler.disable
    if device.type == "cuda" and not partition_supported():
        logger.info("compiled decode: torch %s has no inductor graph partition for cudagraph-unsafe ops; each "
                    "experts call is a graph break (compiled segments around each)", torch.__version__)
        return torch.compiler.disable
    return _op_wrap


def _graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class CompiledDecode:
    """Decode steps of `model` through `torch.compile`, prefill eager; installed on the model until `remove()`.

    Args:
        model: the (wrapped) transformers model; its experts calls already installed by `experts_wrap`.
        num_layers: MoE layers (the decoder layers' forward is one code object compiled once per layer: the
            recompile limit is raised to cover them, around the compiled calls only).
        backend: a torch.compile backend name (`BACKENDS`).
        device: the model's device: CUDA gets ``mode="reduce-overhead"`` (CUDA graphs).
        experts: ``{layer index: the runtime's redirect}``: what `specmoe::experts` runs during this object's
            compiled steps.
    """

    def __init__(self, model, num_layers: int, backend: str = "inductor", device: torch.device | None = None,
                 experts: dict | None = None):
        check_compilable(model)
        self.model = model
        self.backend = backend
        self.mode = "reduce-overhead" if device is not None and device.type == "cuda" and backend == "inductor" \
            else None
        self._own = model.__dict__.get("forward", _MISSING)  # an instance forward that was there (restored)
        self._eager = model.forward
        options = {"mode": self.mode} if self.mode else {}
        self._compiled = torch.compile(self._eager, backend=backend, dynamic=False, fullgraph=False, **options)
        import torch._dynamo.config as dynamo_config

        limit = max(dynamo_config.recompile_limit, 2 * num_layers + 8)
        self._limits = dict(recompile_limit=limit, accumulated_recompile_limit=max(
            dynamo_config.accumulated_recompile_limit, 64 * limit))
        if "nested_graph_breaks" in dynamo_config.get_config_copy():  # torch >= 2.9: the outer frames keep
            self._limits["nested_graph_breaks"] = True  # tracing across an experts call (one break, not one per frame)
        self._patch = dynamo_config.patch
        self._experts = experts or {}
        self.experts_call = "custom op" if any(isinstance(m.__dict__.get("forward", m.__dict__.get("_old_forward")),
                                                          ExpertsOp) for m in model.modules()) else "graph break"
        self._inductor_patch = {}
        if self.mode == "reduce-overhead" and partition_supported():  # CUDA graphs split at each experts op
            self._inductor_patch = {"graph_partition": True}
        params = inspect.signature(type(model).forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"  # transformers >= 5.2x: "cache"
        self._cache = None
        self._cache_key = None
        self.compile_s = 0.0
        self.graphs = 0
        self.compiled_steps = 0
        self.eager_steps = 0
        model.forward = self._dispatch

    # ---- the dispatcher ---------------------------------------------------------------------------------------
    def _is_decode(self, kwargs) -> bool:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None or not getattr(cache, "is_compileable", False):
            return False
        ids = kwargs.get("input_ids")
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        return ids is not None and ids.dim() >= 2 and ids.shape[1] == 1

    def _dispatch(self, *args, **kwargs):
        previous, _ACTIVE.calls = getattr(_ACTIVE, "calls", None), self._experts  # what ExpertsOp runs
        try:
            return self._step(*args, **kwargs)
        finally:
            _ACTIVE.calls = previous

    def _step(self, *args, **kwargs):
        if not self._is_decode(kwargs):
            self.eager_steps += 1
            return self._eager(*args, **kwargs)
        if self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs are consumed
        before = _graphs()
        start = time.perf_counter()
        with self._patch(**self._limits), inductor_config.patch(**self._inductor_patch):
            out = self._compiled(*args, **kwargs)
        new = _graphs() - before
        if new:  # this step compiled graphs: its time is the compile cost (plus one step)
            self.graphs += new
            self.compile_s += time.perf_counter() - start
            logger.info("compiled decode: %d graph(s) in %.1f s (backend %s, experts calls as %s)", new,
                        time.perf_counter() - start, self.backend, self.experts_call)
        self.compiled_steps += 1
        return out

    # ---- generate ----------------------------------------------------------------------------------------------
    def generate_kwargs(self, args: tuple, kwargs: dict) -> dict:
        """`kwargs` of a `generate` call with the static cache it decodes with (reused, reset) and transformers'
        own compilation off (we compile); a cache or cache implementation the caller chose is left alone."""
        if any(k in kwargs for k in ("cache", "past_key_values", "cache_implementation")):
            return kwargs
        ids = kwargs.get("input_ids", args[0] if args and isinstance(args[0], torch.Tensor) else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is None:
            return kwargs
        gen = kwargs.get("generation_config") or self.model.generation_config
        new = kwargs.get("max_new_tokens", gen.max_new_tokens)
        needed = ids.shape[1] + new if new is not None else kwargs.get("max_length", gen.max_length or 20)
        length = MIN_CACHE_LEN
        while length < needed:
            length *= 2
        key = (ids.shape[0], length)
        if self._cache is None or self._cache_key[0] != key[0] or self._cache_key[1] < needed:
            from transformers import StaticCache

            if self._cache is not None:
                logger.info("compiled decode: a new static cache (batch %d, length %d): its graphs compile once",
                            *key)
            self._cache = StaticCache(config=self.model.config, max_cache_len=length)
            self._cache_key = key
        else:
            self._cache.reset()
        out = dict(kwargs)
        out[self.cache_kwarg] = self._cache
        out["disable_compile"] = True  # transformers would compile __call__ itself on CUDA with a static cache
        return out

    def stats(self) -> dict:
        return {"backend": self.backend, "mode": self.mode, "experts_call": self.experts_call, "compile_s": self.compile_s, "graphs": self.graphs,
                "compiled_steps": self.compiled_steps, "eager_steps": self.eager_steps}

    def remove(self) -> None:
        """Put the model's forward back as it was; the static cache is dropped."""
        if self._own is _MISSING:
            self.model.__dict__.pop("forward", None)
        else:
            self.model.forward = self._own
        self._cache = None
