"""Process-wide allocator tuning: chunk-sized buffers must not be faulted in afresh each time."""

from __future__ import annotations

import subprocess
import sys

import pytest

# The shape of a streaming job: a few 1 MiB chunks alive at once, then freed, again and again.
# glibc's own counters say where each round's chunks came from and whether freeing them shrank the
# heap; page-fault counts said the same on one machine but vary with transparent huge pages.
CHURN = """
import ctypes, sys
if sys.argv[1] == "tuned":
    from daemon.runtime import tune_allocator
    tune_allocator()
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
mallinfo2.restype = MallInfo2
warm = bytes(1 << 20)
del warm  # glibc's sliding mmap threshold adapts to 1 MiB blocks here
mmapped = trimmed = 0
for _ in range(100):
    a, b, c = bytes(1 << 20), bytes(1 << 20), bytes(1 << 20)
    alive = mallinfo2()
    del a, b, c
    freed = mallinfo2()
    mmapped += alive.hblks > freed.hblks
    trimmed += freed.arena < alive.arena
print(mmapped, trimmed)
"""


def churn(mode: str) -> tuple[int, int]:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True)
    mmapped, trimmed = out.stdout.split()
    return int(mmapped), int(trimmed)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_tuned_allocator_reuses_freed_chunks_instead_of_faulting_them_in_again() -> None:
    # By default the freed heap top (3 MiB) exceeds glibc's sliding trim threshold (2 MiB) and is
    # handed back every round, so the next round faults its pages in again (400k page faults when
    # extracting a 680 MB archive). Setting only the trim threshold would instead make every chunk
    # an mmap of its own. Tuned, the chunks come from the heap and the heap keeps them.
    assert max(churn("default")) > 90  # the churn shape does provoke glibc's defaults here
    assert churn("tuned") == (0, 0)


RELEASE = """
import sys
from daemon.runtime import release_memory, tune_allocator
tune_allocator()

def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024

blocks = [b"x" * (1 << 20) for _ in range(100)]
keep = blocks[9::10]  # every tenth stays: what is freed is holes, not the heap's top
del blocks
before = rss_mib()
if sys.argv[1] == "release":
    release_memory()
print(before, rss_mib())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc_trim")
def test_release_memory_hands_freed_holes_back_after_a_job() -> None:
    def run(mode: str) -> tuple[int, int]:
        out = subprocess.run(
            [sys.executable, "-c", RELEASE, mode], capture_output=True, text=True, check=True
        )
        before, after = out.stdout.split()
        return int(before), int(after)

    _, kept_after = run("keep")
    assert kept_after > 90  # without it the daemon would idle on ~90 MiB of freed job buffers
    before, after = run("release")
    assert before > 90 and after < before - 60, (before, after)
