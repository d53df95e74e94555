"""The host's time per training step in train.py's work around the steps, this tree against
another checkout, side by side in one run.

On a GPU train.py's loop is bound by the host: every kernel it launches costs the host a few
microseconds, and while the host launches the device waits. This times, as train.py takes
them on a GPU (each package's own way: since 6592d15 several steps at once):

- `sums and loss check`: the epoch's sums (metrics.EpochTotals) and the loss check
  (runs.LossCheck, read LAG steps later) of 8 workers, epochs of 58 steps (Fashion-MNIST's
  at batch 128 on 8 workers) with what an epoch's end reads (the sums, diverged_at).
- `batches`: the loader's batches (data.WorkerLoader) of 8 workers, batch 128, Fashion-MNIST's
  image shape, 58 steps an epoch, with and without crop and flip; each epoch's draws included.

The loop is timed without waiting for the device, which is waited for once at its end: with
these small tensors the time on a GPU is the host's. On a CPU the batches' time is that of
computing them (the --quick form is there to keep the script working). With `--compare DIR`
each repetition times both trees in fresh processes, alternating; `ratio`: the other tree's
microseconds over this tree's (above 1: this tree is faster).

    git worktree add /tmp/before 1f69629
    python benchmarks/host_per_step.py --compare /tmp/before --json host_per_step.json
    python benchmarks/host_per_step.py --quick --device cpu --compare .
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import types

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKERS, BATCH, STEPS_PER_EPOCH = 8, 128, 58


def sums_and_loss_check(torch, metrics, runs, device, epochs: int):
    """A function that takes `epochs` epochs' sums and loss check as train.py does on a GPU."""
    comm = types.SimpleNamespace(device=device, num_local=WORKERS, n_workers=WORKERS, first_worker=0,
                                 sum_over_processes=lambda values: values)
    generator = torch.Generator(device=device).manual_seed(0)
    step_values = [(torch.rand(WORKERS, device=device, generator=generator) + 1.0,
                    torch.randint(0, BATCH, (WORKERS,), device=device, generator=generator).float(),
                    torch.full((WORKERS,), float(BATCH), device=device)) for _ in range(STEPS_PER_EPOCH)]

    def run():
        check = runs.LossCheck(comm, None, max_loss_ratio=100.0, initial_loss=1.5)
        check.lag = runs.LossCheck.LAG  # also on a CPU: the GPU's reads
        for epoch in range(epochs):
            totals = metrics.EpochTotals.zeros(WORKERS, device)
            if hasattr(totals, "fold_every"):  # since 6592d15: the GPU's blocks, also on a CPU
                totals.fold_every = metrics.EpochTotals.FOLD
            for step, (losses, corrects, counts) in enumerate(step_values):
                totals.add(losses, corrects, counts)
                check.watch(losses, epoch, step)
            _ = check.diverged_at, totals.loss  # what the epoch's end reads
        check.finish()
    return run


def batches(torch, data, device, epochs: int, augment: bool):
    """A function that makes `epochs` epochs' batches as train.py does on a GPU."""
    dataset = data.load("synthetic", device=device, num_train=WORKERS * BATCH * STEPS_PER_EPOCH, num_test=0,
                        in_channels=1, image_size=28, num_classes=10, seed=1)
    partition = data.make_partition("iid", dataset.train_y, WORKERS, seed=2)
    loader = data.WorkerLoader(dataset, partition, batch_size=BATCH, seed=3, augment=augment)
    if hasattr(loader, "steps_at_once"):  # since 6592d15: the GPU's groups, also on a CPU
        loader.steps_at_once = data.WorkerLoader.STEPS_AT_ONCE

    def run():
        for epoch in range(epochs):
            for _ in loader.epoch_batches(epoch):
                pass
    return run


def measure(code: str, device_name: str, epochs: int) -> dict:
    """Microseconds per step of each part with the package in `code` (in this process)."""
    sys.path.insert(0, code)
    import torch

    import powergossip
    from powergossip import data, metrics, runs
    if not os.path.samefile(os.path.dirname(os.path.dirname(powergossip.__file__)), code):
        raise SystemExit(f"imported powergossip from {powergossip.__file__}, not from {code}")
    sys.path.insert(0, HERE)
    from benchmarks.timing import seconds_per_call
    device = torch.device(device_name)
    parts = {"sums and loss check": sums_and_loss_check(torch, metrics, runs, device, epochs),
             "batches": batches(torch, data, device, epochs, augment=False),
             "batches, crop and flip": batches(torch, data, device, epochs, augment=True)}
    return {name: 1e6 * seconds_per_call(run, device, 1, warmup=1) / (epochs * STEPS_PER_EPOCH)
            for name, run in parts.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="default: cuda if there is a GPU, else cpu")
    parser.add_argument("--epochs", type=int, default=20, help="epochs of 58 steps per timed call")
    parser.add_argument("--repetitions", type=int, default=5, help="timed calls per tree; the best is kept")
    parser.add_argument("--quick", action="store_true", help="2 epochs, 2 repetitions")
    parser.add_argument("--compare", help="another checkout, timed against this tree side by side")
    parser.add_argument("--code", default=HERE, help=argparse.SUPPRESS)  # the tree a measuring process imports
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # a measuring process: write its times to this file
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.repetitions = 2, 2
    if args.epochs < 1 or args.repetitions < 1:
        parser.error("--epochs and --repetitions must be at least 1")
    if args.measure:
        with open(args.measure, "w") as f:
            json.dump(measure(args.code, args.device, args.epochs), f)
        return

    import torch
    sys.path.insert(0, HERE)
    from benchmarks.timing import run_description, write_json
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    trees = {"this tree": HERE} | ({"other tree": os.path.abspath(args.compare)} if args.compare else {})
    best = {tree: {} for tree in trees}
    with tempfile.TemporaryDirectory() as scratch:
        for repetition in range(args.repetitions):
            for tree, code in trees.items():  # alternating, each in a fresh process
                out = os.path.join(scratch, f"{repetition}_{len(best[tree])}_{tree.replace(' ', '_')}.json")
                subprocess.run([sys.executable, os.path.abspath(__file__), "--code", code, "--device", device.type,
                                "--epochs", str(args.epochs), "--measure", out], check=True, timeout=1800)
                with open(out) as f:
                    for name, us in json.load(f).items():
                        best[tree][name] = min(us, best[tree].get(name, us))
    header = run_description(device)
    print(f"{header['device']}, torch {header['torch']}, {header['date']}; host microseconds per step, "
          f"{args.epochs} epochs of {STEPS_PER_EPOCH} steps, best of {args.repetitions}")
    print(f"{'work':<24}" + "".join(f"{tree:>14}" for tree in trees) + (f"{'ratio':>8}" if args.compare else ""))
    rows = []
    for name in best["this tree"]:
        row = {"work": name} | {tree.replace(" ", "_") + "_us": best[tree][name] for tree in trees}
        line = f"{name:<24}" + "".join(f"{best[tree][name]:>14.1f}" for tree in trees)
        if args.compare:
            row["ratio"] = best["other tree"][name] / best["this tree"][name]
            line += f"{row['ratio']:>8.2f}"
        rows.append(row)
        print(line)
    if args.json:
        write_json(args.json, header | {"epochs": args.epochs, "compare": args.compare, "rows": rows})


if __name__ == "__main__":
    main()
