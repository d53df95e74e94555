"""Study 14: unreliable networks. The heterogeneous-data study's setting (Fashion-MNIST, 16
workers, batch 32, the small CNN, per-class Dirichlet alpha = 0.1, 20 epochs, seeds 1 and 2,
its tuned learning rate) with no faults, 1% and 10% of the messages lost, 10% of the links
down and 10% of the workers away each round (powergossip/faults.py), for D-PSGD with and
without quasi-global momentum, PowerGossip (1 and 2 iterations), Choco, push-sum (on the
time-varying exponential graph), RelaySum (on a chain; its gaps filled with x^0, and with the worker's
own last average as the RelaySGD paper's message-loss runs did), D² and gradient tracking (on the ring).
A method that has no rule yet for a kind of fault is not run there: the notes under the
table name each such pair and why.

    python experiments/unreliable.py --quick     # 2-core CPU: 4 workers, 3 methods, 3 fault settings
    python experiments/unreliable.py             # full (meant for a GPU; after experiments/heterogeneous.py)
    python experiments/unreliable.py --consensus-only   # only the consensus part (CPU, a minute)

A consensus part runs first: gossip_run.py on a 16-worker ring from random starts, every
method under every fault setting, to show which methods still reach the exact average
(consensus.md, consensus.png).

The table gives the averaged model's final test accuracy and the worst worker's, and MB
sent per worker per epoch. Results: experiments/results/unreliable/ (--quick:
runs/unreliable_quick/) (table.md, table.csv, test_accuracy.png).
"""
from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gossip_run  # noqa: E402
from experiments import heterogeneous, report, sweep  # noqa: E402
from powergossip import configuration, faults, methods, topologies  # noqa: E402

FULL_SEEDS = (1, 2)
ALPHA = 0.1
QUICK_LEARNING_RATE = heterogeneous.QUICK_LEARNING_RATE

# fault setting -> (label, overrides)
FAULTS = {
    "none": ("none", []),
    "loss1": ("1% of messages lost", ["message_loss_probability=0.01"]),
    "loss10": ("10% of messages lost", ["message_loss_probability=0.1"]),
    "links10": ("10% of links down", ["link_failure_probability=0.1"]),
    "away10": ("10% of workers away", ["offline_probability=0.1"]),
}
QGM = heterogeneous.QGM
# method -> (label, overrides): the RelaySGD paper's Table 5 methods on the graphs
METHODS = {
    "dpsgd": ("D-PSGD (ring)", ["optimizer=dpsgd"]),
    "dpsgd_qgm": ("D-PSGD + QGM (ring)", ["optimizer=dpsgd"] + QGM),
    "power_gossip_1": ("PowerGossip, 1 iteration (ring)", ["optimizer=power-gossip", "optimizer_num_iterations=1"]),
    "power_gossip_2": ("PowerGossip, 2 iterations (ring)", ["optimizer=power-gossip", "optimizer_num_iterations=2"]),
    "choco": heterogeneous.METHODS["choco"],
    "push_sum": ("SGP (time-varying exponential)", ["optimizer=push-sum", "topology=one_peer_exponential"]),
    "relay_sum": ("RelaySum (chain)", ["optimizer=relay-sum", "topology=chain"]),
    # the gap filled with the worker's own last average, as the RelaySGD paper's message-loss runs did
    "relay_sum_latest": ("RelaySum (chain), own-average fill", ["optimizer=relay-sum", "topology=chain", "optimizer_fill_missing=latest"]),
    "d2": heterogeneous.METHODS["d2"],
    "gradient_tracking": heterogeneous.METHODS["gradient_tracking"],
}
COMMON = [o for o in heterogeneous.COMMON] + [f"dirichlet_alpha={ALPHA}"]
QUICK_METHODS = ("dpsgd", "power_gossip_1", "push_sum")
QUICK_FAULTS = ("none", "loss10", "links10")
LABELS = ["method", "faults"]

PUBLISHED = ("Published trend (RelaySGD paper, Table 5; CIFAR-10, 16 workers, Dirichlet alpha = 0.01, with momentum, "
             "0 / 1 / 10% of messages dropped): RelaySum 89.2 / 89.3 / 89.3%, SGP 88.5 / 88.6 / 88.1%; D-SGD with "
             "quasi-global momentum and D² diverge once 1% of messages are lost.")


def refusal(overrides: list[str], n_workers: int, method_key: str = "optimizer") -> str | None:
    """Why train.py (gossip_run.py: method_key "algorithm") would refuse these faults for this
    method and graph (faults.check), or None."""
    defaults = {method_key: "dpsgd", "topology": "ring"} | {key: getattr(faults.FaultSettings(), key) for key in faults.KEYS}
    values = configuration.apply_overrides(defaults, [o for o in overrides if o.split("=")[0] in defaults])
    settings = faults.FaultSettings(**{key: values[key] for key in faults.KEYS})
    name = methods.registered_name(values[method_key])
    try:
        faults.check(settings, name, methods.METHODS[name].graph_needs, topologies.build(values["topology"], n_workers))
    except ValueError as problem:
        return str(problem)
    return None


def planned(quick: bool, method_table: dict, quick_methods: tuple, extra: list[str], method_key: str = "optimizer"):
    """([(run name, labels, the method's and the faults' overrides)] of every pair the entrypoint
    takes, in fault then method order; the pairs it would refuse, each as a line with why)."""
    taken, not_run = [], []
    for fault, (fault_label, fault_overrides) in FAULTS.items():
        for name, (label, method_overrides) in method_table.items():
            if quick and (fault not in QUICK_FAULTS or name not in quick_methods):
                continue
            why = refusal(method_overrides + fault_overrides + extra, 4 if quick else 16, method_key)
            if why is None:
                taken.append((f"{name}_{fault}", {"method": label, "faults": fault_label}, method_overrides + fault_overrides))
            else:
                not_run.append(f"{label} with {fault_label}: {why}")
    return taken, not_run


def study_runs(quick: bool, extra: list[str], seeds: list[int] | None = None, learning_rate: float | None = None):
    """(runs, the pairs not run with why): every method under every fault setting, seed-major."""
    taken, not_run = planned(quick, METHODS, QUICK_METHODS, extra)
    rate = QUICK_LEARNING_RATE if quick else learning_rate
    runs = [sweep.Run(sweep.seeded_name(name, seed), "train.py",
                      COMMON + [f"seed={seed}", f"learning_rate={rate}"] + (heterogeneous.QUICK if quick else heterogeneous.FULL)
                      + overrides + extra, labels | {"seed": seed})
            for seed in sweep.study_seeds(quick, seeds or (None if quick else list(FULL_SEEDS))) for name, labels, overrides in taken]
    return runs, not_run


# The consensus part: gossip_run.py from random starts, which methods still reach the exact average
CONSENSUS_METHODS = {
    "dpsgd": ("D-PSGD", ["algorithm=dpsgd"]),
    "power_gossip_1": ("PowerGossip, 1 iteration", ["algorithm=power-gossip"]),
    "power_gossip_2": ("PowerGossip, 2 iterations", ["algorithm=power-gossip", "optimizer_num_iterations=2"]),
    "deepsqueeze": ("DeepSqueeze sign+norm", ["algorithm=deepsqueeze", "optimizer_compressor=sign-and-norm",
                                              "optimizer_diffusion_rate=0.05"]),
    "moniqua": ("Moniqua", ["algorithm=moniqua", "optimizer_theta=2.0", "optimizer_diffusion_rate=0.1"]),
    "push_sum": ("push-sum", ["algorithm=push-sum"]),
    "gradient_tracking": ("gradient tracking", ["algorithm=gradient-tracking"]),
    "d2": ("D² ((I+W)/2)", ["algorithm=d2", "optimizer_diffusion_rate=0.5"]),
    "choco": ("Choco sign+norm", ["algorithm=choco", "optimizer_compressor=sign-and-norm", "optimizer_diffusion_rate=0.45"]),
}
CONSENSUS = ["n_workers=16", "topology=ring", "data_type=random", "matrix_size=20", "num_steps=400", "seed=1"]
QUICK_CONSENSUS = ["n_workers=4", "matrix_size=6", "num_steps=60"]
QUICK_CONSENSUS_METHODS = ("dpsgd", "push_sum")
CONSENSUS_HEADER = ["method", "faults", "consensus error at the end / at the start",
                    "distance to the starting mean at the end / the starting error", "MB sent per worker"]


def consensus_overrides(overrides: list[str]) -> list[str]:
    """The study's overrides that its consensus part takes: those gossip_run.py knows (seed=...; the
    others are train.py's), but not where the training part runs (device=, data_dir=: the
    consensus part gossips random matrices, a minute of CPU), so that a launch on a GPU skips the
    consensus runs made on the CPU before (with device=cuda they would have other arguments, and
    the sweep would refuse them)."""
    taken = gossip_run.DEFAULTS.keys() - {"device", "data_dir"}
    return [o for o in overrides if o.split("=")[0] in taken]


def consensus_runs(quick: bool, extra: list[str]):
    """(gossip_run.py runs of every consensus method under every fault setting, the pairs not run with why)."""
    taken, not_run = planned(quick, CONSENSUS_METHODS, QUICK_CONSENSUS_METHODS, extra, method_key="algorithm")
    return [sweep.Run(f"consensus_{name}", "gossip_run.py", CONSENSUS + (QUICK_CONSENSUS if quick else []) + overrides + extra, labels)
            for name, labels, overrides in taken], not_run


def write_consensus_report(outcomes: list[sweep.Outcome], not_run: list[str], folder: str) -> None:
    """consensus.md/.csv: each run's final consensus error (the workers' mean distance to their
    current mean) and distance to the starting mean (to the exact average: gossip_run's
    error_to_initial_mean), relative to the starting error; consensus.png: the latter against MB
    sent. The two are equal where the workers' mean stays at the starting mean."""
    from matplotlib.figure import Figure

    rows, curves = [], {}
    for outcome in outcomes:
        records = sweep.metrics(outcome)
        error = [r for r in records if r["name"] == "error"]
        to_mean = [r for r in records if r["name"] == "error_to_initial_mean"]
        labels = outcome.run.labels
        if not error or not to_mean:
            rows.append([labels["method"], labels["faults"], report.run_status(outcome), "", ""])
            continue
        start = error[0]["value"]
        rows.append([labels["method"], labels["faults"], f"{error[-1]['value'] / start:.2e}", f"{to_mean[-1]['value'] / start:.2e}",
                     f"{to_mean[-1]['bits'] / 8e6:.3f}"])
        curves.setdefault(labels["method"], []).append((labels["faults"], [r["bits"] / 8e6 for r in to_mean],
                                                         [max(r["value"] / start, 1e-17) for r in to_mean]))
    notes = ("gossip_run.py on a 16-worker ring from random 20 x 20 matrices, 400 steps, one seed: do the workers reach the "
             "starting mean (the exact average) under each kind of fault? Where the distance to the starting mean exceeds "
             "the consensus error, the workers' mean has drifted from it." +
             ("\n\nNot run (no rule yet for that fault):\n" + "\n".join(f"- {line}" for line in not_run) if not_run else ""))
    sweep.write_table(folder, "consensus", CONSENSUS_HEADER, rows, notes)
    if not curves:  # no run with records: nothing to draw
        return
    figure = Figure(figsize=(4 * min(len(curves), 3), 3.2 * math.ceil(len(curves) / 3)))
    for k, (method, lines) in enumerate(curves.items()):
        axes = figure.add_subplot(math.ceil(len(curves) / 3), min(len(curves), 3), k + 1)
        for fault, megabytes, values in lines:
            axes.semilogy(megabytes, values, label=fault)
        axes.set_title(method, fontsize=9)
        axes.set_xlabel("MB sent per worker", fontsize=8)
        axes.set_ylabel("distance to the starting mean / start", fontsize=8)
        axes.grid(alpha=0.3)
    figure.axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(os.path.join(folder, "consensus.png"), dpi=110)


def heterogeneous_learning_rate(args) -> tuple[float, str]:
    """The heterogeneous-data study's tuned learning rate, from its committed all-reduce runs."""
    folder = os.path.join(sweep.RESULTS, "heterogeneous", "runs")
    learning_rate, sentence = heterogeneous.chosen_learning_rate(sweep.collect(heterogeneous.tuning_runs(args.overrides, args.seeds), folder))
    return learning_rate, f"{sentence} (experiments/heterogeneous.py's tuning, used here)"


def main():
    parser = sweep.study_arguments(__doc__, seeds=True)
    parser.add_argument("--consensus-only", action="store_true", help="only the consensus part (gossip_run.py, CPU: a minute)")
    args = parser.parse_args()
    folder = sweep.study_folder(args, "unreliable")
    consensus, consensus_not_run = consensus_runs(args.quick, consensus_overrides(args.overrides))
    outcomes = sweep.launch_or_collect(args, consensus, folder)  # into folder/runs, beside the training runs
    if all(outcome.status == "missing" for outcome in outcomes):  # --report-only without them: keep the tables written before
        print(f"consensus part: none of its runs is in {os.path.join(folder, 'runs')}; consensus.md and .png left as they were")
    else:
        write_consensus_report(outcomes, consensus_not_run, folder)
    if args.consensus_only:
        sys.exit(report.exit_status(outcomes))
    if args.quick:
        learning_rate, tuned = QUICK_LEARNING_RATE, f"Learning rate {QUICK_LEARNING_RATE} (--quick tunes nothing)."
    else:
        learning_rate, tuned = heterogeneous_learning_rate(args)
    runs, not_run = study_runs(args.quick, args.overrides, args.seeds, learning_rate)
    notes = " ".join([tuned, PUBLISHED]) + ("\n\nNot run (no rule yet for that fault):\n" + "\n".join(f"- {line}" for line in not_run)
                                            if not_run else "")
    outcomes, _ = report.run_study(args, "unreliable", runs, "Fashion-MNIST, per-class Dirichlet alpha 0.1, faults", LABELS,
                                   notes, {"worst-worker test accuracy, mean ± std over seeds":
                                           heterogeneous.worst_worker_cells(runs, folder, LABELS)})
    sys.exit(report.exit_status(outcomes))


if __name__ == "__main__":
    main()
