"""Consensus runner on the CPU: steps/s of gossip_run's loop as the number of workers grows.

One process hosts all n workers (a one-process Communicator, as `python gossip_run.py`
runs them); each worker holds a small matrix. For each method and graph the script
times gossip_run's loop, the method's step plus gossip_run's measurement at its logged
steps, and divides by the edges of a round: time linear in the number of edges shows as
a time per edge-round that does not grow with n (`growth`: its ratio to the previous
n's; 1 = linear, below 1 = fixed costs per step spread over more edges). Medians over
repetitions. Choco takes fixed graphs only (its s_i bookkeeping), so it runs on the ring.

    python benchmarks/consensus_scaling.py                     # n = 8, 64, 256
    python benchmarks/consensus_scaling.py --quick             # n = 8, 16, a few steps (CI)
    OMP_NUM_THREADS=1 python benchmarks/consensus_scaling.py --compare /tmp/main --json after_vs_main.json

`--compare DIR` times another checkout of the repository (e.g. `git worktree add /tmp/main
main`) against this one side by side: each repetition runs this script once for each
tree, alternating, in fresh processes, and also times the 8-ring 100x100 PowerGossip run
(`python gossip_run.py`, 5000 steps) as a whole process in each.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, HERE)
from benchmarks.timing import run_description, write_json  # noqa: E402

METHODS = ("uncompressed", "power_gossip", "sign_choco")  # gossip_run's names
GRAPHS = ("ring", "random_matching", "one_peer_hypercube")
FIXED_GRAPH_ONLY = ("sign_choco",)
WHOLE_RUN = ["algorithm=power_gossip", "topology=ring", "n_workers=8", "matrix_size=100", "num_steps=5000"]
TIMEOUT_SECONDS = 600  # per process of --compare


def edges_per_round(topology, rounds: int) -> float:
    """Undirected edges of a round, averaged over the timed rounds."""
    return sum(len(topology.at(t).edges()) for t in range(rounds)) / rounds


def loop_seconds(gossip_run, comm_module, config, steps: int) -> float:
    """One setting of gossip_run's loop for `steps` steps: the step, and the measurement at logged steps."""
    comm = comm_module.Communicator(config["n_workers"], "cpu")
    topology = gossip_run.build_topology(config)
    state = gossip_run.initial_state(config)
    initial_mean = state.double().mean(dim=0)
    x = state.clone()
    algorithm = gossip_run.build_method(config, comm, topology, 0.5, None)
    started = time.perf_counter()
    for step in range(1, steps + 1):
        algorithm.step([x])
        if gossip_run.is_logged(step, steps):
            gossip_run.measure(comm, x, initial_mean)
    return time.perf_counter() - started


def measure_rows(args) -> list[dict]:
    """Every (method, graph, n) row, timed with the code of the repository at args.code."""
    sys.path.insert(0, args.code)  # before the first import of the project's modules
    import gossip_run
    from powergossip import comm as comm_module

    rows = []
    first = True  # the process's first setting also pays one-time costs (lazy imports, first kernels): run it twice
    for method in args.methods.split(","):
        for graph in args.graphs.split(","):
            if method in FIXED_GRAPH_ONLY and graph != "ring":
                continue
            for n in [int(n) for n in args.workers.split(",")]:
                config = gossip_run.check(dict(gossip_run.DEFAULTS, algorithm=method, topology=graph, n_workers=n,
                                               matrix_size=args.matrix_size, optimizer_diffusion_rate=0.5))
                if first:
                    loop_seconds(gossip_run, comm_module, config, args.steps)
                    first = False
                seconds = statistics.median(loop_seconds(gossip_run, comm_module, config, args.steps)
                                            for _ in range(args.repetitions))
                edges = edges_per_round(gossip_run.build_topology(config), args.steps)
                rows.append({"method": method, "graph": graph, "n_workers": n, "edges_per_round": edges,
                             "steps_per_s": args.steps / seconds, "seconds_per_edge_round": seconds / args.steps / edges})
    return rows


def print_rows(rows: list[dict], columns: dict[str, str]) -> None:
    """One line per row; `columns`: label -> the suffix of its keys ("" for a single run)."""
    print(f"{'method':14s} {'graph':20s} {'n':>5s} {'edges':>6s}"
          + "".join(f" {'steps/s ' + label:>16s} {'us/edge ' + label:>16s} {'growth':>6s}" for label in columns))
    previous = {}
    for row in rows:
        line = f"{row['method']:14s} {row['graph']:20s} {row['n_workers']:5d} {row['edges_per_round']:6.0f}"
        for label, suffix in columns.items():
            per_edge = row["seconds_per_edge_round" + suffix]
            key = (row["method"], row["graph"], suffix)
            growth = per_edge / previous[key] if key in previous else float("nan")
            previous[key] = per_edge
            line += f" {row['steps_per_s' + suffix]:16.1f} {per_edge * 1e6:16.2f} {growth:6.2f}"
        print(line, flush=True)
    print("us/edge: microseconds per edge-round; growth: that over the previous n's (1 = linear in the edges)")


def compare(args) -> dict:
    """This tree and args.compare alternately, each repetition in fresh processes; medians side by side."""
    trees = {"before": os.path.abspath(args.compare), "after": HERE}
    runs = {label: [] for label in trees}
    whole = {label: [] for label in trees}
    with tempfile.TemporaryDirectory() as folder:
        for repetition in range(args.repetitions):
            for label, tree in trees.items():
                out = os.path.join(folder, f"{label}_{repetition}.json")
                subprocess.run([sys.executable, os.path.abspath(__file__), "--code", tree, "--workers", args.workers,
                                "--methods", args.methods, "--graphs", args.graphs, "--matrix-size", str(args.matrix_size),
                                "--steps", str(args.steps), "--repetitions", "1", "--json", out],
                               check=True, timeout=TIMEOUT_SECONDS, stdout=subprocess.DEVNULL)
                with open(out) as f:
                    runs[label].append(json.load(f)["rows"])
                started = time.perf_counter()
                subprocess.run([sys.executable, "gossip_run.py", *WHOLE_RUN, f"output_dir={folder}/{label}_{repetition}"],
                               cwd=tree, check=True, timeout=TIMEOUT_SECONDS, stdout=subprocess.DEVNULL)
                whole[label].append(time.perf_counter() - started)
    rows = []
    for position, row in enumerate(runs["after"][0]):
        row = {key: row[key] for key in ("method", "graph", "n_workers", "edges_per_round")}
        for label in trees:
            for key in ("steps_per_s", "seconds_per_edge_round"):
                row[f"{key}_{label}"] = statistics.median(run[position][key] for run in runs[label])
        rows.append(row)
    print_rows(rows, {label: f"_{label}" for label in trees})
    whole_median = {label: statistics.median(times) for label, times in whole.items()}
    print(f"\npython gossip_run.py {' '.join(WHOLE_RUN)} (whole process, median of {args.repetitions}): "
          + ", ".join(f"{label} {seconds:.2f} s" for label, seconds in whole_median.items()))
    return {"trees": trees, "rows": rows, "whole_run": WHOLE_RUN, "whole_run_seconds": whole,
            "whole_run_median_seconds": whole_median}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="8,64,256")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--graphs", default=",".join(GRAPHS))
    parser.add_argument("--matrix-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=200, help="timed steps per repetition")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="n = 8, 16; 10 steps, 1 repetition")
    parser.add_argument("--device", default="cpu", choices=["cpu"], help="the consensus runner's CPU path")
    parser.add_argument("--code", default=HERE, help="the repository whose code is timed (default: this one)")
    parser.add_argument("--compare", help="another checkout, timed against this one side by side")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.quick:
        args.workers, args.steps, args.repetitions = "8,16", 10, 1
    run = run_description(torch.device("cpu"))
    print(f"consensus scaling: gossip_run's loop, {args.matrix_size}x{args.matrix_size} matrices, {args.steps} steps, "
          f"median of {args.repetitions}; {run['device']} ({torch.get_num_threads()} threads); torch {run['torch']}; "
          f"{run['date']}")
    settings = {"matrix_size": args.matrix_size, "steps": args.steps, "repetitions": args.repetitions,
                "threads": torch.get_num_threads()}
    if args.compare:
        results = compare(args)
    else:
        results = {"code": os.path.abspath(args.code), "rows": measure_rows(args)}
        print_rows(results["rows"], {"": ""})
    if args.json:
        write_json(args.json, run | settings | results)


if __name__ == "__main__":
    main()
