"""Study 7: graphs that change every round and directed graphs, against static graphs.

(a) Consensus (gossip_run.py) on n = 16 and 64 workers, each from its own random
    50 x 50 matrix: uncompressed gossip (gamma 1) on ring, torus, exponential,
    directed_exponential, one_peer_exponential, one_peer_hypercube and random_matching;
    PowerGossip rank 1 with an edge's warm start kept across its absences (the default)
    and started afresh at every reappearance (optimizer_edge_memory=0) on the symmetric
    ones (ring, torus, exponential, one_peer_hypercube, random_matching), Choco
    sign+norm (gamma swept) on the fixed ones among them (its s_i bookkeeping needs the
    same W every round); push-sum on the directed ones. Error against
    rounds and against bits sent per worker; the measured per-round rate beside each
    graph's spectral gap (per-round equivalent, see topologies.TimeVarying.spectral_gap).
(b) Training (train.py) on Fashion-MNIST, small CNN, 16 workers, the deep-learning
    study's settings (experiments/deep_learning.py) with gamma 1: D-PSGD on ring,
    one_peer_exponential and one_peer_hypercube; PowerGossip on ring and
    one_peer_hypercube. Averaged-model test accuracy against MB sent.

    python experiments/topologies.py --quick                      # tiny: 8 workers, 30 rounds; 4 workers, a few batches
    python experiments/topologies.py --part consensus             # (a), CPU, one process at a time
    python experiments/topologies.py --part training --jobs 5 device=cuda   # (b), meant for a GPU

Results: experiments/results/topologies/ (--quick: runs/topologies_quick/):
consensus_n<N>.png (error against rounds and bits), consensus_rates.md/.csv (spectral
gap, measured rate, rounds and bits to reach 1e-6 of the starting error),
table.md/.csv and test_accuracy.png (training).
"""
from __future__ import annotations

import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gossip_run  # noqa: E402
import train  # noqa: E402
from experiments import deep_learning, report, sweep  # noqa: E402
from powergossip import figures, names, topologies  # noqa: E402

GRAPHS = ("ring", "torus", "exponential", "directed_exponential", "one_peer_exponential", "one_peer_hypercube",
          "random_matching")
DIRECTED = ("directed_exponential", "one_peer_exponential")
SYMMETRIC = tuple(g for g in GRAPHS if g not in DIRECTED)
FIXED_SYMMETRIC = ("ring", "torus", "exponential")  # Choco's s_i bookkeeping needs the same W every round
# method -> (gossip_run overrides, graphs it runs on)
CONSENSUS_METHODS = {
    "uncompressed": (["algorithm=uncompressed"], GRAPHS),
    "power_gossip": (["algorithm=power_gossip"], SYMMETRIC),
    "power_gossip_afresh": (["algorithm=power_gossip", "optimizer_edge_memory=0"], SYMMETRIC),
    "sign_choco": (["algorithm=sign_choco", "hyperparameter_range_min=0.01", "hyperparameter_range_max=1"], FIXED_SYMMETRIC),
    "push_sum": (["algorithm=push_sum"], DIRECTED),
}
CONSENSUS = {"sizes": (16, 64), "matrix_size": 50, "num_steps": 1000, "gammas": 8}
CONSENSUS_QUICK = {"sizes": (8,), "matrix_size": 8, "num_steps": 30, "gammas": 2}
TARGET = 1e-6  # relative error whose rounds and bits the table gives
FLOOR = 1e-10  # relative error below which float32 rounding, not the graph, sets the pace

# run name -> (method label, graph, train.py overrides)
TRAINING = {
    "dpsgd-ring": ("D-PSGD", "ring", ["optimizer=dpsgd"]),
    "dpsgd-one_peer_exponential": ("D-PSGD", "one_peer_exponential", ["optimizer=dpsgd"]),
    "dpsgd-one_peer_hypercube": ("D-PSGD", "one_peer_hypercube", ["optimizer=dpsgd"]),
    "power_gossip-ring": ("PowerGossip", "ring", ["optimizer=power-gossip"]),
    "power_gossip-one_peer_hypercube": ("PowerGossip", "one_peer_hypercube", ["optimizer=power-gossip"]),
}


def overrides_for(defaults: dict, extra: list[str]) -> list[str]:
    """The `key=value` overrides that an entrypoint with these defaults knows (the study's extra
    arguments go to both parts: data_dir to training, matrix_size to consensus); YAML files go to both."""
    unknown = [item for item in extra if "=" in item and all(
        names.canonical_key(item.split("=", 1)[0], d) not in d for d in (gossip_run.DEFAULTS, train._DEFAULTS))]
    if unknown:
        raise SystemExit(f"neither gossip_run.py nor train.py knows {', '.join(unknown)}")
    return [item for item in extra if "=" not in item or names.canonical_key(item.split("=", 1)[0], defaults) in defaults]


def consensus_runs(quick: bool, extra: list[str]) -> list[sweep.Run]:
    return gossip_runs(CONSENSUS_QUICK if quick else CONSENSUS, CONSENSUS_METHODS, overrides_for(gossip_run.DEFAULTS, extra),
                       lambda n, method, graph: f"consensus-n{n}-{method}-{graph}")


def gossip_runs(settings: dict, methods: dict, extra: list[str], name) -> list[sweep.Run]:
    """gossip_run.py runs, each worker from its own random matrix: every method (name -> (overrides,
    graphs)) on each of its graphs at every size of `settings` (sizes, matrix_size, num_steps, gammas:
    the size of a tuned method's gamma grid); `name(n, method, graph)` names a run's folder."""
    runs = []
    for n in settings["sizes"]:
        base = [f"n_workers={n}", f"matrix_size={settings['matrix_size']}", f"num_steps={settings['num_steps']}",
                "data_type=random", "seed=42", f"hyperparameter_num_samples={settings['gammas']}"]
        for method, (overrides, graphs) in methods.items():
            runs += [sweep.Run(name(n, method, graph), "gossip_run.py", base + overrides + [f"topology={graph}"] + extra,
                               {"n": n, "method": method, "graph": graph}) for graph in graphs]
    return runs


def training_runs(quick: bool, extra: list[str]) -> list[sweep.Run]:
    settings = deep_learning.COMMON + (deep_learning.QUICK if quick else deep_learning.FULL) + [
        f"n_workers={4 if quick else 16}", "optimizer_diffusion_rate=1.0", "distributed_lr_warmup_factor=11.3"]
    return [sweep.Run(f"training-{name}", "train.py", settings + overrides + [f"topology={graph}"] + overrides_for(train._DEFAULTS, extra),
                      {"method": label, "graph": graph}) for name, (label, graph, overrides) in TRAINING.items()]


def curve_of(outcome: sweep.Outcome) -> list[tuple[int, float, float]]:
    """[(round, bits per worker, error)] of the run's best setting (the lowest final error)."""
    records = sweep.metrics(outcome)
    tags = figures.best_setting(records)
    return [(r["step"], r["bits"], r["value"]) for r in records if r["name"] == "error" and r["tags"] == tags]


def spectral_gap_of(graph: str, n: int) -> float:
    """The graph's spectral gap, per round for graphs over time (Topology.spectral_gap)."""
    return topologies.build(graph, n).spectral_gap()


def measured_rate(points) -> float:
    """Per-round contraction of the error's norm, (e_T / e_0)^(1 / 2T), up to the first logged
    round T whose error is below FLOOR x the start (or the last): comparable with 1 - gap."""
    start = points[0][2]
    for step, _, error in points[1:]:
        if error <= FLOOR * start or step == points[-1][0]:
            return (max(error, 0.0) / start) ** (1 / (2 * step))
    return float("nan")


def write_consensus(outcomes: list[sweep.Outcome], folder: str) -> list[list]:
    os.makedirs(folder, exist_ok=True)
    header = ["n", "method", "graph", "spectral gap (per round)", "1 - measured rate", f"rounds to {TARGET:g}",
              f"MB per worker to {TARGET:g}", "final relative error"]
    rows = []
    for n in sorted({o.run.labels["n"] for o in outcomes}):
        figure, (by_round, by_bits) = plt.subplots(1, 2, figsize=(13, 5))
        for outcome in [o for o in outcomes if o.run.labels["n"] == n]:
            method, graph = outcome.run.labels["method"], outcome.run.labels["graph"]
            points = curve_of(outcome)
            gap = spectral_gap_of(graph, n)
            if len(points) < 2:
                rows.append([n, method, graph, f"{gap:.4g}", outcome.status, "", "", ""])
                continue
            start = points[0][2]
            reached = next(((step, bits) for step, bits, error in points if error <= TARGET * start), None)
            rows.append([n, method, graph, f"{gap:.4g}", f"{1 - measured_rate(points):.4g}",
                         reached[0] if reached else "not reached", f"{reached[1] / figures.MEGABYTE_BITS:.4g}" if reached else "not reached",
                         f"{points[-1][2] / start:.3g}"])
            style = dict(color=plt.cm.tab10(GRAPHS.index(graph)), label=f"{method}, {graph}",
                         linestyle={"uncompressed": "-", "power_gossip": "--", "power_gossip_afresh": ":",
                                    "sign_choco": "-.", "push_sum": (0, (1, 1))}[method])
            relative = [max(error / start, 1e-16) for _, _, error in points]
            by_round.plot([step for step, _, _ in points], relative, **style)
            by_bits.plot([max(bits, 1.0) for _, bits, _ in points], relative, **style)
        by_round.set(yscale="log", xlabel="gossip rounds", ylabel="error / starting error", title=f"consensus, n = {n}")
        by_bits.set(xscale="log", yscale="log", xlabel="bits sent per worker", ylabel="error / starting error")
        for axis in (by_round, by_bits):
            axis.grid(alpha=0.3)
        by_bits.legend(fontsize=6, ncol=2, loc="lower left")  # where no curve goes: few bits, low error
        figure.tight_layout()
        figure.savefig(os.path.join(folder, f"consensus_n{n}.png"), dpi=110)
        plt.close(figure)
    sweep.write_table(folder, "consensus_rates", header, rows,
                      notes="1 - measured rate: 1 - (e_T / e_0)^(1 / 2T), up to the first logged round with an error "
                            f"below {FLOOR:g} of the start; the best gamma of Choco's sweep.")
    return rows


def main():
    parser = sweep.study_arguments(__doc__, quick_help="tiny: 8 workers, 30 rounds; 4 workers, a few batches")
    parser.add_argument("--part", choices=("all", "consensus", "training"), default="all", help="which part to run")
    args = parser.parse_args()
    folder = sweep.study_folder(args, "topologies")
    failed = False
    if args.part in ("all", "consensus"):
        outcomes = sweep.launch_or_collect(args, consensus_runs(args.quick, args.overrides), folder)
        print(sweep.markdown_table(["n", "method", "graph", "gap", "1 - rate", "rounds", "MB", "final"],
                                   write_consensus(outcomes, folder)), end="")
        failed |= any(o.status == "failed" for o in outcomes)
    if args.part in ("all", "training"):
        outcomes = sweep.launch_or_collect(args, training_runs(args.quick, args.overrides), folder)
        rows = report.write_report(outcomes, folder, "Fashion-MNIST, small CNN, 16 workers (--quick: 4)", ["method", "graph"])
        for row in rows:
            print(f"{row['method']:12s} {row['graph']:22s} {100 * row['test_avg']:6.2f}%  "
                  f"{row['mb_per_epoch']:9.3f} MB/worker/epoch  {row['status']}")
        failed |= any(o.status == "failed" for o in outcomes)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
