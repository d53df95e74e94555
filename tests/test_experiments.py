"""Sweep scripts end to end at a tiny scale: launching, skipping, surviving failures, reports."""
import csv
import json
import os
import re
import subprocess
import sys
import time

import pytest

from experiments import (consensus, deep_learning, full_budget, heterogeneous, no_tuning, non_iid, paper_bytes, paper_configs,
                         power_iterations, report, resnet20, spectral_gap, sweep, unreliable, warm_start)
from experiments import topologies as topology_study
from experiments import wall_clock
from tests.test_data import fake_fmnist
from tests.test_train import comparable
from powergossip import figures
from powergossip import runs as powergossip_runs

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
    assert rows[1]["test_avg"] >= 0 and rows[1]["seeds"] == 1 and rows[0]["status"] == "failed"
    assert (tmp_path / "report" / "table.md").read_text().count("|") > 10
    assert os.path.getsize(tmp_path / "report" / "test_accuracy.png") > 1000
    # Another seed of the same setting: one row, mean and standard deviation over the two.
    other_seed = sweep.Run("good_seed2", "train.py", good.overrides + ["seed=2"], {"method": "ok", "seed": 2})
    seeds = sweep.launch([bad, good, other_seed], str(tmp_path))
    rows = report.write_report(seeds, str(tmp_path / "seeds"), "tiny", ["method"])
    finals = [figures.curve(sweep.metrics(o), "accuracy", "test_avg")[-1][1] for o in seeds[1:]]
    assert [row["method"] for row in rows] == ["broken", "ok"] and rows[1]["seeds"] == 2
    assert rows[1]["test_avg"] == pytest.approx(sum(finals) / 2)
    assert rows[1]["test_std"] == pytest.approx(abs(finals[0] - finals[1]) / 2 ** 0.5)
    assert f"{100 * rows[1]['test_avg']:.2f}% ± {100 * rows[1]['test_std']:.2f}" in (tmp_path / "seeds" / "table.md").read_text()
    seeded = sweep.Run("good", "train.py", good.overrides + ["seed=7"], good.labels)  # the same run name, other settings
    with pytest.raises(SystemExit, match="good were done before with other arguments"):
        sweep.launch([bad, seeded], str(tmp_path))
    # Where the data lies does not define a run: done elsewhere with the same data, it counts as done.
    moved = sweep.Run("good", "train.py", [o.replace(tiny_data, "/elsewhere") for o in good.overrides], good.labels)
    assert [o.status for o in sweep.launch([moved], str(tmp_path))] == ["skipped"]


ENTRYPOINT = """import atexit, os, sys, time
atexit.register(print, "atexit ran")
print("argv", sys.argv, __name__, sys.path[0], "parent", os.getppid(), flush=True)
print("to stderr", file=sys.stderr)
print("buffered")
if sys.argv[1] == "raise":
    raise ValueError("boom")
if sys.argv[1] == "sleep":
    time.sleep(600)
sys.exit(int(sys.argv[1]))
"""


def test_forked_runs_end_as_fresh_interpreters_do(tmp_path):
    """A run the fork server starts writes the output and ends with the status of `python ENTRY`:
    the traceback and status 1 of an exception, sys.exit's code, atexit handlers, buffered output."""
    entrypoint = tmp_path / "entry.py"
    entrypoint.write_text(ENTRYPOINT)
    endings = {"0": 0, "3": 3, "raise": 1}
    server = sweep._ForkServer()
    try:
        forked = {ending: server.start(str(entrypoint), [ending], str(tmp_path / f"forked_{ending}.log")) for ending in endings}
        assert None not in forked.values()  # forked, not left to a subprocess
        deadline = time.time() + 300
        while any(process.poll() is None for process in forked.values()):
            assert time.time() < deadline, "forked runs did not end"
            time.sleep(0.05)
    finally:
        server.close()
    for ending, status in endings.items():
        with open(tmp_path / f"fresh_{ending}.log", "w") as log:
            fresh = subprocess.run([sys.executable, str(entrypoint), ending], cwd=sweep.ROOT, stdout=log, stderr=subprocess.STDOUT,
                                   timeout=120)
        assert forked[ending].returncode == fresh.returncode == status
        forked_output, fresh_output = (re.sub(r"parent \d+", "parent", (tmp_path / f"{way}_{ending}.log").read_text())
                                       for way in ("forked", "fresh"))
        assert forked_output == fresh_output
    assert "ValueError: boom" in (tmp_path / "fresh_raise.log").read_text() and "atexit ran" in fresh_output


def test_launch_forks_runs_and_kills_those_that_time_out(tmp_path):
    entrypoint = tmp_path / "entry.py"
    entrypoint.write_text(ENTRYPOINT)
    outcomes = sweep.launch([sweep.Run("sleeps", str(entrypoint), ["sleep"])], str(tmp_path), timeout=10)
    assert [o.status for o in outcomes] == ["failed"]
    failed = (tmp_path / "sleeps" / "FAILED").read_text()
    assert "timed out" in failed and "parent " in failed
    assert f"parent {os.getpid()}" not in failed  # forked by the server, not started from here


def test_a_forked_run_writes_the_metrics_of_a_fresh_one(tmp_path, tiny_data, monkeypatch):
    overrides = TINY + ["n_workers=2", f"data_dir={tiny_data}"]
    fresh = subprocess.run([sys.executable, "train.py"] + overrides + [f"output_dir={tmp_path / 'fresh'}"], cwd=sweep.ROOT,
                           capture_output=True, text=True, timeout=600)
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    answers = []  # the fork server's: the run must not have been left to a subprocess
    start = sweep._ForkServer.start
    monkeypatch.setattr(sweep._ForkServer, "start", lambda server, *args: answers.append(start(server, *args)) or answers[-1])
    assert [o.status for o in sweep.launch([sweep.Run("forked", "train.py", overrides)], str(tmp_path))] == ["done"]
    assert len(answers) == 1 and answers[0] is not None
    assert comparable(tmp_path / "forked") == comparable(tmp_path / "fresh")


@pytest.mark.parametrize("study", [deep_learning, non_iid, warm_start, resnet20, heterogeneous])
def test_training_studies_run_end_to_end_at_tiny_scale(tmp_path, tiny_data, study):
    overrides = TINY + [f"data_dir={tiny_data}"] + (["evaluate_each_worker=true"] if study is heterogeneous else [])
    result = subprocess.run([sys.executable, study.__file__, "--quick", "--output", str(tmp_path)] + overrides,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    expected = len(study.study_runs(True, []))
    assert len(list((tmp_path / "runs").glob("*/DONE"))) == expected
    table = (tmp_path / "table.csv").read_text().splitlines()
    assert len(table) == expected + 1
    assert os.path.exists(tmp_path / "test_accuracy.png")
    if study is heterogeneous:  # the worst worker's accuracy beside the averaged model's, and MB per worker
        with open(tmp_path / "table.csv") as f:
            rows = list(csv.DictReader(f))
        assert all(row["worst-worker test accuracy, mean ± std over seeds"].endswith("%") for row in rows)
        assert all(float(row["MB sent / worker / epoch"]) >= 0 for row in rows)
        runs = study.study_runs(True, [])
        worst = study.finals(runs, str(tmp_path), "test_worst")
        for run in runs:  # the worst worker's record is the lowest of the workers' own at the last epoch
            records = [r for r in powergossip_runs.read_metrics(str(tmp_path / "runs" / run.name))
                       if r["name"] == "accuracy" and r["tags"].get("split") == "test" and "worker" in r["tags"]]
            last = max(r["epoch"] for r in records)
            assert worst[tuple(run.labels[k] for k in study.LABELS)] == [min(r["value"] for r in records if r["epoch"] == last)]
        os.remove(tmp_path / "runs" / runs[0].name / "DONE")  # as a diverged run leaves it: no result, in the figure too
        assert tuple(runs[0].labels[k] for k in study.LABELS) not in study.finals(runs, str(tmp_path), "test_worst")
        assert study.worst_worker_figure(runs, str(tmp_path), study.QUICK_LEARNING_RATE) == str(tmp_path / "worst_worker.png")


def test_heterogeneous_study_defines_the_issues_grid():
    """Study 13: 16 workers, batch 32, per-class Dirichlet alpha 0.1 and 0.01, 20 epochs, seeds 1 and 2;
    all-reduce on the 3-point learning-rate grid first, every other method at the chosen point."""
    tuning = heterogeneous.tuning_runs([])
    assert len(tuning) == 2 * 2 * 3 and {r.labels["learning rate"] for r in tuning} == set(heterogeneous.LEARNING_RATES)
    full = heterogeneous.study_runs(False, [], learning_rate=0.1)
    per_seed_and_alpha = len(heterogeneous.METHODS) + 2
    assert len(full) == 2 * 2 * per_seed_and_alpha and len({r.name for r in full}) == len(full)
    assert full[:len(tuning)] == tuning
    assert {r.labels["seed"] for r in full} == {1, 2} and {r.labels["alpha"] for r in full} == {0.1, 0.01}
    for run in full:
        for setting in ("n_workers=16", "batch_size=32", "num_epochs=20", "dirichlet_split=per_class", "task_architecture=small_cnn"):
            assert setting in run.overrides
    assert {r.labels["learning rate"] for r in full if r.labels["method"] != "All-reduce"} == {0.1}
    with pytest.raises(ValueError, match="grid"):
        heterogeneous.study_runs(False, [], learning_rate=0.05)
    from powergossip import configuration, train
    for run in full[len(tuning) - 3:len(tuning) + per_seed_and_alpha - 3]:  # every method passes train.py's checks (D²: (I+W)/2)
        train.checked(configuration.apply_overrides(train._DEFAULTS, [o for o in run.overrides if not o.endswith(".yaml")]))


def test_unreliable_study_defines_the_issues_grid_and_names_what_it_cannot_run():
    """Study 14: the heterogeneous study's setting at alpha 0.1, 10 methods (RelaySum with either
    fill) x 5 fault settings x 2 seeds; a pair whose faults train.py would refuse is left out and
    named with the reason (push-sum's directed graph with cut links or absences)."""
    runs, not_run = unreliable.study_runs(False, [], learning_rate=0.03)
    assert len(runs) + 2 * len(not_run) == 10 * 5 * 2 and len({r.name for r in runs}) == len(runs)
    assert [line.split(":")[0] for line in not_run] == [f"SGP (time-varying exponential) with 10% of {what}"
                                                         for what in ("links down", "workers away")]
    assert {r.labels["faults"] for r in runs} == {label for label, _ in unreliable.FAULTS.values()}
    assert all("dirichlet_alpha=0.1" in r.overrides and "n_workers=16" in r.overrides and "learning_rate=0.03" in r.overrides
               for r in runs)
    from powergossip import configuration, train
    for run in [r for r in runs if r.labels["seed"] == 1]:  # every pair planned passes train.py's checks
        train.checked(configuration.apply_overrides(train._DEFAULTS, run.overrides))


def test_unreliable_consensus_part_runs_on_the_cpu_wherever_the_training_part_runs():
    # a GPU launch must find the consensus runs made on the CPU before (`--consensus-only`) as they were
    overrides = ["device=cuda", "stacked_compute=graph", "data_dir=/data", "seed=3"]
    assert unreliable.consensus_overrides(overrides) == ["seed=3"]
    on_gpu, _ = unreliable.consensus_runs(False, unreliable.consensus_overrides(overrides))
    on_cpu, _ = unreliable.consensus_runs(False, unreliable.consensus_overrides(["seed=3"]))
    assert [r.overrides for r in on_gpu] == [r.overrides for r in on_cpu] and len(on_gpu) == 45


def test_unreliable_report_only_keeps_the_consensus_report_when_its_runs_are_not_there(tmp_path):
    (tmp_path / "consensus.md").write_text("written before")
    result = subprocess.run([sys.executable, unreliable.__file__, "--quick", "--report-only", "--output", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "consensus.md and .png left as they were" in result.stdout
    assert (tmp_path / "consensus.md").read_text() == "written before" and (tmp_path / "table.md").exists()


def test_unreliable_study_runs_end_to_end_at_tiny_scale(tmp_path, tiny_data):
    result = subprocess.run([sys.executable, unreliable.__file__, "--quick", "--output", str(tmp_path)] + TINY
                            + [f"data_dir={tiny_data}", "evaluate_each_worker=true"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    runs, not_run = unreliable.study_runs(True, [])
    assert len([p for p in (tmp_path / "runs").glob("*/DONE") if not p.parent.name.startswith("consensus_")]) == len(runs) == 8
    with open(tmp_path / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 8 and all(row["worst-worker test accuracy, mean ± std over seeds"].endswith("%") for row in rows)
    lost = [r for r in sweep.collect(runs, str(tmp_path / "runs")) if "lost" in r.run.labels["faults"]]
    assert lost and all(any(m["name"] == "messages_lost" and m["value"] > 0 for m in sweep.metrics(o)) for o in lost)
    assert "SGP (time-varying exponential) with 10% of links down" in (tmp_path / "table.md").read_text()
    # the consensus part: push-sum's running sums reach the starting mean under 10% loss, D-PSGD's mean drifts
    with open(tmp_path / "consensus.csv") as f:
        consensus = {(row["method"], row["faults"]): row for row in csv.DictReader(f)}
    to_mean = "distance to the starting mean at the end / the starting error"
    assert len(consensus) == 6 and os.path.getsize(tmp_path / "consensus.png") > 1000
    assert float(consensus["push-sum", "10% of messages lost"][to_mean]) < 1e-6
    assert float(consensus["D-PSGD", "10% of messages lost"][to_mean]) > 1e-4 > float(consensus["D-PSGD", "none"][to_mean])


def _finished(folder, run: sweep.Run, accuracy: float | None) -> sweep.Outcome:
    """An outcome as a launch leaves it: a run that ended with this test accuracy, or (None) one
    that train.py's loss check stopped."""
    path = folder / run.name
    path.mkdir(parents=True)
    if accuracy is None:
        (path / "FAILED").write_text("FloatingPointError: worker 3's loss is nan\n")
        return sweep.Outcome(run, str(path), "failed")
    record = {"name": "accuracy", "value": accuracy, "epoch": 20.0, "bits": 0.0, "messages": 0.0, "tags": {"split": "test_avg"}}
    (path / "metrics.jsonl").write_text(json.dumps(record) + "\n")
    return sweep.Outcome(run, str(path), "done")


def test_heterogeneous_study_picks_all_reduces_best_rate_and_lowers_it_for_a_method_that_diverges(tmp_path):
    accuracy = {0.01: 0.70, 0.03: 0.80, 0.1: 0.75}  # by learning rate; alpha 0.01 runs 0.1 points lower
    outcomes = [_finished(tmp_path, run, accuracy[run.labels["learning rate"]] - (0.1 if run.labels["alpha"] == 0.01 else 0))
                for run in heterogeneous.tuning_runs([])]
    rate, sentence = heterogeneous.chosen_learning_rate(outcomes)
    assert rate == 0.03 and "0.01: 65.00%, 0.03: 75.00%, 0.1: 70.00%" in sentence
    # a point where one all-reduce run diverged cannot be chosen
    outcomes[1] = _finished(tmp_path / "again", outcomes[1].run, None)
    assert outcomes[1].run.labels["learning rate"] == 0.03
    assert heterogeneous.chosen_learning_rate(outcomes)[0] == 0.1

    runs = heterogeneous.study_runs(False, [], learning_rate=0.03)
    d2 = [r for r in runs if r.labels["method"].startswith("D²")]
    others = [r for r in runs[len(outcomes):] if r not in d2]
    method_outcomes = [_finished(tmp_path / "methods", r, None if r.labels["alpha"] == 0.01 and r.labels["seed"] == 2 else 0.8)
                       for r in d2] + [_finished(tmp_path / "methods", r, 0.8) for r in others[:5]]
    retries = heterogeneous.smaller_rate_runs(method_outcomes, [])
    assert [(r.labels["method"], r.labels["alpha"], r.labels["learning rate"], r.labels["seed"]) for r in retries] == [
        ("D² (ring, (I+W)/2)", 0.01, 0.01, 1), ("D² (ring, (I+W)/2)", 0.01, 0.01, 2)]  # every seed, one point lower
    lowest = [_finished(tmp_path / "lowest", r, None) for r in retries]
    assert heterogeneous.smaller_rate_runs(lowest, []) == []  # nothing below the grid


def test_power_iterations_study_runs_a_part_of_its_grid_at_tiny_scale(tmp_path, tiny_data):
    overrides = TINY + [f"data_dir={tiny_data}"]
    result = subprocess.run([sys.executable, power_iterations.__file__, "--quick", "--iterations", "1,2", "--ranks", "1,2",
                             "--output", str(tmp_path)] + overrides, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.parent.name for p in (tmp_path / "runs").glob("*/DONE")) == [
        "rank1_iterations1", "rank1_iterations2", "rank2_iterations1", "rank2_iterations2"]
    with open(tmp_path / "table.csv") as f:
        megabytes = {(row["rank"], row["iterations"]): float(row["MB sent / worker / epoch"]) for row in csv.DictReader(f)}
    # More iterations or a higher rank send more: the grid's point (bits per step grow with both).
    assert megabytes[("1", "1")] < megabytes[("1", "2")] and megabytes[("1", "1")] < megabytes[("2", "1")]
    assert os.path.getsize(tmp_path / "final_accuracy_vs_mb.png") > 1000
    assert "n_workers: 16" in (tmp_path / "runs" / "rank2_iterations2" / "config.yaml").read_text()


def test_no_tuning_variants_replace_the_tuned_values(tmp_path, tiny_data):
    """Each variant's overrides come after the method's tuned ones, so train.py runs the variant's
    values: gamma 1 and all-reduce's warmup factor where untuned, the paper's where tuned."""
    runs = {run.name: run for run in no_tuning.study_runs(True, [])}
    assert len(runs) == 1 + 2 + 2 + 3 * 4 and {r.labels["seed"] for r in runs.values()} == {1}
    picked = [runs["choco_sign_untuned"], runs["choco_sign_tuned"], runs["moniqua_gamma1"], runs["deepsqueeze_sign_allreduce_lr"]]
    tiny = [sweep.Run(r.name, r.entrypoint, r.overrides + TINY + [f"data_dir={tiny_data}"], r.labels) for r in picked]
    assert [o.status for o in sweep.launch(tiny, str(tmp_path))] == ["done"] * 4
    configs = {run.name: (tmp_path / run.name / "config.yaml").read_text() for run in picked}
    expected = {"choco_sign_untuned": (1.0, 11.3), "choco_sign_tuned": (0.45, 16.0), "moniqua_gamma1": (1.0, 4.0),
                "deepsqueeze_sign_allreduce_lr": (0.01, 11.3)}
    for name, (gamma, factor) in expected.items():
        assert f"optimizer_diffusion_rate: {gamma}\n" in configs[name], configs[name]
        assert f"distributed_lr_warmup_factor: {factor}\n" in configs[name], configs[name]


def test_quick_mode_is_the_documented_reduced_setting():
    runs = deep_learning.study_runs(True, [])
    assert {r.name for r in runs} == set(deep_learning.METHODS) and len(runs) == len(deep_learning.METHODS)
    assert all("device=cpu" in r.overrides and "max_batches_per_epoch=12" in r.overrides for r in runs)


@pytest.mark.parametrize("study", [deep_learning, non_iid, power_iterations, warm_start, no_tuning, resnet20])
def test_quick_studies_run_one_seed_and_full_ones_three(study):
    quick, full = study.study_runs(True, []), study.study_runs(False, [])
    assert {r.labels["seed"] for r in quick} == {1} and "seed=1" in quick[0].overrides
    assert len(full) == 3 * len(quick) and len({r.name for r in full}) == len(full)
    for seed in (1, 2, 3):
        assert len([r for r in full if r.labels["seed"] == seed and f"seed={seed}" in r.overrides]) == len(quick)
    assert len(study.study_runs(False, [], seeds=[4, 5])) == 2 * len(quick)


def test_seed_1_runs_keep_their_names_and_arguments_from_before_seeds():
    """Runs made before the studies took seeds (seed 1, these names and arguments) count as done."""
    run = next(r for r in deep_learning.study_runs(False, []) if r.name == "dpsgd")
    assert run.overrides[:len(deep_learning.COMMON) + 1] == deep_learning.COMMON + ["seed=1"]
    assert run.labels == {"method": "D-PSGD (uncompressed)", "seed": 1}


def test_powersgd_joins_the_comparison_only_where_it_is_registered():
    from powergossip import algorithms

    assert ("powersgd_2" in deep_learning.METHODS) == ("powersgd" in algorithms.METHODS)


def test_paper_configs_say_what_is_missing(tmp_path):
    result = subprocess.run([sys.executable, paper_configs.__file__, "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "cifar-10-batches-py/data_batch_1" in result.stdout and "wiki.train.tokens" in result.stdout
    (tmp_path / "cifar-10-batches-py").mkdir()
    for name in ("data_batch_1", "test_batch"):
        (tmp_path / "cifar-10-batches-py" / name).write_bytes(b"")
    result = subprocess.run([sys.executable, paper_configs.__file__, "--check", "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert "cifar10_resnet20_ring8: data found, 10 runs" in result.stdout


def test_paper_bytes_count_the_model_once_per_neighbour():
    """The paper's 102 MB/epoch is ResNet-20 (272,474 float32 parameters) sent to both ring neighbours."""
    config = os.path.join(paper_bytes.SETUP, "{}.yaml")
    assert paper_bytes.bytes_per_step(config.format("dpsgd"), steps=2) == 272_474 * 4 * 2
    assert 30_000 < paper_bytes.bytes_per_step(config.format("power_gossip_1_iteration"), steps=2) < 50_000


def test_consensus_counts_topk_indices_as_the_original_did():
    assert consensus.original_count_ratio("topk_choco", 100 * 100) == 2  # int16 on the wire, int64 counted
    assert consensus.original_count_ratio("topk_choco", 100) == (32 + 64) / (32 + 8)  # uint8 on the wire
    assert consensus.original_count_ratio("sign_choco", 100 * 100) == 1
    assert consensus.original_count_ratio("power_gossip", 28 * 28) == 1


def test_quick_studies_write_outside_the_tracked_tree():
    import subprocess as sp

    if sp.run(["git", "rev-parse"], cwd=sweep.ROOT, capture_output=True, timeout=60).returncode != 0:
        pytest.skip("not a git checkout")
    for study, name in ((deep_learning, "deep_learning"), (non_iid, "non_iid"), (power_iterations, "power_iterations"),
                        (warm_start, "warm_start"), (topology_study, "topologies"), (spectral_gap, "spectral_gap"),
                        (no_tuning, "no_tuning"), (resnet20, "resnet20"), (full_budget, "full_budget"),
                        (heterogeneous, "heterogeneous")):
        args = sweep.study_arguments("").parse_args(["--quick"])
        folder = sweep.study_folder(args, name)
        ignored = sp.run(["git", "check-ignore", "-q", os.path.join(folder, "table.md")], cwd=sweep.ROOT, timeout=60)
        assert ignored.returncode == 0, f"{folder} is not ignored by git"  # a quick try changes no tracked file
        full = sweep.study_folder(sweep.study_arguments("").parse_args([]), name)
        assert full == os.path.join(sweep.RESULTS, name)  # the committed study results stay where they are


# The study scripts run as their command lines would, one after another in one interpreter:
# nine interpreters would import torch nine times.
STUDY_SCRIPTS = """import runpy, sys
for path in sys.argv[1:]:
    sys.argv = [path, "--quick", "--report-only"]
    try:
        runpy.run_path(path, run_name="__main__")
    except SystemExit as exit:  # the training studies exit with their status
        if exit.code not in (0, None):
            raise
"""


def test_quick_studies_leave_git_status_unchanged():
    """Every study's --quick report (written where its --quick runs go) changes nothing git sees."""
    import subprocess as sp

    def status():
        return sp.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=sweep.ROOT, capture_output=True,
                      text=True, timeout=60).stdout

    if sp.run(["git", "rev-parse"], cwd=sweep.ROOT, capture_output=True, timeout=60).returncode != 0:
        pytest.skip("not a git checkout")
    before = status()
    studies = (consensus, deep_learning, non_iid, power_iterations, warm_start, topology_study, spectral_gap, no_tuning, resnet20,
               full_budget, heterogeneous)
    result = sp.run([sys.executable, "-c", STUDY_SCRIPTS] + [study.__file__ for study in studies], cwd=sweep.ROOT,
                    capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert status() == before


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


def test_spectral_gap_study_fits_rates_and_slopes_at_tiny_scale(tmp_path):
    result = subprocess.run([sys.executable, spectral_gap.__file__, "--quick", "--output", str(tmp_path)], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(list((tmp_path / "runs").glob("*/DONE"))) == len(spectral_gap.study_runs(True, [])) == 5 + 5 + 3
    rates = {(row["method"], row["graph"]): row for row in csv.DictReader(open(tmp_path / "rates.csv"))}
    for graph in ("ring", "torus"):  # uncompressed gossip with gamma 1 contracts at exactly |lambda_2| per round
        row = rates["uncompressed", graph]
        assert float(row["rate (fitted)"]) == pytest.approx(float(row["spectral gap (per round)"]), rel=0.02)
    assert float(rates["uncompressed", "one_peer_hypercube"]["rate (fitted)"]) == 1.0  # exact average after log2(8) rounds
    assert 0 < float(rates["power_gossip", "ring"]["rate (fitted)"]) < float(rates["uncompressed", "ring"]["rate (fitted)"])
    assert ("sign_choco", "random_matching") not in rates  # Choco runs on fixed graphs only
    assert int(rates["uncompressed", "ring"]["rounds to 1e-06"]) <= 40  # gap 0.195: 1e-6 of the error in ln(1e6) / 0.39 rounds
    slopes = {(row["rate"], row["method"]): row for row in csv.DictReader(open(tmp_path / "slopes.csv"))}
    assert float(slopes["fitted rate", "uncompressed"]["slope, all its graphs"]) == pytest.approx(1.0, abs=0.1)
    assert int(slopes["fitted rate", "sign_choco"]["fixed graphs"]) == 3
    assert os.path.getsize(tmp_path / "rate_vs_gap.png") > 1000


def test_spectral_gap_rate_fit_recovers_a_known_contraction():
    points = [(step, 0.9 ** (2 * step)) for step in (0, 1, 2, 5, 10, 20, 30)]  # squared norm of a 0.9-contraction
    rate, _ = spectral_gap.fitted_rate(points)
    assert rate == pytest.approx(0.1)
    assert spectral_gap.fitted_rate([(0, 1.0), (1, 0.25), (2, 0.0)])[0] == 1.0  # exact averaging after two rounds
    logged = points + [(70, 0.9 ** 140)]  # 1e-6 is first reached at round 66; the first logged round at or below it is 70
    assert spectral_gap.rate_to_target(logged) == (pytest.approx(1 - 1e-6 ** (1 / 140)), 70)
    assert spectral_gap.rate_to_target(points)[1] is None
    assert spectral_gap.slope([(0.01, 0.002), (0.1, 0.02), (1.0, 0.2)]) == pytest.approx(1.0)
    assert spectral_gap.slope([(0.01, 1e-4), (0.1, 1e-2)]) == pytest.approx(2.0)


def test_full_budget_runs_the_papers_files_seed_by_seed():
    """Study 12: every method's run reads the paper's file first (so the study's task and
    layout override it), the 8-ring has all eight methods and the 16-ring three, and every
    method's seed 1 comes before any seed 2."""
    runs = full_budget.study_runs(False, [])
    assert len(runs) == 2 * (8 + 3) and [r.labels["seed"] for r in runs] == [1] * 11 + [2] * 11
    for run in runs:
        assert os.path.exists(run.overrides[0])  # from any folder (sweeps start runs in the caller's)
        assert sweep._arguments(run, None)[1] == os.path.relpath(run.overrides[0], sweep.ROOT)  # DONE reads the same anywhere
        assert run.overrides.index("task=fashion_mnist") > 0 and "num_epochs=2" not in run.overrides
    assert {r.labels["method"] for r in runs if r.labels["graph"] == "16-worker ring"} == {
        "All-reduce", "PowerGossip (1 iteration)", "PowerGossip (2 iterations)"}
    for run in full_budget.study_runs(True, []):  # --quick: 4 workers on the CPU, whichever graph the part names
        assert run.overrides.index("n_workers=4") > max(run.overrides.index(f"n_workers={n}") for n in (8, 16)
                                                        if f"n_workers={n}" in run.overrides)


def test_full_budget_committed_runs_count_as_done_here():
    """The committed 300-epoch runs were launched with this study's arguments (their data
    elsewhere): a launch here skips them rather than refusing or repeating them."""
    folder = os.path.join(sweep.RESULTS, "full_budget", "runs")
    committed = {name for name in os.listdir(folder) if os.path.exists(os.path.join(folder, name, "DONE"))} \
        if os.path.isdir(folder) else set()
    if not committed:
        pytest.skip("no committed runs")
    runs = {run.name: run for run in full_budget.study_runs(False, ["data_dir=/any/where"], seeds=[1, 2, 3])}
    assert committed <= set(runs)
    for name in committed:
        assert not sweep._done_with_other_arguments(runs[name], os.path.join(folder, name), None), name
        summary = json.load(open(os.path.join(folder, name, "summary.json")))
        assert summary["epochs"] == 300 and 0.5 < summary["test_avg_accuracy"] <= 1


def test_wall_clock_study_defines_the_issues_grid():
    """Study 15: 16 workers, the small CNN; every synchronous method once per graph and seed (timed
    afterwards under every condition), AD-PSGD once per graph, condition and seed on its clock."""
    runs = wall_clock.study_runs(False, [])
    conditions = wall_clock.conditions(False)
    assert len(conditions) == 4 * 3
    synchronous = [r for r in runs if "network" not in r.labels]
    asynchronous = [r for r in runs if "network" in r.labels]
    assert len(synchronous) == 2 * 11 and len(asynchronous) == 2 * 2 * len(conditions) and len({r.name for r in runs}) == len(runs)
    assert all("simulated_clock=true" not in r.overrides for r in synchronous)
    assert {(r.labels["network"], r.labels["workers"]) for r in asynchronous} == set(conditions)
    gpu_runs = wall_clock.study_runs(False, ["device=cuda", "stacked_compute=graph"])  # AD-PSGD computes one worker at a time
    assert all(r.overrides.index("stacked_compute=loop") > r.overrides.index("stacked_compute=graph")
               for r in gpu_runs if "network" in r.labels)
    from powergossip import configuration, train
    for run in [r for r in runs if r.labels["seed"] == 1]:  # every run passes train.py's checks
        train.checked(configuration.apply_overrides(train._DEFAULTS, run.overrides))


def test_wall_clock_study_traces_one_seed_for_all(tiny_data):
    """The report times each synchronous method's traffic once for all its seeds (traffic_of):
    what a run sends does not depend on its seed, checked on each study method's first steps."""
    for name, (label, overrides, graphs) in wall_clock.METHODS.items():
        if name in wall_clock.ASYNCHRONOUS:
            continue
        traces = []
        for seed in (1, 2):
            run = sweep.Run("trace", "train.py", wall_clock.COMMON + [f"seed={seed}", f"topology={graphs[-1]}"] + wall_clock.QUICK
                            + overrides + TINY + [f"data_dir={tiny_data}"])
            traces.append(wall_clock.traffic(run)[1])
        as_lists = [[[(list(s), None if r is None else list(r), bits) for s, r, bits in exchanges] + [gossiped]
                     for exchanges, gossiped in trace] for trace in traces]
        assert as_lists[0] == as_lists[1] and any(step[:-1] for step in as_lists[0]), name


def test_wall_clock_study_runs_end_to_end_at_tiny_scale(tmp_path, tiny_data):
    result = subprocess.run([sys.executable, wall_clock.__file__, "--quick", "--output", str(tmp_path)] + TINY
                            + [f"data_dir={tiny_data}"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(list((tmp_path / "runs").glob("*/DONE"))) == len(wall_clock.study_runs(True, [])) == 5
    with open(tmp_path / "table.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 + 2  # 3 synchronous runs timed under both conditions, AD-PSGD on its clock under each
    steps = 2  # TINY: one epoch of 2 batches
    for row in rows:  # with equal workers each spends its compute every step; a slow one raises the mean
        compute = float(row["compute (s)"])
        if row["workers"] == "equal" and row["method"] != "AD-PSGD":
            assert compute == pytest.approx(steps * wall_clock.COMPUTE_SECONDS, rel=1e-9)
        total = float(row["simulated time of the run (s)"])
        assert total >= compute + float(row["sending (s)"]) - 1e-12  # the slowest worker's time bounds the mean's parts
    assert os.path.getsize(tmp_path / "accuracy_vs_time.png") > 1000
    assert "not a measurement" in (tmp_path / "table.md").read_text()

