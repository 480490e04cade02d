"""Memory is a budget: runs whose naive form needs >= 10x the budget complete within it.

Each run is measured in a fresh subprocess: the peak resident memory (VmHWM, reset through
/proc/self/clear_refs after a warm-up) minus the resident memory before the call. The naive form of the
same run (all rows in one batch: every example of the HVP at once, every (step, example) row of IG at once)
is measured the same way, as the oracle that the budget matters.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists() or sys.platform != "linux",
    reason="peak RSS reset needs Linux /proc/self/clear_refs",
)

SCRIPT = r"""
import ctypes, json, sys, torch, gradsense as gs
torch.set_num_threads(1)
libc = ctypes.CDLL("libc.so.6")

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

torch.manual_seed(0)
model = torch.nn.Sequential(
    torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.Tanh(), torch.nn.Conv2d(16, 16, 3, padding=1), torch.nn.Tanh(),
    torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10)).eval()
x, y = torch.randn(256, 3, 32, 32), torch.randint(0, 10, (256,))
budget = sys.argv[1]

def eigs(mm):
    r = gs.hessian_eigs(model, gs.losses.cross_entropy, (x, y), k=1, max_hvp=2, overlap=False, seed=0,
                        cache_graph=False, max_memory=mm, return_vectors=False)
    return float(r.eigenvalues[0])

def ig(mm):
    n, steps = 16, 64
    opts = {"chunk_size": n * steps} if mm is None else {"max_memory": mm}
    r = gs.attribute(model, x[:n], target=y[:n], method="integrated_gradients", steps=steps, **opts)
    return float(r.attributions.abs().sum())

def measure(fn, mm):
    libc.malloc_trim(0)
    open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
    before = status("VmRSS")
    value = fn(mm)
    return {"peak": status("VmHWM") - before, "value": value}

# warm-up: the same code paths on a few rows, so one-time library set-up is not counted
gs.hessian_eigs(model, gs.losses.cross_entropy, (x[:4], y[:4]), k=1, max_hvp=2, overlap=False, seed=0,
                cache_graph=False)
gs.attribute(model, x[:2], target=y[:2], method="integrated_gradients", steps=4, chunk_size=8)
out = {}
for name, fn in (("eigs", eigs), ("ig", ig)):  # budgeted runs first: nothing freed by a naive run to reuse
    out[name] = {"budget": measure(fn, budget)}
for name, fn in (("eigs", eigs), ("ig", ig)):
    out[name]["naive"] = measure(fn, None)
print(json.dumps(out))
"""


def _run(budget: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADSENSE_PROGRESS": "0"}
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run([sys.executable, "-c", SCRIPT, budget], capture_output=True, text=True, env=env,
                         timeout=600, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


BUDGET_MB = 24


@pytest.fixture(scope="module")
def measured() -> dict:
    return _run(f"{BUDGET_MB}MB")


@pytest.mark.parametrize("what", ["eigs", "ig"])
def test_naive_needs_10x_the_budget_and_the_budgeted_run_stays_within_it(measured, what):
    naive, fitted = measured[what]["naive"], measured[what]["budget"]
    mb = 2**20
    assert naive["peak"] >= 10 * BUDGET_MB * mb, f"naive peak only {naive['peak'] / mb:.0f} MB"
    assert fitted["peak"] <= BUDGET_MB * mb, f"budgeted peak {fitted['peak'] / mb:.1f} MB over {BUDGET_MB} MB"
    # same answer: chunking changes the order of sums only
    assert fitted["value"] == pytest.approx(naive["value"], rel=1e-4)
