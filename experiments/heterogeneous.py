"""Study 13: heterogeneous data. Fashion-MNIST on 16 workers (batch 32 each, the small CNN,
which has no batch norm), each class divided over the workers in Dirichlet(alpha)
proportions (dirichlet_split=per_class, alpha 0.1 and 0.01), 20 epochs, seeds 1 and 2:
all-reduce, D-PSGD on a ring with and without quasi-global momentum (QGM, Lin et al. 2021),
Stochastic Gradient Push on the time-varying exponential graph, PowerGossip and Choco with
and without QGM; D² (ring, (I + W) / 2), gradient tracking (ring) and RelaySum (chain,
double binary trees) join where those methods are registered. The learning rate is tuned
for all-reduce on a 3-point grid (all-reduce runs at every point) and used by all.

    python experiments/heterogeneous.py --quick      # 2-core CPU: 4 workers, alpha 0.1, one seed, 3 settings
    python experiments/heterogeneous.py              # full (meant for a GPU)

The table gives, per setting, the worst worker's final test accuracy (the RelaySGD
paper's measure) next to the averaged model's, and MB sent per worker per epoch.

Results: experiments/results/heterogeneous/ (--quick: runs/heterogeneous_quick/) (table.md, table.csv, test_accuracy.png).
"""
from __future__ import annotations

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import report, sweep  # noqa: E402
from powergossip import figures  # noqa: E402
from powergossip import runs as powergossip_runs  # noqa: E402

ALPHAS = (0.1, 0.01)
FULL_SEEDS = (1, 2)
LEARNING_RATES = (0.01, 0.03, 0.1)  # the grid all-reduce is tuned on
LEARNING_RATE = 0.03  # the grid's point every method uses: the middle one until the full form's all-reduce runs pick
QGM = ["momentum_type=quasi-global"]

# method -> (label, overrides)
METHODS = {
    "all_reduce": ("All-reduce", ["optimizer=all-reduce"]),
    "dpsgd": ("D-PSGD (ring)", ["optimizer=dpsgd"]),
    "dpsgd_qgm": ("D-PSGD + QGM (ring)", ["optimizer=dpsgd"] + QGM),
    "push_sum": ("SGP (time-varying exponential)", ["optimizer=push-sum", "topology=one_peer_exponential"]),
    "power_gossip": ("PowerGossip (ring)", ["optimizer=power-gossip"]),
    "power_gossip_qgm": ("PowerGossip + QGM (ring)", ["optimizer=power-gossip"] + QGM),
    "choco": ("Choco sign+norm (ring)", ["optimizer=choco", "optimizer_compressor=sign-and-norm", "optimizer_diffusion_rate=0.45"]),
    "choco_qgm": ("Choco sign+norm + QGM (ring)", ["optimizer=choco", "optimizer_compressor=sign-and-norm",
                                                    "optimizer_diffusion_rate=0.45"] + QGM),
    # D² needs lambda_min(W) > -1/3; an even ring with weights 1/3 sits at -1/3: it mixes with (I + W) / 2
    "d2": ("D² (ring, (I+W)/2)", ["optimizer=d2", "optimizer_diffusion_rate=0.5"]),
    "gradient_tracking": ("Gradient tracking (ring)", ["optimizer=gradient-tracking"]),
    "relay_sum_chain": ("RelaySum (chain)", ["optimizer=relay-sum", "topology=chain"]),
    "relay_sum_trees": ("RelaySum (double binary trees)", ["optimizer=relay-sum", "topology=double_binary_trees"]),
}

COMMON = ["task=fashion_mnist", "task_architecture=small_cnn", "topology=ring", "n_workers=16", "batch_size=32",
          "momentum=0.9", "weight_decay=0.0001", "dirichlet_split=per_class", "evaluate_each_worker=true"]
FULL = ["num_epochs=20", "distributed_lr_warmup_epoch=0", "lr_schedule_milestones=[[15,0.1]]", "checkpoint_every=5"]
QUICK = ["n_workers=4", "num_epochs=2", "distributed_lr_warmup_epoch=0", "lr_schedule_milestones=[]",
         "max_batches_per_epoch=8", "max_test_examples=1000", "checkpoint_every=0", "device=cpu"]
LABELS = ["method", "alpha", "learning rate"]

PUBLISHED = ("Published trend (RelaySGD paper, Table 2; CIFAR-10, VGG-11 without BN, 16 workers, worst worker at "
             "alpha = 1 / 0.1 / 0.01): D-SGD ring 87.4 / 79.9 / 53.9%, D² 87.2 / 84.0 / 38.2%, D-SGD + QGM 89.5 / 84.8 / "
             "63.3%, RelaySum chain 87.3 / 87.2 / 86.5%, all-reduce 90.2%.")


QUICK_METHODS = ("all_reduce", "dpsgd_qgm", "power_gossip_qgm")


def study_runs(quick: bool, extra: list[str], seeds: list[int] | None = None) -> list[sweep.Run]:
    """Every (method, alpha, seed) at the chosen learning rate, and all-reduce at every point
    of the grid; --quick: QUICK_METHODS at the chosen learning rate, alpha 0.1, one seed."""
    runs = []
    for seed in sweep.study_seeds(quick, seeds or (None if quick else list(FULL_SEEDS))):
        for alpha in ALPHAS[:1] if quick else ALPHAS:
            for name, (label, overrides) in METHODS.items():
                if quick and name not in QUICK_METHODS:
                    continue
                rates = LEARNING_RATES if name == "all_reduce" and not quick else (LEARNING_RATE,)
                for lr in rates:
                    run = f"{name}_alpha{alpha}_lr{lr}"
                    arguments = COMMON + [f"seed={seed}", f"dirichlet_alpha={alpha}", f"learning_rate={lr}"] + \
                        (QUICK if quick else FULL) + overrides + extra
                    runs.append(sweep.Run(sweep.seeded_name(run, seed), "train.py", arguments,
                                          {"method": label, "alpha": alpha, "learning rate": lr, "seed": seed}))
    return runs


def worst_worker_cells(runs: list[sweep.Run], folder: str):
    """A table cell per setting: the worst worker's final test accuracy, mean ± std over the
    seeds whose run folder (under `folder`/runs) has it; read when the table is written."""
    def cell(row: dict) -> str:
        values = []
        for run in runs:
            records = os.path.join(folder, "runs", run.name, "metrics.jsonl")
            if tuple(run.labels[k] for k in LABELS) == tuple(row[k] for k in LABELS) and os.path.exists(records):
                points = figures.curve(powergossip_runs.read_metrics(records), "accuracy", "test_worst")
                values += [points[-1][1]] if points else []
        if not values:
            return "n/a"
        spread = f" ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else ""
        return f"{100 * statistics.mean(values):.2f}%{spread}"
    return cell


def main():
    args = sweep.study_arguments(__doc__, seeds=True).parse_args()
    runs = study_runs(args.quick, args.overrides, args.seeds)
    folder = sweep.study_folder(args, "heterogeneous")
    outcomes, _ = report.run_study(args, "heterogeneous", runs, "Fashion-MNIST, per-class Dirichlet split, 16 workers", LABELS,
                                   PUBLISHED, {"worst-worker test accuracy, mean ± std over seeds": worst_worker_cells(runs, folder)})
    sys.exit(report.exit_status(outcomes))


if __name__ == "__main__":
    main()
