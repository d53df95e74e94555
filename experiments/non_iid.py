"""Study 3: non-IID data. Label-sorted shards with a fraction reshuffled every epoch
(0, 0.1, 0.5), for D-PSGD and PowerGossip, on Fashion-MNIST across an 8-worker ring
(the settings of study 2, experiments/deep_learning.py).

    python experiments/non_iid.py --quick      # 2-core CPU
    python experiments/non_iid.py              # full (meant for a GPU)

Results: experiments/results/non_iid[_quick]/ (table.md, table.csv, test_accuracy.png).
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import deep_learning, report, sweep  # noqa: E402

SHUFFLED_RATIOS = (0.0, 0.1, 0.5)
METHODS = ("dpsgd", "power_gossip_1")


def study_runs(quick: bool, extra: list[str]) -> list[sweep.Run]:
    settings = deep_learning.COMMON + (deep_learning.QUICK if quick else deep_learning.FULL) + extra
    runs = []
    for method in METHODS:
        label, overrides = deep_learning.METHODS[method]
        for ratio in SHUFFLED_RATIOS:
            data = ["use_decentralized_data=true", f"decentralized_data_shuffled_ratio={ratio}"]
            runs.append(sweep.Run(f"{method}_shuffled_{ratio}", "train.py", settings + overrides + data,
                                  {"method": label, "shuffled fraction": ratio}))
    return runs


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a reduced run for a 2-core CPU")
    parser.add_argument("--processes", type=int, default=None, help="launch each run under mpirun -np N")
    parser.add_argument("--report-only", action="store_true", help="only rebuild tables and figures from earlier runs")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (several fit on one GPU)")
    parser.add_argument("--output", default=None, help="folder for runs and results")
    parser.add_argument("overrides", nargs="*", help="extra key=value for every run")
    args = parser.parse_args()
    folder = args.output or os.path.join(sweep.RESULTS, "non_iid" + ("_quick" if args.quick else ""))
    runs = study_runs(args.quick, args.overrides)
    launch = sweep.collect if args.report_only else lambda r, f: sweep.launch(r, f, args.processes, jobs=args.jobs)
    outcomes = launch(runs, os.path.join(folder, "runs"))
    report.write_report(outcomes, folder, "Fashion-MNIST, label-sorted shards, 8-worker ring", ["method", "shuffled fraction"])
    sys.exit(1 if any(o.status == "failed" for o in outcomes) else 0)


if __name__ == "__main__":
    main()
