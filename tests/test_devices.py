"""``--precision auto``: bf16 only where the CPU runs it natively (AVX512-BF16 / AMX)."""

from __future__ import annotations

import ctypes
import subprocess
import sys

import pytest
import torch

from geo import devices
from geo.heads.low_precision import bf16_outputs_are_faster


@pytest.fixture
def cpu_flags(monkeypatch):
    """Pretend /proc/cpuinfo lists the given flags (the cached answer is recomputed, then restored)."""
    def use(flags):
        monkeypatch.setattr(devices, "cpu_flags", lambda: set(flags))
        devices.cpu_supports_bf16.cache_clear()
    yield use
    monkeypatch.undo()
    devices.cpu_supports_bf16.cache_clear()


@pytest.mark.parametrize("flags", [{"fpu", "avx2", "fma"}, {"avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq"}])
def test_auto_stays_float32_without_native_bf16(cpu_flags, flags):
    # plain AVX512 passes oneDNN's own check (it emulates bf16 there, slower than float32)
    cpu_flags(flags)
    cpu = torch.device("cpu")
    assert not devices.cpu_supports_bf16()
    assert devices.resolve_precision("auto", cpu) == "fp32"
    assert not bf16_outputs_are_faster(cpu)             # a forced --precision bf16 keeps the exact product
    assert devices.resolve_precision("bf16", cpu) == "bf16"


@pytest.mark.parametrize("flag", ["avx512_bf16", "amx_bf16"])
def test_auto_is_bf16_with_a_native_flag_when_the_build_runs_it(cpu_flags, flag):
    cpu_flags({"avx512f", flag})
    runs_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    assert devices.cpu_supports_bf16() == runs_bf16
    assert devices.resolve_precision("auto", torch.device("cpu")) == ("bf16" if runs_bf16 else "fp32")


def test_this_machine_agrees_with_its_cpuinfo():
    flags = devices.cpu_flags()
    if flags and not flags & {"avx512_bf16", "amx_bf16"}:
        assert devices.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert devices.resolve_precision("auto", torch.device("cpu")) == ("bf16" if devices.cpu_supports_bf16() else "fp32")


# Free bytes glibc's heap holds after a 64 MiB tensor is freed (mallinfo2's fordblks), in a fresh process.
FREED_PROBE = """
import ctypes, sys
import torch
from geo.devices import retain_freed_memory
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                     "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = MallInfo2
applied = retain_freed_memory() if sys.argv[1] == "retain" else None
t = torch.ones(16 * 2**20)
del t
print(applied, mallinfo2().fordblks)
"""


def freed_bytes_kept(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", FREED_PROBE, mode], capture_output=True, text=True, check=True)
    applied, kept = out.stdout.split()
    return applied, int(kept)


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallinfo2"), reason="the C library is not glibc >= 2.33")
def test_retained_memory_stays_in_the_heap_for_the_next_step():
    applied, kept = freed_bytes_kept("retain")
    assert applied == "True"
    assert kept >= 64 * 2**20                 # the freed tensor is there for the next allocation
    _, kept_by_default = freed_bytes_kept("default")
    assert kept_by_default < 16 * 2**20       # glibc unmapped it: the next step faults fresh pages in
