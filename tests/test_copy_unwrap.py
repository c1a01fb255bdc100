"""A wrapped model survives `copy.deepcopy` (the copy runs its own runtime and unwraps to a working model), and
`memory()` after `unwrap()` says what happened (issue 21 items 3, 4)."""

import copy

import pytest
import torch

from conftest import build_tiny, make_inputs
from specmoe import SpeculativeMoE
from specmoe.predictors import make_predictor


def _greedy(model, inputs):
    return model.generate(**inputs, max_new_tokens=5, do_sample=False)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "switch_transformers"])
def test_deepcopy_of_wrapped_then_unwrap(family):
    model = build_tiny(family)
    inputs = make_inputs(model)
    expected = _greedy(model, inputs)
    smoe = SpeculativeMoE(model, make_predictor("pregate") if family != "switch_transformers" else None,
                          cache_capacity=4)
    twin = copy.deepcopy(smoe)
    assert twin.model is not smoe.model and twin.scheduler is not smoe.scheduler
    assert torch.equal(twin.generate(**inputs, max_new_tokens=5, do_sample=False), expected)
    # the copy ran on its own runtime: the original's counters did not move
    assert twin.stats.hits + twin.stats.misses > 0 and smoe.stats.hits + smoe.stats.misses == 0
    assert torch.equal(_greedy(twin.unwrap(), inputs), expected)
    assert torch.equal(smoe.generate(**inputs, max_new_tokens=5, do_sample=False), expected)
    # a copy of the wrapped model itself (its wrapper comes along)
    model_copy = copy.deepcopy(smoe.model)
    assert torch.equal(_greedy(model_copy._specmoe_wrapper.unwrap(), inputs), expected)
    assert torch.equal(_greedy(smoe.unwrap(), inputs), expected)


def test_memory_after_unwrap_is_a_clear_error():
    smoe = SpeculativeMoE(build_tiny("mixtral"), None, cache_capacity=4)
    assert smoe.memory()["num_slots"] == 4
    smoe.unwrap()
    with pytest.raises(RuntimeError, match="after unwrap"):
        smoe.memory()


@pytest.mark.parametrize("kwargs", [dict(transfer="thread"), dict(misses="host")])
def test_a_wrapper_with_worker_threads_says_why_it_cannot_be_copied(kwargs):
    smoe = SpeculativeMoE(build_tiny("mixtral"), None, cache_capacity=4, **kwargs)
    with pytest.raises(TypeError, match="cannot be deep-copied"):
        copy.deepcopy(smoe)
    smoe.unwrap()
