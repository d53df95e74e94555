"""Study 10: "no new hyper-parameters", what each method loses when nothing is tuned for it.

The paper's claim (Vogels et al. 2020, Sections 1 and 5): PowerGossip runs with the
consensus step and learning rate of uncompressed gossip, while Choco, DeepSqueeze and
Moniqua need their consensus step gamma (and Moniqua its bound theta) and their
learning rate tuned anew. Study 2's task and settings (experiments/deep_learning.py:
Fashion-MNIST, small CNN, 8-worker ring, 30 epochs), three seeds, in four variants:

- tuned: the paper's tuned gamma and learning-rate factor of each method (study 2's runs);
- gamma 1: gamma = 1, the default and the first value a user tries; its tuned learning rate;
- all-reduce LR: the learning-rate warmup factor tuned for all-reduce (11.3); its tuned gamma;
- untuned: gamma = 1 and all-reduce's learning rate: what a user gets who tunes nothing.

Methods whose tuned learning rate is all-reduce's (D-PSGD, PowerGossip) have two
variants (tuned, untuned); all-reduce is the reference. Moniqua keeps theta = 0.25 in
every variant (a bound has no neutral default). A run that diverges stops at train.py's
loss check and shows as such in the table.

    python experiments/no_tuning.py --quick                 # CPU, one seed, reduced epochs
    python experiments/no_tuning.py --jobs 8 device=cuda    # full: 15 settings x 3 seeds

Results: experiments/results/no_tuning/ (--quick: runs/no_tuning_quick/): table.md/.csv
(mean ± std over seeds), test_accuracy.png (against epochs and MB sent).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import deep_learning, report, sweep  # noqa: E402

ALL_REDUCE_LR = "distributed_lr_warmup_factor=11.3"  # all-reduce's tuned factor (experiments/deep_learning.py)
UNTUNED_GAMMA = "optimizer_diffusion_rate=1.0"  # train.py's default
VARIANTS = {  # folder-name suffix -> (overrides that replace the tuned ones, labels)
    "tuned": ([], {"gamma": "tuned", "learning rate": "tuned"}),
    "gamma1": ([UNTUNED_GAMMA], {"gamma": "1", "learning rate": "tuned"}),
    "allreduce_lr": ([ALL_REDUCE_LR], {"gamma": "tuned", "learning rate": "all-reduce's"}),
    "untuned": ([UNTUNED_GAMMA, ALL_REDUCE_LR], {"gamma": "1", "learning rate": "all-reduce's"}),
}
# method -> the variants that differ from its tuned setting
METHODS = {"all_reduce": ("tuned",), "dpsgd": ("tuned", "untuned"), "power_gossip_1": ("tuned", "untuned"),
           "choco_sign": tuple(VARIANTS), "deepsqueeze_sign": tuple(VARIANTS), "moniqua": tuple(VARIANTS)}


def study_runs(quick: bool, extra: list[str], seeds: list[int] | None = None) -> list[sweep.Run]:
    runs = []
    for method, names in METHODS.items():
        variants = {name: VARIANTS[name] for name in names}
        runs += deep_learning.method_variants([method], variants, quick, extra, seeds)
    return runs


def main():
    report.study_main(__doc__, "no_tuning", study_runs, "Tuned and untuned hyper-parameters, Fashion-MNIST, small CNN, "
                      "8-worker ring", ["method", "gamma", "learning rate"])


if __name__ == "__main__":
    main()
