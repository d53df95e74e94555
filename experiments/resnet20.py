"""Study 11: the paper's comparison with a larger model, ResNet-20 on Fashion-MNIST across a 16-worker ring.

Study 2 compares the methods on a small CNN that saturates near 92%; here the model is
the paper's ResNet-20 (272,474 parameters, batch norm), 16 workers on a ring, every
method with the paper's tuned settings for ResNet-20 (experiments/configs/train/
cifar10_resnet20_ring8: learning rate 0.1 with each method's warmup factor, gamma,
theta), 20 epochs (learning rate divided by 10 at epochs 10 and 15), three seeds. The
16 workers run in one process on a GPU with `stacked_compute=graph dtype=bfloat16`
(benchmarks/README.md); the averaged model is tested after every epoch.

    python experiments/resnet20.py --quick                                    # CPU, one seed, a few batches
    python experiments/resnet20.py --jobs 3 data_dir=<fashion-mnist folder>   # full, on a GPU: 8 methods x 3 seeds

Results: experiments/results/resnet20/ (--quick: runs/resnet20_quick/): table.md/.csv
(mean ± std over seeds), test_accuracy.png (against epochs and MB sent).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import deep_learning, report, sweep  # noqa: E402

COMMON = ["task=fashion_mnist", "task_architecture=resnet20", "topology=ring", "n_workers=16", "batch_size=128",
          "learning_rate=0.1", "momentum=0.9", "weight_decay=0.0001", "evaluate_each_worker=false"]
FULL = ["num_epochs=20", "distributed_lr_warmup_epoch=2", "lr_schedule_milestones=[[10,0.1],[15,0.1]]", "checkpoint_every=5",
        "device=cuda", "stacked_compute=graph", "dtype=bfloat16"]
QUICK = ["n_workers=4", "batch_size=16", "num_epochs=2", "distributed_lr_warmup_epoch=1", "lr_schedule_milestones=[[1,0.1]]",
         "max_batches_per_epoch=6", "max_test_examples=500", "checkpoint_every=0", "device=cpu"]


def study_runs(quick: bool, extra: list[str], seeds: list[int] | None = None) -> list[sweep.Run]:
    """Every method of study 2 with its (the paper's) settings, one run per seed."""
    return [sweep.Run(sweep.seeded_name(name, seed), "train.py", COMMON + (QUICK if quick else FULL) + overrides
                      + [f"seed={seed}"] + extra, {"method": label, "seed": seed})
            for name, (label, overrides) in deep_learning.METHODS.items() for seed in sweep.study_seeds(quick, seeds)]


def main():
    report.study_main(__doc__, "resnet20", study_runs, "Fashion-MNIST, ResNet-20, 16-worker ring", ["method"],
                      notes=deep_learning.PAPER)


if __name__ == "__main__":
    main()
