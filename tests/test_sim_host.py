"""The simulator with misses computed on the host: host profiles, the per-miss decision, the overlap of host and
device, the static placement, and the bound max(device compute, copied bytes / bandwidth, host compute)."""

import functools

import pytest
from test_sim_engine import OPS, random_stream, tiny_shape

from specmoe.sim.bounds import bypass_misses, host_bound
from specmoe.sim.engine import simulate
from specmoe.sim.hardware import PROFILES
from specmoe.sim.host import HOST_PROFILES, KERNEL_FORMATS, HostKernel, HostProfile, expert_format

BOX = HOST_PROFILES["3090-box"]


def brute_force_bypass_misses(stream, slots: int) -> int:
    """Fewest misses over the (layer, expert) accesses when a miss may load (evicting anything) or bypass."""
    keys = [(layer, e) for ids in stream.passes() for layer in range(stream.num_layers)
            for e in sorted({e for e in ids[:, layer].flatten().tolist() if e >= 0})]

    @functools.lru_cache(maxsize=None)
    def best(pos: int, resident: frozenset) -> int:
        if pos == len(keys):
            return 0
        key = keys[pos]
        if key in resident:
            return best(pos + 1, resident)
        options = [best(pos + 1, resident)]  # bypass
        if len(resident) < slots:
            options.append(best(pos + 1, resident | {key}))
        else:
            options += [best(pos + 1, (resident - {v}) | {key}) for v in resident]
        return 1 + min(options)

    return best(0, frozenset())
KW = dict(ops=OPS, warmup_passes=4)


def host_at(bandwidth: float, **changes) -> HostProfile:
    """The 3090-box with RAM and kernels streaming at `bandwidth` bytes/s (and arithmetic to match)."""
    kernels = tuple((fmt, HostKernel(bandwidth, bandwidth * 1000)) for fmt in KERNEL_FORMATS)
    return BOX.with_(name="scaled", memory_bytes_per_s=bandwidth, kernels=kernels, **changes)


def slow_host(factor: float) -> HostProfile:
    return host_at(BOX.memory_bytes_per_s / factor)


def test_presets_have_sources_and_bandwidth_bound_decode():
    for p in HOST_PROFILES.values():
        # RAM from a datasheet, the kernel rates from this project's kernel as measured (AVX2 build, 8 threads)
        assert "JEDEC" in p.source and p.cores > 1 and "host_kernels.py --calibrate" in p.source
        assert p.kernel_name == "specmoe-host-avx2" and p.threads == 8
        # a DeepSeek-V2-Lite expert (17.3 MB bf16) at one token: its bytes over RAM bound the time
        t = p.expert_seconds(17_301_504, 8_650_752, 1, "bf16")
        k = p.kernel("bf16")
        assert t == pytest.approx(p.expert_call_s + max(17_301_504 / min(p.memory_bytes_per_s, k.bytes_per_s),
                                                        2 * 8_650_752 / k.flops))
        assert 0.2e-3 < t < 0.6e-3  # the 0.3-0.5 ms, with the call overhead
        # more tokens: arithmetic takes over, never less time
        assert p.expert_seconds(17_301_504, 8_650_752, 64, "bf16") > t
    assert HostProfile.from_name("3090_Box") is BOX
    assert expert_format("bf16", "int4-g128") == "int4" and expert_format("bf16", "none") == "bf16"
    with pytest.raises(ValueError, match="choose one of"):
        HostProfile.from_name("pentium")
    with pytest.raises(ValueError, match="kernels for"):
        HostProfile("x", 1e9, 2, 1e9, (("bf16", HostKernel(1e9, 1e9)),))
    with pytest.raises(ValueError, match="positive"):
        HostKernel(0, 1e9)
    assert HostProfile.from_dict(BOX.to_dict()) == BOX


def test_host_misses_take_no_copies_and_split_follows_costs():
    shape, gpu = tiny_shape(), PROFILES["rtx3090"]
    stream = random_stream(40, 3, 6, 1, seed=1)
    fetch = simulate(stream, shape, gpu, 6, **KW)
    host = simulate(stream, shape, gpu, 6, misses="host", host=BOX, **KW)
    assert host.copies == 0 and host.bytes_moved == 0 and host.host_computed == host.misses > 0 and host.host_s > 0
    assert fetch.host_computed == 0 and fetch.copies == fetch.misses
    # auto: a host much faster than the link takes every miss; a much slower one none
    fast = simulate(stream, shape, gpu, 6, misses="auto", host=host_at(1e15, expert_call_s=0), **KW)
    slow = simulate(stream, shape, gpu, 6, misses="auto", host=slow_host(1e4), **KW)
    assert fast.host_computed == fast.misses > 0
    assert slow.host_computed == 0 and slow.tok_s == pytest.approx(fetch.tok_s)
    with pytest.raises(ValueError, match="needs a host profile"):
        simulate(stream, shape, gpu, 6, misses="host", **KW)


def test_host_compute_overlaps_device_compute():
    """A layer whose misses run on the host takes max(host, device) beside each other, not their sum: slowing
    the host by a little changes nothing while the device is the longer side."""
    shape, gpu = tiny_shape(top_k=2, hidden=2048), PROFILES["rtx3090"]
    stream = random_stream(30, 3, 6, 2, seed=2)
    quick = simulate(stream, shape, gpu, 3, misses="host", host=host_at(1e15, expert_call_s=0), **KW)
    slower = simulate(stream, shape, gpu, 3, misses="host", host=host_at(2e14, expert_call_s=0), **KW)
    assert quick.host_computed > 0
    assert slower.time_s == pytest.approx(quick.time_s, rel=1e-3)
    much_slower = simulate(stream, shape, gpu, 3, misses="host", host=slow_host(100), **KW)
    assert much_slower.time_s > 1.5 * quick.time_s


def test_static_placement_keeps_the_hottest_and_never_copies():
    shape, gpu = tiny_shape(hidden=2048), PROFILES["rtx3090"]  # experts big enough for the host to matter
    stream = random_stream(60, 3, 6, 1, seed=3, skew=1.5)
    static = simulate(stream, shape, gpu, 9, misses="host", host=BOX, placement="trace", **KW)
    empty = simulate(stream, shape, gpu, 9, misses="host", host=BOX, **KW)
    assert static.copies == 0 and empty.copies == 0
    assert static.hits > 0 and empty.hits == 0 and static.tok_s > empty.tok_s


@pytest.mark.parametrize("seed", range(4))
def test_bypass_min_is_optimal_and_the_host_bound_holds(seed):
    shape, gpu = tiny_shape(), PROFILES["rtx3090"]
    stream = random_stream(12, 3, 6, 1, seed=seed)
    for slots in (2, 4):
        assert len(bypass_misses(stream, slots)) == brute_force_bypass_misses(stream, slots)
    shape = tiny_shape(top_k=2)
    stream = random_stream(40, 3, 6, 2, seed=seed)
    for host in (BOX, slow_host(20)):
        bound = host_bound(stream, shape, gpu, host, 5, **KW)
        for misses in ("host", "auto"):
            run = simulate(stream, shape, gpu, 5, misses=misses, host=host, **KW)
            assert run.tok_s <= bound.tok_s * (1 + 1e-9)
        assert bound.misses <= simulate(stream, shape, gpu, 5, policy="belady", **KW).misses


def test_kernel_rates_follow_expert_size_between_two_measurements():
    k = HostKernel(20e9, 100e9, at_bytes=10**7, large=(10**9, 10e9, 50e9))
    assert k.rates(10**6) == (20e9, 100e9) and k.rates(10**10) == (10e9, 50e9)
    mid = k.rates(10**8)  # halfway in log(bytes): the geometric mean
    assert mid[0] == pytest.approx((20e9 * 10e9) ** 0.5) and mid[1] == pytest.approx((100e9 * 50e9) ** 0.5)
    p = BOX.with_(kernels=tuple((f, k) for f in KERNEL_FORMATS), memory_bytes_per_s=1e12, expert_call_s=0)
    assert p.expert_seconds(10**9, 10**9, 1, "int4") == pytest.approx(0.1)  # 1 GB at the large rate
    assert HostProfile.from_dict(p.to_dict()) == p
    with pytest.raises(ValueError, match="HostKernel.large"):
        HostKernel(1e9, 1e9, at_bytes=10, large=(5, 1e9, 1e9))
