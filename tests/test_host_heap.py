"""fuselm/runner/host_heap.py: freed per-step tensors stay in the heap (no fresh page faults on reuse),
measured in a fresh process against glibc's defaults in another."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")

PROBE = r"""
import json, resource, sys, torch
from fuselm.runner.host_heap import keep_freed_memory
kept = keep_freed_memory()
def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
out = {"kept": kept}
for mb in (1, 8, 25, 40, 100):  # a step's temporaries, growing; 40 and 100 MB are above glibc's largest mmap threshold
    f0 = faults()
    for _ in range(20):
        t = torch.empty(mb * 2**20 // 4); t.fill_(1.0); del t
    out[str(mb)] = faults() - f0
print(json.dumps(out))
"""


def _probe(**env_overrides) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update(env_overrides)
    proc = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_freed_tensors_are_reused_without_faulting_their_pages_again():
    default = _probe(FUSELM_KEEP_FREED_MEMORY="0")
    kept = _probe()
    assert default["kept"] is False and kept["kept"] is True
    for mb in ("40", "100"):
        pages = int(mb) * 2**20 // 4096
        assert default[mb] >= 19 * pages  # glibc's defaults: every allocation mapped afresh, faulted in page by page
        assert kept[mb] < 2 * pages  # kept: twenty allocations fault in less than two allocations' pages


def test_a_users_own_malloc_settings_are_left_alone():
    assert _probe(MALLOC_TRIM_THRESHOLD_="1048576")["kept"] is False
