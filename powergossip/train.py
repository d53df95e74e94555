#!/usr/bin/env python3
"""Decentralized deep learning: every worker trains its own replica on its own shard
and gossips with its neighbours (Vogels, Karimireddy, Jaggi 2020, "Deep learning experiments").

    python train.py                                   # all workers simulated in one process
    mpirun -np 4 python train.py                      # one worker per process
    python train.py experiments/configs/train/cifar10_resnet20_ring8/power_gossip_1_iteration.yaml data_dir=~/data output_dir=runs/pg

or from Python, as in the original code:

    import train
    train.config["n_workers"] = 4
    train.output_dir = "runs/mine"
    train.log_metric = my_function      # (name, values, tags)
    train.main()

The loop is D-PSGD with overlap (Lian et al. 2017, as the paper runs it): gradient
at x_t; gossip x_t; local Nesterov-SGD step on the gossiped parameters (all-reduce and
push-sum: local step, then gossip; PowerSGD: the average of the gradients, then the
local step; step.py has this order, the drop-in optimizer's too). local_steps=H gossips
every H-th step only. optimizer=ad-psgd is asynchronous: no steps, but the simulated clock's
events, each one worker's gradient ending, its average with a random neighbour and its local
step (powergossip/asynchronous.py; an epoch is n_workers x batches per epoch of them).
Records go to `output_dir/metrics.jsonl` (one JSON object each: name, epoch, value, bits,
messages, tags, and simulated_time_s with simulated_clock=true, powergossip/clock.py; see
metrics.py), to TensorBoard and through `log_metric`; the run ends with the figure `output_dir/curves.png`.
"""
from __future__ import annotations

import functools
import json
import os
import sys
import time
import uuid

import torch

from powergossip import asynchronous
from powergossip import clock
from powergossip import comm as comm_module
from powergossip import data
from powergossip import faults
from powergossip import methods
from powergossip import metrics
from powergossip import models
from powergossip import names
from powergossip import plugins
from powergossip import configuration
from powergossip import runs
from powergossip import step as step_module
from powergossip import topologies
from powergossip.configuration import is_integer, is_number
from powergossip.errors import ConfigError
from powergossip.models.stacked import StackedReplicas

config = dict(
    task="fashion_mnist",  # fashion_mnist (embedded), cifar10, wikitext2 or synthetic
    task_architecture="small_cnn",  # small_cnn, resnet20, resnet18, vgg16 or lstm
    batch_size=128,  # per worker
    weight_decay=1e-4,  # L2 on all parameters but batch-norm ones
    num_epochs=4,  # passes over the training set
    learning_rate=0.05,  # base learning rate, multiplied by the schedule below
    momentum=0.9,  # Nesterov momentum (0 = plain SGD)
    momentum_type="local",  # local (each worker's gradients) or quasi-global (Lin et al. 2021: the buffer follows the model's change over the gossip too; no extra bytes)
    topology="ring",  # ring, torus, ..., one_peer_exponential, one_peer_hypercube, random_matching, file:edges.txt or schedule:graphs.txt
    link_failure_probability=0.0,  # each round, each edge is down (both ways) with this probability (powergossip/faults.py)
    offline_probability=0.0,  # each round, each worker is away (sends and receives nothing, keeps training) with this probability
    churn=None,  # a file of "worker leave_round return_round" lines: a trace of absences to replay
    message_loss_probability=0.0,  # each round, each message (one direction of an edge) is lost with this probability
    lr_schedule_milestones=[[3, 0.1]],  # [epoch, factor] pairs (or bare epochs: factor 0.1)
    optimizer="power-gossip",  # all-reduce, dpsgd, power-gossip, choco, deepsqueeze, moniqua, push-sum (SGP), powersgd, relay-sum, d2, gradient-tracking or ad-psgd (asynchronous: simulated_clock=true)
    plugins=[],  # your modules, imported first (their code runs): module names or paths of .py files that register methods
    optimizer_diffusion_rate=1.0,  # gamma, the consensus step
    optimizer_rank=1,  # PowerGossip and PowerSGD rank (and SVD rank, rank-matched top-k)
    optimizer_num_iterations=1,  # PowerGossip and PowerSGD power-iteration rounds per step
    optimizer_min_compression_rate=2.0,  # PowerSGD: a matrix its factors compress by less is sent whole
    optimizer_start_compressing_after_num_steps=0,  # PowerSGD: exact all-reduce for this many first steps
    optimizer_warm_start=True,  # PowerGossip, PowerSGD: continue the power iteration across steps
    optimizer_round_weights=False,  # PowerGossip sign variant (rank 1)
    optimizer_edge_memory=None,  # PowerGossip, graphs over time: rounds an absent edge keeps its state (null: the period; 0: afresh)
    optimizer_compressor="sign-and-norm",  # choco/deepsqueeze: sign-and-norm, top-k, random-k, svd, qsgd, identity
    optimizer_keep_ratio=0.01,  # top-k / random-k fraction kept (null: rank-matched)
    optimizer_qsgd_levels=16,  # QSGD levels
    optimizer_theta=0.25,  # Moniqua's bound on neighbour differences
    optimizer_one_step_delay=False,  # push-sum: overlapped SGP, messages added a step late (sending hides behind compute)
    optimizer_fill_missing="start",  # relay-sum: what stands in for models not yet (or never) arrived: start (x^0) or latest (own last average)
    n_workers=4,  # workers (graph nodes); a multiple of the number of processes
    local_steps=1,  # H: local optimizer steps per gossip round (bits per epoch fall by H)
    distributed_lr_warmup_epoch=1,  # epochs of linear warmup of the learning-rate factor
    distributed_lr_warmup_factor=1.0,  # factor reached at the end of the warmup (from 1)
    use_decentralized_data=False,  # label-sorted shards instead of iid reshuffling
    decentralized_data_shuffled_ratio=0.0,  # fraction of each sorted shard reshuffled every epoch
    dirichlet_alpha=None,  # Dirichlet(alpha) label skew (null: off)
    dirichlet_split="per_worker",  # per_worker (each worker's class mix ~ Dirichlet, equal shards) or per_class (each class over the workers ~ Dirichlet, unequal shards cycled through)
    seed=1,  # model init, data order, shared randomness
    evaluate_average_model=True,  # also test the model with all workers' parameters and buffers averaged
    target_accuracy=None,  # an averaged-model test accuracy (0-1): the summary says when the run first reached it (epoch, MB, simulated time)
    evaluate_each_worker=True,  # test every worker's own model each epoch
    spectrum_logging_params=[],  # parameter names whose neighbour differences' spectra are logged
    spectrum_logging_epochs=[],  # epochs (1-based, at their end) to log spectra
    spectrum_logging_worker_pairs=[],  # [[i, j], ...] worker pairs for the spectra
    device="auto",  # auto, cpu, cuda or cuda:K
    cpu_threads=None,  # CPU threads of each process (null: torch's default in one process, the cores shared under mpirun); 1: the same bits in every layout (README)
    dtype="float32",  # float32, or bfloat16 (autocast for compute; parameters stay float32)
    stacked_compute="loop",  # local workers' forward/backward: loop (one replica after the other), vmap (batched; image models) or graph (CUDA graph of the loop; image models on a GPU)
    graph_streams=8,  # stacked_compute=graph: CUDA streams the local workers are spread over (they run side by side)
    compile_replicas=False,  # stacked_compute=graph: each replica's forward compiled by torch.compile (a minute or two first)
    data_dir=None,  # folder with the data set's files (null: the default places)
    download=False,  # fetch cifar10 (or wikitext2, from download_url) into data_dir when its files are not there
    download_url=None,  # where download fetches the archive from (cifar10: a mirror, else its home page; wikitext2: required)
    download_sha256=None,  # SHA-256 (hex) the archive must have before it is extracted (wikitext2: required; cifar10: else its MD5)
    augment=None,  # random crop + flip (null: on for CIFAR-10 only)
    gradient_clipping=None,  # clip each worker's gradient norm (the LSTM: 0.4)
    bptt=30,  # language model: tokens per window
    max_batches_per_epoch=None,  # cut epochs short (quick runs, tests)
    max_test_examples=None,  # evaluate on exactly the first N test examples (predicted tokens for the language model)
    evaluation_batch_size=1000,  # batch size of evaluation passes
    checkpoint_every=1,  # epochs between checkpoints (0: only on SIGTERM/SIGINT)
    network_latency_s=1e-4,  # alpha of the modelled network: seconds per message (a record, not the training)
    network_bandwidth_bits_per_s=1e9,  # beta of the modelled network: a worker's link, bits per second (a record only)
    simulated_clock=False,  # true: time every step on the cluster the keys below and network_* describe (powergossip/clock.py); records gain simulated_time_s
    worker_step_seconds=0.0,  # clock: a worker's compute per step at speed 1 (0: the clock counts communication only)
    worker_speeds=None,  # clock: one speed per worker (a list, or the path of a file of them); null: all 1
    straggler_probability=0.0,  # clock: at each step, each worker's chance to straggle
    straggler_slowdown=2.0,  # clock: a straggler's compute takes this many times as long
    message_timeout_s=1.0,  # clock: how long a receiver waits for a lost message (message_loss_probability)
    network_bandwidth_file=None,  # clock: a file of "i j bits_per_s" lines, the links with their own bandwidth
    max_loss_ratio=100.0,  # a worker loss above this multiple of the run's first mean loss is divergence: stop, save nothing
    resume=False,  # continue the run in output_dir from its checkpoints
    accept_metrics_gap=False,  # resume although metrics.jsonl lacks epochs the checkpoint covers (recorded as a metrics_gap record)
    overwrite=False,  # replace the results of another run in output_dir (without it, such a folder is refused)
)

output_dir = None  # where results go; None: a new folder runs/<date>-<time>-<optimizer>

# What a resumed run may change; every other key defines the run and must stay as it was.
MAY_CHANGE_ON_RESUME = (
    "num_epochs", "learning_rate", "lr_schedule_milestones", "distributed_lr_warmup_epoch", "distributed_lr_warmup_factor",
    "weight_decay", "gradient_clipping", "max_loss_ratio", "device", "cpu_threads", "dtype", "stacked_compute", "graph_streams",
    "compile_replicas", "data_dir", "download", "download_url", "download_sha256",
    "evaluate_average_model", "target_accuracy", "evaluate_each_worker", "spectrum_logging_params", "spectrum_logging_epochs",
    "spectrum_logging_worker_pairs", "max_test_examples", "evaluation_batch_size", "checkpoint_every", "resume", "overwrite",
    "network_latency_s", "network_bandwidth_bits_per_s", "accept_metrics_gap",
)


def log_metric(name, values, tags):
    """Called for every record (also written to metrics.jsonl and TensorBoard); replace freely."""


def log_info(info_dict):
    """Called with progress information ({"state.progress": fraction}); replace freely."""


def log_runtime(label, mean, std, instances):
    """Called per timer once every epoch's records are written (seconds); replace freely."""


def log_runtimes(times):
    """log_runtime for every timer of an epoch's times (runs.Timers.cut's summary)."""
    for label, (mean, std, instances) in times().items():
        log_runtime(label, mean, std, instances)


def main():
    cfg, topology = checked(config)
    started = time.time()
    comm = comm_module.Communicator(cfg["n_workers"], cfg["device"])
    events_driven = methods.METHODS[cfg["optimizer"]].asynchronous  # AD-PSGD: the clock's events, not rounds
    if events_driven:
        asynchronous.check(cfg, comm.world_size)  # one process: before any work
    if cfg["cpu_threads"] is not None:  # the same count in every process: the layouts compute the same bits
        torch.set_num_threads(cfg["cpu_threads"])
    is_root = comm.process_index == 0
    if is_root:
        threads = f" ({torch.get_num_threads()} CPU thread(s) per process)" if comm.device.type == "cpu" else ""
        print(f"{cfg['n_workers']} workers in {comm.world_size} process(es) ({comm.num_local} each); backend "
              f"{comm.context.backend or 'none (one process)'}; device {comm.device}{threads}", flush=True)
    dataset, loader = load_data(cfg, comm)  # a data set or a batch size that cannot work: found before the claim
    fingerprint = runs.fingerprint(topologies.files_read(cfg["topology"]) | faults.files_read(cfg) | clock.files_read(cfg)
                                   | data.files(cfg["task"], cfg["data_dir"]) | plugins.files(cfg["plugins"]))
    folder = runs.claim_output_dir(output_dir, cfg["optimizer"], cfg["resume"], cfg["overwrite"], comm, started)
    checkpoints = runs.Checkpoints(os.path.join(folder, "checkpoints"), comm, fingerprint)  # a resume checks the files

    batches_per_epoch = epoch_length(cfg, loader)

    # Every worker starts from the same initialization (as in the paper).
    torch.manual_seed(cfg["seed"])
    template = build_model(cfg, dataset)
    workers = StackedReplicas(template, comm.num_local, comm.device, compute=cfg["stacked_compute"],
                              autocast_dtype=torch.bfloat16 if cfg["dtype"] == "bfloat16" else None,
                              graph_streams=cfg["graph_streams"], language_model=dataset.is_language_model,
                              compile_replicas=cfg["compile_replicas"])
    decays = step_module.weight_decays(template, workers.parameter_names, cfg["weight_decay"])
    momenta = [torch.zeros_like(p) for p in workers.params]
    method = build_method(cfg, comm, topology)
    if events_driven:  # the event queue: who ends a gradient next, and with whom it averages (asynchronous.py)
        events = timing = asynchronous.EventClock(clock.settings_of(cfg), topology, cfg["seed"],
                                                  8 * comm_module.message_bytes(workers.params))
        events_per_epoch = cfg["n_workers"] * batches_per_epoch  # (training set / batch) gradients over all workers
        pending = torch.zeros((comm.num_local, 3), device=comm.device)  # each worker's gradient's loss, correct, count
    else:
        timing, events, pending = clock.of_run(cfg, comm, topology, cfg["optimizer"]), None, None  # the clock (or ClockOff)
    steps_per_epoch = batches_per_epoch if events is None else events_per_epoch

    saved = None
    if cfg["resume"]:  # a save whose form is not this run's (run_state) counts as damaged
        shaped = build_method(cfg, comm, topology)
        shaped.prepare(workers.params)  # its state as the stacks shape it (gradients have the parameters' shapes)
        expected = run_state(workers, momenta, shaped, comm, metrics.EpochTotals.zeros(comm.num_local, comm.device), timing,
                             pending)
        saved = checkpoints.agreed(cfg, _DEFAULTS, clock.may_change_on_resume(MAY_CHANGE_ON_RESUME, cfg),
                                   check=lambda state: saved_state_problem(state, expected, steps_per_epoch))
        del expected, shaped
        at_end = (saved["epoch"], saved["step_in_epoch"]) >= (cfg["num_epochs"], 0)
        # A run stopped after its last checkpoint but before its summary goes on to write it.
        if at_end and (comm.gather_objects(finished(folder, saved["epoch"]))[0]
                       or (saved["epoch"], saved["step_in_epoch"]) > (cfg["num_epochs"], 0)):
            if is_root:
                print(f"nothing to do: the run in {folder} has done {saved['epoch']} epochs and num_epochs="
                      f"{cfg['num_epochs']}; raise num_epochs to train on", flush=True)
            runs.release_output_dir(folder)
            return folder
    run_id = saved["run"]["run_id"] if saved is not None and "run" in saved else comm.gather_objects(uuid.uuid4().hex[:12])[0]
    torch.manual_seed(cfg["seed"] * 1000 + comm.process_index)  # dropout: per process

    start_epoch, start_step, carried, initial_loss, history, gap = 0, 0, None, None, [], None
    if saved is not None:
        start_epoch, start_step = saved["epoch"], saved["step_in_epoch"]
        carried = metrics.EpochTotals.from_state(restore(saved, workers, momenta, method, comm, timing, pending),
                                             comm.device)
        initial_loss = saved["run"]["initial_loss"] if "run" in saved else None
        started -= saved.get("run", {}).get("elapsed_s", 0.0)  # times count the run's earlier launches too
        history, gap = metrics.resumed_history(comm, folder, start_epoch, start_step, cfg["accept_metrics_gap"])
        if is_root:
            print(f"resuming run {run_id} from {runs.position(start_epoch, start_step)} ({checkpoints.folder})", flush=True)
        del saved
    recorder = metrics.Recorder(comm, folder, run_id, history, gap,
                                log_metric=lambda *record: log_metric(*record), clock=timing)  # the hook as it is when called
    if is_root:
        runs.write_config(folder, cfg)

    loss_check = runs.LossCheck(comm, checkpoints, cfg["max_loss_ratio"], initial_loss)
    # The signal handlers before the run come back however it ends, after a checkpoint written in the background is on
    # disk; an error after a divergence is reported as it.
    with runs.StopRequests() as stop, checkpoints, recorder.written_at_exit(loss_check.finish):
        timers = runs.Timers(comm.device)
        progress = runs.Progress(is_root, cfg["num_epochs"], steps_per_epoch, start_epoch * steps_per_epoch + start_step,
                                 started)

        def local_step(lr, row=None):  # every worker's, or (asynchronous) worker `row`'s alone
            stacks = [workers.params, workers.grads, momenta]
            if row is not None:
                stacks = [[stack[row:row + 1] for stack in stacks_of] for stacks_of in stacks]  # views: in place
            with timers("update"):
                if cfg["gradient_clipping"] is not None:
                    step_module.clip_per_worker(stacks[1], cfg["gradient_clipping"])
                step_module.nesterov_sgd_step(*stacks, lr * method.step_size_scale(), cfg["momentum"], decays,
                                              keep_momenta=quasi_global is not None)

        method_and_local_step = step_module.TrainingStep(method, methods.METHODS[cfg["optimizer"]], workers.params,
                                                         workers.grads, timers)
        quasi_global = (step_module.QuasiGlobalMomentum(workers.params, momenta, cfg["momentum"])
                        if cfg["momentum_type"] == "quasi-global" else None)

        for epoch in range(start_epoch, cfg["num_epochs"]):
            totals = carried if carried is not None else metrics.EpochTotals.zeros(comm.num_local, comm.device)
            carried = None
            hidden = totals.hidden
            first_step = start_step if epoch == start_epoch else 0
            workers.train(True)
            if events is not None:  # AD-PSGD (asynchronous.py): the epoch's events, in the clock's order
                # A worker's start reads its model and takes its gradient there; its end averages with the drawn
                # neighbour and applies that gradient (computed at a model the averages may have changed since).
                while events.finished < (epoch + 1) * events_per_epoch:
                    event = events.next()
                    row = event.worker - comm.first_worker
                    if event.starts:  # its batch: the next of its own shard, its pass `gradient // batches`
                        x, y = loader.worker_batch(event.worker, *divmod(event.gradient, len(loader)))
                        with timers("forward_backward"):
                            loss, correct = workers.gradient_of(row, x, y)
                        count = torch.full((), float(y.numel()), device=comm.device)  # filled there: no copy to a GPU
                        pending[row] = torch.stack([loss, correct, count])
                        continue
                    done = events.finished - epoch * events_per_epoch  # this epoch's gradients ended, this one included
                    with timers("gossip"):
                        method.pair(workers.params, event.worker, event.partner)  # x_i, x_j <- (x_i + x_j) / 2
                    local_step(cfg["learning_rate"] * learning_rate_factor(cfg, epoch + done / events_per_epoch), row)
                    totals.add(*pending[row], rows=row)
                    # a copy of its loss: its row is the next gradient's soon
                    loss_check.watch(pending[row, :1].clone(), epoch, done - 1, rows=slice(row, row + 1))
                    if stop.requested(comm):  # the queue, the pending gradients and data positions are saved
                        loss_check.finish_everywhere()
                        recorder.flush()  # the records before the state they lead to
                        checkpoints.save(snapshot(checkpoints, epoch, done, workers, momenta, method, comm, totals, run_id,
                                                  cfg, loss_check, started, timing, pending))
                        checkpoints.wait()
                        if is_root:
                            print(f"\nstopped by a signal at {runs.position(epoch, done)} (events); checkpoint in "
                                  f"{checkpoints.folder}; continue with resume=true", flush=True)
                        sys.exit(128 + stop.signal_number)
                    recorder.flush(if_ready=True)  # the last epoch's records, once its test aside has ended
                    progress.step(epoch, done - 1, loss_check.mean_loss, stop.bytes_per_worker)
                    log_info({"state.progress": (epoch + done / events_per_epoch) / cfg["num_epochs"]})
            else:  # a synchronous method: the epoch's steps, every worker in each
                batches = loader.epoch_batches(epoch, first_step)
                for step in range(first_step, batches_per_epoch):
                    with timers("batch"):
                        x, y = next(batches)
                    lr = cfg["learning_rate"] * learning_rate_factor(cfg, epoch + (step + 1) / batches_per_epoch)
                    # D-PSGD as the paper runs it: the gradient at x_t, then (step.TrainingStep) gossip x_t and
                    # the local step on the gossiped parameters (all-reduce: the local step, then the average;
                    # PowerSGD: the average of the gradients, then the step).
                    with timers("forward_backward"):
                        losses, corrects, counts, hidden = workers.gradients(x, y, hidden)
                    gossips = gossips_at(epoch * batches_per_epoch + step, cfg["local_steps"])  # the graph follows method.round
                    if quasi_global is None:
                        method_and_local_step(lambda: local_step(lr), gossips)
                    else:  # the buffer's update needs x_t and x_{t+1} around the method and the local step
                        quasi_global(lambda: method_and_local_step(lambda: local_step(lr), gossips), lr * method.step_size_scale())
                    timing.tick(gossips)  # the step on the simulated clock, from what it sent
                    totals.add(losses, corrects, counts)
                    loss_check.watch(losses, epoch, step)
                    stopping = stop.requested(comm)
                    recorder.flush(if_ready=True)
                    progress.step(epoch, step, loss_check.mean_loss, stop.bytes_per_worker)  # the last loss read: no wait
                    if stopping:
                        loss_check.finish_everywhere()  # no save if a worker of any process diverged
                        totals.hidden = hidden
                        recorder.flush()
                        checkpoints.save(snapshot(checkpoints, epoch, step + 1, workers, momenta, method, comm, totals, run_id,
                                                  cfg, loss_check, started, timing))
                        checkpoints.wait()
                        comm.barrier()
                        if is_root:
                            print(f"\nstopped by a signal at {runs.position(epoch, step + 1)}; checkpoint in "
                                  f"{checkpoints.folder}; continue with resume=true", flush=True)
                        sys.exit(128 + stop.signal_number)
                    log_info({"state.progress": (epoch + (step + 1) / batches_per_epoch) / cfg["num_epochs"]})

            # No record of an epoch with a diverged step: every step is read now, unless that would wait for the
            # epoch's last step (on a GPU: loss_check.deferred); then the records carry where workers diverged instead.
            if not loss_check.deferred:
                loss_check.finish()
            with timers("evaluation"):
                metrics.end_of_epoch(cfg, epoch, totals, workers, dataset, comm, recorder, timers,
                                     loss_check.diverged_at, loss_check.divergence)
            recorder.record_clock(epoch + 1)  # where each worker's simulated time went (nothing without the clock)
            recorder.then.append(functools.partial(log_runtimes, timers.cut()[1]))  # once the records are written
            recorder.then.append(functools.partial(progress.end_of_epoch, epoch + 1, recorder))
            # On a GPU the records wait for the test of the averaged model, which runs beside the next epoch's first
            # steps (metrics.Recorder.aside); a checkpoint waits for them, as does the run's end.
            checkpoints.check()  # a checkpoint that could not be written stops the run when found, not at the next save
            saving = cfg["checkpoint_every"] and (epoch + 1) % cfg["checkpoint_every"] == 0
            recorder.flush(if_ready=not saving)  # a save waits for the records, so for every worker's verdict
            if saving:
                # Every step's verdict was in the records' check; this reads the run's first step, whose mean loss
                # the save keeps (initial_loss), when an epoch has one step.
                loss_check.finish()
                checkpoints.save(snapshot(checkpoints, epoch + 1, 0, workers, momenta, method, comm, None, run_id, cfg,
                                          loss_check, started, timing, pending))

        checkpoints.wait()  # the last checkpoint on disk before the summary marks the run finished
        recorder.flush()
        progress.close()
        recorder.summary(cfg, time.time() - started)
        recorder.close()
    log_info({"state.progress": 1.0})
    runs.release_output_dir(folder)
    return folder


_DEFAULTS = dict(config)


def checked(cfg: dict) -> tuple[dict, topologies.Topology]:
    """A checked copy of `cfg`, every key by its own name (aliases renamed), and the run's
    topology (built here, once); every problem a ConfigError naming the key, raised before
    any work starts."""
    cfg = configuration.with_checked_keys(_DEFAULTS, cfg)
    try:
        cfg["optimizer"] = methods.registered_name(cfg["optimizer"])  # one spelling, also in config.yaml
    except ValueError as problem:
        raise ConfigError(f"optimizer: {problem}") from None
    if cfg["n_workers"] < 2:
        raise ConfigError(f"n_workers must be >= 2 (one worker has no one to gossip with), got {cfg['n_workers']}")
    choices = {"task": data.TASKS, "task_architecture": models.NAMES,
               "dtype": ("float32", "bfloat16"), "stacked_compute": ("loop", "vmap", "graph"),
               "dirichlet_split": ("per_worker", "per_class"), "momentum_type": ("local", "quasi-global")}
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
    if cfg["dirichlet_split"] == "per_class" and cfg["dirichlet_alpha"] is None:
        raise ConfigError("dirichlet_split=per_class divides each class in Dirichlet(alpha) proportions: set dirichlet_alpha")
    if cfg["weight_decay"] < 0 or not 0 <= cfg["momentum"] < 1:
        raise ConfigError("weight_decay must be >= 0 and momentum in [0, 1)")
    if cfg["momentum_type"] == "quasi-global" and not cfg["momentum"] > 0:
        raise ConfigError("momentum_type=quasi-global needs momentum > 0 (with 0 it is plain SGD)")
    if cfg["checkpoint_every"] < 0:
        raise ConfigError("checkpoint_every must be >= 0")
    if cfg["target_accuracy"] is not None:
        if not is_number(cfg["target_accuracy"]) or not 0 < cfg["target_accuracy"] <= 1:
            raise ConfigError(f"target_accuracy must be a test accuracy in (0, 1] (0.9 for 90%) or null, got {cfg['target_accuracy']!r}")
        if not cfg["evaluate_average_model"]:
            raise ConfigError("target_accuracy is judged on the averaged model's test accuracy: set evaluate_average_model=true")
    if cfg["cpu_threads"] is not None and (not is_integer(cfg["cpu_threads"]) or cfg["cpu_threads"] < 1):
        raise ConfigError(f"cpu_threads must be an integer >= 1 (or null: the launch's choice), got {cfg['cpu_threads']!r}")
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
    configuration.check_device(cfg["device"])
    configuration.check_seed(cfg["seed"])
    try:
        data.check_download(cfg["task"], cfg["download"], cfg["download_url"], cfg["download_sha256"])
        data.check_data_dir(cfg["task"], cfg["data_dir"], cfg["download"])
    except (ValueError, FileNotFoundError) as problem:
        raise ConfigError(str(problem)) from None
    try:
        topology = topologies.build(cfg["topology"], cfg["n_workers"])  # a size the graph cannot have: now
    except (ValueError, OSError) as problem:
        raise ConfigError(f"topology: {problem}") from None
    configuration.check_method(cfg["optimizer"], topology, names.settings_of(cfg))
    clock.check(cfg, read_elsewhere=("network_latency_s", "network_bandwidth_bits_per_s"))  # communication_time_model's
    if methods.METHODS[cfg["optimizer"]].asynchronous:
        asynchronous.check(cfg)
        refused = {"local_steps": (cfg["local_steps"] > 1, "every gradient ends with its average (use local_steps=1)"),
                   "momentum_type": (cfg["momentum_type"] == "quasi-global", "quasi-global momentum follows a round's "
                                     "change of every worker; use momentum_type=local"),
                   "task": (cfg["task"] == "wikitext2", "its workers compute one image batch at a time (no LSTM states)"),
                   "stacked_compute": (cfg["stacked_compute"] != "loop", "its workers compute one at a time: use "
                                       "stacked_compute=loop")}
        for key, (problem, why) in refused.items():
            if problem:
                raise ConfigError(f"{key}={cfg[key]!r} with optimizer={cfg['optimizer']}: {why}")
    return cfg, configuration.with_faults(cfg, cfg["optimizer"], topology)


def uses_cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def validated(cfg: dict) -> dict:
    """A checked copy of `cfg`, every key by its own name (see `checked`)."""
    return checked(cfg)[0]


def learning_rate_factor(cfg: dict, epoch: float) -> float:
    """Linear warmup from 1 to `distributed_lr_warmup_factor` over the warmup epochs, then the
    milestones' factors; evaluated every batch at fractional epochs (the original code's schedule)."""
    factor = 1.0
    if cfg["distributed_lr_warmup_epoch"] > 0:
        factor = 1.0 + (cfg["distributed_lr_warmup_factor"] - 1.0) * min(epoch / cfg["distributed_lr_warmup_epoch"], 1.0)
    for milestone, milestone_factor in cfg["lr_schedule_milestones"]:
        if epoch >= milestone:
            factor *= milestone_factor
    return factor


# --- what a checkpoint holds (runs.Checkpoints writes it, checks it and agrees on it between processes) ----
def snapshot(checkpoints, epoch, step_in_epoch, workers, momenta, method, comm, totals, run_id, cfg, loss_check,
             started, timing, pending=None) -> dict:
    """What a process saves of a training run: after the header of `checkpoints` (where the run
    is, the layout, the run's id and configuration, its first mean loss and the wall time so
    far; `started`: when the run would have started had it never stopped), its `run_state`."""
    run = {"run_id": run_id, "config": cfg, "initial_loss": loss_check.reference, "elapsed_s": time.time() - started}
    return checkpoints.header(epoch, step_in_epoch, run) | run_state(workers, momenta, method, comm, totals, timing, pending)


def run_state(workers, momenta, method, comm, totals, timing, pending=None) -> dict:
    """The run's own entries of a save: its workers' stacks (models.stacked), their momenta, the
    method's state (under "gossip"), byte counters, random states, the interrupted epoch's
    totals (None at the end of an epoch) and the simulated clock's state (None without it); an
    asynchronous run's clock is its event queue (asynchronous.EventClock), and its "pending" entry
    holds the gradients under way and their losses (`pending`: `[L, 3]`; None for other runs)."""
    return {
        "params": workers.params, "buffers": workers.buffers, "momenta": momenta, "gossip": method.state_dict(),
        "bytes_sent": torch.from_numpy(comm.bytes_sent.copy()), "messages_sent": torch.from_numpy(comm.messages_sent.copy()),
        "messages_lost": torch.from_numpy(comm.messages_lost.copy()),
        "rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state() if comm.device.type == "cuda" else None,
        "partial_epoch": None if totals is None else totals.state(), "clock": timing.state_dict(),
        "pending": None if pending is None else {"gradients": workers.grads, "losses": pending},
    }


def saved_state_problem(state: dict, expected: dict, batches_per_epoch: int) -> str | None:
    """What makes a save (its header already checked by runs.header_problem) unusable for this
    run, before anything is restored from it (None: nothing): a step past the end of an
    epoch, interrupted-epoch totals that do not go with the step, or entries not of the form
    `expected` (this run's fresh `run_state`, with the totals of an epoch and a method whose
    state the stacks shaped, Method.prepare) has: missing, of another type, a tensor of
    another shape or dtype (runs.mismatch), which makes it a save of another run. The
    method's state is compared by the entries both have (older saves lack some), its
    per-edge stacks by the form of their rows; the CUDA random state may come from another
    device."""
    step, partial = state["step_in_epoch"], state.get("partial_epoch")
    if step > batches_per_epoch:
        return f"its step_in_epoch={step} is past the end of an epoch ({batches_per_epoch} steps)"
    if (partial is None) != (step == 0):
        return f"its partial_epoch ({'none' if partial is None else 'totals'}) does not go with step_in_epoch={step}"
    own = expected | {"gossip": None, "cuda_rng": None, "partial_epoch": None if partial is None else expected["partial_epoch"]}
    if "messages_lost" not in state:  # a save from before messages could be lost: none were
        own.pop("messages_lost")
    if "clock" not in state and expected["clock"] is None:  # a save from before the simulated clock, which is off
        own.pop("clock")
    if "pending" not in state and expected["pending"] is None:  # a save from before asynchronous runs
        own.pop("pending")
    found = runs.mismatch(state, own) or runs.mismatch(state["gossip"], expected["gossip"], "gossip", lenient=True)
    return None if found is None else f"{found}: it belongs to another run (another model or method setting)"


def restore(saved, workers, momenta, method, comm, timing, pending=None) -> dict | None:
    """Puts a snapshot back; returns the saved totals of the epoch it interrupted (or None)."""
    with torch.no_grad():
        if pending is not None:  # an asynchronous run's gradients under way
            for target, source in zip(workers.grads + [pending], saved["pending"]["gradients"] + [saved["pending"]["losses"]]):
                target.copy_(source)
        for target, source in zip(workers.params + workers.buffers + momenta, saved["params"] + saved["buffers"] + saved["momenta"]):
            target.copy_(source)
    method.load_state_dict(saved["gossip"])
    comm.bytes_sent[:] = saved["bytes_sent"].numpy()
    comm.messages_sent[:] = saved["messages_sent"].numpy()
    comm.messages_lost[:] = saved["messages_lost"].numpy() if "messages_lost" in saved else 0
    timing.load_state_dict(saved.get("clock"))  # after the counters: its next step counts from them
    torch.set_rng_state(saved["rng"])
    if saved["cuda_rng"] is not None:
        torch.cuda.set_rng_state(saved["cuda_rng"])
    return saved["partial_epoch"]


def load_data(cfg: dict, comm):
    """(the data set on this process's device, this process's loader): the data partitioned
    over all workers, this process's block of them, fetched first with `download=true`
    where its files are not there. A download that fails and files that cannot be read (missing,
    truncated, not what they should hold) and a batch larger than a worker's shard are
    ConfigErrors naming the file or the key, raised before the run claims its folder."""
    try:
        if cfg["download"]:  # one process of a launch fetches what is missing, the others wait for it (data.download)
            data.download(cfg["task"], cfg["data_dir"], cfg["download_url"], cfg["download_sha256"])
        dataset = data.load(cfg["task"], cfg["data_dir"], comm.device)
    except (ValueError, OSError) as problem:
        raise ConfigError(f"task={cfg['task']}, data_dir={cfg['data_dir']}: {problem}") from None
    try:
        return dataset, build_loader(cfg, dataset, comm)
    except ValueError as problem:
        raise ConfigError(str(problem)) from None


def finished(folder: str, epochs: int) -> bool:
    """Whether the run in `folder` wrote its summary after `epochs` epochs (summary.json marks
    a finished run; one of an earlier, shorter run does not count)."""
    try:
        with open(os.path.join(folder, "summary.json")) as f:
            return json.load(f).get("epochs") == epochs
    except (OSError, ValueError, AttributeError):
        return False


def build_loader(cfg: dict, dataset, comm):
    if dataset.is_language_model:
        return data.LanguageModelLoader(dataset, cfg["n_workers"], cfg["batch_size"], comm.first_worker, comm.num_local, cfg["bptt"])
    if cfg["dirichlet_alpha"] is not None:
        scheme = "dirichlet_per_class" if cfg["dirichlet_split"] == "per_class" else "dirichlet"
        partition = data.make_partition(scheme, dataset.train_y, cfg["n_workers"], cfg["seed"], alpha=cfg["dirichlet_alpha"])
    elif cfg["use_decentralized_data"]:
        partition = data.make_partition("sorted", dataset.train_y, cfg["n_workers"], cfg["seed"],
                                        shuffled_ratio=cfg["decentralized_data_shuffled_ratio"])
    else:
        partition = data.make_partition("iid", dataset.train_y, cfg["n_workers"], cfg["seed"])
    return data.WorkerLoader(dataset, partition, cfg["batch_size"], comm.first_worker, comm.num_local, cfg["seed"], cfg["augment"])


def build_method(cfg: dict, comm, topology) -> methods.Method:
    """The `optimizer` key's registered method, with the `optimizer_<setting>` keys as its settings."""
    return methods.build(cfg["optimizer"], comm, topology, **names.settings_of(cfg))


def build_model(cfg: dict, dataset) -> torch.nn.Module:
    """The run's model for `dataset` (a new initialization from torch's random state)."""
    return models.build(cfg["task_architecture"], in_channels=dataset.in_channels, num_classes=dataset.num_classes,
                        image_size=dataset.image_size or 32, vocab_size=len(dataset.vocab) if dataset.vocab else None)


def epoch_length(cfg: dict, loader) -> int:
    """Steps in an epoch: the loader's batches, at most max_batches_per_epoch."""
    return len(loader) if cfg["max_batches_per_epoch"] is None else min(len(loader), cfg["max_batches_per_epoch"])


def gossips_at(step: int, local_steps: int) -> bool:
    """Whether the run's `step`-th step (from 0, over the whole run) ends with the method's round:
    with local_steps = H, every H-th step."""
    return (step + 1) % local_steps == 0


def traffic_trace(cfg: dict, topology, shapes: list[tuple[int, ...]], steps: int) -> list[tuple[list, bool]]:
    """What the workers of a run of the checked `cfg` (and its `topology`, `checked`'s) send in
    each of its first `steps` steps, without training: the method's rounds, on the steps that
    local_steps picks, over random stacks of the model's parameter `shapes`, in one process.
    Returns, per step, (its exchanges, whether it gossiped): what clock.StepClock.step times.
    A synchronous method's messages depend on the shapes, the graph and the faults' draws, not on
    the values: this is the traffic of the run itself, which can so be timed on any cluster."""
    n = cfg["n_workers"]
    comm = comm_module.Communicator(n, "cpu")
    generator = torch.Generator().manual_seed(cfg["seed"])
    params = [torch.randn((n,) + tuple(shape), generator=generator) for shape in shapes]
    gradients = [torch.randn((n,) + tuple(shape), generator=generator) for shape in shapes]
    rounds = step_module.TrainingStep(build_method(cfg, comm, topology), methods.METHODS[cfg["optimizer"]], params, gradients)
    trace = []
    for step in range(steps):
        comm.log = []
        gossiped = gossips_at(step, cfg["local_steps"])
        rounds(lambda: None, gossiped)
        trace.append((comm.log, gossiped))
    return trace


def command_line(arguments: list[str] | None = None) -> None:
    """`python train.py [file.yaml] key=value ...` (also `python -m powergossip.train`):
    configuration.run_command_line on this module."""
    configuration.run_command_line(sys.modules[__name__], "train.py", _DEFAULTS, arguments)


if __name__ == "__main__":  # `python -m powergossip.train`: run the package's module, not this second copy
    from powergossip.train import command_line as _command_line

    _command_line()
