"""The drop-in optimizer under mpirun (one worker per process) with a model the project did
not write: the same numbers as the stacked single-process path, the registered method's
bytes, and workers that agree once only gossip runs."""
import json

import pytest
import torch

from tests import optimizer_runs
from tests.launch import run_mpi

RUNS = [
    ["power_gossip", "power-gossip", {"rank": 1, "num_iterations": 1}, "sgd"],
    ["choco", "choco", {"compressor": "sign-and-norm", "diffusion_rate": 0.4}, "sgd"],
    ["power_gossip_adamw", "power-gossip", {"rank": 2}, "adamw"],
]


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    folder = tmp_path_factory.mktemp("drop_in")
    run_mpi(4, ["tests/optimizer_runs.py", str(folder), json.dumps(RUNS)], timeout=300)
    return {name: [torch.load(folder / name / f"rank{w}.pt") for w in range(optimizer_runs.N_WORKERS)]
            for name, *_ in RUNS}


def consensus_distance(trajectory):  # [workers, steps, entries] -> per step
    return (trajectory - trajectory.mean(dim=0)).norm(dim=2).mean(dim=0)


@pytest.mark.parametrize("name,algorithm,hyper", [run[:3] for run in RUNS if run[3] == "sgd"])
def test_drop_in_equals_the_stacked_path(launched, name, algorithm, hyper):
    trajectory, bytes_sent = optimizer_runs.stacked(algorithm, dict(hyper))
    for worker, result in enumerate(launched[name]):
        assert result["bytes_sent"] == bytes_sent[worker] > 0  # the registered method's count, exactly
        scale = trajectory[worker].abs().max()
        torch.testing.assert_close(result["trajectory"], trajectory[worker], rtol=1e-4, atol=1e-5 * scale)


@pytest.mark.parametrize("name", [run[0] for run in RUNS])
def test_workers_learn_and_then_agree(launched, name):
    trajectory = torch.stack([result["trajectory"] for result in launched[name]])
    distance = consensus_distance(trajectory)
    steps = optimizer_runs.STEPS
    assert distance[-1] < 0.5 * distance[steps - 1]  # gossip alone brings the workers together
    losses = torch.tensor([result["losses"] for result in launched[name]])
    assert losses[:, steps - 3:steps].mean() < losses[:, :3].mean()  # and they learned while training


def test_the_readme_training_loop_runs_under_mpirun_and_torchrun(tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    from tests.test_plugins import readme_block

    (tmp_path / "my_train.py").write_text(readme_block("## Use it in your own training loop"))
    under_mpirun = run_mpi(4, [str(tmp_path / "my_train.py")], timeout=300)
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    under_torchrun = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "4", "my_train.py"], cwd=tmp_path,
                                    env=env, capture_output=True, text=True, timeout=300)
    assert under_torchrun.returncode == 0, under_torchrun.stderr
    for output in (under_mpirun.stdout, under_torchrun.stdout):
        lines = sorted(line for line in output.splitlines() if line.startswith("worker "))
        assert [line.split(":")[0] for line in lines] == [f"worker {w}" for w in range(4)]
        losses = [float(line.split("loss ")[1].split(",")[0]) for line in lines]
        assert max(losses) < 0.3, lines  # chance is ln 2 = 0.69: every worker learned the rule
    assert sorted(under_mpirun.stdout.splitlines()) == sorted(under_torchrun.stdout.splitlines())  # same numbers
