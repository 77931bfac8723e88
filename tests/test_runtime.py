"""Process-wide allocator tuning: chunk-sized buffers must not be faulted in afresh each time."""

from __future__ import annotations

import subprocess
import sys

import pytest

# The shape of a streaming job: a few 1 MiB chunks alive at once, then freed, again and again.
CHURN = """
import resource, sys
if sys.argv[1] == "tuned":
    from daemon.runtime import tune_allocator
    tune_allocator()
warm = bytes(1 << 20)
del warm  # glibc's sliding mmap threshold adapts to 1 MiB blocks here
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(100):
    a, b, c = bytes(1 << 20), bytes(1 << 20), bytes(1 << 20)
    del a, b, c
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc tuning")
def test_tuned_allocator_reuses_freed_chunks_instead_of_faulting_them_in_again() -> None:
    tuned, default = faults("tuned"), faults("default")
    # By default the freed heap top (3 MiB) exceeds glibc's sliding trim threshold (2 MiB) and is
    # handed back, so later chunks fault their pages in again (7k faults here; 400k when
    # extracting a 680 MB archive). Tuned, only the first round grows the heap (~750 faults).
    assert tuned < 1500, tuned
    assert default > 4 * tuned, (tuned, default)


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
