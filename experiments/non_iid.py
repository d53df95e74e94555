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
    variants = {f"shuffled_{ratio}": (["use_decentralized_data=true", f"decentralized_data_shuffled_ratio={ratio}"],
                                      {"shuffled fraction": ratio}) for ratio in SHUFFLED_RATIOS}
    return deep_learning.method_variants(METHODS, variants, quick, extra, seeds)


def main():
    report.study_main(__doc__, "non_iid", study_runs, "Fashion-MNIST, label-sorted shards, 8-worker ring", ["method", "shuffled fraction"])


if __name__ == "__main__":
    main()
