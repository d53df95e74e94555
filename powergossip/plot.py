"""`python -m powergossip.plot RUN_DIR... [--x epochs|mb|time] [--metric NAME] [--out FILE]`: the
curves of several runs on one figure, each named by the settings in which the runs'
configurations differ ("optimizer=power-gossip optimizer_num_iterations=2 seed=2").

A train.py run's curve is the averaged model's test accuracy by default (`--metric loss`:
its test loss; a full name such as `loss/train` or `consensus_distance/params_only` picks
any curve over workers, as TensorBoard names it); a gossip_run.py run's is the consensus
error of its best setting (`--metric error_to_initial_mean`), on a log scale. The x-axis
is one of X_AXES: epochs (steps for gossip_run.py), MB sent per worker on a log scale,
the PowerGossip paper's axis, or the simulated seconds of runs made with simulated_clock=true. The figure goes to `--out` (replaced if it exists), or to
`comparison.png` here, which must not exist yet. Bad input (a folder that is not a run,
train.py and gossip_run.py runs together, a metric a run does not record) stops the
command with one line and exit status 2 before anything is drawn.
"""
from __future__ import annotations

import os
import textwrap
from typing import Callable, NamedTuple

from powergossip import figures, results, runs

PROGRAM = "python -m powergossip.plot"
DEFAULT_OUT = "comparison.png"
WIDTH, HEIGHT, LEGEND_LINE = 8.0, 4.5, 0.2  # inches: the figure, and what each line of its legend adds


class XAxis(NamedTuple):
    label: str  # "{position}": epoch or step, by the runs' entrypoint
    value: Callable[[dict], float]  # a record's place on the axis
    scale: str  # "linear" or "log" (points at 0 or below are left out)


X_AXES = {  # --x
    "epochs": XAxis("{position}", runs.record_position, "linear"),
    "mb": XAxis("MB sent per worker", lambda record: record["bits"] / figures.MEGABYTE_BITS, "log"),
    "time": XAxis("simulated time (s)", lambda record: record["simulated_time_s"], "linear"),
}


def arguments() -> results.Arguments:
    parser = results.Arguments(prog=PROGRAM, description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", metavar="RUN_DIR", help="a run's output_dir (train.py or gossip_run.py)")
    parser.add_argument("--x", choices=list(X_AXES), default="epochs", help="the x-axis (default: epochs)")
    parser.add_argument("--metric", default=None, help="the curve: a metric's name or full name (default: the averaged "
                                                       "model's test accuracy; gossip_run.py: error)")
    parser.add_argument("--out", default=None, help=f"the PNG file to write (default: {DEFAULT_OUT}, if it does not exist)")
    return parser


def comparison_figure(found: list[results.Run], metric: str | None, x: XAxis):
    """The runs' curves of `metric` against `x`, one style each (figures.distinct_styles), named
    in a legend under the axes by what differs between the runs; the figure is WIDTH inches
    wide and HEIGHT high plus LEGEND_LINE per line of the legend."""
    from matplotlib.figure import Figure  # here: --help and bad input pay nothing for matplotlib

    curves = [results.curve(run, metric) for run in found]
    names = " / ".join(dict.fromkeys(name for name, _ in curves))
    y_scale = "log" if found[0].entrypoint == results.GOSSIP else "linear"
    legend = []
    for run, label, (_, records) in zip(found, results.labels(found), curves):
        best = results.best_setting_name(run)
        legend.append(textwrap.fill(label + (f" (best: {best})" if best else "" if records else " (no records yet)"), 110))
    figure = Figure(figsize=(WIDTH, HEIGHT + LEGEND_LINE * sum(text.count("\n") + 1 for text in legend)),
                    layout="constrained")
    axis = figure.subplots()
    for label, (_, records), style in zip(legend, curves, figures.distinct_styles(len(found))):
        points = [(x.value(r), r["value"]) for r in records]
        points = [(a, b) for a, b in points if (x.scale != "log" or a > 0) and (y_scale != "log" or b > 0)]
        axis.plot(*(zip(*points) if points else ([], [])), label=label, linewidth=1.5, **style)
    xlabel = x.label.format(position=results.POSITIONS[found[0].entrypoint])
    axis.set(xlabel=xlabel, ylabel=names, xscale=x.scale, yscale=y_scale, title=f"{names} against {xlabel}")
    if x.scale == "log":
        figures.plain_log_ticks(axis.xaxis)
    axis.grid(alpha=0.3)
    figure.legend(loc="outside lower center", fontsize=8)
    return figure


def main(argv: list[str] | None = None) -> str:
    """The command; returns the figure's path."""
    args = arguments().parse_args(argv)
    out = args.out or DEFAULT_OUT
    try:
        found = results.read_all(args.folders, one_entrypoint=True)
        for run in found:
            _, records = results.curve(run, args.metric)  # a metric a run does not record stops here
            if args.x == "time" and not all("simulated_time_s" in record for record in records):
                raise results.ResultsError(f"--x time: {run.folder} has no simulated times (its run had "
                                           f"simulated_clock=false); plot it against epochs or mb")
        if args.out is None and os.path.exists(out):
            raise results.ResultsError(f"{out} exists: name the file to write with --out (an --out file is replaced)")
        if not os.path.isdir(os.path.dirname(os.path.abspath(out))):
            raise results.ResultsError(f"--out {out}: the folder {os.path.dirname(os.path.abspath(out))} does not exist")
    except results.ResultsError as problem:
        results.exit_on(problem, PROGRAM)
    figure = comparison_figure(found, args.metric, X_AXES[args.x])
    runs.write_file(out, lambda f: figures.write_png(figure, f), binary=True)
    print(f"figure {out}", flush=True)
    return out


if __name__ == "__main__":
    main()
