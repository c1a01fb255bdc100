"""load_offloaded streams checkpoints: meta model, non-expert weights assigned, experts read from the files."""

import pytest
import torch
import transformers
from conftest import build_tiny, make_inputs

from specmoe import SpeculativeMoE, load_offloaded
from specmoe.predictors import PreGatePredictor
from specmoe.runtime.store import FileStore, HostStore

FUSED = ["deepseek_v3", "gpt_oss", "granitemoe", "mixtral", "olmoe", "phimoe", "qwen2_moe", "qwen3_moe"]


@pytest.fixture
def no_from_pretrained(monkeypatch):
    """Streaming must never load the whole model through transformers."""
    def refuse(*a, **k):
        raise AssertionError("from_pretrained called: the whole model would be materialised")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(refuse))


def _reference(model, inputs, n=4):
    with torch.no_grad():
        return model.generate(**inputs, max_new_tokens=n, do_sample=False)


@pytest.mark.parametrize("family", FUSED)
@pytest.mark.parametrize("host_store", ["ram", "mmap"])
def test_streamed_model_gives_the_saved_models_tokens(tmp_path, family, host_store, no_from_pretrained):
    model = build_tiny(family)
    model.save_pretrained(tmp_path, max_shard_size="100KB")  # several shards and an index
    assert (tmp_path / "model.safetensors.index.json").is_file()
    inputs = make_inputs(model, batch=2, left_pad=True)
    ref = _reference(model, inputs)
    smoe = load_offloaded(tmp_path, device="cpu", cache_capacity=0.5, predictor=PreGatePredictor(),
                          host_store=host_store)
    assert smoe.store_path.startswith(host_store), smoe.store_path
    assert isinstance(smoe.store, FileStore if host_store == "mmap" else HostStore)
    assert not any(p.device.type == "meta" for p in smoe.model.parameters())
    assert torch.equal(_reference(smoe, inputs), ref)
    unwrapped = smoe.unwrap()  # the experts come back from the files into host memory
    assert torch.equal(_reference(unwrapped, inputs), ref)


def test_mmap_store_holds_no_expert_bytes_and_reads_what_ram_holds(tmp_path):
    model = build_tiny("qwen2_moe")
    model.save_pretrained(tmp_path)
    ram = load_offloaded(tmp_path, device="cpu", host_store="ram")
    mm = load_offloaded(tmp_path, device="cpu", host_store="mmap")
    assert mm.store.nbytes == 0 and ram.store.nbytes == len(ram.store) * ram.store.layout.nbytes
    for key in [(0, 0), (1, 7), (0, 5)]:
        assert torch.equal(mm.store[key], ram.store[key])


def test_compression_with_mmap_builds_the_store_layer_by_layer_and_says_so(tmp_path, caplog):
    model = build_tiny("mixtral")
    model.save_pretrained(tmp_path)
    inputs = make_inputs(model)
    with caplog.at_level("WARNING"):
        smoe = load_offloaded(tmp_path, device="cpu", host_store="mmap", compression="int8")
    assert smoe.store_path.startswith("ram") and "compression" in smoe.store_path
    assert "cannot serve copies from the files" in caplog.text
    expected = SpeculativeMoE(build_tiny("mixtral"), None, 0.5, device="cpu", compression="int8")
    assert torch.equal(smoe.store.arena, expected.store.arena)  # same compressed bytes as from the model
    assert torch.equal(_reference(smoe, inputs), _reference(expected, inputs))


def test_a_dtype_change_cannot_be_served_from_the_files(tmp_path):
    model = build_tiny("olmoe")
    model.save_pretrained(tmp_path)
    inputs = make_inputs(model)
    smoe = load_offloaded(tmp_path, device="cpu", host_store="mmap", dtype=torch.bfloat16)
    assert smoe.store_path.startswith("ram") and "dtype" in smoe.store_path
    assert smoe.store.layout.specs[0].dtype == torch.bfloat16
    with torch.no_grad():
        bf16 = build_tiny("olmoe").to(torch.bfloat16).generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(_reference(smoe, inputs), bf16)


def test_bad_host_store_and_pickle_only_checkpoints_are_refused(tmp_path):
    with pytest.raises(ValueError, match="host_store"):
        load_offloaded(tmp_path, host_store="disk")
    model = build_tiny("mixtral")
    model.config.save_pretrained(tmp_path)
    torch.save({}, tmp_path / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        load_offloaded(tmp_path, device="cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("host_store", ["ram", "mmap"])
def test_streamed_model_on_cuda_gives_the_saved_models_tokens(tmp_path, host_store):
    model = build_tiny("qwen2_moe", dtype=torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    inputs = make_inputs(model)
    ref = _reference(model.to("cuda"), {k: v.cuda() for k, v in inputs.items()}).cpu()
    smoe = load_offloaded(tmp_path, device="cuda", cache_capacity=0.25, predictor=PreGatePredictor(),
                          host_store=host_store)
    assert smoe.store_path.startswith(host_store)
    assert torch.equal(_reference(smoe, inputs).cpu(), ref)


def test_modulelist_experts_fall_back_to_from_pretrained_and_say_so(tmp_path, caplog):
    model = build_tiny("switch_transformers")
    model.save_pretrained(tmp_path)
    inputs = make_inputs(model)
    with caplog.at_level("WARNING"):
        smoe = load_offloaded(tmp_path, device="cpu")
    assert "cannot stream" in caplog.text and smoe.store_path.startswith("ram: copied from the model")
    assert torch.equal(_reference(smoe, inputs), _reference(model, inputs))
