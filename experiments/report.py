"""Tables and figures of training studies (train.py runs), from their metrics.jsonl.

Per run: the averaged-model test accuracy at the last epoch, MB sent per worker per
epoch (cumulative bits at the end / epochs), and curves of test accuracy against
epochs and against MB sent.
"""
from __future__ import annotations

import os

from matplotlib.figure import Figure

from experiments import sweep
from powergossip import figures


def summarize(outcomes: list[sweep.Outcome], curves: list[list[tuple]]) -> list[dict]:
    """One row per run: labels, final averaged-model test metric, MB/worker/epoch, status
    (`curves`: each run's test_avg curve)."""
    rows = []
    for outcome, test_avg in zip(outcomes, curves):
        final_epoch, final_value, final_mb = test_avg[-1] if test_avg else (0, float("nan"), float("nan"))
        status = outcome.status
        failure = os.path.join(outcome.folder, "FAILED")
        if status == "failed" and os.path.exists(failure) and "FloatingPointError" in open(failure).read():
            status = "diverged (NaN loss)"
        rows.append({**outcome.run.labels, "status": status, "epochs": final_epoch, "test_avg": final_value,
                     "mb_per_epoch": final_mb / final_epoch if final_epoch else float("nan")})
    return rows


def write_report(outcomes: list[sweep.Outcome], folder: str, title: str, label_keys: list[str], notes: str = "",
                 metric: str = "accuracy") -> list[dict]:
    """table.md / table.csv and two figures (test metric vs epochs, vs MB sent) in `folder`."""
    curves = [figures.curve(sweep.metrics(outcome), metric, "test_avg") for outcome in outcomes]
    rows = summarize(outcomes, curves)
    header = label_keys + [f"test {metric} (averaged model)", "MB sent / worker / epoch", "epochs", "status"]
    table = [[row.get(key, "") for key in label_keys]
             + [f"{100 * row['test_avg']:.2f}%" if metric == "accuracy" else f"{row['test_avg']:.3f}",
                f"{row['mb_per_epoch']:.3f}", f"{row['epochs']:g}", row["status"]] for row in rows]
    sweep.write_table(folder, "table", header, table, notes=f"{title}\n\n{notes}".strip())

    figure = Figure(figsize=(12, 4.5))
    by_epoch, by_megabytes = figure.subplots(1, 2)
    for outcome, points in zip(outcomes, curves):
        if not points:
            continue
        label = " ".join(str(outcome.run.labels.get(k, "")) for k in label_keys) or outcome.run.name
        figures.plot_against_epochs_and_megabytes(by_epoch, by_megabytes, points, label=label)
    figures.label_epoch_and_megabyte_axes(by_epoch, by_megabytes, f"test {metric} (averaged model)", xscale="symlog")
    by_epoch.set(title=title)
    by_epoch.legend(fontsize=8)
    figures.save(figure, os.path.join(folder, f"test_{metric}.png"))
    return rows
