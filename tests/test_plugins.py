"""Building on the framework from outside it: a method registered in a user's script runs
in both entrypoints; `powergossip` is one import name that leaves a user's own packages alone."""
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import gossip_run
import train
from experiments import sweep
from powergossip import algorithms, configuration, plugins, runs, topologies
from tests.launch import ROOT, installed_environment, run_mpi
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


# --- plug-ins named by the configuration's `plugins` key --------------------------------------------
PLUGIN = """import os
from powergossip import algorithms


class HalfStepGossip(algorithms.GossipAlgorithm):
    def step(self, params):
        graph = self.next_graph()
        edges = self.comm.half_edges(graph)
        received = self.comm.exchange(graph, params, per="worker")
        for x, x_j in zip(params, received):
            weight = (1 - edges.weight_self).view(-1, *[1] * (x.dim() - 1))
            x += self.diffusion_rate / 2 * (algorithms.sum_into_workers(edges.incoming, x_j) - weight * x)


with open(os.path.splitext(__file__)[0] + ".imports", "a") as f:
    f.write(f"{os.getpid()}\\n")
algorithms.register_algorithm(METHOD, HalfStepGossip, needs_tuning=False)
"""


def plugin_source(method: str) -> str:
    """A user's plug-in file: a method (HalfStepGossip's) registered as `method`; each import
    appends a line to the file's `.imports` neighbour (evidence of which processes imported it)."""
    return PLUGIN.replace("METHOD", repr(method))


@pytest.fixture
def plugin_file(tmp_path_factory):
    """plugin_file(stem, method): a plug-in file outside the repository; what it registered and
    its module are gone after the test (an in-process run imports it into this process)."""
    made = []

    def make(stem: str, method: str):
        path = tmp_path_factory.mktemp("user_code") / f"{stem}.py"
        path.write_text(plugin_source(method))
        made.append((stem, method))
        return path
    yield make
    for stem, method in made:
        sys.modules.pop(stem, None)
        algorithms.METHODS.pop(method, None)


def test_a_plugin_file_named_on_the_command_line_runs_through_train_under_mpirun(tmp_path, tiny_data, plugin_file):  # noqa: F811
    plugin = plugin_file("my_gossip_mpi", "my-gossip")
    arguments = settings(tiny_data, n_workers=2, max_batches_per_epoch=1, max_test_examples=16, evaluate_each_worker=False)
    run_mpi(2, ["train.py", f"plugins=[{plugin}]", "optimizer=my_gossip", f"output_dir={tmp_path / 'run'}"] + arguments,
            timeout=180)
    assert len(plugin.with_suffix(".imports").read_text().split()) == 2  # each process imported it, then checked its config
    stored = configuration.apply_overrides(train._DEFAULTS, [str(tmp_path / "run" / "config.yaml")])
    assert (stored["plugins"], stored["optimizer"]) == ([str(plugin)], "my-gossip")
    assert [r for r in records(tmp_path / "run") if r[0] == "accuracy"]


def test_a_sweep_runs_gossip_run_with_a_plugin_named_by_a_relative_path(tmp_path, monkeypatch, plugin_file):
    """The study scripts pass their overrides to every run; runs start where the sweep did, so a
    relative path (the plug-in's, the output folder's) means what it means to the caller."""
    plugin = plugin_file("my_consensus_gossip", "my-consensus-gossip")
    monkeypatch.chdir(plugin.parent)
    run = sweep.Run("mine", "gossip_run.py", [f"plugins=[{plugin.name}]", "algorithm=my_consensus_gossip", "n_workers=4",
                                              "matrix_size=4", "num_steps=5"])
    assert [o.status for o in sweep.launch([run], "study")] == ["done"]
    errors = [r for r in runs.read_metrics(str(plugin.parent / "study" / "mine")) if r["name"] == "error"]
    assert errors[-1]["step"] == 5 and errors[-1]["value"] < errors[0]["value"]
    assert errors[0]["tags"]["algorithm"] == "my_consensus_gossip"


def test_a_resume_with_a_changed_plugin_file_is_refused(tmp_path, tiny_data, plugin_file):  # noqa: F811
    plugin = plugin_file("my_resumed_gossip", "my-resumed-gossip")
    out = str(tmp_path / "run")
    arguments = settings(tiny_data, optimizer="my-resumed-gossip", plugins=[str(plugin)], max_batches_per_epoch=1,
                         evaluate_each_worker=False)
    run(out, arguments)
    run(out, arguments + ["num_epochs=2", "resume=true"])  # the same file: the run goes on
    plugin.write_text(plugin.read_text() + "# edited\n")
    with pytest.raises(configuration.ConfigError, match=r"^resume=true but the files that define the run changed since "
                                                        r"it started: plugins \S*my_resumed_gossip.py \(\S*\) holds other "
                                                        r"bytes than when the run started"):
        run(out, arguments + ["num_epochs=3", "resume=true"])
    with pytest.raises(configuration.ConfigError, match=r"changed configuration: .*plugins=\[\] \(the run has \['\S*my_resumed_gossip.py'\]\)"):
        run(out, settings(tiny_data, optimizer="dpsgd", max_batches_per_epoch=1, evaluate_each_worker=False,
                          num_epochs=3, resume=True))


def test_a_plugin_named_as_a_module_is_imported_once_and_its_file_defines_the_run(monkeypatch, plugin_file):
    plugin = plugin_file("my_module_gossip", "my-module-gossip")
    monkeypatch.syspath_prepend(str(plugin.parent))  # importable: on the path, as an installed module is
    cfg = train.validated(dict(train._DEFAULTS, plugins=["my_module_gossip"], optimizer="my_module_gossip"))
    assert cfg["optimizer"] == "my-module-gossip"
    assert gossip_run.check(dict(gossip_run.DEFAULTS, plugins=["my_module_gossip"], algorithm="my-module-gossip"))
    assert len(plugin.with_suffix(".imports").read_text().split()) == 1  # checked twice, imported once
    assert plugins.files(cfg["plugins"]) == {"plugins my_module_gossip": str(plugin)}


@pytest.mark.parametrize("entry,message", [
    ("{folder}/broken.py", r"plugins: \S*broken.py failed to import: ZeroDivisionError: division by zero \(\S*broken.py, "
                           r"line 2\)"),
    ("{folder}/missing.py", r"plugins: \S*missing.py is not a file"),
    ("no_such_plugin_module", r"plugins: cannot import no_such_plugin_module: no module named 'no_such_plugin_module'; "
                              r"give the path of its .py file"),
])
def test_a_plugin_that_cannot_be_imported_stops_the_command_line_in_one_line(tmp_path, capsys, entry, message):
    (tmp_path / "broken.py").write_text("import os\nprint(1 / 0)\n")
    with pytest.raises(SystemExit) as exit_status:
        gossip_run.command_line([f"plugins=[{entry.format(folder=tmp_path)}]", f"output_dir={tmp_path / 'out'}"])
    assert exit_status.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and re.fullmatch(r"gossip_run.py: configuration error \(process 0\): " + message + ".*", lines[0])
    assert not (tmp_path / "out").exists() and "broken" not in sys.modules
