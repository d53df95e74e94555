#!/usr/bin/env python3
"""Decentralized deep learning: every worker trains its own replica on its own shard
and gossips with its neighbours (REFERENCE.md, "Training setup of the paper").

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
at x_t; gossip x_t; local Nesterov-SGD step on the gossiped parameters (all-reduce:
local step, then average). Records go to `output_dir/metrics.jsonl` (one JSON object
each: name, epoch, step, value, bits, messages, tags), to TensorBoard and through
`log_metric`.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
import uuid
import warnings

import numpy as np
import torch
import torch.nn.functional as F

from powergossip import algorithms
from powergossip import comm as comm_module
from powergossip import compressors
from powergossip import data
from powergossip import models
from powergossip import runs
from powergossip import topologies
from powergossip.models.stacked import StackedReplicas

config = dict(
    task="fashion_mnist",  # fashion_mnist (embedded), cifar10, wikitext2 or synthetic
    task_architecture="small_cnn",  # small_cnn, resnet20, resnet18, vgg16 or lstm
    batch_size=128,  # per worker
    weight_decay=1e-4,  # L2 on all parameters but batch-norm ones
    num_epochs=4,  # passes over the training set
    learning_rate=0.05,  # base learning rate, multiplied by the schedule below
    momentum=0.9,  # Nesterov momentum (0 = plain SGD)
    topology="ring",  # ring, torus, fully_connected, social_network, ..., or file:edges.txt
    lr_schedule_milestones=[[3, 0.1]],  # [epoch, factor] pairs (or bare epochs: factor 0.1)
    optimizer="power-gossip",  # all-reduce, dpsgd, power-gossip, choco, deepsqueeze or moniqua
    optimizer_diffusion_rate=1.0,  # gamma, the consensus step
    optimizer_rank=1,  # PowerGossip rank (and SVD rank, rank-matched top-k)
    optimizer_num_iterations=1,  # PowerGossip power-iteration rounds per step
    optimizer_warm_start=True,  # PowerGossip: continue the power iteration across steps
    optimizer_round_weights=False,  # PowerGossip sign variant (rank 1)
    optimizer_compressor="sign-and-norm",  # choco/deepsqueeze: sign-and-norm, top-k, random-k, svd, qsgd, identity
    optimizer_keep_ratio=0.01,  # top-k / random-k fraction kept (null: rank-matched)
    optimizer_qsgd_levels=16,  # QSGD levels
    optimizer_theta=0.25,  # Moniqua's bound on neighbour differences
    n_workers=4,  # workers (graph nodes); a multiple of the number of processes
    distributed_lr_warmup_epoch=1,  # epochs of linear warmup of the learning-rate factor
    distributed_lr_warmup_factor=1.0,  # factor reached at the end of the warmup (from 1)
    use_decentralized_data=False,  # label-sorted shards instead of iid reshuffling
    decentralized_data_shuffled_ratio=0.0,  # fraction of each sorted shard reshuffled every epoch
    dirichlet_alpha=None,  # Dirichlet(alpha) label skew per worker (null: off)
    seed=1,  # model init, data order, shared randomness
    evaluate_average_model=True,  # also test the model with all workers' parameters and buffers averaged
    evaluate_each_worker=True,  # test every worker's own model each epoch
    spectrum_logging_params=[],  # parameter names whose neighbour differences' spectra are logged
    spectrum_logging_epochs=[],  # epochs (1-based, at their end) to log spectra
    spectrum_logging_worker_pairs=[],  # [[i, j], ...] worker pairs for the spectra
    device="auto",  # auto, cpu, cuda or cuda:K
    dtype="float32",  # float32, or bfloat16 (autocast for compute; parameters stay float32)
    stacked_compute="loop",  # local workers' forward/backward: loop (one replica after the other), vmap (batched; image models) or graph (CUDA graph of the loop; image models on a GPU)
    graph_streams=8,  # stacked_compute=graph: CUDA streams the local workers are spread over (they run side by side)
    data_dir=None,  # folder with the data set's files (null: the default places)
    augment=None,  # random crop + flip (null: on for CIFAR-10 only)
    gradient_clipping=None,  # clip each worker's gradient norm (the LSTM: 0.4)
    bptt=30,  # language model: tokens per window
    max_batches_per_epoch=None,  # cut epochs short (quick runs, tests)
    max_test_examples=None,  # evaluate on the first N test examples only
    evaluation_batch_size=1000,  # batch size of evaluation passes
    checkpoint_every=1,  # epochs between checkpoints (0: only on SIGTERM/SIGINT)
    max_loss_ratio=100.0,  # a worker loss above this multiple of the run's first mean loss is divergence: stop, save nothing
    resume=False,  # continue the run in output_dir from its checkpoints
    overwrite=False,  # replace the results of another run in output_dir (without it, such a folder is refused)
)

output_dir = None  # where results go; None: a new folder runs/<date>-<time>-<optimizer>

# What a resumed run may change; every other key defines the run and must stay as it was.
MAY_CHANGE_ON_RESUME = (
    "num_epochs", "learning_rate", "lr_schedule_milestones", "distributed_lr_warmup_epoch", "distributed_lr_warmup_factor",
    "weight_decay", "gradient_clipping", "max_loss_ratio", "device", "dtype", "stacked_compute", "graph_streams", "data_dir",
    "evaluate_average_model", "evaluate_each_worker", "spectrum_logging_params", "spectrum_logging_epochs",
    "spectrum_logging_worker_pairs", "max_test_examples", "evaluation_batch_size", "checkpoint_every", "resume", "overwrite",
)


def log_metric(name, values, tags):
    """Called for every record (also written to metrics.jsonl and TensorBoard); replace freely."""


def log_info(info_dict):
    """Called with progress information ({"state.progress": fraction}); replace freely."""


def log_runtime(label, mean, std, instances):
    """Called per timer at the end of every epoch (seconds); replace freely."""


def main():
    cfg = validated(config)
    started = time.time()
    comm = comm_module.Communicator(cfg["n_workers"], cfg["device"])
    is_root = comm.rank == 0
    if is_root:
        print(f"{cfg['n_workers']} workers in {comm.world_size} process(es) ({comm.num_local} each); backend "
              f"{comm.context.backend or 'none (one process)'}; device {comm.device}", flush=True)
    folder = runs.claim_output_dir(output_dir, cfg["optimizer"], cfg["resume"], cfg["overwrite"], comm, started)
    checkpoints = Checkpoints(os.path.join(folder, "checkpoints"), comm)
    saved = checkpoints.agreed(cfg) if cfg["resume"] else None
    if saved is not None and (saved["epoch"], saved["step_in_epoch"]) >= (cfg["num_epochs"], 0):
        if is_root:
            print(f"nothing to do: the run in {folder} has done {saved['epoch']} epochs and num_epochs={cfg['num_epochs']}; "
                  f"raise num_epochs to train on", flush=True)
        return folder
    run_id = saved["run"]["run_id"] if saved is not None and "run" in saved else comm.gather_objects(uuid.uuid4().hex[:12])[0]
    topology = topologies.build(cfg["topology"], cfg["n_workers"])

    # Data, partitioned over all workers; this process loads its local block.
    dataset = data.load(cfg["task"], cfg["data_dir"], comm.device)
    loader = build_loader(cfg, dataset, comm)
    batches_per_epoch = len(loader) if cfg["max_batches_per_epoch"] is None else min(len(loader), cfg["max_batches_per_epoch"])

    # Every worker starts from the same initialization (DESIGN.md, "Numerics").
    torch.manual_seed(cfg["seed"])
    template = models.build(cfg["task_architecture"], in_channels=dataset.in_channels, num_classes=dataset.num_classes,
                            image_size=dataset.image_size or 32, vocab_size=len(dataset.vocab) if dataset.vocab else None)
    workers = StackedReplicas(template, comm.num_local, comm.device)
    decays = weight_decays(template, workers.parameter_names, cfg["weight_decay"])
    momenta = [torch.zeros_like(p) for p in workers.params]
    gossip = build_gossip(cfg, comm, topology)
    dpsgd = algorithms.DPSGD(gossip)
    torch.manual_seed(cfg["seed"] * 1000 + comm.rank)  # dropout: per process

    start_epoch, start_step, carried, initial_loss = 0, 0, None, None
    if saved is not None:
        start_epoch, start_step = saved["epoch"], saved["step_in_epoch"]
        carried = restore(saved, workers, momenta, gossip, comm)
        initial_loss = saved["run"]["initial_loss"] if "run" in saved else None
        if is_root:
            print(f"resuming run {run_id} from epoch {start_epoch} step {start_step} ({checkpoints.folder})", flush=True)
        del saved
    recorder = Recorder(comm, folder, run_id, append=start_epoch + start_step > 0, upto_epoch=start_epoch)
    if is_root:
        runs.write_config(folder, cfg)

    stop = StopRequests()
    timers = Timers(comm.device)
    loss_check = DivergenceCheck(comm, checkpoints, cfg["max_loss_ratio"], initial_loss)
    progress = progress_bar(is_root, cfg["num_epochs"] * batches_per_epoch, start_epoch * batches_per_epoch + start_step)
    language_model = dataset.is_language_model

    for epoch in range(start_epoch, cfg["num_epochs"]):
        totals = carried if carried is not None else EpochTotals.zeros(comm.num_local, comm.device)
        carried = None
        hidden = totals.hidden
        first_step = start_step if epoch == start_epoch else 0
        workers.train(True)
        batches = loader.epoch_batches(epoch, first_step)
        for step in range(first_step, batches_per_epoch):
            with timers("batch"):
                x, y = next(batches)
            lr = cfg["learning_rate"] * learning_rate_factor(cfg, epoch + (step + 1) / batches_per_epoch)

            def compute_gradients():
                with timers("forward_backward"):
                    return forward_backward(workers, x, y, hidden, cfg, language_model)

            def apply_update():
                with timers("update"):
                    if cfg["gradient_clipping"] is not None:
                        clip_per_worker(workers.grads, cfg["gradient_clipping"])
                    nesterov_sgd_step(workers.params, workers.grads, momenta, lr, cfg["momentum"], decays)

            with timers("gossip_and_step"):
                losses, corrects, counts, hidden = dpsgd.step(workers.params, compute_gradients, apply_update)
            totals.add(losses, corrects, counts)
            loss_check.watch(losses, epoch, step)
            if progress is not None:
                progress.update(1)
                if step % 10 == 0:  # the previous step's mean loss: reading it does not wait
                    progress.set_postfix(loss=f"{loss_check.mean_loss:.3f}", MB_sent=f"{comm.bytes_sent[0] / 1e6:.1f}")
            if stop.requested(comm):
                loss_check.finish()
                totals.hidden = hidden
                checkpoints.save(snapshot(epoch, step + 1, workers, momenta, gossip, comm, totals, run_id, cfg, loss_check))
                comm.barrier()
                if is_root:
                    print(f"\nstopped by a signal at epoch {epoch} step {step + 1}; checkpoint in {checkpoints.folder}; "
                          f"continue with resume=true", flush=True)
                sys.exit(128 + stop.signal_number)
            log_info({"state.progress": (epoch + (step + 1) / batches_per_epoch) / cfg["num_epochs"]})

        loss_check.finish()
        with timers("evaluation"):
            end_of_epoch_metrics(cfg, epoch, totals, workers, dataset, comm, recorder, timers)
        if cfg["checkpoint_every"] and (epoch + 1) % cfg["checkpoint_every"] == 0:
            checkpoints.save(snapshot(epoch + 1, 0, workers, momenta, gossip, comm, None, run_id, cfg, loss_check))
        for label, (mean, std, instances) in timers.summary().items():
            log_runtime(label, mean, std, instances)

    if progress is not None:
        progress.close()
    recorder.summary(cfg, time.time() - started)
    recorder.close()
    log_info({"state.progress": 1.0})
    return folder


# --- configuration --------------------------------------------------------------------------
def validated(cfg: dict) -> dict:
    """A checked copy of the config: every problem raised before any work starts."""
    runs.check_config(_DEFAULTS, cfg)
    cfg = dict(cfg)
    try:
        cfg["optimizer"] = algorithms.registered_name(cfg["optimizer"])  # one spelling, also in config.yaml
    except ValueError as problem:
        raise runs.ConfigError(f"optimizer: {problem}") from None
    choices = {"task": data.TASKS, "task_architecture": models.NAMES,
               "dtype": ("float32", "bfloat16"), "stacked_compute": ("loop", "vmap", "graph")}
    for key, allowed in choices.items():
        if cfg[key] not in allowed:
            raise runs.ConfigError(f"{key}={cfg[key]!r} is not one of {', '.join(allowed)}")
    if (cfg["task"] == "wikitext2") != (cfg["task_architecture"] == "lstm"):
        raise runs.ConfigError("task=wikitext2 goes with task_architecture=lstm, and lstm with wikitext2 only")
    if cfg["stacked_compute"] == "vmap" and (cfg["task_architecture"] == "lstm" or cfg["dtype"] != "float32"):
        raise runs.ConfigError("stacked_compute=vmap runs image models in float32; use stacked_compute=loop for the LSTM or bfloat16")
    if cfg["stacked_compute"] == "graph" and (cfg["task_architecture"] == "lstm" or not uses_cuda(cfg["device"])):
        raise runs.ConfigError("stacked_compute=graph records a CUDA graph of image models: it needs a GPU (device=cuda) "
                               "and an image task; use stacked_compute=loop otherwise")
    positive = ["batch_size", "num_epochs", "n_workers", "optimizer_rank", "optimizer_num_iterations", "bptt", "graph_streams",
                "evaluation_batch_size", "optimizer_qsgd_levels"]
    for key in positive:
        if cfg[key] < 1:
            raise runs.ConfigError(f"{key} must be >= 1, got {cfg[key]}")
    for key in ("learning_rate", "optimizer_diffusion_rate", "optimizer_theta"):
        if not cfg[key] > 0:
            raise runs.ConfigError(f"{key} must be > 0, got {cfg[key]}")
    if cfg["optimizer_keep_ratio"] is not None and not 0 < cfg["optimizer_keep_ratio"] <= 1:
        raise runs.ConfigError(f"optimizer_keep_ratio must be in (0, 1], got {cfg['optimizer_keep_ratio']}")
    if not 0 <= cfg["decentralized_data_shuffled_ratio"] <= 1:
        raise runs.ConfigError("decentralized_data_shuffled_ratio must be in [0, 1]")
    if cfg["dirichlet_alpha"] is not None and (cfg["use_decentralized_data"] or not cfg["dirichlet_alpha"] > 0):
        raise runs.ConfigError("dirichlet_alpha must be > 0 and cannot be combined with use_decentralized_data")
    if cfg["optimizer_round_weights"] and cfg["optimizer_rank"] != 1:
        raise runs.ConfigError("optimizer_round_weights (PowerGossip's sign variant) needs optimizer_rank=1")
    if cfg["weight_decay"] < 0 or not 0 <= cfg["momentum"] < 1:
        raise runs.ConfigError("weight_decay must be >= 0 and momentum in [0, 1)")
    if cfg["checkpoint_every"] < 0:
        raise runs.ConfigError("checkpoint_every must be >= 0")
    for key in ("max_batches_per_epoch", "max_test_examples"):
        if cfg[key] is not None and (not _is_integer(cfg[key]) or cfg[key] < 1):
            raise runs.ConfigError(f"{key} must be an integer >= 1 (or null for no limit), got {cfg[key]!r}")
    for key in ("gradient_clipping", "dirichlet_alpha"):
        if cfg[key] is not None and not (_is_number(cfg[key]) and cfg[key] > 0):
            raise runs.ConfigError(f"{key} must be a positive number (or null: off), got {cfg[key]!r}")
    if cfg["distributed_lr_warmup_epoch"] < 0 or not cfg["distributed_lr_warmup_factor"] > 0:
        raise runs.ConfigError("distributed_lr_warmup_epoch must be >= 0 and distributed_lr_warmup_factor > 0, got "
                               f"{cfg['distributed_lr_warmup_epoch']} and {cfg['distributed_lr_warmup_factor']}")
    if not cfg["max_loss_ratio"] > 1:
        raise runs.ConfigError(f"max_loss_ratio must be > 1 (a multiple of the first step's loss), got {cfg['max_loss_ratio']}")
    cfg["lr_schedule_milestones"] = [list(m) if isinstance(m, (list, tuple)) else [m, 0.1] for m in cfg["lr_schedule_milestones"]]
    if any(len(m) != 2 or not _is_number(m[0]) or m[0] < 0 or not _is_number(m[1]) or m[1] <= 0
           for m in cfg["lr_schedule_milestones"]):
        raise runs.ConfigError(f"lr_schedule_milestones holds [epoch >= 0, factor > 0] pairs or bare epochs, got "
                               f"{cfg['lr_schedule_milestones']}")
    check_spectrum_logging(cfg)
    try:
        data.check_data_dir(cfg["task"], cfg["data_dir"])
    except FileNotFoundError as problem:
        raise runs.ConfigError(str(problem)) from None
    if cfg["optimizer"] in ("choco", "deepsqueeze"):
        compressors.build(cfg["optimizer_compressor"], cfg["optimizer_keep_ratio"], cfg["optimizer_rank"])
    topologies.build(cfg["topology"], cfg["n_workers"])  # a size the graph cannot have: ValueError now
    return cfg


_DEFAULTS = dict(config)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_spectrum_logging(cfg: dict) -> None:
    """The spectrum-logging keys name parameters of the model, epochs of the run and pairs of workers."""
    if cfg["spectrum_logging_params"]:
        with torch.device("meta"):  # names only: no memory, no time
            model = models.build(cfg["task_architecture"], vocab_size=10)
        names = list(dict(model.named_parameters()))  # as StackedReplicas.parameter_names
        unknown = [name for name in cfg["spectrum_logging_params"] if name not in names]
        if unknown:
            raise runs.ConfigError(f"spectrum_logging_params: {cfg['task_architecture']} has no parameter "
                                   f"{', '.join(map(repr, unknown))}; its parameters: {', '.join(names)}")
    for epoch in cfg["spectrum_logging_epochs"]:
        if not _is_integer(epoch) or not 1 <= epoch <= cfg["num_epochs"]:
            raise runs.ConfigError(f"spectrum_logging_epochs holds epochs 1..num_epochs={cfg['num_epochs']}, got {epoch!r}")
    for pair in cfg["spectrum_logging_worker_pairs"]:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(_is_integer(w) and 0 <= w < cfg["n_workers"] for w in pair)
                and pair[0] != pair[1]):
            raise runs.ConfigError(f"spectrum_logging_worker_pairs holds [i, j] pairs of distinct workers in "
                                   f"0..{cfg['n_workers'] - 1}, got {pair!r}")


def uses_cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def learning_rate_factor(cfg: dict, epoch: float) -> float:
    """Linear warmup from 1 to `distributed_lr_warmup_factor` over the warmup epochs, then the
    milestones' factors; evaluated every batch at fractional epochs (REFERENCE.md)."""
    factor = 1.0
    if cfg["distributed_lr_warmup_epoch"] > 0:
        factor = 1.0 + (cfg["distributed_lr_warmup_factor"] - 1.0) * min(epoch / cfg["distributed_lr_warmup_epoch"], 1.0)
    for milestone, milestone_factor in cfg["lr_schedule_milestones"]:
        if epoch >= milestone:
            factor *= milestone_factor
    return factor


def build_loader(cfg: dict, dataset, comm):
    if dataset.is_language_model:
        return data.LanguageModelLoader(dataset, cfg["n_workers"], cfg["batch_size"], comm.first_worker, comm.num_local, cfg["bptt"])
    if cfg["dirichlet_alpha"] is not None:
        partition = data.make_partition("dirichlet", dataset.train_y, cfg["n_workers"], cfg["seed"], alpha=cfg["dirichlet_alpha"])
    elif cfg["use_decentralized_data"]:
        partition = data.make_partition("sorted", dataset.train_y, cfg["n_workers"], cfg["seed"],
                                        shuffled_ratio=cfg["decentralized_data_shuffled_ratio"])
    else:
        partition = data.make_partition("iid", dataset.train_y, cfg["n_workers"], cfg["seed"])
    return data.WorkerLoader(dataset, partition, cfg["batch_size"], comm.first_worker, comm.num_local, cfg["seed"], cfg["augment"])


def build_gossip(cfg: dict, comm, topology) -> algorithms.GossipAlgorithm:
    """The `optimizer` key's registered method, with the `optimizer_<name>` keys as its hyper-parameters."""
    return algorithms.build(cfg["optimizer"], comm, topology, **method_hyperparameters(cfg))


def method_hyperparameters(cfg: dict) -> dict:
    """train.py's `optimizer_<name>` keys as the methods' vocabulary (`<name>`), and the seed."""
    prefix = "optimizer_"
    return {key[len(prefix):]: value for key, value in cfg.items() if key.startswith(prefix)} | {"seed": cfg["seed"]}


# --- one step ----------------------------------------------------------------------------------
def forward_backward(workers: StackedReplicas, x, y, hidden, cfg, language_model):
    """Gradients of every local worker's loss at its own parameters (into workers.grads).
    Returns per-worker loss, correct predictions and counts, and the LSTM's hidden states."""
    if cfg["stacked_compute"] == "vmap":
        (losses, corrects), hidden = workers.vmapped_gradients(x, y), None
    elif cfg["stacked_compute"] == "graph":
        autocast_dtype = torch.bfloat16 if cfg["dtype"] == "bfloat16" else None
        (losses, corrects), hidden = workers.graphed_gradients(x, y, autocast_dtype, cfg["graph_streams"]), None
    else:
        losses, corrects, hidden = looped_gradients(workers, x, y, hidden, cfg["dtype"] == "bfloat16", language_model)
    count = torch.full((len(workers),), float(y[0].numel()), device=x.device)
    return losses.float(), corrects.float(), count, hidden


def looped_gradients(workers: StackedReplicas, x, y, hidden, bfloat16: bool, language_model):
    """stacked_compute=loop: one replica after the other (any model, the LSTM's hidden states)."""
    workers.zero_grad()
    losses, corrects = [], []
    new_hidden = []
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bfloat16)
    for row, replica in enumerate(workers.replicas):
        with autocast:
            if language_model:
                state = None if hidden is None else hidden[row]
                logits, state = replica(x[row], state)
                new_hidden.append(tuple(h.detach() for h in state))
            else:
                logits = replica(x[row])
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y[row].reshape(-1))
        loss.backward()
        losses.append(loss.detach())
        corrects.append((logits.detach().argmax(dim=-1) == y[row]).sum())
    return torch.stack(losses), torch.stack(corrects), (new_hidden if language_model else None)


def weight_decays(template, parameter_names, weight_decay: float) -> list[float]:
    """Each parameter's weight decay: none for those models.no_weight_decay_parameter_names lists."""
    no_decay = models.no_weight_decay_parameter_names(template)
    return [0.0 if name in no_decay else weight_decay for name in parameter_names]


def nesterov_sgd_step(params, grads, momenta, lr, momentum, decays):
    """PyTorch's SGD with Nesterov momentum, on all workers' stacks at once:
    d = g + wd x; m = mu m + d; x -= lr (d + mu m). One fused (foreach) kernel per
    operation and weight-decay group instead of one per parameter."""
    for wd in sorted(set(decays)):
        group = [k for k, decay in enumerate(decays) if decay == wd]
        x, g, m = [params[k] for k in group], [grads[k] for k in group], [momenta[k] for k in group]
        d = torch._foreach_add(g, x, alpha=wd) if wd else g
        if momentum:
            torch._foreach_mul_(m, momentum)
            torch._foreach_add_(m, d)
            d = torch._foreach_add(d, m, alpha=momentum)
        torch._foreach_add_(x, d, alpha=-lr)


def clip_per_worker(grads, max_norm: float):
    """Each worker's gradient scaled to norm <= max_norm (torch.nn.utils.clip_grad_norm_ per worker)."""
    norms = torch.sqrt(sum(g.reshape(g.shape[0], -1).float().pow(2).sum(dim=1) for g in grads))
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view((-1,) + (1,) * (g.dim() - 1)))


# --- evaluation and metrics --------------------------------------------------------------------
class EpochTotals:
    """Per-local-worker sums of the epoch's training loss, correct predictions and counts."""

    def __init__(self, loss, correct, count, hidden=None):
        self.loss, self.correct, self.count, self.hidden = loss, correct, count, hidden

    @classmethod
    def zeros(cls, num_local, device):
        return cls(*(torch.zeros(num_local, dtype=torch.float64, device=device) for _ in range(3)))

    def add(self, losses, corrects, counts):
        self.loss += losses.double() * counts
        self.correct += corrects.double()
        self.count += counts

    def state(self):
        hidden = None if self.hidden is None else [list(h) for h in self.hidden]
        return {"loss": self.loss, "correct": self.correct, "count": self.count, "hidden": hidden}

    @classmethod
    def from_state(cls, state, device):
        hidden = None if state["hidden"] is None else [tuple(h.to(device) for h in pair) for pair in state["hidden"]]
        return cls(state["loss"].to(device), state["correct"].to(device), state["count"].to(device), hidden)


@torch.no_grad()
def evaluate(model, dataset, cfg) -> tuple[float, float]:
    """Test loss and accuracy (perplexity-ready mean loss per token for the language model)."""
    model.eval()
    total_loss, correct, count = 0.0, 0.0, 0
    hidden = None
    for x, y in data.test_batches(dataset, cfg["evaluation_batch_size"] if not dataset.is_language_model else cfg["batch_size"],
                                  **({"bptt": cfg["bptt"]} if dataset.is_language_model else {})):
        if cfg["max_test_examples"] is not None and count >= cfg["max_test_examples"]:
            break
        if dataset.is_language_model:
            logits, hidden = model(x, hidden)
        else:
            logits = model(x)
        total_loss += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), reduction="sum").item()
        correct += (logits.argmax(dim=-1) == y).sum().item()
        count += y.numel()
    model.train()
    return total_loss / count, correct / count


def end_of_epoch_metrics(cfg, epoch, totals, workers, dataset, comm, recorder, timers):
    """Train and test metrics per worker, of the averaged model, consensus distances, spectra."""
    e = epoch + 1
    recorder.count_traffic()  # the gossip is done for this epoch: every record carries the same counts
    train = comm.all_gather_workers(torch.stack([totals.loss / totals.count, totals.correct / totals.count], dim=1))
    for worker, (loss, accuracy) in enumerate(train.tolist()):
        recorder.record("loss", e, loss, {"split": "train", "worker": worker})
        recorder.record("accuracy", e, accuracy, {"split": "train", "worker": worker})
    recorder.record("loss", e, train[:, 0].mean().item(), {"split": "train"})
    recorder.record("accuracy", e, train[:, 1].mean().item(), {"split": "train"})

    if cfg["evaluate_each_worker"]:
        local = torch.tensor([evaluate(replica, dataset, cfg) for replica in workers.replicas], dtype=torch.float64, device=comm.device)
        test = comm.all_gather_workers(local)
        for worker, (loss, accuracy) in enumerate(test.tolist()):
            recorder.record("loss", e, loss, {"split": "test", "worker": worker})
            recorder.record("accuracy", e, accuracy, {"split": "test", "worker": worker})
        recorder.record("loss", e, test[:, 0].mean().item(), {"split": "test"})
        recorder.record("accuracy", e, test[:, 1].mean().item(), {"split": "test"})

    mean_params = comm.all_reduce_mean(workers.params, count=False)
    float_buffers = workers.float_buffer_indices()
    mean_buffers = comm.all_reduce_mean([workers.buffers[k] for k in float_buffers], count=False)
    if cfg["evaluate_average_model"]:
        buffers = [b[0] for b in workers.buffers]
        for k, mean in zip(float_buffers, mean_buffers):
            buffers[k] = mean
        loss, accuracy = evaluate(workers.model_from_rows(mean_params, buffers), dataset, cfg)
        recorder.record("loss", e, loss, {"split": "test_avg"})
        recorder.record("accuracy", e, accuracy, {"split": "test_avg"})
        if dataset.is_language_model:
            recorder.record("perplexity", e, math.exp(min(loss, 50.0)), {"split": "test_avg"})

    # Consensus distance: mean over workers of ||x_i - mean(x)|| (parameters only / full state).
    params_sq = sum((x - m).reshape(x.shape[0], -1).double().pow(2).sum(dim=1) for x, m in zip(workers.params, mean_params))
    buffers_sq = sum(((workers.buffers[k] - m).reshape(len(workers), -1).double().pow(2).sum(dim=1)
                      for k, m in zip(float_buffers, mean_buffers)), torch.zeros_like(params_sq))
    distances = comm.all_gather_workers(torch.stack([params_sq.sqrt(), (params_sq + buffers_sq).sqrt()], dim=1))
    recorder.record("consensus_distance", e, distances[:, 0].mean().item(), {"type": "params_only"})
    recorder.record("consensus_distance", e, distances[:, 1].mean().item(), {"type": "full_state_vector"})

    if e in cfg["spectrum_logging_epochs"]:
        log_spectra(cfg, e, workers, comm, recorder)
    for label, (mean, _, instances) in timers.summary().items():
        recorder.record(f"time_{label}", e, mean * instances, {"split": "runtime"})


def log_spectra(cfg, e, workers, comm, recorder):
    """Singular values of x_i - x_j for the configured parameters and worker pairs (the
    spectrum-logging keys of the original code); measurement traffic is not counted."""
    for name in cfg["spectrum_logging_params"]:  # names checked by check_spectrum_logging
        everyone = comm.all_gather_workers(workers.params[workers.parameter_names.index(name)])
        for i, j in cfg["spectrum_logging_worker_pairs"]:
            difference = (everyone[i] - everyone[j]).reshape(everyone.shape[1], -1).double().cpu()
            for index, value in enumerate(torch.linalg.svdvals(difference).tolist()):
                recorder.record("spectrum", e, value, {"parameter": name, "workers": f"{i}-{j}", "index": index})


class Recorder:
    """Writes records (rank 0): metrics.jsonl, TensorBoard and the log_metric hook.
    bits/messages are per worker (mean over workers, cumulative)."""

    def __init__(self, comm, folder: str, run_id: str, append: bool, upto_epoch: int):
        self.comm, self.folder, self.run_id = comm, folder, run_id
        self.is_root = comm.rank == 0
        self.last_test_avg = None
        self.bits = self.messages = 0.0  # per worker, cumulative; refreshed by count_traffic()
        if not self.is_root:
            return
        if os.path.exists(os.path.join(folder, "summary.json")):
            os.remove(os.path.join(folder, "summary.json"))  # the run is not finished until it is written again
        # Resuming: keep the records of the epochs the checkpoint covers, drop later ones.
        kept = [r for r in runs.read_metrics(folder) if r["epoch"] <= upto_epoch] \
            if append and os.path.exists(os.path.join(folder, "metrics.jsonl")) else []
        self.file = runs.MetricsFile(folder)
        for record in kept:
            self.file.write(record)
            if record["name"] == "accuracy" and record["tags"].get("split") == "test_avg":
                self.last_test_avg = record["value"]
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(os.path.join(folder, "tensorboard"))
        except ImportError:
            self.tensorboard = None

    def count_traffic(self):
        """Bits and messages sent per worker so far (mean over workers); collective."""
        totals = np.array([self.comm.bytes_sent.sum() * 8.0, self.comm.messages_sent.sum()], dtype=np.float64)
        self.bits, self.messages = self.comm.sum_over_processes(totals) / self.comm.n_workers

    def record(self, name, epoch, value, tags):
        if not self.is_root:
            return
        if name == "accuracy" and tags.get("split") == "test_avg":
            self.last_test_avg = value
        values = {"value": float(value), "epoch": float(epoch), "bits": float(self.bits), "messages": float(self.messages)}
        self.file.write({"name": name, **values, "tags": tags})
        if self.tensorboard is not None and "worker" not in tags:
            self.tensorboard.add_scalar("/".join([name] + [str(v) for v in tags.values()]), value, epoch)
        log_metric(name, values, tags)

    def summary(self, cfg, wall_time):
        self.count_traffic()
        if not self.is_root:
            return
        mb_per_epoch = self.bits / 8 / 1e6 / max(1, cfg["num_epochs"])
        accuracy = "not evaluated" if self.last_test_avg is None else f"{100 * self.last_test_avg:.2f}%"
        with open(os.path.join(self.folder, "summary.json"), "w") as f:  # also marks the run as finished
            json.dump({"test_avg_accuracy": self.last_test_avg, "mb_per_worker_per_epoch": mb_per_epoch,
                       "wall_time_s": wall_time, "epochs": cfg["num_epochs"], "run_id": self.run_id}, f)
        print(f"\nsummary: {cfg['optimizer']} on a {cfg['n_workers']}-worker {cfg['topology']}, {cfg['task']} "
              f"{cfg['task_architecture']}: averaged-model test accuracy {accuracy}; "
              f"{mb_per_epoch:.3f} MB sent per worker per epoch; wall time {wall_time:.1f} s; results in {self.folder}", flush=True)

    def close(self):
        if self.is_root:
            self.file.close()
            if self.tensorboard is not None:
                self.tensorboard.close()


class Timers:
    """Time per labelled section. On a GPU, CUDA events recorded in the stream time the
    device's work without synchronizing (the queue of launched work never drains; a
    section's time is the device time between its start and end); elsewhere wall clock.
    `summary()` waits for the device once."""

    def __init__(self, device: torch.device):
        self.on_gpu = device.type == "cuda"
        self.samples: dict[str, list] = {}  # label -> seconds, or (start, end) events not yet read

    @contextlib.contextmanager
    def __call__(self, label):
        start = _event() if self.on_gpu else time.perf_counter()
        yield
        sample = (start, _event()) if self.on_gpu else time.perf_counter() - start
        self.samples.setdefault(label, []).append(sample)

    def summary(self) -> dict[str, tuple[float, float, int]]:
        if self.on_gpu:
            torch.cuda.synchronize()
        for label, samples in self.samples.items():
            self.samples[label] = [s if isinstance(s, float) else s[0].elapsed_time(s[1]) / 1e3 for s in samples]
        return {label: (float(np.mean(s)), float(np.std(s)), len(s)) for label, s in self.samples.items()}


def _event() -> torch.cuda.Event:
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


class DivergenceCheck:
    """Stops the run when a worker's loss is not finite or exceeds `max_loss_ratio` times the
    run's first mean loss (a loss of 1e23 is finite, and so is a model it saved). It reads
    step t's verdict (and mean loss, for the progress bar) at step t+1: the verdict is copied
    to the host without waiting, so the check never drains the GPU's queue. `finish()`
    before anything is saved."""

    def __init__(self, comm, checkpoints, max_loss_ratio: float, initial_loss: float | None):
        self.comm, self.checkpoints, self.max_loss_ratio = comm, checkpoints, max_loss_ratio
        self.initial_loss = initial_loss  # mean over all workers at the run's first step (kept by checkpoints)
        self.host = torch.zeros(2, pin_memory=comm.device.type == "cuda")  # [healthy, mean loss]
        self.pending = None  # (losses, epoch, step, event) of the step not read yet
        self.mean_loss = float("nan")

    @property
    def bound(self) -> float:
        return math.inf if self.initial_loss is None else self.max_loss_ratio * self.initial_loss

    def watch(self, losses, epoch, step):
        self.finish()
        healthy = torch.isfinite(losses).all() & (losses <= self.bound).all()
        self.host.copy_(torch.stack([healthy.float(), losses.mean()]), non_blocking=True)
        self.pending = (losses, epoch, step, _event() if losses.is_cuda else None)

    def finish(self):
        if self.pending is None:
            return
        losses, epoch, step, event = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        healthy, self.mean_loss = self.host.tolist()
        if self.initial_loss is None:  # the run's first step: the same bound on every process
            comm = self.comm
            self.initial_loss = float(comm.sum_over_processes(np.array([self.mean_loss * comm.num_local]))[0] / comm.n_workers)
        if not healthy:
            comm = self.comm
            raise FloatingPointError(
                f"the loss became {losses.tolist()} at epoch {epoch} step {step} (local workers {comm.first_worker}.."
                f"{comm.first_worker + comm.num_local - 1}; divergence is a loss that is not finite or above "
                f"max_loss_ratio={self.max_loss_ratio:g} x the first step's {self.initial_loss:.4g}); nothing was saved "
                f"from this state. {self.checkpoints.last_good()}")


def progress_bar(is_root: bool, total: int, done: int):
    """Worker 0's progress bar; quiet when stderr is not a terminal."""
    if not is_root or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="step", dynamic_ncols=True)


# --- checkpoints ---------------------------------------------------------------------------------
class Checkpoints:
    """This process's checkpoint `rank{r}.pt` and the one before it, `rank{r}.previous.pt` (kept
    so that a file damaged on disk costs one checkpoint interval, not the run). Written
    atomically with fsync, CRC-checked when read; before any process loads, all agree on
    the save they continue from (epoch, step, run id)."""

    def __init__(self, folder: str, comm):
        self.folder, self.comm = folder, comm
        self.path = os.path.join(folder, f"rank{comm.rank}.pt")
        self.previous = os.path.join(folder, f"rank{comm.rank}.previous.pt")
        self.last = None  # (epoch, step) of the checkpoint on disk that this run wrote or resumed

    def save(self, state: dict) -> None:
        check_finite(state)
        os.makedirs(self.folder, exist_ok=True)
        runs.write_atomically(self.path, state, previous=self.previous)
        self.last = (state["epoch"], state["step_in_epoch"])

    def last_good(self) -> str:
        if self.last is None:
            return "No checkpoint was saved before: start again with a smaller learning_rate or optimizer_diffusion_rate."
        return (f"The last good checkpoint (epoch {self.last[0]} step {self.last[1]}) is kept in {self.folder}: continue it "
                f"with resume=true and a smaller learning_rate or optimizer_diffusion_rate.")

    def agreed(self, cfg: dict) -> dict:
        """The checkpoint every process resumes from: the latest save if each process has it
        intact, the one before if a latest file is damaged; otherwise one error for all."""
        state, mine = _read_checkpoint(self.path)
        everyone = self.comm.gather_objects(mine)
        where = "; ".join(f"process {rank}: {_describe(found)}" for rank, found in enumerate(everyone))
        if all(found == "missing" for found in everyone):
            raise runs.ConfigError(f"resume=true but {self.folder} holds no checkpoint (none was saved yet, or the run "
                                   f"wrote elsewhere); start afresh with overwrite=true, or without resume in a new output_dir")
        layout = (self.comm.n_workers, self.comm.world_size)
        for found in everyone:
            if isinstance(found, tuple) and found[3] != layout:
                raise runs.ConfigError(f"the checkpoints in {self.folder} were written by {found[3][1]} process(es) for "
                                       f"{found[3][0]} workers; resume with the same layout")
        if not (all(isinstance(found, tuple) for found in everyone) and len(set(everyone)) == 1):
            if not any(isinstance(found, str) and found != "missing" for found in everyone):
                raise runs.ConfigError(f"cannot resume from {self.folder}: every process needs its file of the same save, "
                                       f"but {where}; restore the missing or mismatched files, or start afresh with overwrite=true")
            state, mine = _read_checkpoint(self.previous)  # a damaged file: fall back to the save before it
            earlier = self.comm.gather_objects(mine)
            if not (all(isinstance(found, tuple) for found in earlier) and len(set(earlier)) == 1):
                raise runs.ConfigError(f"cannot resume from {self.folder}: {where}; and no earlier save is intact on every "
                                       f"process; start afresh with overwrite=true")
            if self.comm.rank == 0:
                warnings.warn(f"resuming from the save before the latest (epoch {earlier[0][0]} step {earlier[0][1]}): {where}")
        if "run" not in state:
            warnings.warn(f"{self.path} was written by an older version of train.py: it has no run id and no "
                          f"configuration, so neither could be checked against this run")
        else:
            stored = _DEFAULTS | state["run"]["config"]  # keys added since the run started: their defaults
            changed = [key for key in cfg if key not in MAY_CHANGE_ON_RESUME and stored[key] != cfg[key]]
            if changed:
                raise runs.ConfigError(
                    "resume=true with a changed configuration: " + ", ".join(
                        f"{key}={cfg[key]!r} (the run has {stored[key]!r})" for key in changed)
                    + f". These define the run; only {', '.join(MAY_CHANGE_ON_RESUME[:-2])} may change on resume. "
                    "Put them back, or start a new run in another output_dir")
        self.last = (state["epoch"], state["step_in_epoch"])
        return state


def _read_checkpoint(path: str) -> tuple[dict | None, tuple | str]:
    """(state, (epoch, step, run id)) or (None, "missing" / what is wrong with the file)."""
    if not os.path.exists(path):
        return None, "missing"
    try:
        state = runs.read_verified(path)
    except runs.CorruptCheckpoint as problem:
        return None, str(problem)
    return state, (state["epoch"], state["step_in_epoch"], state.get("run", {}).get("run_id"), tuple(state["layout"]))


def _describe(found) -> str:
    if isinstance(found, str):
        return "no checkpoint file" if found == "missing" else found
    return f"epoch {found[0]} step {found[1]} of run {found[2]}"


def check_finite(state: dict) -> None:
    """Refuse to save a state with a non-finite parameter, buffer or optimizer value."""
    def tensors(value):
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, dict):
            for v in value.values():
                yield from tensors(v)
        elif isinstance(value, (list, tuple)):
            for v in value:
                yield from tensors(v)
    floats = [t for t in tensors(state) if t.is_floating_point()]
    if floats and not bool(torch.stack([torch.isfinite(t).all() for t in floats]).all()):
        raise FloatingPointError(f"not saving epoch {state['epoch']} step {state['step_in_epoch']}: some parameters or "
                                 f"optimizer values are not finite")


def snapshot(epoch, step_in_epoch, workers, momenta, gossip, comm, totals, run_id, cfg, loss_check) -> dict:
    return {
        "epoch": epoch, "step_in_epoch": step_in_epoch, "layout": [comm.n_workers, comm.world_size],
        "run": {"run_id": run_id, "config": cfg, "initial_loss": loss_check.initial_loss},
        "params": workers.params, "buffers": workers.buffers, "momenta": momenta, "gossip": gossip.state_dict(),
        "bytes_sent": torch.from_numpy(comm.bytes_sent.copy()), "messages_sent": torch.from_numpy(comm.messages_sent.copy()),
        "rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state() if comm.device.type == "cuda" else None,
        "partial_epoch": None if totals is None else totals.state(),
    }


def restore(saved, workers, momenta, gossip, comm) -> EpochTotals | None:
    """Puts the checkpoint's state back; returns the totals of the epoch it interrupted (or None)."""
    with torch.no_grad():
        for target, source in zip(workers.params + workers.buffers + momenta, saved["params"] + saved["buffers"] + saved["momenta"]):
            target.copy_(source)
    gossip.load_state_dict(saved["gossip"])
    comm.bytes_sent[:] = saved["bytes_sent"].numpy()
    comm.messages_sent[:] = saved["messages_sent"].numpy()
    torch.set_rng_state(saved["rng"])
    if saved["cuda_rng"] is not None:
        torch.cuda.set_rng_state(saved["cuda_rng"])
    return None if saved["partial_epoch"] is None else EpochTotals.from_state(saved["partial_epoch"], comm.device)


class StopRequests:
    """SIGTERM / SIGINT set a flag; every process checks it after each step and all stop
    at the same step (one tiny all-reduce when there are several processes)."""

    def __init__(self):
        self.signal_number = 0
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, self._handler)

    def _handler(self, number, frame):
        self.signal_number = number

    def requested(self, comm) -> bool:
        if comm.world_size == 1:
            return self.signal_number != 0
        flags = comm.sum_over_processes(np.array([float(self.signal_number)]))
        if flags[0] and not self.signal_number:
            self.signal_number = signal.SIGTERM
        return bool(flags[0])


if __name__ == "__main__":
    config, output_dir = runs.command_line_or_exit("train.py", config, output_dir, sys.argv[1:], validated)
    try:
        main()
    except runs.ConfigError as problem:  # found before any work (output_dir, resume): every process says the same
        runs.exit_on_config_error("train.py", problem)
