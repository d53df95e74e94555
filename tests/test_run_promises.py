"""What a run promises beyond its numbers (issue 26): a resume continues the run that started,
on the same graph and data files, or is refused; max_test_examples evaluates exactly that many
examples; a failed resume leaves a finished run's summary.json; TensorBoard shows each epoch
once after a resume; a frozen process ends its job after POWERGOSSIP_TIMEOUT, whose default
the README states; the temporary files of interrupted writes are removed when a run claims
the folder; train.main() puts back the caller's signal handlers however it ends."""
import json
import os
import re
import shutil
import signal
import time
from unittest import mock

import pytest
import torch

import train
from powergossip import data, launch, metrics, models
from powergossip.errors import ConfigError
from tests.launch import ROOT, run_mpi
from tests.test_data import fake_fmnist
from tests.test_gossip_run import run_main
from tests.test_runs import contents, settings, tiny_data  # noqa: F401 (tiny_data: a fixture)
from tests.train_runs import run


def test_resume_refuses_changed_graph_or_data_files_but_follows_moved_data(tmp_path, tiny_data):
    (tmp_path / "half.txt").write_text("0 1\n2 3\n")
    (tmp_path / "graphs.txt").write_text("file:half.txt\nring\n")
    topology = f"topology=schedule:{tmp_path / 'graphs.txt'}"
    out = str(tmp_path / "run")
    run(out, settings(tiny_data) + [topology])
    moved = shutil.copytree(tiny_data, tmp_path / "moved")  # data_dir may change, to the same data
    run(out, settings(str(moved), num_epochs=2) + [topology, "resume=true"])

    (tmp_path / "half.txt").write_text("0 2\n1 3\n")  # the schedule's edge list, edited between launches
    before = contents(out)
    with pytest.raises(ConfigError, match=r"edge list \S*half.txt \(\S*half.txt\) holds other bytes.*overwrite=true"):
        run(out, settings(str(moved), num_epochs=3) + [topology, "resume=true"])
    (tmp_path / "half.txt").write_text("0 1\n2 3\n")
    other = tmp_path / "other"
    fake_fmnist(other, n_train=512, n_test=64, seed=1)  # same names, other bytes
    with pytest.raises(ConfigError, match=r"fashion_mnist file train-images-idx3-ubyte.gz \(\S*other\S*\) holds other"):
        run(out, settings(str(other), num_epochs=3) + [topology, "resume=true"])
    assert contents(out) == before


def test_resume_refuses_a_changed_churn_file(tmp_path, tiny_data):
    (tmp_path / "churn.txt").write_text("1 2 6\n")
    churn = [f"churn={tmp_path / 'churn.txt'}", "optimizer=dpsgd"]
    out = str(tmp_path / "run")
    run(out, settings(tiny_data) + churn)
    (tmp_path / "churn.txt").write_text("1 2 7\n")
    before = contents(out)
    with pytest.raises(ConfigError, match=r"churn file \S*churn.txt \(\S*churn.txt\) holds other bytes"):
        run(out, settings(tiny_data, num_epochs=2) + churn + ["resume=true"])
    assert contents(out) == before


def test_max_test_examples_is_exact_for_any_evaluation_batch_size():
    dataset = data.load("synthetic", num_train=8, num_test=400, in_channels=1, image_size=28, seed=0)
    torch.manual_seed(0)
    model = models.build("small_cnn", in_channels=1, num_classes=10, image_size=28)

    def evaluated(max_test_examples, batch):
        return metrics.evaluate(model, dataset, {"max_test_examples": max_test_examples, "evaluation_batch_size": batch,
                                                 "dtype": "float32"}).tolist()

    first_200, everything = evaluated(200, 200), evaluated(None, 1000)
    assert everything[1] != first_200[1]  # the limit matters here
    assert evaluated(200, 1000)[1] == first_200[1]
    assert evaluated(200, 64)[1] == first_200[1]  # 64 + 64 + 64 + 8
    assert evaluated(200, 10**9)[1] == first_200[1]
    assert evaluated(5000, 300) == pytest.approx(everything)  # a limit beyond the test set: all of it


def test_the_test_runs_at_the_trainings_precision():
    """dtype=bfloat16 trains under bfloat16 autocast, and the test runs under it too; its loss
    and accuracy stay near float32's for a model that has learned its test set (memorized here:
    random images have nothing else to learn; its logits are far from ties)."""
    dataset = data.load("synthetic", num_train=8, num_test=200, in_channels=1, image_size=28, seed=0)
    torch.manual_seed(0)
    model = models.build("small_cnn", in_channels=1, num_classes=10, image_size=28)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(40):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(dataset.normalize(dataset.test_x)), dataset.test_y).backward()
        optimizer.step()
    precisions = []
    forward = model.forward
    model.forward = lambda x: (precisions.append(torch.is_autocast_enabled("cpu")), forward(x))[1]
    settings = {"max_test_examples": None, "evaluation_batch_size": 50}
    full = metrics.evaluate(model, dataset, settings | {"dtype": "float32"}).tolist()
    assert precisions == [False] * 4
    half = metrics.evaluate(model, dataset, settings | {"dtype": "bfloat16"}).tolist()
    assert precisions[4:] == [True] * 4
    assert full[1] > 0.5  # learned: chance is 0.1
    assert half[1] == pytest.approx(full[1], abs=0.02)  # at most 4 of the 200 predictions differ
    assert half[0] == pytest.approx(full[0], rel=0.05)


def test_a_resume_that_fails_keeps_the_finished_runs_summary(tmp_path, tiny_data):
    run(str(tmp_path), settings(tiny_data))
    summary = (tmp_path / "summary.json").read_bytes()
    with pytest.raises(FloatingPointError, match="max_loss_ratio"):
        run(str(tmp_path), settings(tiny_data, num_epochs=2, learning_rate=1e6) + ["resume=true"])
    assert (tmp_path / "summary.json").read_bytes() == summary


def tensorboard_steps(folder, tag):
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    steps = []
    for name in sorted(os.listdir(folder)):
        for event in EventFileLoader(os.path.join(folder, name)).Load():
            steps += [event.step for value in event.summary.value if value.tag == tag]
    return sorted(steps)


def test_tensorboard_shows_each_epoch_once_after_a_resume(tmp_path, tiny_data):
    # The last save is at epoch 2, epoch 3 is recorded: as a launch stopped after recording epoch 3.
    run(str(tmp_path), settings(tiny_data, num_epochs=3, checkpoint_every=2, evaluate_each_worker=False))
    run(str(tmp_path), settings(tiny_data, num_epochs=3, checkpoint_every=2, evaluate_each_worker=False) + ["resume=true"])
    assert tensorboard_steps(tmp_path / "tensorboard", "accuracy/test_avg") == [1, 2, 3]
    kB = [round(r["bits"] / 8e3) for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())
          if r["name"] == "accuracy" and r["tags"] == {"split": "test_avg"}]
    assert tensorboard_steps(tmp_path / "tensorboard", "by_kB_sent/accuracy/test_avg") == kB


def test_a_frozen_process_ends_its_job_after_the_documented_timeout(tmp_path):
    with open(os.path.join(ROOT, "README.md")) as f:
        stated = re.search(r"`POWERGOSSIP_TIMEOUT` \(seconds; default (\d+)\)", f.read())
    assert stated and float(stated.group(1)) == launch.DEFAULT_TIMEOUT_SECONDS
    started = time.monotonic()
    with mock.patch.dict(os.environ, {"POWERGOSSIP_TIMEOUT": "3"}):  # run_mpi hands os.environ on
        result = run_mpi(2, ["tests/failing_rank.py", "freeze"], timeout=90, check=False)
    assert result.returncode != 0 and "Timed out" in result.stderr
    assert time.monotonic() - started < 45
    assert "unreachable" not in result.stdout


def test_overwrite_and_resume_clear_the_temporary_files_of_interrupted_writes(tmp_path, tiny_data):
    run(str(tmp_path), settings(tiny_data))
    (tmp_path / "notes.txt").write_text("mine")
    leftovers = ["config.yaml.tmp", "metrics.jsonl.tmp", "summary.json.tmp", "curves.png.tmp",
                 "checkpoints/rank0.pt.tmp", "checkpoints/rank0.previous.pt.tmp"]  # as a kill inside write_file leaves them

    def leave_them():
        for name in leftovers:
            (tmp_path / name).write_bytes(b"half a write")

    def temporary_files():
        return sorted(name for name in contents(tmp_path) if name.endswith(".tmp"))

    leave_them()
    run(str(tmp_path), settings(tiny_data) + ["resume=true"])  # a finished run: nothing to do, nothing rewritten
    assert temporary_files() == [] and (tmp_path / "summary.json").exists()
    leave_them()
    run_main(tmp_path, n_workers=4, matrix_size=5, num_steps=3, overwrite=True)  # gossip_run: no checkpoints
    assert temporary_files() == [] and (tmp_path / "notes.txt").read_text() == "mine"
    assert sorted(set(os.listdir(tmp_path)) - {"tensorboard"}) == [  # the user's notes kept, the train run's files gone
        ".lock", "config.yaml", "error_vs_bits.png", "metrics.jsonl", "notes.txt", "summary.json"]
    assert not os.path.exists(tmp_path / "checkpoints")


def test_train_main_puts_back_the_callers_signal_handlers_however_it_ends(tmp_path, tiny_data, monkeypatch):
    def mine(number, frame):
        raise AssertionError("the run's own handler should have taken the signal")

    def handlers():
        return [signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)]

    before = handlers()
    try:
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, mine)
        with pytest.raises(FloatingPointError, match="max_loss_ratio"):  # diverges mid-run
            run(str(tmp_path / "diverged"), settings(tiny_data, learning_rate=1e6))
        assert handlers() == [mine, mine]
        monkeypatch.setattr(train, "log_info", lambda info: os.kill(os.getpid(), signal.SIGTERM))
        with pytest.raises(SystemExit) as stopped:  # stopped by a signal after its first step, with a checkpoint
            run(str(tmp_path / "stopped"), settings(tiny_data))
        assert stopped.value.code == 128 + signal.SIGTERM and handlers() == [mine, mine]
    finally:
        for number, handler in zip((signal.SIGTERM, signal.SIGINT), before):
            signal.signal(number, handler)
