"""Study 5: PowerGossip's power iterations and rank at equal bits, in training.

PowerGossip (Vogels et al. 2020, Algorithm 1) spends its bits on two knobs: the rank
r of each round's approximation of the neighbour differences and the number of power
iterations per step. Each costs about the same bits per step (a rank-r round sends r
vectors per matrix; each iteration is one round), so the question is which buys more
accuracy per MB. Grid: iterations 1, 2, 4, 8 x rank 1, 2, 4 on Fashion-MNIST across a
16-worker ring, with study 2's settings (experiments/deep_learning.py: small CNN,
gamma 1.308, the same learning-rate schedule) and three seeds.

    python experiments/power_iterations.py --quick                 # CPU, one seed, reduced epochs
    python experiments/power_iterations.py --jobs 8 device=cuda    # full: 12 settings x 3 seeds
    python experiments/power_iterations.py --iterations 1,2 --ranks 1  # a part of the grid

Results: experiments/results/power_iterations/ (--quick: runs/power_iterations_quick/):
table.md/.csv (mean ± std over seeds), test_accuracy.png (against epochs and MB sent),
final_accuracy_vs_mb.png (final accuracy against MB per worker per epoch, a line per rank).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import deep_learning, report, sweep  # noqa: E402

ITERATIONS = (1, 2, 4, 8)
RANKS = (1, 2, 4)
WORKERS = 16


def study_runs(quick: bool, extra: list[str], seeds: list[int] | None = None, iterations=ITERATIONS,
               ranks=RANKS) -> list[sweep.Run]:
    _, power_gossip = deep_learning.METHODS["power_gossip_1"]
    runs = []
    for rank in ranks:
        for count in iterations:
            grid = [f"n_workers={WORKERS}", f"optimizer_num_iterations={count}", f"optimizer_rank={rank}"]
            runs += deep_learning.seeded_runs(f"rank{rank}_iterations{count}", power_gossip + grid,
                                              {"rank": rank, "iterations": count}, quick, extra, seeds)
    return runs


def main():
    parser = sweep.study_arguments(__doc__, seeds=True)
    parser.add_argument("--iterations", type=sweep.int_list, default=list(ITERATIONS), help="power iterations per step")
    parser.add_argument("--ranks", type=sweep.int_list, default=list(RANKS), help="ranks")
    args = parser.parse_args()
    runs = study_runs(args.quick, args.overrides, args.seeds, args.iterations, args.ranks)
    title = f"PowerGossip, Fashion-MNIST, small CNN, {WORKERS}-worker ring"
    outcomes, rows = report.run_study(args, "power_iterations", runs, title, ["rank", "iterations"])
    report.final_against_megabytes(rows, sweep.study_folder(args, "power_iterations"), "rank", "iterations", title)
    sys.exit(report.exit_status(outcomes))


if __name__ == "__main__":
    main()
