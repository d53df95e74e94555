"""train.py end to end on tiny data in the real Fashion-MNIST format."""
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import matplotlib.image
import numpy as np
import pytest
import torch

from powergossip import clock
from powergossip import comm as comm_module
from powergossip import figures
from powergossip import metrics
from powergossip import models
from powergossip import step as step_module
from powergossip import configuration
from powergossip import runs
from powergossip import topologies
import train
from powergossip.models.stacked import StackedReplicas
from tests.launch import ROOT, run_mpi
from tests.test_data import fake_fmnist
from tests.train_runs import DEFAULTS, run, stopped_and_resumed

OPTIMIZER_RUNS = {
    "all-reduce": ["optimizer=all-reduce"],
    "dpsgd": ["optimizer=dpsgd"],
    "power-gossip": ["optimizer=power-gossip", "optimizer_num_iterations=2"],
    "choco": ["optimizer=choco", "optimizer_compressor=sign-and-norm", "optimizer_diffusion_rate=0.4"],
    "choco-top-k": ["optimizer=choco", "optimizer_compressor=top-k", "optimizer_keep_ratio=0.05", "optimizer_diffusion_rate=0.1"],
    "deepsqueeze": ["optimizer=deepsqueeze", "optimizer_diffusion_rate=0.05"],
    "moniqua": ["optimizer=moniqua", "optimizer_diffusion_rate=0.05", "optimizer_theta=0.5"],
    "powersgd": ["optimizer=powersgd", "optimizer_rank=2", "optimizer_start_compressing_after_num_steps=2"],
}


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fmnist")
    fake_fmnist(folder, n_train=512, n_test=64, gz_test=True)
    return str(folder)


def common(tiny_data, **extra):
    settings = {"data_dir": tiny_data, "batch_size": 16, "num_epochs": 2, "n_workers": 4, "max_batches_per_epoch": 4,
                "distributed_lr_warmup_epoch": 0, "lr_schedule_milestones": [[1, 0.5]], "device": "cpu", "seed": 3} | extra
    return [f"{key}={json.dumps(value)}" for key, value in settings.items()]


def final(folder, name, split, worker=None):
    records = [r for r in runs.read_metrics(str(folder)) if r["name"] == name and r["tags"].get("split") == split
               and r["tags"].get("worker") == worker]
    return records[-1]


@pytest.mark.parametrize("name", sorted(OPTIMIZER_RUNS))
def test_every_optimizer_trains_in_one_process(tmp_path, tiny_data, name):
    run(str(tmp_path), common(tiny_data) + OPTIMIZER_RUNS[name])
    records = runs.read_metrics(str(tmp_path))
    assert {r["epoch"] for r in records} == {1.0, 2.0}
    for split in ("train", "test", "test_avg"):
        assert math.isfinite(final(tmp_path, "loss", split)["value"])
    assert final(tmp_path, "loss", "train")["bits"] > 0
    assert os.path.exists(tmp_path / "config.yaml") and os.path.isdir(tmp_path / "tensorboard")
    assert os.path.exists(tmp_path / "checkpoints" / "rank0.pt")


def test_every_optimizer_trains_under_mpirun(tmp_path, tiny_data):
    runs_json = {name: common(tiny_data, num_epochs=1) + overrides for name, overrides in OPTIMIZER_RUNS.items()}
    run_mpi(2, ["tests/train_runs.py", str(tmp_path), json.dumps(runs_json)], timeout=300)
    for name in OPTIMIZER_RUNS:
        assert math.isfinite(final(tmp_path / name, "loss", "test_avg")["value"])


LAYOUT_RUNS = ["dpsgd", "dpsgd dirichlet_split=per_class dirichlet_alpha=0.1", "power-gossip", "powersgd optimizer_rank=2 optimizer_start_compressing_after_num_steps=2",
               "push-sum topology=one_peer_exponential local_steps=2", "power-gossip topology=random_matching",
               "relay-sum topology=double_binary_trees", "d2 optimizer_diffusion_rate=0.5", "gradient-tracking",
               "dpsgd link_failure_probability=0.2 offline_probability=0.2 message_loss_probability=0.1",
               "power-gossip link_failure_probability=0.3 message_loss_probability=0.1",
               "push-sum message_loss_probability=0.2", "all-reduce offline_probability=0.3",
               "relay-sum topology=double_binary_trees message_loss_probability=0.1",
               "powersgd optimizer_rank=2 optimizer_start_compressing_after_num_steps=2 offline_probability=0.3",
               # the simulated clock: every process feeds it the same bits, messages, stragglers and lost messages
               "dpsgd simulated_clock=true worker_step_seconds=0.01 worker_speeds=[1,0.5,1,2] straggler_probability=0.3 "
               "message_loss_probability=0.1 message_timeout_s=0.05 network_bandwidth_bits_per_s=1e6",
               "powersgd optimizer_rank=2 optimizer_start_compressing_after_num_steps=2 offline_probability=0.3 "
               "simulated_clock=true worker_step_seconds=0.01 network_bandwidth_bits_per_s=1e6",
               # rounds in which a process's worker has no edge (comm.skip_exchange) and edges of both parities
               "power-gossip link_failure_probability=0.4 simulated_clock=true "
               "worker_step_seconds=0.01 network_bandwidth_bits_per_s=1e6"]


def layout_overrides(tiny_data, optimizer):
    return common(tiny_data, cpu_threads=1) + f"optimizer={optimizer}".split()  # the README's layout contract


@pytest.fixture(scope="module")
def mpirun_layout_runs(tmp_path_factory, tiny_data):
    """Every LAYOUT_RUNS case under one 4-process mpirun (one start of four interpreters, not five):
    run number i writes to FOLDER/i."""
    folder = tmp_path_factory.mktemp("mpirun_layouts")
    runs_json = {str(i): layout_overrides(tiny_data, optimizer) for i, optimizer in enumerate(LAYOUT_RUNS)}
    run_mpi(4, ["tests/train_runs.py", str(folder), json.dumps(runs_json)], timeout=600)
    return folder


@pytest.mark.parametrize("optimizer", LAYOUT_RUNS)
def test_one_process_and_mpirun_give_the_same_metrics(tmp_path, tiny_data, mpirun_layout_runs, optimizer):
    """One worker per process (mpirun -np 4) against all four in one process, one thread each:
    every record the same, bit for bit (the wall-clock ones aside)."""
    run(str(tmp_path / "single"), layout_overrides(tiny_data, optimizer))
    mpi_folder = mpirun_layout_runs / str(LAYOUT_RUNS.index(optimizer))
    single, mpi = runs.read_metrics(str(tmp_path / "single")), runs.read_metrics(str(mpi_folder))
    single = [r for r in single if not r["name"].startswith("time_")]
    mpi = [r for r in mpi if not r["name"].startswith("time_")]
    assert [(r["name"], r["epoch"], r["tags"]) for r in single] == [(r["name"], r["epoch"], r["tags"]) for r in mpi]
    for a, b in zip(single, mpi):
        assert a == b


def comparable(folder):
    return [(r["name"], r["epoch"], r["tags"], r["value"], r["bits"]) for r in runs.read_metrics(str(folder))
            if not r["name"].startswith("time_")]


class LateEvent:
    """What metrics.Recorder._stage leaves on a GPU (the end of the records' copy to the host, after
    the test it runs beside the next steps), for a CPU: the copy "ends" after `checks` queries that
    found it under way."""

    def __init__(self, checks: int):
        self.checks, self.not_ready, self.waited = checks, 0, False

    def query(self) -> bool:
        if self.not_ready < self.checks:
            self.not_ready += 1
            return False
        return True

    def synchronize(self):
        self.waited = True


def test_records_that_wait_for_the_test_beside_the_next_steps_are_those_written_at_once(tmp_path, tiny_data, monkeypatch):
    """On a GPU the averaged model's test runs beside the next epoch's first steps, and the epoch's
    records are written once their copy to the host, which follows it, has ended (metrics.Recorder.aside,
    _stage and flush). Here it "ends" three steps into the next epoch: the records, in their order,
    and a resume from a checkpoint (which waits for them) are those of a run that writes each epoch's
    records at its end."""
    overrides = common(tiny_data, num_epochs=3, checkpoint_every=2) + ["optimizer=power-gossip"]
    run(str(tmp_path / "at_once"), overrides)
    events = []
    stage = metrics.Recorder._stage

    def late(recorder):
        count, host, _ = stage(recorder)  # on a CPU no value waits for a copy
        events.append(LateEvent(checks=3))
        return count, host, events[-1]

    saved_with = []  # (checkpoint's epoch, the last epoch metrics.jsonl holds then): a save never runs ahead of the records
    save = runs.Checkpoints.save

    def save_and_look(checkpoints, state):
        records = runs.read_metrics(os.path.dirname(checkpoints.folder))
        saved_with.append((state["epoch"], max(record["epoch"] for record in records)))
        save(checkpoints, state)

    monkeypatch.setattr(metrics.Recorder, "_stage", late)
    monkeypatch.setattr(runs.Checkpoints, "save", save_and_look)
    run(str(tmp_path / "aside"), overrides)
    assert comparable(tmp_path / "aside") == comparable(tmp_path / "at_once")
    assert saved_with == [(2, 2.0)]
    assert len(events) == 3  # one copy an epoch
    assert events[0].not_ready == 3 and not events[0].waited  # epoch 1's records waited into epoch 2 (4 steps)
    assert events[1].waited and events[2].waited  # epoch 2's for its checkpoint, epoch 3's for the run's end
    run(str(tmp_path / "parts"), common(tiny_data, num_epochs=2, checkpoint_every=2) + ["optimizer=power-gossip"])
    run(str(tmp_path / "parts"), overrides + ["resume=true"])
    assert comparable(tmp_path / "parts") == comparable(tmp_path / "at_once")


@pytest.mark.parametrize("optimizer", ["power-gossip", "relay-sum topology=chain", "d2 optimizer_diffusion_rate=0.5",
                                       "gradient-tracking", "power-gossip link_failure_probability=0.3 offline_probability=0.2",
                                       "dpsgd message_loss_probability=0.2", "push-sum message_loss_probability=0.2"])
def test_resume_after_an_epoch_equals_an_uninterrupted_run(tmp_path, tiny_data, optimizer):
    """The checkpoint holds every state a method keeps (RelaySum's x^0, messages and counts; D2's
    and gradient tracking's corrections; the round that keys the faults' draws): a resumed run
    writes the uninterrupted run's records."""
    method = f"optimizer={optimizer}".split()
    overrides = common(tiny_data, num_epochs=3) + method
    run(str(tmp_path / "full"), overrides)
    run(str(tmp_path / "parts"), common(tiny_data, num_epochs=1) + method)
    run(str(tmp_path / "parts"), overrides + ["resume=true"])
    assert comparable(tmp_path / "parts") == comparable(tmp_path / "full")


def test_overlapped_sgp_resumes_exactly_and_its_steps_wait_for_the_compute_only(tmp_path, tiny_data):
    """push-sum with optimizer_one_step_delay: the checkpoint holds the messages in flight (a resumed run
    writes the same records), and on the simulated clock, with 1 s of compute a step and 0.5 s of
    latency, a step lasts 1 s (clock.py's overlap rule; push-sum without the delay takes 1.5 s and more)."""
    method = ["optimizer=push-sum", "optimizer_one_step_delay=true", "topology=one_peer_exponential", "simulated_clock=true",
              "worker_step_seconds=1.0", "network_latency_s=0.5"]
    run(str(tmp_path / "full"), common(tiny_data, num_epochs=2) + method)
    run(str(tmp_path / "parts"), common(tiny_data, num_epochs=1) + method)
    run(str(tmp_path / "parts"), common(tiny_data, num_epochs=2) + method + ["resume=true"])
    assert comparable(tmp_path / "parts") == comparable(tmp_path / "full")
    assert final(tmp_path / "full", "loss", "train")["simulated_time_s"] == 2 * 4 * 1.0
    assert math.isfinite(final(tmp_path / "full", "loss", "test_avg")["value"])


def test_quasi_global_momentum_resumes_exactly_and_changes_the_run(tmp_path, tiny_data):
    overrides = common(tiny_data, num_epochs=2) + ["optimizer=power-gossip", "momentum_type=quasi-global"]
    run(str(tmp_path / "full"), overrides)
    run(str(tmp_path / "parts"), common(tiny_data, num_epochs=1) + overrides[-2:])
    run(str(tmp_path / "parts"), overrides + ["resume=true"])
    assert comparable(tmp_path / "parts") == comparable(tmp_path / "full")  # the checkpoint's momenta are m-hat
    run(str(tmp_path / "local"), common(tiny_data, num_epochs=2) + ["optimizer=power-gossip"])
    local, quasi_global = comparable(tmp_path / "local"), comparable(tmp_path / "full")
    assert [r[4] for r in local] == [r[4] for r in quasi_global]  # the same bits
    assert [r[3] for r in local] != [r[3] for r in quasi_global]


QUASI_GLOBAL_RUNS = {name: OPTIMIZER_RUNS[name] for name in ("choco", "deepsqueeze", "moniqua", "powersgd")} | {
    "push-sum": ["optimizer=push-sum", "topology=one_peer_exponential"]}  # dpsgd, all-reduce, power-gossip: tested above


@pytest.mark.parametrize("name", sorted(QUASI_GLOBAL_RUNS))
def test_quasi_global_momentum_trains_with_the_other_methods(tmp_path, tiny_data, name):
    run(str(tmp_path), common(tiny_data, num_epochs=1, max_batches_per_epoch=2, evaluate_each_worker=False)
        + QUASI_GLOBAL_RUNS[name] + ["momentum_type=quasi-global"])
    assert math.isfinite(final(tmp_path, "loss", "test_avg")["value"])


def test_sigterm_mid_epoch_saves_and_resume_is_exact(tmp_path, tiny_data, monkeypatch, capsys):
    overrides = common(tiny_data, num_epochs=2) + ["optimizer=choco", "optimizer_compressor=qsgd", "optimizer_diffusion_rate=0.3"]
    run(str(tmp_path / "full"), overrides)

    def send_sigterm_midway(info):  # the hook runs after each step: the signal comes after the second epoch's first step
        if 0.6 < info["state.progress"] < 0.7:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(train, "log_info", send_sigterm_midway)
    with pytest.raises(SystemExit) as stopped:
        run(str(tmp_path / "parts"), overrides)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert "stopped by a signal at epoch 2 step 2;" in capsys.readouterr().out  # epochs from 1, as in the metrics
    saved = torch.load(tmp_path / "parts" / "checkpoints" / "rank0.pt", weights_only=True)
    assert (saved["epoch"], saved["step_in_epoch"]) == (1, 2) and saved["run"]["elapsed_s"] > 0
    monkeypatch.setattr(train, "log_info", lambda info: None)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    began = time.time()
    run(str(tmp_path / "parts"), overrides + ["resume=true"])
    resumed = time.time() - began
    assert re.search(r"^resuming run \w+ from epoch 2 step 2 \(", capsys.readouterr().out, flags=re.MULTILINE)
    assert comparable(tmp_path / "parts") == comparable(tmp_path / "full")
    with open(tmp_path / "parts" / "summary.json") as f:
        wall_time = json.load(f)["wall_time_s"]
    assert saved["run"]["elapsed_s"] < wall_time <= saved["run"]["elapsed_s"] + resumed  # both launches count


@pytest.mark.parametrize("method, extra", [("power-gossip", {"optimizer_num_iterations": 2, "local_steps": 2}),
                                           ("all-reduce", {}), ("push-sum", {"topology": "one_peer_exponential"})])
def test_a_run_timed_again_from_its_traffic_trace_has_the_live_clock_s_times(tmp_path, tiny_data, method, extra):
    """train.traffic_trace (the method's rounds on random stacks of the model's shapes, no training)
    timed by clock.StepClock gives every simulated record that a run of the same configuration
    with the clock wrote: a synchronous run is timed on another cluster without training again."""
    cluster = {"worker_step_seconds": 0.01, "worker_speeds": [1, 0.5, 1, 1], "straggler_probability": 0.2,
               "straggler_slowdown": 5.0, "network_latency_s": 1e-3, "network_bandwidth_bits_per_s": 1e6}
    run(str(tmp_path / "timed"), common(tiny_data, optimizer=method, simulated_clock=True, **extra, **cluster))
    records = runs.read_metrics(str(tmp_path / "timed"))
    live = {(r["name"], r["epoch"], r["tags"].get("worker")): r["value"] for r in records if r["tags"].get("split") == "clock"}
    cfg, topology = train.checked(DEFAULTS | {"optimizer": method, "n_workers": 4, "seed": 3} | extra)
    template = models.build("small_cnn", in_channels=1, num_classes=10, image_size=28)
    trace = train.traffic_trace(cfg, topology, [p.shape for p in template.parameters()], steps=8)
    timing = clock.StepClock(clock.ClockSettings(**cluster), topology, 4, method, seed=3)
    for step, (exchanges, gossiped) in enumerate(trace):  # 2 epochs of 4 steps
        timing.step(exchanges, gossiped)
        if step % 4 == 3:
            epoch = (step + 1) / 4
            assert timing.now == live["simulated_time", epoch, None]
            for part, seconds in zip(timing.PARTS, timing.spent):
                assert seconds.tolist() == [live[f"simulated_{part}", epoch, w] for w in range(4)]
    assert timing.now > 8 * 0.02 and timing.spent[1].max() > 0.1 * timing.now  # the slow worker's compute; sending counts


def test_the_summary_says_when_the_run_reached_its_target_accuracy(tmp_path, tiny_data):
    """target_accuracy: the first epoch whose averaged-model test accuracy reached it, with the MB a
    worker had sent and the simulated time then; a target never reached is said to be so."""
    cluster = ["simulated_clock=true", "worker_step_seconds=0.01", "num_epochs=3"]
    run(str(tmp_path / "run"), common(tiny_data, optimizer="dpsgd") + cluster)
    records = runs.read_metrics(str(tmp_path / "run"))
    curve = [r for r in records if r["name"] == "accuracy" and r["tags"] == {"split": "test_avg"}]
    target = sorted(r["value"] for r in curve)[1]  # reached, not necessarily at the first epoch
    first = next(r for r in curve if r["value"] >= target)
    run(str(tmp_path / "run"), common(tiny_data, optimizer="dpsgd") + cluster + [f"target_accuracy={target}", "overwrite=true"])
    with open(tmp_path / "run" / "summary.json") as f:
        summary = json.load(f)
    assert (summary["target_epoch"], summary["target_mb_per_worker"], summary["target_simulated_time_s"]) == \
        (first["epoch"], first["bits"] / 8 / 1e6, first["simulated_time_s"])
    unreached = {}
    assert metrics.reaching(runs.read_metrics(str(tmp_path / "run")), 1.0, unreached) == "test accuracy 100.00% not reached"
    assert unreached == {"target_accuracy": 1.0, "target_epoch": None}


def test_the_simulated_clock_resumes_mid_epoch_with_the_uninterrupted_times(tmp_path, tiny_data, monkeypatch):
    """Stopped by a signal inside an epoch and resumed: every record the same, its simulated
    time too (the clock's state, its round counter under local_steps and the stragglers' and
    lost messages' draws); the clock's keys and files define the run."""
    speeds = tmp_path / "speeds.txt"
    speeds.write_text("1 0.5\n1 2\n")
    overrides = common(tiny_data, optimizer="power-gossip", topology="one_peer_hypercube", local_steps=3,
                       message_loss_probability=0.2, simulated_clock=True, worker_step_seconds=0.01, worker_speeds=str(speeds),
                       straggler_probability=0.3, message_timeout_s=0.05, network_bandwidth_bits_per_s=1e6)
    run(str(tmp_path / "full"), overrides)
    stopped_and_resumed(str(tmp_path / "parts"), overrides, monkeypatch)  # after the second epoch's first step
    full, parts = ([r for r in runs.read_metrics(str(tmp_path / name)) if r["tags"].get("split") != "runtime"]
                   for name in ("full", "parts"))
    assert parts == full
    clock_records = {(r["name"], r["epoch"], r["tags"].get("worker")): r["value"] for r in full if r["tags"].get("split") == "clock"}
    for epoch in (1.0, 2.0):  # each worker's compute, sending and waiting add up to its time, the slowest's is the run's
        workers = [sum(clock_records[f"simulated_{part}", epoch, w] for part in ("compute", "sending", "waiting"))
                   for w in range(4)]
        assert max(workers) == pytest.approx(clock_records["simulated_time", epoch, None], rel=1e-12)
        assert all(r["simulated_time_s"] == clock_records["simulated_time", epoch, None] for r in full if r["epoch"] == epoch)
    with open(tmp_path / "full" / "summary.json") as f:
        assert json.load(f)["simulated_time_s"] == full[-1]["simulated_time_s"] > 0
    assert matplotlib.image.imread(str(tmp_path / "full" / "curves.png")).shape[1] == 17 * 120  # a column against time
    with pytest.raises(ValueError, match="network_bandwidth_bits_per_s=2000000.0 .the run has 1000000.0."):
        run(str(tmp_path / "full"), overrides + ["resume=true", "num_epochs=3", "network_bandwidth_bits_per_s=2e6"])
    speeds.write_text("1 0.5\n1 3\n")
    with pytest.raises(ValueError, match=r"worker_speeds file .* holds other bytes"):
        run(str(tmp_path / "full"), overrides + ["resume=true", "num_epochs=3"])


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_checkpoint(tmp_path, tiny_data):
    run(str(tmp_path), common(tiny_data, num_epochs=1))
    before = (tmp_path / "checkpoints" / "rank0.pt").read_bytes()
    with pytest.raises(FloatingPointError, match=r"last good checkpoint \(the end of epoch 1\) is kept"):
        run(str(tmp_path), common(tiny_data, num_epochs=3, learning_rate=1e12, weight_decay=0.0) + ["resume=true"])
    assert (tmp_path / "checkpoints" / "rank0.pt").read_bytes() == before


def gossip_bytes_per_step(optimizer, steps, **extra):
    n = 4
    comm = comm_module.Communicator(n, "cpu")
    torch.manual_seed(0)
    workers = StackedReplicas(models.build("resnet20"), n, torch.device("cpu"))
    cfg = train.validated(dict(DEFAULTS, optimizer=optimizer, n_workers=n, **extra))
    gossip = train.build_method(cfg, comm, topologies.build("ring", n))
    for _ in range(steps):
        gossip.step(workers.params)
    return comm.bytes_sent[0] * 8, workers


def test_resnet20_bits_follow_the_counting_rules():
    shapes = [p.shape for p in models.build("resnet20").parameters()]
    total = sum(math.prod(s) for s in shapes)
    assert total == 272_474
    bits, _ = gossip_bytes_per_step("dpsgd", 1)
    assert bits == 2 * 32 * total  # the full model to each of 2 neighbours
    bits, _ = gossip_bytes_per_step("all-reduce", 1)
    assert bits == 32 * total  # the buffer once per step
    # PowerGossip rank 1, 1 iteration: step 0 sends only the 1-D tensors; step 1 (odd
    # iteration) sends X q (m floats) per matrix; step 2 (even) X^T p (n floats).
    matrices = [(s[0], math.prod(s) // s[0]) for s in shapes if len(s) > 1]
    vectors = sum(math.prod(s) for s in shapes if len(s) == 1)
    bits, _ = gossip_bytes_per_step("power-gossip", 3)
    expected = 2 * 32 * (3 * vectors + sum(m for m, n in matrices) + sum(n for m, n in matrices))
    assert bits == expected
    bits, _ = gossip_bytes_per_step("choco", 1, optimizer_compressor="sign-and-norm")
    assert bits == 2 * (8 * math.ceil(total / 8) + 32 * len(shapes))  # packed signs + one float per tensor
    bits, _ = gossip_bytes_per_step("moniqua", 1)
    assert bits == 2 * 8 * math.ceil(total / 4)  # 2-bit codes


@pytest.mark.parametrize("overrides,match", [
    ({"no_such_key": 1}, "unknown config key"),
    ({"batch_size": "big"}, "batch_size must be an integer"),
    ({"optimizer": "adam"}, "optimizer: unknown method 'adam'; registered: all-reduce, dpsgd"),
    ({"topology": "social_network", "n_workers": 8}, "32"),
    ({"task_architecture": "lstm"}, "wikitext2"),
    ({"optimizer": "choco", "optimizer_compressor": "top-k", "optimizer_keep_ratio": 1.5}, r"optimizer_keep_ratio .*\(0, 1\]"),
    ({"optimizer": "choco", "optimizer_compressor": "zip"}, "optimizer_compressor .zip. is unknown"),
    ({"optimizer_rank": 0}, "optimizer_rank must be >= 1"),
    ({"stacked_compute": "graph", "device": "cpu"}, "needs a GPU"),
    ({"stacked_compute": "graph", "device": "cuda", "task": "wikitext2", "task_architecture": "lstm"}, "image task"),
    ({"stacked_compute": "graph", "device": "cuda", "graph_streams": 0}, "graph_streams must be >= 1"),
    ({"local_steps": 0}, "local_steps must be >= 1"),
    ({"compile_replicas": True}, "compile_replicas=true .* set stacked_compute=graph"),
    ({"optimizer": "power-gossip", "topology": "one_peer_exponential", "n_workers": 8},
     "PowerGossip needs a symmetric topology at every round.*Graphs that would do: .*one_peer_hypercube"),
    ({"optimizer": "dpsgd", "topology": "one_peer_hypercube", "n_workers": 6}, "power of two, got 6"),
    ({"momentum_type": "global"}, "momentum_type='global' is not one of local, quasi-global"),
    ({"momentum_type": "quasi-global", "momentum": 0}, "momentum_type=quasi-global needs momentum > 0"),
    ({"dirichlet_split": "per_class"}, "dirichlet_split=per_class .*: set dirichlet_alpha"),
    ({"dirichlet_split": "by_class", "dirichlet_alpha": 0.1}, "dirichlet_split='by_class' is not one of per_worker, per_class"),
    ({"straggler_probability": 0.1}, "straggler_probability=0.1 sets the simulated clock, which is off: pass simulated_clock=true"),
    ({"target_accuracy": 90}, r"target_accuracy must be a test accuracy in \(0, 1\] \(0.9 for 90%\)"),
    ({"target_accuracy": 0.9, "evaluate_average_model": False}, "target_accuracy is judged on the averaged model's test accuracy"),
    ({"simulated_clock": True, "worker_speeds": [1, 2]}, "worker_speeds has 2 speeds, but the run has 4 workers"),
])
def test_bad_configs_fail_before_training(overrides, match):
    with pytest.raises(ValueError, match=match):
        train.validated(dict(DEFAULTS) | overrides)


def test_batch_larger_than_a_shard_fails_before_training(tmp_path, tiny_data):
    with pytest.raises(ValueError, match="batch"):
        run(str(tmp_path), common(tiny_data, batch_size=1000))
    assert not os.path.exists(tmp_path / "metrics.jsonl")


def test_learning_rate_schedule():
    cfg = train.validated(dict(DEFAULTS, distributed_lr_warmup_epoch=5, distributed_lr_warmup_factor=11.0,
                               lr_schedule_milestones=[150, [225, 0.5]]))
    assert train.learning_rate_factor(cfg, 0.0) == 1.0
    assert train.learning_rate_factor(cfg, 2.5) == pytest.approx(6.0)
    assert train.learning_rate_factor(cfg, 100.0) == pytest.approx(11.0)
    assert train.learning_rate_factor(cfg, 150.0) == pytest.approx(1.1)
    assert train.learning_rate_factor(cfg, 230.0) == pytest.approx(0.55)


def test_nesterov_step_matches_torch_sgd():
    """Two parameters in two weight-decay groups (the step fuses each group's ops)."""
    torch.manual_seed(0)
    xs = [torch.randn(2, 5, 3), torch.randn(2, 4)]
    gs = [torch.randn(2, 5, 3), torch.randn(2, 4)]
    decays = [1e-2, 0.0]
    references, optimizers = [], []
    for x, decay in zip(xs, decays):
        reference = [torch.nn.Parameter(x[i].clone()) for i in range(2)]
        references.append(reference)
        optimizers.append(torch.optim.SGD(reference, lr=0.1, momentum=0.9, nesterov=True, weight_decay=decay))
    ours, momenta = [x.clone() for x in xs], [torch.zeros_like(x) for x in xs]
    for _ in range(3):
        for reference, g, sgd in zip(references, gs, optimizers):
            for i, p in enumerate(reference):
                p.grad = g[i].clone()
            sgd.step()
        step_module.nesterov_sgd_step(ours, gs, momenta, 0.1, 0.9, decays)
    for mine, reference in zip(ours, references):
        torch.testing.assert_close(mine, torch.stack([p.detach() for p in reference]))


@pytest.mark.parametrize("path", sorted(str(p) for p in __import__("pathlib").Path(train.__file__).parent.glob("experiments/configs/train/*/*.yaml")))
def test_shipped_paper_configs_are_valid(path):
    cfg = train.validated(configuration.apply_overrides(DEFAULTS, [path]))
    assert cfg["num_epochs"] >= 90 and cfg["n_workers"] in (8, 16)


def test_cifar10_resnet20_with_augmentation_trains(tmp_path):
    from tests.test_data import fake_cifar
    fake_cifar(tmp_path / "cifar-10-batches-py", per_batch=16, n_test=8)
    run(str(tmp_path / "out"), [f"data_dir={tmp_path}", "task=cifar10", "task_architecture=resnet20", "n_workers=2",
                                "batch_size=8", "num_epochs=1", "optimizer=power-gossip", "device=cpu"])
    assert math.isfinite(final(tmp_path / "out", "loss", "test_avg")["value"])


def test_wikitext2_lstm_trains_with_clipping(tmp_path):
    words = [f"w{i % 37}" for i in range(3000)]
    lines = "\n".join(" ".join(words[k:k + 20]) for k in range(0, len(words), 20))
    for split in ("train", "valid", "test"):
        (tmp_path / f"wiki.{split}.tokens").write_text(lines if split == "train" else lines[:400], encoding="utf-8")
    run(str(tmp_path / "out"), [f"data_dir={tmp_path}", "task=wikitext2", "task_architecture=lstm", "n_workers=2",
                                "batch_size=4", "bptt=10", "num_epochs=1", "max_batches_per_epoch=3", "momentum=0.0",
                                "weight_decay=0.0", "learning_rate=1.0", "gradient_clipping=0.4", "optimizer=power-gossip",
                                "optimizer_num_iterations=2", "device=cpu"])
    assert math.isfinite(final(tmp_path / "out", "perplexity", "test_avg")["value"])


def test_the_core_imports_without_torchvision():
    """PyPI's torchvision does not import with a CPU torch: nothing in the core may need it."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['torchvision'] = None\n"
            "import train, gossip_run\nfrom powergossip import algorithms, compressors, comm, topologies, models, data, runs\n"
            "from experiments import sweep, report, deep_learning\nprint('ok')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.stdout.strip() == "ok", result.stderr


def test_vmap_compute_gives_the_loop_numbers(tmp_path, tiny_data):
    overrides = common(tiny_data) + ["optimizer=power-gossip"]
    run(str(tmp_path / "loop"), overrides)
    run(str(tmp_path / "vmap"), overrides + ["stacked_compute=vmap"])
    loop, vmapped = comparable(tmp_path / "loop"), comparable(tmp_path / "vmap")
    assert [r[:3] for r in loop] == [r[:3] for r in vmapped]
    for a, b in zip(loop, vmapped):
        assert a[3] == pytest.approx(b[3], rel=1e-4, abs=1e-4), (a, b)


def test_without_a_terminal_every_epoch_prints_a_line(tmp_path, tiny_data, capsys, monkeypatch):
    monkeypatch.setattr(runs.Progress, "interval", 0.0)  # a line after every step inside an epoch, as if each took a minute
    run(str(tmp_path), common(tiny_data))  # pytest's stderr is no terminal, as in a log file or under mpirun
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in lines] == [
        "epoch 1/2 step 1/4", "epoch 1/2 step 2/4", "epoch 1/2 step 3/4", "epoch 1/2",
        "epoch 2/2 step 1/4", "epoch 2/2 step 2/4", "epoch 2/2 step 3/4", "epoch 2/2"]
    last = final(tmp_path, "accuracy", "test_avg")
    assert f"averaged-model test accuracy {last['value']:.2%}" in lines[-1]
    assert f", {last['bits'] / 8e6:.3f} MB sent per worker" in lines[-1]  # the mean over workers, as recorded
    assert "recent train loss not known yet" in lines[0]  # the first step's loss is read one step late
    assert "nan" not in "".join(lines)


def test_the_worst_worker_is_recorded_and_shown_next_to_the_mean_and_averaged_model(tmp_path, tiny_data, capsys):
    run(str(tmp_path), common(tiny_data, num_epochs=1, dirichlet_alpha=0.1, dirichlet_split="per_class") + ["optimizer=dpsgd"])
    workers = [final(tmp_path, "accuracy", "test", worker)["value"] for worker in range(4)]
    worst = final(tmp_path, "accuracy", "test_worst")
    assert worst["value"] == min(workers) and worst["epoch"] == 1.0 and "worker" not in worst["tags"]
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch 1/1:"))
    mean = final(tmp_path, "accuracy", "test")["value"]
    assert f"(workers: mean {mean:.2%}, worst {min(workers):.2%})" in line


def test_the_line_inside_an_epoch_follows_the_clock(capsys):
    now = [0.0]
    progress = runs.Progress(True, num_epochs=1, steps_per_epoch=10, steps_done=0, started=0.0, terminal=False,
                             clock=lambda: now[0])
    silent = runs.Progress(False, num_epochs=1, steps_per_epoch=10, steps_done=0, started=0.0, terminal=False,
                           clock=lambda: now[0])
    for step in range(10):
        now[0] += 25.0  # a step every 25 s: a line once 60 s have passed since the last one
        for shown in (progress, silent):
            shown.step(0, step, 1.0, 2e6)
    assert capsys.readouterr().out.splitlines() == [
        "epoch 1/1 step 3/10: recent train loss 1.0000, 2.000 MB sent per worker, 75 s elapsed, about 3 min left",
        "epoch 1/1 step 6/10: recent train loss 1.0000, 2.000 MB sent per worker, 2 min elapsed, about 100 s left",
        "epoch 1/1 step 9/10: recent train loss 1.0000, 2.000 MB sent per worker, 4 min elapsed, about 25 s left",
    ]  # not after the last step: the epoch's own line follows it


class FakeTerminal(io.StringIO):
    """What a run writes to stderr in a terminal: tqdm draws its bar there."""

    def isatty(self):
        return True


def test_in_a_terminal_the_bar_shows_the_last_test_accuracy_and_the_mb_of_the_epoch_line(tmp_path, tiny_data, monkeypatch):
    """The bar's numbers are up to date at every redraw: after each epoch its averaged-model test
    accuracy and the MB sent per worker that the epoch's line shows (the mean over workers), and
    at the end the last ones, as summary.json has them; never worker 0's figure of a step before."""
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    run(str(tmp_path), common(tiny_data, n_workers=2, max_batches_per_epoch=3))
    monkeypatch.undo()
    drawn = [text.strip() for text in terminal.getvalue().split("\r") if text.strip()]
    ends = [(r["value"], r["bits"]) for r in runs.read_metrics(str(tmp_path))
            if r["name"] == "accuracy" and r["tags"] == {"split": "test_avg"}]
    for epoch, (accuracy, bits) in enumerate(ends, start=1):
        after = [text for text in drawn if f" {3 * epoch}/6 " in text][-1]  # drawn once the epoch was recorded
        assert after.endswith(f"test_acc={accuracy:.2%}, MB/worker={bits / 8e6:.3f}]"), (after, ends)
    assert drawn[-1].endswith(f"test_acc={ends[-1][0]:.2%}, MB/worker={ends[-1][1] / 8e6:.3f}]"), drawn[-1]
    assert "loss=" in drawn[-1] and "nan" not in terminal.getvalue()


def test_the_bar_shows_the_mean_over_workers_of_the_bytes_sent():
    comm = comm_module.Communicator(4, "cpu")
    comm.bytes_sent[:] = [1_000_000, 3_000_000, 0, 0]  # a star's centre sends more than its leaves
    with runs.StopRequests() as stop:
        assert not stop.requested(comm)
    progress = runs.Progress(True, num_epochs=1, steps_per_epoch=10, steps_done=0, started=0.0, terminal=False)
    progress.step(0, 0, 2.5, stop.bytes_per_worker)
    assert progress.postfix() == "loss=2.500, MB/worker=1.000"


def test_a_run_logging_to_a_file_prints_epochs_and_draws_its_curves(tmp_path, tiny_data):
    """`python train.py ... > log`: a line per epoch in the file, output_dir/curves.png, and
    TensorBoard tags against the kB sent per worker (the paper's x-axis)."""
    folder = tmp_path / "run"
    with open(tmp_path / "log.txt", "w") as log:
        subprocess.run([sys.executable, "train.py", *common(tiny_data), f"output_dir={folder}"], cwd=ROOT, stdout=log,
                       stderr=subprocess.STDOUT, timeout=300, check=True)
    text = (tmp_path / "log.txt").read_text()
    assert re.findall(r"^epoch (\d+/\d+): ", text, flags=re.MULTILINE) == ["1/2", "2/2"], text
    assert f"figure {folder / 'curves.png'}" in text

    png = (folder / "curves.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    image = matplotlib.image.imread(str(folder / "curves.png"))
    assert image.ndim == 3 and image.shape[0] > 300 and image.shape[1] > 300 and image.std() > 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tensorboard"))
    events.Reload()
    records = [r for r in runs.read_metrics(str(folder)) if r["name"] == "accuracy" and r["tags"] == {"split": "test_avg"}]
    by_epoch, by_sent = events.Scalars("accuracy/test_avg"), events.Scalars("by_kB_sent/accuracy/test_avg")
    assert [e.step for e in by_epoch] == [1, 2]
    assert [e.step for e in by_sent] == [round(r["bits"] / 8e3) for r in records] and by_sent[0].step > 0
    assert [e.value for e in by_sent] == pytest.approx([r["value"] for r in records])
    assert "by_kB_sent/loss/train" in events.Tags()["scalars"]


def test_the_training_figure_shades_the_spread_over_workers(tmp_path, tiny_data):
    records = [{"name": name, "epoch": e, "value": value + 0.1 * w, "bits": 8e6 * e, "messages": 0.0,
                "tags": {"split": split, "worker": w}}
               for e in (1.0, 2.0) for w in range(4) for name, split, value in (("accuracy", "test", 0.5), ("loss", "train", 2.0))]
    assert figures.worker_spread(records, "accuracy", "test") == [(1.0, 1.0, 0.5, pytest.approx(0.8)),
                                                                   (2.0, 2.0, 0.5, pytest.approx(0.8))]
    figure = figures.training_figure(records + [{"name": "accuracy", "epoch": e, "value": 0.6, "bits": 8e6 * e, "messages": 0.0,
                                                 "tags": {"split": "test"}} for e in (1.0, 2.0)], "title")
    top_left, top_right = figure.axes[:2]
    assert len(top_left.collections) == len(top_right.collections) == 1  # one shaded band per panel
    assert top_right.get_xscale() == "log" and top_right.get_xlabel() == "MB sent per worker"


# --- graphs over time, push-sum, local steps ------------------------------------------------------
def test_local_steps_divide_the_bits_and_resume_exactly_with_the_round_counter(tmp_path, tiny_data):
    """3 local steps per round over epochs of 4 steps: rounds straddle epochs, and the graph (a
    one-peer hypercube, period 2) follows the round counter that the checkpoint keeps."""
    run(str(tmp_path / "every"), common(tiny_data, num_epochs=1, optimizer="dpsgd", topology="one_peer_hypercube"))
    run(str(tmp_path / "fewer"), common(tiny_data, num_epochs=1, optimizer="dpsgd", topology="one_peer_hypercube", local_steps=2))
    assert final(tmp_path / "every", "loss", "train")["bits"] == 2 * final(tmp_path / "fewer", "loss", "train")["bits"] > 0
    settings = dict(optimizer="power-gossip", topology="one_peer_hypercube", local_steps=3)
    run(str(tmp_path / "full"), common(tiny_data, num_epochs=3, **settings))
    run(str(tmp_path / "parts"), common(tiny_data, num_epochs=1, **settings))
    saved = torch.load(tmp_path / "parts" / "checkpoints" / "rank0.pt", weights_only=True)["gossip"]
    assert saved["compressed"]["round"] == saved["uncompressed"]["round"] == 1  # 4 steps, a round every 3rd
    run(str(tmp_path / "parts"), common(tiny_data, num_epochs=3, **settings) + ["resume=true"])
    assert comparable(tmp_path / "parts") == comparable(tmp_path / "full")
    assert torch.load(tmp_path / "parts" / "checkpoints" / "rank0.pt", weights_only=True)["gossip"]["compressed"]["round"] == 4


@pytest.mark.parametrize("topology", ["one_peer_exponential", "directed_exponential", "random_matching"])
def test_stochastic_gradient_push_trains_on_graphs_over_time(tmp_path, tiny_data, topology):
    run(str(tmp_path), common(tiny_data, optimizer="push_sum", topology=topology, local_steps=2))
    for split in ("train", "test", "test_avg"):
        assert math.isfinite(final(tmp_path, "loss", split)["value"])
    parameters = sum(p.numel() for p in models.build("small_cnn", in_channels=1, image_size=28).parameters())
    rounds, out_neighbours = 2 * 4 // 2, 2 if topology == "directed_exponential" else 1
    assert final(tmp_path, "loss", "train")["bits"] == rounds * out_neighbours * 32 * (parameters + 1)  # x_i and w_i


def test_push_sum_steps_the_numerator():
    """SGP (Assran et al. 2019, Algorithm 1): x_i -= lr grad f(z_i) with z_i = x_i / w_i; train.py
    holds z_i and steps it at lr / w_i (step_size_scale), the same step in z's terms."""
    x, w = torch.randn(3, 4, 2), torch.tensor([0.5, 1.0, 2.0])
    g = torch.randn(3, 4, 2)
    z = x / w.view(-1, 1, 1)
    step_module.nesterov_sgd_step([z], [g], [torch.zeros_like(z)], 0.1 / w, 0.0, [0.0])
    torch.testing.assert_close(z * w.view(-1, 1, 1), x - 0.1 * g)
