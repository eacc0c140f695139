"""core/allocator.py: freed memory stays in the process, so large CPU tensors stop faulting their pages in."""

from __future__ import annotations

import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys, torch
from vqtok.core.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
for _ in range(2):  # warm-up: the first blocks are faulted in either way
    x = torch.ones(16 << 20)  # 64 MB: above any mmap threshold glibc would choose
    del x
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    x = torch.ones(16 << 20)
    del x
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, check=True)
    kept, faults = out.stdout.split()
    return kept == "True", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_memory_is_reused_without_page_faults():
    kept, faults = _faults("keep")
    default_kept, default_faults = _faults("default")
    assert kept and not default_kept
    pages = 10 * (64 << 20) // 4096  # 163,840 pages allocated in the loop
    assert default_faults > pages / 2, f"the default allocator faulted only {default_faults} pages in"
    # measured 0 .. 49,152 with it (some freed pages are still reclaimed now and then), 163,850 without
    assert faults < pages / 2, f"{faults} page faults for {pages} pages of reused memory"


def test_the_environment_turns_it_off(monkeypatch):
    from vqtok.core.allocator import keep_freed_memory

    monkeypatch.setenv("VQTOK_MALLOC", "default")
    assert keep_freed_memory() is False
