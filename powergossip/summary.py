"""`python -m powergossip.summary RUN_DIR... [--metric NAME]`: one row per run, in a markdown
table with aligned columns: the run's folder, its method, the settings in which the runs'
configurations differ, its epochs (train.py) or steps per setting (gossip_run.py), the
final value of its curve (the averaged model's test accuracy, or a gossip_run.py sweep's
best final error; `--metric` as in `python -m powergossip.plot`), the MB sent per worker
per epoch (per step) by then, and its status: finished, or how far it got. Bad input stops
the command with one line and exit status 2.

`markdown_table` is also how the studies in experiments/ write their tables.
"""
from __future__ import annotations

import math

from powergossip import results

PROGRAM = "python -m powergossip.summary"


def markdown_table(header: list[str], rows: list[list], aligned: bool = False) -> str:
    """A markdown table; `aligned`: every column padded to its widest cell, to be read as text too."""
    cells = [[str(cell) for cell in row] for row in [header] + rows]
    widths = [max(len(row[i]) for row in cells) if aligned else 0 for i in range(len(header))]
    lines = ["| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths)) + " |" for row in cells]
    rule = "|" + "|".join("-" * (width + 2) for width in widths) + "|" if aligned else "|" + "---|" * len(header)
    return "\n".join(lines[:1] + [rule] + lines[1:]) + "\n"


def value_text(name: str, value: float) -> str:
    """89.59% for an accuracy, 4 significant digits for anything else."""
    return f"{value:.2%}" if name.split("/")[0] == "accuracy" else f"{value:.4g}"


def table(found: list[results.Run], metric: str | None) -> str:
    """The runs' table (see the module's docstring)."""
    curves = [results.curve(run, metric) for run in found]  # bad input stops here
    names = list(dict.fromkeys(name for name, _ in curves))
    positions = list(dict.fromkeys(results.POSITIONS[run.entrypoint] for run in found))  # epoch, step
    header = ["run", "method", "settings", " or ".join(f"{p}s" for p in positions),
              f"final {names[0]}" if len(names) == 1 else "final value", f"MB sent / worker / {' or '.join(positions)}",
              "status"]
    differing = results.settings(found, leave_out=("optimizer", "algorithm"))
    rows = []
    for run, (name, records), settings in zip(found, curves, differing):
        best = results.best_setting_name(run)
        last = records[-1] if records else None
        final = "none yet" if last is None else value_text(name, last["value"])
        megabytes = math.nan if last is None else results.megabytes_per_position(last)
        rows.append([run.folder, run.config[run.method_key], settings or "-",
                     run.length, final if len(names) == 1 else f"{name} {final}",
                     "-" if math.isnan(megabytes) else f"{megabytes:.4g}",
                     results.status(run) + (f" (best: {best})" if best else "")])
    return markdown_table(header, rows, aligned=True)


def main(argv: list[str] | None = None) -> str:
    """The command: prints the table and returns it."""
    parser = results.Arguments(prog=PROGRAM, description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="+", metavar="RUN_DIR", help="a run's output_dir (train.py or gossip_run.py)")
    parser.add_argument("--metric", default=None, help="the final value's metric (default: the averaged model's test "
                                                       "accuracy; gossip_run.py: error)")
    args = parser.parse_args(argv)
    try:
        text = table(results.read_all(args.folders), args.metric)
    except results.ResultsError as problem:
        results.exit_on(problem, PROGRAM)
    print(text, end="", flush=True)
    return text


if __name__ == "__main__":
    main()
