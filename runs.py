"""What the entrypoints share: config overrides from YAML files and `key=value`
arguments, and the `output_dir/metrics.jsonl` writer.

    config = runs.apply_overrides(defaults, ["paper.yaml", "n_workers=16", "topology=torus"])

Values are parsed as YAML (`lr=0.1`, `warm_start=false`, `milestones=[150,225]`,
`rank=null`) and must have the type of the default: unknown keys and wrong types
are errors that name the key and what was expected, before any work starts.
"""
from __future__ import annotations

import difflib
import json
import os
import sys
import time

import yaml


class ConfigError(ValueError):
    """A configuration that cannot work; the message says which key and why."""


def apply_overrides(defaults: dict, arguments: list[str]) -> dict:
    """A copy of `defaults` updated from YAML files and `key=value` arguments, in order."""
    config = dict(defaults)
    for argument in arguments:
        if "=" in argument:
            key, text = argument.split("=", 1)
            updates = {key.strip(): yaml.safe_load(text) if text.strip() else ""}
            source = f"argument {argument!r}"
        elif argument.endswith((".yaml", ".yml")):
            if not os.path.exists(argument):
                raise ConfigError(f"config file {argument!r} does not exist")
            with open(argument) as f:
                updates = yaml.safe_load(f) or {}
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
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r} ({source})")
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


def write_config(output_dir: str, config: dict) -> None:
    os.makedirs(output_dir, exist_ok=True)
    with open(os.path.join(output_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(dict(config), f, sort_keys=False)


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
    from comm import launched_by_mpirun  # here: runs stays light for what imports it

    if launched_by_mpirun():
        from mpi4py import MPI

        everyone_failed = MPI.COMM_WORLD.Ibarrier()
        deadline = time.time() + 10
        while not everyone_failed.Test() and time.time() < deadline:
            time.sleep(0.01)
    sys.exit(2)
