"""Hardware profiles for the simulator: what a GPU and its host link can move and compute.

Every number comes from the vendor's spec sheet (named in `source`), except the pinned host->device
bandwidth, which no spec sheet gives: it is the rate `cudaMemcpyAsync` from pinned memory typically reaches
on that PCIe generation (about 75-80% of the link's theoretical per-direction rate), and says so.
The simulator's results are only as good as these numbers; `specmoe simulate --validate` compares them with
a measurement on a real GPU.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

GiB = 2**30
GB = 10**9
TFLOPS = 10**12

_PCIE4_NOTE = ("pinned host->device ~24 GB/s is what cudaMemcpyAsync typically reaches on PCIe 4.0 x16 "
               "(theoretical 31.5 GB/s per direction); an assumption, not a spec-sheet figure")
_PCIE5_NOTE = ("pinned host->device ~50 GB/s is what cudaMemcpyAsync typically reaches on PCIe 5.0 x16 "
               "(theoretical 63 GB/s per direction); an assumption, not a spec-sheet figure")


@dataclass(frozen=True)
class HardwareProfile:
    """One GPU and its link to the host.

    Args:
        name: preset name, e.g. "rtx3090".
        memory_bytes: device memory.
        h2d_bytes_per_s: pinned host->device copy bandwidth (one copy engine).
        memory_bytes_per_s: device memory bandwidth (spec peak).
        bf16_flops: dense bf16 tensor-core FLOP/s (spec peak, no sparsity).
        copy_latency_s: fixed cost of one host->device copy besides its bytes (DMA setup).
        source: where the numbers come from.
        description: the product name.
    """

    name: str
    memory_bytes: int
    h2d_bytes_per_s: float
    memory_bytes_per_s: float
    bf16_flops: float
    copy_latency_s: float = 10e-6
    source: str = ""
    description: str = ""

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise ValueError("HardwareProfile.name must be a non-empty string, e.g. 'rtx3090'")
        for field in ("memory_bytes", "h2d_bytes_per_s", "memory_bytes_per_s", "bf16_flops"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"HardwareProfile.{field} must be a positive number, got {value!r}")
        if not (0 <= self.copy_latency_s < 1e-2):
            raise ValueError(f"HardwareProfile.copy_latency_s must be in [0, 10 ms), got {self.copy_latency_s!r}")
        if self.h2d_bytes_per_s > self.memory_bytes_per_s:
            raise ValueError(f"HardwareProfile {self.name}: host->device bandwidth ({self.h2d_bytes_per_s:.3g} B/s) "
                             f"exceeds device memory bandwidth ({self.memory_bytes_per_s:.3g} B/s); check the units")

    def copy_seconds(self, nbytes: int) -> float:
        """Time of one host->device copy of `nbytes`."""
        return self.copy_latency_s + nbytes / self.h2d_bytes_per_s

    def with_(self, **changes) -> "HardwareProfile":
        """A copy with some fields changed (validated again), e.g. a measured bandwidth."""
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "HardwareProfile":
        return cls(**data)

    @classmethod
    def from_name(cls, name: str) -> "HardwareProfile":
        """A preset by name (case and '-'/'_' insensitive): see `PROFILES`.

        Raises:
            ValueError: an unknown name; the message lists the known ones.
        """
        key = name.lower().replace("_", "").replace("-", "").replace(" ", "")
        for preset in PROFILES.values():
            if preset.name.replace("-", "") == key:
                return preset
        raise ValueError(f"unknown hardware profile {name!r}; choose one of {sorted(PROFILES)}")

    @classmethod
    def for_device_name(cls, device_name: str) -> "HardwareProfile":
        """The preset for a `torch.cuda.get_device_name()` string, e.g. 'NVIDIA H100 80GB HBM3' -> h100.

        Raises:
            ValueError: no preset matches that device.
        """
        text = device_name.lower()
        rules = [("h200", "h200"), ("h100 pcie", "h100-pcie"), ("h100", "h100"), ("4090", "rtx4090"),
                 ("3090", "rtx3090"), ("a6000", "a6000")]
        for needle, preset in rules:
            if needle in text:
                return PROFILES[preset]
        raise ValueError(f"no hardware profile for device {device_name!r}; pass one of {sorted(PROFILES)} "
                         "or build a HardwareProfile with that GPU's numbers")


PROFILES: dict[str, HardwareProfile] = {p.name: p for p in (
    HardwareProfile(
        "rtx3090", 24 * GiB, 24 * GB, 936.2 * GB, 71 * TFLOPS,
        description="NVIDIA GeForce RTX 3090 (GA102, 24 GB GDDR6X, PCIe 4.0 x16)",
        source="NVIDIA Ampere GA102 GPU architecture whitepaper v2 (2021), appendix table for RTX 3090: 24 GB, "
               "936 GB/s, 71 TFLOPS peak BF16 tensor with FP32 accumulate (dense); " + _PCIE4_NOTE,
    ),
    HardwareProfile(
        "rtx4090", 24 * GiB, 24 * GB, 1008 * GB, 165.2 * TFLOPS,
        description="NVIDIA GeForce RTX 4090 (AD102, 24 GB GDDR6X, PCIe 4.0 x16)",
        source="NVIDIA Ada GPU architecture whitepaper v2.1 (2023), RTX 4090 table: 24 GB, 1008 GB/s, "
               "165.2 TFLOPS peak BF16 tensor with FP32 accumulate (dense); " + _PCIE4_NOTE,
    ),
    HardwareProfile(
        "a6000", 48 * GiB, 24 * GB, 768 * GB, 154.8 * TFLOPS,
        description="NVIDIA RTX A6000 (GA102, 48 GB GDDR6, PCIe 4.0 x16)",
        source="NVIDIA RTX A6000 data sheet (2021): 48 GB GDDR6, 768 GB/s, 309.7 TFLOPS tensor with sparsity "
               "(154.8 dense); " + _PCIE4_NOTE,
    ),
    HardwareProfile(
        "h100", 80 * GiB, 50 * GB, 3350 * GB, 989.4 * TFLOPS,
        description="NVIDIA H100 SXM5 80GB (HBM3, PCIe 5.0 x16 host link)",
        source="NVIDIA H100 Tensor Core GPU data sheet (2023), H100 SXM column: 80 GB, 3.35 TB/s, "
               "1,979 TFLOPS BF16 with sparsity (989.4 dense); " + _PCIE5_NOTE,
    ),
    HardwareProfile(
        "h100-pcie", 80 * GiB, 50 * GB, 2000 * GB, 756 * TFLOPS,
        description="NVIDIA H100 PCIe 80GB (HBM2e, PCIe 5.0 x16)",
        source="NVIDIA H100 Tensor Core GPU data sheet (2023), H100 PCIe column: 80 GB, 2 TB/s, "
               "1,513 TFLOPS BF16 with sparsity (756 dense); " + _PCIE5_NOTE,
    ),
    HardwareProfile(
        "h200", 141 * GB, 50 * GB, 4800 * GB, 989.4 * TFLOPS,
        description="NVIDIA H200 SXM 141GB (HBM3e, PCIe 5.0 x16 host link)",
        source="NVIDIA H200 Tensor Core GPU data sheet (2024), H200 SXM column: 141 GB, 4.8 TB/s, "
               "1,979 TFLOPS BF16 with sparsity (989.4 dense); " + _PCIE5_NOTE,
    ),
)}
