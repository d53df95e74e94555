"""The host's time per training step in train.py's work around the steps, one step at a time
against several steps at once, side by side in one run.

On a GPU train.py's loop is bound by the host: every kernel it launches costs the host a few
microseconds, and while the host launches the device waits. Two parts of each step's work
around the forward/backward and the gossip are taken several steps at once on a GPU:

- `sums and loss check`: the epoch's sums (metrics.EpochTotals, FOLD steps at a time) and the
  loss check (runs.LossCheck, blocks of LAG steps), for 8 workers. One step at a time is the
  same code with a block of one step, read LAG steps later.
- `batches`: the loader's batches (data.WorkerLoader, STEPS_AT_ONCE steps at once) of 8
  workers, batch 128, Fashion-MNIST's image shape, with and without crop and flip; each
  epoch's draws included.

The loop is timed without waiting for the device, which is waited for once at its end: with
these small tensors the time on a GPU is the host's. On a CPU the batches' time is that of
computing them (the --quick form is there to keep the script working). `ratio`: one step at a
time over several at once.

    python benchmarks/host_per_step.py                 # on the GPU if there is one
    python benchmarks/host_per_step.py --quick --device cpu
"""
from __future__ import annotations

import argparse
import os
import sys
import types

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.timing import run_description, seconds_per_call, write_json  # noqa: E402
from powergossip import data, metrics, runs  # noqa: E402

WORKERS = 8


def sums_and_loss_check(device: torch.device, steps: int, at_once: bool):
    """A function that takes `steps` training steps' sums and loss check, one step at a time or
    as train.py does on a GPU."""
    comm = types.SimpleNamespace(device=device, num_local=WORKERS, n_workers=WORKERS, first_worker=0,
                                 sum_over_processes=lambda values: values)
    generator = torch.Generator(device=device).manual_seed(0)
    step_values = [(torch.rand(WORKERS, device=device, generator=generator) + 1.0,
                    torch.randint(0, 128, (WORKERS,), device=device, generator=generator).float(),
                    torch.full((WORKERS,), 128.0, device=device)) for _ in range(64)]

    def run():
        totals = metrics.EpochTotals.zeros(WORKERS, device)
        check = runs.LossCheck(comm, None, max_loss_ratio=100.0, initial_loss=1.5)
        totals.fold_every = metrics.EpochTotals.FOLD if at_once else 1
        check.lag = runs.LossCheck.LAG  # also on the CPU: the GPU's reads
        for step in range(steps):
            losses, corrects, counts = step_values[step % len(step_values)]
            totals.add(losses, corrects, counts)
            check.watch(losses, 0, step)
            if not at_once:
                check._check_block()  # a block of one step, read LAG steps later
        check.finish()
        return totals.loss
    return run


def batches(device: torch.device, steps: int, at_once: bool, augment: bool):
    """A function that makes `steps` steps' batches, one step at a time or as train.py does on a GPU."""
    dataset = data.load("synthetic", device=device, num_train=WORKERS * 128 * 16, num_test=0, in_channels=1,
                        image_size=28, num_classes=10, seed=1)
    partition = data.make_partition("iid", dataset.train_y, WORKERS, seed=2)
    loader = data.WorkerLoader(dataset, partition, batch_size=128, seed=3, augment=augment)
    loader.steps_at_once = data.WorkerLoader.STEPS_AT_ONCE if at_once else 1

    def run():
        made = 0
        for epoch in range(steps // len(loader)):
            for x, _ in loader.epoch_batches(epoch):
                made += 1
        assert made == steps and x.shape[:2] == (WORKERS, 128)
    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=1600, help="steps per timed call (a multiple of 16)")
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="32 steps, 2 repetitions")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.quick:
        args.steps, args.repetitions = 32, 2
    if args.steps % 16:
        parser.error(f"--steps {args.steps}: give a multiple of 16 (the batches' benchmark has 16 steps an epoch)")
    device = torch.device(args.device)
    header = run_description(device)
    print(f"{header['device']}, torch {header['torch']}, {header['date']}; host microseconds per step, "
          f"{args.steps} steps, best of {args.repetitions}")
    items = {"sums and loss check": lambda at_once: sums_and_loss_check(device, args.steps, at_once),
             "batches": lambda at_once: batches(device, args.steps, at_once, augment=False),
             "batches, crop and flip": lambda at_once: batches(device, args.steps, at_once, augment=True)}
    rows = []
    print(f"{'work':<24}{'one step at a time':>20}{'several at once':>18}{'ratio':>8}")
    for name, make in items.items():
        one, several = make(False), make(True)
        times = {"one": [], "several": []}
        for _ in range(args.repetitions):  # side by side, alternating
            times["one"].append(seconds_per_call(one, device, 1, warmup=1))
            times["several"].append(seconds_per_call(several, device, 1, warmup=1))
        one_us, several_us = (1e6 * min(times[key]) / args.steps for key in ("one", "several"))
        rows.append({"work": name, "one_step_us": one_us, "several_steps_us": several_us, "ratio": one_us / several_us})
        print(f"{name:<24}{one_us:>20.1f}{several_us:>18.1f}{one_us / several_us:>8.2f}")
    if args.json:
        write_json(args.json, header | {"steps": args.steps, "rows": rows})


if __name__ == "__main__":
    main()
