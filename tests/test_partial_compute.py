"""Partial compute (chunks of slots, experts on the host): what a chunk reads, and the tokens it gives."""

import torch
from conftest import build_tiny, make_inputs

from specmoe import SpeculativeMoE
from specmoe.predictors import PreGatePredictor


def _generate(model, inputs, n=4):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False)


def poison_other_slots(smoe):
    """While a partial compute runs, every slot outside its chunk holds NaN bytes, as a slot may whose copy is
    still landing (or that torch.empty never filled). Returns the list of calls' (chunk slots, poisoned)."""
    compute, calls = smoe.experts_compute.compute, []

    def poisoned(layer, args, kwargs, ids, weights, chosen, partial):
        if not partial:
            return compute(layer, args, kwargs, ids, weights, chosen, partial)
        smoe.engine.synchronize()  # no copy of the threaded engine lands while we swap bytes
        mine = set(smoe.cache.table[layer.index][chosen].tolist())
        others = [s for s in range(smoe.num_slots) if s not in mine]
        saved = smoe.pool.data[others].clone()
        smoe.pool.data[others] = torch.full_like(saved.view(torch.float32), float("nan")).view(torch.uint8)
        try:
            return compute(layer, args, kwargs, ids, weights, chosen, partial)
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
