"""The consensus-experiment entrypoint: curves, schedule, sweep, data types, bad input, layouts."""
import json
import math
import os
import runpy
import sys

import matplotlib.image
import numpy as np
import pytest
import torch

import gossip_run
from powergossip import configuration, figures, runs
from tests.launch import ROOT, run_mpi

SMALL = {"matrix_size": 10, "num_steps": 60}  # every algorithm on an 8-ring in well under a second
NARROW_GRID = {"hyperparameter_num_samples": 3, "theta_num_samples": 2}


def run_main(tmp_path, log_metric=None, log_info=None, **overrides):
    """gossip_run.main() in this process, as a caller would use it; returns the metric records."""
    saved = (gossip_run.config, gossip_run.output_dir, gossip_run.log_metric, gossip_run.log_info)
    try:
        gossip_run.config = dict(gossip_run.DEFAULTS, **overrides)
        gossip_run.output_dir = str(tmp_path)
        gossip_run.log_metric = log_metric or saved[2]
        gossip_run.log_info = log_info or saved[3]
        gossip_run.main()
    finally:
        gossip_run.config, gossip_run.output_dir, gossip_run.log_metric, gossip_run.log_info = saved
    return runs.read_metrics(str(tmp_path))


def run_cli(monkeypatch, arguments):
    """`python gossip_run.py ARGUMENTS` in this process (the real __main__ block)."""
    monkeypatch.setattr("sys.argv", [os.path.join(ROOT, "gossip_run.py")] + arguments)
    runpy.run_path(os.path.join(ROOT, "gossip_run.py"), run_name="__main__")


def named(records, name, **tags):
    return [r for r in records if r["name"] == name and all(r["tags"][k] == v for k, v in tags.items())]


def settings_of(records):
    return sorted({(r["tags"]["diffusion_rate"], r["tags"]["theta"] or 0.0) for r in records})


# --- schedule and schema -------------------------------------------------------------------------
def test_schedule_schema_and_bits_of_uncompressed_gossip(tmp_path):
    hooked, progress = [], []
    records = run_main(tmp_path, algorithm="uncompressed", matrix_size=10, num_steps=250,
                       log_metric=lambda name, values, tags: hooked.append((name, values, tags)),
                       log_info=lambda info: progress.append(info["state.progress"]))
    expected_steps = list(range(11)) + list(range(20, 101, 10)) + [200, 250]
    tags = {"algorithm": "uncompressed", "diffusion_rate": 1.0, "theta": None}
    for name in ("error", "error_to_initial_mean"):
        curve = named(records, name)
        assert [r["step"] for r in curve] == expected_steps
        for r in curve:
            assert list(r) == ["name", "step", "value", "bits", "messages", "tags"]
            assert r["tags"] == tags
            assert all(isinstance(r[k], float) for k in ("value", "bits", "messages"))
            assert r["bits"] == r["step"] * 2 * 32 * 10 ** 2  # 2 neighbours, float32, the whole matrix
            assert r["messages"] == r["step"] * 2
    errors = [r["value"] for r in named(records, "error")]
    assert errors[-1] < 1e-6 * errors[0]
    assert [r["step"] for r in named(records, "final_error")] == [250]
    assert named(records, "final_error")[0]["value"] == errors[-1]
    assert not named(records, "diverged")
    assert [(r["name"], {k: r[k] for k in ("step", "value", "bits", "messages")}, r["tags"]) for r in records] == hooked
    assert progress == [0.0, 1.0]
    assert configuration.apply_overrides(gossip_run.DEFAULTS, [str(tmp_path / "config.yaml")]) == \
        dict(gossip_run.DEFAULTS, algorithm="uncompressed", matrix_size=10, num_steps=250)


def test_error_is_the_consensus_distance_and_bits_never_decrease(tmp_path):
    records = run_main(tmp_path, algorithm="sign_deepsqueeze", diffusion_rate=0.05, **SMALL)
    x0 = gossip_run.initial_state(dict(gossip_run.DEFAULTS, **SMALL)).double()
    start = ((x0 - x0.mean(0)) ** 2).sum().item() / 8
    assert named(records, "error")[0]["value"] == pytest.approx(start, rel=1e-12)
    assert named(records, "error_to_initial_mean")[0]["value"] == pytest.approx(start, rel=1e-12)
    bits = [r["bits"] for r in named(records, "error")]
    assert bits == sorted(bits) and bits[-1] > 0
    # DeepSqueeze moves the average, so the two definitions part ways.
    assert named(records, "error")[-1]["value"] != named(records, "error_to_initial_mean")[-1]["value"]


# --- every method converges; the sweep ---------------------------------------------------------
@pytest.mark.parametrize("algorithm", gossip_run.ALGORITHMS)
def test_every_algorithm_brings_the_workers_closer(tmp_path, algorithm):
    records = run_main(tmp_path, algorithm=algorithm, topology="ring", n_workers=8, data_type="random",
                       **SMALL, **NARROW_GRID)
    start = named(records, "error")[0]["value"]
    finals = named(records, "final_error")
    best = min(r["value"] for r in finals)
    assert best < 0.9 * start, (algorithm, start, best)
    expected_settings = 1 if algorithm in gossip_run.UNTUNED else 3 * (2 if algorithm == "moniqua" else 1)
    assert len(finals) == expected_settings


def test_divergence_is_recorded_and_the_sweep_goes_on(tmp_path):
    records = run_main(tmp_path, algorithm="sign_choco", diffusion_rate=[50.0, 0.05], **SMALL)
    diverged = named(records, "diverged")
    assert len(diverged) == 1 and diverged[0]["tags"]["diffusion_rate"] == 50.0
    stopped_at = diverged[0]["step"]
    curve = named(records, "error", diffusion_rate=50.0)
    assert curve[-1]["step"] == stopped_at < SMALL["num_steps"]
    assert not math.isfinite(curve[-1]["value"]) or curve[-1]["value"] > curve[0]["value"]
    assert named(records, "final_error", diffusion_rate=50.0)[0]["value"] == math.inf
    good = named(records, "error", diffusion_rate=0.05)
    assert good[-1]["step"] == SMALL["num_steps"] and good[-1]["value"] < good[0]["value"]
    assert good[0]["bits"] == 0  # counters start afresh for every setting
    assert named(records, "final_error", diffusion_rate=0.05)[0]["value"] == good[-1]["value"]


def test_the_grids_follow_the_original_code():
    config = dict(gossip_run.DEFAULTS, algorithm="moniqua")
    gammas, thetas = gossip_run.diffusion_rates(config), gossip_run.thetas(config)
    assert len(gammas) == 20 and gammas[0] == pytest.approx(1e-4) and gammas[-1] == pytest.approx(1.308)
    assert np.allclose(np.diff(np.log(gammas)), np.log(1.308 / 1e-4) / 19)
    assert len(thetas) == 20 and thetas[0] == pytest.approx(0.1) and thetas[-1] == pytest.approx(10)
    assert gossip_run.thetas(dict(config, algorithm="sign_choco")) == [None]
    assert gossip_run.diffusion_rates(dict(config, algorithm="power_gossip_random")) == [1.0]
    assert gossip_run.diffusion_rates(dict(config, algorithm="power_gossip", optimizer_diffusion_rate=1.308)) == [1.308]


# --- data types ------------------------------------------------------------------------------
def test_initial_states_have_the_documented_form():
    config = dict(gossip_run.DEFAULTS, n_workers=6, matrix_size=20, seed=3)
    random = gossip_run.initial_state(dict(config, data_type="random"))
    assert random.shape == (6, 20, 20) and random.dtype == torch.float32
    assert torch.equal(random, gossip_run.initial_state(dict(config, data_type="random")))  # seeded
    assert abs(random.mean().item()) < 0.1 and abs(random.std().item() - 1) < 0.1
    offset = gossip_run.initial_state(dict(config, data_type="offset"))
    assert torch.allclose(offset - torch.arange(6.0).view(6, 1, 1), random, atol=1e-5)
    sparse = gossip_run.initial_state(dict(config, data_type="sparse")).view(6, -1)
    assert torch.equal(sparse, torch.eye(6, 400))
    log_normal = gossip_run.initial_state(dict(config, data_type="log-normal"))
    assert torch.allclose(log_normal, random.exp())


@pytest.mark.parametrize("data_type", ["random", "offset", "sparse", "log-normal"])
def test_each_data_type_runs(tmp_path, data_type):
    records = run_main(tmp_path, algorithm="power_gossip", data_type=data_type, **SMALL)
    curve = named(records, "error")
    assert curve[-1]["value"] < curve[0]["value"]


def test_file_data_type(tmp_path):
    values = np.random.default_rng(0).normal(size=(8, 5, 6)) + np.arange(8).reshape(8, 1, 1)
    path = tmp_path / "start.npy"
    np.save(path, values)
    config = dict(gossip_run.DEFAULTS, data_type="file", data_path=str(path))
    assert torch.equal(gossip_run.initial_state(config), torch.from_numpy(values.astype(np.float32)))
    records = run_main(tmp_path / "out", algorithm="uncompressed", data_type="file", data_path=str(path), num_steps=30)
    x = values.astype(np.float32).astype(np.float64)
    assert named(records, "error")[0]["value"] == pytest.approx(((x - x.mean(0)) ** 2).sum() / 8, rel=1e-9)
    assert named(records, "error")[-1]["value"] < 1e-3 * named(records, "error")[0]["value"]
    assert named(records, "error")[1]["bits"] == 2 * 32 * 30  # one 5 x 6 entry to each of 2 neighbours


def test_a_file_with_the_wrong_first_dimension_is_a_clear_error(tmp_path):
    path = tmp_path / "start.npy"
    np.save(path, np.zeros((5, 3, 3), dtype=np.float32))
    with pytest.raises(configuration.ConfigError, match=r"shape \(5, 3, 3\).*\[8, \.\.\.\]"):
        run_main(tmp_path / "out", data_type="file", data_path=str(path))
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(not os.path.exists("/usr/share/datasets/fashion-mnist"), reason="Fashion-MNIST not installed")
def test_images_data_type(tmp_path):
    config = dict(gossip_run.DEFAULTS, data_type="images", n_workers=4)
    images = gossip_run.initial_state(config)
    assert images.shape == (4, 28, 28) and images.min() >= 0 and images.max() <= 1
    assert all(not torch.equal(images[0], images[k]) for k in range(1, 4))
    records = run_main(tmp_path, algorithm="power_gossip", data_type="images", n_workers=4, num_steps=20)
    assert named(records, "error")[-1]["value"] < named(records, "error")[0]["value"]


@pytest.mark.parametrize("algorithm,rate", [("d2", 0.5), ("gradient-tracking", 1.0)])
def test_d2_and_gradient_tracking_average_without_gradients(tmp_path, algorithm, rate):
    """With no local step (u = 0) they are averaging: to the workers' mean, which they keep."""
    records = run_main(tmp_path, algorithm=algorithm, topology="ring", n_workers=8, data_type="random",
                       optimizer_diffusion_rate=rate, **SMALL)
    start = named(records, "error_to_initial_mean")[0]["value"]
    assert named(records, "error_to_initial_mean")[-1]["value"] < 1e-3 * start


# --- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,message", [
    ({"algorithm": "power_gosip"}, "unknown algorithm 'power_gosip'"),
    ({"topology": "rign"}, "unknown topology 'rign'"),
    ({"data_type": "faces"}, "unknown data_type 'faces'"),
    ({"compression_rank": 0}, "optimizer_rank must be >= 1"),  # the original name, read as optimizer_rank
    ({"algorithm": "topk_choco", "keep_ratio": 1.5}, r"optimizer_keep_ratio must be in \(0, 1\]"),
    ({"algorithm": "topk_choco", "optimizer_keep_ratio": 0.0}, r"optimizer_keep_ratio must be in \(0, 1\]"),
    ({"n_workers": "eight"}, "n_workers must be an integer"),
    ({"diffusion_rate": -1.0}, "diffusion_rate must be a positive number"),
    ({"algorithm": "power_gossip_signs", "compression_rank": 2}, "optimizer_round_weights .* rank 1 only"),
    ({"algorithm": "sign_choco", "optimizer_compressor": "qsgd"}, "fixes optimizer_compressor='sign-and-norm'.*algorithm=choco"),
    ({"compression_rank": 2, "optimizer_rank": 3}, "name the same setting"),
    ({"algorithm": "sign_choco", "topology": "unidirectional_ring"}, "needs a symmetric topology"),
    ({"data_type": "file"}, "data_type=file needs data_path"),
    ({"data_type": "sparse", "matrix_size": 2}, "matrix_size\\^2 >= n_workers"),
    ({"num_steps": None}, "num_steps must not be null"),
    ({"n_workers": 1}, "n_workers must be >= 2"),
    ({"theta": []}, "optimizer_theta must not be an empty list"),
    ({"algorithm": "relay-sum", "topology": "chain"}, "algorithm=relay-sum relays models that start equal"),
    ({"algorithm": "d2"}, "optimizer_diffusion_rate must leave the mixing matrix's smallest eigenvalue above -1/3"),
    ({"algorithm": "gradient-tracking", "topology": "double_binary_trees"}, "not one mixing matrix"),
])
def test_bad_input_is_a_clear_error_before_any_work(tmp_path, overrides, message):
    with pytest.raises(configuration.ConfigError, match=message):
        run_main(tmp_path / "out", **overrides)
    assert not (tmp_path / "out").exists()


def test_unknown_key_is_a_clear_error(tmp_path):
    saved = gossip_run.config
    gossip_run.config = dict(gossip_run.DEFAULTS, diffusion=0.5)
    try:
        with pytest.raises(configuration.ConfigError, match="unknown config key 'diffusion'.*diffusion_rate"):
            gossip_run.main()
    finally:
        gossip_run.config = saved


def test_command_line_reads_yaml_then_arguments(tmp_path, monkeypatch, capsys):
    (tmp_path / "base.yaml").write_text("algorithm: fp_choco\nmatrix_size: 8\nnum_steps: 500\n")
    out = tmp_path / "out"
    run_cli(monkeypatch, [str(tmp_path / "base.yaml"), "num_steps=20", "diffusion_rate=0.5", f"output_dir={out}"])
    written = configuration.apply_overrides(gossip_run.DEFAULTS, [str(out / "config.yaml")])
    assert written == dict(gossip_run.DEFAULTS, algorithm="fp_choco", matrix_size=8, num_steps=20, optimizer_diffusion_rate=0.5)
    assert named(runs.read_metrics(str(out)), "final_error")[0]["step"] == 20
    assert "fp_choco gamma=0.5: final error" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        run_cli(monkeypatch, ["n_workers=eight", f"output_dir={tmp_path / 'bad'}"])
    assert exit_info.value.code != 0
    assert "n_workers must be an integer" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize("name", sorted(os.listdir(os.path.join(ROOT, "experiments", "configs", "gossip"))))
def test_example_configs_are_valid(name):
    config = configuration.apply_overrides(gossip_run.DEFAULTS, [os.path.join(ROOT, "experiments", "configs", "gossip", name)])
    if config["data_type"] != "images" or os.path.exists("/usr/share/datasets/fashion-mnist"):
        gossip_run.check(config)


def test_bad_input_under_mpirun_fails_on_every_process(tmp_path):
    result = run_mpi(2, ["gossip_run.py", "algorithm=power_gosip", f"output_dir={tmp_path / 'out'}"], timeout=90, check=False)
    assert result.returncode != 0
    for rank in (0, 1):
        assert f"configuration error (process {rank}): unknown algorithm 'power_gosip'" in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()


# --- the same curves in every launch layout ----------------------------------------------------
LAYOUT_RUNS = {
    "power_gossip": ["algorithm=power_gossip", "compression_rank=2", "matrix_size=12", "num_steps=100"],
    "qsgd_choco": ["algorithm=qsgd_choco", "matrix_size=12", "num_steps=100",
                   "hyperparameter_num_samples=2", "hyperparameter_range_min=0.01"],
    "moniqua": ["algorithm=moniqua", "matrix_size=12", "num_steps=100", "hyperparameter_num_samples=2",
                "hyperparameter_range_min=0.01", "theta_num_samples=2", "theta_range_min=0.5", "theta_range_max=4"],
    # the simulated clock: every process feeds it the same bits, messages, stragglers and lost messages
    "power_gossip_clock": ["algorithm=power_gossip", "optimizer_num_iterations=2", "matrix_size=12", "num_steps=100",
                           "message_loss_probability=0.1", "simulated_clock=true", "worker_step_seconds=1e-4",
                           "straggler_probability=0.3", "message_timeout_s=0.01", "network_bandwidth_bits_per_s=1e6"],
}
# One mpirun per layout runs every case through the real command line (gossip_run.py's __main__).
MANY_RUNS = """
import runpy, sys
for arguments in {runs!r}:
    sys.argv = ["gossip_run.py"] + arguments
    runpy.run_path("gossip_run.py", run_name="__main__")
"""


def assert_same_records(got, want):
    """Every record the same, bit for bit: names, steps, bits, messages, tags and errors (the
    README's layout contract: the layouts sum in the same order)."""
    assert got == want


@pytest.mark.parametrize("num_processes,n_workers", [(4, 4), (2, 8)])
def test_mpirun_writes_the_same_curves_as_one_process(tmp_path, monkeypatch, num_processes, n_workers):
    arguments = {name: arguments + [f"n_workers={n_workers}"] for name, arguments in LAYOUT_RUNS.items()}
    script = MANY_RUNS.format(runs=[a + [f"output_dir={tmp_path / 'mpi' / name}"] for name, a in arguments.items()])
    run_mpi(num_processes, ["-c", script], timeout=180)
    for name, a in arguments.items():
        run_cli(monkeypatch, a + [f"output_dir={tmp_path / 'single' / name}"])
        single = runs.read_metrics(str(tmp_path / "single" / name))
        assert_same_records(runs.read_metrics(str(tmp_path / "mpi" / name)), single)
        assert min(r["value"] for r in named(single, "final_error")) < named(single, "error")[0]["value"]
    assert named(runs.read_metrics(str(tmp_path / "single" / "moniqua")), "diverged")  # the stop is taken together


def test_one_vocabulary_and_the_older_names(tmp_path):
    """Both entrypoints name a method's hyper-parameters optimizer_<name>; the original
    consensus code's names (and each entrypoint's method key) are read as those."""
    import train

    (tmp_path / "old.yaml").write_text("compression_rank: 2\ncompression_num_iterations: 3\nkeep_ratio: 0.5\n"
                                       "qsgd_levels: 4\ndiffusion_rate: [0.1, 0.2]\ntheta: 2.0\n")
    config = gossip_run.check(configuration.apply_overrides(gossip_run.DEFAULTS, [str(tmp_path / "old.yaml"), "optimizer=moniqua"]))
    assert {key: config[key] for key in ("algorithm", "optimizer_rank", "optimizer_num_iterations", "optimizer_keep_ratio",
                                         "optimizer_qsgd_levels", "optimizer_diffusion_rate", "optimizer_theta")} == \
        {"algorithm": "moniqua", "optimizer_rank": 2, "optimizer_num_iterations": 3, "optimizer_keep_ratio": 0.5,
         "optimizer_qsgd_levels": 4, "optimizer_diffusion_rate": [0.1, 0.2], "optimizer_theta": 2.0}
    cfg = train.validated(configuration.apply_overrides(train._DEFAULTS, ["algorithm=power_gossip", "compression_rank=2"]))
    assert (cfg["optimizer"], cfg["optimizer_rank"]) == ("power-gossip", 2)
    edited = dict(train._DEFAULTS, keep_ratio=0.2)  # a config dict edited in Python with an older name
    assert train.validated(edited)["optimizer_keep_ratio"] == 0.2


def test_a_sweep_prints_the_initial_error_and_its_best_setting(tmp_path, capsys):
    records = run_main(tmp_path, algorithm="sign_choco", optimizer_diffusion_rate=[50.0, 0.05, 0.2], **SMALL)
    out = capsys.readouterr().out
    initial = named(records, "error")[0]["value"]
    finals = {r["tags"]["diffusion_rate"]: r["value"] for r in named(records, "final_error")}
    best = min(finals, key=finals.get)
    assert f"x the initial {initial:.4g}" in out and "diverged" in out
    assert f"best of 3 settings: sign_choco gamma={best:.4g}, final error {finals[best]:.4g}" in out


def test_a_sweep_draws_every_setting_and_marks_the_best(tmp_path, capsys):
    records = run_main(tmp_path, algorithm="sign_choco", optimizer_diffusion_rate=[50.0, 0.05, 0.2], **SMALL)
    assert f"figure {tmp_path / 'error_vs_bits.png'}" in capsys.readouterr().out
    png = (tmp_path / "error_vs_bits.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and matplotlib.image.imread(str(tmp_path / "error_vs_bits.png")).std() > 0
    finals = {r["tags"]["diffusion_rate"]: r["value"] for r in named(records, "final_error")}
    best = min(finals, key=finals.get)
    axis = figures.consensus_figure(records, "title").axes[0]
    legend = [text.get_text() for text in axis.get_legend().get_texts()]
    assert sorted(legend) == sorted([f"best: gamma={best:.4g}"] + [f"gamma={g:.4g}" for g in finals if g != best])
    assert (axis.get_xscale(), axis.get_yscale()) == ("log", "log")
    drawn = [line for line in axis.get_lines() if len(line.get_xdata())]
    assert len({(str(line.get_color()), line.get_linestyle(), line.get_marker()) for line in drawn}) == len(drawn)


def test_a_large_sweep_names_every_curve_by_colour_and_style():
    """More settings than legend entries: a curve's colour is its gamma on a colour bar, its line
    style and marker its theta (named in the legend), the best one in black, named."""
    gammas, thetas = [0.01 * 2 ** k for k in range(6)], [0.5, 2.0]
    records = []
    for gamma in gammas:
        for theta in thetas:
            tags = {"algorithm": "moniqua", "diffusion_rate": gamma, "theta": theta}
            errors = [10.0 * (1 - gamma / (1 + theta)) ** step for step in range(6)]
            records += [{"name": "error", "step": step, "value": error, "bits": 64.0 * step, "messages": 2.0 * step,
                         "tags": tags} for step, error in enumerate(errors)]
            records.append({"name": "final_error", "step": 5, "value": errors[-1], "bits": 320.0, "messages": 10.0, "tags": tags})
    figure = figures.consensus_figure(records, "title")
    axis, colour_bar = figure.axes
    assert colour_bar.get_ylabel() == "gamma (optimizer_diffusion_rate)"
    assert colour_bar.get_ylim() == pytest.approx((gammas[0], gammas[-1]))
    legend = [text.get_text() for text in axis.get_legend().get_texts()]
    assert legend == ["theta=0.5", "theta=2", f"best: gamma={gammas[-1]:.4g} theta=0.5"]
    drawn = [line for line in axis.get_lines() if len(line.get_xdata())]
    assert len(drawn) == 12 and drawn[-1].get_color() == "black"
    colours = {tuple(line.get_color()) for line in drawn[:-1]}
    shapes = {(line.get_linestyle(), line.get_marker()) for line in drawn[:-1]}
    assert len(colours) == len(gammas) and len(shapes) == len(thetas)


def test_a_run_writes_its_summary_and_tensorboard(tmp_path):
    records = run_main(tmp_path, algorithm="sign_choco", optimizer_diffusion_rate=[50.0, 0.05, 0.2], **SMALL)
    best = min(named(records, "final_error"), key=lambda r: r["value"])
    gamma = best["tags"]["diffusion_rate"]
    with open(tmp_path / "summary.json") as f:
        summary = json.load(f)
    assert summary == {"best_setting": f"sign_choco gamma={gamma:.4g}", "final_error": best["value"],
                       "initial_error": named(records, "error", diffusion_rate=gamma)[0]["value"], "diffusion_rate": gamma,
                       "theta": None, "step": 60, "mb_per_worker": best["bits"] / 8e6, "settings": 3, "num_steps": 60,
                       "wall_time_s": summary["wall_time_s"]}
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    curve = named(records, "error", diffusion_rate=gamma)
    assert [(e.step, e.value) for e in events.Scalars(f"error/sign_choco/{gamma}")] == \
        [(r["step"], pytest.approx(r["value"])) for r in curve]
    assert [e.step for e in events.Scalars(f"by_kB_sent/error/sign_choco/{gamma}")] == [round(r["bits"] / 8e3) for r in curve]


def test_overlapped_push_sum_hides_its_messages_behind_the_compute(tmp_path):
    """1 s of compute, a message of 6 x 6 + 1 float32 in 0.5 s: push-sum sends after its step (1.5 s a
    step); with one_step_delay a round's messages are needed a step later (clock.py's overlap: 1 s a step)."""
    network = dict(algorithm="push-sum", topology="one_peer_exponential", n_workers=4, matrix_size=6, num_steps=20,
                   simulated_clock=True, worker_step_seconds=1.0, network_latency_s=0.0,
                   network_bandwidth_bits_per_s=2 * 37 * 32.0)
    for delay, seconds in ((False, 30.0), (True, 20.0)):
        records = run_main(tmp_path / str(delay), **network, optimizer_one_step_delay=delay)
        assert [r["simulated_time_s"] for r in named(records, "final_error")] == [seconds]


def test_the_simulated_clock_times_every_step_of_every_setting(tmp_path):
    """D-PSGD on a 4-ring of 6 x 6 float32 matrices: 1152-bit messages, 0.25 s each at 4608 bit/s,
    then 0.125 s of latency: each step's second message is in 0.625 s after it began (clock.py,
    eq. overlap); with 1 s of compute per step, the compute sets the pace."""
    network = dict(algorithm="dpsgd", n_workers=4, matrix_size=6, num_steps=20, simulated_clock=True,
                   network_latency_s=0.125, network_bandwidth_bits_per_s=4608.0, optimizer_diffusion_rate=[1.0, 0.5])
    records = run_main(tmp_path / "network", **network)
    for gamma in (1.0, 0.5):  # each setting's clock starts at 0
        assert [(r["step"], r["simulated_time_s"]) for r in named(records, "error", diffusion_rate=gamma)] == \
            [(step, 0.625 * step) for step in list(range(11)) + [20]]
    with open(tmp_path / "network" / "summary.json") as f:
        assert json.load(f)["simulated_time_s"] == 12.5
    compute = run_main(tmp_path / "compute", **network | {"worker_step_seconds": 1.0})
    assert [r["simulated_time_s"] for r in named(compute, "final_error")] == [20.0, 20.0]
    assert all("simulated_time_s" not in r for r in run_main(tmp_path / "off", **SMALL))  # off by default
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "network" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("by_simulated_us/error/dpsgd/1.0")][-2:] == [6_250_000, 12_500_000]


def test_without_tensorboard_a_run_writes_the_rest(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` of it raises ImportError, as when absent
    run_main(tmp_path, algorithm="uncompressed", **SMALL)
    assert sorted(os.listdir(tmp_path)) == [".lock", "config.yaml", "error_vs_bits.png", "metrics.jsonl", "summary.json"]
