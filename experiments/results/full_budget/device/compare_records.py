"""The records of returned Moniqua seed-2 runs (calls 26 to 31) against the committed run's: every
record but the times and the averaged model's test equal to ../runs/ring8_moniqua_seed2's (tested
there in float32), the test's to call 26's (bfloat16 autocast); the runs against each other; each
run's wall time, section totals and where its time went (time_split). Written for those runs:
EPOCH_IMAGES and the benchmark's row are the 8-ring Moniqua run's. Run from the repository root:

    python experiments/results/full_budget/device/compare_records.py [--bench BENCH_JSON] RUN [RUN ...]

RUN: a folder holding a run's metrics.jsonl and summary.json, or a committed `*_times.jsonl`
(only the split is printed; its summary is the `*_summary.json` beside it). BENCH_JSON: the
call's simulation_efficiency.py --json output (its Moniqua row gives the benchmark's pace).
"""
import json
import os
import sys

HERE = "experiments/results/full_budget"
TEST = json.dumps({"split": "test_avg"})
EPOCH_IMAGES = 8 * 128 * 58  # the 8-ring's images an epoch: 58 steps of 128 a worker (Fashion-MNIST's 60,000)


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def by_key(records, keep):
    return {(r["name"], r["epoch"], json.dumps(r["tags"], sort_keys=True)): r for r in records if keep(r)}


def not_time(record):
    return record["tags"].get("split") != "runtime"


def time_split(records, wall_time, images_per_s=None):
    """Where a run's wall time went, from its section times: cumulative since the launch (a run
    that was not resumed) and recorded at each epoch's end, the evaluation section's one epoch
    late (its record is taken inside it: epoch e's end is in epoch e+1's record). The first
    epoch (its steps record their CUDA graphs, its end the end's graphs), epochs 2 to N-1 (their
    median, against the benchmark's pace), the last epoch's steps, and the wall time outside
    every section (set-up, saves, the records' writes, the last epoch's end)."""
    steps, ends = {}, {}  # epoch -> cumulative seconds: the steps' sections; the evaluation section
    for r in records:
        if not not_time(r):
            into = ends if r["name"] == "time_evaluation" else steps
            into[int(r["epoch"])] = into.get(int(r["epoch"]), 0.0) + r["value"]
    last = max(steps, default=0)
    if last < 3:
        return f"  no split: {last} epoch(s), it needs 3"
    end = {e: ends.get(e + 1, 0.0) for e in range(last)}  # up to epoch e's end (end[0] = 0)
    epochs = [steps[e] - steps.get(e - 1, 0.0) + end[e] - end[e - 1] for e in range(1, last)]
    middle = sorted(epochs[1:])
    median = middle[len(middle) // 2]
    pace = "" if images_per_s is None else f" ({EPOCH_IMAGES / median / images_per_s:.3f} of the benchmark's pace)"
    return (f"  first epoch {epochs[0]:.2f} s; epochs 2 to {last - 1} {sum(middle):.2f} s, median {median * 1e3:.1f} ms"
            f"{pace}; the last epoch's steps {steps[last] - steps[last - 1]:.2f} s; outside the sections "
            f"{wall_time - steps[last] - ends.get(last, 0.0):.2f} s")


committed = by_key(load(f"{HERE}/runs/ring8_moniqua_seed2/metrics.jsonl"),
                   lambda r: not_time(r) and r["tags"].get("split") != "test_avg")
tested = by_key(load(f"{HERE}/device/h100_2026-12-07_call26_test_avg.jsonl"), lambda r: True)
arguments = sys.argv[1:]
bench = None
if arguments[:1] == ["--bench"]:
    with open(arguments[1]) as f:
        bench = next(row["images_per_s"] for row in json.load(f)["rows"] if row["optimizer"] == "moniqua")
    arguments = arguments[2:]
for path in [a for a in arguments if a.endswith("_times.jsonl")]:
    with open(path.replace("_times.jsonl", "_summary.json")) as f:
        print(f"{path}:\n{time_split(load(path), json.load(f)['wall_time_s'], bench)}")
runs = {folder: load(folder + "/metrics.jsonl") for folder in arguments if not folder.endswith("_times.jsonl")}
for folder, records in runs.items():
    mine = by_key(records, not_time)
    trained = {k: v for k, v in mine.items() if k[2] != TEST}
    test = {k: v for k, v in mine.items() if k[2] == TEST}
    print(f"{folder}: {len(records)} records; all but the times and the test equal the committed run's: "
          f"{trained == committed}; the test's equal call 26's: {test == tested}")
    last = max((r["epoch"] for r in records), default=None)
    sections = {r["name"][5:]: round(r["value"], 2) for r in records if not not_time(r) and r["epoch"] == last}
    if os.path.exists(folder + "/summary.json"):
        with open(folder + "/summary.json") as f:
            wall_time = json.load(f)["wall_time_s"]
        print(f"  wall time {wall_time:.2f} s; sections {sections}\n{time_split(records, wall_time, bench)}")
    else:
        print(f"  no summary (the run was cut at epoch {last}); sections {sections}")
first = next(iter(runs), None)
for other in list(runs)[1:]:
    print(f"{first} and {other}: all but the times equal: {by_key(runs[first], not_time) == by_key(runs[other], not_time)}")
