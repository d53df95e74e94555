"""Runs read back from their folders, to set them side by side (`python -m powergossip.plot`,
`python -m powergossip.summary`): which entrypoint wrote a folder, its configuration
(config.yaml), records (metrics.jsonl) and summary.json; the curve of a metric, the data
sent, how far the run got; and labels made of what differs between the runs'
configurations. Bad input (a folder that is not a run, a metric a run does not record) is
a ResultsError whose message is one line, which the commands print before they exit 2.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys

import yaml

from powergossip import figures, runs

TRAIN, GOSSIP = "train.py", "gossip_run.py"
DEFAULT_METRICS = {TRAIN: "accuracy", GOSSIP: "error"}  # the averaged model's test accuracy; the consensus error
POSITIONS = {TRAIN: "epoch", GOSSIP: "step"}  # what a record's place in its run counts (runs.record_position)


class ResultsError(ValueError):
    """Input the commands cannot read: the message (one line) says which and why."""


@dataclasses.dataclass
class Run:
    """A run's folder as written by train.py or gossip_run.py, read."""

    folder: str  # as the user named it
    config: dict  # config.yaml
    records: list[dict]  # metrics.jsonl
    summary: dict | None  # summary.json; None while the run has not finished

    @property
    def entrypoint(self) -> str:
        return TRAIN if "num_epochs" in self.config else GOSSIP

    @property
    def method_key(self) -> str:
        return "optimizer" if self.entrypoint == TRAIN else "algorithm"

    @property
    def length(self) -> int:
        """Epochs (train.py) or steps per setting (gossip_run.py) the run was configured for."""
        return self.config["num_epochs" if self.entrypoint == TRAIN else "num_steps"]


def read(folder: str) -> Run:
    """The run in `folder`: its config.yaml, a mapping with num_epochs (train.py) or num_steps
    (gossip_run.py), and its metrics.jsonl must be there; ResultsError otherwise."""
    if not os.path.isdir(folder):
        raise ResultsError(f"{folder} is not a folder: name the output_dir of a train.py or gossip_run.py run")
    missing = [name for name in ("config.yaml", "metrics.jsonl") if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise ResultsError(f"{folder} is not a run's folder: it has no {' and no '.join(missing)} (name the output_dir "
                           f"of a train.py or gossip_run.py run)")
    try:
        with open(os.path.join(folder, "config.yaml")) as f:
            config = yaml.safe_load(f)
        records = runs.read_metrics(folder)
        summary = None
        if os.path.isfile(os.path.join(folder, "summary.json")):
            with open(os.path.join(folder, "summary.json")) as f:
                summary = json.load(f)
    except (OSError, ValueError, yaml.YAMLError) as problem:
        raise ResultsError(f"{folder}: {' '.join(str(problem).split())}") from None
    if not isinstance(config, dict) or not ("num_epochs" in config or "num_steps" in config):
        raise ResultsError(f"{folder}/config.yaml is not the configuration of a train.py or gossip_run.py run "
                           f"(no num_epochs or num_steps)")
    return Run(folder, config, records, summary)


def read_all(folders: list[str], one_entrypoint: bool = False) -> list[Run]:
    """Every folder's run (`one_entrypoint`: all written by the same entrypoint, whose curves
    share an axis)."""
    found = [read(folder) for folder in folders]
    entrypoints = {run.entrypoint for run in found}
    if one_entrypoint and len(entrypoints) > 1:
        kinds = [f"{', '.join(run.folder for run in found if run.entrypoint == kind)} ({kind})" for kind in (GOSSIP, TRAIN)]
        raise ResultsError(f"{' and '.join(kinds)}: their metrics share no axis; plot them apart")
    return found


def curve(run: Run, metric: str | None) -> tuple[str, list[dict]]:
    """(the metric's full name, its records in order) in `run`. train.py: `metric` is a name
    (`accuracy`: of the averaged model, `test_avg`, where there is one, else the one record of
    that name) or a full name (`loss/train`, `consensus_distance/params_only`; runs.record_tag),
    over workers (no worker's own records). gossip_run.py: a name (`error`,
    `error_to_initial_mean`) of its best setting (lowest final error; the last one seen while
    no setting has ended). None: DEFAULT_METRICS. A run with no records yet has an empty curve."""
    metric = metric or DEFAULT_METRICS[run.entrypoint]
    if not run.records:
        return metric, []
    if run.entrypoint == GOSSIP:
        setting = figures.best_setting(run.records) or run.records[-1]["tags"]
        found = [r for r in run.records if r["name"] == metric and r["tags"] == setting]
        if not found:
            names = sorted({r["name"] for r in run.records})
            raise ResultsError(f"--metric {metric}: {run.folder} (gossip_run.py) records {', '.join(names)}")
        return metric, found
    overall = [r for r in run.records if "worker" not in r["tags"]]
    tags = list(dict.fromkeys(runs.record_tag(r) for r in overall))
    named = [tag for tag in tags if tag == metric or tag.startswith(metric + "/")]
    if f"{metric}/test_avg" in named:
        named = [f"{metric}/test_avg"]
    if len(named) != 1:
        listed = named or tags
        raise ResultsError(f"--metric {metric}: {run.folder} records " + ("it as " if named else "")
                           + f"{', '.join(listed)}" + (": name one" if named else ""))
    return named[0], [r for r in overall if runs.record_tag(r) == named[0]]


def differing_keys(configs: list[dict]) -> list[str]:
    """The configuration keys whose values are not the same in all `configs` (a key some lack
    included), in the order the configurations list them."""
    keys = list(dict.fromkeys(key for config in configs for key in config))
    return [key for key in keys if len({_text(config[key]) if key in config else None for config in configs}) > 1]


def settings(found: list[Run], leave_out: tuple[str, ...] = ()) -> list[str]:
    """Each run's `key=value` settings where it differs from the other runs of its entrypoint
    (keys in `leave_out` left out), as on the command line: "optimizer=power-gossip
    optimizer_num_iterations=2 seed=2"."""
    keys = {entrypoint: [key for key in differing_keys([run.config for run in found if run.entrypoint == entrypoint])
                         if key not in leave_out] for entrypoint in (TRAIN, GOSSIP)}
    return [" ".join(f"{key}={_text(run.config[key])}" for key in keys[run.entrypoint] if key in run.config)
            for run in found]


def labels(found: list[Run]) -> list[str]:
    """The runs' names in a legend: their `settings`, with the folder for a run whose settings
    do not tell it apart (all runs' the same, or another run's)."""
    texts = settings(found)
    return [text if text and texts.count(text) == 1 else " ".join(filter(None, [run.folder, text]))
            for run, text in zip(found, texts)]


def _text(value) -> str:
    """A configuration value as a command line takes it (`true`, `null`, `[0.1, 0.2]`, `ring`)."""
    return value if isinstance(value, str) else json.dumps(value)


def best_setting_name(run: Run) -> str | None:
    """'gamma=0.2' for a gossip_run.py sweep's best setting (None for one setting, or train.py)."""
    if run.entrypoint != GOSSIP:
        return None
    settings = {json.dumps(r["tags"], sort_keys=True) for r in run.records if r["name"] == "error"}
    best = figures.best_setting(run.records)
    return figures.setting_name(best) if best is not None and len(settings) > 1 else None


def megabytes_per_position(record: dict) -> float:
    """MB sent per worker per epoch (train.py) or step (gossip_run.py), from a record's cumulative bits."""
    position = runs.record_position(record)
    return record["bits"] / figures.MEGABYTE_BITS / position if position > 0 else math.nan


def status(run: Run) -> str:
    """'finished' (its summary.json written, for the epochs configured), or how far it got:
    'epoch 2/4' (the last epoch recorded), '3 settings done' (gossip_run.py settings ended)."""
    if run.entrypoint == TRAIN:
        if run.summary is not None and run.summary.get("epochs") == run.config["num_epochs"]:
            return "finished"
        done = max((r["epoch"] for r in run.records), default=0)
        return f"epoch {done:g}/{run.config['num_epochs']}"
    if run.summary is not None:
        return "finished"
    ended = sum(1 for r in run.records if r["name"] == "final_error")
    return f"{ended} setting{'' if ended == 1 else 's'} done"


class Arguments(argparse.ArgumentParser):
    """The commands' argument parser: a bad argument is one line and exit status 2."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: {message} (see --help)\n")
        sys.exit(2)


def exit_on(problem: ResultsError, program: str) -> None:
    sys.stderr.write(f"{program}: {problem}\n")
    sys.exit(2)
