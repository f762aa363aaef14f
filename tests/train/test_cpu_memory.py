"""CPU training keeps freed memory: a large tensor allocated again after `keep_freed_memory` reuses pages instead of
faulting fresh ones in (counted by the kernel as minor page faults), in a fresh process so nothing set it before."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

PROBE = """
import json, resource, torch
from chatglm_sft.train.cpu_memory import keep_freed_memory

def faults_of_a_fresh_tensor():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(64 * 2**20, dtype=torch.uint8).fill_(1)  # 64 MiB: above glibc's largest mmap threshold
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = [faults_of_a_fresh_tensor() for _ in range(3)]
kept = keep_freed_memory()
for _ in range(10):  # the heap grows until freed chunks lie side by side (big enough for an aligned request)
    faults_of_a_fresh_tensor()
print(json.dumps({"default": default, "kept": kept, "after": [faults_of_a_fresh_tensor() for _ in range(3)]}))
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the setting is glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.splitlines()[-1])
    pages = 64 * 2**20 // 4096
    assert result["kept"]
    assert min(result["default"]) > pages // 2  # each fresh mmap faults its pages in
    assert max(result["after"]) < pages // 20
