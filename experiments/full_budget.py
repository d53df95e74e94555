"""Study 12: the paper's headline table at the paper's budget, on a GPU.

ResNet-20 on Fashion-MNIST across an 8-worker ring for the paper's 300 epochs: batch 128
per worker, learning rate 0.1 with each method's warmup factor over 5 epochs, divided by
10 at epochs 150 and 225, and the paper's tuned gamma and theta, unchanged: every run
reads its method's file in experiments/configs/train/cifar10_resnet20_ring8/ and changes
only the task (and the layout, below). Eight methods: all-reduce, D-PSGD, PowerGossip with
1 and 2 iterations, Choco sign+norm, DeepSqueeze sign+norm, Moniqua 2-bit, PowerSGD rank 2.
A second part answers study 11's open question at the same budget: PowerGossip (1 and 2
iterations) and all-reduce on a 16-worker ring. Runs go seed by seed (every method's seed
1 before any seed 2), so that a partial study already gives a full table.

The workers of a run share one GPU in one process (`stacked_compute=graph dtype=bfloat16`,
benchmarks/README.md); the averaged model is tested after every epoch (each worker's own
model is not: `evaluate_each_worker=false`). Fashion-MNIST has 1.2x CIFAR-10's steps per
epoch (60,000 against 50,000 images), so its MB per epoch are about 1.2x the paper's (1.24x
with the paper's MiB against the MB, 10^6 bytes, counted here).

    python experiments/full_budget.py --jobs 3 data_dir=<fashion-mnist folder>     # on a GPU: 22 runs, 2 seeds
    python experiments/full_budget.py --jobs 3 --seeds 3 data_dir=...               # a third seed
    python experiments/full_budget.py --quick                                       # CPU, one seed, a few batches
    python experiments/full_budget.py --report-only                                 # tables and figures only
    python experiments/full_budget.py task=cifar10 data_dir=<folder with cifar-10-batches-py> --output runs/cifar10

Each run's records (config.yaml, metrics.jsonl, summary.json, DONE) are committed under
experiments/results/full_budget/runs/, so a later launch skips them. Results:
experiments/results/full_budget/ (--quick: runs/full_budget_quick/): table.md/.csv
(mean ± std over seeds, the paper's number beside each row), test_accuracy.png.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import report, sweep  # noqa: E402

PAPER_CONFIGS = os.path.join(sweep.ROOT, "experiments", "configs", "train", "cifar10_resnet20_ring8")
# name -> (label, the paper's file, the paper's CIFAR-10 result: test accuracy, MB per worker per epoch)
METHODS = {
    "all_reduce": ("All-reduce", "all_reduce.yaml", "not in its table (Choco paper: 92.64%)"),
    "dpsgd": ("D-PSGD (uncompressed)", "dpsgd.yaml", "92.1% at 102 MB"),
    "power_gossip_1": ("PowerGossip (1 iteration)", "power_gossip_1_iteration.yaml", "91.7% at 1.8 MB"),
    "power_gossip_2": ("PowerGossip (2 iterations)", "power_gossip_2_iterations.yaml", "91.9% at 3.0 MB"),
    "choco_sign": ("Choco (sign+norm)", "choco_sign.yaml", "92.0% at 3.2 MB"),
    "deepsqueeze_sign": ("DeepSqueeze (sign+norm)", "deepsqueeze_sign.yaml", "91.2% at 3.2 MB"),
    "moniqua": ("Moniqua (2-bit)", "moniqua.yaml", "90.7% at 6.4 MB"),
    "powersgd_2": ("PowerSGD (rank 2)", "powersgd_rank_2.yaml", "not in its table"),
}
# part -> (its graph's label, its overrides, the methods it runs)
PARTS = {
    "ring8": ("8-worker ring", ["n_workers=8"], list(METHODS)),
    "ring16": ("16-worker ring", ["n_workers=16"], ["all_reduce", "power_gossip_1", "power_gossip_2"]),
}
SEEDS = (1, 2)  # at least two seeds per setting (the budget); --seeds adds more

COMMON = ["task=fashion_mnist", "evaluate_each_worker=false"]
FULL = ["device=cuda", "stacked_compute=graph", "dtype=bfloat16"]  # the paper's schedule comes from its files
QUICK = ["n_workers=4", "batch_size=16", "num_epochs=2", "distributed_lr_warmup_epoch=1", "lr_schedule_milestones=[[1,0.1]]",
         "max_batches_per_epoch=4", "max_test_examples=200", "checkpoint_every=0", "device=cpu"]


def study_runs(quick: bool, extra: list[str], seeds: list[int] | None = None) -> list[sweep.Run]:
    """Every part's methods, one run per seed, seed-major. The paper's file comes first, so
    the task, the part's graph and the layout (and `extra`) override it; --quick shrinks
    every run to a few batches on 4 workers."""
    runs = []
    for seed in (list(seeds) if seeds else [1] if quick else list(SEEDS)):
        for part, (graph, part_overrides, methods) in PARTS.items():
            for name in methods:
                label, paper_file, _ = METHODS[name]
                overrides = [os.path.join(PAPER_CONFIGS, paper_file)] + COMMON + part_overrides + (QUICK if quick else FULL)
                runs.append(sweep.Run(f"{part}_{name}_seed{seed}", "train.py", overrides + [f"seed={seed}"] + extra,
                                      {"graph": graph, "method": label, "seed": seed}))
    return runs


def paper_result(row: dict) -> str:
    """The paper's number for a table row (its 8-ring table; the 16-ring part has none)."""
    if row["graph"] != PARTS["ring8"][0]:
        return ""
    return next(paper for label, _, paper in METHODS.values() if label == row["method"])


NOTES = ("The paper's column: its headline table (CIFAR-10, ResNet-20, 8-worker ring, 300 epochs; its MB are MiB, 2^20 bytes, "
         "per worker per epoch; Choco, DeepSqueeze and Moniqua tuned, PowerGossip with defaults). Here MB are 10^6 bytes, and "
         "Fashion-MNIST has 58 steps per epoch against CIFAR-10's 49, so the MB here are about 1.24x the paper's figures.")


def main():
    report.study_main(__doc__, "full_budget", study_runs, "Fashion-MNIST, ResNet-20, 300 epochs", ["graph", "method"],
                      notes=NOTES, extra_columns={"paper (CIFAR-10)": paper_result})


if __name__ == "__main__":
    main()
