"""Study 13: heterogeneous data. Fashion-MNIST on 16 workers (batch 32 each, the small CNN,
which has no batch norm), each class divided over the workers in Dirichlet(alpha)
proportions (dirichlet_split=per_class, alpha 0.1 and 0.01), 20 epochs, seeds 1 and 2:
all-reduce, D-PSGD on a ring with and without quasi-global momentum (QGM, Lin et al. 2021),
Stochastic Gradient Push on the time-varying exponential graph, PowerGossip and Choco with
and without QGM; D² (ring, (I + W) / 2), gradient tracking (ring) and RelaySum (chain,
double binary trees). The learning rate is tuned for all-reduce on a 3-point grid (all-reduce
runs at every point first) and used by all; a method that diverges with it (train.py's loss
check) runs again at the next smaller point, and the table shows both rows.

    python experiments/heterogeneous.py --quick      # 2-core CPU: 4 workers, alpha 0.1, one seed, 3 settings
    python experiments/heterogeneous.py              # full (meant for a GPU)

The table gives, per setting, the worst worker's final test accuracy (the RelaySGD
paper's measure) next to the averaged model's, and MB sent per worker per epoch.

Results: experiments/results/heterogeneous/ (--quick: runs/heterogeneous_quick/) (table.md, table.csv, test_accuracy.png;
the full study also worst_worker.png).
"""
from __future__ import annotations

import functools
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import report, sweep  # noqa: E402
from powergossip import figures  # noqa: E402
from powergossip import runs as powergossip_runs  # noqa: E402

ALPHAS = (0.1, 0.01)
FULL_SEEDS = (1, 2)
LEARNING_RATES = (0.01, 0.03, 0.1)  # the grid all-reduce is tuned on; a method that diverges takes the next smaller point
QUICK_LEARNING_RATE = 0.03  # --quick tunes nothing
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


def one_run(name: str, alpha: float, lr: float, seed: int, quick: bool, extra: list[str]) -> sweep.Run:
    label, overrides = METHODS[name]
    arguments = COMMON + [f"seed={seed}", f"dirichlet_alpha={alpha}", f"learning_rate={lr}"] + \
        (QUICK if quick else FULL) + overrides + extra
    return sweep.Run(sweep.seeded_name(f"{name}_alpha{alpha}_lr{lr}", seed), "train.py", arguments,
                     {"method": label, "alpha": alpha, "learning rate": lr, "seed": seed})


def settings(quick: bool, seeds: list[int] | None = None):
    """(alpha, seed) pairs of the study, seed-major."""
    return [(alpha, seed) for seed in sweep.study_seeds(quick, seeds or (None if quick else list(FULL_SEEDS)))
            for alpha in (ALPHAS[:1] if quick else ALPHAS)]


def tuning_runs(extra: list[str], seeds: list[int] | None = None) -> list[sweep.Run]:
    """Phase 1: all-reduce at every point of the grid, for every alpha and seed."""
    return [one_run("all_reduce", alpha, lr, seed, False, extra) for alpha, seed in settings(False, seeds) for lr in LEARNING_RATES]


def study_runs(quick: bool, extra: list[str], seeds: list[int] | None = None, learning_rate: float | None = None) -> list[sweep.Run]:
    """Phase 2: every other method at the chosen learning rate, for every alpha and seed, after
    the tuning runs (--quick: QUICK_METHODS at QUICK_LEARNING_RATE, alpha 0.1, one seed)."""
    if quick:
        return [one_run(name, alpha, QUICK_LEARNING_RATE, seed, True, extra) for alpha, seed in settings(True, seeds)
                for name in QUICK_METHODS]
    if learning_rate not in LEARNING_RATES:
        raise ValueError(f"the learning rate must be a point of the grid {LEARNING_RATES}, got {learning_rate}")
    return tuning_runs(extra, seeds) + [one_run(name, alpha, learning_rate, seed, False, extra) for alpha, seed in settings(False, seeds)
                                        for name in METHODS if name != "all_reduce"]


def final_test_accuracy(outcome: sweep.Outcome) -> float | None:
    """The averaged model's test accuracy at the run's last epoch (None: no finished run)."""
    if report.run_status(outcome) != "done":
        return None
    points = figures.curve(sweep.metrics(outcome), "accuracy", "test_avg")
    return points[-1][1] if points else None


def chosen_learning_rate(outcomes: list[sweep.Outcome]) -> tuple[float, str]:
    """The grid point where all-reduce's final test accuracy, averaged over every alpha and
    seed, is highest (a point with a run that diverged or is missing cannot be chosen), and a
    sentence that says so with each point's mean."""
    means = {}
    for lr in LEARNING_RATES:
        finals = [final_test_accuracy(o) for o in outcomes if o.run.labels["method"] == METHODS["all_reduce"][0]
                  and o.run.labels["learning rate"] == lr]
        if finals and all(value is not None for value in finals):
            means[lr] = statistics.mean(finals)
    if not means:
        raise SystemExit("heterogeneous: no learning rate of the grid has all its all-reduce runs finished; "
                         "launch the study (without --report-only) to make them")
    best = max(means, key=means.get)
    points = ", ".join(f"{lr}: {100 * means[lr]:.2f}%" if lr in means else f"{lr}: not every run finished" for lr in LEARNING_RATES)
    return best, (f"Learning rate {best}, chosen on all-reduce's final test accuracy (averaged model, mean over alphas "
                  f"and seeds) at each point of the grid: {points}.")


def smaller_rate_runs(outcomes: list[sweep.Outcome], extra: list[str]) -> list[sweep.Run]:
    """For every (method, alpha) with a run that diverged: all its seeds again at the next
    smaller point of the grid (none below the grid's smallest)."""
    by_label = {label: name for name, (label, _) in METHODS.items()}
    diverged = {(o.run.labels["method"], o.run.labels["alpha"], o.run.labels["learning rate"]) for o in outcomes
                if report.run_status(o) == "diverged" and o.run.labels["method"] != METHODS["all_reduce"][0]}
    runs = []
    for label, alpha, lr in sorted(diverged, key=str):
        smaller = [point for point in LEARNING_RATES if point < lr]
        if smaller:
            seeds = sorted({o.run.labels["seed"] for o in outcomes if o.run.labels["method"] == label and o.run.labels["alpha"] == alpha})
            runs += [one_run(by_label[label], alpha, smaller[-1], seed, False, extra) for seed in seeds]
    return runs


def finals(runs: list[sweep.Run], folder: str, split: str, label_keys: list[str] = LABELS) -> dict[tuple, list[float]]:
    """The runs' `label_keys` labels -> the final test accuracy of `split` ("test_worst": the
    worst worker's, "test_avg": the averaged model's) of each of those runs that finished
    (under `folder`/runs; a diverged run's last epoch is not a result)."""
    values: dict[tuple, list[float]] = {}
    for run in runs:
        run_folder = os.path.join(folder, "runs", run.name)
        if os.path.exists(os.path.join(run_folder, "DONE")):
            points = figures.curve(powergossip_runs.read_metrics(os.path.join(run_folder, "metrics.jsonl")), "accuracy", split)
            values.setdefault(tuple(run.labels[k] for k in label_keys), []).extend([points[-1][1]] if points else [])
    return values


def worst_worker_cells(runs: list[sweep.Run], folder: str, label_keys: list[str] = LABELS):
    """A table cell per setting (the runs with the row's `label_keys` labels): the worst
    worker's final test accuracy, mean ± std over the seeds whose run (under `folder`/runs)
    finished; read when the table is written."""
    worst = functools.cache(lambda: finals(runs, folder, "test_worst", label_keys))  # read at the first cell, once the runs ran

    def cell(row: dict) -> str:
        values = worst().get(tuple(row[k] for k in label_keys), [])
        if not values:
            return "n/a"
        spread = f" ± {100 * statistics.stdev(values):.2f}" if len(values) > 1 else ""
        return f"{100 * statistics.mean(values):.2f}%{spread}"
    return cell


def worst_worker_figure(runs: list[sweep.Run], folder: str, learning_rate: float) -> str:
    """worst_worker.png: per method at the study's learning rate, the worst worker's final test
    accuracy at each alpha (bars: mean, whiskers: std over seeds) and the averaged model's
    (dots); a method with no finished run there is marked as diverged."""
    from matplotlib.figure import Figure  # here: only the full study's report draws
    worst, averaged = finals(runs, folder, "test_worst"), finals(runs, folder, "test_avg")
    alphas = sorted({run.labels["alpha"] for run in runs}, reverse=True)
    labels = [label for label, _ in METHODS.values()]
    figure = Figure(figsize=(9, 0.45 * len(labels) + 1.5), layout="tight")
    axis = figure.add_subplot()
    height = 0.8 / len(alphas)
    drawn = set()
    for a, (alpha, style) in enumerate(zip(alphas, figures.distinct_styles(len(alphas)))):
        for m, label in enumerate(labels):
            y = m + (a - (len(alphas) - 1) / 2) * height
            values = worst.get((label, alpha, learning_rate), [])
            if not values:
                axis.text(0.01, y, f"alpha {alpha}: diverged", va="center", fontsize=7)
                continue
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            bar = f"worst worker, alpha {alpha}"  # each legend entry once: with the first bar drawn
            axis.barh(y, statistics.mean(values), height, xerr=spread, color=style["color"], label=None if bar in drawn else bar)
            axis.plot([statistics.mean(averaged[label, alpha, learning_rate])], [y], "o", color="black", markersize=3,
                      label=None if drawn else "averaged model")
            drawn.add(bar)
    axis.set_yticks(range(len(labels)), labels, fontsize=8)
    axis.invert_yaxis()
    axis.set_xlim(0, 1)
    axis.set_xlabel(f"final test accuracy (learning rate {learning_rate}, mean over seeds)")
    axis.grid(True, axis="x", alpha=0.3)
    axis.legend(fontsize=7, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3)
    return figures.save(figure, os.path.join(folder, "worst_worker.png"))


def main():
    args = sweep.study_arguments(__doc__, seeds=True).parse_args()
    folder = sweep.study_folder(args, "heterogeneous")
    notes = PUBLISHED
    if args.quick:
        runs = study_runs(True, args.overrides, args.seeds)
    else:  # tune all-reduce, run every method at its best point, and a diverged method again one point lower
        learning_rate, tuned = chosen_learning_rate(sweep.launch_or_collect(args, tuning_runs(args.overrides, args.seeds), folder))
        runs = study_runs(False, args.overrides, args.seeds, learning_rate)
        while True:
            retries = [run for run in smaller_rate_runs(sweep.launch_or_collect(args, runs, folder), args.overrides)
                       if run.name not in {r.name for r in runs}]
            if not retries:
                break
            runs += retries
        lowered = sorted({f"{r.labels['method']} at alpha {r.labels['alpha']}" for r in runs if r.labels["method"] != METHODS["all_reduce"][0]
                          and r.labels["learning rate"] < learning_rate})
        notes = " ".join([tuned, f"Diverged at that rate and run again one point lower (both rows in the table): {', '.join(lowered)}."
                          if lowered else "No method diverged at that rate.", PUBLISHED])
    outcomes, _ = report.run_study(args, "heterogeneous", runs, "Fashion-MNIST, per-class Dirichlet split, 16 workers", LABELS,
                                   notes, {"worst-worker test accuracy, mean ± std over seeds": worst_worker_cells(runs, folder)})
    if not args.quick:
        print(f"figure: {worst_worker_figure(runs, folder, learning_rate)}")
    sys.exit(report.exit_status(outcomes))


if __name__ == "__main__":
    main()
