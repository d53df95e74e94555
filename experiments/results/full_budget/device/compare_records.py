"""The records of returned Moniqua seed-2 runs (calls 26 to 31) against the committed run's: every
record but the times and the averaged model's test equal to ../runs/ring8_moniqua_seed2's (tested
there in float32), the test's to call 26's (bfloat16 autocast); the runs against each other; each
run's wall time and section totals. Run from the repository root:

    python experiments/results/full_budget/device/compare_records.py RUN_DIR [RUN_DIR ...]

RUN_DIR: a folder holding a run's metrics.jsonl and summary.json.
"""
import json
import os
import sys

HERE = "experiments/results/full_budget"
TEST = json.dumps({"split": "test_avg"})


def load(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def by_key(records, keep):
    return {(r["name"], r["epoch"], json.dumps(r["tags"], sort_keys=True)): r for r in records if keep(r)}


def not_time(record):
    return record["tags"].get("split") != "runtime"


committed = by_key(load(f"{HERE}/runs/ring8_moniqua_seed2/metrics.jsonl"),
                   lambda r: not_time(r) and r["tags"].get("split") != "test_avg")
tested = by_key(load(f"{HERE}/device/h100_2026-12-07_call26_test_avg.jsonl"), lambda r: True)
runs = {folder: load(folder + "/metrics.jsonl") for folder in sys.argv[1:]}
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
            print(f"  wall time {json.load(f)['wall_time_s']:.2f} s; sections {sections}")
    else:
        print(f"  no summary (the run was cut at epoch {last}); sections {sections}")
first = next(iter(runs), None)
for other in list(runs)[1:]:
    print(f"{first} and {other}: all but the times equal: {by_key(runs[first], not_time) == by_key(runs[other], not_time)}")
