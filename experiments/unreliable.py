"""Study 14: unreliable networks. The heterogeneous-data study's setting (Fashion-MNIST, 16
workers, batch 32, the small CNN, per-class Dirichlet alpha = 0.1, 20 epochs, seeds 1 and 2,
its tuned learning rate) with no faults, 1% and 10% of the messages lost, 10% of the links
down and 10% of the workers away each round (powergossip/faults.py), for D-PSGD with and
without quasi-global momentum, PowerGossip (1 and 2 iterations), Choco, push-sum (on the
time-varying exponential graph), RelaySum (on a chain), D² and gradient tracking (on the ring).
A method that has no rule yet for a kind of fault is not run there: the notes under the
table name each such pair and why.

    python experiments/unreliable.py --quick     # 2-core CPU: 4 workers, 3 methods, 3 fault settings
    python experiments/unreliable.py             # full (meant for a GPU; after experiments/heterogeneous.py)

The table gives the averaged model's final test accuracy and the worst worker's, and MB
sent per worker per epoch. Results: experiments/results/unreliable/ (--quick:
runs/unreliable_quick/) (table.md, table.csv, test_accuracy.png).
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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


def refusal(overrides: list[str], n_workers: int) -> str | None:
    """Why train.py would refuse these faults for this method and graph (faults.check), or None."""
    defaults = {"optimizer": "dpsgd", "topology": "ring"} | {key: getattr(faults.FaultSettings(), key) for key in faults.KEYS}
    values = configuration.apply_overrides(defaults, [o for o in overrides if o.split("=")[0] in defaults])
    settings = faults.FaultSettings(**{key: values[key] for key in faults.KEYS})
    name = methods.registered_name(values["optimizer"])
    try:
        faults.check(settings, name, methods.METHODS[name].graph_needs, topologies.build(values["topology"], n_workers))
    except ValueError as problem:
        return str(problem)
    return None


def study_runs(quick: bool, extra: list[str], seeds: list[int] | None = None, learning_rate: float | None = None):
    """(runs, the pairs not run with why): every method under every fault setting, seed-major."""
    runs, not_run = [], []
    n_workers = 4 if quick else 16
    for seed in sweep.study_seeds(quick, seeds or (None if quick else list(FULL_SEEDS))):
        for fault, (fault_label, fault_overrides) in FAULTS.items():
            if quick and fault not in QUICK_FAULTS:
                continue
            for name, (label, method_overrides) in METHODS.items():
                if quick and name not in QUICK_METHODS:
                    continue
                overrides = COMMON + [f"seed={seed}", f"learning_rate={QUICK_LEARNING_RATE if quick else learning_rate}"] + \
                    (heterogeneous.QUICK if quick else heterogeneous.FULL) + method_overrides + fault_overrides + extra
                why = refusal(overrides, n_workers)
                if why is not None:
                    if seed == sweep.study_seeds(quick, seeds or (None if quick else list(FULL_SEEDS)))[0]:
                        not_run.append(f"{label} with {fault_label}: {why}")
                    continue
                runs.append(sweep.Run(sweep.seeded_name(f"{name}_{fault}", seed), "train.py", overrides,
                                      {"method": label, "faults": fault_label, "seed": seed}))
    return runs, not_run


def heterogeneous_learning_rate(args) -> tuple[float, str]:
    """The heterogeneous-data study's tuned learning rate, from its committed all-reduce runs."""
    folder = os.path.join(sweep.RESULTS, "heterogeneous", "runs")
    learning_rate, sentence = heterogeneous.chosen_learning_rate(sweep.collect(heterogeneous.tuning_runs(args.overrides, args.seeds), folder))
    return learning_rate, f"{sentence} (experiments/heterogeneous.py's tuning, used here)"


def main():
    args = sweep.study_arguments(__doc__, seeds=True).parse_args()
    folder = sweep.study_folder(args, "unreliable")
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
