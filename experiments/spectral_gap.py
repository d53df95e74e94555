"""Study 8: the consensus rate against the graph's spectral gap.

PowerGossip's consensus error contracts at a rate linear in the spectral gap rho of
the mixing matrix (Vogels et al. 2020, "Consensus experiments" and the analysis of
Algorithm 1); Choco-Gossip's proven rate is quadratic in it, rho^2 delta / 82
(Koloskova et al. 2019, Theorem 2). This study measures the per-round rate on graphs
whose gaps span three orders of magnitude and fits the slope of log(rate) against
log(gap) per method: a slope of 1 is linear, 2 quadratic.

Every worker starts from its own random matrix (gossip_run.py, data_type=random), drawn
from the run's seed: three seeds (42, 43, 44), whose slopes the table gives as mean ± std.
Graphs: ring, torus and the undirected exponential graph at n = 8, 16, 32 and 64
(fixed; 20 x 20 matrices, 4,000 rounds, 30,000 on the 32- and 64-ring), one_peer_hypercube
and random_matching (a graph per round, with the per-round equivalent gap of
topologies.TimeVarying.spectral_gap). Methods: uncompressed gossip
(gamma 1), PowerGossip rank 1 (gamma 1, its default) on every graph; Choco sign+norm
with gamma the best of a small grid per graph, on the fixed graphs only (its s_i
bookkeeping needs the same W every round).

    python experiments/spectral_gap.py --quick     # tiny: 8 workers, 6 x 6 matrices, 100 rounds, seed 42
    OMP_NUM_THREADS=1 python experiments/spectral_gap.py --jobs 2    # the full study, CPU, three seeds

Results: experiments/results/spectral_gap/ (--quick: runs/spectral_gap_quick/):
rates.md/.csv (per method, graph and seed: the gap, the fitted rate and the rate to 1e-6 of
the starting error), slopes.md/.csv (the slope of log(rate) against log(gap) per method and
rate, over all its graphs, the fixed ones and the rings: mean ± std over seeds),
rate_vs_gap.png (the log-log plots, every seed's points, the lines of the mean slopes).
"""
from __future__ import annotations

import math
import os
import sys

import numpy as np
from matplotlib.figure import Figure

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gossip_run  # noqa: E402
from experiments import report, sweep  # noqa: E402
from experiments import topologies as topology_study  # noqa: E402
from powergossip import figures  # noqa: E402

FIXED = ("ring", "torus", "exponential")
TIME_VARYING = ("one_peer_hypercube", "random_matching")
# method -> (gossip_run overrides, graphs it runs on)
METHODS = {
    "uncompressed": (["algorithm=uncompressed"], FIXED + TIME_VARYING),
    "power_gossip": (["algorithm=power_gossip"], FIXED + TIME_VARYING),
    "sign_choco": (["algorithm=sign_choco", "hyperparameter_range_min=0.01", "hyperparameter_range_max=2"], FIXED),
}
FULL = {"sizes": (8, 16, 32, 64), "matrix_size": 20, "num_steps": 4000, "gammas": 10}
SEEDS, QUICK_SEEDS = (42, 43, 44), (42,)  # the random starting matrices (42: the seed of the runs before seeds)
LONGER = {("ring", 32): 30000, ("ring", 64): 30000}  # (graph, n) -> rounds: PowerGossip's rate there is below 1e-3
QUICK = {"sizes": (8,), "matrix_size": 6, "num_steps": 100, "gammas": 2}
MARKERS = {"ring": "o", "torus": "s", "exponential": "^", "one_peer_hypercube": "D", "random_matching": "v"}
COLORS = {"uncompressed": "tab:blue", "power_gossip": "tab:orange", "sign_choco": "tab:green"}
TARGET = 1e-6  # relative error whose first round gives the second rate
FLOOR = 1e-8  # the fit stops here: Choco's float32 bookkeeping (s_i) levels off at 1e-12 to 1e-9 of the start
MEASURES = ("fitted rate", f"rate to {TARGET:g}")
HEADER = ["method", "graph", "n", "seed", "spectral gap (per round)", "rate (fitted)", "rounds fitted", f"rate to {TARGET:g}",
          f"rounds to {TARGET:g}", "gamma", "rounds run", "final relative error"]
SLOPE_HEADER = ["rate", "method", "slope, all its graphs", "graphs", "slope, fixed graphs", "fixed graphs", "slope, rings", "rings",
                "seeds"]
SUBSETS = {"all": lambda graph: True, "fixed": lambda graph: graph in FIXED, "rings": lambda graph: graph == "ring"}


def study_runs(quick: bool, extra: list[str], seeds=None) -> list[sweep.Run]:
    """Every (method, graph, n) once per seed; the first seed keeps the run names of before seeds."""
    runs = []
    for seed in seeds or (QUICK_SEEDS if quick else SEEDS):
        suffix = "" if seed == SEEDS[0] else f"-seed{seed}"
        for run in topology_study.gossip_runs(QUICK if quick else FULL, METHODS, topology_study.overrides_for(gossip_run.DEFAULTS, extra),
                                              lambda n, method, graph: f"{method}-{graph}-n{n}{suffix}"):
            run.overrides.append(f"seed={seed}")
            run.labels["seed"] = seed
            runs.append(run)
    for run in runs if not quick else []:  # the big rings need more rounds to reach TARGET
        rounds = LONGER.get((run.labels["graph"], run.labels["n"]))
        run.overrides = [f"num_steps={rounds}" if rounds and item.startswith("num_steps=") else item for item in run.overrides]
    return runs


def fitted_rate(points: list[tuple[int, float]]) -> tuple[float, int]:
    """(rate c, rounds fitted): the error's norm shrinks by a factor 1 - c per round, c comparable
    with the spectral gap. Least squares of log(error) against the round over the last three
    quarters of the rounds before the error first falls below FLOOR x the start (rounding, not
    the graph, can set the pace below it), which skips the first rounds' transient
    (PowerGossip's warm start forming). A graph that brings the error below the floor
    within the rounds logged one by one (10: the one-peer hypercube averages exactly in log2(n)
    rounds) gets the mean rate over those rounds, as does a window of fewer than 3 points."""
    start = points[0][1]
    end = next((step for step, error in points[1:] if error <= FLOOR * start), points[-1][0])
    window = [(step, error) for step, error in points if end / 4 <= step <= end and error > FLOOR * start]
    if end <= 10 or len(window) < 3:
        return 1 - topology_study.measured_rate([(step, 0.0, error) for step, error in points]), end
    slope = np.polyfit([step for step, _ in window], [math.log(error) for _, error in window], 1)[0]
    return 1 - math.exp(slope / 2), window[-1][0] - window[0][0]  # error is the squared norm: halve the slope


def rate_to_target(points: list[tuple[int, float]]) -> tuple[float, int | None]:
    """(rate c, rounds R): the first logged round R at which the error is TARGET of the start, as the
    per-round contraction of the norm that takes R rounds to get there, TARGET^(1/2R) = 1 - c
    (a method's effective rate, transient included; nan and None when never reached)."""
    rounds = next((step for step, error in points if error <= TARGET * points[0][1]), None)
    return (math.nan, None) if rounds is None else (1 - TARGET ** (1 / (2 * rounds)), rounds)


def best_setting(records: list[dict]):
    """(tags, [(round, error)]) of the setting that first reaches TARGET, the higher fitted rate
    among those that never do (Choco's gamma grid; one setting for the other methods)."""
    best, best_key = (None, []), None
    for tags in [dict(t) for t in {tuple(sorted(r["tags"].items())) for r in records if r["name"] == "error"}]:
        points = [(r["step"], r["value"]) for r in records if r["name"] == "error" and r["tags"] == tags]
        if len(points) < 2 or not all(math.isfinite(error) for _, error in points):
            continue
        rounds = rate_to_target(points)[1]
        key = (rounds is None, rounds or 0, -fitted_rate(points)[0])
        if best_key is None or key < best_key:
            best, best_key = (tags, points), key
    return best


def slope(pairs: list[tuple[float, float]]) -> float:
    """Least-squares slope of log(rate) against log(gap): 1 is a linear dependence, 2 quadratic."""
    pairs = [(gap, rate) for gap, rate in pairs if gap > 0 and rate > 0]
    if len(pairs) < 2 or len({gap for gap, _ in pairs}) < 2:
        return math.nan
    return float(np.polyfit(np.log([g for g, _ in pairs]), np.log([r for _, r in pairs]), 1)[0])


def finite_mean(values: list[float]) -> float:
    """The mean over the seeds that have a value (nan for none)."""
    values = [v for v in values if math.isfinite(v)]
    return float(np.mean(values)) if values else math.nan


def mean_and_spread(values: list[float]) -> str:
    """"1.02 ± 0.01" over the seeds that have a value ("1.02" for one; "nan" for none)."""
    values = [v for v in values if math.isfinite(v)]
    if len(values) < 2:
        return f"{values[0]:.3g}" if values else "nan"
    return f"{finite_mean(values):.3g} ± {np.std(values, ddof=1):.2g}"


def write_results(outcomes: list[sweep.Outcome], folder: str) -> tuple[list[list], list[list]]:
    rows = []
    points = {measure: {method: {} for method in METHODS} for measure in MEASURES}  # -> seed -> [(gap, rate, graph)]
    for outcome in outcomes:
        method, graph, n, seed = (outcome.run.labels[key] for key in ("method", "graph", "n", "seed"))
        gap = topology_study.spectral_gap_of(graph, n)
        tags, curve = best_setting(sweep.metrics(outcome))
        if tags is None:
            rows.append([method, graph, n, seed, f"{gap:.4g}", outcome.status] + [""] * (len(HEADER) - 6))
            continue
        (fitted, fitted_rounds), (reached, rounds) = fitted_rate(curve), rate_to_target(curve)
        rows.append([method, graph, n, seed, f"{gap:.4g}", f"{fitted:.4g}", fitted_rounds, f"{reached:.4g}", rounds or "not reached",
                     f"{tags['diffusion_rate']:.3g}", curve[-1][0], f"{curve[-1][1] / curve[0][1]:.3g}"])
        for measure, rate in zip(MEASURES, (fitted, reached)):
            if math.isfinite(rate):
                points[measure][method].setdefault(seed, []).append((gap, rate, graph))
    slopes = []
    figure = Figure(figsize=(13, 5.5), layout="tight")
    for axis, (measure, by_method) in zip(figure.subplots(1, len(MEASURES), sharey=True), points.items()):
        for method, by_seed in by_method.items():
            # A slope per seed and subset of graphs, and how many graphs it rests on (the most of any seed)
            per_seed = {name: [slope([(g, r) for g, r, graph in found if keep(graph)]) for found in by_seed.values()]
                        for name, keep in SUBSETS.items()}
            counts = {name: max((sum(keep(graph) for *_, graph in found) for found in by_seed.values()), default=0)
                      for name, keep in SUBSETS.items()}
            slopes.append([measure, method] + [item for name in SUBSETS for item in (mean_and_spread(per_seed[name]), counts[name])]
                          + [len(by_seed)])
            found = [point for seed_points in by_seed.values() for point in seed_points]
            for graph in MARKERS:
                mine = [(g, r) for g, r, name in found if name == graph]
                if mine:
                    axis.scatter(*zip(*mine), color=COLORS[method], marker=MARKERS[graph], s=25)
            every = finite_mean(per_seed["all"])
            if math.isfinite(every):  # the mean slope's line through the points' geometric centre
                gaps = np.array([g for g, _, _ in found])
                centre = np.mean(np.log(gaps)), np.mean(np.log([r for _, r, _ in found]))
                span = np.array([gaps.min(), gaps.max()])
                axis.plot(span, np.exp(centre[1] + every * (np.log(span) - centre[0])), color=COLORS[method],
                          label=f"{method}: slope {mean_and_spread(per_seed['all'])} (fixed graphs "
                                f"{mean_and_spread(per_seed['fixed'])}, rings {mean_and_spread(per_seed['rings'])})")
        for graph, marker in MARKERS.items():  # a legend entry per graph, in neutral grey
            axis.scatter([], [], color="gray", marker=marker, label=graph)
        axis.set(xlabel="spectral gap (per round)", title=measure)
        if any(by_method.values()):  # a log axis needs a point (runs not done yet: an empty figure)
            axis.set(xscale="log", yscale="log")
        axis.grid(alpha=0.3, which="both")
        axis.legend(fontsize=7)
    figure.axes[0].set_ylabel("rate c: the error's norm shrinks by 1 - c per round")
    figure.suptitle("consensus rate against spectral gap, n = " + ", ".join(str(n) for n in sorted({o.run.labels["n"] for o in outcomes}))
                    + "; seeds " + ", ".join(str(seed) for seed in sorted({o.run.labels["seed"] for o in outcomes})))
    figures.save(figure, os.path.join(folder, "rate_vs_gap.png"))
    sweep.write_table(folder, "rates", HEADER, rows,
                      notes="Rates as per-round contractions of the error's norm, comparable with the gap. Fitted: "
                            "least squares of log(error) against the round, over the last three quarters of the rounds "
                            f"before the error first falls below {FLOOR:g} of the start (spectral_gap.fitted_rate); to {TARGET:g}: TARGET^(1/2R) = 1 - rate, R the first logged round with the error at "
                            f"{TARGET:g} of the start (logged every round up to 10, every 10th to 100, every 100th after). "
                            f"gamma: Choco's best of its grid (fewest rounds to {TARGET:g}), 1 for the others.")
    sweep.write_table(folder, "slopes", SLOPE_HEADER, slopes,
                      notes="Least-squares slope of log(rate) against log(spectral gap); 1: rate linear in the gap, "
                            "2: quadratic. Fixed graphs: ring, torus, exponential; rings: the ring at every size, the cleanest "
                            "family (its gap falls as 1/n^2). Mean ± standard deviation of the seeds' slopes, each fitted to one seed's "
                            "graphs. graphs, fixed graphs, rings: how many have a rate (to the target: reach it), at most per seed.")
    return rows, slopes


def main():
    parser = sweep.study_arguments(__doc__, quick_help="tiny: 8 workers, 6 x 6 matrices, 100 rounds, one seed")
    parser.add_argument("--seeds", type=sweep.int_list, default=None,
                        help=f"seeds of the starting matrices (default {','.join(map(str, SEEDS))}; --quick: {QUICK_SEEDS[0]})")
    args = parser.parse_args()
    folder = sweep.study_folder(args, "spectral_gap")
    outcomes = sweep.launch_or_collect(args, study_runs(args.quick, args.overrides, args.seeds), folder)
    rows, slopes = write_results(outcomes, folder)
    print(sweep.markdown_table(HEADER, rows) + "\n" + sweep.markdown_table(SLOPE_HEADER, slopes), end="")
    sys.exit(report.exit_status(outcomes))


if __name__ == "__main__":
    main()
