"""The layout contract (README, "The layout contract"): with one thread per process, train.py's main
job writes the same records, bit for bit, in one process and under mpirun (sums over workers in
worker order, the averaged model's and consensus distances included), and a worker's matrix
product does not depend on how many workers its process holds. The golden files hold the same
records for both layouts (tests/test_golden.py); tests/test_train.py, tests/test_gossip_run.py
and tests/test_algorithms.py compare more methods and graphs with one worker per process."""
import json
import os

import pytest
import torch

import train
from powergossip.errors import ConfigError
from powergossip.methods import base
from tests import golden_runs
from tests.launch import run_mpi
from tests.train_runs import run

# The README's main job (train.py's defaults: PowerGossip on a 4-worker ring, Fashion-MNIST, the small
# CNN), cut short, every process on one thread.
MAIN_JOB = ["num_epochs=1", "max_batches_per_epoch=3", "max_test_examples=200", "device=cpu", "cpu_threads=1"]


@pytest.mark.skipif(not os.path.isdir("/usr/share/datasets/fashion-mnist"), reason="dataset-fashion-mnist not installed")
def test_the_main_job_writes_the_same_records_in_one_process_and_under_mpirun(tmp_path):
    run(str(tmp_path / "one"), MAIN_JOB)
    launched = run_mpi(2, ["tests/train_runs.py", str(tmp_path), json.dumps({"two": MAIN_JOB})], timeout=300)
    assert "(1 CPU thread(s) per process)" in launched.stdout
    one = golden_runs.comparable_lines(str(tmp_path / "one" / "metrics.jsonl"))
    two = golden_runs.comparable_lines(str(tmp_path / "two" / "metrics.jsonl"))
    assert one == two
    splits = {json.loads(line)["tags"].get("split") for line in one}
    assert {"train", "test", "test_avg"} <= splits  # every kind of record, the averaged model's too


def test_a_workers_matrix_product_does_not_depend_on_the_workers_beside_it():
    """Rank 1 (a matrix-vector product per worker): a process holding one worker computes what a
    process holding four computes for it."""
    generator = torch.Generator().manual_seed(0)
    x, p, q, out = (torch.randn(shape, generator=generator) for shape in [(4, 64, 288), (4, 64, 1), (4, 288, 1), (4, 64, 288)])
    together = base.matmul_per_worker(x.transpose(1, 2), p)
    alone = torch.cat([base.matmul_per_worker(x[i:i + 1].transpose(1, 2), p[i:i + 1]) for i in range(4)])
    assert torch.equal(together, alone)
    added_together = out.clone()
    base.add_matmul_per_worker_(added_together, p, q.transpose(1, 2))
    for i in range(4):
        added_alone = out[i:i + 1].clone()
        base.add_matmul_per_worker_(added_alone, p[i:i + 1], q[i:i + 1].transpose(1, 2))
        assert torch.equal(added_together[i:i + 1], added_alone)


@pytest.mark.parametrize("value", [0, -1, 1.5, "two"])
def test_cpu_threads_is_a_positive_integer_or_null(value):
    with pytest.raises(ConfigError, match=r"cpu_threads must be an integer >= 1"):
        train.validated(dict(train._DEFAULTS, task="synthetic", cpu_threads=value))
    assert train.validated(dict(train._DEFAULTS, task="synthetic", cpu_threads=2))["cpu_threads"] == 2
