"""Study 2: the paper's method comparison, on Fashion-MNIST across an 8-worker ring.

All six methods (all-reduce, D-PSGD, PowerGossip with 1 and 2 iterations, Choco
sign+norm, DeepSqueeze sign+norm, Moniqua 2-bit) with the paper's hyper-parameters
scaled to the task: the paper's consensus steps (gamma, theta) and the ratios of its
learning-rate warmup factors (11.3 / 16 / 4.8 / 4, the paper's CIFAR-10 settings) on a base learning
rate of 0.01 (the paper's 0.1 times 11.3 diverges on this small CNN).

    python experiments/deep_learning.py --quick      # 2-core CPU, one seed, about 10 minutes
    python experiments/deep_learning.py              # full: 30 epochs, seeds 1, 2, 3 (meant for a GPU)
    python experiments/deep_learning.py --seeds 1,2,3,4,5 --jobs 8 device=cuda
    python experiments/deep_learning.py --processes 8  # under mpirun -np 8

Every (method, seed) is a run of its own, resumable; the table gives the mean and
standard deviation over seeds, the figure the mean with the seeds' range shaded.
PowerSGD (rank 2, all-reduce-like, on gradients) joins the comparison where a method
`powersgd` is registered.

Results: experiments/results/deep_learning/ (--quick: runs/deep_learning_quick/) (table.md, table.csv, test_accuracy.png).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import report, sweep  # noqa: E402
from powergossip import algorithms  # noqa: E402

# method -> (label, overrides): the paper's per-method settings (the paper's CIFAR-10 ResNet-20 experiments).
METHODS = {
    "all_reduce": ("All-reduce", ["optimizer=all-reduce", "distributed_lr_warmup_factor=11.3"]),
    "dpsgd": ("D-PSGD (uncompressed)", ["optimizer=dpsgd", "optimizer_diffusion_rate=1.308", "distributed_lr_warmup_factor=11.3"]),
    "power_gossip_1": ("PowerGossip (1 iteration)", ["optimizer=power-gossip", "optimizer_num_iterations=1",
                                                      "optimizer_diffusion_rate=1.308", "distributed_lr_warmup_factor=11.3"]),
    "power_gossip_2": ("PowerGossip (2 iterations)", ["optimizer=power-gossip", "optimizer_num_iterations=2",
                                                       "optimizer_diffusion_rate=1.308", "distributed_lr_warmup_factor=11.3"]),
    "choco_sign": ("Choco (sign+norm)", ["optimizer=choco", "optimizer_compressor=sign-and-norm",
                                          "optimizer_diffusion_rate=0.45", "distributed_lr_warmup_factor=16"]),
    "deepsqueeze_sign": ("DeepSqueeze (sign+norm)", ["optimizer=deepsqueeze", "optimizer_compressor=sign-and-norm",
                                                      "optimizer_diffusion_rate=0.01", "distributed_lr_warmup_factor=4.8"]),
    "moniqua": ("Moniqua (2-bit)", ["optimizer=moniqua", "optimizer_theta=0.25", "optimizer_diffusion_rate=0.005",
                                     "distributed_lr_warmup_factor=4"]),
}
if "powersgd" in algorithms.METHODS:  # PowerSGD (Vogels et al. 2019), on a checkout that has it
    METHODS["powersgd_2"] = ("PowerSGD (rank 2)", ["optimizer=powersgd", "optimizer_rank=2", "distributed_lr_warmup_factor=11.3"])

COMMON = ["task=fashion_mnist", "task_architecture=small_cnn", "topology=ring", "n_workers=8", "batch_size=128",
          "learning_rate=0.01", "momentum=0.9", "weight_decay=0.0001"]
FULL = ["num_epochs=30", "distributed_lr_warmup_epoch=2", "lr_schedule_milestones=[[15,0.1],[23,0.1]]", "checkpoint_every=5"]
QUICK = ["num_epochs=3", "distributed_lr_warmup_epoch=1", "lr_schedule_milestones=[[2,0.1]]", "max_batches_per_epoch=12",
         "max_test_examples=2000", "evaluate_each_worker=false", "checkpoint_every=0", "device=cpu"]


PAPER = ("Paper (CIFAR-10 ResNet-20, 8-ring, 300 epochs; MB are MiB per worker): uncompressed 92.1% at 102 MB/epoch; "
         "Choco 92.0% at 3.2 MB; Moniqua 90.7% at 6.4 MB; DeepSqueeze 91.2% at 3.2 MB; "
         "PowerGossip 1 it. 91.7% at 1.8 MB, 2 it. 91.9% at 3.0 MB.")


def settings(quick: bool, extra: list[str], seed: int) -> list[str]:
    """Every run's arguments but the method's (the seed where it stood before studies took
    seeds, so that earlier runs of seed 1 count as done)."""
    return COMMON + [f"seed={seed}"] + (QUICK if quick else FULL) + extra


def seeded_runs(name: str, overrides: list[str], labels: dict, quick: bool, extra: list[str],
                seeds: list[int] | None) -> list[sweep.Run]:
    """A setting's train.py runs, one per seed: this study's settings, then `overrides`."""
    return [sweep.Run(sweep.seeded_name(name, seed), "train.py", settings(quick, extra, seed) + overrides, {**labels, "seed": seed})
            for seed in sweep.study_seeds(quick, seeds)]


def method_variants(methods, variants: dict[str, tuple[list[str], dict]], quick: bool, extra: list[str],
                    seeds: list[int] | None) -> list[sweep.Run]:
    """Runs of every method (METHODS' names) in every variant (folder-name suffix ->
    (its overrides, its labels)), one per seed."""
    runs = []
    for method in methods:
        label, overrides = METHODS[method]
        for suffix, (more, labels) in variants.items():
            runs += seeded_runs(f"{method}_{suffix}", overrides + more, {"method": label, **labels}, quick, extra, seeds)
    return runs


def study_runs(quick: bool, extra: list[str], seeds: list[int] | None = None) -> list[sweep.Run]:
    return [run for name, (label, overrides) in METHODS.items()
            for run in seeded_runs(name, overrides, {"method": label}, quick, extra, seeds)]


def main():
    report.study_main(__doc__, "deep_learning", study_runs, "Fashion-MNIST, small CNN, 8-worker ring", ["method"], notes=PAPER)


if __name__ == "__main__":
    main()
