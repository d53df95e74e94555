"""Building on the framework from outside it: a method registered in a user's script runs
in both entrypoints; `powergossip` is one import name that leaves a user's own packages alone."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import gossip_run
import train
from powergossip import algorithms, configuration, topologies
from tests.launch import ROOT, installed_environment
from tests.test_gossip_run import run_main
from tests.test_runs import records, settings, tiny_data  # noqa: F401 (fixture)
from tests.train_runs import run


class HalfStepGossip(algorithms.GossipAlgorithm):
    """A user's method, written against the public surface only: x <- x + gamma/2 (W - I) x."""

    def step(self, params):
        edges = self.comm.half_edges(self.topology)
        received = self.comm.exchange(self.topology, params, per="worker")
        for x, x_j in zip(params, received):
            neighbours = algorithms.sum_into_workers(edges.incoming, x_j)
            weight = (1 - edges.weight_self).view(-1, *[1] * (x.dim() - 1))
            x += self.diffusion_rate / 2 * (neighbours - weight * x)


@pytest.fixture
def registered():
    algorithms.register_algorithm("half-step-gossip", HalfStepGossip, needs_tuning=False)
    yield "half_step_gossip"  # the other spelling: both read alike
    del algorithms.METHODS["half-step-gossip"]


def test_a_registered_method_runs_in_gossip_run_and_matches_the_dense_reference(tmp_path, registered):
    config = dict(gossip_run.DEFAULTS, algorithm=registered, n_workers=6, matrix_size=5, num_steps=30, topology="torus")
    got = [r for r in run_main(tmp_path, **{k: v for k, v in config.items() if k != "overwrite"}) if r["name"] == "error"]
    X = gossip_run.initial_state(config).double().reshape(6, -1).numpy()
    W = topologies.build("torus", 6).diffusion_matrix
    expected = {}
    for step in range(31):
        if step:
            X = X + 0.5 * (W - np.eye(6)) @ X
        expected[step] = float(((X - X.mean(axis=0)) ** 2).sum(axis=1).mean())
    assert [r["step"] for r in got] == [s for s in range(31) if gossip_run.is_logged(s, 30)]
    for record in got:  # float32 state against a float64 reference: rounding of the initial error
        assert record["value"] == pytest.approx(expected[record["step"]], rel=1e-5, abs=1e-6 * expected[0])
    assert got[-1]["value"] < 1e-3 * expected[0]
    degree = len(topologies.build("torus", 6).neighbor_ranks(0))  # 3 on a 2 x 3 torus
    assert got[-1]["bits"] == 30 * degree * 25 * 32  # the full 5 x 5 float32 matrix to every neighbour, every step


def test_a_registered_method_runs_in_train(tmp_path, tiny_data, registered):  # noqa: F811
    """Half the step at twice the rate is plain gossip: the same records as the built-in dpsgd."""
    run(str(tmp_path / "mine"), settings(tiny_data, optimizer=registered, optimizer_diffusion_rate=2.0))
    run(str(tmp_path / "builtin"), settings(tiny_data, optimizer="dpsgd", optimizer_diffusion_rate=1.0))
    mine, builtin = records(tmp_path / "mine"), records(tmp_path / "builtin")
    assert [r[:3] + r[4:] for r in mine] == [r[:3] + r[4:] for r in builtin]  # names, tags, bits
    for a, b in zip(mine, builtin):
        assert a[3] == pytest.approx(b[3], rel=1e-4, abs=1e-5), (a, b)
    assert configuration.apply_overrides(train._DEFAULTS, [str(tmp_path / "mine" / "config.yaml")])["optimizer"] == "half-step-gossip"


def test_method_names_read_dashes_and_underscores_alike():
    assert algorithms.registered_name("power_gossip") == algorithms.registered_name("Power-Gossip") == "power-gossip"
    assert algorithms.registered_name("uncompressed") == "dpsgd"
    with pytest.raises(ValueError, match="unknown method 'gossip9'; registered: all-reduce"):
        algorithms.registered_name("gossip9")


def installed() -> dict[str, str]:
    env = installed_environment()
    if env is None:
        pytest.skip("powergossip is not installed here (the README's set-up command installs it)")
    return env


def readme_block(heading: str) -> str:
    with open(os.path.join(ROOT, "README.md")) as f:
        return f.read().split(heading, 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readme_example_of_a_new_method_runs_from_any_folder(tmp_path):
    (tmp_path / "my_method.py").write_text(readme_block("## Add your own method"))
    result = subprocess.run([sys.executable, "my_method.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env=installed())
    assert result.returncode == 0, result.stderr
    assert "half_step_gossip gamma=1: final error" in result.stdout
    assert "summary: half-step-gossip on a 4-worker ring" in result.stdout
    assert len(os.listdir(tmp_path / "runs")) == 2  # each entrypoint wrote a fresh folder of its own


def test_a_user_project_keeps_its_own_data_and_models_packages(tmp_path):
    for package in ("data", "models", "runs"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text(f"OWNER = 'user {package}'\n")
    script = ("import powergossip\n"
              "from powergossip import algorithms, train, data as our_data, models as our_models\n"
              "import data, models, runs\n"
              "import json, sys\n"
              "print(json.dumps([data.OWNER, models.OWNER, runs.OWNER, our_data.__name__, our_models.__name__,\n"
              "                  sorted(m for m in sys.modules if m in ('comm', 'algorithms', 'topologies', 'train'))]))\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                            env=installed())
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == ["user data", "user models", "user runs",
                                                          "powergossip.data", "powergossip.models", []]


class OddRankGossip(HalfStepGossip):
    def __init__(self, comm, topology, rank=1, diffusion_rate=1.0):
        super().__init__(comm, topology, diffusion_rate)
        if rank % 2 == 0:
            raise ValueError(f"rank must be odd, got {rank}")


def test_a_method_checks_its_hyper_parameters_in_one_place_before_any_work(tmp_path):
    algorithms.register_algorithm("odd-rank", OddRankGossip)
    try:
        with pytest.raises(configuration.ConfigError, match="optimizer_rank must be odd, got 2"):
            train.validated(dict(train._DEFAULTS, optimizer="odd-rank", optimizer_rank=2))
        with pytest.raises(configuration.ConfigError, match="optimizer_rank must be odd, got 2"):
            run_main(tmp_path / "out", algorithm="odd-rank", compression_rank=2, num_steps=3)
        assert not (tmp_path / "out").exists()
        assert train.validated(dict(train._DEFAULTS, optimizer="odd-rank", optimizer_rank=3))["optimizer"] == "odd-rank"
    finally:
        del algorithms.METHODS["odd-rank"]


def test_a_module_imported_from_the_root_shares_the_registry(tmp_path):
    """`import algorithms` from the repository root (the original code's way) is a second copy
    of the module; a method registered through it is still found by train.py."""
    code = ("import algorithms, train\n"
            "algorithms.register_algorithm('root-gossip', algorithms.SimpleGossip, needs_tuning=False)\n"
            "print(train.validated(dict(train.config, optimizer='root_gossip'))['optimizer'])\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "root-gossip"


def test_methods_acting_on_gradients_are_refused_by_consensus_runs_only(tmp_path):
    with pytest.raises(configuration.ConfigError, match="acts on gradients; consensus experiments have none"):
        run_main(tmp_path / "out", algorithm="powersgd", num_steps=3)
    assert train.validated(dict(train._DEFAULTS, optimizer="PowerSGD"))["optimizer"] == "powersgd"


@pytest.mark.parametrize("kwargs,match", [
    (dict(rnak=2), r"method power-gossip takes rank, num_iterations, .*; not rnak"),
    (dict(keep_ratio=0.5), "not keep_ratio"),
    (dict(), None),  # power-gossip needs nothing
])
def test_the_drop_in_builds_strictly(kwargs, match):
    from powergossip import comm as comm_module

    comm, ring = comm_module.Communicator(4, "cpu"), topologies.build("ring", 4)
    if match is None:
        algorithms.build("power-gossip", comm, ring, strict=True, **kwargs)
    else:
        with pytest.raises(ValueError, match=match):
            algorithms.build("power-gossip", comm, ring, strict=True, **kwargs)
    with pytest.raises(ValueError, match="it needs theta"):
        algorithms.build("moniqua", comm, ring, strict=True)


def test_compressor_and_study_names_read_dashes_and_underscores_alike(tmp_path):
    cfg = train.validated(dict(train._DEFAULTS, optimizer="choco", optimizer_compressor="top_k"))
    assert cfg["optimizer_compressor"] == "top-k"  # one spelling in config.yaml, so resume compares names
    config = gossip_run.check(dict(gossip_run.DEFAULTS, algorithm="topk-choco", optimizer_compressor="TopK"))
    assert config["optimizer_compressor"] == "top-k"
    with pytest.raises(configuration.ConfigError, match="n_workers must be >= 2"):
        train.validated(dict(train._DEFAULTS, n_workers=1))
