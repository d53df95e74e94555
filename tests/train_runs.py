"""Run train.main() several times in one launch (one mpirun start for many configs).

`python tests/train_runs.py OUT_ROOT RUNS_JSON` where RUNS_JSON maps a run name to a
list of `key=value` overrides; run NAME writes to OUT_ROOT/NAME.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import runs  # noqa: E402
import train  # noqa: E402

DEFAULTS = train._DEFAULTS


def run(out_dir: str, overrides: list[str]) -> None:
    train.config = runs.apply_overrides(DEFAULTS, overrides)
    train.output_dir = out_dir
    train.main()


if __name__ == "__main__":
    out_root, runs_json = sys.argv[1], sys.argv[2]
    for name, overrides in json.loads(runs_json).items():
        run(os.path.join(out_root, name), overrides)
