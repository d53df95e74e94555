"""Runs side by side: `python -m powergossip.plot` and `python -m powergossip.summary` on tiny
runs of both entrypoints, made once for the module."""
import json
import os
import shutil
import subprocess
import sys

import matplotlib.image
import pytest

import gossip_run
from powergossip import figures, plot, results, runs, summary
from tests.launch import ROOT
from tests.test_data import fake_fmnist
from tests.test_train import common
from tests.train_runs import run


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """train.py runs pg1 (seed 1) and pg2 (seed 2, two power iterations), `stopped` (pg1 as if
    stopped after its first epoch), and gossip_run.py runs `choco` (a sweep of two gammas),
    `exact` (uncompressed gossip) and `timed` (exact, on the simulated clock)."""
    root = tmp_path_factory.mktemp("runs")
    fake_fmnist(root / "data", n_train=256, n_test=32, gz_test=True)
    tiny = {"n_workers": 2, "max_batches_per_epoch": 2}
    run(str(root / "pg1"), common(str(root / "data"), seed=1, **tiny))
    run(str(root / "pg2"), common(str(root / "data"), seed=2, optimizer_num_iterations=2, **tiny))
    shutil.copytree(root / "pg1", root / "stopped")
    os.remove(root / "stopped" / "summary.json")
    kept = [r for r in runs.read_metrics(str(root / "stopped")) if r["epoch"] == 1]
    (root / "stopped" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in kept))
    for name, settings in {"choco": {"algorithm": "sign_choco", "optimizer_diffusion_rate": [0.05, 0.2]},
                           "exact": {"algorithm": "uncompressed"},
                           "timed": {"algorithm": "uncompressed", "simulated_clock": True}}.items():
        gossip_run.config = dict(gossip_run.DEFAULTS, matrix_size=10, num_steps=30, **settings)
        gossip_run.output_dir = str(root / name)
        gossip_run.main()
    gossip_run.config = dict(gossip_run.DEFAULTS)
    return root


def test_the_plot_overlays_the_runs_named_by_what_differs(folder, monkeypatch):
    monkeypatch.chdir(folder)
    out = plot.main(["pg1", "pg2", "--x", "mb", "--out", "both.png"])
    image = matplotlib.image.imread(out)
    lines = 2  # of legend
    assert image.shape == (round(120 * (plot.HEIGHT + lines * plot.LEGEND_LINE)), round(120 * plot.WIDTH), 4)
    assert image.std() > 0

    found = results.read_all(["pg1", "pg2"])
    axis = plot.comparison_figure(found, None, plot.X_AXES["mb"]).axes[0]
    legend = [text.get_text() for text in axis.figure.legends[0].get_texts()]
    assert legend == ["optimizer_num_iterations=1 seed=1", "optimizer_num_iterations=2 seed=2"]
    for line, name in zip(axis.get_lines(), ("pg1", "pg2")):
        averaged = [r for r in runs.read_metrics(name) if r["name"] == "accuracy" and r["tags"] == {"split": "test_avg"}]
        assert list(line.get_xdata()) == [r["bits"] / 8e6 for r in averaged]
        assert list(line.get_ydata()) == [r["value"] for r in averaged]
    assert (axis.get_xscale(), axis.get_xlabel()) == ("log", "MB sent per worker")


def test_the_plot_of_consensus_runs_draws_the_best_setting_against_steps(folder, monkeypatch):
    monkeypatch.chdir(folder)
    found = results.read_all(["choco", "exact"])
    axis = plot.comparison_figure(found, None, plot.X_AXES["epochs"]).axes[0]
    records = runs.read_metrics("choco")
    best = figures.best_setting(records)
    error = [r for r in records if r["name"] == "error" and r["tags"] == best]
    assert list(axis.get_lines()[0].get_xdata()) == [r["step"] for r in error]
    assert list(axis.get_lines()[0].get_ydata()) == [r["value"] for r in error]
    legend = [text.get_text() for text in axis.figure.legends[0].get_texts()]
    assert legend[0].startswith("algorithm=sign_choco") and legend[0].endswith(f"(best: gamma={best['diffusion_rate']:.4g})")
    assert legend[1].startswith("algorithm=uncompressed")
    assert (axis.get_xlabel(), axis.get_yscale()) == ("step", "log")


def test_the_plot_draws_runs_on_the_simulated_clock_against_their_simulated_time(folder, monkeypatch):
    monkeypatch.chdir(folder)
    plot.main(["timed", "--x", "time", "--out", "timed.png"])
    axis = plot.comparison_figure(results.read_all(["timed"]), None, plot.X_AXES["time"]).axes[0]
    error = [r for r in runs.read_metrics("timed") if r["name"] == "error"]
    assert list(axis.get_lines()[0].get_xdata()) == [r["simulated_time_s"] for r in error] and error[-1]["simulated_time_s"] > 0
    assert axis.get_xlabel() == "simulated time (s)"


def test_the_summary_has_a_row_per_run_with_its_final_values(folder, monkeypatch, capsys):
    monkeypatch.chdir(folder)
    text = summary.main(["pg1", "pg2", "stopped"])
    assert capsys.readouterr().out == text
    header, rule, *rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in text.splitlines()]
    assert header == ["run", "method", "settings", "epochs", "final accuracy/test_avg", "MB sent / worker / epoch", "status"]
    assert len({len(line) for line in text.splitlines()}) == 1  # aligned columns
    for row, name, status in zip(rows, ("pg1", "pg2", "stopped"), ("finished", "finished", "epoch 1/2")):
        last = [r for r in runs.read_metrics(name) if r["name"] == "accuracy" and r["tags"] == {"split": "test_avg"}][-1]
        config = results.read(name).config
        settings = f"optimizer_num_iterations={config['optimizer_num_iterations']} seed={config['seed']}"
        assert row == [name, "power-gossip", settings, "2", f"{last['value']:.2%}", f"{last['bits'] / 8e6 / last['epoch']:.4g}",
                       status]
    with open("pg1/summary.json") as f:
        assert rows[0][5] == f"{json.load(f)['mb_per_worker_per_epoch']:.4g}"

    rows = [line.split("|")[1:-1] for line in summary.main(["choco", "exact"]).splitlines()[2:]]
    with open("choco/summary.json") as f:
        choco = json.load(f)
    assert [cell.strip() for cell in rows[0]][3:] == ["30", f"{choco['final_error']:.4g}", f"{choco['mb_per_worker'] / 30:.4g}",
                                                    f"finished (best: gamma={choco['diffusion_rate']:.4g})"]


@pytest.mark.parametrize("command, arguments, message", [
    (plot, ["data"], "data is not a run's folder: it has no config.yaml and no metrics.jsonl"),
    (summary, ["missing"], "missing is not a folder"),
    (plot, [], "the following arguments are required: RUN_DIR"),
    (plot, ["pg1", "--x", "seconds"], "argument --x: invalid choice: 'seconds'"),
    (plot, ["timed", "exact", "--x", "time"], "--x time: exact has no simulated times (its run had simulated_clock=false)"),
    (summary, ["pg1", "--metric", "nonsense"], "--metric nonsense: pg1 records loss/train, accuracy/train"),
    (plot, ["pg1", "--metric", "consensus_distance"], "records it as consensus_distance/params_only, "
                                                      "consensus_distance/full_state_vector: name one"),
    (plot, ["pg1", "choco"], "choco (gossip_run.py) and pg1 (train.py): their metrics share no axis"),
    (plot, ["pg1"], "comparison.png exists: name the file to write with --out"),
    (plot, ["pg1", "--out", "nowhere/figure.png"], "the folder"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(folder, monkeypatch, capsys, command, arguments, message):
    monkeypatch.chdir(folder)
    (folder / "comparison.png").write_text("the user's own file")
    before = sorted(os.listdir(folder))
    with pytest.raises(SystemExit) as stopped:
        command.main(arguments)
    error = capsys.readouterr().err
    assert stopped.value.code == 2 and error.count("\n") == 1 and message in error, error
    assert error.startswith(f"python -m powergossip.{command.__name__.split('.')[-1]}: ")
    assert sorted(os.listdir(folder)) == before and (folder / "comparison.png").read_text() == "the user's own file"


def test_the_commands_run_as_printed(folder):
    """`python -m powergossip.plot` from the repository, as the README prints it."""
    out = folder / "fresh.png"
    result = subprocess.run([sys.executable, "-m", "powergossip.plot", str(folder / "pg1"), str(folder / "pg2"),
                             "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout == f"figure {out}\n", result.stderr
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_distinct_styles_tell_every_curve_apart():
    for count in (1, 3, 12, 40):
        styles = figures.distinct_styles(count)
        assert len({(style["color"], style["linestyle"], style["marker"]) for style in styles}) == count
        assert len({style["markevery"] for style in styles}) == count  # markers of coinciding curves interleave
