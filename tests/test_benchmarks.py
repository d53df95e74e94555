"""The benchmark scripts keep working (their --quick forms, on the CPU)."""
import subprocess
import sys

import pytest

from tests.launch import ROOT


@pytest.mark.parametrize("script", ["benchmarks/gossip_cost.py", "benchmarks/simulation_efficiency.py"])
def test_benchmark_quick_mode_runs(script, tmp_path):
    result = subprocess.run([sys.executable, script, "--quick", "--device", "cpu", "--json", str(tmp_path / "out.json")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "torch" in result.stdout and "ratio" in result.stdout
    assert (tmp_path / "out.json").stat().st_size > 100
