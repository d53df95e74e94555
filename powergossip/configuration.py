"""Configurations: each entrypoint's flat `config` dict, changed from YAML files and
`key=value` arguments or edited in Python, checked before any work.

    config = configuration.apply_overrides(defaults, ["paper.yaml", "n_workers=16", "topology=torus"])

Values are parsed as YAML (`lr=0.1`, `lr=1e-3`, `warm_start=false`,
`milestones=[150,225]`, `rank=null`) and must have the type of the default: unknown
keys, wrong types and numbers that are not finite are errors that name the key and
what was expected. Each entrypoint checks the rest of its configuration itself
(train.checked, gossip_run.checked); a problem ends the program with exit status 2
and one line that says what to change (`run_command_line`, `run_or_exit`).
docs/configuration.md tables the methods' settings and the older names read as them.
"""
from __future__ import annotations

import difflib
import math
import os
import re
import sys
import time

import yaml

from powergossip import names, plugins
from powergossip.errors import ConfigError, SettingError


class YamlLoader(yaml.SafeLoader):
    """YAML as PyYAML reads it, but `1e-3` is a number (YAML 1.1 wants `1.0e-3` and
    would read `1e-3` as a string; YAML 1.2 and Python read it as a number)."""


YamlLoader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                              list("-+.0123456789"))


def parse_value(text: str):
    """A `key=value` argument's value as YAML (an empty text is the empty string)."""
    return yaml.load(text, Loader=YamlLoader) if text.strip() else ""


def yaml_problem(problem: yaml.YAMLError) -> str:
    """A YAML syntax error in one line: what PyYAML found wrong, and where."""
    what = ", ".join(part for part in (getattr(problem, "context", None), getattr(problem, "problem", None)) if part)
    mark = getattr(problem, "problem_mark", None)
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    return (what or str(problem).splitlines()[0]) + where


def read_yaml(path: str):
    """The YAML document in the file at `path` (None when it is empty); ConfigError naming
    the file and where its syntax breaks, for one that is not YAML text."""
    try:
        with open(path) as f:
            return yaml.load(f, Loader=YamlLoader)
    except yaml.YAMLError as problem:
        raise ConfigError(f"{path} is not valid YAML: {yaml_problem(problem)}") from None
    except UnicodeDecodeError as problem:
        raise ConfigError(f"{path} is not a YAML text file ({problem.reason} at byte {problem.start})") from None


def setting_problem(problem: ValueError, settings: dict) -> ConfigError:
    """A method's complaint as one about the config key of its setting: a SettingError names
    the setting (`rank`: `optimizer_rank`); a method registered without a config raises its
    own ValueError, read as naming a setting when its first word is one of those it was given."""
    if isinstance(problem, SettingError):
        return ConfigError(f"{names.setting_key(problem.setting)} {problem.reason}")
    setting, _, reason = str(problem).partition(" ")
    if setting in settings:
        return ConfigError(f"{names.setting_key(setting)} {reason}")
    return ConfigError(str(problem))


def check_method(method: str, topology, settings: dict) -> None:
    """The method's checks of its settings and of the graph (methods.check), as ConfigErrors."""
    from powergossip import methods  # here: configuration stays light for what imports it

    try:
        methods.check(method, topology, **settings)
    except ValueError as problem:
        raise setting_problem(problem, settings) from None


def with_faults(config: dict, method: str, topology):
    """The run's topology with its faults (faults.apply), after faults.check on the fault-free
    one, as ConfigErrors naming the key."""
    from powergossip import faults, methods

    try:
        settings = faults.settings_of(config)
        faults.check(settings, method, methods.METHODS[method].graph_needs, topology)
        return faults.apply(settings, topology, config["seed"])
    except ValueError as problem:
        raise ConfigError(str(problem)) from None


def with_canonical_keys(defaults: dict, config: dict) -> dict:
    """A copy of `config` (edited in Python) with every alias written as its key; an alias
    set beside its key to another non-default value is an error."""
    renamed = {key: value for key, value in config.items() if names.canonical_key(key, defaults) == key}
    for key, value in config.items():
        name = names.canonical_key(key, defaults)
        if name != key:
            if name in renamed and renamed[name] not in (defaults.get(name), value):
                raise ConfigError(f"{key}={value!r} and {name}={renamed[name]!r} name the same setting; give one of them")
            renamed[name] = value
    return renamed


def with_checked_keys(defaults: dict, config: dict) -> dict:
    """What both entrypoints check first: a copy of `config` with every key by its own name
    (with_canonical_keys), known and of its default's type (check_config), its plug-ins
    imported (plugins.load: what they register is named in the rest of it), and the
    compressor by its registry key, so that config.yaml holds one spelling and resume
    compares names."""
    from powergossip import compressors  # here: configuration stays light for what imports it

    config = with_canonical_keys(defaults, config)
    check_config(defaults, config)
    plugins.load(config.get("plugins", []))
    if isinstance(config.get("optimizer_compressor"), str):
        try:
            config["optimizer_compressor"] = compressors.registered_name(config["optimizer_compressor"])
        except ValueError as problem:
            raise setting_problem(problem, {}) from None
    return config


def apply_overrides(defaults: dict, arguments: list[str]) -> dict:
    """A copy of `defaults` updated from YAML files and `key=value` arguments, in order
    (aliases of a key are read as that key)."""
    config = dict(defaults)
    for argument in arguments:
        if "=" in argument:
            key, text = argument.split("=", 1)
            try:
                updates = {key.strip(): parse_value(text)}
            except yaml.YAMLError as problem:
                raise ConfigError(f"{key.strip()}: the value {text!r} is not valid YAML ({yaml_problem(problem)}); "
                                  f"quote it to give a string ({key.strip()}=\"'...'\")") from None
            source = f"argument {argument!r}"
        elif argument.endswith((".yaml", ".yml")):
            if not os.path.exists(argument):
                raise ConfigError(f"config file {argument!r} does not exist")
            updates = read_yaml(argument) or {}
            if not isinstance(updates, dict):
                raise ConfigError(f"config file {argument!r} must hold a mapping of keys to values")
            source = f"file {argument!r}"
        else:
            raise ConfigError(f"cannot read argument {argument!r}: give key=value or a .yaml file")
        for key, value in updates.items():
            key = names.canonical_key(key, defaults)
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


SEED_LIMIT = 2**32  # seeds are 0 .. SEED_LIMIT - 1: numpy's and torch's generators take every one of them


def check_seed(seed) -> None:
    """The `seed` key of both entrypoints: an integer in 0 .. SEED_LIMIT - 1."""
    if not (is_integer(seed) and 0 <= seed < SEED_LIMIT):
        raise ConfigError(f"seed must be an integer in 0..{SEED_LIMIT - 1}, got {seed!r}")


def check_device(device: str) -> None:
    """The `device` key of both entrypoints: cpu, auto, cuda or cuda:K, and a GPU that torch
    sees when it names one (a problem found here, not as a traceback when the run starts)."""
    if not (device in ("cpu", "cuda", "auto") or re.fullmatch(r"cuda:[0-9]+", device)):
        raise ConfigError(f"device must be 'cpu', 'cuda', 'cuda:K' or 'auto', got {device!r}")
    if device.startswith("cuda"):
        import torch  # here: configuration stays light for what imports it

        if not torch.cuda.is_available():
            raise ConfigError(f"device={device!r} but torch sees no GPU; use device=cpu")
        if ":" in device and int(device.split(":")[1]) >= torch.cuda.device_count():
            raise ConfigError(f"device={device!r} but torch sees {torch.cuda.device_count()} GPU(s), cuda:0.."
                              f"cuda:{torch.cuda.device_count() - 1}; use one of them or device=cuda")


def is_number(value) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_integer(value) -> bool:
    """An int (not a bool)."""
    return isinstance(value, int) and not isinstance(value, bool)


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
        if not is_number(value):
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


def run_command_line(entrypoint, program: str, defaults: dict, arguments: list[str] | None) -> None:
    """`python <program> [file.yaml] key=value ...` for an entrypoint module: the arguments
    (sys.argv's when None) over `defaults` into its `config` and `output_dir` (each call starts
    afresh, as each launch does), then its `main()`, which checks them. A problem ends the
    program with one line and exit status 2 (exit_on_config_error)."""
    try:
        config, folder = command_line(defaults, None, sys.argv[1:] if arguments is None else arguments)
    except (ValueError, OSError) as problem:
        exit_on_config_error(program, problem)
    entrypoint.config, entrypoint.output_dir = config, folder
    run_or_exit(program, entrypoint.main)


def run_or_exit(program: str, main) -> None:
    """An entrypoint's `main()`; a configuration problem it finds before any work (the output
    folder, the checkpoint to resume) ends the program as on the command line."""
    try:
        main()
    except ConfigError as problem:
        exit_on_config_error(program, problem)


def exit_on_config_error(program: str, problem: Exception) -> None:
    """Print a configuration problem and exit with status 2. Under mpirun every process
    fails the same way: wait (a few seconds at most) until all have printed, so that
    mpirun does not kill one before it could say why."""
    process_index = next((os.environ[v] for v in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "RANK")
                          if v in os.environ), "0")
    sys.stderr.write(f"{program}: configuration error (process {process_index}): {problem}\n")
    sys.stderr.flush()
    from powergossip.launch import launched_by_mpirun  # here: configuration stays light for what imports it

    if launched_by_mpirun():
        from mpi4py import MPI

        everyone_failed = MPI.COMM_WORLD.Ibarrier()
        deadline = time.time() + 10
        while not everyone_failed.Test() and time.time() < deadline:
            time.sleep(0.01)
    sys.exit(2)
