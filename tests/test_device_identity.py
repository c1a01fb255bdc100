"""Device identity: "cuda" and cuda:0 are one device, but torch.device("cuda") != torch.device("cuda:0"); the
runtime compares indexed devices only. Runs without CUDA (fake tensors report cuda:0)."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from specmoe.runtime.checks import check_device_memory, indexed_device, resolve_device


@pytest.fixture
def cuda_0(monkeypatch):
    """A machine whose current CUDA device is 0 (nothing runs on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_devices_are_indexed(cuda_0):
    assert indexed_device("cuda") == torch.device("cuda", 0)
    assert indexed_device(torch.device("cuda", 1)) == torch.device("cuda", 1)
    assert indexed_device("cpu") == torch.device("cpu")
    assert resolve_device(nn.Linear(2, 2), "cuda") == torch.device("cuda", 0)
    assert resolve_device(nn.Linear(2, 2), None) == torch.device("cuda", 0)


def test_weights_already_on_the_device_are_not_counted_again(cuda_0, monkeypatch):
    """1 GiB of non-expert weights already on cuda:0 and 0.5 GiB free: a 0.25 GiB cache fits, asked as "cuda"."""
    with FakeTensorMode(allow_non_fake_inputs=True):
        weight = torch.empty(2**28, device="cuda")  # 1 GiB, float32, reports cuda:0
    model = nn.Module()
    model.weight = nn.Parameter(weight, requires_grad=False)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**29, 2**31))
    check_device_memory(model, SimpleNamespace(layers=[]), torch.device("cuda"), 2**28)
    with pytest.raises(ValueError, match="lower cache_capacity"):  # and one that does not fit is still refused
        check_device_memory(model, SimpleNamespace(layers=[]), torch.device("cuda"), 2**30)
