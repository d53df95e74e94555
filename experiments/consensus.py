"""Study 1: consensus on an 8-worker ring, every algorithm of gossip_run.py.

Each worker starts from its own random 100 x 100 matrix (data_type=random) or from
one real Fashion-MNIST image (data_type=images, standing in for the paper's faces).
The settings are the original study's (experiments/consensus_2.py of the paper's
code): uncompressed gossip and PowerGossip use gamma = 1.308 (the optimal scaling
for an 8-ring) and need no sweep; Choco and DeepSqueeze sweep 20 values of gamma
log-uniform in [1e-4, 1.308]; Moniqua sweeps 10 x 10 values of gamma and theta
(theta in [0.1, 10]), one run per theta so that the sweep spreads over processes.
5000 steps on random data (500 for uncompressed gossip), 1000 on images (3000 for
PowerGossip, 2000 for top-k). The setting with the lowest error at the end is
chosen per method.

    python experiments/consensus.py --quick           # reduced grids and steps, a minute or two
    python experiments/consensus.py --jobs 16         # the full study, 16 runs at a time

Results: experiments/results/consensus/ (--quick: runs/consensus_quick/): error_vs_bits_<data>.png (error of
the best setting per method against bits sent per worker, log scales, as in the
paper), bits_to_1e-6.md/.csv (bits each method needs to reach an error of 1e-6
relative to the start, as sent on the wire and as the original code counted them:
top-k's indices as int64), best_settings.md/.csv.

    python experiments/consensus.py --algorithms topk_choco --output runs/topk   # a part of the study
"""
from __future__ import annotations

import math
import os
import sys

import torch
from matplotlib.figure import Figure

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gossip_run  # noqa: E402
from experiments import report, sweep  # noqa: E402
from powergossip import compressors, figures  # noqa: E402

DATA_TYPES = ("random", "images")
TARGET = 1e-6  # relative error to reach
OPTIMAL_RING_8 = 1.308  # 2 / (lambda_2 + lambda_n) of the 8-ring's gossip step


MATRIX_SIZE = 100  # random data: each worker's matrix is MATRIX_SIZE x MATRIX_SIZE
ENTRIES = {"random": MATRIX_SIZE**2, "images": 28 * 28}  # entries of a worker's tensor (images: Fashion-MNIST's)
TABLE_HEADER = ["data", "algorithm", f"bits to reach {TARGET:g} relative error (on the wire)",
                f"bits to reach {TARGET:g}, indices as int64 (the original code's count)", "final relative error", "bits at the end"]
TABLE_NOTES = ("Bits per worker. On the wire: what comm.py sends, top-k's indices in the smallest integer type that holds "
               "them (int16 for 10,000 or 784 entries). The original code counted top-k's indices as int64; every other "
               "method's count is the same under both rules.")


def original_count_ratio(algorithm: str, entries: int) -> float:
    """Bits the original code counted per bit on the wire: top-k sends k float32 values and
    k indices, which the original counted as int64 and the wire carries in the smallest integer
    type (compressors.smallest_index_dtype). The same k every step, so the step that first
    reaches the target is the same under both counts and the ratio applies to any bit count."""
    _, fixed = gossip_run.resolve(algorithm)
    if fixed.get("compressor") not in ("top-k", "random-k"):
        return 1.0
    index_bits = torch.iinfo(compressors.smallest_index_dtype(entries)).bits
    return (32 + 64) / (32 + index_bits)


def settings_of(algorithm: str, data_type: str, quick: bool) -> list[list[str]]:
    """The original study's settings of one algorithm: a list of override lists, one per run."""
    steps = 5000 if data_type == "random" else 1000
    if algorithm == "uncompressed" and data_type == "random":
        steps //= 10
    if data_type == "images" and "power" in algorithm:
        steps *= 3
    if data_type == "images" and "topk" in algorithm:
        steps *= 2
    gammas, thetas = 20, 10
    if quick:
        steps, gammas, thetas = min(steps, 300), 5, 3
    common = [f"num_steps={steps}", f"hyperparameter_range_max={OPTIMAL_RING_8}"]
    if algorithm in gossip_run.UNTUNED:
        return [common + [f"optimizer_diffusion_rate={OPTIMAL_RING_8}"]]
    if algorithm == "moniqua":
        theta_grid = gossip_run.thetas(dict(gossip_run.DEFAULTS, algorithm="moniqua", theta_num_samples=thetas))
        return [common + [f"hyperparameter_num_samples={thetas}", f"optimizer_theta={theta}"] for theta in theta_grid]
    return [common + [f"hyperparameter_num_samples={gammas}"]]


def study_runs(quick: bool, extra: list[str], data_types=DATA_TYPES, algorithms=gossip_run.ALGORITHMS) -> list[sweep.Run]:
    base = ["topology=ring", "n_workers=8", f"matrix_size={MATRIX_SIZE}", "seed=42"]
    runs = []
    for data_type in data_types:
        for algorithm in algorithms:
            parts = settings_of(algorithm, data_type, quick)
            for number, overrides in enumerate(parts):
                name = f"{data_type}-{algorithm}" + (f"-{number}" if len(parts) > 1 else "")
                runs.append(sweep.Run(name, "gossip_run.py", base + overrides + [f"algorithm={algorithm}", f"data_type={data_type}"] + extra,
                                      {"algorithm": algorithm, "data": data_type}))
    return runs


def best_curve(records: list[dict]):
    """(tags of the best setting, [(bits, error)]): the setting with the lowest final error."""
    tags = figures.best_setting(records)
    return tags, [] if tags is None else figures.error_curve(records, tags)


def bits_to_reach(points, target: float) -> float:
    """Bits per worker at the first logged step whose error is <= target x the starting error."""
    start = points[0][1]
    return next((bits for bits, error in points if error <= target * start), math.inf)


def write_results(outcomes: list[sweep.Outcome], folder: str) -> list[list]:
    os.makedirs(folder, exist_ok=True)
    rows, settings = [], []
    for data_type in sorted({o.run.labels["data"] for o in outcomes}):
        figure = Figure(figsize=(7, 5), layout="tight")
        axis = figure.subplots()
        algorithms = [a for a in gossip_run.ALGORITHMS if any(o.run.labels == {"algorithm": a, "data": data_type} for o in outcomes)]
        for algorithm in algorithms:
            parts = [o for o in outcomes if o.run.labels == {"algorithm": algorithm, "data": data_type}]
            tags, points = best_curve([r for o in parts for r in sweep.metrics(o)])  # best over all its runs
            if not points:
                rows.append([data_type, algorithm, "failed" if any(o.status == "failed" for o in parts) else "no data", "", "", ""])
                continue
            start = points[0][1]
            reach = bits_to_reach(points, TARGET)
            original = reach * original_count_ratio(algorithm, ENTRIES[data_type])
            rows.append([data_type, algorithm] + ["not reached" if math.isinf(b) else f"{b:.4g}" for b in (reach, original)]
                        + [f"{points[-1][1] / start:.3g}", f"{points[-1][0]:.4g}"])
            settings.append([data_type, algorithm, tags.get("diffusion_rate"), tags.get("theta")])
            # A style of its own per algorithm, the same in every figure: the PowerGossip variants' curves coincide.
            style = figures.distinct_styles(len(gossip_run.ALGORITHMS))[gossip_run.ALGORITHMS.index(algorithm)]
            figures.plot_relative_error(axis, points, label=algorithm, linewidth=1.2, **style)
        figures.label_error_axes(axis, f"consensus, 8-worker ring, {data_type} data (best setting per method)")
        axis.axhline(TARGET, color="gray", linewidth=0.5)
        axis.legend(fontsize=7, ncol=2)
        figures.save(figure, os.path.join(folder, f"error_vs_bits_{data_type}.png"))
    sweep.write_table(folder, "bits_to_1e-6", TABLE_HEADER, rows, notes=TABLE_NOTES)
    sweep.write_table(folder, "best_settings", ["data", "algorithm", "diffusion_rate", "theta"], settings)
    return rows


def main():
    parser = sweep.study_arguments(__doc__, quick_help="reduced grids and steps")
    parser.add_argument("--data", default=",".join(DATA_TYPES), help="data types, comma-separated")
    parser.add_argument("--algorithms", default=",".join(gossip_run.ALGORITHMS), help="algorithms, comma-separated (a part of the study)")
    args = parser.parse_args()
    unknown = [a for a in args.algorithms.split(",") if a not in gossip_run.ALGORITHMS]
    if unknown:
        parser.error(f"unknown algorithm(s) {', '.join(unknown)}; valid: {', '.join(gossip_run.ALGORITHMS)}")
    folder = sweep.study_folder(args, "consensus")
    runs = study_runs(args.quick, args.overrides, args.data.split(","), args.algorithms.split(","))
    outcomes = sweep.launch_or_collect(args, runs, folder)
    print(sweep.markdown_table(TABLE_HEADER, write_results(outcomes, folder)), end="")
    sys.exit(report.exit_status(outcomes))


if __name__ == "__main__":
    main()
