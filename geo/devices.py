"""Device and precision choices shared by both stages (the backbone and the heads).

``--device auto`` picks cuda, then mps, then cpu. ``--precision auto`` picks
bf16 only where it is native and fast: a CUDA GPU with bf16, or a CPU whose
oneDNN has real bf16 kernels (AVX512-BF16 or AMX). On plain AVX512/AVX2
oneDNN emulates bf16 and is slower than float32, so auto stays fp32 there.

``retain_freed_memory`` has glibc's malloc keep the memory a CPU training step
frees, so that the next step reuses it instead of faulting fresh zeroed pages in.

``onednn_fp32_matmuls`` routes float32 matmuls through oneDNN (instead of MKL)
with its bf16 math mode allowed: the heads use it on such CPUs for products of
bf16-valued operands, which it computes exactly as float32 would, only faster.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from pathlib import Path

import torch

from geo.errors import ConfigError

PRECISIONS = ("auto", "bf16", "fp32")
# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
# Freed memory at the top of the heap kept for reuse (mallopt takes a C int: at most 2 GiB - 1).
RETAINED_BYTES = 2**31 - 1


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> cuda, then mps, then cpu; any other string goes to ``torch.device`` (ConfigError if unusable)."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as err:
        raise ConfigError(f"--device {device!r}: {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: this torch build sees no CUDA GPU; use --device cpu or auto")
    return dev


def cpu_flags() -> set[str]:
    """This CPU's feature flags from /proc/cpuinfo (empty where there is none: macOS, Windows)."""
    try:
        return set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return set()


@functools.lru_cache(maxsize=None)
def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 (AVX512-BF16 or AMX) and the build runs a bf16 matmul.

    Where /proc/cpuinfo lists flags, one of ``avx512_bf16`` / ``amx_bf16`` must be among
    them; oneDNN's own check alone also passes on plain AVX512, where it emulates bf16.
    """
    flags = cpu_flags()
    if flags and not ({"avx512_bf16", "amx_bf16"} & flags):
        return False
    try:
        if not bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
        a = torch.ones(4, 4, dtype=torch.bfloat16)
        return bool(torch.isfinite((a @ a).float()).all())
    except (AttributeError, RuntimeError):
        return False


@contextlib.contextmanager
def onednn_fp32_matmuls():
    """Float32 CPU matmuls inside the block run in oneDNN with ``fpmath_mode = bf16`` (restored after).

    oneDNN may then round float32 operands to bf16 (its AMX / AVX512-BF16 kernels) or
    keep them (its AVX512 float32 kernel: what a Zen 5 EPYC gets, several times faster
    than MKL's float32 there, see benchmarks/fit_head.py); either way it accumulates and
    returns float32. For operands that already hold bf16 values that rounding is the
    identity, so the result is the exact-products, float32-accumulated sum of a plain
    float32 matmul, in another summation order. Use it only for such operands.
    A no-op on a torch without the ``torch.backends.mkldnn.matmul.fp32_precision`` setting.
    """
    matmul = getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)
    try:
        previous = matmul.fp32_precision
        matmul.fp32_precision = "bf16"
    except (AttributeError, RuntimeError, ValueError):
        yield
        return
    try:
        yield
    finally:
        matmul.fp32_precision = previous


@functools.lru_cache(maxsize=None)
def retain_freed_memory() -> bool:
    """Have glibc's malloc keep freed memory for reuse instead of returning it to the kernel; True if applied.

    A CPU training step allocates and frees tensors of tens to hundreds of MB every step
    (the [B, c] logits, their log-softmax and gradient, the [c, d] weight gradient). glibc
    serves blocks above its mmap threshold (32 MiB at most) with a fresh mmap and unmaps
    them on free, so each step the kernel faults in and zeroes all of them again: about
    2 GB a step at c = 2^15, d = 2048, batch 1024 (on huge pages, see geo/__init__.py;
    on 4 KiB pages it is worse). With mmap off (``M_MMAP_MAX = 0``) large blocks come from
    the heap, and the trim threshold keeps up to 2 GiB of freed memory at its top for the
    next step. Measured there on a 2-core Zen 4, one thread (the other core busy), bf16
    softmax: 2.1 s a step without, 1.6 s with; resident set 2.1 GiB without, 3.0 GiB
    with. (PyTorch's CPU tuning guide recommends a caching allocator, jemalloc or
    tcmalloc preloaded, for the same reason; this needs nothing installed.) Process-wide
    and for the rest of the process: the resident set no longer falls after a peak.
    False where the C library has no glibc ``mallopt`` (macOS, Windows; musl's does
    nothing and says so).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library already loaded into this process
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return all([mallopt(M_MMAP_MAX, 0) == 1, mallopt(M_TRIM_THRESHOLD, RETAINED_BYTES) == 1])


def bf16_supported(device: torch.device) -> bool:
    """Whether bf16 matmuls and autocast are native and fast on ``device``."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return cpu_supports_bf16()
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> "bf16" where ``bf16_supported(device)``, else "fp32"; "bf16"/"fp32" pass through."""
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r}: choose auto, bf16 or fp32")
    if precision == "auto":
        return "bf16" if bf16_supported(device) else "fp32"
    return precision


def autocast(device: torch.device, precision: str):
    """A bf16 autocast context for ``precision == "bf16"``, else a no-op (so code paths do not fork)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
