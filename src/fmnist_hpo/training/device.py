"""Which device a trial trains on and which precision it computes in, `auto` resolved for this machine."""

from __future__ import annotations

import ctypes
import functools

import torch

from fmnist_hpo.errors import DeviceError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    available = {"cpu": True, "cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available()}
    if name not in available:
        raise DeviceError(f"unknown device {name!r}; use auto, cuda, mps or cpu")
    if not available[name]:
        raise DeviceError(f"device {name!r} is not available on this machine (torch {torch.__version__})")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "cpu" and cpu_has_native_bf16():
            return torch.bfloat16
        return None
    if name == "fp16" and device.type == "cpu":
        raise DeviceError("train.precision: fp16 needs cuda or mps; use bf16 or fp32 on cpu")
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def precision_name(name: str, device: torch.device) -> str:
    """What train.precision `name` computes in on device: fp32, bf16 or fp16 (auto resolved)."""
    return PRECISION_NAMES[resolve_precision(name, device)]


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 convolutions natively here (AVX512-BF16 or AMX): 1.5x to 2.4x a fp32
    step of the study's CNN with channels_last (issue 17, AMD EPYC). Elsewhere bf16 is emulated."""
    if not torch.backends.mkldnn.is_available():
        return False
    capabilities = getattr(torch.cpu, "get_capabilities", None)  # torch >= 2.8; older: the private probes
    if capabilities is not None:
        found = capabilities()
        return bool(found.get("avx512_bf16") or found.get("amx_bf16"))
    probes = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(probe() for probe in probes if probe is not None)


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)


@functools.cache
def keep_cpu_buffers() -> bool:
    """Have glibc's malloc serve a CPU trial's activation buffers from its heap and keep them there when freed.

    By default it maps every block over 128 KiB to fresh pages and unmaps it on free (raising that
    threshold only as it learns), so early steps page-fault their activations anew and a bf16 test
    pass ran 2x slower (BENCHMARKS.md). False where the C library is not glibc: nothing changes.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    # 32 MiB is the largest mmap threshold glibc takes on 64-bit systems; keep up to 1 GiB of free heap
    return bool(mallopt(M_MMAP_THRESHOLD, 32 * 2**20)) and bool(mallopt(M_TRIM_THRESHOLD, 2**30))
