"""Study 9: time to accuracy on a modelled network.

The case for compression (Vogels et al. 2020, introduction) is wall-clock time on a slow
network, which one GPU cannot measure. This report projects it for every run of the
deep-learning study (experiments/deep_learning.py) from what the runs recorded: a step's
time is its measured compute (time_batch + time_forward_backward + time_update, per
worker) plus its communication on a latency-bandwidth network, metrics.network_seconds
(alpha per message, the bits at the link's bandwidth beta, a worker's messages in
sequence). Each run simulated its 8 workers in one process, one replica after the other
(stacked_compute=loop), so a worker's compute is the process's divided by its workers:
what one worker would spend on a GPU of its own. Gossip's in-memory time is left out; the
model stands for it.

    python experiments/network_time.py                   # report from experiments/results/deep_learning/runs
    python experiments/network_time.py --runs runs/deep_learning_quick/runs --output runs/network_time_quick
    python experiments/network_time.py --loopback        # the model against real exchanges: mpirun -np 2, Gloo, loopback

Results: experiments/results/network_time/: accuracy_vs_time.png (averaged-model test
accuracy, mean over seeds, against projected seconds on each network), table.md/.csv
(compute and communication seconds per epoch, projected time of the run and to reach
TARGET_ACCURACY), loopback.md/.csv (--loopback: measured exchange times, the alpha and
beta fitted to them, and the model's prediction).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
from matplotlib.figure import Figure

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import deep_learning, sweep  # noqa: E402
from powergossip import configuration, figures, metrics  # noqa: E402

NETWORKS = {"1 Gbit/s": (1e-4, 1e9), "100 Gbit/s": (1e-5, 1e11)}  # name -> (alpha: s per message, beta: bits per s)
COMPUTE = ("time_batch", "time_forward_backward", "time_update")  # the step's sections that are not communication
TARGET_ACCURACY = 0.92  # the time to reach this averaged-model test accuracy goes in the table
LOOPBACK_BYTES = [4 ** k for k in range(3, 13)]  # 64 B .. 16 MiB per message
LOOPBACK_REPEATS = 200  # exchanges timed per size


def per_epoch_increments(records: list[dict], name: str) -> dict[float, float]:
    """{epoch: seconds in that epoch} of a cumulative `time_*` record, which restarts from zero
    when a run is resumed (metrics.py)."""
    values = sorted((r["epoch"], r["value"]) for r in records if r["name"] == name)
    increments, previous = {}, 0.0
    for epoch, value in values:
        increments[epoch] = value - previous if value >= previous else value
        previous = value
    return increments


def projected_curve(records: list[dict], workers_per_process: int, latency_s: float, bandwidth_bits_per_s: float):
    """[(epoch, projected seconds since the start, averaged-model test accuracy)] of one run."""
    sections = [per_epoch_increments(records, name) for name in COMPUTE]
    accuracy = {r["epoch"]: r["value"] for r in records if r["name"] == "accuracy" and r["tags"] == {"split": "test_avg"}}
    traffic = {r["epoch"]: (r["bits"], r["messages"]) for r in records if r["name"] == "accuracy" and r["tags"] == {"split": "test_avg"}}
    curve, compute = [], 0.0
    for epoch in sorted(accuracy):
        compute += sum(section.get(epoch, 0.0) for section in sections) / workers_per_process
        bits, messages = traffic[epoch]
        curve.append((epoch, compute + metrics.network_seconds(bits, messages, latency_s, bandwidth_bits_per_s), accuracy[epoch]))
    return curve


def workers_per_process(outcome: sweep.Outcome) -> int:
    """A run's workers per process, from its output's first line ("8 workers in 1 process(es) ...")."""
    with open(os.path.join(outcome.folder, "output.log")) as f:
        words = f.readline().split()
    return int(words[0]) // int(words[3])


def report(runs_folder: str, folder: str) -> list[list]:
    outcomes = [o for o in sweep.collect(deep_learning.study_runs(False, []), runs_folder) if o.status == "done"]
    methods = list(dict.fromkeys(o.run.labels["method"] for o in outcomes))
    header = ["method", "seeds", "compute s / epoch / worker"] + [f"communication s / epoch, {name}" for name in NETWORKS] \
        + [f"run's projected time (s), {name}" for name in NETWORKS] \
        + [f"projected time to {TARGET_ACCURACY:.0%} (s), {name}" for name in NETWORKS] + ["final accuracy"]
    rows = []
    figure = Figure(figsize=(12, 5), layout="tight")
    axes = figure.subplots(1, len(NETWORKS), sharey=True)
    for index, method in enumerate(methods):
        mine = [o for o in outcomes if o.run.labels["method"] == method]
        curves = {name: [projected_curve(sweep.metrics(o), workers_per_process(o), *network) for o in mine]
                  for name, network in NETWORKS.items()}
        epochs = min(len(c) for c in curves[next(iter(NETWORKS))])
        mean = {name: np.mean([[point[1:] for point in c[:epochs]] for c in runs], axis=0) for name, runs in curves.items()}
        compute = mean_compute_per_epoch(mine, epochs)
        row = [method, len(mine), f"{compute:.3g}"]
        row += [f"{mean[name][-1][0] / epochs - compute:.3g}" for name in NETWORKS]
        row += [f"{mean[name][-1][0]:.3g}" for name in NETWORKS]
        for name in NETWORKS:
            reached = [seconds for seconds, accuracy in mean[name] if accuracy >= TARGET_ACCURACY]
            row.append(f"{reached[0]:.3g}" if reached else "not reached")
        rows.append(row + [f"{100 * mean[name][-1][1]:.2f}%"])
        for axis, name in zip(axes, NETWORKS):
            axis.plot(mean[name][:, 0], 100 * mean[name][:, 1], color=f"C{index}", label=method,
                      linestyle="--" if "Gossip" in method else "-")
    for axis, (name, (alpha, beta)) in zip(axes, NETWORKS.items()):
        axis.set(xscale="log", xlabel="projected seconds (compute + modelled communication)",
                 title=f"{name} links, {alpha * 1e6:g} µs per message", ylim=(85, 93.5))
        axis.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("test accuracy of the averaged model (%), mean over seeds")
    axes[0].legend(fontsize=7)
    figures.save(figure, os.path.join(folder, "accuracy_vs_time.png"))
    sweep.write_table(folder, "table", header, rows,
                      notes="Per worker; compute measured (time_batch + time_forward_backward + time_update of the "
                            "one-process simulation, divided by its workers), communication modelled "
                            "(metrics.network_seconds: alpha x messages + bits / beta, messages in sequence) with "
                            + "; ".join(f"{name}: alpha {a:g} s, beta {b:g} bit/s" for name, (a, b) in NETWORKS.items())
                            + ". Means over seeds.")
    return [header] + rows


def mean_compute_per_epoch(outcomes: list[sweep.Outcome], epochs: int) -> float:
    """Measured compute seconds per epoch and worker, mean over the runs' first `epochs` epochs."""
    totals = []
    for outcome in outcomes:
        records = sweep.metrics(outcome)
        per_epoch = [per_epoch_increments(records, name) for name in COMPUTE]
        totals.append(sum(sum(v for e, v in section.items() if e <= epochs) for section in per_epoch) / workers_per_process(outcome))
    return float(np.mean(totals)) / epochs


def loopback_exchanges(folder: str, repeats: int) -> None:
    """Under mpirun -np 2: both processes' one worker exchange `repeats` messages of every size
    over Gloo (comm.exchange on a 2-ring, as gossip does); worker 0 writes the mean seconds per exchange."""
    import torch

    from powergossip import comm as comm_module
    from powergossip import topologies

    comm = comm_module.Communicator(2, "cpu")
    ring = topologies.build("ring", 2)
    measured = []
    for size in LOOPBACK_BYTES:
        payload = torch.ones(1, size // 4)
        for _ in range(10):  # warm-up: connections, buffers
            comm.exchange(ring, [payload], per="worker")
        comm.barrier()
        started = time.perf_counter()
        for _ in range(repeats):
            comm.exchange(ring, [payload], per="worker")
        comm.barrier()
        measured.append((size, (time.perf_counter() - started) / repeats))
    if comm.rank == 0:
        np.savetxt(os.path.join(folder, "loopback_raw.csv"), measured, delimiter=",", header="bytes,seconds")


def fit_alpha_beta(measured: list[tuple[float, float]]) -> tuple[float, float]:
    """(alpha, beta): least squares of seconds = alpha + 8 bytes / beta, relative to each point's time
    (sizes span five decades: unweighted, the largest would decide alone)."""
    sizes, seconds = np.array(measured, dtype=float).T
    design = np.stack([np.ones_like(sizes), 8 * sizes], axis=1) / seconds[:, None]
    alpha, inverse_beta = np.linalg.lstsq(design, np.ones_like(sizes), rcond=None)[0]
    return float(alpha), float(1 / inverse_beta)


def loopback(folder: str, repeats: int = LOOPBACK_REPEATS) -> list[list]:
    """Time real exchanges (mpirun -np 2, Gloo on loopback), fit alpha and beta to them and compare
    the model's prediction with every measurement."""
    import subprocess

    from powergossip import launch

    os.makedirs(folder, exist_ok=True)
    command = launch.mpirun_command(2) + [sys.executable, os.path.abspath(__file__), "--loopback-worker", "--repeats", str(repeats), "--output", folder]
    subprocess.run(command, cwd=sweep.ROOT, env=launch.mpirun_environment(), check=True, timeout=600)
    measured = [tuple(row) for row in np.loadtxt(os.path.join(folder, "loopback_raw.csv"), delimiter=",", ndmin=2)]
    alpha, beta = fit_alpha_beta(measured)
    rows = [[int(size), f"{seconds * 1e6:.4g}", f"{metrics.network_seconds(8 * size, 1, alpha, beta) * 1e6:.4g}",
             f"{metrics.network_seconds(8 * size, 1, alpha, beta) / seconds - 1:+.0%}"] for size, seconds in measured]
    sweep.write_table(folder, "loopback", ["bytes per message", "measured µs per exchange", "model µs", "model / measured - 1"],
                      rows, notes=f"Fitted: alpha = {alpha * 1e6:.3g} µs per message, beta = {beta / 1e9:.3g} Gbit/s "
                                  f"(mpirun -np 2, Gloo over loopback, {repeats} exchanges per size, each "
                                  f"process's worker sending one message to the other).")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", default=os.path.join(sweep.RESULTS, "deep_learning", "runs"),
                        help="the deep-learning study's run folders")
    parser.add_argument("--output", default=os.path.join(sweep.RESULTS, "network_time"), help="folder for tables and figures")
    parser.add_argument("--loopback", action="store_true", help="measure exchanges over Gloo on loopback and fit the model")
    parser.add_argument("--loopback-worker", action="store_true", help=argparse.SUPPRESS)  # a process of --loopback
    parser.add_argument("--repeats", type=int, default=LOOPBACK_REPEATS, help="--loopback: exchanges timed per size")
    args = parser.parse_args()
    if args.loopback_worker:
        return loopback_exchanges(args.output, args.repeats)
    if args.loopback:
        print(sweep.markdown_table(["bytes", "measured µs", "model µs", "model / measured - 1"], loopback(args.output, args.repeats)), end="")
        return
    if not os.path.isdir(args.runs):
        raise configuration.ConfigError(f"{args.runs}: no runs of the deep-learning study; run experiments/deep_learning.py first")
    table = report(args.runs, args.output)
    print(sweep.markdown_table(table[0], table[1:]), end="")


if __name__ == "__main__":
    main()
