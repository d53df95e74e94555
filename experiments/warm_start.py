"""Study 6: PowerGossip's warm start against a random start, in training.

Warm start (Vogels et al. 2020, Algorithm 1): each power iteration
starts from the previous one's result, so that across steps the iteration keeps
refining the approximation of the slowly changing neighbour differences. A random
start redraws the starting vectors from the edge's shared generator every iteration
(the original code's `*-rand` runs). Same bits either way. PowerGossip with 1 and 2
iterations (rank 1) on study 2's task and settings (experiments/deep_learning.py:
Fashion-MNIST, small CNN, 8-worker ring), three seeds.

    python experiments/warm_start.py --quick                 # CPU, one seed, reduced epochs
    python experiments/warm_start.py --jobs 8 device=cuda    # full: 4 settings x 3 seeds

Results: experiments/results/warm_start/ (--quick: runs/warm_start_quick/):
table.md/.csv (mean ± std over seeds), test_accuracy.png (against epochs and MB sent).
The consensus study (experiments/consensus.py, power_gossip_random*) compares the two
starts without training.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import deep_learning, report, sweep  # noqa: E402

STARTS = {"warm": ["optimizer_warm_start=true"], "random": ["optimizer_warm_start=false"]}
METHODS = ("power_gossip_1", "power_gossip_2")


def study_runs(quick: bool, extra: list[str], seeds: list[int] | None = None) -> list[sweep.Run]:
    variants = {start: (setting, {"start": start}) for start, setting in STARTS.items()}
    return deep_learning.method_variants(METHODS, variants, quick, extra, seeds)


def main():
    report.study_main(__doc__, "warm_start", study_runs, "PowerGossip, warm or random start, Fashion-MNIST, 8-worker ring", ["method", "start"])


if __name__ == "__main__":
    main()
