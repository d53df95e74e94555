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

import numpy as np
import torch
import torch.nn.functional as F

import algorithms
import comm as comm_module
import compressors
import data
import models
import runs
import topologies
from models.stacked import StackedReplicas

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
    resume=False,  # continue from output_dir/checkpoints
)

output_dir = "output/train"


def log_metric(name, values, tags):
    """Called for every record (also written to metrics.jsonl and TensorBoard); replace freely."""


def log_info(info_dict):
    """Called with progress information ({"state.progress": fraction}); replace freely."""


def log_runtime(label, mean, std, instances):
    """Called per timer at the end of every epoch (seconds); replace freely."""


OPTIMIZERS = ("all-reduce", "dpsgd", "power-gossip", "choco", "deepsqueeze", "moniqua")


def main():
    cfg = validated(config)
    started = time.time()
    comm = comm_module.Communicator(cfg["n_workers"], cfg["device"])
    is_root = comm.rank == 0
    if is_root:
        print(f"{cfg['n_workers']} workers in {comm.world_size} process(es) ({comm.num_local} each); backend "
              f"{comm.context.backend or 'none (one process)'}; device {comm.device}", flush=True)
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

    checkpoints = Checkpoints(os.path.join(output_dir, "checkpoints"), comm.rank)
    start_epoch, start_step, carried = 0, 0, None
    if cfg["resume"] and checkpoints.exists():
        saved = checkpoints.load()
        start_epoch, start_step = saved["epoch"], saved["step_in_epoch"]
        carried = restore(saved, workers, momenta, gossip, comm)
        if is_root:
            print(f"resuming from epoch {start_epoch} step {start_step} ({checkpoints.path})", flush=True)
    recorder = Recorder(comm, cfg, append=cfg["resume"] and start_epoch + start_step > 0, upto_epoch=start_epoch)
    if is_root:
        runs.write_config(output_dir, cfg)

    stop = StopRequests()
    timers = Timers(comm.device)
    loss_check = FiniteLossCheck(comm.device, comm, checkpoints.folder)
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
                checkpoints.save(snapshot(epoch, step + 1, workers, momenta, gossip, comm, totals))
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
            checkpoints.save(snapshot(epoch + 1, 0, workers, momenta, gossip, comm, None))
        for label, (mean, std, instances) in timers.summary().items():
            log_runtime(label, mean, std, instances)

    if progress is not None:
        progress.close()
    recorder.summary(cfg, time.time() - started)
    recorder.close()
    log_info({"state.progress": 1.0})


# --- configuration --------------------------------------------------------------------------
def validated(cfg: dict) -> dict:
    """A checked copy of the config: every problem raised before any work starts."""
    runs.check_config(_DEFAULTS, cfg)
    cfg = dict(cfg)
    choices = {"task": data.TASKS, "task_architecture": models.NAMES, "optimizer": OPTIMIZERS,
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
    cfg["lr_schedule_milestones"] = [list(m) if isinstance(m, (list, tuple)) else [m, 0.1] for m in cfg["lr_schedule_milestones"]]
    if any(len(m) != 2 for m in cfg["lr_schedule_milestones"]):
        raise runs.ConfigError("lr_schedule_milestones holds [epoch, factor] pairs or bare epochs")
    if cfg["optimizer"] in ("choco", "deepsqueeze"):
        compressors.build(cfg["optimizer_compressor"], cfg["optimizer_keep_ratio"], cfg["optimizer_rank"])
    topologies.build(cfg["topology"], cfg["n_workers"])  # a size the graph cannot have: ValueError now
    return cfg


_DEFAULTS = dict(config)


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
    """The `optimizer` key as an algorithm (as the paper's code: PowerGossip on matrices only)."""
    gamma, name = cfg["optimizer_diffusion_rate"], cfg["optimizer"]
    if name == "all-reduce":
        return algorithms.AllReduce(comm, topology)
    if name == "dpsgd":
        return algorithms.SimpleGossip(comm, topology, diffusion_rate=gamma)
    if name == "power-gossip":
        power = algorithms.PowerGossip(comm, topology, rank=cfg["optimizer_rank"], num_iterations=cfg["optimizer_num_iterations"],
                                       warm_start=cfg["optimizer_warm_start"], round_weights=cfg["optimizer_round_weights"],
                                       diffusion_rate=gamma, seed=cfg["seed"])
        return algorithms.OnlyOnLargeParameters(power, algorithms.SimpleGossip(comm, topology))
    if name == "moniqua":
        return algorithms.MoniquaGossip(comm, topology, theta=cfg["optimizer_theta"], diffusion_rate=gamma, seed=cfg["seed"])
    compressor = compressors.build(cfg["optimizer_compressor"], cfg["optimizer_keep_ratio"], cfg["optimizer_rank"], cfg["optimizer_qsgd_levels"])
    method = algorithms.ChocoGossip if name == "choco" else algorithms.DeepSqueezeGossip
    return method(comm, topology, compressor, diffusion_rate=gamma, seed=cfg["seed"])


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
    for name in cfg["spectrum_logging_params"]:
        if name not in workers.parameter_names:
            raise ValueError(f"spectrum_logging_params: no parameter {name!r}; known: {', '.join(workers.parameter_names)}")
        everyone = comm.all_gather_workers(workers.params[workers.parameter_names.index(name)])
        for i, j in cfg["spectrum_logging_worker_pairs"]:
            difference = (everyone[i] - everyone[j]).reshape(everyone.shape[1], -1).double().cpu()
            for index, value in enumerate(torch.linalg.svdvals(difference).tolist()):
                recorder.record("spectrum", e, value, {"parameter": name, "workers": f"{i}-{j}", "index": index})


class Recorder:
    """Writes records (rank 0): metrics.jsonl, TensorBoard and the log_metric hook.
    bits/messages are per worker (mean over workers, cumulative)."""

    def __init__(self, comm, cfg, append: bool, upto_epoch: int):
        self.comm = comm
        self.is_root = comm.rank == 0
        self.last_test_avg = None
        self.bits = self.messages = 0.0  # per worker, cumulative; refreshed by count_traffic()
        if not self.is_root:
            return
        if os.path.exists(os.path.join(output_dir, "summary.json")):
            os.remove(os.path.join(output_dir, "summary.json"))  # the run is not finished until it is written again
        # Resuming: keep the records of the epochs the checkpoint covers, drop later ones.
        kept = [r for r in runs.read_metrics(output_dir) if r["epoch"] <= upto_epoch] \
            if append and os.path.exists(os.path.join(output_dir, "metrics.jsonl")) else []
        self.file = runs.MetricsFile(output_dir)
        for record in kept:
            self.file.write(record)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(os.path.join(output_dir, "tensorboard"))
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
        with open(os.path.join(output_dir, "summary.json"), "w") as f:  # also marks the run as finished
            json.dump({"test_avg_accuracy": self.last_test_avg, "mb_per_worker_per_epoch": mb_per_epoch,
                       "wall_time_s": wall_time, "epochs": cfg["num_epochs"]}, f)
        print(f"\nsummary: {cfg['optimizer']} on a {cfg['n_workers']}-worker {cfg['topology']}, {cfg['task']} "
              f"{cfg['task_architecture']}: averaged-model test accuracy {accuracy}; "
              f"{mb_per_epoch:.3f} MB sent per worker per epoch; wall time {wall_time:.1f} s", flush=True)

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


class FiniteLossCheck:
    """Stops the run at a non-finite loss, one step late: step t's verdict (and mean loss,
    for the progress bar) is copied to the host without waiting and read at step t+1, so
    the check never drains the GPU's queue. `finish()` before anything is saved."""

    def __init__(self, device: torch.device, comm, checkpoint_folder: str):
        self.comm, self.checkpoint_folder = comm, checkpoint_folder
        self.host = torch.zeros(2, pin_memory=device.type == "cuda")  # [all finite, mean loss]
        self.pending = None  # (losses, epoch, step, event) of the step not read yet
        self.mean_loss = float("nan")

    def watch(self, losses, epoch, step):
        self.finish()
        self.host.copy_(torch.stack([torch.isfinite(losses).all().float(), losses.mean()]), non_blocking=True)
        self.pending = (losses, epoch, step, _event() if losses.is_cuda else None)

    def finish(self):
        if self.pending is None:
            return
        losses, epoch, step, event = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        all_finite, self.mean_loss = self.host.tolist()
        if not all_finite:
            comm = self.comm
            raise FloatingPointError(
                f"the loss became {losses.tolist()} at epoch {epoch} step {step} (local workers "
                f"{comm.first_worker}..{comm.first_worker + comm.num_local - 1}); the last good checkpoint is kept in "
                f"{self.checkpoint_folder} — lower learning_rate or optimizer_diffusion_rate")


def progress_bar(is_root: bool, total: int, done: int):
    """Worker 0's progress bar; quiet when stderr is not a terminal."""
    if not is_root or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, initial=done, unit="step", dynamic_ncols=True)


# --- checkpoints ---------------------------------------------------------------------------------
class Checkpoints:
    """One file per process, written atomically (temp file, then rename), read with weights_only."""

    def __init__(self, folder: str, rank: int):
        self.folder = folder
        self.path = os.path.join(folder, f"rank{rank}.pt")

    def exists(self) -> bool:
        return os.path.exists(self.path)

    def save(self, state: dict) -> None:
        os.makedirs(self.folder, exist_ok=True)
        temporary = self.path + ".tmp"
        torch.save(state, temporary)
        os.replace(temporary, self.path)

    def load(self) -> dict:
        return torch.load(self.path, map_location="cpu", weights_only=True)


def snapshot(epoch, step_in_epoch, workers, momenta, gossip, comm, totals) -> dict:
    return {
        "epoch": epoch, "step_in_epoch": step_in_epoch, "layout": [comm.n_workers, comm.world_size],
        "params": workers.params, "buffers": workers.buffers, "momenta": momenta, "gossip": gossip.state_dict(),
        "bytes_sent": torch.from_numpy(comm.bytes_sent.copy()), "messages_sent": torch.from_numpy(comm.messages_sent.copy()),
        "rng": torch.get_rng_state(), "cuda_rng": torch.cuda.get_rng_state() if comm.device.type == "cuda" else None,
        "partial_epoch": None if totals is None else totals.state(),
    }


def restore(saved, workers, momenta, gossip, comm) -> EpochTotals | None:
    """Puts the checkpoint's state back; returns the totals of the epoch it interrupted (or None)."""
    if saved["layout"] != [comm.n_workers, comm.world_size]:
        raise ValueError(f"the checkpoint was written by {saved['layout'][1]} processes for {saved['layout'][0]} workers; "
                         f"resume with the same layout")
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
    main()
