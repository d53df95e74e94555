"""Study 3: non-IID data. Label-sorted shards with a fraction reshuffled every epoch
(0, 0.1, 0.5), for D-PSGD and PowerGossip, on Fashion-MNIST across an 8-worker ring
(the settings of study 2, experiments/deep_learning.py).

    python experiments/non_iid.py --quick      # 2-core CPU, one seed
    python experiments/non_iid.py              # full: seeds 1, 2, 3 (meant for a GPU)

Every (method, fraction, seed) is a run of its own; tables and figures as in study 2.

Results: experiments/results/non_iid/ (--quick: runs/non_iid_quick/) (table.md, table.csv, test_accuracy.png).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import deep_learning, report, sweep  # noqa: E402

SHUFFLED_RATIOS = (0.0, 0.1, 0.5)
METHODS = ("dpsgd", "power_gossip_1")


def study_runs(quick: bool, extra: list[str], seeds: list[int] | None = None) -> list[sweep.Run]:
    runs = []
    for method in METHODS:
        label, overrides = deep_learning.METHODS[method]
        for ratio in SHUFFLED_RATIOS:
            data = ["use_decentralized_data=true", f"decentralized_data_shuffled_ratio={ratio}"]
            for seed in sweep.study_seeds(quick, seeds):
                runs.append(sweep.Run(sweep.seeded_name(f"{method}_shuffled_{ratio}", seed), "train.py",
                                      deep_learning.settings(quick, extra, seed) + overrides + data,
                                      {"method": label, "shuffled fraction": ratio, "seed": seed}))
    return runs


def main():
    args = sweep.study_arguments(__doc__, seeds=True).parse_args()
    folder = sweep.study_folder(args, "non_iid")
    outcomes = sweep.launch_or_collect(args, study_runs(args.quick, args.overrides, args.seeds), folder)
    report.write_report(outcomes, folder, "Fashion-MNIST, label-sorted shards, 8-worker ring", ["method", "shuffled fraction"])
    sys.exit(1 if any(o.status == "failed" for o in outcomes) else 0)


if __name__ == "__main__":
    main()
