"""Launching many runs of an entrypoint, resumably, and collecting their metrics.

A study script lists its runs (name, entrypoint, `key=value` overrides) and calls
`launch(runs, folder, ...)`: every run is a subprocess (`python ENTRY ...`, or under
`mpirun -np N` when asked) writing to `folder/<name>/`. A run that finished before
(its folder holds `DONE`) is skipped; a run that fails gets a `FAILED` file with the
end of its output and the sweep goes on. Progress is one line per run.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import comm as comm_module  # noqa: E402
import runs as runs_module  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results")


@dataclasses.dataclass
class Run:
    name: str  # folder name under the study's output folder
    entrypoint: str  # "train.py" or "gossip_run.py"
    overrides: list[str]  # key=value arguments (and YAML files)
    labels: dict = dataclasses.field(default_factory=dict)  # what tables and figures group by


@dataclasses.dataclass
class Outcome:
    run: Run
    folder: str
    status: str  # "done", "skipped" (done before), "failed"
    seconds: float = 0.0


def launch(runs: list[Run], folder: str, processes: int | None = None, timeout: float | None = None,
           extra: list[str] | None = None) -> list[Outcome]:
    """Run every run not yet done; return what happened to each, in order."""
    outcomes = []
    for index, run in enumerate(runs, 1):
        run_folder = os.path.join(folder, run.name)
        prefix = f"[{index}/{len(runs)}] {run.name}"
        if os.path.exists(os.path.join(run_folder, "DONE")):
            print(f"{prefix}: done before, skipped", flush=True)
            outcomes.append(Outcome(run, run_folder, "skipped"))
            continue
        os.makedirs(run_folder, exist_ok=True)
        for stale in ("FAILED",):
            if os.path.exists(os.path.join(run_folder, stale)):
                os.remove(os.path.join(run_folder, stale))
        command = [sys.executable, os.path.join(ROOT, run.entrypoint)] + run.overrides + (extra or []) + [f"output_dir={run_folder}"]
        env = dict(os.environ)
        if processes and processes > 1:
            command = comm_module.mpirun_command(processes) + command
            env = comm_module.mpirun_environment()
        started = time.time()
        try:
            result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
            failed, output = result.returncode != 0, result.stdout + result.stderr
        except subprocess.TimeoutExpired as expired:
            failed, output = True, f"timed out after {timeout} s\n{expired.stdout or ''}{expired.stderr or ''}"
        seconds = time.time() - started
        if failed:
            with open(os.path.join(run_folder, "FAILED"), "w") as f:
                f.write(" ".join(command) + "\n\n" + output[-5000:])
            print(f"{prefix}: FAILED after {seconds:.1f} s (see {os.path.join(run_folder, 'FAILED')})", flush=True)
            outcomes.append(Outcome(run, run_folder, "failed", seconds))
        else:
            open(os.path.join(run_folder, "DONE"), "w").close()
            print(f"{prefix}: done in {seconds:.1f} s", flush=True)
            outcomes.append(Outcome(run, run_folder, "done", seconds))
    failures = [o for o in outcomes if o.status == "failed"]
    print(f"{len(outcomes) - len(failures)} of {len(outcomes)} runs finished"
          + (f"; failed: {', '.join(o.run.name for o in failures)}" if failures else ""), flush=True)
    return outcomes


def metrics(outcome: Outcome) -> list[dict]:
    """The run's metric records ([] for a failed run)."""
    path = os.path.join(outcome.folder, "metrics.jsonl")
    return runs_module.read_metrics(path) if outcome.status != "failed" and os.path.exists(path) else []


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_table(folder: str, name: str, header: list[str], rows: list[list], notes: str = "") -> None:
    """`name.md` (with notes under the table) and `name.csv` in `folder`."""
    import csv

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.md"), "w") as f:
        f.write(markdown_table(header, rows) + ("\n" + notes + "\n" if notes else ""))
    with open(os.path.join(folder, f"{name}.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
