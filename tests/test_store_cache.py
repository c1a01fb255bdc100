import pytest
import torch

from specmoe.runtime.adapters import ExpertTensorSpec
from specmoe.runtime.cache import ExpertCache, LFUPolicy, LRUPolicy, SlotPool, make_policy
from specmoe.runtime.store import ALIGN, ExpertLayout, HostStore

SPECS = (
    ExpertTensorSpec("gate_up_proj", (6, 5), torch.bfloat16),
    ExpertTensorSpec("bias", (3,), torch.float32),
    ExpertTensorSpec("down_proj", (5, 3), torch.float16),
)


def test_layout_offsets_are_aligned_and_cover_every_tensor():
    layout = ExpertLayout(SPECS)
    assert all(off % ALIGN == 0 for off in layout.offsets.values())
    assert layout.nbytes % ALIGN == 0
    ends = sorted((layout.offsets[s.name], layout.offsets[s.name] + s.nbytes) for s in SPECS)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(ends, ends[1:]))  # no overlap


def test_store_round_trip_one_contiguous_buffer_per_expert():
    layout = ExpertLayout(SPECS)
    store = HostStore(layout, num_layers=2, num_experts=3)
    expected = {}
    for key in store:
        tensors = {s.name: torch.randn(s.shape).to(s.dtype) for s in SPECS}
        store.write(key, tensors)
        expected[key] = tensors
    assert len(store) == 6
    for key, tensors in expected.items():
        buf = store[key]
        assert buf.is_contiguous() and buf.dtype == torch.uint8 and buf.numel() == layout.nbytes
        for name, t in store.expert(key).items():
            assert torch.equal(t, tensors[name])
    stacked = store.layer_tensors(1)
    assert torch.equal(stacked["down_proj"][2], expected[(1, 2)]["down_proj"])
    with pytest.raises(KeyError):
        store[(2, 0)]


def test_pack_checks_shapes():
    layout = ExpertLayout(SPECS)
    store = HostStore(layout, 1, 1)
    bad = {s.name: torch.zeros(s.shape) for s in SPECS}
    bad["bias"] = torch.zeros(4)
    with pytest.raises(ValueError, match="bias"):
        store.write((0, 0), bad)


def test_slot_pool_views_match_a_copied_buffer():
    layout = ExpertLayout(SPECS)
    store = HostStore(layout, 1, 2)
    store.write((0, 1), {s.name: torch.full(s.shape, 7.0).to(s.dtype) for s in SPECS})
    pool = SlotPool(layout, num_slots=3, device=torch.device("cpu"))
    pool.data[2].copy_(store[(0, 1)])  # one copy moves the whole expert
    assert pool.views["gate_up_proj"].shape == (3, 6, 5)
    assert torch.all(pool.views["gate_up_proj"][2] == 7) and torch.all(pool.views["bias"][2] == 7)


def test_lru_victim_is_least_recent_allowed():
    p = LRUPolicy()
    for s in (0, 1, 2):
        p.touch(s)
    p.touch(0)
    assert p.victim(lambda s: True) == 1
    assert p.victim(lambda s: s != 1) == 2


def test_lfu_prefers_rarely_used():
    p = LFUPolicy()
    for s in (0, 1, 2, 0, 0, 2):
        p.touch(s)
    assert p.victim(lambda s: True) == 1
    assert p.victim(lambda s: s != 1) == 2


def test_policy_is_replaceable_and_checked():
    with pytest.raises(ValueError, match="lru"):
        make_policy("fifo")
    with pytest.raises(TypeError):
        make_policy(object())


def test_cache_assign_fills_free_slots_then_evicts_and_keeps_the_device_table():
    cache = ExpertCache(num_slots=2, num_layers=2, num_experts=4, device=torch.device("cpu"))
    s0, ev = cache.assign((0, 1), lambda s: True)
    assert ev is None
    s1, _ = cache.assign((1, 3), lambda s: True)
    assert {s0, s1} == {0, 1}
    assert cache.table[0, 1] == s0 and cache.table[1, 3] == s1
    # (0, 1) is in use: the victim must be the other slot even though (0, 1) is older
    slot, evicted = cache.assign((0, 2), lambda s: s != s0)
    assert slot == s1 and evicted == (1, 3)
    assert cache.table[1, 3] == -1 and cache.table[0, 2] == s1
    assert cache.assign((1, 0), lambda s: False) is None  # nothing may go: refuse, change nothing
    assert cache.resident() == {(0, 1), (0, 2)}
