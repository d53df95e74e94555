"""Sweep scripts end to end at a tiny scale: launching, skipping, surviving failures, reports."""
import os
import subprocess
import sys

import pytest

from experiments import deep_learning, non_iid, paper_configs, report, sweep
from experiments import topologies as topology_study
from tests.test_data import fake_fmnist

TINY = ["num_epochs=1", "max_batches_per_epoch=2", "batch_size=8", "max_test_examples=32", "evaluate_each_worker=false",
        "checkpoint_every=0", "device=cpu"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fmnist")
    fake_fmnist(folder, n_train=256, n_test=32)
    return str(folder)


def test_launch_skips_finished_runs_and_survives_failures(tmp_path, tiny_data):
    good = sweep.Run("good", "train.py", TINY + ["n_workers=2", f"data_dir={tiny_data}"], {"method": "ok"})
    bad = sweep.Run("bad", "train.py", TINY + ["n_workers=2", "optimizer=nonsense"], {"method": "broken"})
    outcomes = sweep.launch([bad, good], str(tmp_path))
    assert [o.status for o in outcomes] == ["failed", "done"]
    assert "nonsense" in (tmp_path / "bad" / "FAILED").read_text()
    assert os.path.exists(tmp_path / "good" / "DONE")
    again = sweep.launch([bad, good], str(tmp_path))
    assert [o.status for o in again] == ["failed", "skipped"]
    rows = report.write_report(again, str(tmp_path / "report"), "tiny", ["method"])
    assert rows[1]["test_avg"] >= 0 and rows[0]["status"] == "failed"
    assert (tmp_path / "report" / "table.md").read_text().count("|") > 10
    assert os.path.getsize(tmp_path / "report" / "test_accuracy.png") > 1000
    seeded = sweep.Run("good", "train.py", good.overrides + ["seed=7"], good.labels)  # the same run name, other settings
    with pytest.raises(SystemExit, match="good were done before with other arguments"):
        sweep.launch([bad, seeded], str(tmp_path))


@pytest.mark.parametrize("study", [deep_learning, non_iid])
def test_training_studies_run_end_to_end_at_tiny_scale(tmp_path, tiny_data, study):
    overrides = TINY + [f"data_dir={tiny_data}"]
    result = subprocess.run([sys.executable, study.__file__, "--quick", "--output", str(tmp_path)] + overrides,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    expected = len(study.study_runs(True, []))
    assert len(list((tmp_path / "runs").glob("*/DONE"))) == expected
    table = (tmp_path / "table.csv").read_text().splitlines()
    assert len(table) == expected + 1
    assert os.path.exists(tmp_path / "test_accuracy.png")


def test_quick_mode_is_the_documented_reduced_setting():
    runs = deep_learning.study_runs(True, [])
    assert {r.name for r in runs} == set(deep_learning.METHODS) and len(runs) == 7
    assert all("device=cpu" in r.overrides and "max_batches_per_epoch=12" in r.overrides for r in runs)


def test_paper_configs_say_what_is_missing(tmp_path):
    result = subprocess.run([sys.executable, paper_configs.__file__, "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "cifar-10-batches-py/data_batch_1" in result.stdout and "wiki.train.tokens" in result.stdout
    (tmp_path / "cifar-10-batches-py").mkdir()
    for name in ("data_batch_1", "test_batch"):
        (tmp_path / "cifar-10-batches-py" / name).write_bytes(b"")
    result = subprocess.run([sys.executable, paper_configs.__file__, "--check", "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert "cifar10_resnet20_ring8: data found, 8 runs" in result.stdout


def test_quick_studies_write_outside_the_tracked_tree():
    import subprocess as sp

    if sp.run(["git", "rev-parse"], cwd=sweep.ROOT, capture_output=True, timeout=60).returncode != 0:
        pytest.skip("not a git checkout")
    for study, name in ((deep_learning, "deep_learning"), (non_iid, "non_iid"), (topology_study, "topologies")):
        args = sweep.study_arguments("").parse_args(["--quick"])
        folder = sweep.study_folder(args, name)
        ignored = sp.run(["git", "check-ignore", "-q", os.path.join(folder, "table.md")], cwd=sweep.ROOT, timeout=60)
        assert ignored.returncode == 0, f"{folder} is not ignored by git"  # a quick try changes no tracked file
        full = sweep.study_folder(sweep.study_arguments("").parse_args([]), name)
        assert full == os.path.join(sweep.RESULTS, name)  # the committed study results stay where they are


def test_topology_study_runs_end_to_end_at_tiny_scale(tmp_path, tiny_data):
    result = subprocess.run([sys.executable, topology_study.__file__, "--quick", "--output", str(tmp_path)] + TINY
                            + [f"data_dir={tiny_data}", "matrix_size=6"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    runs = topology_study.consensus_runs(True, []) + topology_study.training_runs(True, [])
    assert len(list((tmp_path / "runs").glob("*/DONE"))) == len(runs) == 22 + 5
    rates = {(row[1], row[2]): row for row in
             (line.split(",") for line in (tmp_path / "consensus_rates.csv").read_text().splitlines()[1:])}
    assert len(rates) == 22
    for graph in ("one_peer_exponential", "one_peer_hypercube"):  # exact averaging after log2(8) rounds
        assert int(rates["uncompressed", graph][5]) <= 3 and float(rates["uncompressed", graph][3]) == 1.0
    assert int(rates["push_sum", "one_peer_exponential"][5]) <= 3
    assert float(rates["uncompressed", "ring"][4]) == pytest.approx(float(rates["uncompressed", "ring"][3]), rel=0.2)
    assert os.path.getsize(tmp_path / "consensus_n8.png") > 1000 and os.path.exists(tmp_path / "test_accuracy.png")
    assert len((tmp_path / "table.csv").read_text().splitlines()) == 5 + 1


def test_topology_study_sends_each_part_its_own_overrides():
    assert topology_study.overrides_for(topology_study.gossip_run.DEFAULTS, ["num_epochs=1", "matrix_size=6"]) == ["matrix_size=6"]
    assert topology_study.overrides_for(topology_study.train._DEFAULTS, ["num_epochs=1", "matrix_size=6"]) == ["num_epochs=1"]
    with pytest.raises(SystemExit, match="neither gossip_run.py nor train.py knows nonsense=1"):
        topology_study.consensus_runs(True, ["nonsense=1"])
