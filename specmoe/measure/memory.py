"""Peak device memory of a block of work: the PyTorch allocator's peak and, with nvidia-ml-py, NVML's view.

`torch.cuda.max_memory_allocated` counts tensors only; NVML's "used" also counts the CUDA context, the
allocator's cached blocks and other processes, so it is what decides whether a model fits. NVML has no peak,
so a thread polls it. Neither exists on CPU: the figures are None there.
"""

from __future__ import annotations

import logging
import threading

import torch

logger = logging.getLogger(__name__)


def _nvml_handle(device: torch.device):
    """An NVML handle for a CUDA device (by UUID when torch knows it, else by index), or None without pynvml."""
    try:
        import pynvml  # nvidia-ml-py, an optional dependency
    except ImportError:
        logger.info("nvidia-ml-py is not installed: NVML memory figures are skipped (pip install nvidia-ml-py)")
        return None, None
    try:
        pynvml.nvmlInit()
        index = device.index if device.index is not None else torch.cuda.current_device()
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        if uuid is not None:
            text = str(uuid)
            try:
                return pynvml, pynvml.nvmlDeviceGetHandleByUUID(text if text.startswith("GPU-") else f"GPU-{text}")
            except pynvml.NVMLError:
                pass
        return pynvml, pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception as err:  # NVML missing from the driver, no permission, ...
        logger.warning("NVML unavailable (%s): NVML memory figures are skipped", err)
        return None, None


_NVML = None


def nvml_devices() -> list[dict] | None:
    """Every NVIDIA device as NVML sees it now (name, driver, total and used bytes), without touching CUDA;
    None without nvidia-ml-py or a driver."""
    global _NVML
    try:
        if _NVML is None:
            import pynvml  # nvidia-ml-py, an optional dependency

            pynvml.nvmlInit()
            _NVML = pynvml
        nv = _NVML
        driver = nv.nvmlSystemGetDriverVersion()
        out = []
        for i in range(nv.nvmlDeviceGetCount()):
            handle = nv.nvmlDeviceGetHandleByIndex(i)
            name, info = nv.nvmlDeviceGetName(handle), nv.nvmlDeviceGetMemoryInfo(handle)
            out.append({"index": i, "name": name.decode() if isinstance(name, bytes) else str(name),
                        "driver": driver.decode() if isinstance(driver, bytes) else str(driver),
                        "total_bytes": int(info.total), "used_bytes": int(info.used)})
        return out
    except Exception:  # ImportError, no driver, no permission: no figures, never a failure
        return None


class DeviceMemoryMonitor:
    """Context manager recording peak device memory while it is open.

    Example:
        with DeviceMemoryMonitor("cuda") as mem:
            model.generate(...)
        mem.result()  # {"torch_peak_bytes": ..., "nvml_peak_used_bytes": ..., "nvml_total_bytes": ...}
    """

    def __init__(self, device, poll_s: float = 0.005):
        self.device = torch.device(device)
        self.poll_s = poll_s
        self.torch_peak: int | None = None
        self.nvml_peak: int | None = None
        self.nvml_total: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml = self._handle = None

    def _poll(self) -> None:
        while True:
            try:
                info = self._nvml.nvmlDeviceGetMemoryInfo(self._handle)
                self.nvml_peak = max(self.nvml_peak or 0, int(info.used))
                self.nvml_total = int(info.total)
            except Exception:  # pragma: no cover - a driver hiccup must not break a benchmark
                return
            if self._stop.wait(self.poll_s):
                return

    def __enter__(self) -> "DeviceMemoryMonitor":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._nvml, self._handle = _nvml_handle(self.device)
            if self._handle is not None:
                self._thread = threading.Thread(target=self._poll, name="specmoe-nvml", daemon=True)
                self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.torch_peak = int(torch.cuda.max_memory_allocated(self.device))
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=1)

    def result(self) -> dict:
        return {"torch_peak_bytes": self.torch_peak, "nvml_peak_used_bytes": self.nvml_peak,
                "nvml_total_bytes": self.nvml_total}
