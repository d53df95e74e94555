"""Study 9's network model (metrics.network_seconds) and its report on recorded runs."""
import csv
import json
import os
import subprocess
import sys

import pytest

from experiments import network_time, sweep


def fake_run(folder, epochs=3, bits_per_epoch=8e9, messages_per_epoch=100.0):
    """A finished deep-learning run's folder: output.log's first line, DONE and the records the report reads."""
    os.makedirs(folder)
    with open(os.path.join(folder, "output.log"), "w") as f:
        f.write("8 workers in 1 process(es) (8 each); backend none (one process); device cpu\n")
    with open(os.path.join(folder, "DONE"), "w") as f:
        f.write("")
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        for epoch in range(1, epochs + 1):
            traffic = {"epoch": float(epoch), "bits": bits_per_epoch * epoch, "messages": messages_per_epoch * epoch}
            f.write(json.dumps({"name": "accuracy", "value": 0.9 + 0.01 * epoch, **traffic, "tags": {"split": "test_avg"}}) + "\n")
            for name, seconds in (("time_batch", 0.8), ("time_forward_backward", 6.4), ("time_update", 0.8)):
                cumulative = seconds * (epoch if epoch < 3 else 1)  # a resume before epoch 3: the timers restart
                f.write(json.dumps({"name": name, "value": cumulative, **traffic, "tags": {"split": "runtime"}}) + "\n")


def test_projected_time_is_compute_per_worker_plus_the_modelled_communication(tmp_path):
    fake_run(str(tmp_path / "runs" / "all_reduce"))
    outcome = sweep.collect([sweep.Run("all_reduce", "train.py", [])], str(tmp_path / "runs"))[0]
    curve = network_time.projected_curve(sweep.metrics(outcome), network_time.workers_per_process(outcome), 1e-3, 1e9)
    # 8 s of compute per epoch over 8 workers; per epoch 8e9 bits at 1e9 bit/s and 100 messages of 1 ms
    assert [epoch for epoch, _, _ in curve] == [1.0, 2.0, 3.0]
    assert [seconds for _, seconds, _ in curve] == pytest.approx([1 + 8.1, 2 + 16.2, 3 + 24.3])
    table = network_time.report(str(tmp_path / "runs"), str(tmp_path / "out"))
    row = dict(zip(table[0], table[1]))
    assert row["method"] == "All-reduce" and float(row["compute s / epoch / worker"]) == pytest.approx(1.0)
    assert float(row["communication s / epoch, 1 Gbit/s"]) == pytest.approx(8 + 100 * 1e-4)
    assert float(row["projected time to 92% (s), 1 Gbit/s"]) == pytest.approx(2 * (1 + 8.01), rel=3e-3)  # 3 significant digits
    assert os.path.getsize(tmp_path / "out" / "accuracy_vs_time.png") > 1000


def test_alpha_and_beta_are_recovered_from_exact_times():
    alpha, beta = 2e-5, 5e9
    measured = [(size, alpha + 8 * size / beta) for size in network_time.LOOPBACK_BYTES]
    assert network_time.fit_alpha_beta(measured) == pytest.approx((alpha, beta), rel=1e-6)


def test_loopback_exchanges_are_timed_under_mpirun(tmp_path):
    result = subprocess.run([sys.executable, network_time.__file__, "--loopback", "--repeats", "3", "--output", str(tmp_path)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = list(csv.DictReader(open(tmp_path / "loopback.csv")))
    assert [int(row["bytes per message"]) for row in rows] == network_time.LOOPBACK_BYTES
    assert all(float(row["measured µs per exchange"]) > 0 for row in rows)
    assert "alpha =" in (tmp_path / "loopback.md").read_text()
