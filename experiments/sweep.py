"""Launching many runs of an entrypoint, resumably, and collecting their metrics.

A study script lists its runs (name, entrypoint, `key=value` overrides) and calls
`launch(runs, folder, ...)`: every run is a subprocess (`python ENTRY ...`, or under
`mpirun -np N` when asked; `jobs` of them at a time) writing to `folder/<name>/`
(its output in `output.log`). A run that finished before (its folder holds `DONE`, which
records the run's arguments) is skipped, and a sweep whose runs were done before with
other arguments is refused before it launches anything; one that was stopped midway continues from its checkpoints (`resume=true`)
or, without any, starts again (`overwrite=true`); a run that fails gets a `FAILED` file
with the end of its output and the sweep goes on. Progress is one line per run. Runs start
in the folder the sweep was started from, so that relative paths (a run folder, `data_dir`,
a plug-in file: `plugins=[my_gossip.py]`) mean there what they mean to the caller.

Single-process runs are forked from one interpreter that has imported torch and the library
(experiments/fork_server.py, one per launch): at small scales importing torch takes longer
than the run. They start as subprocesses where it cannot fork safely (no os.fork, a thread
besides its own) or failed to start; runs under mpirun always do.
"""
from __future__ import annotations

import dataclasses
import json
import os
import select
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from powergossip import launch  # noqa: E402
from powergossip import runs as runs_module  # noqa: E402
from powergossip.summary import markdown_table  # noqa: E402,F401  (the studies' tables: sweep.markdown_table)

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


def launch(runs: list[Run], folder: str, processes: int | None = None, timeout: float | None = None,
           extra: list[str] | None = None, jobs: int = 1) -> list[Outcome]:
    """Run every run not yet done, `jobs` at a time; return what happened to each, in order."""
    outcomes: dict[int, Outcome] = {}
    pending = []
    stale = [run.name for run in runs if _done_with_other_arguments(run, os.path.join(folder, run.name), extra)]
    if stale:  # their results would be read as this sweep's: refuse before launching anything
        raise SystemExit(f"{folder}: runs {', '.join(stale)} were done before with other arguments (see their DONE files); "
                         f"give this sweep another --output, or delete those run folders")
    for index, run in enumerate(runs):
        run_folder = os.path.join(folder, run.name)
        if os.path.exists(os.path.join(run_folder, "DONE")):
            print(f"[{index + 1}/{len(runs)}] {run.name}: done before, skipped", flush=True)
            outcomes[index] = Outcome(run, run_folder, "skipped")
        else:
            pending.append(index)
    running: dict[int, tuple[subprocess.Popen | _Forked, float, list[str]]] = {}  # index -> (process, start time, command)
    server = _ForkServer() if pending and not (processes and processes > 1) and hasattr(os, "fork") else None
    try:
        while pending or running:
            while pending and len(running) < jobs:
                index = pending.pop(0)
                running[index] = _start(runs[index], os.path.join(folder, runs[index].name), processes, extra, server)
            time.sleep(0.05)
            for index, (process, started, command) in list(running.items()):
                timed_out = timeout is not None and time.time() - started > timeout
                if process.poll() is None and not timed_out:
                    continue
                if timed_out:
                    process.kill()
                    process.wait()
                del running[index]
                run, run_folder, seconds = runs[index], os.path.join(folder, runs[index].name), time.time() - started
                prefix = f"[{index + 1}/{len(runs)}] {run.name}"
                if process.returncode != 0:
                    with open(os.path.join(run_folder, "output.log")) as f:
                        output = f.read()[-5000:]
                    with open(os.path.join(run_folder, "FAILED"), "w") as f:
                        f.write(" ".join(command) + "\n\n" + ("timed out\n" if timed_out else "") + output)
                    print(f"{prefix}: FAILED after {seconds:.1f} s (see {os.path.join(run_folder, 'FAILED')})", flush=True)
                    outcomes[index] = Outcome(run, run_folder, "failed")
                else:
                    with open(os.path.join(run_folder, "DONE"), "w") as f:
                        json.dump(_arguments(run, extra), f)
                    print(f"{prefix}: done in {seconds:.1f} s", flush=True)
                    outcomes[index] = Outcome(run, run_folder, "done")
    finally:
        for process, _, _ in running.values():  # left by an exception or Ctrl-C: no run outlives the sweep
            process.kill()
            process.wait()
        if server:
            server.close()
    ordered = [outcomes[i] for i in range(len(runs))]
    failures = [o for o in ordered if o.status == "failed"]
    print(f"{len(ordered) - len(failures)} of {len(ordered)} runs finished"
          + (f"; failed: {', '.join(o.run.name for o in failures)}" if failures else ""), flush=True)
    return ordered


def collect(runs: list[Run], folder: str) -> list[Outcome]:
    """Outcomes of runs launched before (DONE / FAILED markers), without launching anything."""
    outcomes = []
    for run in runs:
        run_folder = os.path.join(folder, run.name)
        status = "done" if os.path.exists(os.path.join(run_folder, "DONE")) else \
            "failed" if os.path.exists(os.path.join(run_folder, "FAILED")) else "missing"
        outcomes.append(Outcome(run, run_folder, status))
    return outcomes


def _start(run: Run, run_folder: str, processes: int | None, extra: list[str] | None, server: _ForkServer | None):
    """Start one run whose output goes to run_folder/output.log: forked by the server where
    there is one and it can fork, else as a subprocess."""
    os.makedirs(run_folder, exist_ok=True)
    if os.path.exists(os.path.join(run_folder, "FAILED")):
        os.remove(os.path.join(run_folder, "FAILED"))
    command = [sys.executable, os.path.join(ROOT, run.entrypoint)] + run.overrides + (extra or []) + [f"output_dir={run_folder}"]
    command += _continue_or_replace(run_folder)
    log = os.path.join(run_folder, "output.log")
    process = server.start(command[1], command[2:], log) if server else None
    if process is None:
        env = dict(os.environ)
        if processes and processes > 1:
            command = launch.mpirun_command(processes) + command
            env = launch.mpirun_environment()
        with open(log, "w") as output:  # the subprocess has its own copy
            process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
    return process, time.time(), command


class _ForkServer:
    """experiments/fork_server.py for one launch: it forks each run from an interpreter that has
    imported torch and the library already, and reports how the runs end."""

    def __init__(self):
        self.process = subprocess.Popen([sys.executable, os.path.join(ROOT, "experiments", "fork_server.py")],
                                        env=dict(os.environ), stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        self.returncodes: dict[int, int] = {}  # pid -> exit status of the runs that ended

    def start(self, path: str, argv: list[str], log: str) -> _Forked | None:
        """The run, forked; None where the server cannot fork safely or has stopped."""
        try:
            self._send({"path": path, "argv": argv, "log": log})
        except BrokenPipeError:
            return None
        for line in iter(self.process.stdout.readline, b""):
            kind, *values = line.decode().split()
            if kind != "exited":
                return _Forked(self, int(values[0])) if kind == "started" else None
            self._ended(*values)
        return None  # the server stopped (it could not import what it needs: its error is on stderr)

    def collect(self, timeout: float | None) -> None:
        """Read the ends of runs reported so far, waiting up to `timeout` seconds (None: no limit) for the first."""
        while select.select([self.process.stdout], [], [], timeout)[0]:
            kind, *values = self.process.stdout.readline().decode().split() or ["stopped"]
            if kind != "exited":
                raise RuntimeError("the fork server stopped while runs were going")
            self._ended(*values)
            timeout = 0

    def kill(self, pid: int) -> None:
        self._send({"kill": pid})

    def close(self) -> None:
        self.process.communicate(timeout=60)  # closes its stdin: it kills the runs still going and exits

    def _send(self, request: dict) -> None:
        self.process.stdin.write(json.dumps(request).encode() + b"\n")

    def _ended(self, pid: str, status: str) -> None:
        self.returncodes[int(pid)] = int(status)


class _Forked:
    """A run forked by a _ForkServer, with the part of subprocess.Popen's interface that launch uses."""

    def __init__(self, server: _ForkServer, pid: int):
        self.server, self.pid = server, pid

    @property
    def returncode(self) -> int | None:
        return self.server.returncodes.get(self.pid)

    def poll(self) -> int | None:
        self.server.collect(0)
        return self.returncode

    def wait(self) -> int:
        while self.returncode is None:
            self.server.collect(None)
        return self.returncode

    def kill(self) -> None:
        if self.returncode is None:
            self.server.kill(self.pid)


def _arguments(run: Run, extra: list[str] | None) -> list[str]:
    """What defines a run of a sweep: its entrypoint and arguments, a configuration file inside
    the repository named relative to it (so the record reads the same in any checkout)."""
    return [run.entrypoint] + [_in_repository(argument) for argument in run.overrides + (extra or [])]


def _in_repository(argument: str) -> str:
    """A file argument given by its absolute path inside the repository: the path relative to it."""
    if "=" in argument or not os.path.isabs(argument) or os.path.commonpath([argument, ROOT]) != ROOT:
        return argument
    return os.path.relpath(argument, ROOT)


def _defining(arguments: list[str]) -> list[str]:
    """The arguments that decide a run's results: all but where its data set lies (`data_dir`),
    so that runs done on another machine count as done."""
    return [argument for argument in arguments if not argument.startswith("data_dir=")]


def _done_with_other_arguments(run: Run, run_folder: str, extra: list[str] | None) -> bool:
    path = os.path.join(run_folder, "DONE")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        text = f.read()
    # an empty DONE: written before this check existed
    return bool(text) and _defining(json.loads(text)) != _defining(_arguments(run, extra))


def _continue_or_replace(run_folder: str) -> list[str]:
    """What to tell a run about the results an unfinished launch of it left in its folder:
    continue from its checkpoints, or replace them (the sweep owns its run folders)."""
    checkpoints = os.path.join(run_folder, "checkpoints")
    if os.path.isdir(checkpoints) and any(name.endswith(".pt") for name in os.listdir(checkpoints)):
        return ["resume=true"]
    return ["overwrite=true"] if runs_module.results_in(run_folder) else []


# Training studies repeat every run over seeds and report mean and standard deviation.
QUICK_SEEDS = (1,)  # --quick: one seed, so that a quick try (and the test suite) stays fast
FULL_SEEDS = (1, 2, 3)  # full studies: the spread over three seeds


def study_seeds(quick: bool, seeds: list[int] | None = None) -> list[int]:
    """The seeds a training study runs: `seeds` if given, else QUICK_SEEDS or FULL_SEEDS."""
    return list(seeds) if seeds else list(QUICK_SEEDS if quick else FULL_SEEDS)


def seeded_name(name: str, seed: int) -> str:
    """A run's folder name for one seed. The first seed keeps the plain name that runs had
    before studies took seeds (they all ran seed 1), so that their folders are read as seed 1."""
    return name if seed == FULL_SEEDS[0] else f"{name}_seed{seed}"


def int_list(text: str) -> list[int]:
    """A command line's comma-separated integers ("1,2,3")."""
    return [int(item) for item in text.split(",")]


def study_arguments(description: str, quick_help: str = "a reduced run for a 2-core CPU", seeds: bool = False):
    """The command line every study script shares (`seeds`: a training study's --seeds)."""
    import argparse

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    if seeds:
        parser.add_argument("--seeds", type=int_list, default=None,
                            help=f"comma-separated seeds, each a run per setting (default {','.join(map(str, FULL_SEEDS))}; "
                                 f"--quick: {','.join(map(str, QUICK_SEEDS))})")
    parser.add_argument("--processes", type=int, default=None, help="launch each run under mpirun -np N")
    parser.add_argument("--report-only", action="store_true", help="only rebuild tables and figures from earlier runs")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (several fit on one GPU); a study's report may also work this many at a time")
    parser.add_argument("--output", default=None, help="folder for runs and results (default experiments/results/...)")
    parser.add_argument("overrides", nargs="*", help="extra key=value for every run (e.g. device=cuda data_dir=...)")
    return parser


def study_folder(args, name: str) -> str:
    """Where a study writes: --output if given; the committed results folder
    (experiments/results/<name>) for the full study; runs/<name>_quick, which git ignores,
    for --quick, so that a quick try never touches tracked files."""
    if args.output:
        return args.output
    return os.path.join(ROOT, "runs", f"{name}_quick") if args.quick else os.path.join(RESULTS, name)


def launch_or_collect(args, runs: list[Run], folder: str) -> list[Outcome]:
    """Launch the runs as the study's arguments say, or only collect them (--report-only)."""
    if args.report_only:
        return collect(runs, os.path.join(folder, "runs"))
    return launch(runs, os.path.join(folder, "runs"), args.processes, jobs=args.jobs)


def metrics(outcome: Outcome) -> list[dict]:
    """The run's metric records ([] for a failed run)."""
    path = os.path.join(outcome.folder, "metrics.jsonl")
    return runs_module.read_metrics(path) if outcome.status != "failed" and os.path.exists(path) else []


def write_table(folder: str, name: str, header: list[str], rows: list[list], notes: str = "") -> None:
    """`<name>.md` (with notes under the table) and `<name>.csv` in `folder`."""
    import csv

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.md"), "w") as f:
        f.write(markdown_table(header, rows) + ("\n" + notes + "\n" if notes else ""))
    with open(os.path.join(folder, f"{name}.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
