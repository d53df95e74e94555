"""Figures of runs, drawn from their metrics.jsonl records, with the communication axis
of the PowerGossip paper (Vogels, Karimireddy, Jaggi 2020): quantities against the
data each worker has sent, on a log scale.

- `training_figure`: train.py's `output_dir/curves.png`, test accuracy and training
  loss against epochs and against MB sent per worker, the spread over workers shaded.
- `consensus_figure`: gossip_run.py's `output_dir/error_vs_bits.png`, the consensus
  error relative to its start against bits sent per worker, every setting of a sweep,
  the best one marked.
`save(figure, path)` writes either (`write_png` into an open file).
The studies in experiments/ draw their figures with the same helpers.

Figures are built with matplotlib's object interface (no pyplot, no global state), so
drawing one never changes the backend or the figures of the program that trains.
"""
from __future__ import annotations

import math
import os

from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

MEGABYTE_BITS = 8e6
# Fixed margins (fractions of the figure) with room for the widest tick labels these figures get:
# a tight layout measures every label before drawing, a third of the time to draw a run's figure.
TRAINING_MARGINS = dict(left=0.075, right=0.985, bottom=0.07, top=0.945, wspace=0.17, hspace=0.18)
CONSENSUS_MARGINS = dict(left=0.15, right=0.975, bottom=0.12, top=0.93)


def curve(records: list[dict], name: str, split: str) -> list[tuple[float, float, float]]:
    """[(epoch, value, MB sent per worker)] of a worker-averaged metric of train.py."""
    return [(r["epoch"], r["value"], r["bits"] / MEGABYTE_BITS) for r in records
            if r["name"] == name and r["tags"].get("split") == split and "worker" not in r["tags"]]


def worker_spread(records: list[dict], name: str, split: str) -> list[tuple[float, float, float, float]]:
    """[(epoch, MB sent per worker, lowest, highest)] over the workers' own records of a metric."""
    by_epoch: dict[float, list[dict]] = {}
    for r in records:
        if r["name"] == name and r["tags"].get("split") == split and "worker" in r["tags"]:
            by_epoch.setdefault(r["epoch"], []).append(r)
    return [(epoch, group[0]["bits"] / MEGABYTE_BITS, min(r["value"] for r in group), max(r["value"] for r in group))
            for epoch, group in sorted(by_epoch.items())]


def plot_against_epochs_and_megabytes(by_epoch, by_megabytes, points: list[tuple[float, float, float]], **style) -> str:
    """One `curve` on the pair of panels, in one colour; returns the colour."""
    epochs, values, megabytes = zip(*points)
    line, = by_epoch.plot(epochs, values, marker=".", **style)
    by_megabytes.plot(megabytes, values, marker=".", **style | {"color": line.get_color()})
    return line.get_color()


def label_epoch_and_megabyte_axes(by_epoch, by_megabytes, ylabel: str, xscale: str = "log") -> None:
    """The pair of panels every training figure has: a metric against epochs, and against MB sent."""
    by_epoch.set(xlabel="epoch", ylabel=ylabel)
    by_megabytes.set(xlabel="MB sent per worker", ylabel=ylabel, xscale=xscale)
    if xscale == "log":  # plain numbers ("2", "0.5", "3e+04") instead of 2 x 10^0
        by_megabytes.xaxis.set_major_formatter(LogFormatter())
        by_megabytes.xaxis.set_minor_formatter(LogFormatter(minor_thresholds=(2, 0.5)))
    for axis in (by_epoch, by_megabytes):
        axis.grid(alpha=0.3)


def save(figure: Figure, path: str) -> str:
    """Writes `figure` as a PNG file at `path` (making its folder); returns `path`. The figure
    comes laid out: with fixed margins (this module's figures) or `layout="tight"` (the studies')."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    write_png(figure, path)
    return path


def write_png(figure: Figure, file) -> None:
    """`figure` as PNG into `file`, a path or an open binary file (runs.write_file's, which
    replaces a run's figure atomically)."""
    figure.savefig(file, format="png", dpi=120)


def training_figure(records: list[dict], title: str) -> Figure:
    """train.py's figure: rows test accuracy and training loss, columns against epochs and
    against MB sent per worker (log scale). Lines are the mean over workers (and the
    averaged model's test accuracy); the shade spans the workers' lowest to highest value."""
    figure = Figure(figsize=(12, 8.5))
    axes = figure.subplots(2, 2, gridspec_kw=TRAINING_MARGINS)
    rows = [("accuracy", [("test", "workers' models (mean)"), ("test_avg", "averaged model")], "test accuracy"),
            ("loss", [("train", "workers (mean)")], "training loss")]
    for (name, splits, ylabel), (by_epoch, by_megabytes) in zip(rows, axes):
        for split, label in splits:
            points = curve(records, name, split)
            if not points:
                continue
            color = plot_against_epochs_and_megabytes(by_epoch, by_megabytes, points, label=label)
            spread = worker_spread(records, name, split)
            if spread:
                epochs, megabytes, low, high = zip(*spread)
                shade = dict(color=color, alpha=0.2, linewidth=0)
                by_epoch.fill_between(epochs, low, high, label="spread over workers", **shade)
                by_megabytes.fill_between(megabytes, low, high, **shade)
        label_epoch_and_megabyte_axes(by_epoch, by_megabytes, ylabel,
                                      xscale="log" if all(r["bits"] > 0 for r in records) else "symlog")
        if by_epoch.get_legend_handles_labels()[0]:  # evaluation may be off: nothing to name
            by_epoch.legend(fontsize=8)
    figure.suptitle(title)
    return figure


def best_setting(records: list[dict]) -> dict | None:
    """The tags of gossip_run's setting with the lowest final error (None without one)."""
    finals = [r for r in records if r["name"] == "final_error"]
    if not finals:
        return None
    return min(finals, key=lambda r: r["value"] if math.isfinite(r["value"]) else math.inf)["tags"]


def error_curve(records: list[dict], tags: dict) -> list[tuple[float, float]]:
    """[(bits sent per worker, consensus error)] of one gossip_run setting."""
    return [(r["bits"], r["value"]) for r in records if r["name"] == "error" and r["tags"] == tags]


def plot_relative_error(axis, points: list[tuple[float, float]], **style) -> None:
    """Error / starting error against bits sent per worker, on log scales (the first
    point, with no bits sent, has no place on a log axis; nor has an error of 0; workers
    that agree from the start have no curve)."""
    start = points[0][1]
    if start == 0:
        return
    shown = [(bits, error / start) for bits, error in points if bits > 0 and error > 0]
    if shown:
        axis.plot(*zip(*shown), **style)


def label_error_axes(axis, title: str) -> None:
    axis.set(xscale="log", yscale="log", xlabel="bits sent per worker", ylabel="error / starting error", title=title)
    axis.grid(alpha=0.3)


def consensus_figure(records: list[dict], title: str) -> Figure:
    """gossip_run's figure: every setting's error against bits, the best one (lowest final
    error) drawn bold and named in the legend."""
    best = best_setting(records)
    figure = Figure(figsize=(7, 5))
    axis = figure.subplots(gridspec_kw=CONSENSUS_MARGINS)
    settings = []
    for r in records:
        if r["name"] == "final_error" and r["tags"] not in settings:
            settings.append(r["tags"])
    few = len(settings) <= 10  # a legend entry per setting; more would hide the curves
    label_others = "other settings"
    for tags in settings:
        points = error_curve(records, tags)
        if not points:
            continue
        setting = f"gamma={tags['diffusion_rate']:.4g}" + ("" if tags.get("theta") is None else f" theta={tags['theta']:.4g}")
        if tags == best and len(settings) > 1:
            plot_relative_error(axis, points, color="black", linewidth=2.5, label=f"best: {setting}", zorder=3)
        else:
            label = setting if few else label_others
            label_others = "_nolegend_"  # matplotlib leaves such labels out of the legend
            plot_relative_error(axis, points, linewidth=1, alpha=0.7 if len(settings) > 1 else 1,
                                color=None if few else "tab:blue", label=label)
    label_error_axes(axis, title)
    if axis.get_legend_handles_labels()[0]:  # workers that agree from the start draw nothing to name
        axis.legend(fontsize=7, ncol=2)
    return figure
