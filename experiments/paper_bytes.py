"""Bytes per worker per epoch of the paper's CIFAR-10 setup (ResNet-20, 8-worker ring),
next to the paper's table (Vogels et al. 2020, Table 1: uncompressed 102 MB, Choco and
DeepSqueeze 3.2, Moniqua 6.4, PowerGossip 1.8 with 1 iteration, 3.0 with 2).

No data and no gradients: every method of experiments/configs/train/cifar10_resnet20_ring8/
runs its registered `step` on ResNet-20's parameters stacked over the 8 workers, in one
CPU process, exactly as train.py calls it; before each step every worker's parameters
move by its own small random step, so that neighbours differ as in training. The count
is comm.bytes_sent per step, averaged over two epochs of steps after a first step
(PowerGossip's first step sends nothing, as neighbours start equal; its rounds alternate
between X^T P and X Q, of different sizes, so the mean is over whole pairs of rounds),
times the steps of an epoch: what each method sends per epoch in steady state.

An epoch is ceil(50,000 / (8 x 128)) = 49 steps, as the original code counted; train.py's
loader drops the last partial batch of each worker's shard (6,250 // 128 = 48 steps).

    OMP_NUM_THREADS=1 python experiments/paper_bytes.py        # about 30 s on one core
"""
from __future__ import annotations

import glob
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train  # noqa: E402
from experiments import sweep  # noqa: E402
from powergossip import comm as comm_module  # noqa: E402
from powergossip import configuration, models, topologies  # noqa: E402
from powergossip.models.stacked import StackedReplicas  # noqa: E402

SETUP = os.path.join(sweep.ROOT, "experiments", "configs", "train", "cifar10_resnet20_ring8")
TRAIN_EXAMPLES = 50_000  # CIFAR-10's training set
STEPS_PER_EPOCH = math.ceil(TRAIN_EXAMPLES / (8 * 128))  # the original code's epoch (49)
TRAIN_PY_STEPS = TRAIN_EXAMPLES // 8 // 128  # train.py's: whole batches of each worker's shard (48)
PAPER_MB = {"dpsgd": 102, "choco_sign": 3.2, "deepsqueeze_sign": 3.2, "moniqua": 6.4,
            "power_gossip_1_iteration": 1.8, "power_gossip_2_iterations": 3.0}  # Table 1, "MB per epoch"
HEADER = ["config", "MiB / worker / epoch (49 steps)", "MB (10^6 bytes)", "train.py epoch (48 steps), MiB", "paper (MB per epoch)"]


def bytes_per_step(config_file: str, steps: int = 2 * STEPS_PER_EPOCH) -> float:
    """Mean bytes a worker sends per step, over `steps` steps after the first, of the method in `config_file`."""
    cfg = configuration.apply_overrides(train._DEFAULTS, [config_file])
    torch.manual_seed(cfg["seed"])
    template = models.build(cfg["task_architecture"], in_channels=3, num_classes=10, image_size=32)
    workers = StackedReplicas(template, cfg["n_workers"], torch.device("cpu"))
    comm = comm_module.Communicator(cfg["n_workers"], "cpu")
    gossip = train.build_method(cfg, comm, topologies.build(cfg["topology"], cfg["n_workers"]))
    counted_from = None
    for step in range(1 + steps):
        for x in workers.params:  # each worker's own local step
            x.add_(torch.randn_like(x), alpha=1e-3)
        gossip.step(workers.params)
        if step == 0:
            counted_from = comm.bytes_sent.copy()
    return float((comm.bytes_sent - counted_from).mean()) / steps


def main():
    rows = []
    for config_file in sorted(glob.glob(os.path.join(SETUP, "*.yaml"))):
        name = os.path.splitext(os.path.basename(config_file))[0]
        per_step = bytes_per_step(config_file)
        rows.append([name, f"{per_step * STEPS_PER_EPOCH / 2**20:.2f}", f"{per_step * STEPS_PER_EPOCH / 1e6:.2f}",
                     f"{per_step * TRAIN_PY_STEPS / 2**20:.2f}", PAPER_MB.get(name, "")])
        print(f"{name}: {per_step:.0f} bytes per worker per step", flush=True)
    print(sweep.markdown_table(HEADER, rows), end="")


if __name__ == "__main__":
    main()
