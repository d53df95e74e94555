"""The benchmark scripts keep working (their --quick forms, on the CPU)."""
import json
import subprocess
import sys

import pytest

from tests.launch import ROOT


@pytest.mark.parametrize("script", ["benchmarks/gossip_cost.py", "benchmarks/simulation_efficiency.py", "benchmarks/replica_candidates.py"])
def test_benchmark_quick_mode_runs(script, tmp_path):
    result = subprocess.run([sys.executable, script, "--quick", "--device", "cpu", "--json", str(tmp_path / "out.json")],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "torch" in result.stdout and "ratio" in result.stdout
    assert (tmp_path / "out.json").stat().st_size > 100


def test_simulation_efficiency_builds_every_gossip_row_on_another_graph(tmp_path):
    from benchmarks import simulation_efficiency

    names = ",".join(simulation_efficiency.GOSSIP)
    result = subprocess.run([sys.executable, "benchmarks/simulation_efficiency.py", "--quick", "--device", "cpu", "--no-ceiling",
                             "--n-workers", "4", "--topology", "hypercube", "--computes", "loop", "--optimizers", names,
                             "--json", str(tmp_path / "out.json")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["topology"] == "hypercube" and report["n_workers"] == 4
    assert [row["optimizer"] for row in report["rows"]] == names.split(",")
    assert all(row["images_per_s"] > 0 for row in report["rows"])


def test_consensus_scaling_times_every_method_and_graph_and_compares_two_trees(tmp_path):
    """--quick: every method on every graph it takes, at two worker counts; --compare runs both trees
    (here the repository against itself) and writes their medians side by side."""
    out = tmp_path / "compare.json"
    result = subprocess.run([sys.executable, "benchmarks/consensus_scaling.py", "--quick", "--compare", ROOT,
                             "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "torch" in result.stdout and "growth" in result.stdout and "whole process" in result.stdout
    rows = json.loads(out.read_text())["rows"]
    assert {(row["method"], row["graph"]) for row in rows} == {
        (method, graph) for method in ("uncompressed", "power_gossip") for graph in ("ring", "random_matching", "one_peer_hypercube")
    } | {("sign_choco", "ring")}
    assert [row["n_workers"] for row in rows[:2]] == [8, 16]
    assert all(row["steps_per_s_before"] > 0 and row["steps_per_s_after"] > 0 for row in rows)


def test_host_per_step_times_both_trees_side_by_side(tmp_path):
    """--quick --compare: every part timed in this tree and in the other (here the repository
    against itself), each in its own processes."""
    out = tmp_path / "host.json"
    result = subprocess.run([sys.executable, "benchmarks/host_per_step.py", "--quick", "--device", "cpu", "--compare", ROOT,
                             "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "torch" in result.stdout and "ratio" in result.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [row["work"] for row in rows] == ["sums and loss check", "batches", "batches, crop and flip"]
    assert all(row["this_tree_us"] > 0 and row["other_tree_us"] > 0 and row["ratio"] > 0 for row in rows)
