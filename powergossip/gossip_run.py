"""Consensus experiments: how fast do the workers of a graph agree, per bit sent?

Every worker i starts from its own tensor x_i (a random matrix, an image, ...) and
only gossips: no gradients. We record the consensus error

    error = mean over workers of ||x_i - mean(x)||^2

against the bits each worker has sent, for one algorithm and a sweep over its
diffusion rate gamma (and Moniqua's theta), as in the PowerGossip paper's
consensus figures (Vogels, Karimireddy, Jaggi 2020, "Consensus experiments").

    python gossip_run.py algorithm=power_gossip topology=ring n_workers=8 num_steps=1000 optimizer_rank=2
    mpirun -np 8 python gossip_run.py algorithm=power_gossip n_workers=8 num_steps=1000  # same numbers
    python gossip_run.py my_sweep.yaml algorithm=sign_choco output_dir=runs/sign_choco

or from Python: `import gossip_run; gossip_run.config["algorithm"] = "moniqua";
gossip_run.output_dir = "..."; gossip_run.log_metric = my_logger; gossip_run.main()`.

Output (written by worker 0's process): `output_dir/config.yaml`, the figure
`output_dir/error_vs_bits.png` (error relative to its start against bits sent per
worker, every setting of a sweep, the best one bold), `output_dir/tensorboard/` (every
record against the step and the kB sent per worker, as train.py's; none without the
tensorboard package), `output_dir/summary.json`, written last (the best setting, the
one with the lowest final error: "best_setting", "final_error", "initial_error",
"diffusion_rate", "theta", its last "step" and "mb_per_worker" sent by then; "settings",
"num_steps", "wall_time_s") and `output_dir/metrics.jsonl`, one JSON object per line,

    {"name": "error", "step": k, "value": float, "bits": float, "messages": float,
     "tags": {"algorithm": str, "diffusion_rate": float, "theta": float or null}}

- "error": the consensus error above. Logged at steps 0..10, every 10th step up to
  100, every 100th step after, and at the last step.
- "error_to_initial_mean": mean over workers of ||x_i - mean(x_0)||^2, the original
  code's definition (it differs from "error" for methods that do not preserve the
  average, like Moniqua and DeepSqueeze). Same steps.
- "bits" / "messages": sent per worker (mean over workers), cumulative since the
  start of this setting. Measurement traffic is not counted.
- "diverged": one record when a setting is stopped (see below); "value" is the
  error that triggered it.
- "final_error": one record per setting, at the step where it ended: the error at
  `num_steps`, or `inf` when the setting diverged (so that the best setting is the
  one with the smallest final error).
- "simulated_time_s" (with simulated_clock=true only; no such field otherwise): the seconds
  the setting's steps so far take on the cluster the clock's keys describe
  (powergossip/clock.py), from 0 at each setting's start; summary.json gains the best
  setting's at its end, and TensorBoard the records against it (`by_simulated_us/`).
A value that is not finite is written as JSON `NaN` / `Infinity` (Python's json).

Divergence: at every logged step k >= 1, a setting whose error is not finite or is
larger than its error at step 0 is stopped; its "error" records up to and including
step k are written, then "diverged" (step k) and "final_error" (step k, inf). The
sweep goes on with the next setting. Workers that agree at step 0 (error 0) have
nothing to gossip: each setting ends there, with "final_error" 0 at step 0. Input
data that cannot work (a data_path array that is complex, has empty entries, or holds
values that are not finite in float32) is refused before any work, and so is a run whose
estimated memory exceeds what the process may allocate (check_memory). A data_path array
is read a block at a time; each process keeps its own workers' rows, in float32.

Asynchronous methods (algorithm=ad-psgd, powergossip/asynchronous.py) have no rounds: a step
is n_workers events of the simulated clock (simulated_clock=true, worker_step_seconds > 0),
each a worker ending its work and averaging with a random neighbour, in the clock's order.

Sweep: `optimizer_diffusion_rate` = a number (or a list of numbers) runs just those.
Left at null, methods registered with needs_tuning=False (uncompressed gossip, the
PowerGossip variants) use gamma = 1, and the other methods sweep
`hyperparameter_num_samples` values spaced log-uniformly in [hyperparameter_range_min,
hyperparameter_range_max]. Moniqua also sweeps theta the same way (`theta_*` keys)
unless `optimizer_theta` is given; other
methods ignore theta (their tag is null). Every setting starts from the same
initial state with a fresh algorithm and zeroed byte counters.
"""
from __future__ import annotations

import math
import os
import socket
import sys
import time

import numpy as np
import torch

from powergossip import asynchronous
from powergossip import clock
from powergossip import comm as comm_module
from powergossip import configuration
from powergossip import methods
from powergossip import names
from powergossip import runs
from powergossip import topologies

config = {
    "seed": 42,  # initial state (identical in every launch layout) and the algorithms' shared randomness
    "algorithm": "power_gossip",  # one of ALGORITHMS below, or any registered method (algorithms.register_algorithm)
    "plugins": [],  # your modules, imported first (their code runs): module names or paths of .py files that register methods
    "topology": "ring",  # a topologies.NAMES entry, "file:PATH" or "schedule:FILE"; each method says which graphs it takes (README)
    "n_workers": 8,  # workers (graph nodes), >= 2; a multiple of the number of processes
    "link_failure_probability": 0.0,  # each round, each edge is down (both ways) with this probability (powergossip/faults.py)
    "offline_probability": 0.0,  # each round, each worker is away (sends and receives nothing) with this probability
    "churn": None,  # a file of "worker leave_round return_round" lines: a trace of absences to replay
    "message_loss_probability": 0.0,  # each round, each message (one direction of an edge) is lost with this probability
    "simulated_clock": False,  # true: time every step on the cluster the keys below describe (powergossip/clock.py); records gain simulated_time_s
    "network_latency_s": 1e-4,  # clock: alpha, seconds from a message's last bit sent to its arrival
    "network_bandwidth_bits_per_s": 1e9,  # clock: beta, a worker's link in bits per second
    "network_bandwidth_file": None,  # clock: a file of "i j bits_per_s" lines, the links with their own bandwidth
    "worker_step_seconds": 0.0,  # clock: a worker's own work per step at speed 1 (0: the clock counts communication only)
    "worker_speeds": None,  # clock: one speed per worker (a list, or the path of a file of them); None: all 1
    "straggler_probability": 0.0,  # clock: at each step, each worker's chance to straggle
    "straggler_slowdown": 2.0,  # clock: a straggler's work takes this many times as long
    "message_timeout_s": 1.0,  # clock: how long a receiver waits for a lost message (message_loss_probability)
    "matrix_size": 100,  # each worker holds a matrix_size x matrix_size matrix (data types random, offset, sparse, log-normal)
    "data_type": "random",  # random | offset | sparse | log-normal | images | file (see initial_state)
    "data_path": None,  # data_type=file: a .npy array of real numbers, shape [n_workers, ...]; worker i starts from entry i
    "data_dir": None,  # data_type=images: folder with Fashion-MNIST (None: /usr/share/datasets/fashion-mnist)
    "num_steps": 5000,  # gossip steps per setting
    # The methods' hyper-parameters, named as in train.py (docs/configuration.md; older names such as
    # compression_rank, keep_ratio, diffusion_rate and theta are read as these).
    "optimizer_rank": 1,  # PowerGossip rank, SVD rank, and top-k's rank-matched keep_ratio
    "optimizer_num_iterations": 1,  # PowerGossip power-iteration rounds per step
    "optimizer_warm_start": True,  # PowerGossip: continue the power iteration across steps (power_gossip_random*: off)
    "optimizer_round_weights": False,  # PowerGossip sign variant (power_gossip*_signs: on)
    "optimizer_edge_memory": None,  # PowerGossip on graphs over time: rounds an absent edge keeps its state (None: the period; 0: afresh)
    "optimizer_compressor": "sign-and-norm",  # algorithm=choco or deepsqueeze: the compressor (the *_choco names fix it)
    "optimizer_keep_ratio": None,  # top-k: fraction of entries kept, in (0, 1]; None: rank-matched to optimizer_rank
    "optimizer_qsgd_levels": 16,  # QSGD: quantization levels s
    "optimizer_one_step_delay": False,  # push-sum: overlapped SGP, messages added a round late
    "optimizer_fill_missing": "start",  # relay-sum's (train.py's key, known here too; gossip_run refuses relay-sum)
    "optimizer_diffusion_rate": None,  # gamma: a number or a list; None: 1 for methods that need no tuning, else the grid
    "hyperparameter_num_samples": 20,  # size of the log-uniform gamma grid (when optimizer_diffusion_rate is None)
    "hyperparameter_range_min": 1e-4,  # smallest gamma of the grid
    "hyperparameter_range_max": 1.308,  # largest gamma of the grid
    "optimizer_theta": None,  # moniqua: a number or a list of numbers; None: the theta grid (ignored by other methods)
    "theta_num_samples": 20,  # size of Moniqua's log-uniform theta grid
    "theta_range_min": 0.1,  # smallest theta of the grid
    "theta_range_max": 10.0,  # largest theta of the grid
    "device": "cpu",  # "cpu", "cuda" (one GPU per process under mpirun) or "cuda:K"
    "overwrite": False,  # replace the results of another run in output_dir (without it, such a folder is refused)
}
DEFAULTS = dict(config)  # types and known keys, for checking overrides

PRESETS = names.PRESETS  # the consensus study's names: a registered method with some settings fixed
ALGORITHMS = tuple(PRESETS)
UNTUNED = tuple(name for name, (method, _) in PRESETS.items() if not methods.METHODS[method].needs_tuning)
DATA_TYPES = ("random", "offset", "sparse", "log-normal", "images", "file")

# Hooks a caller may replace (as in the original code).
output_dir = None  # where results go; None: a new folder runs/<date>-<time>-<algorithm>


def log_metric(name: str, values: dict, tags: dict) -> None:
    """Called on worker 0's process for every metric record (metrics.jsonl is written anyway).
    `values` holds "step", "value", "bits", "messages"."""


def log_info(info_dict: dict) -> None:
    """Called on worker 0's process with run information ({"state.progress": fraction})."""


def main():
    """Runs every setting; returns the folder the results went to."""
    cfg, topology = checked(config)  # a checked copy, every key by its own name, and the graph
    comm = comm_module.Communicator(cfg["n_workers"], cfg["device"])
    events_driven = asynchronous.is_asynchronous(resolve(cfg["algorithm"])[0])  # AD-PSGD: events, not rounds
    if events_driven:
        asynchronous.check(cfg, comm.world_size)
    settings = [(gamma, theta) for gamma in diffusion_rates(cfg) for theta in thetas(cfg)]
    check_memory(cfg, comm, topology, len(settings))  # a run that cannot fit: one line, before anything is read
    # This process's workers' starts and the mean of all of them; input that cannot work: before the claim
    x0, initial_mean = starting_point(cfg, comm.local_workers)
    x0, initial_mean = x0.to(comm.device), initial_mean.to(comm.device)
    folder = runs.claim_output_dir(output_dir, cfg["algorithm"], False, cfg["overwrite"], comm, time.time(),
                                   can_resume=False)
    is_writer = comm.process_index == 0

    metrics = tensorboard = None
    started = time.time()
    if is_writer:
        runs.write_config(folder, cfg)
        metrics = runs.MetricsFile(folder)
        tensorboard = runs.tensorboard_writer(folder)  # None without the tensorboard package
        log_info({"state.progress": 0.0})

    def record(name, step, value, bits, messages, tags, simulated_time_s=None):
        if is_writer:
            values = {"step": step, "value": float(value), "bits": float(bits), "messages": float(messages)}
            if simulated_time_s is not None:  # the simulated clock's (simulated_clock=true)
                values["simulated_time_s"] = simulated_time_s
            metrics.write({"name": name, **values, "tags": tags})
            if tensorboard is not None:
                runs.to_tensorboard(tensorboard, {"name": name, **values, "tags": tags})
            log_metric(name, values, tags)

    outcomes = []  # every setting's end, for the best one and summary.json
    for number, (gamma, theta) in enumerate(settings):
        start_time = time.time()
        tags = {"algorithm": cfg["algorithm"], "diffusion_rate": gamma, "theta": theta}
        x = x0 if number == len(settings) - 1 else x0.clone()  # the last setting needs no copy of the start
        method = build_method(cfg, comm, topology, gamma, theta)
        comm.bytes_sent[:] = 0
        comm.messages_sent[:] = 0
        comm.messages_lost[:] = 0
        if events_driven:  # each setting's from 0 s: a step is n_workers events, each one pair's average
            timing = asynchronous.EventClock(clock.settings_of(cfg), topology, cfg["seed"], 8 * comm_module.message_bytes([x]))
        else:
            timing = clock.of_run(cfg, comm, topology, resolve(cfg["algorithm"])[0])  # each setting's from 0 s (or ClockOff)

        divergence = runs.DivergenceCheck(max_ratio=1.0)  # an error above the one at step 0, or not finite
        diverged = False
        for step in range(0, cfg["num_steps"] + 1):
            if step > 0 and events_driven:
                average_pairs(method, timing, x, cfg["n_workers"])
            elif step > 0:
                method.step([x])
                timing.tick()
            if not is_logged(step, cfg["num_steps"]):
                continue
            error, error_to_initial_mean, bits, messages = measure(comm, x, initial_mean)
            record("error", step, error, bits, messages, tags, timing.now)
            record("error_to_initial_mean", step, error_to_initial_mean, bits, messages, tags, timing.now)
            if step == 0:
                divergence.reference = initial_error = error
                if error == 0:
                    break  # the workers agree already (every process sees the same all-reduced error): nothing to gossip
            elif divergence.diverged(error):
                diverged = True  # every process sees the same all-reduced error, so all stop here
                record("diverged", step, error, bits, messages, tags, timing.now)
                break
        final_error = math.inf if diverged else error
        record("final_error", step, final_error, bits, messages, tags, timing.now)

        if is_writer:
            setting = f"{cfg['algorithm']} gamma={gamma:.4g}" + ("" if theta is None else f" theta={theta:.4g}")
            if diverged:
                outcome = f"diverged at step {step} (error {error:.4g})"
            elif initial_error == 0:
                outcome = "the workers agree at step 0 already (error 0): nothing to gossip"
            else:
                outcome = f"final error {error:.4g} = {error / initial_error:.3g} x the initial {initial_error:.4g}"
            simulated = "" if timing.now is None else f", {timing.now:.4g} s simulated"
            print(f"{setting}: {outcome}, {bits / 8e6:.4g} MB sent per worker{simulated}, {time.time() - start_time:.1f} s",
                  flush=True)
            outcomes.append({"best_setting": setting, "final_error": final_error, "initial_error": initial_error,
                             "diffusion_rate": gamma, "theta": theta, "step": step, "mb_per_worker": bits / 8e6}
                            | ({} if timing.now is None else {"simulated_time_s": timing.now}))
            log_info({"state.progress": (number + 1) / len(settings)})
    if is_writer:
        metrics.close()
        if tensorboard is not None:
            tensorboard.close()
        summary = min(outcomes, key=lambda outcome: outcome["final_error"])
        if len(outcomes) > 1:
            best, initial = summary["final_error"], summary["initial_error"]
            relative = f" = {best / initial:.3g} x the initial" if initial > 0 else ""
            print(f"best of {len(outcomes)} settings: {summary['best_setting']}" + (f", final error {best:.4g}{relative}"
                  if math.isfinite(best) else ": every setting diverged"), flush=True)
        from powergossip import figures  # here: only the process that draws pays for matplotlib

        title = f"{cfg['algorithm']}, {cfg['n_workers']}-worker {cfg['topology']}, {cfg['data_type']} data"
        figure = figures.save(figures.consensus_figure(runs.read_metrics(folder), title), os.path.join(folder, "error_vs_bits.png"))
        print(f"results in {folder}, figure {figure}", flush=True)
        runs.write_summary(folder, summary | {"settings": len(outcomes), "num_steps": cfg["num_steps"],
                                              "wall_time_s": time.time() - started})
    runs.release_output_dir(folder)
    return folder


def is_logged(step: int, num_steps: int) -> bool:
    """Steps 0..10, every 10th up to 100, every 100th after, and the last."""
    return step <= 10 or (step <= 100 and step % 10 == 0) or step % 100 == 0 or step == num_steps


MEASURED_AT_ONCE = 1 << 22  # float64 numbers `measure` holds at once (32 MB): a large state is measured in column blocks


def measure(comm, x: torch.Tensor, initial_mean: torch.Tensor) -> tuple[float, float, float, float]:
    """(error, error to the initial mean, bits, messages), each a mean over all workers.
    Collective: every process must call it (the same blocks everywhere, one all-reduce each).
    Its own traffic is not counted. In float64, a block of columns at a time, so that it
    needs two blocks of MEASURED_AT_ONCE numbers beside the state, not copies of it; the
    blocks depend on n_workers only, each worker's terms are added block after block and the
    workers' sums gathered and added in worker order: the same bits in every layout."""
    rows, flat_mean = x.reshape(x.shape[0], -1), initial_mean.reshape(-1)
    width = max(1, MEASURED_AT_ONCE // comm.n_workers)
    squares = torch.zeros(rows.shape[0], 2, dtype=torch.float64, device=x.device)  # per worker
    for start in range(0, rows.shape[1], width):
        x64 = rows[:, start:start + width].double()
        mean = comm.all_reduce_mean([x64], count=False)[0]
        difference = x64 - mean
        squares[:, 0] += difference.square_().sum(dim=1)
        squares[:, 1] += torch.sub(x64, flat_mean[start:start + width], out=difference).square_().sum(dim=1)
    per_worker = torch.cat([squares, torch.from_numpy(comm.bytes_sent).to(squares).unsqueeze(1),
                            torch.from_numpy(comm.messages_sent).to(squares).unsqueeze(1)], dim=1)
    totals = comm.all_gather_workers(per_worker).sum(dim=0) / comm.n_workers
    error, error_to_initial_mean, bytes_sent, messages = (float(v) for v in totals)
    return error, error_to_initial_mean, 8 * bytes_sent, messages


# --- what a setting runs ------------------------------------------------------------------------
def diffusion_rates(config) -> list[float]:
    if config["optimizer_diffusion_rate"] is not None:
        return [float(v) for v in _as_list(config["optimizer_diffusion_rate"])]
    if not methods.METHODS[resolve(config["algorithm"])[0]].needs_tuning:
        return [1.0]
    return _log_grid(config["hyperparameter_range_min"], config["hyperparameter_range_max"],
                     config["hyperparameter_num_samples"])


def thetas(config) -> list[float | None]:
    if "theta" not in methods.METHODS[resolve(config["algorithm"])[0]].setting_names():  # Moniqua's, or a method of yours
        return [None]
    if config["optimizer_theta"] is not None:
        return [float(v) for v in _as_list(config["optimizer_theta"])]
    return _log_grid(config["theta_range_min"], config["theta_range_max"], config["theta_num_samples"])


def _log_grid(low: float, high: float, num: int) -> list[float]:
    return [float(v) for v in np.exp(np.linspace(np.log(low), np.log(high), num))]


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def build_topology(config):
    return topologies.build(config["topology"], config["n_workers"])


def resolve(name: str) -> tuple[str, dict]:
    """(registered method, fixed hyper-parameters) of an `algorithm` value; ValueError if unknown."""
    fixed = names.preset(name)
    if fixed is not None:
        return fixed
    try:
        return methods.registered_name(name), {}
    except ValueError:
        raise ValueError(f"unknown algorithm {name!r}; valid: {', '.join(ALGORITHMS)}, or a registered method: "
                         f"{', '.join(methods.METHODS)}") from None


def average_pairs(method, events, x: torch.Tensor, count: int) -> None:
    """One step of an asynchronous method (AD-PSGD): the next `count` events in the clock's order,
    each the end of a worker's work (worker_step_seconds at its speed) and its average with a
    random neighbour (asynchronous.EventClock; no gradients here)."""
    end = events.finished + count
    while events.finished < end:
        event = events.next()
        if not event.starts:
            method.pair([x], event.worker, event.partner)


def build_method(config, comm, topology, gamma: float, theta: float | None):
    method, fixed = resolve(config["algorithm"])
    return methods.build(method, comm, topology, **setting_values(config, fixed, gamma, theta))


def setting_values(config, fixed: dict, gamma: float, theta: float | None) -> dict:
    """The method's settings for one setting of the sweep: the config's, the preset's fixed ones, gamma and theta."""
    return names.settings_of(config) | {"diffusion_rate": gamma, "theta": theta} | fixed


# --- initial state --------------------------------------------------------------------------------
def initial_state(config) -> torch.Tensor:
    """All workers' starting tensors `[n_workers, *shape]` float32 on the CPU, drawn from a
    generator seeded with `seed`, so every process of every launch layout builds the same.

    random: N(0, 1) entries. offset: N(0, 1) + worker index. sparse: zeros except entry
    [worker index] of the flattened matrix = 1. log-normal: exp(N(0, 1)). images: distinct
    Fashion-MNIST training images (28 x 28, pixels in [0, 1]) picked by a seeded permutation.
    file: entry i of the .npy array at data_path (`starting_point` reads it)."""
    n, size = config["n_workers"], config["matrix_size"]
    generator = torch.Generator().manual_seed(config["seed"])
    data_type = config["data_type"]
    if data_type == "random":
        return torch.randn((n, size, size), generator=generator)
    if data_type == "offset":
        return torch.randn((n, size, size), generator=generator) + torch.arange(n, dtype=torch.float32).view(n, 1, 1)
    if data_type == "sparse":
        state = torch.zeros((n, size * size))
        state[torch.arange(n), torch.arange(n)] = 1.0
        return state.view(n, size, size)
    if data_type == "log-normal":
        return torch.randn((n, size, size), generator=generator).exp()
    if data_type == "images":
        from powergossip import data

        try:
            images = data.load("fashion_mnist", data_dir=config["data_dir"]).train_x
        except (ValueError, OSError) as problem:
            raise configuration.ConfigError(f"data_type=images, data_dir={config['data_dir']}: {problem}") from None
        if images.shape[0] < n:
            raise configuration.ConfigError(f"data_type=images: {n} workers but only {images.shape[0]} images")
        chosen = torch.randperm(images.shape[0], generator=generator)[:n]
        return images[chosen, 0].float() / 255
    if data_type == "file":
        return starting_point(config, range(n))[0]
    raise configuration.ConfigError(f"unknown data_type {data_type!r}")


READ_AT_ONCE = 1 << 24  # bytes of a start converted to float32 at once (16 MB, or one worker's entry)


def starting_point(config, workers: range) -> tuple[torch.Tensor, torch.Tensor]:
    """(the starting tensors of `workers`, `[len(workers), *shape]` float32 on the CPU; the mean
    of all workers' starts, `[*shape]` float64, summed worker after worker), the same in every
    process of every launch layout (`initial_state`). A data_path array is read a block of
    READ_AT_ONCE bytes (as float32) at a time (`row_blocks`), converted to float32 and checked
    (values that are not finite in float32 are an input error naming the entry), and its
    workers' rows are copied out: it is never held whole, in its own dtype or in float32."""
    if config["data_type"] == "file":
        n, entry = state_shape(config)
        blocks = row_blocks(config["data_path"], max(1, READ_AT_ONCE // max(1, math.prod(entry) * 4)))
    else:
        state = initial_state(config).numpy()
        n, entry, blocks = state.shape[0], state.shape[1:], [(0, state)]
    mine = np.empty((len(workers),) + tuple(entry), dtype=np.float32)
    total = np.zeros(entry, dtype=np.float64)
    for first, rows in blocks:
        with np.errstate(over="ignore", invalid="ignore"):  # a value beyond float32's range becomes inf: refused below
            rows = np.asarray(rows, dtype=np.float32)
        finite = np.isfinite(rows.reshape(len(rows), -1)).all(axis=1)
        if not finite.all():
            worker = first + int(np.argmin(finite))
            raise configuration.ConfigError(
                f"data_path {config['data_path']!r}: entry {worker} (worker {worker}'s start) holds values that are not "
                f"finite numbers in float32 (NaN, inf, or beyond +-{np.finfo(np.float32).max:.4g}); gossip averages "
                f"finite numbers: fix or rescale the array")
        for row in rows:
            total += row
        low, high = max(first, workers.start), min(first + len(rows), workers.stop)
        if low < high:
            mine[low - workers.start:high - workers.start] = rows[low - first:high - first]
    total /= n
    return torch.from_numpy(mine), torch.from_numpy(total)


def row_blocks(path: str, rows: int):
    """(first row, the next `rows` rows) of the .npy array at `path`, block after block, in the
    file's dtype: each block read from the file on its own (a Fortran-ordered array, whose rows
    are not contiguous in the file, from a mapping of it), so that one block is held at a time."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran_order, dtype = read_header(f)
        offset = f.tell()
    if fortran_order and len(shape) > 1:
        array = np.load(path, mmap_mode="r", allow_pickle=False)
        for first in range(0, shape[0], rows):
            yield first, array[first:first + rows]
        return
    entry = math.prod(shape[1:])
    for first in range(0, shape[0], rows):
        count = min(rows, shape[0] - first)
        block = np.fromfile(path, dtype=dtype, count=count * entry, offset=offset + first * entry * dtype.itemsize)
        yield first, block.reshape((count,) + tuple(shape[1:]))


def check_memory(config, comm, topology, num_settings: int) -> None:
    """Refuses (ConfigError, on every process) a run whose estimated memory exceeds what this
    process can have (runs.available_memory, the machine's split between its processes of the
    run), before anything is read. The estimate, per process: its workers' starts in float32
    times the copies the run keeps (the start, and a working copy when a sweep has more than
    one setting) and the copies the method holds in a round (Method.working_copies at the
    graph's most half-edges per worker), plus the float64 mean of one worker's start and what
    reading and measuring hold at once (on a GPU, the host holds the starts and the mean only)."""
    workers, entry = state_shape(config)
    mine = comm.num_local * math.prod(entry) * 4
    reading = 3 * READ_AT_ONCE if config["data_type"] == "file" else workers * math.prod(entry) * 4
    needed = mine + 8 * math.prod(entry) + reading
    if comm.device.type == "cpu":
        method = build_method(config, comm, topology, *next(zip(diffusion_rates(config), thetas(config))))
        degree = max(comm.half_edges(topology.at(t)).num for t in topologies.rounds_to_check(topology)) / comm.num_local
        copies = (1 if num_settings > 1 else 0) + method.working_copies(degree, [entry])
        needed += mine * copies + 3 * 8 * MEASURED_AT_ONCE
    host = socket.gethostname()
    available, source = runs.available_memory(sharing=comm.gather_objects(host).count(host))
    problem = None
    if needed > available:
        what = f"data_path {config['data_path']!r}" if config["data_type"] == "file" else f"data_type={config['data_type']}"
        problem = (f"{what}: the run needs about {needed / 1e9:.3g} GB of memory in this process ({comm.num_local} "
                   f"workers of {list(entry)} float32 numbers, algorithm={config['algorithm']}), but "
                   f"{available / 1e9:.3g} GB are available ({source}); use a smaller array, or spread the "
                   f"workers over more machines (mpirun)")
    problems = [found for found in comm.gather_objects(problem) if found is not None]
    if problems:
        raise configuration.ConfigError(problems[0])


def state_shape(config) -> tuple[int, tuple[int, ...]]:
    """(workers, the shape of one worker's start) of the data_type, without building the start."""
    n, size = config["n_workers"], config["matrix_size"]
    if config["data_type"] == "file":
        return n, tuple(np.load(config["data_path"], mmap_mode="r", allow_pickle=False).shape[1:])
    if config["data_type"] == "images":
        return n, (28, 28)
    return n, (size, size)


# --- checks (each process on its own, before any communication) ------------------------------------
def check(config) -> dict:
    """A checked copy of `config` with every key by its own name (see `checked`)."""
    return checked(config)[0]


def checked(config) -> tuple[dict, topologies.Topology]:
    """A checked copy of `config` with every key by its own name (aliases renamed), and the
    run's topology (built here, once); raises configuration.ConfigError (a ValueError)
    naming the key for anything that cannot work."""
    config = configuration.with_checked_keys(DEFAULTS, config)
    error = configuration.ConfigError
    for key, default in DEFAULTS.items():
        if default is not None and config.get(key) is None:
            raise error(f"{key} must not be null (expected a {type(default).__name__} like {default!r})")

    def require(condition, message):
        if not condition:
            raise error(message)

    def positive_numbers(key):
        for value in _as_list(config[key]):
            require(configuration.is_number(value) and value > 0, f"{key} must be a positive number (or a list of them), got {config[key]!r}")
        require(len(_as_list(config[key])) > 0, f"{key} must not be an empty list")

    name = config["algorithm"]
    try:
        method, fixed = resolve(name)
    except ValueError as problem:
        raise error(str(problem)) from None
    require(config["data_type"] in DATA_TYPES,
            f"unknown data_type {config['data_type']!r}; valid: {', '.join(DATA_TYPES)}")
    for key in ("n_workers", "matrix_size", "hyperparameter_num_samples", "theta_num_samples"):
        require(config[key] >= 1, f"{key} must be >= 1, got {config[key]}")
    require(config["n_workers"] >= 2, f"n_workers must be >= 2 (one worker has nothing to agree on), got {config['n_workers']}")
    require(config["num_steps"] >= 0, f"num_steps must be >= 0, got {config['num_steps']}")
    require(methods.METHODS[method].acts_on == "parameters",
            f"algorithm={name} acts on gradients; consensus experiments have none")
    require(method != "relay-sum", f"algorithm={name} relays models that start equal (x^0 fills in until messages arrive); "
                                   "from unequal starts it reaches a consensus that is not their average: train with it (train.py)")
    for key, value in fixed.items():
        given = config[f"optimizer_{key}"]
        require(given in (value, DEFAULTS[f"optimizer_{key}"]),
                f"algorithm={name} fixes optimizer_{key}={value!r}, got {given!r}; use algorithm={method} to choose it")
    for prefix in ("hyperparameter", "theta"):
        low, high = config[f"{prefix}_range_min"], config[f"{prefix}_range_max"]
        require(0 < low <= high, f"{prefix}_range_min and _max must satisfy 0 < min <= max, got {low} and {high}")
    if config["optimizer_diffusion_rate"] is not None:
        positive_numbers("optimizer_diffusion_rate")
    if config["optimizer_theta"] is not None:
        positive_numbers("optimizer_theta")

    try:
        topology = build_topology(config)
    except (ValueError, OSError) as problem:
        raise error(f"topology: {problem}") from None
    for gamma in diffusion_rates(config):  # the method's own checks, for every setting of the sweep
        for theta in thetas(config):
            configuration.check_method(method, topology, setting_values(config, fixed, gamma, theta))
    topology = configuration.with_faults(config, method, topology)
    clock.check(config)
    if methods.METHODS[method].asynchronous:
        asynchronous.check(config)

    configuration.check_device(config["device"])
    configuration.check_seed(config["seed"])

    data_type = config["data_type"]
    if data_type == "sparse":
        require(config["matrix_size"] ** 2 >= config["n_workers"],
                f"data_type=sparse puts worker i's 1 at flat entry i: needs matrix_size^2 >= n_workers "
                f"({config['matrix_size']}^2 < {config['n_workers']})")
    if data_type == "images":
        from powergossip.data import fashion_mnist

        try:
            fashion_mnist.find_files(config["data_dir"])
        except FileNotFoundError as problem:
            raise error(f"data_type=images: {problem}") from None
    if data_type == "file":
        path = config["data_path"]
        require(isinstance(path, str) and path, f"data_type=file needs data_path=<a .npy file>, got {path!r}")
        require(os.path.isfile(path), f"data_path {path!r} does not exist")
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError) as problem:
            raise error(f"data_path {path!r} is not a readable .npy array: {problem}") from None
        require(isinstance(array, np.ndarray), f"data_path {path!r} must hold one .npy array (not an .npz archive)")
        require(array.ndim >= 1 and array.shape[0] == config["n_workers"],
                f"data_path {path!r} holds an array of shape {tuple(array.shape)}; data_type=file needs shape "
                f"[n_workers, ...] = [{config['n_workers']}, ...] (worker i starts from entry i)")
        require((np.issubdtype(array.dtype, np.number) and not np.issubdtype(array.dtype, np.complexfloating))
                or array.dtype == np.bool_,
                f"data_path {path!r} holds {array.dtype} values; expected real numbers (save the real and imaginary "
                f"parts as two entries of each worker's array, e.g. np.stack([a.real, a.imag], axis=1))")
        require(array[0].size > 0, f"data_path {path!r} holds an array of shape {tuple(array.shape)}: each worker's "
                f"entry is empty; data_type=file needs at least one number per worker")
    return config, topology


def command_line(arguments: list[str] | None = None) -> None:
    """`python gossip_run.py [file.yaml] key=value ...` (also `python -m powergossip.gossip_run`):
    configuration.run_command_line on this module."""
    configuration.run_command_line(sys.modules[__name__], "gossip_run.py", DEFAULTS, arguments)


if __name__ == "__main__":  # `python -m powergossip.gossip_run`: run the package's module, not this second copy
    from powergossip.gossip_run import command_line as _command_line

    _command_line()
