"""What the entrypoints share: config overrides from YAML files and `key=value`
arguments, the output folder (which a run claims before any work, so that it never
overwrites another run's results unasked), the `output_dir/metrics.jsonl` writer, and
checkpoint files (written atomically, verified when read).

    config = runs.apply_overrides(defaults, ["paper.yaml", "n_workers=16", "topology=torus"])

Values are parsed as YAML (`lr=0.1`, `lr=1e-3`, `warm_start=false`,
`milestones=[150,225]`, `rank=null`) and must have the type of the default: unknown
keys, wrong types and numbers that are not finite are errors that name the key and
what was expected, before any work starts.
"""
from __future__ import annotations

import difflib
import json
import math
import os
import re
import shutil
import sys
import time
import zipfile

import yaml


class ConfigError(ValueError):
    """A configuration that cannot work; the message says which key and why."""


class _Loader(yaml.SafeLoader):
    """YAML as PyYAML reads it, but `1e-3` is a number (YAML 1.1 wants `1.0e-3` and
    would read `1e-3` as a string; YAML 1.2 and Python read it as a number)."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def parse_value(text: str):
    """A `key=value` argument's value as YAML (an empty text is the empty string)."""
    return yaml.load(text, Loader=_Loader) if text.strip() else ""


def apply_overrides(defaults: dict, arguments: list[str]) -> dict:
    """A copy of `defaults` updated from YAML files and `key=value` arguments, in order."""
    config = dict(defaults)
    for argument in arguments:
        if "=" in argument:
            key, text = argument.split("=", 1)
            updates = {key.strip(): parse_value(text)}
            source = f"argument {argument!r}"
        elif argument.endswith((".yaml", ".yml")):
            if not os.path.exists(argument):
                raise ConfigError(f"config file {argument!r} does not exist")
            with open(argument) as f:
                updates = yaml.load(f, Loader=_Loader) or {}
            if not isinstance(updates, dict):
                raise ConfigError(f"config file {argument!r} must hold a mapping of keys to values")
            source = f"file {argument!r}"
        else:
            raise ConfigError(f"cannot read argument {argument!r}: give key=value or a .yaml file")
        for key, value in updates.items():
            config[key] = check_value(defaults, key, value, source)
    return config


def command_line(defaults: dict, output_dir: str, arguments: list[str]) -> tuple[dict, str]:
    """(config, output_dir) from the command line: `output_dir=PATH` sets where results
    go (it is not a config key); everything else goes through `apply_overrides`."""
    rest = []
    for argument in arguments:
        if argument.startswith("output_dir="):
            output_dir = argument.split("=", 1)[1]
        else:
            rest.append(argument)
    return apply_overrides(defaults, rest), output_dir


def check_config(defaults: dict, config: dict) -> None:
    """Every key known and of the default's type (for configs edited in Python)."""
    for key, value in config.items():
        check_value(defaults, key, value, "config")


def check_value(defaults: dict, key: str, value, source: str):
    if key not in defaults:
        close = difflib.get_close_matches(key, list(defaults), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(sorted(defaults))}"
        raise ConfigError(f"unknown config key {key!r} in {source}{hint}")
    default = defaults[key]
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r} ({source})")
    elif isinstance(default, float):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r} ({source})")
        value = float(value)
    elif isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r} ({source})")
    elif isinstance(default, (list, tuple)):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r} ({source})")
        value = list(value)
    elif isinstance(default, str) and not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {value!r} ({source})")
    return value


# --- the output folder -----------------------------------------------------------------------
RESULTS = ("config.yaml", "metrics.jsonl", "summary.json", "tensorboard", "checkpoints")


def results_in(folder: str) -> list[str]:
    """The run results `folder` holds (files written beside a run, such as a sweep's
    output.log, are not results)."""
    return [name for name in RESULTS if os.path.exists(os.path.join(folder, name))]


def fresh_output_dir(label: str, started: float) -> str:
    """A new folder `runs/<date>-<time>-<label>` (with a suffix if two runs start in the
    same second); for runs given no output_dir."""
    base = os.path.join("runs", time.strftime("%Y%m%d-%H%M%S", time.localtime(started)) + f"-{label}")
    folder, number = base, 1
    while True:
        try:
            os.makedirs(folder)
            return folder
        except FileExistsError:
            number += 1
            folder = f"{base}-{number}"


def output_dir_problem(folder: str, resume: bool, overwrite: bool) -> str | None:
    """Why a run may not write into `folder` (None: it may): a folder holding another run's
    results needs resume=true (continue that run) or overwrite=true (replace it)."""
    if resume and overwrite:
        return "resume=true and overwrite=true contradict each other: continue the run in output_dir or replace it, not both"
    found = results_in(folder)
    if found and not (resume or overwrite):
        return (f"output_dir {folder} holds another run's results ({', '.join(found)}); pass resume=true to continue "
                f"that run, overwrite=true to replace it, or choose another output_dir")
    try:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, ".write_test"), "w"):
            pass
        os.remove(os.path.join(folder, ".write_test"))
    except OSError as problem:
        return f"cannot write to output_dir {folder}: {problem}"
    return None


def claim_output_dir(output_dir: str | None, label: str, resume: bool, overwrite: bool, comm, started: float) -> str:
    """The folder this run writes to, the same on every process (comm: a comm.Communicator),
    settled before any work: a new runs/<date>-<time>-<label> when output_dir is None; a
    folder with another run's results only with resume=true or overwrite=true (which
    deletes those results). Raises ConfigError on every process otherwise."""
    folder, problem = output_dir, None
    if comm.rank == 0:
        if folder is None and resume:
            problem = "resume=true needs output_dir=<the folder of the run to continue>"
        elif folder is None:
            folder = fresh_output_dir(label, started)
            print(f"results go to {folder} (set output_dir to choose)", flush=True)
        else:
            problem = output_dir_problem(folder, resume, overwrite)
        if problem is None and overwrite:
            remove_results(folder)
    folder, problem = comm.gather_objects((folder, problem))[0]
    if problem is not None:
        raise ConfigError(problem)
    return folder


def remove_results(folder: str) -> None:
    """overwrite=true: delete the results a run writes (and nothing else) from `folder`."""
    for name in results_in(folder):
        path = os.path.join(folder, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


# Instructions to one launch, not part of a run: a config.yaml given to a new run must
# not make it continue or replace anything.
LAUNCH_KEYS = ("resume", "overwrite")


def write_config(output_dir: str, config: dict) -> None:
    """`output_dir/config.yaml`: the run's configuration, which reproduces it when given back."""
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "config.yaml"), "w") as f:
        yaml.safe_dump({key: value for key, value in config.items() if key not in LAUNCH_KEYS}, f, sort_keys=False)


class MetricsFile:
    """Writes one JSON object per metric record to `output_dir/metrics.jsonl` (a new file)."""

    def __init__(self, output_dir: str):
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        self._file = open(self.path, "w")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str) -> list[dict]:
    """All records of a metrics.jsonl file (a folder holding one is accepted too)."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def command_line_or_exit(program: str, defaults: dict, output_dir: str, arguments: list[str], check) -> tuple[dict, str]:
    """`command_line`, then `check(config)`; a problem ends the program (exit_on_config_error)."""
    try:
        config, output_dir = command_line(defaults, output_dir, arguments)
        check(config)
    except (ValueError, OSError) as problem:
        exit_on_config_error(program, problem)
    return config, output_dir


def exit_on_config_error(program: str, problem: Exception) -> None:
    """Print a configuration problem and exit with status 2. Under mpirun every process
    fails the same way: wait (a few seconds at most) until all have printed, so that
    mpirun does not kill one before it could say why."""
    rank = next((os.environ[v] for v in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "RANK") if v in os.environ), "0")
    sys.stderr.write(f"{program}: configuration error (process {rank}): {problem}\n")
    sys.stderr.flush()
    from powergossip.comm import launched_by_mpirun  # here: runs stays light for what imports it

    if launched_by_mpirun():
        from mpi4py import MPI

        everyone_failed = MPI.COMM_WORLD.Ibarrier()
        deadline = time.time() + 10
        while not everyone_failed.Test() and time.time() < deadline:
            time.sleep(0.01)
    sys.exit(2)


# --- checkpoint files --------------------------------------------------------------------------
class CorruptCheckpoint(Exception):
    """A checkpoint file that cannot be trusted (truncated, empty, bytes changed)."""


def write_atomically(path: str, state: dict, previous: str | None = None) -> None:
    """torch.save to a temporary file, fsync, then rename over `path` (the old file moved to
    `previous` first, when given): a crash leaves whole files, never half of one."""
    import torch

    temporary = path + ".tmp"
    with open(temporary, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if previous is not None and os.path.exists(path):
        os.replace(path, previous)
    os.replace(temporary, path)
    folder = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a power cut
    finally:
        os.close(folder)


def read_verified(path: str) -> dict:
    """A file written by `write_atomically`, after checking every entry's CRC-32 (torch.save
    writes a zip archive whose entries carry one; torch.load does not check them).
    CorruptCheckpoint names the path and what is wrong."""
    import torch

    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError) as problem:
        raise CorruptCheckpoint(f"{path} is not a complete checkpoint ({os.path.getsize(path)} bytes; {problem})") from None
    if bad is not None:
        raise CorruptCheckpoint(f"{path} is corrupt: its entry {bad} does not match its checksum")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as problem:  # torch.load's many ways of failing on bad input
        raise CorruptCheckpoint(f"{path} cannot be read ({type(problem).__name__}: {problem})") from None
