"""Host (CPU) kernels: a routed expert's gate/up, activation and down projection computed straight from the
host store's bytes (fp32 / bf16 / fp16, int8, int4; the publishers' MXFP4, FP8 and GPTQ int4; MXFP4 also with int8 activations, opt-in), built with g++ at first use (`build`), called through
ctypes (`experts`). Without a compiler, or with SPECMOE_HOST_ISA=off, `available()` is False and the runtime
keeps its torch path."""

from .experts import (ACTIVATIONS, FORMATS, HOST_ACTIVATIONS, INT8_FORMATS, HostExpertsKernel, Mat, advise_huge_pages, available, check_threads, default_threads,
                      kernel_format, kernel_group, matrix, physical_cores, prequant_matrix)

__all__ = ["ACTIVATIONS", "FORMATS", "HOST_ACTIVATIONS", "INT8_FORMATS", "HostExpertsKernel", "Mat", "advise_huge_pages", "available", "check_threads", "default_threads",
           "kernel_format", "kernel_group", "matrix", "physical_cores", "prequant_matrix"]
