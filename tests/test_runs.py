"""Runs that never lose results: output folders, resume, checkpoints, divergence, config errors.

Each test reproduces one way a user could lose or mix results and asserts the new
behaviour (an error that names the problem, an intact earlier run, an exact resume).
"""
import itertools
import json
import multiprocessing
import os
import re
import shutil
import signal
import threading
import time
import traceback

import pytest
import torch
from matplotlib.figure import Figure

from powergossip import configuration, figures, metrics, runs
from powergossip.models.stacked import StackedReplicas
import train
from tests.launch import run_mpi
from tests.test_data import fake_fmnist
from tests.test_train import LateEvent
from tests.train_runs import DEFAULTS, deferred, diverging_at, run, stopped_and_resumed


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fmnist")
    fake_fmnist(folder, n_train=512, n_test=64)
    return str(folder)


def settings(tiny_data, **extra):
    values = {"data_dir": tiny_data, "batch_size": 16, "num_epochs": 1, "n_workers": 4, "max_batches_per_epoch": 4,
              "distributed_lr_warmup_epoch": 0, "lr_schedule_milestones": [], "device": "cpu", "seed": 3} | extra
    return [f"{key}={json.dumps(value)}" for key, value in values.items()]


def records(folder):
    return [(r["name"], r["epoch"], r["tags"], r["value"], r["bits"]) for r in runs.read_metrics(str(folder))
            if not r["name"].startswith("time_")]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, tiny_data):
    """records_of(num_epochs): the records of an uninterrupted run of settings(tiny_data, num_epochs=...),
    which the resumed runs below must equal; each length is run once for the module."""
    done = {}

    def records_of(num_epochs):
        if num_epochs not in done:
            folder = tmp_path_factory.mktemp(f"uninterrupted_{num_epochs}_epochs")
            run(str(folder), settings(tiny_data, num_epochs=num_epochs))
            done[num_epochs] = records(folder)
        return done[num_epochs]
    return records_of


def contents(folder):
    """Every file under `folder` with its bytes (to show that nothing changed)."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = f.read()
    return found


# --- 1. a reused output_dir -----------------------------------------------------------------------
def test_a_folder_with_results_is_refused_and_left_intact(tmp_path, tiny_data):
    run(str(tmp_path), settings(tiny_data))
    before = contents(tmp_path)
    with pytest.raises(configuration.ConfigError, match="holds another run's results .*resume=true.*overwrite=true"):
        run(str(tmp_path), settings(tiny_data, seed=4))
    assert contents(tmp_path) == before


def test_overwrite_replaces_the_results(tmp_path, tiny_data):
    run(str(tmp_path), settings(tiny_data))
    first = records(tmp_path)
    run(str(tmp_path), settings(tiny_data, seed=4) + ["overwrite=true"])
    second = records(tmp_path)
    assert [r[:3] for r in first] == [r[:3] for r in second] and first != second  # one run's records, the new one's
    assert torch.load(tmp_path / "checkpoints" / "rank0.pt", weights_only=True)["run"]["config"]["seed"] == 4
    assert not (tmp_path / "checkpoints" / "rank0.previous.pt").exists()  # the old run's checkpoint is gone too


def test_files_beside_a_run_are_not_results(tmp_path, tiny_data):
    (tmp_path / "output.log").write_text("a sweep's launch log")
    run(str(tmp_path), settings(tiny_data))
    assert (tmp_path / "output.log").read_text() == "a sweep's launch log"


def test_resume_without_a_checkpoint_is_an_error(tmp_path, tiny_data):
    (tmp_path / "metrics.jsonl").write_text('{"name": "mine"}\n')
    with pytest.raises(configuration.ConfigError, match="holds no checkpoint.*overwrite=true"):
        run(str(tmp_path), settings(tiny_data) + ["resume=true"])
    assert (tmp_path / "metrics.jsonl").read_text() == '{"name": "mine"}\n'


def test_resuming_a_finished_run_keeps_its_summary(tmp_path, tiny_data, capsys):
    run(str(tmp_path), settings(tiny_data))
    before = contents(tmp_path)
    assert json.loads(before["summary.json"])["test_avg_accuracy"] is not None
    run(str(tmp_path), settings(tiny_data) + ["resume=true"])
    assert "nothing to do" in capsys.readouterr().out
    assert contents(tmp_path) == before


def test_resumed_summary_carries_the_accuracy(tmp_path, tiny_data):
    run(str(tmp_path), settings(tiny_data, num_epochs=2, evaluate_each_worker=False))
    with open(tmp_path / "summary.json") as f:
        full = json.load(f)
    run(str(tmp_path / "parts"), settings(tiny_data, evaluate_each_worker=False))
    run(str(tmp_path / "parts"), settings(tiny_data, num_epochs=2, evaluate_each_worker=False) + ["resume=true"])
    with open(tmp_path / "parts" / "summary.json") as f:
        parts = json.load(f)
    assert parts["test_avg_accuracy"] == full["test_avg_accuracy"] is not None


def test_no_output_dir_gives_each_run_a_fresh_folder(tmp_path, tiny_data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    train.config = configuration.apply_overrides(DEFAULTS, settings(tiny_data))
    train.output_dir = None
    first, second = train.main(), train.main()
    assert first != second and os.path.dirname(first) == os.path.dirname(second) == "runs"
    assert records(tmp_path / first) == records(tmp_path / second)  # same config, same seed: two whole runs


# --- 2. resume and the configuration ---------------------------------------------------------------
def test_resume_refuses_a_changed_definition_of_the_run(tmp_path, tiny_data):
    run(str(tmp_path), settings(tiny_data) + ["optimizer=power-gossip"])
    before = contents(tmp_path)
    with pytest.raises(configuration.ConfigError, match=r"optimizer_rank=2 \(the run has 1\)"):
        run(str(tmp_path), settings(tiny_data, num_epochs=2) + ["optimizer=power-gossip", "optimizer_rank=2", "resume=true"])
    assert contents(tmp_path) == before  # config.yaml still says rank 1


def test_resume_may_change_the_learning_rate_and_epochs(tmp_path, tiny_data):
    run(str(tmp_path), settings(tiny_data))
    run(str(tmp_path), settings(tiny_data, num_epochs=2, learning_rate=0.01, weight_decay=0.0) + ["resume=true"])
    assert {r[1] for r in records(tmp_path)} == {1.0, 2.0}
    stored = configuration.apply_overrides(DEFAULTS, [str(tmp_path / "config.yaml")])
    assert stored["learning_rate"] == 0.01 and not stored["resume"]  # a new run from this file starts afresh


def test_the_modelled_network_time_is_recorded_and_may_change_on_resume(tmp_path, tiny_data):
    """communication_time_model = alpha x messages + bits / beta (metrics.network_seconds), from the
    epoch's cumulative counts; the network keys change no training, so a resume may change them."""
    run(str(tmp_path), settings(tiny_data, network_latency_s=0.001, network_bandwidth_bits_per_s=1e6))
    run(str(tmp_path), settings(tiny_data, num_epochs=2, network_latency_s=0.0, network_bandwidth_bits_per_s=1e8) + ["resume=true"])
    modelled = {r["epoch"]: r for r in runs.read_metrics(str(tmp_path)) if r["name"] == "communication_time_model"}
    first, second = modelled[1.0], modelled[2.0]
    assert first["messages"] > 0 and first["bits"] > 0  # power-gossip on a 4-ring sends from its second step
    assert first["value"] == pytest.approx(first["messages"] * 0.001 + first["bits"] / 1e6)
    assert second["value"] == pytest.approx(second["bits"] / 1e8)
    with pytest.raises(configuration.ConfigError, match="network_bandwidth_bits_per_s > 0"):
        train.validated(dict(DEFAULTS) | {"network_bandwidth_bits_per_s": 0.0})


def test_a_stored_config_given_to_a_new_run_replaces_nothing(tmp_path, tiny_data):
    run(str(tmp_path / "a"), settings(tiny_data) + ["overwrite=true"])
    before = contents(tmp_path / "a")
    with pytest.raises(configuration.ConfigError, match="holds another run's results"):
        run(str(tmp_path / "a"), [str(tmp_path / "a" / "config.yaml")])
    assert contents(tmp_path / "a") == before


def test_checkpoints_of_older_versions_still_load_with_a_warning(tmp_path, tiny_data, uninterrupted):
    run(str(tmp_path / "parts"), settings(tiny_data))
    path = tmp_path / "parts" / "checkpoints" / "rank0.pt"
    old = torch.load(path, weights_only=True)
    del old["run"]
    torch.save(old, path)
    with pytest.warns(UserWarning, match="older version"):
        run(str(tmp_path / "parts"), settings(tiny_data, num_epochs=2) + ["resume=true"])
    assert records(tmp_path / "parts") == uninterrupted(2)


def test_checkpoints_without_the_elapsed_time_still_load(tmp_path, tiny_data):
    run(str(tmp_path), settings(tiny_data))
    path = tmp_path / "checkpoints" / "rank0.pt"
    old = torch.load(path, weights_only=True)
    del old["run"]["elapsed_s"]  # as written before summary.json's wall time covered every launch
    torch.save(old, path)
    run(str(tmp_path), settings(tiny_data, num_epochs=2) + ["resume=true"])
    with open(tmp_path / "summary.json") as f:
        assert json.load(f)["wall_time_s"] > 0


# --- 3. divergence --------------------------------------------------------------------------------
def test_a_diverged_state_is_not_saved_and_the_last_good_one_resumes(tmp_path, tiny_data):
    run(str(tmp_path / "good"), settings(tiny_data))
    run(str(tmp_path / "good"), settings(tiny_data, num_epochs=3, learning_rate=0.01) + ["resume=true"])
    run(str(tmp_path / "blown"), settings(tiny_data))
    before = contents(tmp_path / "blown" / "checkpoints")
    # A loss of 1e20 is finite: the bound relative to the first loss catches it.
    with pytest.raises(FloatingPointError, match=r"max_loss_ratio.*last good checkpoint \(the end of epoch 1\)"):
        run(str(tmp_path / "blown"), settings(tiny_data, num_epochs=3, learning_rate=1e6) + ["resume=true"])
    assert contents(tmp_path / "blown" / "checkpoints") == before
    run(str(tmp_path / "blown"), settings(tiny_data, num_epochs=3, learning_rate=0.01) + ["resume=true"])
    assert records(tmp_path / "blown") == records(tmp_path / "good")  # the diverged attempt left nothing behind


def test_the_loss_check_reads_a_block_of_steps_lag_steps_after_its_last_and_everything_before_a_save():
    """On a GPU the steps are checked in blocks of LossCheck.LAG, a block read once its last
    step is LAG steps old (the host launches ahead); the run's first step alone and at once,
    for the bound; finish() reads every step; the error names the diverged step, wherever it
    is read, with the losses of that step. Here on the CPU with the GPU's lag of 3."""
    comm = type("Comm", (), {"device": torch.device("cpu"), "num_local": 2, "n_workers": 2, "first_worker": 0,
                             "sum_over_processes": staticmethod(lambda values: values)})()
    checkpoints = type("Checkpoints", (), {"last": None})()

    def watched(losses_by_step, lag):
        check = runs.LossCheck(comm, checkpoints, max_loss_ratio=10.0, initial_loss=None)
        check.lag = lag
        for step, losses in enumerate(losses_by_step):
            try:
                check.watch(torch.tensor(losses), 0, step)
            except FloatingPointError as error:
                return step, str(error)
        try:
            check.finish()
        except FloatingPointError as error:
            return "finish", str(error)
        return None, check.mean_loss

    fine = [[1.0, 3.0]] * 12
    assert watched(fine, 3) == (None, 2.0)
    assert watched(fine[:5] + [[2.0, 4.0]], 3) == (None, 3.0)  # the last step's mean loss
    assert runs.LossCheck.LAG >= 2
    # step index 2 is above 10 x the first step's mean, 2; with lag 3 it is in the block of steps 1-3, read at step 6
    blown = fine[:2] + [[1.0, 50.0]] + fine[:5]
    for lag, read_at in [(1, 3), (3, 6)]:  # step index at whose watch step index 2 is read
        at, message = watched(blown, lag)
        assert at == read_at and "epoch 1 step 3 " in message and "[1.0, 50.0]" in message
    at, message = watched(blown[:4], 3)  # read by finish() before a save
    assert at == "finish" and "epoch 1 step 3 " in message
    at, message = watched(blown[:3], 3)  # a block not full yet: finish() checks it
    assert at == "finish" and "epoch 1 step 3 " in message
    # the first step is read at once: the second step's verdict already has the bound (no lag on it); in a block, the
    # first diverged step is named
    at, message = watched([[1.0, 3.0], [1.0, 30.0], [1.0, 40.0]] + fine, 5)
    assert at == 10 and "epoch 1 step 2 " in message and "[1.0, 30.0]" in message


def test_the_loss_checks_blocks_keep_each_workers_first_divergence_and_name_the_first_step():
    """With blocks of any size (an epoch's end, a gap in the steps or other workers end one):
    diverged_at has every step watched, each worker's first diverged step with its loss, as
    the epoch's end reads it (deferred: no step read); a read raises for the first diverged
    step, with its losses; without one, the mean loss is the last step's."""
    comm = type("Comm", (), {"device": torch.device("cpu"), "num_local": 3, "n_workers": 3, "first_worker": 0,
                             "sum_over_processes": staticmethod(lambda values: values)})()
    checkpoints = type("Checkpoints", (), {"last": None})()
    generator = torch.Generator().manual_seed(0)
    steps = [(epoch, step) for epoch in range(3) for step in range(5)] + [(3, 2), (3, 3)]  # a resumed epoch: from step 2
    for trial in range(30):
        losses = torch.rand(len(steps), 3, generator=generator) * 4
        for _ in range(trial % 4):  # some diverge: above 10 x the first step's mean, or not finite
            losses[torch.randint(1, len(steps), (), generator=generator), torch.randint(3, (), generator=generator)] = (
                float("nan") if trial % 2 else 500.0)
        bound = 10 * losses[0].mean().item()
        for lag in (1, 2, 3, 4, 7):
            check = runs.LossCheck(comm, checkpoints, max_loss_ratio=10.0, initial_loss=None)
            check.lag, error, watched = lag, None, 0
            try:
                for (epoch, step), row in zip(steps, losses):
                    check.watch(row.clone(), epoch, step)
                    watched += 1
                    if step == 4:  # an epoch's end
                        expected = [[-1.0] * 3] * 3
                        for (e, s), seen in reversed(list(zip(steps[:watched], losses[:watched]))):
                            for worker in range(3):
                                if not seen[worker] <= bound:
                                    expected[worker] = [float(e), float(s), seen[worker].item()]
                        assert str(check.diverged_at.tolist()) == str(expected)
                check.finish()
            except FloatingPointError as raised:
                error = str(raised)
            diverged = [k for k, row in enumerate(losses) if not (row <= bound).all()]
            if diverged:
                epoch, step = steps[diverged[0]]
                assert error.startswith(f"the loss became {losses[diverged[0]].tolist()} at epoch {epoch + 1} step "
                                        f"{step + 1} "), (trial, lag, error)
            else:
                assert error is None and check.mean_loss == losses[-1].mean().item()


def test_the_loss_check_keeps_where_each_worker_first_diverged_and_names_the_first():
    """diverged_at: per local worker, the (epoch, step, loss) of its first diverged step;
    divergence(every worker's, gathered): the earliest step's lowest worker, this process's own
    error if the worker is its own, else one naming the worker, its process and the step."""
    comm = type("Comm", (), {"device": torch.device("cpu"), "num_local": 2, "n_workers": 6, "first_worker": 2,
                             "is_local": lambda self, worker: 2 <= worker < 4,
                             "process_of": lambda self, worker: worker // 2})()
    check = runs.LossCheck(comm, type("Checkpoints", (), {"last": None})(), max_loss_ratio=10.0, initial_loss=6.0)
    check.lag = 5  # no step read yet: the GPU's case
    nan = float("nan")
    for step, losses in enumerate([[1.0, 3.0], [1.0, 70.0], [nan, 80.0]]):
        check.watch(torch.tensor(losses), 1, step)
    assert check.diverged_at[:, :2].tolist() == [[1, 2], [1, 1]] and check.diverged_at[0, 2].isnan()
    assert check.diverged_at[1, 2] == 70  # its first diverged loss
    never, mine = [-1.0, -1.0, -1.0], check.diverged_at.tolist()  # workers 2 and 3
    assert check.divergence([never] * 6) is None
    error = check.divergence([never, [1, 1, 7e3]] + mine + [[1, 0, nan], never])  # worker 4's step is the first
    assert str(error).startswith("the loss of worker 4 became nan at epoch 2 step 1 (a worker of process 2; divergence")
    error = check.divergence([never, [1, 1, 7e3]] + mine + [never, never])  # worker 1's step is worker 3's: the lower
    assert str(error).startswith("the loss of worker 1 became 7000.0 at epoch 2 step 2 (a worker of process 0;")
    error = check.divergence([never, never] + mine + [never, never])  # its own: as finish() says
    assert str(error).startswith("the loss became [1.0, 70.0] at epoch 2 step 2 (local workers 2..3;")


# On a GPU an epoch's end does not read its last steps' losses (the host would wait for them): its records carry where
# each worker diverged, gathered over processes. Here on the CPU (tests/train_runs.diverging_at), the last worker's loss
# nan at epoch 2's last step (four steps an epoch), its model finite: no record of epoch 2 is written, however the run ends.
def epochs_recorded(folder):
    return sorted({r["epoch"] for r in runs.read_metrics(str(folder))})


def saved_epoch(folder, rank=0):
    return torch.load(folder / "checkpoints" / f"rank{rank}.pt", weights_only=True)["epoch"]


def test_without_a_divergence_the_deferred_check_writes_the_records_of_the_check_at_each_epochs_end(
        tmp_path, tiny_data, uninterrupted, monkeypatch):
    deferred(monkeypatch.setattr)
    run(str(tmp_path), settings(tiny_data, num_epochs=3))
    assert records(tmp_path) == uninterrupted(3)


def test_blocks_of_steps_give_the_records_of_one_step_at_a_time_also_stopped_and_resumed(tmp_path, tiny_data,
                                                                                      uninterrupted, monkeypatch):
    """On a GPU the epoch's sums and the loss check take the steps in blocks: here on the CPU in
    blocks of 3 (4 steps an epoch: a block and one the epoch's end closes), deferred; the
    records of taking one step at a time, also stopped by a signal mid-block and resumed."""
    sums_init, check_init = metrics.EpochTotals.__init__, runs.LossCheck.__init__

    def sums_in_blocks(self, *args, **kwargs):
        sums_init(self, *args, **kwargs)
        self.fold_every = 3

    def check_in_blocks(self, *args, **kwargs):
        check_init(self, *args, **kwargs)
        self.lag = 3
    monkeypatch.setattr(metrics.EpochTotals, "__init__", sums_in_blocks)
    monkeypatch.setattr(runs.LossCheck, "__init__", check_in_blocks)
    deferred(monkeypatch.setattr)
    run(str(tmp_path / "whole"), settings(tiny_data, num_epochs=3))
    assert records(tmp_path / "whole") == uninterrupted(3)
    stopped_and_resumed(str(tmp_path / "stopped"), settings(tiny_data, num_epochs=3), monkeypatch, progress=(0.4, 0.45))
    assert records(tmp_path / "stopped") == uninterrupted(3)


def test_a_divergence_at_an_epochs_last_step_writes_no_record_of_that_epoch(tmp_path, tiny_data, uninterrupted,
                                                                             monkeypatch, capsys):
    diverging_at(7, monkeypatch.setattr)
    with pytest.raises(FloatingPointError, match=r"nan\] at epoch 2 step 4 .*last good checkpoint \(the end of epoch 1\)"):
        run(str(tmp_path), settings(tiny_data, num_epochs=3))
    said = capsys.readouterr().out
    assert "epoch 1/3: train loss" in said and "epoch 2/3" not in said  # nor is the epoch's line printed
    assert records(tmp_path) == uninterrupted(1) and saved_epoch(tmp_path) == 1


def test_a_divergence_in_an_asynchronous_run_writes_no_record_of_that_epoch(tmp_path, tiny_data, monkeypatch):
    """AD-PSGD's loss check watches one worker's loss at each event: the verdict is that worker's."""
    watch, watched = runs.LossCheck.watch, itertools.count()

    def diverging(check, losses, *args, **kwargs):
        if next(watched) == 31:  # the last of epoch 2's 16 events (4 workers x 4 batches)
            losses = torch.full_like(losses, float("nan"))
        return watch(check, losses, *args, **kwargs)
    monkeypatch.setattr(runs.LossCheck, "watch", diverging)
    deferred(monkeypatch.setattr)
    overrides = settings(tiny_data, num_epochs=3, optimizer="ad-psgd", simulated_clock=True, worker_step_seconds=0.01)
    with pytest.raises(FloatingPointError, match=r"the loss became \[nan\] at epoch 2 step 16 .*the end of epoch 1\)"):
        run(str(tmp_path), overrides)
    assert epochs_recorded(tmp_path) == [1.0] and saved_epoch(tmp_path) == 1


def test_an_error_in_the_steps_after_a_divergence_not_read_yet_is_reported_as_the_divergence(tmp_path, tiny_data,
                                                                                            monkeypatch):
    """The loss check reads a step later (on a GPU, LossCheck.LAG steps): an error the next step
    raises, from a model the diverged step left behind, has the divergence as its cause."""
    diverging_at(5, monkeypatch.setattr)
    gradients, steps = StackedReplicas.gradients, itertools.count()

    def failing(replicas, *args):
        if next(steps) == 6:
            raise torch.linalg.LinAlgError("the algorithm failed to converge: non-finite values")
        return gradients(replicas, *args)
    monkeypatch.setattr(StackedReplicas, "gradients", failing)
    with pytest.raises(FloatingPointError, match=r"nan\] at epoch 2 step 2 .*the end of epoch 1\)") as raised:
        run(str(tmp_path), settings(tiny_data, num_epochs=3))
    assert isinstance(raised.value.__cause__, torch.linalg.LinAlgError)
    assert epochs_recorded(tmp_path) == [1.0]


def test_an_error_at_the_end_of_a_diverged_epoch_is_reported_as_the_divergence(tmp_path, tiny_data, monkeypatch):
    """As a method's state or a factorization that fails on a diverged model: the error that
    follows the divergence is its cause, not what the run reports, and writes nothing."""
    end_of_epoch = metrics.end_of_epoch

    def failing(cfg, epoch, totals, *rest):
        end_of_epoch(cfg, epoch, totals, *rest)
        if not torch.isfinite(totals.loss).all():
            raise torch.linalg.LinAlgError("the algorithm failed to converge: non-finite values")
    diverging_at(7, monkeypatch.setattr)
    monkeypatch.setattr(metrics, "end_of_epoch", failing)
    with pytest.raises(FloatingPointError, match=r"at epoch 2 step 4 .*the end of epoch 1") as raised:
        run(str(tmp_path), settings(tiny_data, num_epochs=3))
    assert isinstance(raised.value.__cause__, torch.linalg.LinAlgError)
    assert epochs_recorded(tmp_path) == [1.0] and saved_epoch(tmp_path) == 1


def test_a_divergence_the_next_epochs_steps_read_first_writes_no_record_of_its_epoch(tmp_path, tiny_data, uninterrupted,
                                                                                      monkeypatch):
    """On a GPU an epoch's records are written once their copy to the host, which follows the
    averaged model's test beside the next epoch's first steps, has ended; here it "ends" after 3
    checks, and the loss check reads epoch 2's last step at the next step: its error stays the
    run's, and the records, taken before it, are dropped by the run's last flush."""
    stage = metrics.Recorder._stage

    def late(recorder):
        count, host, _ = stage(recorder)
        return count, host, LateEvent(checks=3)
    diverging_at(7, monkeypatch.setattr)
    monkeypatch.setattr(metrics.Recorder, "_stage", late)
    with pytest.raises(FloatingPointError, match=r"the loss became .* at epoch 2 step 4 .*No checkpoint was saved") as raised:
        run(str(tmp_path), settings(tiny_data, num_epochs=3, checkpoint_every=0))
    assert raised.traceback[-1].name == "_read_oldest" and any(entry.name == "watch" for entry in raised.traceback)
    assert records(tmp_path) == uninterrupted(1)


def test_under_mpirun_a_divergence_on_another_process_writes_and_saves_nothing_after_it(tmp_path, tiny_data):
    """Process 0 writes the records, process 1 holds the worker (3) that diverges: both learn it
    from where each worker diverged, gathered with the epoch's values, each names the worker and
    the step, and neither saves. Also when a signal stops the run at the diverged step, before the
    epoch's end: the stop's save waits until every process knows."""
    script = DIVERGING_RUNS.format(root=str(tmp_path), overrides=settings(tiny_data, num_epochs=3))
    said = run_mpi(2, ["-c", script], timeout=180).stdout
    for run_name, step in (("at_the_end", 4), ("stopped", 2)):
        assert re.search(rf"{run_name}, process 1: the loss became \[.*, nan\] at epoch 2 step {step} \(local workers "
                         rf"2..3;", said), said
        assert (f"{run_name}, process 0: the loss of worker 3 became nan at epoch 2 step {step} (a worker of "
                f"process 1; divergence is") in said, said
        assert epochs_recorded(tmp_path / run_name) == [1.0]
        assert saved_epoch(tmp_path / run_name, rank=0) == saved_epoch(tmp_path / run_name, rank=1) == 1


# Process 1's last worker diverges at the run's 8th step (epoch 2's last), then in a second run at the 6th, the step at
# which process 0's SIGTERM (sent as the 5th step ends, past 5/12 of the run) stops the run.
DIVERGING_RUNS = """
import os
import pytest
from mpi4py import MPI
import train
from tests.train_runs import diverging_at, run, sigterm_once_past
process = MPI.COMM_WORLD.Get_rank()
for name, step, signal_past in (("at_the_end", 7, None), ("stopped", 5, 0.4)):
    with pytest.MonkeyPatch.context() as patch:
        diverging_at(step if process == 1 else None, patch.setattr)
        if signal_past is not None:
            patch.setattr(train, "log_info", sigterm_once_past(signal_past))
        try:
            run(os.path.join({root!r}, name), {overrides!r})
        except FloatingPointError as error:
            print(f"{{name}}, process {{process}}: {{error}}", flush=True)
    MPI.COMM_WORLD.Barrier()
"""


def test_a_non_finite_state_is_never_written(tmp_path):
    checkpoints = runs.Checkpoints(str(tmp_path), type("Comm", (), {"process_index": 0})())
    state = {"epoch": 1, "step_in_epoch": 0, "params": [torch.ones(3)], "momenta": [torch.tensor([1.0, float("inf")])]}
    with pytest.raises(FloatingPointError, match="not finite"):
        checkpoints.save(state)
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("gather_bytes", [runs.GATHER_BYTES, 16])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA GPU"))])
def test_a_save_reads_back_every_tensor_as_it_was_each_with_a_storage_of_its_own(tmp_path, monkeypatch, device,
                                                                                 gather_bytes):
    """A save gathers the tensors of each dtype and device into a buffer (one copy to the host;
    with a small GATHER_BYTES, several); the file holds each tensor's values, shape and dtype, in
    a storage of its own (the random state goes back into torch.set_rng_state); a non-finite
    value in any float dtype is refused."""
    monkeypatch.setattr(runs, "GATHER_BYTES", gather_bytes)
    checkpoints = runs.Checkpoints(str(tmp_path), type("Comm", (), {"process_index": 0})())
    generator = torch.Generator().manual_seed(0)
    tensors = {"params": [torch.randn(2, 3, generator=generator), torch.randn(4, generator=generator).to(torch.bfloat16),
                          torch.tensor(2.5)],
               "counts": [torch.arange(5), torch.tensor([True, False])], "empty": torch.zeros(0, 3)}
    on_device = runs._replaced(tensors, lambda t: t.to(device))
    state = {"epoch": 1, "step_in_epoch": 0, "rng": torch.get_rng_state()} | on_device
    state["params"].append(state["params"][0])  # one tensor twice
    with checkpoints:
        checkpoints.save(state)
    saved = torch.load(tmp_path / "rank0.pt", weights_only=True)
    assert torch.equal(saved["rng"], torch.get_rng_state())
    torch.set_rng_state(saved["rng"])
    for name in ("params", "counts", "empty"):
        for was, back in zip(runs._tensors(state[name]), runs._tensors(saved[name]), strict=True):
            was = was.cpu()
            assert back.dtype == was.dtype and back.shape == was.shape and torch.equal(back, was)
            assert back.untyped_storage().nbytes() == back.nbytes  # its own storage, not a view of one per dtype
    for bad in (float("nan"), float("inf")):
        for row in (0, 1, 2):  # float32 and bfloat16; with GATHER_BYTES 16, the first and a later buffer of float32
            broken = state | {"params": [p.clone() for p in state["params"]]}
            broken["params"][row].view(-1)[-1] = bad
            with pytest.raises(FloatingPointError, match="not finite"):
                checkpoints.save(broken)
    assert torch.equal(torch.load(tmp_path / "rank0.pt", weights_only=True)["params"][0], state["params"][0].cpu())


def test_a_save_keeps_the_values_it_was_given_and_its_error_comes_at_the_wait(tmp_path, monkeypatch):
    """The file is written in the background from a copy: the run changes its tensors at once,
    and the file holds the values of the save; a failed write is raised where the run waits."""
    checkpoints = runs.Checkpoints(str(tmp_path), type("Comm", (), {"process_index": 0})())
    params = torch.ones(3)
    started, release = threading.Event(), threading.Event()
    write = runs.write_atomically

    def slow(*args, **kwargs):  # the write under way while the run goes on
        started.set()
        release.wait(timeout=60)
        write(*args, **kwargs)
    monkeypatch.setattr(runs, "write_atomically", slow)
    with checkpoints:
        checkpoints.save({"epoch": 1, "step_in_epoch": 0, "params": [params]})
        assert started.wait(timeout=60)
        params.add_(1.0)  # the next steps
        release.set()
    assert checkpoints.last == (1, 0)
    assert torch.equal(torch.load(tmp_path / "rank0.pt", weights_only=True)["params"][0], torch.ones(3))

    def failing(*args, **kwargs):
        raise OSError("No space left on device")
    monkeypatch.setattr(runs, "write_atomically", failing)
    checkpoints.save({"epoch": 2, "step_in_epoch": 0, "params": [params]})
    assert checkpoints.last == (1, 0)  # the one on disk
    with pytest.raises(OSError, match="No space"):
        checkpoints.check()  # the write has ended (last waited for it): found without waiting
    checkpoints.check()  # raised once
    with pytest.raises(OSError, match="No space"), checkpoints:  # leaving the context raises it too
        checkpoints.save({"epoch": 2, "step_in_epoch": 0, "params": [params]})
    with pytest.raises(ZeroDivisionError) as raised, checkpoints:  # the run's own error, with the write's as a note
        checkpoints.save({"epoch": 2, "step_in_epoch": 0, "params": [params]})
        1 / 0
    assert "No space" in "".join(raised.value.__notes__)


def test_a_run_is_finished_only_once_its_last_checkpoint_is_on_disk(tmp_path, tiny_data, monkeypatch):
    """summary.json (written last: the run is finished) follows the last save's write, however
    long that write takes in the background."""
    written = []
    write, write_summary = runs.write_atomically, runs.write_summary

    def slow(path, *args, **kwargs):
        time.sleep(0.5)
        write(path, *args, **kwargs)
        written.append("checkpoint")
    monkeypatch.setattr(runs, "write_atomically", slow)
    monkeypatch.setattr(runs, "write_summary", lambda *args: (written.append("summary"), write_summary(*args)))
    run(str(tmp_path), settings(tiny_data, num_epochs=2))
    assert written == ["checkpoint", "checkpoint", "summary"]


# --- 4. checkpoint integrity ------------------------------------------------------------------------
def damage(path, how):
    data = path.read_bytes()
    if how == "flipped":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 64]) + data[middle + 64:])
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 3])
    else:
        path.write_bytes(b"")


@pytest.mark.parametrize("how", ["flipped", "truncated", "empty"])
def test_a_damaged_checkpoint_falls_back_to_the_save_before(tmp_path, tiny_data, uninterrupted, how):
    run(str(tmp_path / "parts"), settings(tiny_data, num_epochs=2))  # rank0.pt: epoch 2; rank0.previous.pt: epoch 1
    damage(tmp_path / "parts" / "checkpoints" / "rank0.pt", how)
    with pytest.warns(UserWarning, match=r"resuming from the end of epoch 1, the newest save intact.*rank0\.pt"):
        run(str(tmp_path / "parts"), settings(tiny_data, num_epochs=3) + ["resume=true"])
    assert records(tmp_path / "parts") == uninterrupted(3)
    folder = tmp_path / "parts" / "checkpoints"
    assert (folder / "rank0.pt.set-aside").exists()  # the damaged file, kept aside
    assert runs.read_verified(str(folder / "rank0.previous.pt"))["epoch"] == 2  # later saves keep a good one before them


def test_a_damaged_checkpoint_without_a_save_before_is_named(tmp_path, tiny_data):
    run(str(tmp_path), settings(tiny_data))
    path = tmp_path / "checkpoints" / "rank0.pt"
    damage(path, "flipped")
    with pytest.raises(configuration.ConfigError, match=f"no save is intact on every process \\(process 0: {path} is corrupt"):
        run(str(tmp_path), settings(tiny_data, num_epochs=2) + ["resume=true"])


# --- 5. configuration errors before any work ---------------------------------------------------------
@pytest.mark.parametrize("overrides,match", [
    ({"spectrum_logging_params": ["nope"]}, "spectrum_logging_params: small_cnn has no parameter 'nope'"),
    ({"spectrum_logging_worker_pairs": [[0, 9]]}, r"pairs of distinct workers in 0..3"),
    ({"spectrum_logging_epochs": [9]}, "spectrum_logging_epochs"),
    ({"max_test_examples": 0}, "max_test_examples must be an integer >= 1"),
    ({"max_batches_per_epoch": 0}, "max_batches_per_epoch must be an integer >= 1"),
    ({"max_batches_per_epoch": -1}, "max_batches_per_epoch must be an integer >= 1"),
    ({"distributed_lr_warmup_factor": -5.0}, "distributed_lr_warmup_factor > 0"),
    ({"gradient_clipping": -1.0}, "gradient_clipping must be a positive number"),
    ({"learning_rate": float("inf")}, "learning_rate must be a finite number"),
    ({"lr_schedule_milestones": [[3, -0.1]]}, "factor > 0"),
    ({"max_loss_ratio": 0.5}, "max_loss_ratio must be > 1"),
    ({"task": "fashion_mnist", "data_dir": "/nonexistent"}, "/nonexistent"),
])
def test_config_errors_are_found_before_any_work(overrides, match):
    with pytest.raises(configuration.ConfigError, match=match):
        train.validated(dict(DEFAULTS) | overrides)


def test_a_nonexistent_data_dir_never_falls_back(tmp_path):
    with pytest.raises(configuration.ConfigError, match="/nonexistent"):
        run(str(tmp_path / "out"), ["task=fashion_mnist", "data_dir=/nonexistent", "device=cpu"])
    assert not (tmp_path / "out").exists()


def test_an_unwritable_output_dir_is_found_before_any_work(tmp_path, tiny_data):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(configuration.ConfigError, match="cannot write to output_dir"):
        run(str(tmp_path / "a_file" / "out"), settings(tiny_data))


def test_scientific_notation_is_a_number_on_the_command_line_and_in_yaml(tmp_path):
    (tmp_path / "lr.yaml").write_text("learning_rate: 1e-3\nweight_decay: 5E-4\n")
    config = configuration.apply_overrides(DEFAULTS, [str(tmp_path / "lr.yaml"), "optimizer_theta=2.5e-1"])
    assert (config["learning_rate"], config["weight_decay"], config["optimizer_theta"]) == (1e-3, 5e-4, 0.25)
    assert configuration.apply_overrides(DEFAULTS, ["learning_rate=1e-3"])["learning_rate"] == 1e-3
    assert configuration.apply_overrides(DEFAULTS, ["learning_rate=.5e-1"])["learning_rate"] == 0.05
    with pytest.raises(configuration.ConfigError, match="num_epochs must be an integer"):
        configuration.apply_overrides(DEFAULTS, ["num_epochs=1e3"])


# --- under mpirun: agreement between processes, exact resume after SIGTERM -----------------------------
def choco_qsgd(tiny_data):
    return settings(tiny_data, num_epochs=2) + ["optimizer=choco", "optimizer_compressor=qsgd", "optimizer_diffusion_rate=0.3"]


@pytest.fixture(scope="module")
def first_mpirun_runs(tmp_path_factory, tiny_data):
    """The uninterrupted runs the tests below start from, in one 2-process mpirun (one start of
    the interpreters, not three); each test works in its own folders of this one."""
    folder = tmp_path_factory.mktemp("mpirun")
    runs_json = {"sigterm_full": choco_qsgd(tiny_data), "missing_rank": settings(tiny_data, num_epochs=2),
                 "newest_full": settings(tiny_data, num_epochs=3), "newest": settings(tiny_data, num_epochs=2)}
    run_mpi(2, ["tests/train_runs.py", str(folder), json.dumps(runs_json)], timeout=600)
    return folder


def test_mpirun_resume_is_exact_after_a_sigterm_mid_epoch(first_mpirun_runs, tiny_data):
    folder, overrides = first_mpirun_runs, choco_qsgd(tiny_data)
    stopped = run_mpi(2, ["tests/train_runs.py", str(folder), json.dumps({"sigterm_parts": overrides}), "--sigterm-at=0.6"],
                      timeout=300, check=False)
    assert stopped.returncode != 0 and "stopped by a signal at epoch 2 step" in stopped.stdout, stopped.stdout + stopped.stderr
    for rank in (0, 1):
        assert torch.load(folder / "sigterm_parts" / "checkpoints" / f"rank{rank}.pt", weights_only=True)["step_in_epoch"] > 0
    run_mpi(2, ["tests/train_runs.py", str(folder), json.dumps({"sigterm_parts": overrides + ["resume=true"]})], timeout=300)
    assert records(folder / "sigterm_parts") == records(folder / "sigterm_full")


def test_mpirun_refuses_a_missing_rank_file_with_one_message(first_mpirun_runs, tiny_data):
    folder = first_mpirun_runs
    os.remove(folder / "missing_rank" / "checkpoints" / "rank0.pt")
    before = contents(folder / "missing_rank")
    result = run_mpi(2, ["tests/train_runs.py", str(folder),
                         json.dumps({"missing_rank": settings(tiny_data, num_epochs=3) + ["resume=true"]})], timeout=300, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    for rank in (0, 1):
        assert f"configuration error (process {rank}): cannot resume" in result.stderr, result.stderr
    assert "process 0: no checkpoint file" in result.stderr
    assert "SIGABRT" not in result.stderr and "Traceback" not in result.stderr
    assert contents(folder / "missing_rank") == before


def test_mpirun_resumes_from_the_newest_save_every_process_has(first_mpirun_runs, tiny_data):
    """A crash in the middle of a save can leave one process a save ahead of another: all
    continue from the save they share, exactly."""
    folder = first_mpirun_runs
    checkpoints = folder / "newest" / "checkpoints"
    os.replace(checkpoints / "rank1.previous.pt", checkpoints / "rank1.pt")  # rank 1 one save behind rank 0
    result = run_mpi(2, ["tests/train_runs.py", str(folder),
                         json.dumps({"newest": settings(tiny_data, num_epochs=3) + ["resume=true"]})], timeout=300)
    assert "resuming from the end of epoch 1, the newest save intact on every process" in result.stderr
    assert records(folder / "newest") == records(folder / "newest_full")


# --- more ways to mix runs ------------------------------------------------------------------------
def test_a_folder_another_run_is_writing_to_is_refused(tmp_path, tiny_data):
    import subprocess
    import sys

    (tmp_path / "out").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               "fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('locked', flush=True)\ntime.sleep(120)",
                               str(tmp_path / "out" / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(configuration.ConfigError, match="another run is writing to output_dir"):
            run(str(tmp_path / "out"), settings(tiny_data))
        assert not (tmp_path / "out" / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait(timeout=30)
    run(str(tmp_path / "out"), settings(tiny_data))  # the lock went with its process


def test_a_checkpoint_of_another_run_copied_in_is_refused(tmp_path, tiny_data):
    run(str(tmp_path / "mine"), settings(tiny_data, num_epochs=2))
    run(str(tmp_path / "other"), settings(tiny_data, seed=2))
    for name in ("rank0.pt", "rank0.previous.pt"):
        if (tmp_path / "mine" / "checkpoints" / name).exists():
            os.remove(tmp_path / "mine" / "checkpoints" / name)
    os.replace(tmp_path / "other" / "checkpoints" / "rank0.pt", tmp_path / "mine" / "checkpoints" / "rank0.pt")
    with pytest.raises(configuration.ConfigError, match="do not belong to the run recorded in .*seed=2 there, 3 here"):
        run(str(tmp_path / "mine"), settings(tiny_data, num_epochs=3, seed=2) + ["resume=true"])


def test_a_metrics_line_cut_by_a_crash_is_left_out_on_resume(tmp_path, tiny_data, uninterrupted):
    run(str(tmp_path / "parts"), settings(tiny_data))
    with open(tmp_path / "parts" / "metrics.jsonl", "a") as f:
        f.write('{"name": "lo')  # killed while writing a record
    with pytest.warns(UserWarning, match="cut short"):
        run(str(tmp_path / "parts"), settings(tiny_data, num_epochs=2) + ["resume=true"])
    assert records(tmp_path / "parts") == uninterrupted(2)


def test_resume_into_a_folder_that_does_not_exist_creates_nothing(tmp_path, tiny_data):
    with pytest.raises(configuration.ConfigError, match="does not exist"):
        run(str(tmp_path / "typo"), settings(tiny_data) + ["resume=true"])
    assert not (tmp_path / "typo").exists()


def test_gossip_run_refuses_a_used_folder_without_suggesting_resume(tmp_path):
    from tests.test_gossip_run import run_main

    run_main(tmp_path, num_steps=5)
    with pytest.raises(configuration.ConfigError, match="holds another run's results") as refused:
        run_main(tmp_path, num_steps=5)
    assert "resume" not in str(refused.value)


# --- a resume keeps the run's history (issue 26): a kill at any write, a malformed checkpoint, a lost metrics.jsonl ---
def small(tiny_data, **extra):
    """settings() with one step per epoch and no per-worker evaluation: a run of ~20 records an epoch."""
    return settings(tiny_data, **({"max_batches_per_epoch": 1, "evaluate_each_worker": False, "n_workers": 2, "max_test_examples": 16, "evaluation_batch_size": 16} | extra))


def draw_blank_figures(patch):
    """curves.png from a blank 1 x 1 inch figure: drawing the real one is most of a small run's
    time, and these tests are about the files, which are written as ever."""
    patch.setattr(figures, "training_figure", lambda records, title: Figure(figsize=(1, 1)))


@pytest.fixture
def blank_figures(monkeypatch):
    draw_blank_figures(monkeypatch)


@pytest.fixture(scope="module")
def small_runs(tmp_path_factory, tiny_data):
    """{n: the folder of a finished run of small(num_epochs=n)} for n = 1, 2; tests copy them, never change them."""
    folders = {}
    with pytest.MonkeyPatch.context() as patch:
        draw_blank_figures(patch)
        for num_epochs in (1, 2):
            folders[num_epochs] = tmp_path_factory.mktemp(f"small_{num_epochs}_epochs")
            run(str(folders[num_epochs]), small(tiny_data, num_epochs=num_epochs))
    return folders


def copy_of(folder, to):
    shutil.copytree(folder, to)
    return to


KILLED = 113  # the exit status of a child stopped by killed_after


def killed_after(writes: int, action, timeout: float = 60) -> int:
    """Runs `action` in a forked child that ends at once (os._exit: no cleanup, as SIGKILL) right
    after its `writes`-th write of a results file (runs.after_results_write); returns the child's
    exit status: KILLED, or 0 when it made fewer writes and finished."""
    child = os.fork()
    if child == 0:
        status = 1
        try:
            count = itertools.count(1)
            runs.after_results_write = lambda path: os._exit(KILLED) if next(count) == writes else None
            action()
            status = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(status)
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(child, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(child, signal.SIGKILL)
            os.waitpid(child, 0)
            raise TimeoutError(f"the resume to be killed after write {writes} ran past {timeout} s")
        time.sleep(0.005)


def resume_killed_after(writes: int, base, folder, resume: list[str], expected: list, accuracy: float) -> None:
    """Copies the run in `base` to `folder`, resumes it with the overrides `resume` killed after
    its `writes`-th write (killed_after), checks that every record of `base` is still there, then
    resumes it normally and checks its records and accuracy against `expected` and `accuracy`."""
    history = (base / "metrics.jsonl").read_text()
    copy_of(base, folder)
    assert killed_after(writes, lambda: run(str(folder), resume)) == KILLED, f"write {writes}: not killed"
    assert (folder / "metrics.jsonl").read_text().startswith(history), f"killed after write {writes}: records lost"
    run(str(folder), resume)
    assert records(folder) == expected, f"killed after write {writes}: other records after the resume"
    with open(folder / "summary.json") as f:
        assert json.load(f)["test_avg_accuracy"] == accuracy, f"killed after write {writes}: another summary"


def test_a_resume_killed_after_any_write_keeps_every_record(tmp_path, tiny_data, small_runs, blank_figures, monkeypatch):
    """Issue 26, defect 1: a resume killed right after its k-th write of a results file (metrics.jsonl
    rewritten or a record appended, config.yaml, the checkpoint, curves.png, summary.json), for every k, leaves every record of the run it continues, and a normal resume
    then gives the records and summary of the uninterrupted run. A history that does not reach
    the checkpoint is refused, not continued."""
    resume = small(tiny_data, num_epochs=2) + ["resume=true"]
    expected = records(small_runs[2])
    with open(small_runs[2] / "summary.json") as f:
        accuracy = json.load(f)["test_avg_accuracy"]
    writes = []
    with monkeypatch.context() as patch:
        patch.setattr(runs, "after_results_write", writes.append)
        run(str(copy_of(small_runs[1], tmp_path / "counted")), resume)
    assert len(writes) >= 20 and records(tmp_path / "counted") == expected  # every record is a write, and the files
    # Every k, two at a time: each in a worker forked from this process (its state, the blank figures). SIGTERM, by
    # which the pool ends its workers, ends them (a run of an earlier test that raised may have left train.py's handler).
    with multiprocessing.get_context("fork").Pool(2, initializer=signal.signal, initargs=(signal.SIGTERM, signal.SIG_DFL)) as pool:
        pool.starmap_async(resume_killed_after, [
            (k, small_runs[1], tmp_path / f"killed_after_{k}", resume, expected, accuracy) for k in range(1, len(writes) + 1)
        ]).get(timeout=300)
    # The history an older version left after such a kill (epoch 1 of 2) is noticed, and nothing changes.
    folder = copy_of(small_runs[2], tmp_path / "cut")
    (folder / "metrics.jsonl").write_text((small_runs[1] / "metrics.jsonl").read_text())
    before = contents(folder)
    with pytest.raises(configuration.ConfigError, match=r"has no records of epochs 2, while the checkpoint continues "
                                                        r"from the end of epoch 2.*accept_metrics_gap=true"):
        run(str(folder), small(tiny_data, num_epochs=3) + ["resume=true"])
    assert contents(folder) == before


MALFORMED = {  # how a checkpoint that is intact on disk may still be unusable, and what the warning says
    "no epoch": (lambda state: state.pop("epoch"), "it has no epoch"),
    "no step_in_epoch": (lambda state: state.pop("step_in_epoch"), "it has no step_in_epoch"),
    "epoch as text": (lambda state: state.update(epoch="2"), "its epoch is '2', not an integer >= 0"),
    "negative epoch": (lambda state: state.update(epoch=-3), "its epoch is -3"),
    "a step past the epoch": (lambda state: state.update(step_in_epoch=5, partial_epoch=None), "its step_in_epoch=5 is past"),
    "a broadcastable parameter": (lambda state: state["params"].__setitem__(0, state["params"][0][:, :1].clone()),
                                  r"params\[0\] is a torch.float32 tensor of shape \[2, 1, "),
    "params not a list": (lambda state: state.update(params=7), "params is of type int, where this run has a list of 8"),
    "a NaN momentum": (lambda state: state["momenta"][0].view(-1).__setitem__(0, float("nan")), "some of its tensors are not finite"),
    "gossip of the wrong type": (lambda state: state.update(gossip=[0]), "gossip is of type list, not a dict"),
    "PowerGossip's P of another rank": (lambda state: state["gossip"]["compressed"]["p"].__setitem__(0, torch.zeros(2, 1, 32, 2)),
                                        r"gossip.compressed.p\[0\] is a torch.float32 tensor of shape \[2, 1, 32, 2\], where "
                                        r"this run has torch.float32 \[any, 1, 32, 1\]: it belongs to another run"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_checkpoint_falls_back_to_the_save_before(tmp_path, tiny_data, small_runs, blank_figures, case):
    """Issue 26, defect 6: a checkpoint that is intact on disk but malformed (header, types,
    shapes, epoch, step, a value that is not finite) is set aside as a damaged one, before
    anything is changed, and the run resumes exactly from the save before."""
    malform, reason = MALFORMED[case]
    folder = copy_of(small_runs[2], tmp_path / "run")  # rank0.pt: epoch 2; rank0.previous.pt: epoch 1
    state = torch.load(folder / "checkpoints" / "rank0.pt", weights_only=True)
    malform(state)
    torch.save(state, folder / "checkpoints" / "rank0.pt")
    with pytest.warns(UserWarning, match=r"resuming from the end of epoch 1, the newest save intact on every process "
                                         rf"\(process 0: \S*rank0\.pt is not a usable checkpoint: {reason}"):
        run(str(folder), small(tiny_data, num_epochs=2) + ["resume=true"])
    assert records(folder) == records(small_runs[2])
    assert (folder / "checkpoints" / "rank0.pt.set-aside").exists()


def test_a_method_state_of_other_shapes_is_refused_before_it_is_loaded(tmp_path, tiny_data, small_runs, blank_figures):
    """Issue 26: PowerGossip's warm-start P and Q of a rank-2 run, under the keys of this rank-1
    run's save (and its only one): the resume stops with one line naming the tensor, both shapes
    and another run, and changes nothing."""
    folder = copy_of(small_runs[1], tmp_path / "run")  # one save: rank0.pt, nothing before it
    state = torch.load(folder / "checkpoints" / "rank0.pt", weights_only=True)
    for factors in (state["gossip"]["compressed"]["p"], state["gossip"]["compressed"]["q"]):
        factors[:] = [torch.cat([f, f], dim=-1) for f in factors]
    torch.save(state, folder / "checkpoints" / "rank0.pt")
    before = contents(folder)
    with pytest.raises(configuration.ConfigError, match=r"no save is intact on every process \(process 0: \S*rank0.pt is "
                       r"not a usable checkpoint: gossip.compressed.p\[0\] is a torch.float32 tensor of shape \[2, 1, 32, 2\], "
                       r"where this run has torch.float32 \[any, 1, 32, 1\]: it belongs to another run"):
        run(str(folder), small(tiny_data, num_epochs=2) + ["resume=true"])
    assert contents(folder) == before


@pytest.mark.parametrize("name", ["dpsgd", "power-gossip", "choco", "deepsqueeze", "moniqua", "push-sum", "all-reduce",
                                  "powersgd"])
def test_a_prepared_method_has_the_form_of_a_save_and_finds_other_shapes(name):
    """Method.prepare builds the state the stacks shape, without a round: a save after rounds
    has its form (runs.mismatch, as a resume compares them), and one made for wider matrices
    does not, for every method whose state the matrices shape."""
    from powergossip import comm as comm_module, topologies

    comm = comm_module.Communicator(4, "cpu")
    cfg = train.validated(dict(train.config, optimizer=name, optimizer_diffusion_rate=0.5, n_workers=4, device="cpu"))
    topology = topologies.build("ring", 4)
    torch.manual_seed(0)
    stepped = train.build_method(cfg, comm, topology)
    for _ in range(3):
        stepped.step([torch.randn(4, 6, 5), torch.randn(4, 7)])
    saved = stepped.state_dict()
    shaped = train.build_method(cfg, comm, topology)
    shaped.prepare([torch.zeros(4, 6, 5), torch.zeros(4, 7)])
    assert runs.mismatch(saved, shaped.state_dict(), lenient=True) is None
    if name in ("power-gossip", "choco", "deepsqueeze", "powersgd"):  # a state whose shape the matrices' width sets
        wide = train.build_method(cfg, comm, topology)
        for _ in range(3):
            wide.step([torch.randn(4, 6, 9), torch.randn(4, 7)])
        assert "where this run has" in runs.mismatch(wide.state_dict(), shaped.state_dict(), lenient=True)


def test_a_lost_metrics_file_is_refused_unless_the_gap_is_accepted_and_recorded(tmp_path, tiny_data, small_runs,
                                                                                  blank_figures):
    """Issue 26, defect 7: resuming a run whose metrics.jsonl was deleted stops with one message
    naming accept_metrics_gap=true, changing nothing; with it, the run goes on with a warning and
    a metrics_gap record that lists the lost epochs, which later resumes accept."""
    folder = copy_of(small_runs[1], tmp_path / "run")
    os.remove(folder / "metrics.jsonl")
    before = contents(folder)
    with pytest.raises(configuration.ConfigError, match="has no metrics.jsonl, while the checkpoint continues from the "
                                                        "end of epoch 1.*pass accept_metrics_gap=true"):
        run(str(folder), small(tiny_data, num_epochs=2) + ["resume=true"])
    assert contents(folder) == before
    with pytest.warns(UserWarning, match="has no metrics.jsonl; going on as accept_metrics_gap=true asks"):
        run(str(folder), small(tiny_data, num_epochs=2) + ["resume=true", "accept_metrics_gap=true"])
    gap, *rest = runs.read_metrics(str(folder))
    assert (gap["name"], gap["epoch"], gap["value"], gap["tags"]) == ("metrics_gap", 1.0, 1.0,
                                                                      {"split": "history", "missing_epochs": [1]})
    assert gap["bits"] == next(r["bits"] for r in runs.read_metrics(str(small_runs[1])) if r["epoch"] == 1.0) > 0
    assert records(folder)[1:] == [r for r in records(small_runs[2]) if r[1] == 2.0]
    assert "accept_metrics_gap" not in (folder / "config.yaml").read_text()  # an instruction to one launch
    run(str(folder), small(tiny_data, num_epochs=3) + ["resume=true"])  # the recorded gap is part of the history
    assert runs.read_metrics(str(folder))[0] == gap and {r[1] for r in records(folder)} == {1.0, 2.0, 3.0}


def test_a_timers_cut_reads_the_sections_before_it_once_and_keeps_running_totals(monkeypatch):
    clock = iter([0.0, 1.0, 1.0, 4.0, 4.0, 6.0, 6.0, 7.0])  # sections of 1, 3, 2 and 1 seconds
    monkeypatch.setattr(runs.time, "perf_counter", lambda: next(clock))
    timers = runs.Timers(torch.device("cpu"))
    for _ in range(2):
        with timers("step"):
            pass
    labels, first = timers.cut()
    assert labels == ["step"]
    with timers("step"):  # after the cut: not in its summary, read after this section ended
        pass
    assert first() == {"step": (2.0, 1.0, 2)}
    mean, std, count = timers.cut()[1]()["step"]
    assert (mean, count) == (2.0, 3) and std == pytest.approx((2 / 3) ** 0.5, rel=1e-12)  # of 1, 3, 2
    assert first() == {"step": (2.0, 1.0, 2)}  # a cut is read once
    assert timers.cut()[1]()["step"] == (mean, std, count)  # nothing new: the same totals
    with timers("evaluation"):  # a cut read before an earlier one reads that one first: the same totals
        pass
    labels, earlier = timers.cut()
    labels_later, later = timers.cut()
    assert labels == labels_later == ["step", "evaluation"]
    assert later() == {"step": (mean, std, count), "evaluation": (1.0, 0.0, 1)} == earlier()
