"""What runs share: the output folder (which a run claims before any work, so that it
never overwrites another run's results unasked), results files written atomically (a file
is replaced whole or not at all; `after_results_write` is called after every write), the
`output_dir/metrics.jsonl` writer and reader, the TensorBoard writer and `summary.json`
of both entrypoints, checkpoint files (written atomically, verified and checked when
read), the divergence check of both entrypoints, the memory a process may still allocate,
and train.py's run infrastructure: timers, checkpoints agreed between processes (what they
hold is train.py's), progress, stop requests. Reading and checking
configurations is configuration.py's.
"""
from __future__ import annotations

import collections
import contextlib
import glob
import hashlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
import warnings
import zipfile

import numpy as np
import torch
import yaml

from powergossip import configuration
from powergossip.errors import ConfigError


# --- the output folder -----------------------------------------------------------------------
RESULTS = ("config.yaml", "metrics.jsonl", "summary.json", "tensorboard", "checkpoints", "curves.png", "error_vs_bits.png")


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


def resolved_output_dir(folder: str) -> str:
    """`folder` as the system will find it once the folders it lacks are made: an absolute
    path with every symbolic link and '..' resolved, part by part, without needing it to
    exist (`missing/..` is the folder that holds `missing`, as it will be once `missing` is
    made). Every check of an output folder looks at this path, never at the raw one.
    ConfigError when a part that exists is not a folder: such a path can never be made."""
    folder = os.fspath(folder)
    current = os.sep if os.path.isabs(folder) else os.getcwd()
    for part in folder.split(os.sep):
        if part in ("", "."):
            continue
        if part == "..":
            current = os.path.dirname(current)
            continue
        current = os.path.join(current, part)
        if os.path.islink(current):
            current = os.path.realpath(current)
        if os.path.lexists(current) and not os.path.isdir(current):
            raise ConfigError(f"cannot write to output_dir {folder}: {current} is not a folder; choose another output_dir")
    return current


def stored_config_problem(folder: str) -> str | None:
    """Why the run in `folder` cannot be resumed from its `config.yaml` (None: it can, or
    there is none): the file must hold the mapping of keys to values that a run writes."""
    path = os.path.join(folder, "config.yaml")
    if not os.path.exists(path):
        return None
    try:
        stored = configuration.read_yaml(path)
    except ConfigError as problem:
        what = str(problem)
    else:
        if isinstance(stored, dict):
            return None
        what = f"{path} is empty" if stored is None else \
            f"{path} holds a {type(stored).__name__}, where a run writes a mapping of keys to values"
    return (f"resume=true but {what}; put back the config.yaml the run wrote, or start afresh in another output_dir "
            f"(or with overwrite=true, which deletes this run's results)")


def output_dir_problem(folder: str, resume: bool, overwrite: bool, can_resume: bool = True) -> str | None:
    """Why a run may not write into `folder` (None: it may, and this process now holds the
    folder's lock): a folder holding another run's results needs resume=true (continue
    that run) or overwrite=true (replace it); a run to resume needs the configuration it
    wrote; a folder another run is writing to is refused. `folder` is read as
    `resolved_output_dir` reads it."""
    if resume and overwrite:
        return "resume=true and overwrite=true contradict each other: continue the run in output_dir or replace it, not both"
    try:
        folder = resolved_output_dir(folder)
    except ConfigError as problem:
        return str(problem)
    if resume and not os.path.isdir(folder):
        return f"resume=true but output_dir {folder} does not exist"
    found = results_in(folder)
    if found and not (resume or overwrite):
        return (f"output_dir {folder} holds another run's results ({', '.join(found)}); "
                + ("pass resume=true to continue that run, " if can_resume else "")
                + "pass overwrite=true to replace it, or choose another output_dir")
    if resume:
        problem = stored_config_problem(folder)
        if problem is not None:
            return problem
    try:
        os.makedirs(folder, exist_ok=True)
        if not _lock(folder):
            return (f"another run is writing to output_dir {folder} right now (it holds {os.path.join(folder, '.lock')}); "
                    f"wait for it to end or choose another output_dir")
    except OSError as problem:
        return f"cannot write to output_dir {folder}: {problem}"
    return None


_LOCKS: dict[str, int] = {}  # folder -> descriptor holding its lock, for as long as this process uses it


def _lock(folder: str) -> bool:
    """An exclusive lock on `folder/.lock` (the system drops it when the process ends, crashed
    or not); False when another process holds it. A process may claim its own folder again."""
    import fcntl

    key = os.path.realpath(folder)
    if key in _LOCKS:
        return True
    descriptor = os.open(os.path.join(folder, ".lock"), os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(descriptor)
        return False
    _LOCKS[key] = descriptor
    return True


def release_output_dir(folder: str) -> None:
    """A finished run lets go of its folder's lock."""
    descriptor = _LOCKS.pop(os.path.realpath(folder), None)
    if descriptor is not None:
        os.close(descriptor)


def claim_output_dir(output_dir: str | None, label: str, resume: bool, overwrite: bool, comm, started: float,
                     can_resume: bool = True) -> str:
    """The folder this run writes to, the same on every process (comm: a comm.Communicator),
    settled before any work: a new runs/<date>-<time>-<label> when output_dir is None, else
    output_dir resolved (`resolved_output_dir`: the path returned is the one checked); a
    folder with another run's results only with resume=true or overwrite=true (which
    deletes those results). The temporary files of writes a killed run left
    (`interrupted_writes`) are removed once the folder is claimed. Raises ConfigError on
    every process otherwise."""
    folder, problem = output_dir, None
    if comm.process_index == 0:
        if folder is None and resume:
            problem = "resume=true needs output_dir=<the folder of the run to continue>"
        else:
            if folder is None:
                folder = fresh_output_dir(label, started)
                print(f"results go to {folder} (set output_dir to choose)", flush=True)
            else:
                try:
                    folder = resolved_output_dir(folder)  # `missing/../run` is `run`: checked, claimed and written there
                except ConfigError as error:
                    problem = str(error)
            problem = problem or output_dir_problem(folder, resume, overwrite, can_resume)
        if problem is None and overwrite:
            remove_results(folder)
        if problem is None:  # this process holds the folder's lock: no write of another run is under way
            for path in interrupted_writes(folder):
                os.remove(path)
    folder, problem = comm.gather_objects((folder, problem))[0]
    if problem is not None:
        raise ConfigError(problem)
    return folder


def remove_results(folder: str) -> None:
    """overwrite=true: delete the results a run writes (and nothing else) from `folder`."""
    for name in results_in(folder):
        path = os.path.join(folder, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def interrupted_writes(folder: str) -> list[str]:
    """The temporary files (`write_file`'s `<name>.tmp`) that writes stopped by a kill left in
    the run folder `folder`, beside its results and in its checkpoints/. Nothing reads them and
    they are no results; a run that claims the folder removes them."""
    found = [os.path.join(folder, name + TEMPORARY) for name in RESULTS]
    checkpoints = os.path.join(folder, "checkpoints")
    if os.path.isdir(checkpoints):
        found += [os.path.join(checkpoints, name) for name in os.listdir(checkpoints) if name.endswith(TEMPORARY)]
    return [path for path in found if os.path.isfile(path)]


# Instructions to one launch, not part of a run: a config.yaml given to a new run must
# not make it continue or replace anything.
LAUNCH_KEYS = ("resume", "overwrite", "accept_metrics_gap")


def after_results_write(path: str) -> None:
    """Called after every write to a run's results (a file replaced or removed, a record
    appended to metrics.jsonl, a checkpoint saved), with the file's path. Does nothing: a
    test replaces it to stop a run after its k-th write, as a kill at that moment would."""


TEMPORARY = ".tmp"  # the suffix of a file being written (write_file)


def write_file(path: str, write, binary: bool = False, before_replace=None) -> None:
    """Replaces `path` atomically with what `write(file)` writes: into `path.tmp`, flushed and
    fsynced, then (after `before_replace()`, when given) renamed over `path`, and the rename
    made durable. At every moment `path` is the old file or the new one, whole; an error
    while writing leaves `path` as it was."""
    temporary = path + TEMPORARY
    try:
        with open(temporary, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    if before_replace is not None:
        before_replace()
    os.replace(temporary, path)
    folder = os.open(os.path.dirname(path) or ".", os.O_RDONLY)
    try:
        os.fsync(folder)  # the rename itself survives a power cut
    finally:
        os.close(folder)
    after_results_write(path)


def write_config(output_dir: str, config: dict) -> None:
    """`output_dir/config.yaml`: the run's configuration, which reproduces it when given back."""
    os.makedirs(output_dir, exist_ok=True)
    kept = {key: value for key, value in config.items() if key not in LAUNCH_KEYS}
    write_file(os.path.join(output_dir, "config.yaml"), lambda f: yaml.safe_dump(kept, f, sort_keys=False))


class MetricsFile:
    """`output_dir/metrics.jsonl`, one JSON object per metric record: it starts as a file
    holding `records` (a resumed run's history; none for a new run), which replaces any
    older file in one atomic step, then each record is appended and flushed."""

    def __init__(self, output_dir: str, records: list[dict] = ()):
        os.makedirs(output_dir, exist_ok=True)
        self.path = os.path.join(output_dir, "metrics.jsonl")
        write_file(self.path, lambda f: f.writelines(json.dumps(record) + "\n" for record in records))
        self._file = open(self.path, "a")

    def write(self, record: dict) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        after_results_write(self.path)

    def close(self) -> None:
        self._file.close()


def read_metrics(path: str) -> list[dict]:
    """All records of a metrics.jsonl file (a folder holding one is accepted too). A last
    line cut short (a run killed while writing it) is left out; a damaged line elsewhere
    is an error naming the file and line."""
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    with open(path) as f:
        lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
    records = []
    for number, line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as problem:
            if number == lines[-1][0] and not line.endswith("\n"):
                warnings.warn(f"{path}: line {number} was cut short (a run stopped while writing it); left out")
                break
            raise ValueError(f"{path}: line {number} is not a JSON record ({problem})") from None
    return records


def record_position(record: dict) -> float:
    """Where a record stands in its run: the epoch of a train.py record, the step of a gossip_run.py one."""
    return record["epoch"] if "epoch" in record else record["step"]


def record_tag(record: dict) -> str:
    """A record's name and tag values, `/`-joined (null values left out): `accuracy/test_avg`,
    `consensus_distance/params_only`, `error/sign_choco/0.2`. TensorBoard's tag for it, and how
    `python -m powergossip.plot --metric` names a curve."""
    return "/".join([record["name"]] + [str(value) for value in record["tags"].values() if value is not None])


def tensorboard_writer(folder: str, kept: list[dict] | None = None):
    """A TensorBoard writer into `folder/tensorboard` (None without the tensorboard package).
    A resumed run (`kept`: the records metrics.jsonl keeps) rewrites TensorBoard's records
    from them and then removes the earlier event files, which may hold epochs after the
    checkpoint that a stopped launch wrote: every epoch is shown once."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    earlier = glob.glob(os.path.join(folder, "tensorboard", "events.out.tfevents.*")) if kept is not None else []
    writer = SummaryWriter(os.path.join(folder, "tensorboard"))
    for record in kept or []:
        to_tensorboard(writer, record)
    writer.flush()  # the records are in the new file before the old files go
    for path in earlier:
        os.remove(path)
    return writer


def to_tensorboard(writer, record: dict) -> None:
    """A record without a "worker" tag, tagged `record_tag`, against its epoch (train.py) or step
    (gossip_run.py), under `by_kB_sent/` against the kB sent per worker and, when it has a
    simulated time (the simulated clock's), under `by_simulated_us/` against its microseconds."""
    if "worker" in record["tags"]:
        return
    tag = record_tag(record)
    writer.add_scalar(tag, record["value"], int(record_position(record)))
    writer.add_scalar(f"by_kB_sent/{tag}", record["value"], round(record["bits"] / 8e3))  # the paper's x-axis
    if "simulated_time_s" in record:  # integer steps: microseconds keep a consensus run's steps apart
        writer.add_scalar(f"by_simulated_us/{tag}", record["value"], round(record["simulated_time_s"] * 1e6))


def write_summary(folder: str, summary: dict) -> None:
    """`folder/summary.json`, replaced atomically: a finished run's final numbers (written last, it
    marks the run as finished)."""
    write_file(os.path.join(folder, "summary.json"), lambda f: json.dump(summary, f))


# --- checkpoint files --------------------------------------------------------------------------
class CorruptCheckpoint(Exception):
    """A checkpoint file that cannot be trusted (truncated, empty, bytes changed)."""


def write_atomically(path: str, state: dict, previous: str | None = None) -> None:
    """torch.save `state` to `path` with `write_file`, after the old file was linked as
    `previous` (when given): at every moment `path` is a whole file, old or new."""
    def keep_previous():
        if previous is not None and os.path.exists(path):
            try:
                os.link(path, previous + TEMPORARY)
            except FileExistsError:
                os.remove(previous + TEMPORARY)
                os.link(path, previous + TEMPORARY)
            except OSError:  # a file system without hard links
                shutil.copyfile(path, previous + TEMPORARY)
            os.replace(previous + TEMPORARY, previous)
    write_file(path, lambda f: torch.save(state, f), binary=True, before_replace=keep_previous)


def read_verified(path: str) -> dict:
    """A file written by `write_atomically`, after checking every entry's CRC-32 (torch.save
    writes a zip archive whose entries carry one; torch.load does not check them).
    CorruptCheckpoint names the path and what is wrong."""
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


# --- memory ----------------------------------------------------------------------------------
def available_memory(sharing: int = 1) -> tuple[int, str]:
    """(bytes this process may still allocate, where that bound comes from): the smallest of the
    machine's available memory (MemAvailable of /proc/meminfo, else the free pages) and the
    cgroup's (memory.max less memory.current, cgroup v2), each split between `sharing` processes
    of this machine, and this process's address-space limit (ulimit -v, RLIMIT_AS) less what it
    maps already. For a check before a run's big allocations."""
    import resource

    page = os.sysconf("SC_PAGE_SIZE")
    found = []
    try:
        with open("/proc/meminfo") as f:
            kilobytes = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        found.append((kilobytes * 1024 // sharing, "MemAvailable in /proc/meminfo"))
    except (OSError, StopIteration, ValueError, IndexError):
        with contextlib.suppress(ValueError, OSError):
            found.append((os.sysconf("SC_AVPHYS_PAGES") * page // sharing, "the free memory pages"))
    with contextlib.suppress(OSError, ValueError):
        with open("/sys/fs/cgroup/memory.max") as limit, open("/sys/fs/cgroup/memory.current") as used:
            text = limit.read().strip()
            if text != "max":
                found.append((max(0, int(text) - int(used.read())) // sharing, "the cgroup's memory.max"))
    with contextlib.suppress(OSError, ValueError):
        with open("/proc/self/statm") as f:
            mapped = int(f.read().split()[0]) * page
        soft = resource.getrlimit(resource.RLIMIT_AS)[0]
        if soft != resource.RLIM_INFINITY:
            found.append((max(0, soft - mapped), f"the address-space limit (ulimit -v) less the {mapped / 1e9:.3g} GB "
                                                 f"this process maps"))
    return min(found) if found else (sys.maxsize, "no limit known")


# --- divergence (both entrypoints) -------------------------------------------------------------
class DivergenceCheck:
    """Divergence, one rule for both entrypoints: a value that is not finite or is above
    `max_ratio` times the `reference`, the run's first value (None until it is known: then
    only finiteness is checked). train.py: every worker's loss against max_loss_ratio times
    the mean loss over all workers at the run's first step (LossCheck); gossip_run.py: a
    setting's consensus error against its error at step 0 (max_ratio 1)."""

    def __init__(self, max_ratio: float, reference: float | None = None):
        self.max_ratio, self.reference = max_ratio, reference

    @property
    def bound(self) -> float:
        return math.inf if self.reference is None else self.max_ratio * self.reference

    def diverged(self, values) -> torch.Tensor:
        """Whether any of `values` (a tensor, read where it lies without waiting for it, or a
        number) diverged: a boolean tensor on the values' device."""
        return self.diverged_each(values).any()

    def diverged_each(self, values) -> torch.Tensor:
        """Whether each of `values` diverged (`diverged`, value by value)."""
        if not isinstance(values, torch.Tensor):
            values = torch.tensor(values, dtype=torch.float64)
        return ~torch.isfinite(values) | (values > self.bound)


# --- train.py's run infrastructure ---------------------------------------------------------------
def position(epoch: int, steps: int) -> str:
    """Where a run is after `epoch` whole epochs and `steps` steps of the next one, for
    messages: epochs counted from 1 as in the metrics ("epoch 2 step 3": 3 steps into the
    second epoch; "the end of epoch 1")."""
    if steps == 0:
        return "the start of the run" if epoch == 0 else f"the end of epoch {epoch}"
    return f"epoch {epoch + 1} step {steps}"


class Timers:
    """Time per labelled section. On a GPU, CUDA events recorded in the stream time the
    device's work without synchronizing (the queue of launched work never drains; a
    section's time is the device time between its start and end); elsewhere wall clock.
    `cut()` closes the sections timed so far and gives a function that reads them once the
    device has passed them (train.py reads an epoch's when its records are written, so
    the host never waits for the device here); each label keeps a running count, sum and
    sum of squares, so a read costs the same at epoch 300 as at epoch 1."""

    def __init__(self, device: torch.device):
        self.on_gpu = device.type == "cuda"
        self.pending: dict[str, list] = {}  # label -> seconds, or (start, end) events not yet cut
        self.labels: dict[str, None] = {}  # every label timed, in the order first timed
        self.unread = collections.deque()  # the cuts not read yet, oldest first: (their samples, what reading gives)
        self.totals: dict[str, list[float]] = {}  # label -> [count, sum, sum of squares] of the samples read

    @contextlib.contextmanager
    def __call__(self, label):
        start = _event() if self.on_gpu else time.perf_counter()
        yield
        sample = (start, _event()) if self.on_gpu else time.perf_counter() - start
        self.labels.setdefault(label)
        self.pending.setdefault(label, []).append(sample)

    def cut(self):
        """The sections timed so far: (every label timed up to now, in the order first timed; a
        function that gives label -> (mean, standard deviation, count) of their seconds with every
        earlier cut's, reading the earlier cuts first and waiting for their last event if the
        device has not passed it)."""
        cut = [self.pending, None]  # [its samples, what reading it gives]
        self.pending = {}
        self.unread.append(cut)

        def summary() -> dict[str, tuple[float, float, int]]:
            while cut[1] is None:
                self._read_oldest()
            return cut[1]
        return list(self.labels), summary

    def _read_oldest(self) -> None:
        """Folds the oldest unread cut's samples into the running totals; the cut gives their state then."""
        cut = self.unread.popleft()
        for label, taken in cut[0].items():
            if not isinstance(taken[-1], float):
                taken[-1][1].synchronize()  # the device's events are recorded in order: all are done
            seconds = np.array([s if isinstance(s, float) else s[0].elapsed_time(s[1]) / 1e3 for s in taken])
            total = self.totals.setdefault(label, [0, 0.0, 0.0])
            total[0] += len(seconds)
            total[1] += float(seconds.sum())
            total[2] += float(np.square(seconds).sum())
        cut[1] = {label: (total / count, math.sqrt(max(squares / count - (total / count) ** 2, 0.0)), count)
                  for label, (count, total, squares) in self.totals.items()}


def _event() -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


class LossCheck(DivergenceCheck):
    """train.py's: stops the run when a worker's loss diverges (DivergenceCheck, with
    max_ratio = max_loss_ratio; a loss of 1e23 is finite, and so is a model it saved). The
    reference is the mean loss over all workers at the run's first step (`initial_loss`: a
    resumed run's, kept by its checkpoints). On a GPU the steps are checked in blocks of
    `lag` consecutive steps, about 25 kernels a block where each step's check took about 16
    (the host launches each kernel, and a training step's launches are time the device
    waits); a block's verdicts (and mean losses, for the progress bar) are copied to the host
    without waiting and read once its last step is `lag` steps old, so the host may launch
    that many steps ahead of the device: a step is read `lag` to 2 `lag` - 1 steps later. The
    run's first step is a block of its own, read at the second, for the reference. Elsewhere
    step t is read at step t+1. The read points depend on the steps alone, the same on every
    process. `finish()` reads every step before anything is saved.

    On the device, `diverged_at` keeps where each local worker's loss first diverged. Unless
    `deferred` (None: on a GPU), train.py reads every step (`finish()`) before an epoch's
    records are taken; deferred, that would make the host wait for the epoch's last step, so
    the records carry `diverged_at` instead: it is gathered over processes with them
    (metrics.end_of_epoch) and, if any worker diverged, they are never written and
    `divergence` gives the error that every process raises."""

    LAG = 8  # steps the host may run ahead of a GPU

    def __init__(self, comm, checkpoints, max_loss_ratio: float, initial_loss: float | None,
                 deferred: bool | None = None):
        super().__init__(max_loss_ratio, initial_loss)
        self.comm, self.checkpoints = comm, checkpoints
        self.on_gpu = comm.device.type == "cuda"
        self.lag = self.LAG if self.on_gpu else 1
        self.deferred = self.on_gpu if deferred is None else deferred
        self.block = []  # (losses, epoch, step, rows) of the steps watched since the last block was checked
        self.watched = 0  # steps watched so far
        # the checked blocks, oldest first: (host [[diverged, mean loss]] per step, the block, event, the index of its
        # last step among the steps watched)
        self.pending = collections.deque()
        self.spare = {}  # steps in a block -> pinned host buffers read and free again
        # per local worker, (epoch, step, loss) where its loss first diverged (epoch and step from 0, as `watch` gets
        # them; epoch -1: never)
        self._diverged_at = torch.full((comm.num_local, 3), -1.0, dtype=torch.float64, device=comm.device)
        self.found = None  # the divergence a read found (its error)
        self.mean_loss = float("nan")

    @property
    def diverged_at(self) -> torch.Tensor:
        """`[local workers, 3]` on the device, every step watched so far checked."""
        self._check_block()
        return self._diverged_at

    def watch(self, losses, epoch, step, rows=slice(None)):
        """Step `step` of epoch `epoch` (from 0) gave the local workers `rows` (a slice; all of
        them by default) `losses`."""
        while self.pending and (self.watched - self.pending[0][3] >= self.lag or self.reference is None):
            self._read_oldest()
        if self.block and self.block[-1][1:] != (epoch, step - 1, rows):  # a block's steps follow each other
            self._check_block()
        self.block.append((losses, epoch, step, rows))
        self.watched += 1
        if len(self.block) >= self.lag or self.reference is None:
            self._check_block()

    def _check_block(self):
        """Launches the check of the steps watched since the last block (as a block): the first
        step at which each worker's loss diverged, and each step's verdict and mean loss copied
        to the host."""
        if not self.block:
            return
        losses = torch.stack([watched[0] for watched in self.block])  # [steps, workers]
        _, epoch, first_step, rows = self.block[0]
        each = self.diverged_each(losses)  # with the reference from the second step on, as the host's reading
        at = self._diverged_at[rows]
        first = each.any(0) & (at[:, 0] < 0)
        where = each.byte().argmax(0)  # each worker's first diverged step in the block (argmax: the first maximum)
        at[:, 0].masked_fill_(first, epoch)  # numbers, not host tensors: no copy to the device
        at[:, 1] = torch.where(first, where + first_step, at[:, 1])
        at[:, 2] = torch.where(first, losses.double().gather(0, where[None])[0], at[:, 2])
        steps = len(self.block)
        spare = self.spare.setdefault(steps, [])
        host = spare.pop() if spare else torch.zeros(steps, 2, pin_memory=self.on_gpu)
        host.copy_(torch.stack([each.any(1).float(), losses.mean(1)], 1), non_blocking=True)
        self.pending.append((host, self.block, _event() if self.on_gpu else None, self.watched - 1))
        self.block = []

    def finish(self):
        self._check_block()
        while self.pending:
            self._read_oldest()

    def divergence(self, everyone) -> FloatingPointError | None:
        """The divergence in `everyone`, every worker's `diverged_at` gathered over processes in
        worker order (host numbers, `[n_workers, 3]`): None if no worker diverged, else the
        error to raise. If a worker of this process was the first to diverge (the lowest worker
        of the earliest step), the one naming the step and its workers' losses (`finish`, which
        reads every step of this process); otherwise one naming that worker and its step."""
        diverged = [(epoch, step, worker, loss) for worker, (epoch, step, loss) in enumerate(everyone) if epoch >= 0]
        if not diverged:
            return None
        epoch, step, worker, loss = min(diverged)
        with contextlib.suppress(FloatingPointError):
            self.finish()  # also sets the reference that the message gives
        if self.found is not None and self.comm.is_local(worker):
            return self.found
        return FloatingPointError(f"the loss of worker {worker} became {loss} at {position(int(epoch), int(step) + 1)} "
                                  f"(a worker of process {self.comm.process_of(worker)}; {self._stopped()}")

    def finish_everywhere(self):
        """`finish()` on every process at once, before a save that no process's divergence may
        precede: raises on every process the `divergence` of any worker in the steps watched so
        far. Collective; the steps are read first, so the device values it sums cost no wait."""
        with contextlib.suppress(FloatingPointError):  # raised below, once every process knows
            self.finish()
        comm = self.comm
        everyone = np.zeros((comm.n_workers, 3))
        everyone[comm.first_worker:comm.first_worker + comm.num_local] = self.diverged_at.cpu().numpy()
        error = self.divergence(comm.sum_over_processes(everyone))  # each row is one process's: the sum is that row
        if error is not None:
            raise error

    def _read_oldest(self):
        host, block, event, _ = self.pending.popleft()
        if event is not None:
            event.synchronize()
        verdicts = host.tolist()
        self.spare[len(block)].append(host)
        for (diverged, self.mean_loss), (losses, epoch, step, _) in zip(verdicts, block):
            if self.reference is None:  # the run's first step: the same bound on every process
                comm = self.comm
                self.reference = float(comm.sum_over_processes(np.array([self.mean_loss * comm.num_local]))[0]
                                       / comm.n_workers)
            if diverged:
                self.pending.clear()  # the steps not read yet are not (diverged_at has them)
                comm = self.comm
                self.found = self.found or FloatingPointError(  # a later read keeps the first divergence found
                    f"the loss became {losses.tolist()} at {position(epoch, step + 1)} (local workers "
                    f"{comm.first_worker}..{comm.first_worker + comm.num_local - 1}; {self._stopped()}")
                raise self.found

    def _stopped(self) -> str:
        """The end of a divergence's message: what divergence is, what was kept."""
        return (f"divergence is a loss that is not finite or above max_loss_ratio={self.max_ratio:g} x the first step's "
                f"{self.reference:.4g}); nothing was saved from this state. {self.last_good()}")

    def last_good(self) -> str:
        checkpoints = self.checkpoints
        if checkpoints.last is None:
            return "No checkpoint was saved before: start again with a smaller learning_rate or optimizer_diffusion_rate."
        return (f"The last good checkpoint ({position(*checkpoints.last)}) is kept in {checkpoints.folder}: continue it "
                f"with resume=true and a smaller learning_rate (or start a new run with a smaller optimizer_diffusion_rate).")


def megabytes(bytes_sent: float) -> str:
    """Bytes as progress shows them, in every line and in the bar: MB (10^6 bytes), three decimals."""
    return f"{bytes_sent / 1e6:.3f}"


class Progress:
    """What the first process shows while a run trains (the others show nothing). In a
    terminal, a tqdm bar of the steps with the latest mean loss (once one is known: never
    nan), the last epoch's averaged-model test accuracy (once evaluated) and the MB sent per
    worker so far, the mean over all workers as in the epoch lines; all three are set at
    every step, so that each of tqdm's refreshes shows them up to date. Otherwise (a log
    file, mpirun, CI): a line at the end of every epoch and, inside long epochs, a line
    every `interval` seconds of wall time. `started` is when the run began (earlier launches
    of a resumed run included); `terminal` and `clock` are there for tests."""

    interval = 60.0  # seconds between lines inside an epoch when there is no terminal

    def __init__(self, is_root: bool, num_epochs: int, steps_per_epoch: int, steps_done: int, started: float,
                 terminal: bool | None = None, clock=time.time):
        self.is_root, self.num_epochs, self.steps_per_epoch = is_root, num_epochs, steps_per_epoch
        self.done, self.started, self.clock = steps_done, started, clock
        self.last_line = clock()
        self.loss, self.accuracy, self.bytes_per_worker = math.nan, None, 0.0
        self.bar = None
        if is_root and (sys.stderr.isatty() if terminal is None else terminal):
            from tqdm import tqdm

            # No rate: the numbers after it fit an 80-column terminal (tqdm cuts what does not).
            self.bar = tqdm(total=num_epochs * steps_per_epoch, initial=steps_done, unit="step", dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")

    def step(self, epoch: int, step: int, mean_loss: float, bytes_per_worker: float) -> None:
        """Step `step` of epoch `epoch` (both from 0) is done; `mean_loss`: the latest known
        mean loss of this process's workers (nan before the first); `bytes_per_worker`: the
        bytes sent so far per worker, the mean over all workers (StopRequests.requested's)."""
        self.done += 1
        if not self.is_root:
            return
        self.loss, self.bytes_per_worker = mean_loss, bytes_per_worker
        if self.bar is not None:
            self.bar.set_postfix_str(self.postfix(), refresh=False)
            self.bar.update(1)  # tqdm redraws at most every mininterval (0.1 s), with the postfix just set
        elif self.clock() - self.last_line >= self.interval and step + 1 < self.steps_per_epoch:
            self.last_line = self.clock()
            loss = f"{mean_loss:.4f}" if math.isfinite(mean_loss) else "not known yet"
            print(f"epoch {epoch + 1}/{self.num_epochs} step {step + 1}/{self.steps_per_epoch}: recent train loss {loss}, "
                  f"{megabytes(bytes_per_worker)} MB sent per worker, {self.times()}", flush=True)

    def end_of_epoch(self, epoch: int, recorder) -> None:
        """Epoch `epoch` (from 1) is done and recorded (a metrics.Recorder): its line, or, in the
        bar, its test accuracy and the MB of its line."""
        self.last_line = self.clock()
        if not self.is_root:
            return
        if self.bar is None:
            print(f"{recorder.epoch_line(epoch, self.num_epochs)}, {self.times()}", flush=True)
        else:
            self.accuracy, self.bytes_per_worker = recorder.last_test_avg, recorder.bits / 8
            self.bar.set_postfix_str(self.postfix())  # redrawn now: evaluation took a while

    def postfix(self) -> str:
        """The bar's numbers: `loss=0.512, test_acc=87.50%, MB/worker=0.654` (loss and
        accuracy once known)."""
        shown = [f"loss={self.loss:.3f}"] if math.isfinite(self.loss) else []
        shown += [] if self.accuracy is None else [f"test_acc={self.accuracy:.2%}"]
        return ", ".join(shown + [f"MB/worker={megabytes(self.bytes_per_worker)}"])

    def times(self) -> str:
        """Wall time so far and an estimate of the rest, from the fraction of all steps done."""
        elapsed = self.clock() - self.started
        fraction = self.done / (self.num_epochs * self.steps_per_epoch)
        left = f"about {duration(elapsed * (1 - fraction) / fraction)} left" if fraction > 0 else "time left not known yet"
        return f"{duration(elapsed)} elapsed, {left}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def duration(seconds: float) -> str:
    """'45 s', '12 min', '3 h 05 min'."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds // 3600:.0f} h {seconds % 3600 / 60:02.0f} min"


def fingerprint(files: dict[str, str]) -> dict[str, list]:
    """What the files that define a run hold: label -> [size in bytes, BLAKE2b digest of the
    bytes, the path read] for each of `files` (label -> path: train.py's graph and data files).
    Checkpoints keep it; a resume compares sizes and digests, never paths (data_dir may move)."""
    found = {}
    for label, path in files.items():
        with open(path, "rb") as f:
            digest = hashlib.file_digest(f, lambda: hashlib.blake2b(digest_size=16)).hexdigest()
            found[label] = [os.fstat(f.fileno()).st_size, digest, os.path.abspath(path)]
    return found


def fingerprint_changes(then: dict, now: dict) -> list[str]:
    """How the files of fingerprint `now` differ from those of `then`, one phrase each."""
    changes = []
    for label in dict.fromkeys(list(then) + list(now)):
        if label not in now:
            changes.append(f"{label} ({then[label][2]} when the run started) is not read now")
        elif label not in then:
            changes.append(f"{label} ({now[label][2]}) was not read when the run started")
        elif then[label][:2] != now[label][:2]:
            changes.append(f"{label} ({now[label][2]}) holds other bytes than when the run started "
                           f"({now[label][0]} bytes now, {then[label][0]} then)")
    return changes


class Checkpoints:
    """This process's checkpoint `rank{r}.pt` and the one before it, `rank{r}.previous.pt` (kept
    so that a file damaged on disk costs one checkpoint interval, not the run). Written
    atomically with fsync, CRC-checked and its contents checked when read (a malformed
    save counts as damaged); before any process loads, all agree on the save they continue
    from (epoch, step, run id).

    A save is a dict: the `header` (where the run is, the launch layout, the run's id and
    configuration, the fingerprint of the files that define it), which is all this class
    reads (of the rest it checks only that every tensor is finite; `agreed`'s `check` is the
    run's), and whatever the run keeps beside it (train.py's `snapshot`): what
    torch.load(weights_only=True) reads back (tensors, numbers, strings, lists, dicts, None).

    A save is written by a thread of its own from a host copy of the state, while the run
    trains on (serializing and syncing to disk held an H100 run 35 ms a save, the device
    idle); `wait()` returns once it is on disk, and leaving the context (`with checkpoints:`),
    however the run ends, waits for it."""

    def __init__(self, folder: str, comm, fingerprint: dict | None = None):
        self.folder, self.comm, self.fingerprint = folder, comm, fingerprint  # fingerprint: of the files that define the run
        self.path = os.path.join(folder, f"rank{comm.process_index}.pt")
        self.previous = os.path.join(folder, f"rank{comm.process_index}.previous.pt")
        self._last = None  # (epoch, step) of the checkpoint on disk that this run wrote or resumed
        self._writing = None  # (the thread writing a save, its (epoch, step), [what stopped it]) until joined
        self._failure = None  # what stopped the last save, until raised

    @property
    def last(self) -> tuple[int, int] | None:
        """(epoch, step) of the checkpoint on disk that this run wrote or resumed, once the save
        under way has ended (its error is left for `wait` to raise)."""
        self._join()
        return self._last

    def __enter__(self) -> "Checkpoints":
        return self

    def __exit__(self, kind, error, trace) -> None:
        if kind is None:
            self.wait()
            return
        failure = self._taken_failure()  # the run's own error is the one raised; the save ends whole or not at all
        if failure is not None:
            error.add_note(f"Also, writing the checkpoint {self.path} failed: {failure!r}")

    def header(self, epoch: int, step_in_epoch: int, run: dict) -> dict:
        """What a save starts with: `epoch` whole epochs and `step_in_epoch` steps of the next done,
        the launch layout, `run`, a dict with the run's "run_id" and "config" (and what else
        the run keeps there), and this run's `fingerprint`. A save of an older train.py has no
        "run" or no "fingerprint"."""
        return {"epoch": epoch, "step_in_epoch": step_in_epoch, "layout": [self.comm.n_workers, self.comm.world_size],
                "run": run, "fingerprint": self.fingerprint}

    def save(self, state: dict) -> None:
        """Writes `state` (a header and the run's own entries) in the background, from a copy
        on the host taken now: the run may change its tensors as soon as this returns. A
        non-finite float in it is refused here. An error while writing is raised by `check`
        once the write has ended, or by the next `save` (after it has started its own write)
        or `wait`."""
        copy, finite = _on_host(state)
        if not finite:
            raise FloatingPointError(f"not saving {position(state['epoch'], state['step_in_epoch'])}: some parameters or "
                                     f"optimizer values are not finite")
        earlier = self._taken_failure()  # one save at a time: the one before is whole on disk first
        os.makedirs(self.folder, exist_ok=True)
        failure = []

        def write():
            try:
                # each tensor a storage of its own, as torch.load gives them back (torch.set_rng_state reads a
                # storage from its start); while it is written the host holds the state twice
                write_atomically(self.path, _replaced(copy, torch.Tensor.clone), previous=self.previous)
            except BaseException as problem:  # raised where the run checks or waits for the save
                failure.append(problem)
        thread = threading.Thread(target=write, name=f"checkpoint {self.path}")
        thread.start()
        self._writing = (thread, (state["epoch"], state["step_in_epoch"]), failure)
        if earlier is not None:
            raise earlier

    def wait(self) -> None:
        """Returns once the save under way (if any) is on disk; raises what stopped it."""
        failure = self._taken_failure()
        if failure is not None:
            raise failure

    def check(self) -> None:
        """Raises what stopped the save in the background if it has ended so; never waits."""
        if self._writing is None or not self._writing[0].is_alive():
            self.wait()

    def _join(self) -> None:
        """Waits for the save under way (if any): on disk, it is `last`; stopped, its error waits in `_failure`."""
        if self._writing is not None:
            thread, where, failure = self._writing
            thread.join()
            self._writing = None
            if failure:
                self._failure = failure[0]
            else:
                self._last = where

    def _taken_failure(self) -> BaseException | None:
        """Waits for the save under way (if any); what stopped a save and was not raised yet, or None."""
        self._join()
        failure, self._failure = self._failure, None
        return failure

    def agreed(self, cfg: dict, defaults: dict, may_change: tuple[str, ...], check=None) -> dict:
        """The save every process resumes from, agreed before any process loads: the newest
        one that each process holds intact, in its latest file or in the one before (a file
        damaged on disk, or a crash in the middle of a save that left one process a save
        ahead, costs one checkpoint interval). A file whose header is malformed
        (`header_problem`), that holds a value that is not finite, or that `check(state)`
        finds unusable (the run's own entries: it returns what is wrong, or None) counts as
        damaged; `check` sees only saves of this run's configuration and layout (the others
        are refused below, naming what differs). A missing latest file, a save of another
        layout or run, or no common save stops every process with one message. The save's
        configuration must equal `cfg` but for the keys in `may_change` (keys the run did
        not know yet take their `defaults`), and the files of its fingerprint must hold the
        bytes they held then."""
        layout = [self.comm.n_workers, self.comm.world_size]

        def problem(state):
            found = header_problem(state)
            if found is None and check is not None and list(state["layout"]) == layout and (
                    "run" not in state or not _differences(defaults | state["run"]["config"], cfg, defaults, may_change)):
                found = check(state)
            return found

        state, mine = _read_checkpoint(self.path, problem)
        latest = self.comm.gather_objects(mine)
        where = "; ".join(f"process {index}: {_describe(found)}" for index, found in enumerate(latest))
        if all(found == "missing" for found in latest):
            raise ConfigError(f"resume=true but {self.folder} holds no checkpoint (none was saved yet, checkpoint_every=0 "
                              f"saves only on a signal, or the run wrote elsewhere); to start afresh instead, pass "
                              f"overwrite=true, which deletes the results in {os.path.dirname(self.folder)}")
        for found in latest:
            if isinstance(found, tuple) and found[3] != (self.comm.n_workers, self.comm.world_size):
                raise ConfigError(f"the checkpoints in {self.folder} were written by {found[3][1]} process(es) for "
                                  f"{found[3][0]} workers; resume with the same layout")
        if "missing" in latest:
            raise ConfigError(f"cannot resume from {self.folder}: every process needs its own file, but {where}; "
                              f"restore the missing files")
        if not (all(isinstance(found, tuple) for found in latest) and len(set(latest)) == 1):
            earlier_state, earlier = _read_checkpoint(self.previous, problem)
            both = self.comm.gather_objects((mine, earlier))
            common = set.intersection(*({found for found in pair if isinstance(found, tuple)} for pair in both))
            if not common:
                raise ConfigError(f"cannot resume from {self.folder}: no save is intact on every process ({where}; and the "
                                  f"saves before: {'; '.join(_describe(pair[1]) for pair in both)})")
            chosen = max(common, key=lambda found: found[:2])
            if mine != chosen:  # the newer or damaged file goes aside, so later saves keep a good one before them
                os.replace(self.path, self.path + ".set-aside")
                os.replace(self.previous, self.path)
                state = earlier_state
            if self.comm.process_index == 0:
                warnings.warn(f"resuming from {position(*chosen[:2])}, the newest save intact on every process "
                              f"({where}); files that were newer or damaged are kept as rank<r>.pt.set-aside")
        if "run" not in state:
            if self.comm.process_index == 0:
                warnings.warn(f"{self.path} was written by an older version of train.py: it has no run id and no "
                              f"configuration, so neither could be checked against this run")
        else:
            stored = defaults | state["run"]["config"]
            self._check_same_run(stored, cfg, defaults, may_change)
        self._check_same_files(state.get("fingerprint"))
        self._last = (state["epoch"], state["step_in_epoch"])
        return state

    def _check_same_files(self, then: dict | None) -> None:
        """The files that define the run (`fingerprint`) hold what they held when the run
        started, on every process; a save written before fingerprints is taken with a warning."""
        if self.fingerprint is None:
            return
        changes = self.comm.gather_objects(None if then is None else fingerprint_changes(then, self.fingerprint))
        if None in changes and self.comm.process_index == 0:
            warnings.warn(f"{self.path} was written by an older version of train.py: it has no fingerprint of the files "
                          f"that define the run ({', '.join(self.fingerprint) or 'none'}), so they could not be checked")
        for process, changed in enumerate(changes):
            if changed:
                run_folder = os.path.dirname(self.folder)
                raise ConfigError(
                    "resume=true but the files that define the run changed since it started"
                    + (f" (process {process})" if self.comm.world_size > 1 else "") + ": " + "; ".join(changed)
                    + f". A resumed run reads the same graph and data; put the files back, pass overwrite=true to start "
                    f"afresh (it deletes the results in {run_folder}), or start a new run in another output_dir")

    def _check_same_run(self, stored: dict, cfg: dict, defaults: dict, may_change: tuple[str, ...]) -> None:
        """The save belongs to the run in this folder (its config.yaml) and to the run asked for."""
        def differences(a, b):
            return _differences(a, b, defaults, may_change)

        folder_config = os.path.join(os.path.dirname(self.folder), "config.yaml")
        if os.path.exists(folder_config):
            with open(folder_config) as f:
                recorded = yaml.load(f, Loader=configuration.YamlLoader) or {}
            foreign = differences(recorded, stored)
            if foreign:
                raise ConfigError(f"the checkpoints in {self.folder} do not belong to the run recorded in {folder_config}: "
                                  + ", ".join(f"{key}={stored[key]!r} there, {recorded.get(key)!r} here" for key in foreign))
        changed = differences(stored, cfg)
        if changed:
            raise ConfigError(
                "resume=true with a changed configuration: " + ", ".join(
                    f"{key}={cfg[key]!r} (the run has {stored[key]!r})" for key in changed)
                + f". These define the run; only {', '.join(k for k in may_change if k not in LAUNCH_KEYS)} may change on "
                "resume. Put them back, or start a new run in another output_dir")


def _differences(a: dict, b: dict, defaults: dict, may_change: tuple[str, ...]) -> list[str]:
    """The keys of configuration `b` that `a` (keys it lacks: their `defaults`) has otherwise, but for `may_change`."""
    return [key for key in b if key not in may_change and a.get(key, defaults[key]) != b[key]]


def _read_checkpoint(path: str, problem) -> tuple[dict | None, tuple | str]:
    """(state, (epoch, step, run id, layout)) or (None, "missing" / what is wrong with the
    file: damaged, or what `problem(state)` finds)."""
    if not os.path.exists(path):
        return None, "missing"
    try:
        state = read_verified(path)
    except CorruptCheckpoint as damaged:
        return None, str(damaged)
    found = problem(state)
    if found is not None:
        return None, f"{path} is not a usable checkpoint: {found}"
    return state, (state["epoch"], state["step_in_epoch"], state.get("run", {}).get("run_id"), tuple(state["layout"]))


def header_problem(state) -> str | None:
    """What makes a loaded save unusable for any run (None: nothing): not a dict, a header
    (Checkpoints.header) without its entries or with a value of the wrong type or range,
    or a value anywhere in it that is not finite (a save with NaN is never a good one)."""
    if not isinstance(state, dict):
        return f"it holds a {type(state).__name__}, not a dict"
    for key in ("epoch", "step_in_epoch"):
        if key not in state:
            return f"it has no {key}"
        if not (configuration.is_integer(state[key]) and state[key] >= 0):
            return f"its {key} is {state[key]!r:.60}, not an integer >= 0"
    layout = state.get("layout")
    if not (isinstance(layout, (list, tuple)) and len(layout) == 2
            and all(configuration.is_integer(count) and count >= 1 for count in layout)):
        return f"its layout is {layout!r:.60}, not [workers, processes]"
    if "run" in state:
        run = state["run"]
        if not (isinstance(run, dict) and isinstance(run.get("run_id"), str) and isinstance(run.get("config"), dict)):
            return "its run entry has no run_id or no config"
        for key in ("initial_loss", "elapsed_s"):
            if run.get(key) is not None and not configuration.is_number(run[key]):
                return f"its run's {key} is {run[key]!r:.60}, not a finite number"
    if not _finite(state):
        return "some of its tensors are not finite (NaN or infinite)"
    return None


def mismatch(value, template, where: str = "", lenient: bool = False) -> str | None:
    """Where `value` (a loaded save, or part of one) does not have the form of `template`
    (what this run saves): a dict with every key of the template's, lists of the same length,
    tensors of the same shape and dtype, numbers, strings and bools where the template has
    them; a None in the template takes anything. With `lenient` (a method's state, of which
    older saves hold less and whose per-edge stacks grow as a run goes): the keys the value
    has, and an empty list or a tensor without rows in the template takes any number of
    them (the tensor's rows of its shape and dtype). None: no mismatch; otherwise what
    differs, named by its place (`params[3]`)."""
    name = where or "the save"
    if template is None:
        return None
    if isinstance(template, dict):
        if not isinstance(value, dict):
            return f"{name} is of type {type(value).__name__}, not a dict"
        for key, entry in template.items():
            if key not in value:
                if lenient:
                    continue
                return f"{name} has no {key!r}"
            found = mismatch(value[key], entry, f"{where}.{key}" if where else key, lenient)
            if found is not None:
                return found
        return None
    if isinstance(template, (list, tuple)):
        if lenient and not template and isinstance(value, (list, tuple)):
            return None
        if not isinstance(value, (list, tuple)) or len(value) != len(template):
            found = f"a list of {len(value)}" if isinstance(value, (list, tuple)) else f"of type {type(value).__name__}"
            return f"{name} is {found}, where this run has a list of {len(template)}"
        for index, (item, entry) in enumerate(zip(value, template)):
            found = mismatch(item, entry, f"{name}[{index}]", lenient)
            if found is not None:
                return found
        return None
    if isinstance(template, torch.Tensor):
        if not isinstance(value, torch.Tensor):
            return f"{name} is of type {type(value).__name__}, not a tensor"
        grows = lenient and template.dim() > 0 and template.shape[0] == 0
        if (value.shape[1:] if grows else value.shape) != (template.shape[1:] if grows else template.shape) \
                or value.dim() != template.dim() or value.dtype != template.dtype:
            wanted = ", ".join(["any"] * grows + [str(size) for size in template.shape[grows:]])
            return (f"{name} is a {value.dtype} tensor of shape {list(value.shape)}, where this run has "
                    f"{template.dtype} [{wanted}]")
        return None
    kinds = {bool: (bool,), int: (int,), float: (int, float), str: (str,)}
    kind = next((kinds[k] for k in kinds if isinstance(template, k)), (type(template),))
    if not isinstance(value, kind) or (isinstance(value, bool) and not isinstance(template, bool)):
        return f"{name} is {value!r:.60}, not of type {type(template).__name__}"
    return None


def _describe(found) -> str:
    if isinstance(found, str):
        return "no checkpoint file" if found == "missing" else found
    return f"{position(found[0], found[1])} of run {found[2]}"


def _tensors(value):
    """Every tensor in `value` (dicts, lists, tuples of them), in order."""
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


GATHER_BYTES = 256 * 2**20  # the most a save gathers into one buffer on a device (or one larger tensor), its extra memory there


def _on_host(value) -> tuple:
    """(`value` (dicts, lists, tuples of tensors and other values) with a host copy of every
    tensor, taken once the device has reached this point: the copy keeps the values of now;
    whether every float tensor in it is finite). The tensors are gathered by dtype and device,
    up to GATHER_BYTES at a time, into a buffer there, checked and copied to the host in one go,
    each a view of its part (the save's thread gives each a storage of its own):
    a copy to the host waits for the device, and one per tensor (some 300 of ResNet-20's
    workers, momenta and a method's state) held an H100 run's host about 20 ms a save, the
    device idle."""
    groups = {}  # (dtype, device) -> its buffers' tensors: at most GATHER_BYTES a buffer (or one tensor)
    for tensor in {id(t): t for t in _tensors(value)}.values():  # a tensor given twice is copied once
        buffers = groups.setdefault((tensor.dtype, tensor.device), [[]])
        if buffers[-1] and sum(t.nbytes for t in buffers[-1]) + tensor.nbytes > GATHER_BYTES:
            buffers.append([])
        buffers[-1].append(tensor)
    copies, finite = {}, []
    with torch.no_grad():
        for (dtype, _), buffers in groups.items():
            for tensors in buffers:
                gathered = torch.cat([t.reshape(-1) for t in tensors])  # a copy, also of a host tensor
                if dtype.is_floating_point:
                    finite.append(torch.isfinite(gathered).all())  # read after the copies: no wait of its own
                host = gathered.cpu()
                del gathered  # one buffer at a time on the device
                for tensor, part in zip(tensors, host.split([t.numel() for t in tensors])):
                    copies[id(tensor)] = part.view(tensor.shape)
    return _replaced(value, lambda tensor: copies[id(tensor)]), all(bool(flag) for flag in finite)  # the device is past them


def _replaced(value, replace):
    """`value` (dicts, lists, tuples of tensors and other values) with `replace(tensor)` for every tensor."""
    if isinstance(value, torch.Tensor):
        return replace(value)
    if isinstance(value, dict):
        return {key: _replaced(v, replace) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        items = [_replaced(v, replace) for v in value]
        return items if isinstance(value, list) else tuple(items)
    return value


def _finite(state) -> bool:
    """Whether every float tensor in `state` (dicts, lists, tuples of them) is finite."""
    floats = [t for t in _tensors(state) if t.is_floating_point()]
    return not floats or bool(torch.stack([torch.isfinite(t).all() for t in floats]).all())


class StopRequests:
    """SIGTERM / SIGINT set a flag; every process checks it after each step and all stop
    at the same step (one tiny all-reduce when there are several processes). A context:
    its handlers are installed on entering and the ones before put back on leaving, however
    the run ends (finished, stopped, raised), so that a script goes on after train.main()
    with its own."""

    def __init__(self):
        self.signal_number = 0
        self.bytes_per_worker = 0.0  # bytes sent so far, mean over all workers, as of the last check
        self.previous = {}

    def __enter__(self) -> "StopRequests":
        self.previous = {number: signal.signal(number, self._handler) for number in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exception) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def _handler(self, number, frame):
        self.signal_number = number

    def requested(self, comm) -> bool:
        """Whether a signal reached any process. Collective: every process calls it after each
        step. The all-reduce that spreads the flag also sums the bytes the workers have sent
        (comm.bytes_sent), so `bytes_per_worker`, what the progress bar shows, costs no
        second one."""
        totals = comm.sum_over_processes(np.array([float(self.signal_number), float(comm.bytes_sent.sum())]))
        self.bytes_per_worker = totals[1] / comm.n_workers
        if totals[0] and not self.signal_number:
            self.signal_number = signal.SIGTERM
        return bool(totals[0])
