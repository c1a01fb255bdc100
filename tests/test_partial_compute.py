"""Partial compute (chunks of slots, experts on the host): what a chunk reads, and the tokens it gives."""

import pytest
import torch
from conftest import FAMILIES, build_tiny, make_inputs

from specmoe import SpeculativeMoE
from specmoe.predictors import PreGatePredictor
from specmoe.runtime.adapters import find_moe_layers


def _generate(model, inputs, n=4):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False)


def poison_other_slots(smoe):
    """While a layer call's part computes, every slot outside its chunk holds NaN bytes, as a slot may whose copy
    is still landing (or that torch.empty never filled). Returns each call's (chunk slots, poisoned slots)."""
    compute, calls = smoe.experts_compute.compute, []

    def poisoned(layer, args, kwargs, ids, weights, chosen):
        smoe.engine.synchronize()  # no copy of the threaded engine lands while we swap bytes
        mine = set(smoe.cache.table[layer.index][chosen].tolist())
        others = [s for s in range(smoe.num_slots) if s not in mine]
        saved = smoe.pool.data[others].clone()
        smoe.pool.data[others] = torch.full_like(saved.view(torch.float32), float("nan")).view(torch.uint8)
        try:
            return compute(layer, args, kwargs, ids, weights, chosen)
        finally:
            smoe.pool.data[others] = saved
            calls.append((sorted(mine), others))

    smoe.experts_compute.compute = poisoned
    return calls


def test_a_chunk_reads_only_its_own_slots():
    """Masked routes (experts of other chunks, or on the host) once went to slot 0, which the compute never
    waited on: NaN there x weight 0 = NaN in the output. Prefetched experts on the device, misses on the host."""
    model = build_tiny("qwen2_moe")
    inputs = make_inputs(model, batch=2)
    ref = _generate(model, inputs)
    smoe = SpeculativeMoE(model, PreGatePredictor(), cache_capacity=4, compute="pool", transfer="thread",
                          misses="host")
    calls = poison_other_slots(smoe)
    out = _generate(smoe, inputs)
    assert any(0 in others for _, others in calls)  # slot 0 was poisoned during some partial call
    assert torch.equal(out, ref)
    smoe.unwrap()


def _generate_logits(model, inputs, n=3):
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=n, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences, torch.stack(out.logits)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_logits_are_the_unwrapped_models_bits(family):
    """bf16, every family: a layer call split over chunks (from one slot per layer) and the host gives the
    unwrapped model's logits bit for bit at every step, so its greedy tokens whatever the margins."""
    model = build_tiny(family, dtype=torch.bfloat16)
    inputs = make_inputs(model, batch=2, length=8)
    ref_tokens, ref_logits = _generate_logits(model, inputs)
    layers = find_moe_layers(model).geometry.num_layers
    for capacity in (layers, 0.5, 1.0):
        for misses in ("fetch", "host", "auto"):
            predictor = PreGatePredictor() if misses == "host" else None
            smoe = SpeculativeMoE(model, predictor, cache_capacity=capacity, misses=misses, compression=None)
            tokens, logits = _generate_logits(smoe, inputs)
            smoe.unwrap()
            assert torch.equal(logits, ref_logits), (capacity, misses, (logits - ref_logits).abs().max().item())
            assert torch.equal(tokens, ref_tokens), (capacity, misses)


@pytest.mark.parametrize("family, dtype, implementation, capacities", [
    ("mixtral", torch.bfloat16, "eager", ("one per layer", 1.0)),  # the family's loop: bf16 index_add_ by expert
    ("qwen2_moe", torch.bfloat16, "batched_mm", ("one per layer", 1.0)),
    # biases, float32: the host runs the model's implementation (not the family's eager loop), so host routes
    # have the device's bits. (Chunks of one slot are not bit-exact here: float32 grouped_mm rows on the CPU
    # depend on what else the call holds; the tokens still are the model's.)
    ("gpt_oss", torch.float32, "grouped_mm", (0.5, 1.0)),
])
def test_each_experts_implementation_is_summed_as_it_sums(family, dtype, implementation, capacities):
    model = build_tiny(family, dtype=dtype)
    model.set_experts_implementation(implementation)
    inputs = make_inputs(model, batch=2, length=8)
    ref_tokens, ref_logits = _generate_logits(model, inputs)
    layers = find_moe_layers(model).geometry.num_layers
    for capacity in capacities:
        capacity = layers if capacity == "one per layer" else capacity
        for misses in ("fetch", "host"):
            smoe = SpeculativeMoE(model, PreGatePredictor(), cache_capacity=capacity, misses=misses)
            tokens, logits = _generate_logits(smoe, inputs)
            smoe.unwrap()
            assert torch.equal(logits, ref_logits), (capacity, misses, (logits - ref_logits).abs().max().item())
            assert torch.equal(tokens, ref_tokens)
