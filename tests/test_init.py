"""geo/__init__.py: importing geo puts PyTorch's CPU tensors of 2 MiB and more on transparent huge pages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
PAGES_64MIB = 64 * 2**20 // 4096  # 4 KiB pages of a 64 MiB tensor

# Minor page faults of allocating and filling a 64 MiB tensor (the fewest of three, after geo is imported).
PROBE = """
import resource
import geo, torch
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(16 * 2**20)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(min(faults() for _ in range(3)))
"""


def run_python(code: str, thp_setting: str | None) -> str:
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if thp_setting is not None:
        env["THP_MEM_ALLOC_ENABLE"] = thp_setting
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          check=True).stdout.strip()


def test_importing_geo_sets_the_default_and_keeps_an_explicit_choice():
    code = "import os, geo; print(os.environ['THP_MEM_ALLOC_ENABLE'])"
    assert run_python(code, None) == "1"
    assert run_python(code, "0") == "0"


@pytest.mark.skipif(not THP.exists() or "[never]" in THP.read_text(),
                    reason="this kernel has no transparent huge pages (or they are off)")
def test_a_large_tensor_faults_far_less_often_on_huge_pages():
    on, off = int(run_python(PROBE, None)), int(run_python(PROBE, "0"))
    assert off >= 0.9 * PAGES_64MIB          # glibc maps it fresh: one fault per 4 KiB page
    assert on <= 0.1 * off                   # 2 MiB pages: 32 faults for the data, a few hundred in all
