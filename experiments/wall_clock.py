"""Study 15: time on a modelled cluster. Fashion-MNIST on 16 workers (batch 32 each, the small
CNN), 10 epochs, seeds 1 and 2: all-reduce, PowerSGD (rank 2), D-PSGD, PowerGossip (1 and 2
iterations) and AD-PSGD on a ring and on a time-varying graph (one peer 2^k across: the
symmetric form of SGP's exponential graph, which they need), Choco (sign+norm) on the ring (it
needs a fixed graph), push-sum (SGP) and
overlapped SGP (one_step_delay) on the time-varying exponential graph (one peer 2^k ahead),
timed on four networks (1 and 10 Gbit/s, 100 µs and 1 ms of latency) and three kinds of workers:
all equal, one 4x slower, 10% random stragglers 5x slower. A worker's compute per step is
COMPUTE_SECONDS (a modelled GPU's step of the small CNN at batch 32, not a measurement).

A synchronous method's training does not depend on the clock: each is trained once per seed
without it, and its records are timed under every condition from its traffic
(train.traffic_trace: the method's rounds on the model's shapes, which send what the run sent,
timed by clock.StepClock). AD-PSGD's order of events is the clock's, so it trains once per
condition and seed. This is a simulation on a modelled network (powergossip/clock.py), not a
measurement on one: every table and figure says so.

    python experiments/wall_clock.py --quick      # 2-core CPU: 4 workers, two conditions, a few batches
    python experiments/wall_clock.py --jobs 4     # full (meant for a GPU)

Results: experiments/results/wall_clock/ (--quick: runs/wall_clock_quick/): table.md/.csv (per
method, graph and condition: the averaged model's final test accuracy, the simulated time of
the run and to TARGET_ACCURACY, and where a worker's time went: compute, sending not hidden by
compute, waiting), accuracy_vs_time.png (one panel per condition).
"""
from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import statistics
import sys

import torch
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import report, sweep  # noqa: E402
from powergossip import clock, configuration, faults, figures, names, train  # noqa: E402
from powergossip import comm as comm_module  # noqa: E402

COMPUTE_SECONDS = 0.005  # a worker's compute per step at speed 1 (forward, backward and local step)
TARGET_ACCURACY = 0.85  # the table gives each run's simulated time to reach this averaged-model test accuracy
FULL_SEEDS = (1, 2)
NETWORKS = {  # label -> (latency s, bandwidth bits/s)
    "1 Gbit/s, 100 µs": (1e-4, 1e9), "1 Gbit/s, 1 ms": (1e-3, 1e9),
    "10 Gbit/s, 100 µs": (1e-4, 1e10), "10 Gbit/s, 1 ms": (1e-3, 1e10),
}
WORKERS = {  # label -> the clock keys (n workers: worker 0 is the slow one)
    "equal": lambda n: {},
    "one 4x slower": lambda n: {"worker_speeds": [0.25] + [1.0] * (n - 1)},
    "10% stragglers 5x slower": lambda n: {"straggler_probability": 0.1, "straggler_slowdown": 5.0},
}
RING, EXPONENTIAL, HYPERCUBE = "ring", "one_peer_exponential", "one_peer_hypercube"  # the two time-varying graphs:
# SGP's directed exponential one (a peer 2^k ahead), and its symmetric form for methods that need one (a peer 2^k across)
# method -> (label, overrides, graphs)
METHODS = {
    "all_reduce": ("All-reduce", ["optimizer=all-reduce"], [RING]),  # no graph: one row
    "powersgd": ("PowerSGD (rank 2)", ["optimizer=powersgd", "optimizer_rank=2"], [RING]),
    "dpsgd": ("D-PSGD", ["optimizer=dpsgd"], [RING, HYPERCUBE]),
    "power_gossip_1": ("PowerGossip (1 iteration)", ["optimizer=power-gossip"], [RING, HYPERCUBE]),
    "power_gossip_2": ("PowerGossip (2 iterations)", ["optimizer=power-gossip", "optimizer_num_iterations=2"], [RING, HYPERCUBE]),
    "choco": ("Choco (sign+norm)", ["optimizer=choco", "optimizer_compressor=sign-and-norm", "optimizer_diffusion_rate=0.45"],
              [RING]),  # it needs a fixed graph
    "push_sum": ("SGP", ["optimizer=push-sum"], [EXPONENTIAL]),
    "overlapped_sgp": ("Overlapped SGP", ["optimizer=push-sum", "optimizer_one_step_delay=true"], [EXPONENTIAL]),
    "ad_psgd": ("AD-PSGD", ["optimizer=ad-psgd"], [RING, HYPERCUBE]),
}
ASYNCHRONOUS = ("ad_psgd",)
COMMON = ["task=fashion_mnist", "task_architecture=small_cnn", "n_workers=16", "batch_size=32", "learning_rate=0.1",
          "momentum=0.9", "weight_decay=0.0001", "evaluate_each_worker=false"]
FULL = ["num_epochs=10", "distributed_lr_warmup_epoch=0", "lr_schedule_milestones=[[8,0.1]]", "checkpoint_every=5"]
QUICK = ["n_workers=4", "num_epochs=2", "distributed_lr_warmup_epoch=0", "lr_schedule_milestones=[]",
         "max_batches_per_epoch=4", "max_test_examples=200", "checkpoint_every=0", "device=cpu"]
QUICK_METHODS = ("all_reduce", "dpsgd", "overlapped_sgp", "ad_psgd")
QUICK_CONDITIONS = (("1 Gbit/s, 100 µs", "equal"), ("1 Gbit/s, 1 ms", "one 4x slower"))
LABELS = ["method", "graph", "network", "workers"]
SIMULATED = ("Simulated: a modelled cluster (powergossip/clock.py: each message's latency plus its bits at the link's "
             "bandwidth, a worker's messages back to back; a worker's compute {:g} ms per step at speed 1), not a "
             "measurement.").format(1e3 * COMPUTE_SECONDS)
PUBLISHED = ("Published claims: AD-PSGD's epochs 4-8x faster than all-reduce SGD on a shared network at equal per-epoch "
             "convergence (Lian et al. 2018, arXiv 1710.06952); SGP on 32 x 8 GPUs over 10 Gbit/s Ethernet, 90 ImageNet "
             "epochs in about 1.6 h against over 5 h for all-reduce SGD, top-1 within 1.2% (Assran et al. 2019, "
             "arXiv 1811.10792).")


def conditions(quick: bool) -> list[tuple[str, str]]:
    """(network, workers) labels of the conditions the study times."""
    return list(QUICK_CONDITIONS) if quick else [(network, kind) for network in NETWORKS for kind in WORKERS]


def clock_keys(network: str, kind: str, n_workers: int) -> dict:
    """The clock's keys of a condition."""
    latency, bandwidth = NETWORKS[network]
    return {"worker_step_seconds": COMPUTE_SECONDS, "network_latency_s": latency,
            "network_bandwidth_bits_per_s": bandwidth} | WORKERS[kind](n_workers)


def as_overrides(keys: dict) -> list[str]:
    return [f"{key}={value}".replace(" ", "") for key, value in keys.items()]


def study_runs(quick: bool, extra: list[str], seeds: list[int] | None = None) -> list[sweep.Run]:
    """Every synchronous method once per graph and seed, without the clock; AD-PSGD once per graph,
    condition and seed, on the condition's clock (--quick: QUICK_METHODS, QUICK_CONDITIONS, one seed)."""
    n_workers = 4 if quick else 16
    runs = []
    for seed in sweep.study_seeds(quick, seeds or (None if quick else list(FULL_SEEDS))):
        for name in (QUICK_METHODS if quick else METHODS):
            label, overrides, graphs = METHODS[name]
            for graph in graphs[:1] if quick else graphs:  # --quick: each method's first graph
                base = COMMON + [f"seed={seed}", f"topology={graph}"] + (QUICK if quick else FULL) + overrides + extra
                labels = {"method": label, "graph": "none" if name in ("all_reduce", "powersgd") else graph, "seed": seed}
                if name not in ASYNCHRONOUS:
                    runs.append(sweep.Run(sweep.seeded_name(f"{name}_{graph}", seed), "train.py", base, labels))
                    continue
                for number, (network, kind) in enumerate(conditions(quick)):
                    # its workers compute one at a time, whatever layout the other runs take (stacked_compute=graph on a GPU)
                    timed = base + ["simulated_clock=true", "stacked_compute=loop"] + as_overrides(clock_keys(network, kind, n_workers))
                    runs.append(sweep.Run(sweep.seeded_name(f"{name}_{graph}_condition{number}", seed), "train.py", timed,
                                          labels | {"network": network, "workers": kind}))
    return runs


def checked(run: sweep.Run) -> tuple[dict, object]:
    """(the run's configuration, its topology), as train.py checked them."""
    return train.checked(configuration.apply_overrides(train._DEFAULTS, run.overrides))


def traffic(run: sweep.Run) -> tuple[int, list]:
    """(steps per epoch, train.traffic_trace of all its epochs) of a synchronous run."""
    cfg, topology = checked(run)
    dataset, loader = train.load_data(cfg, comm_module.Communicator(cfg["n_workers"], "cpu"))  # as the run had them
    per_epoch = train.epoch_length(cfg, loader)
    shapes = [p.shape for p in train.build_model(cfg, dataset).parameters()]
    return per_epoch, train.traffic_trace(cfg, topology, shapes, cfg["num_epochs"] * per_epoch)


def traffic_of(outcomes: list[sweep.Outcome], jobs: int) -> dict[tuple, tuple[int, list]]:
    """{trace_key(run): traffic()} of the finished synchronous runs, `jobs` at a time (a trace
    takes a minute or two of CPU)."""
    runs = {}
    for outcome in outcomes:
        if report.run_status(outcome) == "done" and "network" not in outcome.run.labels:
            runs.setdefault(trace_key(outcome.run), outcome.run)
    if jobs <= 1:
        return {key: traffic(run) for key, run in runs.items()}
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=torch.set_num_threads, initargs=(max(1, os.cpu_count() // jobs),)) as pool:
        return dict(zip(runs, pool.map(traffic, runs.values())))


def trace_key(run: sweep.Run) -> tuple:
    """Which runs share a traffic trace: without faults, what a run sends depends on its shapes
    and graph, not on its seed (train.traffic_trace), so its seeds share one; with faults their
    draws follow the seed, and each run has its own."""
    if faults.settings_of(checked(run)[0]).active:
        return tuple(run.overrides)
    return tuple(o for o in run.overrides if not o.startswith("seed="))


def timed_curves(outcome: sweep.Outcome, quick: bool, traffic_by_run: dict) -> dict[tuple[str, str], tuple[list, list]]:
    """{(network, workers): ([(simulated s, averaged-model test accuracy)] at each epoch's end, the
    mean worker's [compute, sending, waiting] s at the end)} of a finished run: AD-PSGD's from its
    records, a synchronous run's by timing its traffic trace (`traffic_by_run`, traffic_of's)
    under every condition."""
    records = sweep.metrics(outcome)
    accuracy = {epoch: value for epoch, value, _ in figures.curve(records, "accuracy", "test_avg")}
    labels = outcome.run.labels
    if "network" in labels:  # trained on the condition's clock
        times = {r["epoch"]: r["value"] for r in records if r["name"] == "simulated_time"}
        spent = [statistics.mean(r["value"] for r in records if r["name"] == f"simulated_{part}" and "worker" in r["tags"]
                                 and r["epoch"] == max(times)) for part in clock.StepClock.PARTS]
        return {(labels["network"], labels["workers"]): ([(times[e], accuracy[e]) for e in sorted(accuracy)], spent)}
    cfg, topology = checked(outcome.run)
    per_epoch, trace = traffic_by_run[trace_key(outcome.run)]
    timed = {}
    for network, kind in conditions(quick):
        timing = clock.StepClock(clock.ClockSettings(**clock_keys(network, kind, cfg["n_workers"])), topology, cfg["n_workers"],
                                 cfg["optimizer"], cfg["seed"], names.settings_of(cfg))
        ends = []
        for exchanges, gossiped in trace[:len(accuracy) * per_epoch]:
            timing.step(exchanges, gossiped)
            ends.append(timing.now)
        timed[network, kind] = ([(ends[int(e) * per_epoch - 1], accuracy[e]) for e in sorted(accuracy)],
                                timing.spent.mean(axis=1).tolist())
    return timed


def time_to(points: list[tuple[float, float]], target: float) -> float | None:
    return next((seconds for seconds, value in points if value >= target), None)


def write_report(outcomes: list[sweep.Outcome], folder: str, quick: bool, jobs: int = 1) -> list[list]:
    """table.md/.csv and accuracy_vs_time.png from the finished runs (their traffic traced `jobs` at a time)."""
    rows: dict[tuple, list] = {}  # (method, graph, network, workers) -> [(points, spent)] over seeds
    traffic_by_run = traffic_of(outcomes, jobs)
    for outcome in outcomes:
        if report.run_status(outcome) != "done":
            continue
        for (network, kind), timed in timed_curves(outcome, quick, traffic_by_run).items():
            rows.setdefault((outcome.run.labels["method"], outcome.run.labels["graph"], network, kind), []).append(timed)
    header = LABELS + ["seeds", "final test accuracy (averaged model)", "simulated time of the run (s)",
                       f"simulated time to {100 * TARGET_ACCURACY:.0f}% (s)", "compute (s)", "sending (s)", "waiting (s)"]
    table = []
    for key, seeds in rows.items():
        finals = [points[-1][1] for points, _ in seeds]
        reached = [time_to(points, TARGET_ACCURACY) for points, _ in seeds]
        mean = lambda values: f"{statistics.mean(values):.4g}"
        table.append(list(key) + [len(seeds), f"{100 * statistics.mean(finals):.2f}%", mean([p[-1][0] for p, _ in seeds]),
                                  mean(reached) if all(t is not None for t in reached) else "not reached by every seed"]
                     + [mean([spent[part] for _, spent in seeds]) for part in range(3)])
    sweep.write_table(folder, "table", header, table, notes=" ".join([SIMULATED, PUBLISHED]))
    panels = conditions(quick)
    rows_and_columns = (len(panels), 1) if quick else (len(NETWORKS), len(WORKERS))  # full: a network per row
    figure = Figure(figsize=(5 * rows_and_columns[1], 3.6 * rows_and_columns[0]), layout="constrained")
    axes = figure.subplots(*rows_and_columns, squeeze=False).reshape(-1)
    for axis, (network, kind) in zip(axes, panels):
        lines = [(key, seeds) for key, seeds in rows.items() if key[2:] == (network, kind)]
        for ((method, graph, _, _), seeds), style in zip(lines, figures.distinct_styles(len(lines))):
            points = seeds[0][0]  # the first seed's curve
            axis.plot([t for t, _ in points], [a for _, a in points], label=f"{method}, {graph}", **style)
        axis.set_xscale("log")
        # plain numbers at 1, 2 and 5 x 10^k: the default minor labels (2x10^0, 3x10^0, ...) ran into each other
        axis.xaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
        axis.xaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.xaxis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_title(f"{network}; workers {kind}", fontsize=9)
        axis.set_xlabel("simulated seconds (modelled cluster)")
        axis.set_ylabel("test accuracy (averaged model)")
    axes[0].legend(fontsize=6)
    figure.suptitle("Study 15: accuracy against simulated time. " + SIMULATED, fontsize=8, wrap=True)
    figures.save(figure, os.path.join(folder, "accuracy_vs_time.png"))
    return [header] + table


def main():
    args = sweep.study_arguments(__doc__, seeds=True).parse_args()
    folder = sweep.study_folder(args, "wall_clock")
    outcomes = sweep.launch_or_collect(args, study_runs(args.quick, args.overrides, args.seeds), folder)
    table = write_report(outcomes, folder, args.quick, args.jobs)
    print(sweep.markdown_table(table[0], table[1:]), end="")
    sys.exit(report.exit_status(outcomes))


if __name__ == "__main__":
    main()
