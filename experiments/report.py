"""Tables and figures of training studies (train.py runs), from their metrics.jsonl.

Runs that differ only in their seed (the `seed` label) form one setting. Per setting:
the averaged-model test metric at the last epoch, as the mean and sample standard
deviation over its seeds; MB sent per worker per epoch (cumulative bits at the end /
epochs); and curves of the test metric against epochs and against MB sent, the mean
over seeds with the range from the lowest to the highest seed shaded.
"""
from __future__ import annotations

import os
import statistics
import sys

import numpy as np
from matplotlib.figure import Figure

from experiments import sweep
from powergossip import figures


def study_main(description: str, name: str, study_runs, title: str, label_keys: list[str], notes: str = "",
               extra_columns: dict | None = None) -> None:
    """A training study's command line: `study_runs(quick, overrides, seeds)` launched (or
    only collected), the report written, its table printed; exits 1 if a run failed."""
    args = sweep.study_arguments(description, seeds=True).parse_args()
    outcomes, _ = run_study(args, name, study_runs(args.quick, args.overrides, args.seeds), title, label_keys, notes,
                            extra_columns)
    sys.exit(exit_status(outcomes))


def run_study(args, name: str, runs: list[sweep.Run], title: str, label_keys: list[str],
              notes: str = "", extra_columns: dict | None = None) -> tuple[list[sweep.Outcome], list[dict]]:
    """Launch a study's runs (or only collect them) in its folder, write its report there and
    print its table; (outcomes, the report's rows)."""
    folder = sweep.study_folder(args, name)
    outcomes = sweep.launch_or_collect(args, runs, folder)
    rows = write_report(outcomes, folder, title, label_keys, notes=notes, extra_columns=extra_columns)
    with open(os.path.join(folder, "table.md")) as f:
        print(f.read(), end="")
    return outcomes, rows


def exit_status(outcomes: list[sweep.Outcome]) -> int:
    """A study's exit status: 1 if any of its runs failed."""
    return 1 if any(o.status == "failed" for o in outcomes) else 0


def run_status(outcome: sweep.Outcome) -> str:
    """done (also: done before), failed, diverged (train.py's loss check stopped it: a loss
    not finite or above max_loss_ratio x the first) or missing."""
    failure = os.path.join(outcome.folder, "FAILED")
    if outcome.status == "failed" and os.path.exists(failure) and "FloatingPointError" in open(failure).read():
        return "diverged"
    return "done" if outcome.status == "skipped" else outcome.status


def settings_of(outcomes: list[sweep.Outcome], label_keys: list[str]) -> list[tuple[dict, list[int]]]:
    """[(labels, indices of its runs)]: runs grouped by their labels but the seed, in order of appearance."""
    groups: dict[tuple, tuple[dict, list[int]]] = {}
    for index, outcome in enumerate(outcomes):
        labels = {key: value for key, value in outcome.run.labels.items() if key != "seed"}
        key = tuple(labels.get(k, "") for k in label_keys) or (outcome.run.name,)
        groups.setdefault(key, (labels, []))[1].append(index)
    return list(groups.values())


def summarize(outcomes: list[sweep.Outcome], curves: list[list[tuple]], label_keys: list[str]) -> list[dict]:
    """One row per setting: labels, mean and standard deviation over seeds of the final
    averaged-model test metric, number of seeds with a result, MB/worker/epoch, epochs,
    status (`curves`: each run's test_avg curve). A seed that failed or diverged is left
    out of the mean and named in the status."""
    rows = []
    for labels, indices in settings_of(outcomes, label_keys):
        finals = [curves[i][-1] for i in indices if curves[i]]  # (epoch, value, MB) at each seed's end
        values = [value for _, value, _ in finals]
        statuses = [run_status(outcomes[i]) for i in indices]
        counts = {status: statuses.count(status) for status in dict.fromkeys(statuses)}
        status = statuses[0] if len(counts) == 1 else ", ".join(f"{n} {status}" for status, n in counts.items())
        rows.append({**labels, "status": status, "seeds": len(values),
                     "test_avg": statistics.mean(values) if values else float("nan"),
                     "test_std": statistics.stdev(values) if len(values) > 1 else float("nan"),
                     "epochs": min((epoch for epoch, _, _ in finals), default=0),
                     "mb_per_epoch": statistics.mean(mb / epoch for epoch, _, mb in finals) if finals else float("nan")})
    return rows


def mean_and_spread(row: dict, metric: str = "accuracy") -> str:
    """"92.45% ± 0.21" (accuracy in percent; the spread only with two seeds or more)."""
    scale, unit = (100, "%") if metric == "accuracy" else (1, "")
    spread = f" ± {scale * row['test_std']:.2f}" if row["seeds"] > 1 else ""
    return f"{scale * row['test_avg']:.2f}{unit}{spread}"


def write_report(outcomes: list[sweep.Outcome], folder: str, title: str, label_keys: list[str], notes: str = "",
                 metric: str = "accuracy", extra_columns: dict | None = None) -> list[dict]:
    """table.md / table.csv (one row per setting, mean ± standard deviation over seeds, then
    `extra_columns`: header -> function of the row giving its cell) and two figures (test
    metric vs epochs, vs MB sent; the seeds' range shaded) in `folder`."""
    curves = [figures.curve(sweep.metrics(outcome), metric, "test_avg") for outcome in outcomes]
    rows = summarize(outcomes, curves, label_keys)
    extra_columns = extra_columns or {}
    header = label_keys + [f"test {metric} (averaged model), mean ± std over seeds", "seeds", "MB sent / worker / epoch",
                           "epochs", "status"] + list(extra_columns)
    table = [[row.get(key, "") for key in label_keys]
             + [mean_and_spread(row, metric), row["seeds"], f"{row['mb_per_epoch']:.3f}", f"{row['epochs']:g}", row["status"]]
             + [cell(row) for cell in extra_columns.values()]
             for row in rows]
    sweep.write_table(folder, "table", header, table, notes=f"{title}\n\n{notes}".strip())
    _figure(outcomes, curves, folder, title, label_keys, metric)
    return rows


def final_against_megabytes(rows: list[dict], folder: str, line_key: str, point_key: str, title: str,
                            metric: str = "accuracy") -> None:
    """`final_<metric>_vs_mb.png`: each setting's final test metric (mean over seeds, the
    standard deviation as error bar) against its MB per worker per epoch; settings that
    share `line_key` joined by a line, each point named by its `point_key`."""
    figure = Figure(figsize=(7, 5), layout="tight")
    axis = figure.subplots()
    for line_value in dict.fromkeys(row[line_key] for row in rows):
        points = [row for row in rows if row[line_key] == line_value and row["seeds"]]
        if not points:
            continue
        megabytes, values = [row["mb_per_epoch"] for row in points], [row["test_avg"] for row in points]
        spreads = [row["test_std"] if row["seeds"] > 1 else 0 for row in points]
        axis.errorbar(megabytes, values, yerr=spreads, marker="o", capsize=3, label=f"{line_key} {line_value}")
        for row in points:
            axis.annotate(f"{row[point_key]}", (row["mb_per_epoch"], row["test_avg"]), fontsize=7,
                          textcoords="offset points", xytext=(3, 3))
    axis.set(xscale="log", xlabel="MB sent per worker per epoch", ylabel=f"final test {metric} (averaged model)",
             title=f"{title} (points: {point_key})")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figures.save(figure, os.path.join(folder, f"final_{metric}_vs_mb.png"))


def _figure(outcomes, curves, folder, title, label_keys, metric) -> None:
    figure = Figure(figsize=(12, 4.5), layout="tight")
    by_epoch, by_megabytes = figure.subplots(1, 2)
    for labels, indices in settings_of(outcomes, label_keys):
        seeds = [curves[i] for i in indices if curves[i]]
        if not seeds:
            continue
        length = min(len(points) for points in seeds)  # the epochs every seed reached
        values = np.array([[value for _, value, _ in points[:length]] for points in seeds])
        epochs = [epoch for epoch, _, _ in seeds[0][:length]]
        megabytes = np.mean([[mb for _, _, mb in points[:length]] for points in seeds], axis=0)
        label = " ".join(str(labels.get(k, "")) for k in label_keys) or outcomes[indices[0]].run.name
        for axis, x in ((by_epoch, epochs), (by_megabytes, megabytes)):
            line, = axis.plot(x, values.mean(axis=0), marker=".", label=label + (f" ({len(seeds)} seeds)" if len(seeds) > 1 else ""))
            if len(seeds) > 1:
                axis.fill_between(x, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.2)
    figures.label_epoch_and_megabyte_axes(by_epoch, by_megabytes, f"test {metric} (averaged model)", xscale="symlog")
    by_epoch.set(title=title)
    by_epoch.legend(fontsize=8)
    figures.save(figure, os.path.join(folder, f"test_{metric}.png"))
