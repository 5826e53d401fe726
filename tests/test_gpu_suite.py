"""benchmarks/gpu_suite.py's CPU mode runs end to end, so the GPU command does not rot between GPU runs."""

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

SUITE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_suite.py"


@pytest.mark.slow
def test_gpu_suite_cpu_mode_prints_its_table(tmp_path):
    stacks = "budgetune,trainer" + (",trl" if importlib.util.find_spec("trl") else "")
    done = subprocess.run([sys.executable, str(SUITE), "--cpu", "--stacks", stacks, "--steps", "3", "--work", str(tmp_path),
                           "--row-timeout", "240"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "budgetune's fast path here: attention: SDPA with a block-diagonal [T, T] mask; precision fp32" in out
    rows = [line for line in out.splitlines() if line.startswith("| tiny | full |")]
    assert len(rows) == len(stacks.split(",")), out
    for line in rows:
        assert "failed" not in line, line
        cells = [c.strip() for c in line.strip("|").split("|")]
        tokens_per_s, allocated = float(cells[5].replace(",", "")), float(cells[7].replace(",", ""))
        assert tokens_per_s > 0 and allocated > 0
    ours = next(line for line in rows if "| budgetune |" in line)
    assert re.search(r"\| \d[\d,]* \| \d+\.\d\d \|$", ours), ours  # the planner's prediction and its ratio to the measured peak
