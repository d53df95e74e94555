"""Study 8: the consensus rate against the graph's spectral gap.

PowerGossip's consensus error contracts at a rate linear in the spectral gap rho of
the mixing matrix (Vogels et al. 2020, "Consensus experiments" and the analysis of
Algorithm 1); Choco-Gossip's proven rate is quadratic in it, rho^2 delta / 82
(Koloskova et al. 2019, Theorem 2). This study measures the per-round rate on graphs
whose gaps span three orders of magnitude and fits the slope of log(rate) against
log(gap) per method: a slope of 1 is linear, 2 quadratic.

Every worker starts from its own random matrix (gossip_run.py, data_type=random).
Graphs: ring, torus and the undirected exponential graph at n = 8, 16, 32 and 64
(fixed), one_peer_hypercube and random_matching (a graph per round, with the per-round
equivalent gap of topologies.TimeVarying.spectral_gap). Methods: uncompressed gossip
(gamma 1), PowerGossip rank 1 (gamma 1, its default) on every graph; Choco sign+norm
with gamma the best of a small grid per graph, on the fixed graphs only (its s_i
bookkeeping needs the same W every round).

    python experiments/spectral_gap.py --quick     # tiny: 8 workers, 6 x 6 matrices, 100 rounds
    OMP_NUM_THREADS=1 python experiments/spectral_gap.py    # the full study, CPU, one run at a time

Results: experiments/results/spectral_gap/ (--quick: runs/spectral_gap_quick/):
rates.md/.csv (gap and fitted rate per method and graph), slopes.md/.csv (fitted slope
of log(rate) against log(gap) per method, over all its graphs and over the fixed ones),
rate_vs_gap.png (the log-log plot with the fitted lines).
"""
from __future__ import annotations

import math
import os
import sys

import numpy as np
from matplotlib.figure import Figure

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gossip_run  # noqa: E402
from experiments import sweep  # noqa: E402
from experiments import topologies as topology_study  # noqa: E402
from powergossip import figures, topologies  # noqa: E402

FIXED = ("ring", "torus", "exponential")
TIME_VARYING = ("one_peer_hypercube", "random_matching")
# method -> (gossip_run overrides, graphs it runs on)
METHODS = {
    "uncompressed": (["algorithm=uncompressed"], FIXED + TIME_VARYING),
    "power_gossip": (["algorithm=power_gossip"], FIXED + TIME_VARYING),
    "sign_choco": (["algorithm=sign_choco", "hyperparameter_range_min=0.01", "hyperparameter_range_max=2"], FIXED),
}
FULL = {"sizes": (8, 16, 32, 64), "matrix_size": 20, "num_steps": 4000, "gammas": 10}
QUICK = {"sizes": (8,), "matrix_size": 6, "num_steps": 100, "gammas": 2}
MARKERS = {"ring": "o", "torus": "s", "exponential": "^", "one_peer_hypercube": "D", "random_matching": "v"}
COLORS = {"uncompressed": "tab:blue", "power_gossip": "tab:orange", "sign_choco": "tab:green"}
HEADER = ["method", "graph", "n", "spectral gap (per round)", "rate (fitted)", "rounds fitted", "gamma", "final relative error"]
SLOPE_HEADER = ["method", "slope, all its graphs", "points", "slope, fixed graphs", "points"]


def study_runs(quick: bool, extra: list[str]) -> list[sweep.Run]:
    return topology_study.gossip_runs(QUICK if quick else FULL, METHODS, topology_study.overrides_for(gossip_run.DEFAULTS, extra),
                                      lambda n, method, graph: f"{method}-{graph}-n{n}")


def fitted_rate(points: list[tuple[int, float]]) -> tuple[float, int]:
    """(rate c, rounds fitted): the error's norm shrinks by a factor 1 - c per round, c comparable
    with the spectral gap. Least squares of log(error) against the round over the last three
    quarters of the rounds before the error first falls below topology_study.FLOOR x the start
    (float32 rounding, not the graph, sets the pace below it), which skips the first rounds'
    transient (PowerGossip's warm start forming). With fewer than 3 such points (a graph that
    averages exactly in a few rounds) it is the mean rate over those rounds."""
    start = points[0][1]
    end = next((step for step, error in points[1:] if error <= topology_study.FLOOR * start), points[-1][0])
    window = [(step, error) for step, error in points if end / 4 <= step <= end and error > topology_study.FLOOR * start]
    if len(window) < 3:
        return 1 - topology_study.measured_rate([(step, 0.0, error) for step, error in points]), end
    slope = np.polyfit([step for step, _ in window], [math.log(error) for _, error in window], 1)[0]
    return 1 - math.exp(slope / 2), window[-1][0] - window[0][0]  # error is the squared norm: halve the slope


def best_setting(records: list[dict]) -> tuple[dict | None, list[tuple[int, float]], float, int]:
    """(tags, [(round, error)], rate, rounds fitted) of the setting with the highest fitted rate
    (Choco's gamma grid; one setting for the other methods). None tags when nothing was logged."""
    best = (None, [], -math.inf, 0)
    for tags in [dict(t) for t in {tuple(sorted(r["tags"].items())) for r in records if r["name"] == "error"}]:
        points = [(r["step"], r["value"]) for r in records if r["name"] == "error" and r["tags"] == tags]
        if len(points) < 2 or not all(math.isfinite(error) for _, error in points):
            continue
        rate, rounds = fitted_rate(points)
        if rate > best[2]:
            best = (tags, points, rate, rounds)
    return best


def gap_of(graph: str, n: int) -> float:
    return topologies.build(graph, n).spectral_gap()


def slope(pairs: list[tuple[float, float]]) -> float:
    """Least-squares slope of log(rate) against log(gap): 1 is a linear dependence, 2 quadratic."""
    pairs = [(gap, rate) for gap, rate in pairs if gap > 0 and rate > 0]
    if len(pairs) < 2 or len({gap for gap, _ in pairs}) < 2:
        return math.nan
    return float(np.polyfit(np.log([g for g, _ in pairs]), np.log([r for _, r in pairs]), 1)[0])


def write_results(outcomes: list[sweep.Outcome], folder: str) -> tuple[list[list], list[list]]:
    rows, points = [], {method: [] for method in METHODS}  # method -> [(gap, rate, graph)]
    for outcome in outcomes:
        method, graph, n = outcome.run.labels["method"], outcome.run.labels["graph"], outcome.run.labels["n"]
        gap = gap_of(graph, n)
        tags, curve, rate, rounds = best_setting(sweep.metrics(outcome))
        if tags is None:
            rows.append([method, graph, n, f"{gap:.4g}", outcome.status, "", "", ""])
            continue
        rows.append([method, graph, n, f"{gap:.4g}", f"{rate:.4g}", rounds, f"{tags['diffusion_rate']:.3g}",
                     f"{curve[-1][1] / curve[0][1]:.3g}"])
        points[method].append((gap, rate, graph))
    slopes = []
    figure = Figure(figsize=(7, 5.5))
    axis = figure.subplots()
    for method, found in points.items():
        every = slope([(g, r) for g, r, _ in found])
        fixed = slope([(g, r) for g, r, graph in found if graph in FIXED])
        slopes.append([method, f"{every:.3g}", len(found), f"{fixed:.3g}", sum(graph in FIXED for *_, graph in found)])
        for graph in MARKERS:
            mine = [(g, r) for g, r, name in found if name == graph]
            if mine:
                axis.scatter(*zip(*mine), color=COLORS[method], marker=MARKERS[graph], s=25)
        if math.isfinite(every):  # the fitted line through the points' geometric centre
            gaps = np.array([g for g, _, _ in found])
            centre = np.mean(np.log(gaps)), np.mean(np.log([r for _, r, _ in found]))
            span = np.array([gaps.min(), gaps.max()])
            axis.plot(span, np.exp(centre[1] + every * (np.log(span) - centre[0])), color=COLORS[method],
                      label=f"{method}: slope {every:.2f}")
    for graph, marker in MARKERS.items():  # a legend entry per graph, in neutral grey
        axis.scatter([], [], color="gray", marker=marker, label=graph)
    axis.set(xscale="log", yscale="log", xlabel="spectral gap (per round)", ylabel="rate: 1 - per-round contraction of the error",
             title="consensus rate against spectral gap, n = " + ", ".join(str(n) for n in sorted({o.run.labels["n"] for o in outcomes})))
    axis.grid(alpha=0.3, which="both")
    axis.legend(fontsize=7)
    figures.save(figure, os.path.join(folder, "rate_vs_gap.png"))
    sweep.write_table(folder, "rates", HEADER, rows,
                      notes="rate: least-squares fit of log(error) against the round (topology_study.FLOOR and "
                            "spectral_gap.fitted_rate say over which rounds), as a per-round contraction of the error's "
                            "norm; gamma: the best of Choco's grid by rate, 1 for the others.")
    sweep.write_table(folder, "slopes", SLOPE_HEADER, slopes,
                      notes="Least-squares slope of log(rate) against log(spectral gap); 1: rate linear in the gap, "
                            "2: quadratic. Fixed graphs: ring, torus, exponential.")
    return rows, slopes


def main():
    parser = sweep.study_arguments(__doc__, quick_help="tiny: 8 workers, 6 x 6 matrices, 100 rounds")
    args = parser.parse_args()
    folder = sweep.study_folder(args, "spectral_gap")
    outcomes = sweep.launch_or_collect(args, study_runs(args.quick, args.overrides), folder)
    rows, slopes = write_results(outcomes, folder)
    print(sweep.markdown_table(HEADER, rows) + "\n" + sweep.markdown_table(SLOPE_HEADER, slopes), end="")
    sys.exit(1 if any(o.status == "failed" for o in outcomes) else 0)


if __name__ == "__main__":
    main()
