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


def test_streaming_load_uses_only_what_transformers_5_17_has(tmp_path, monkeypatch):
    """transformers 5.17 (the GPU machines' release, setup.py's floor) has no core_model_loading.apply_renamings:
    the expert plan must be built from rename_source_key alone (.ci/run also runs these tests on 5.17)."""
    import sys

    import transformers.core_model_loading as cml

    real = getattr(cml, "apply_renamings", None)

    def absent_in_5_17(*args, **kwargs):  # transformers' own functions may still use it
        if sys._getframe(1).f_globals.get("__name__", "").startswith("specmoe"):
            raise AssertionError("specmoe called core_model_loading.apply_renamings, which transformers 5.17 lacks")
        return real(*args, **kwargs)

    if real is not None:
        monkeypatch.setattr(cml, "apply_renamings", absent_in_5_17)
    model = build_tiny("qwen2_moe")
    model.save_pretrained(tmp_path)
    inputs = make_inputs(model)
    with torch.no_grad():
        ref = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    smoe = load_offloaded(tmp_path, device="cpu", cache_capacity=0.5)
    with torch.no_grad():
        assert torch.equal(smoe.generate(**inputs, max_new_tokens=3, do_sample=False), ref)
