"""Study 4: the paper's configurations that need data not shipped here.

    python experiments/paper_configs.py --data-dir ~/data                     # all three setups
    python experiments/paper_configs.py --data-dir ~/data cifar10_resnet20_ring8
    python experiments/paper_configs.py --check --data-dir ~/data             # only say what is missing

Setups (YAML files in experiments/configs/train/<setup>/, one per method):
cifar10_resnet20_ring8 (CIFAR-10, ResNet-20, 8-worker ring, 300 epochs, all methods),
cifar10_resnet18_ring16 (ResNet-18, 16-worker ring: the setup the poster's caption names;
its table is cifar10_resnet20_ring8's, see experiments/results/README.md), wikitext2_lstm_ring16 (LSTM,
PowerGossip with 8/16/32 iterations). A setup whose files are not in --data-dir is
skipped with a message naming the files and where to get them.
Results: experiments/results/paper_configs/<setup>/.
"""
from __future__ import annotations

import argparse
import glob
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import report, sweep  # noqa: E402

CONFIGS = os.path.join(sweep.ROOT, "experiments", "configs", "train")
NEEDS = {
    "cifar10": (["cifar-10-batches-py/data_batch_1", "cifar-10-batches-py/test_batch"],
                "CIFAR-10's python version (cifar-10-python.tar.gz, unpacked: cifar-10-batches-py/)"),
    "wikitext2": (["wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"],
                  "WikiText-2 (wikitext-2-v1.zip, unpacked: wiki.{train,valid,test}.tokens)"),
}
SETUPS = {"cifar10_resnet20_ring8": "cifar10", "cifar10_resnet18_ring16": "cifar10", "wikitext2_lstm_ring16": "wikitext2"}


def missing_files(task: str, data_dir: str | None) -> list[str]:
    """The files `task` needs that `data_dir` (or its wikitext-2/ subfolder) lacks."""
    files, _ = NEEDS[task]
    if data_dir is None:
        return files
    candidates = [data_dir, os.path.join(data_dir, "wikitext-2")]
    return [f for f in files if not any(os.path.exists(os.path.join(folder, f)) for folder in candidates)]


def setup_runs(setup: str) -> list[sweep.Run]:
    files = sorted(glob.glob(os.path.join(CONFIGS, setup, "*.yaml")))
    return [sweep.Run(os.path.splitext(os.path.basename(f))[0], "train.py", [f], {"method": os.path.splitext(os.path.basename(f))[0]})
            for f in files]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("setups", nargs="*", default=list(SETUPS), help=f"any of {', '.join(SETUPS)}")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--check", action="store_true", help="only report which setups can run")
    parser.add_argument("--processes", type=int, default=None, help="launch each run under mpirun -np N")
    parser.add_argument("--output", default=os.path.join(sweep.RESULTS, "paper_configs"))
    parser.add_argument("--set", nargs="*", default=[], help="extra key=value for every run (e.g. device=cuda)")
    args = parser.parse_args()
    unknown = [s for s in args.setups if s not in SETUPS]
    if unknown:
        parser.error(f"unknown setup(s) {', '.join(unknown)}; valid: {', '.join(SETUPS)}")
    runnable = []
    for setup in args.setups:
        missing = missing_files(SETUPS[setup], args.data_dir)
        if missing:
            print(f"{setup}: cannot run, missing in --data-dir={args.data_dir}: {', '.join(missing)}. "
                  f"Get {NEEDS[SETUPS[setup]][1]} and pass --data-dir <its parent folder>.")
        else:
            print(f"{setup}: data found, {len(setup_runs(setup))} runs")
            runnable.append(setup)
    if args.check or not runnable:
        sys.exit(0 if runnable or args.check else 2)
    failed = False
    for setup in runnable:
        folder = os.path.join(args.output, setup)
        outcomes = sweep.launch(setup_runs(setup), os.path.join(folder, "runs"), args.processes,
                                extra=[f"data_dir={args.data_dir}"] + args.set)
        metric = "perplexity" if SETUPS[setup] == "wikitext2" else "accuracy"
        report.write_report(outcomes, folder, setup, ["method"], metric=metric)
        failed |= any(o.status == "failed" for o in outcomes)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
