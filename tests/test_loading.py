import pytest
import torch
from conftest import build_tiny, make_inputs

from specmoe import load_offloaded
from specmoe.predictors import PreGatePredictor


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_load_offloaded_matches_the_saved_model(tmp_path, family):
    model = build_tiny(family)
    model.save_pretrained(tmp_path)
    inputs = make_inputs(model, batch=2, left_pad=True)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    smoe = load_offloaded(tmp_path, device="cpu", cache_capacity=0.5, predictor=PreGatePredictor())
    assert not any("experts" in n for n, _ in smoe.model.named_parameters())  # experts are in the store
    assert smoe.memory()["num_slots"] == 8
    with torch.no_grad():
        out = smoe.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(out, ref)


def test_load_offloaded_refuses_a_non_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_offloaded(tmp_path)
