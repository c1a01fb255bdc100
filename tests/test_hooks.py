"""Patching composes with accelerate's hooks: a hook on an experts module keeps running while wrapped and after
unwrap(), and a model with weights on the meta device (accelerate disk offload) is refused with what to do."""

import pytest
import torch
from accelerate.hooks import AlignDevicesHook, ModelHook, add_hook_to_module, remove_hook_from_module
from conftest import build_tiny, make_inputs

from specmoe import SpeculativeMoE
from specmoe.predictors import PreGatePredictor
from specmoe.runtime.adapters import find_moe_layers


class CountingHook(ModelHook):
    def __init__(self):
        self.calls = 0

    def pre_forward(self, module, *args, **kwargs):
        self.calls += 1
        return args, kwargs


def _generate(m, inputs):
    with torch.no_grad():
        return m.generate(**inputs, max_new_tokens=3, do_sample=False)


@pytest.mark.parametrize("family", ["mixtral", "switch_transformers"])
def test_an_accelerate_hook_keeps_working_while_wrapped_and_after_unwrap(family):
    model = build_tiny(family)
    inputs = make_inputs(model)
    ref = _generate(model, inputs)
    experts = find_moe_layers(model).layers[0].experts
    hook = CountingHook()
    add_hook_to_module(experts, hook)
    hooked_forward, old_forward = experts.forward, experts._old_forward
    smoe = SpeculativeMoE(model, PreGatePredictor(), 0.5, device="cpu")
    assert torch.equal(_generate(smoe, inputs), ref)
    assert hook.calls > 0  # not bypassed while wrapped
    during = hook.calls
    assert smoe.stats.misses > 0  # and the runtime ran under it
    smoe.unwrap()
    assert experts.forward is hooked_forward and experts._old_forward is old_forward and experts._hf_hook is hook
    assert torch.equal(_generate(model, inputs), ref) and hook.calls > during  # the hook still runs
    remove_hook_from_module(experts)
    assert experts.forward.__func__ is type(experts).forward and not hasattr(experts, "_old_forward")  # as before


def test_an_align_devices_hook_on_the_experts_composes():
    model = build_tiny("qwen2_moe")
    inputs = make_inputs(model, batch=2, left_pad=True)
    ref = _generate(model, inputs)
    for layer in find_moe_layers(model).layers:
        add_hook_to_module(layer.experts, AlignDevicesHook(execution_device="cpu", io_same_device=True))
    smoe = SpeculativeMoE(model, PreGatePredictor(), 0.25, device="cpu")
    assert torch.equal(_generate(smoe, inputs), ref)
    assert torch.equal(_generate(smoe.unwrap(), inputs), ref)


def test_unwrap_restores_exactly_what_was_on_the_instance():
    model = build_tiny("mixtral")
    experts = find_moe_layers(model).layers[0].experts
    SpeculativeMoE(model, None, 0.5, device="cpu").unwrap()
    assert "forward" not in experts.__dict__ and "_old_forward" not in experts.__dict__


def test_a_disk_offloaded_model_is_refused_with_what_to_do(tmp_path):
    from accelerate import disk_offload

    model = build_tiny("mixtral")
    inputs = make_inputs(model)
    ref = _generate(model, inputs)
    disk_offload(model, str(tmp_path / "offload"), execution_device="cpu")
    with pytest.raises(ValueError, match="meta device.*load_offloaded"):
        SpeculativeMoE(model, None, 0.5, device="cpu")
    assert torch.equal(_generate(model, inputs), ref)  # untouched: accelerate's offload still runs it
