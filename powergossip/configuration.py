"""Configurations: each entrypoint's flat `config` dict, changed from YAML files and
`key=value` arguments or edited in Python, checked before any work.

    config = configuration.apply_overrides(defaults, ["paper.yaml", "n_workers=16", "topology=torus"])

Values are parsed as YAML (`lr=0.1`, `lr=1e-3`, `warm_start=false`,
`milestones=[150,225]`, `rank=null`) and must have the type of the default: unknown
keys, wrong types and numbers that are not finite are errors that name the key and
what was expected. `checked_training` holds the rules of train.py's configuration
(gossip_run.py's are in its own `check`); a problem ends the program with exit status 2
and one line that says what to change (`command_line_or_exit`, `run_or_exit`).
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

from powergossip import names
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


def apply_overrides(defaults: dict, arguments: list[str]) -> dict:
    """A copy of `defaults` updated from YAML files and `key=value` arguments, in order
    (aliases of a key are read as that key)."""
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
                updates = yaml.load(f, Loader=YamlLoader) or {}
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


def checked_training(cfg: dict, defaults: dict) -> tuple[dict, object]:
    """train.py's configuration checked: a copy, every key by its own name (aliases
    renamed), and the run's topology (built here, once); every problem a ConfigError naming
    the key, raised before any work starts."""
    from powergossip import compressors, data, methods, metrics, models, topologies  # here: configuration stays light

    cfg = with_canonical_keys(defaults, cfg)
    check_config(defaults, cfg)
    try:
        cfg["optimizer"] = methods.registered_name(cfg["optimizer"])  # one spelling, also in config.yaml
    except ValueError as problem:
        raise ConfigError(f"optimizer: {problem}") from None
    try:
        cfg["optimizer_compressor"] = compressors.registered_name(cfg["optimizer_compressor"])
    except ValueError as problem:
        raise setting_problem(problem, {}) from None
    if cfg["n_workers"] < 2:
        raise ConfigError(f"n_workers must be >= 2 (one worker has no one to gossip with), got {cfg['n_workers']}")
    choices = {"task": data.TASKS, "task_architecture": models.NAMES,
               "dtype": ("float32", "bfloat16"), "stacked_compute": ("loop", "vmap", "graph")}
    for key, allowed in choices.items():
        if cfg[key] not in allowed:
            raise ConfigError(f"{key}={cfg[key]!r} is not one of {', '.join(allowed)}")
    if (cfg["task"] == "wikitext2") != (cfg["task_architecture"] == "lstm"):
        raise ConfigError("task=wikitext2 goes with task_architecture=lstm, and lstm with wikitext2 only")
    if cfg["stacked_compute"] == "vmap" and (cfg["task_architecture"] == "lstm" or cfg["dtype"] != "float32"):
        raise ConfigError("stacked_compute=vmap runs image models in float32; use stacked_compute=loop for the LSTM or bfloat16")
    if cfg["stacked_compute"] == "graph" and (cfg["task_architecture"] == "lstm" or not uses_cuda(cfg["device"])):
        raise ConfigError("stacked_compute=graph records a CUDA graph of image models: it needs a GPU (device=cuda) "
                          "and an image task; use stacked_compute=loop otherwise")
    if cfg["compile_replicas"] and cfg["stacked_compute"] != "graph":
        raise ConfigError("compile_replicas=true compiles each replica's forward for the CUDA graph of stacked_compute=graph; "
                          "set stacked_compute=graph (on a GPU) or compile_replicas=false")
    positive = ["batch_size", "num_epochs", "n_workers", "bptt", "graph_streams", "evaluation_batch_size", "local_steps"]
    for key in positive:
        if cfg[key] < 1:
            raise ConfigError(f"{key} must be >= 1, got {cfg[key]}")
    if cfg["local_steps"] > 1 and methods.METHODS[cfg["optimizer"]].acts_on == "gradients":
        raise ConfigError(f"local_steps={cfg['local_steps']}: optimizer={cfg['optimizer']} averages every step's gradients; "
                          f"local steps apply to methods that gossip parameters (use local_steps=1)")
    if not cfg["learning_rate"] > 0:
        raise ConfigError(f"learning_rate must be > 0, got {cfg['learning_rate']}")
    if not 0 <= cfg["decentralized_data_shuffled_ratio"] <= 1:
        raise ConfigError("decentralized_data_shuffled_ratio must be in [0, 1]")
    if cfg["dirichlet_alpha"] is not None and (cfg["use_decentralized_data"] or not cfg["dirichlet_alpha"] > 0):
        raise ConfigError("dirichlet_alpha must be > 0 and cannot be combined with use_decentralized_data")
    if cfg["weight_decay"] < 0 or not 0 <= cfg["momentum"] < 1:
        raise ConfigError("weight_decay must be >= 0 and momentum in [0, 1)")
    if cfg["checkpoint_every"] < 0:
        raise ConfigError("checkpoint_every must be >= 0")
    for key in ("max_batches_per_epoch", "max_test_examples"):
        if cfg[key] is not None and (not is_integer(cfg[key]) or cfg[key] < 1):
            raise ConfigError(f"{key} must be an integer >= 1 (or null for no limit), got {cfg[key]!r}")
    for key in ("gradient_clipping", "dirichlet_alpha"):
        if cfg[key] is not None and not (is_number(cfg[key]) and cfg[key] > 0):
            raise ConfigError(f"{key} must be a positive number (or null: off), got {cfg[key]!r}")
    if cfg["distributed_lr_warmup_epoch"] < 0 or not cfg["distributed_lr_warmup_factor"] > 0:
        raise ConfigError("distributed_lr_warmup_epoch must be >= 0 and distributed_lr_warmup_factor > 0, got "
                               f"{cfg['distributed_lr_warmup_epoch']} and {cfg['distributed_lr_warmup_factor']}")
    if not (cfg["network_latency_s"] >= 0 and cfg["network_bandwidth_bits_per_s"] > 0):
        raise ConfigError(f"network_latency_s must be >= 0 and network_bandwidth_bits_per_s > 0, got "
                          f"{cfg['network_latency_s']} and {cfg['network_bandwidth_bits_per_s']}")
    if not cfg["max_loss_ratio"] > 1:
        raise ConfigError(f"max_loss_ratio must be > 1 (a multiple of the first step's loss), got {cfg['max_loss_ratio']}")
    cfg["lr_schedule_milestones"] = [list(m) if isinstance(m, (list, tuple)) else [m, 0.1] for m in cfg["lr_schedule_milestones"]]
    if any(len(m) != 2 or not is_number(m[0]) or m[0] < 0 or not is_number(m[1]) or m[1] <= 0
           for m in cfg["lr_schedule_milestones"]):
        raise ConfigError(f"lr_schedule_milestones holds [epoch >= 0, factor > 0] pairs or bare epochs, got "
                               f"{cfg['lr_schedule_milestones']}")
    metrics.check_spectrum_logging(cfg)
    try:
        data.check_data_dir(cfg["task"], cfg["data_dir"])
    except FileNotFoundError as problem:
        raise ConfigError(str(problem)) from None
    try:
        topology = topologies.build(cfg["topology"], cfg["n_workers"])  # a size the graph cannot have: now
    except (ValueError, OSError) as problem:
        raise ConfigError(f"topology: {problem}") from None
    check_method(cfg["optimizer"], topology, names.settings_of(cfg))
    return cfg, topology


def uses_cuda(device: str) -> bool:
    import torch

    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def command_line_or_exit(program: str, defaults: dict, output_dir: str, arguments: list[str]) -> tuple[dict, str]:
    """`command_line` (every key known and of its type); a problem ends the program
    (exit_on_config_error). The rest is checked once, by the entrypoint's main()."""
    try:
        config, output_dir = command_line(defaults, output_dir, arguments)
    except (ValueError, OSError) as problem:
        exit_on_config_error(program, problem)
    return config, output_dir


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
