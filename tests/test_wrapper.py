"""The wrapped model gives the unwrapped model's greedy tokens and logits, for every family, capacity and
predictor, right or wrong; and unwrapping gives the model back as it was."""

import contextlib
import sys

import pytest
import torch
from conftest import build_tiny, make_inputs

from specmoe import SpeculativeMoE
from specmoe.predictors import OraclePredictor, PreGatePredictor, RandomPredictor
from specmoe.runtime.adapters import find_moe_layers
from specmoe.traces import capture_routing

NEW_TOKENS = 5


def one_slot_per_layer(model):
    return find_moe_layers(model).geometry.num_layers  # an int: that many slots in total


CAPACITIES = {"one_per_layer": one_slot_per_layer, "quarter": lambda m: 0.25, "half": lambda m: 0.5,
              "full": lambda m: 1.0}
PREDICTORS = {"none": lambda: None, "pregate": lambda: PreGatePredictor(lookahead=2),
              "random": lambda: RandomPredictor(seed=3, lookahead=2)}


def logits_of(call, model, inputs):
    extra = {"decoder_input_ids": inputs["input_ids"][:, :4]} if model.config.is_encoder_decoder else {}
    with torch.no_grad():
        return call(**inputs, **extra).logits


def greedy(call, inputs):
    with torch.no_grad():
        return call(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)


@pytest.mark.parametrize("capacity", sorted(CAPACITIES))
@pytest.mark.parametrize("predictor", sorted(PREDICTORS))
def test_same_tokens_and_logits(family, capacity, predictor):
    model = build_tiny(family)
    inputs = make_inputs(model, batch=3, length=7, left_pad=True)
    ref_tokens = greedy(model.generate, inputs)
    ref_logits = logits_of(model, model, inputs)

    smoe = SpeculativeMoE(model, PREDICTORS[predictor](), cache_capacity=CAPACITIES[capacity](model))
    tokens = greedy(smoe.generate, inputs)
    logits = logits_of(smoe, model, inputs)
    stats = smoe.stats
    smoe.unwrap()

    assert torch.equal(tokens, ref_tokens)
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)
    assert stats.total.hits + stats.total.misses > 0
    if capacity == "one_per_layer":  # prefill needs more distinct experts than slots
        assert stats.chunked_calls > 0


@pytest.mark.parametrize("family", ["qwen2_moe", "gpt_oss", "switch_transformers"])
def test_threaded_engine_same_tokens(family):
    model = build_tiny(family)
    inputs = make_inputs(model, batch=3, left_pad=True)
    ref = greedy(model.generate, inputs)
    smoe = SpeculativeMoE(model, PreGatePredictor(lookahead=2), cache_capacity=0.25, transfer="thread")
    assert torch.equal(greedy(smoe.generate, inputs), ref)
    assert smoe.stats.total.prefetch_issued > 0
    smoe.unwrap()


@pytest.mark.parametrize("family", ["mixtral", "switch_transformers"])
def test_unwrap_restores_parameters_and_forward(family):
    model = build_tiny(family)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = [n for n, _ in model.named_parameters()]
    smoe = SpeculativeMoE(model, RandomPredictor(0), cache_capacity=0.5)
    assert len(list(model.parameters())) < len(names)  # experts left the module
    greedy(smoe.generate, make_inputs(model))
    assert smoe.unwrap() is model
    after = model.state_dict()
    assert [n for n, _ in model.named_parameters()] == names
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(isinstance(p, torch.nn.Parameter) for p in model.parameters())
    assert all("forward" not in layer.experts.__dict__ for layer in find_moe_layers(model).layers)
    SpeculativeMoE(model, cache_capacity=0.5).unwrap()  # and it can be wrapped again


def test_device_holds_non_experts_plus_slots():
    model = build_tiny("qwen2_moe")
    moe = find_moe_layers(model)
    expert_bytes = sum(p.numel() * p.element_size() for layer in moe.layers for p in layer.experts.parameters())
    total_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    smoe = SpeculativeMoE(model, cache_capacity=0.25)
    mem = smoe.memory()
    on_device = sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )
    assert mem["nonexpert_bytes"] == on_device
    assert on_device == total_bytes - expert_bytes + sum(b.numel() * b.element_size() for b in model.buffers())
    assert mem["num_slots"] == 4 and mem["cache_bytes"] == 4 * mem["slot_bytes"]
    assert mem["host_store_bytes"] == 16 * mem["slot_bytes"] >= expert_bytes
    smoe.unwrap()


@contextlib.contextmanager
def count_host_reads(packages=("specmoe.runtime", "specmoe.predictors")):
    """Count tensor -> Python reads (each one a device->host sync on CUDA) made by code in `packages`:
    {(module, method): calls}."""
    counts: dict[tuple[str, str], int] = {}
    names = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy", "nonzero")
    original = {n: getattr(torch.Tensor, n) for n in names}

    def counting(name, method):
        def wrapped(self, *args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if caller.startswith(packages):
                counts[(caller, name)] = counts.get((caller, name), 0) + 1
            return method(self, *args, **kwargs)
        return wrapped

    for name, method in original.items():
        setattr(torch.Tensor, name, counting(name, method))
    try:
        yield counts
    finally:
        for name, method in original.items():
            setattr(torch.Tensor, name, method)


def test_stats_are_consistent():
    model = build_tiny("olmoe")
    inputs = make_inputs(model, batch=2)
    smoe = SpeculativeMoE(model, PreGatePredictor(), cache_capacity=0.5)
    with capture_routing(model) as cap, count_host_reads() as reads:
        greedy(smoe.generate, inputs)
    s = smoe.stats
    distinct = sum(len(set(p.ids[:, layer].flatten().tolist()) - {-1}) for p in cap.passes for layer in range(2))
    assert s.total.hits + s.total.misses == distinct
    assert s.total.bytes_moved == (s.total.misses + s.total.prefetch_issued) * smoe.memory()["slot_bytes"]
    assert s.total.prefetch_used + s.total.prefetch_wasted <= s.total.prefetch_issued
    # the counter is checked against the tensor reads the runtime and predictor really made: one per layer call
    assert sum(reads.values()) == s.host_syncs == s.layer_calls == 2 * len(cap.passes), reads
    for name in ("hits", "misses", "prefetch_issued", "prefetch_used", "prefetch_wasted", "bytes_moved"):
        assert getattr(s.total, name) == sum(getattr(layer, name) for layer in s.per_layer)
    text = str(s)  # the printed report shows these figures, not others
    assert f"hit rate {s.hit_rate:.3f} ({s.total.hits} hits" in text and f"{s.total.misses} misses" in text
    rows = [tuple(int(x) for x in line.split()) for line in text.splitlines()[-len(s.per_layer):]]
    assert rows == [(i, l.hits, l.misses, l.prefetch_issued, l.prefetch_used, l.prefetch_wasted)
                    for i, l in enumerate(s.per_layer)]
    smoe.reset_stats()
    assert smoe.stats.total.hits == 0 and smoe.stats.layer_calls == 0
    smoe.unwrap()


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_oracle_leaves_only_first_layer_misses(family):
    """With recorded routing replayed one layer ahead (and across the token boundary) and room for
    everything, only the first layer of the first pass misses."""
    model = build_tiny(family)
    inputs = make_inputs(model, batch=3, left_pad=True)
    with capture_routing(model) as cap:
        ref = greedy(model.generate, inputs)
    smoe = SpeculativeMoE(model, OraclePredictor([p.ids for p in cap.passes]), cache_capacity=1.0,
                          max_prefetch_inflight=64)
    assert torch.equal(greedy(smoe.generate, inputs), ref)
    s = smoe.stats
    first_pass_layer0 = len(set(cap.passes[0].ids[:, 0].flatten().tolist()))
    assert s.per_layer[0].misses == first_pass_layer0
    assert all(layer.misses == 0 for layer in s.per_layer[1:])
    assert s.total.prefetch_wasted == 0
    smoe.unwrap()


def test_no_predictor_capacity_one_hits_after_warmup():
    model = build_tiny("mixtral")
    inputs = make_inputs(model)
    smoe = SpeculativeMoE(model, cache_capacity=1.0)
    greedy(smoe.generate, inputs)
    smoe.reset_stats()
    greedy(smoe.generate, inputs)  # everything was loaded by the first call
    assert smoe.stats.total.misses == 0 and smoe.stats.hit_rate == 1.0
    smoe.unwrap()


@pytest.mark.parametrize("capacity", ["one_per_layer", "half"])
def test_pool_compute_same_tokens(family, capacity):
    """The "pool" strategy (the experts implementation runs on all S slots) gives the same results."""
    model = build_tiny(family)
    inputs = make_inputs(model, batch=3, left_pad=True)
    ref = greedy(model.generate, inputs)
    smoe = SpeculativeMoE(model, PreGatePredictor(), cache_capacity=CAPACITIES[capacity](model), compute="pool")
    assert torch.equal(greedy(smoe.generate, inputs), ref)
    smoe.unwrap()


class SlowPrefetchEngine:
    """A CPU copy engine whose prefetch copies land only when waited on, or one per released layer.
    Records the most prefetches it ever had in flight."""

    kind = "slow"

    def __init__(self, num_slots):
        from specmoe.runtime.transfer import CopyEngine

        self.base = CopyEngine(num_slots)
        self.held = {}  # slot -> (dst, src)
        self.most_in_flight = 0
        self.stall_s, self.waits = 0.0, 0

    def copy_in(self, slot, dst, src, demand):
        assert slot not in self.held, "a slot was reused while its copy was in flight"
        if demand:
            dst.copy_(src)
        else:
            self.held[slot] = (dst, src)
            self.most_in_flight = max(self.most_in_flight, len(self.held))

    def _land(self, slot):
        dst, src = self.held.pop(slot)
        dst.copy_(src)

    def ready(self, slot):
        return slot not in self.held

    def wait(self, slots):
        for s in slots:
            if s in self.held:
                self._land(s)

    wait_host = lambda self, s: self.wait([s])  # noqa: E731

    def release(self, slots):
        if self.held:
            self._land(next(iter(self.held)))

    def synchronize(self):
        for s in list(self.held):
            self._land(s)

    def stall_seconds(self):
        return 0.0

    def reset_stall(self):
        pass

    def close(self):
        pass


@pytest.mark.parametrize("bound", [1, 3])
def test_prefetches_in_flight_are_bounded(monkeypatch, bound):
    import specmoe.runtime.wrapper as wrapper_module

    engines = []
    monkeypatch.setattr(wrapper_module, "make_engine", lambda kind, n, dev: engines.append(SlowPrefetchEngine(n)) or engines[-1])
    model = build_tiny("qwen3_moe")
    inputs = make_inputs(model, batch=3, left_pad=True)
    ref = greedy(model.generate, inputs)
    smoe = SpeculativeMoE(model, RandomPredictor(seed=1, lookahead=2), cache_capacity=0.5,
                          max_prefetch_inflight=bound, policy="lru")  # LRU leaves room for guesses here
    assert torch.equal(greedy(smoe.generate, inputs), ref)
    assert engines[0].most_in_flight == bound  # reached, never exceeded
    assert smoe.stats.total.prefetch_issued > bound
    smoe.unwrap()


def test_set_predictor_swaps_without_rewrapping():
    model = build_tiny("qwen2_moe")
    inputs = make_inputs(model, batch=2)
    ref = greedy(model.generate, inputs)
    smoe = SpeculativeMoE(model, cache_capacity=0.5)
    assert smoe.max_prefetch_inflight == 2 * 2 * 1
    smoe.set_predictor(PreGatePredictor(lookahead=3))
    assert smoe.max_prefetch_inflight == 2 * 2 * 3
    assert torch.equal(greedy(smoe.generate, inputs), ref)
    assert smoe.stats.total.prefetch_issued > 0
    with pytest.raises(TypeError, match="Predictor protocol"):
        smoe.set_predictor("oracle")
    smoe.set_predictor(None)
    smoe.reset_stats()
    greedy(smoe.generate, inputs)
    assert smoe.stats.total.prefetch_issued == 0
    smoe.unwrap()
