"""Figures of runs, drawn from their metrics.jsonl records, with the communication axis
of the PowerGossip paper (Vogels, Karimireddy, Jaggi 2020): quantities against the
data each worker has sent, on a log scale.

- `training_figure`: train.py's `output_dir/curves.png`, test accuracy and training
  loss against epochs and against MB sent per worker (and against the simulated time,
  when the simulated clock ran), the spread over workers shaded.
- `consensus_figure`: gossip_run.py's `output_dir/error_vs_bits.png`, the consensus
  error relative to its start against bits sent per worker, every setting of a sweep
  named (in the legend, or by a colour bar of gamma), the best one marked.
`save(figure, path)` writes either (`write_png` into an open file). `distinct_styles`
keeps curves that overlap apart. The studies in experiments/ and
`python -m powergossip.plot` draw their figures with the same helpers.

Figures are built with matplotlib's object interface (no pyplot, no global state), so
drawing one never changes the backend or the figures of the program that trains.
"""
from __future__ import annotations

import math
import os

import matplotlib
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.ticker import LogFormatter

MEGABYTE_BITS = 8e6
# Fixed margins (fractions of the figure) with room for the widest tick labels these figures get:
# a tight layout measures every label before drawing, a third of the time to draw a run's figure.
TRAINING_MARGINS = dict(left=0.075, right=0.985, bottom=0.07, top=0.945, wspace=0.17, hspace=0.18)
CONSENSUS_MARGINS = dict(left=0.15, right=0.975, bottom=0.12, top=0.93)
FEW_SETTINGS = 10  # consensus_figure: a legend entry per setting up to this many; beyond, a colour bar of gamma
LINE_STYLES = ("-", "--", "-.", ":")  # distinct_styles'
MARKERS = ("o", "s", "^", "v", "D", "P", "X", "*")


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
    if xscale == "log":
        plain_log_ticks(by_megabytes.xaxis)
    for axis in (by_epoch, by_megabytes):
        axis.grid(alpha=0.3)


def plain_log_ticks(axis) -> None:
    """A log-scale axis's ticks as plain numbers ("2", "0.5", "3e+04") instead of 2 x 10^0."""
    axis.set_major_formatter(LogFormatter())
    axis.set_minor_formatter(LogFormatter(minor_thresholds=(2, 0.5)))


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
    against MB sent per worker (log scale), and a third against the simulated time when the
    records have one (simulated_clock=true). Lines are the mean over workers (and the
    averaged model's test accuracy); the shade spans the workers' lowest to highest value."""
    timed = any("simulated_time_s" in r for r in records)
    figure = Figure(figsize=(17, 8.5) if timed else (12, 8.5))
    axes = figure.subplots(2, 3 if timed else 2, gridspec_kw=TRAINING_MARGINS)
    rows = [("accuracy", [("test", "workers' models (mean)"), ("test_avg", "averaged model")], "test accuracy"),
            ("loss", [("train", "workers (mean)")], "training loss")]
    for (name, splits, ylabel), (by_epoch, by_megabytes, *by_time) in zip(rows, axes):
        for split, label in splits:
            points = curve(records, name, split)
            if not points:
                continue
            color = plot_against_epochs_and_megabytes(by_epoch, by_megabytes, points, label=label)
            seconds = {r["epoch"]: r.get("simulated_time_s", math.nan) for r in records if r["name"] == name}
            for axis in by_time:
                axis.plot([seconds[epoch] for epoch, _, _ in points], [value for _, value, _ in points], marker=".",
                          color=color)
            spread = worker_spread(records, name, split)
            if spread:
                epochs, megabytes, low, high = zip(*spread)
                shade = dict(color=color, alpha=0.2, linewidth=0)
                by_epoch.fill_between(epochs, low, high, label="spread over workers", **shade)
                by_megabytes.fill_between(megabytes, low, high, **shade)
                for axis in by_time:
                    axis.fill_between([seconds[epoch] for epoch in epochs], low, high, **shade)
        label_epoch_and_megabyte_axes(by_epoch, by_megabytes, ylabel,
                                      xscale="log" if all(r["bits"] > 0 for r in records) else "symlog")
        for axis in by_time:
            axis.set(xlabel="simulated time (s)", ylabel=ylabel)
            axis.grid(alpha=0.3)
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
    """gossip_run's figure: every setting's error against bits, each curve named. Up to
    FEW_SETTINGS settings: a legend entry each, each in a style of its own (distinct_styles).
    More (a sweep's grid): the colour gives gamma on a log scale, read off a colour bar, and
    where theta varies too, a line style and marker per theta, named in the legend. The best
    setting (lowest final error) is drawn bold in black, on top, and named in the legend."""
    best = best_setting(records)
    figure = Figure(figsize=(7, 5))
    axis = figure.subplots(gridspec_kw=CONSENSUS_MARGINS)
    settings = []
    for r in records:
        if r["name"] == "final_error" and r["tags"] not in settings:
            settings.append(r["tags"])
    curves = [(tags, error_curve(records, tags)) for tags in settings]
    others = [(tags, points) for tags, points in curves if points and not (tags == best and len(settings) > 1)]
    if len(settings) <= FEW_SETTINGS:
        for (tags, points), style in zip(others, distinct_styles(len(others))):
            plot_relative_error(axis, points, label=setting_name(tags), linewidth=1, **style)
    else:
        gammas = sorted({tags["diffusion_rate"] for tags in settings})
        thetas = sorted({tags["theta"] for tags in settings if tags.get("theta") is not None})
        colours = ScalarMappable(LogNorm(gammas[0], gammas[-1]), "viridis") if len(gammas) > 1 else None
        shapes = dict(zip(thetas, distinct_styles(len(thetas)))) if len(thetas) > 1 else {}
        for tags, points in others:
            shape = {key: value for key, value in shapes.get(tags.get("theta"), {}).items() if key != "color"}
            colour = "tab:blue" if colours is None else colours.to_rgba(tags["diffusion_rate"])
            plot_relative_error(axis, points, linewidth=1, **shape | {"color": colour, "alpha": 0.8})
        if colours is not None:
            figure.colorbar(colours, ax=axis, label="gamma (optimizer_diffusion_rate)")
        for theta, shape in shapes.items():  # legend entries only: the line style and marker of each theta
            axis.plot([], [], **shape | {"color": "gray", "label": f"theta={theta:.4g}"})
    best_points = next((points for tags, points in curves if tags == best), [])
    if len(settings) > 1 and best_points:
        plot_relative_error(axis, best_points, color="black", linewidth=2.5, label=f"best: {setting_name(best)}", zorder=3)
    label_error_axes(axis, title)
    if axis.get_legend_handles_labels()[0]:  # workers that agree from the start draw nothing to name
        axis.legend(fontsize=7, ncol=2)
    return figure


def setting_name(tags: dict) -> str:
    """'gamma=0.2' or 'gamma=0.2 theta=1.5': a gossip_run setting, from its records' tags."""
    return f"gamma={tags['diffusion_rate']:.4g}" + ("" if tags.get("theta") is None else f" theta={tags['theta']:.4g}")


def distinct_styles(count: int) -> list[dict]:
    """`count` matplotlib line styles that keep curves apart where they overlap: each its own
    colour (tab10; tab20's beyond 10), line style and marker, the markers spaced along the line
    from a start that shifts from curve to curve (curves that coincide still show every
    marker), the lines a little transparent."""
    if count <= 10:
        colours = matplotlib.colormaps["tab10"].colors
    else:  # tab20's dark colours, then the light ones: neighbours in the list differ in hue
        colours = matplotlib.colormaps["tab20"].colors[0::2] + matplotlib.colormaps["tab20"].colors[1::2]
    return [dict(color=colours[i % len(colours)], linestyle=LINE_STYLES[i % len(LINE_STYLES)], marker=MARKERS[i % len(MARKERS)],
                 markevery=(0.1 * i / count, 0.1), markersize=4, alpha=0.85) for i in range(count)]
