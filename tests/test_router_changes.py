"""A router changed after wrapping: the wrapped model follows it, as the unwrapped model does."""

import pytest
import torch
from conftest import build_tiny, make_inputs

from specmoe import SpeculativeMoE
from specmoe.predictors import PreGatePredictor


def _set_top_k(model, k: int) -> int:
    routers = [m for m in model.modules() if isinstance(getattr(m, "top_k", None), int) and hasattr(m, "weight")]
    for router in routers:
        router.top_k = k
    return len(routers)


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
@pytest.mark.parametrize("top_k", [1, 3])
def test_a_router_top_k_changed_after_wrapping(family, top_k):
    """gate.top_k 2 -> 1 or 3 after wrapping (the predictor's history was [T, L, 2]: 3 crashed, 1 was broadcast)."""
    model = build_tiny(family)
    inputs = make_inputs(model, batch=2, length=6)
    smoe = SpeculativeMoE(model, PreGatePredictor(), cache_capacity=0.5)
    assert _set_top_k(model, top_k) == 2
    seen = []
    predict = smoe.predictor.predict
    smoe.predictor.predict = lambda layer, hidden, history: seen.append(history[:, layer].clone()) or predict(
        layer, hidden, history)
    with torch.no_grad():
        out = smoe.generate(**inputs, max_new_tokens=3, do_sample=False)
    smoe.unwrap()
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert torch.equal(out, ref)
    last = seen[-1]  # [T, 2] the width the predictor was bound with
    assert last.shape[1] == 2
    if top_k == 1:  # fewer routes: -1 (no expert), not the one route twice
        assert (last[:, 1] == -1).all() and (last[:, 0] >= 0).all()
    else:
        assert (last >= 0).all()
