"""Gossip cost per step as a ratio of one forward/backward of the same model.

For ResNet-20 and ResNet-18 parameter shapes, one process hosts `n_workers` workers
on a ring; each algorithm's step over all of them is timed and divided by the number
of workers (the gossip work per worker), then divided by the time of one
forward/backward of one model at batch 128 measured in the same run, on the same
device. Both are medians over repetitions after warm-up.

    python benchmarks/gossip_cost.py                    # CPU or the GPU if there is one
    python benchmarks/gossip_cost.py --quick            # a reduced run (CI keeps it working)
    python benchmarks/gossip_cost.py --device cuda --n-workers 16 --json benchmarks/results/gossip_cost_h100.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from powergossip import algorithms, models, topologies  # noqa: E402
from powergossip import comm as comm_module  # noqa: E402
from benchmarks.timing import run_description, synchronize, write_json  # noqa: E402
from powergossip.models.stacked import StackedReplicas  # noqa: E402

ALGORITHMS = {  # row label: (registered method, hyper-parameters)
    "all-reduce": ("all-reduce", {}),
    "dpsgd": ("dpsgd", {}),
    "power-gossip 1 it.": ("power-gossip", dict(num_iterations=1)),
    "power-gossip 2 it.": ("power-gossip", dict(num_iterations=2)),
    "choco sign": ("choco", dict(compressor="sign-and-norm", diffusion_rate=0.45)),
    "choco top-1%": ("choco", dict(compressor="top-k", keep_ratio=0.01, diffusion_rate=0.04)),
    "deepsqueeze sign": ("deepsqueeze", dict(compressor="sign-and-norm", diffusion_rate=0.01)),
    "moniqua": ("moniqua", dict(theta=0.25, diffusion_rate=0.005)),
    "powersgd rank 2": ("powersgd", dict(rank=2)),  # acts on the gradients (timed on stand-in gradients)
}

WARMUP = 2  # untimed calls before the timed ones


def median_seconds(fn, device, repetitions: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repetitions):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def forward_backward_seconds(architecture, device, batch_size, repetitions, warmup) -> float:
    torch.manual_seed(0)
    model = models.build(architecture).to(device)
    x = torch.randn(batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (batch_size,), device=device)

    def step():
        model.zero_grad(set_to_none=False)
        F.cross_entropy(model(x), y).backward()

    return median_seconds(step, device, repetitions, warmup)


def gossip_seconds(architecture, settings, comm, topology, repetitions, warmup) -> float:
    torch.manual_seed(0)
    workers = StackedReplicas(models.build(architecture), comm.num_local, comm.device)
    generator = torch.Generator(device="cpu").manual_seed(1)
    with torch.no_grad():  # workers disagree, as they do during training
        for p in workers.params:
            p.add_(0.01 * torch.randn(p.shape, generator=generator).to(comm.device))
    method, hyper = settings
    gossip = algorithms.build(method, comm, topology, **hyper)
    on_gradients = algorithms.METHODS[method].acts_on == "gradients"
    if on_gradients:  # gradients differ between workers, as parameters do
        for g in workers.grads:
            g.copy_(torch.randn(g.shape, generator=generator).to(comm.device))
    target = workers.grads if on_gradients else workers.params
    with torch.no_grad():
        return median_seconds(lambda: gossip.step(target), comm.device, repetitions, warmup)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--n-workers", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--architectures", default="resnet20,resnet18")
    parser.add_argument("--repetitions", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="ResNet-20, 4 workers, batch 32, 2 repetitions")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.quick:
        args.n_workers, args.batch_size, args.architectures, args.repetitions = 4, 32, "resnet20", 2
    comm = comm_module.Communicator(args.n_workers, args.device)
    topology = topologies.build("ring", args.n_workers)
    run = run_description(comm.device)
    header = (f"gossip cost per worker / forward-backward of one model (batch {args.batch_size}); "
              f"{args.n_workers}-worker ring in one process; {run['device']}; torch {run['torch']}; {run['date']}")
    print(header)
    results = {"header": header, **run, "n_workers": args.n_workers, "batch_size": args.batch_size, "rows": []}
    for architecture in args.architectures.split(","):
        fb = forward_backward_seconds(architecture, comm.device, args.batch_size, args.repetitions, WARMUP)
        print(f"\n{architecture}: forward/backward {1000 * fb:.2f} ms")
        print(f"{'algorithm':20s} {'gossip ms/worker':>17s} {'ratio':>8s} {'MB/worker/step':>15s}")
        for name, settings in ALGORITHMS.items():
            before = comm.bytes_sent.copy()
            seconds = gossip_seconds(architecture, settings, comm, topology, args.repetitions, WARMUP) / comm.num_local
            steps = args.repetitions + WARMUP
            megabytes = (comm.bytes_sent - before).mean() / steps / 1e6
            print(f"{name:20s} {1000 * seconds:17.3f} {seconds / fb:8.3f} {megabytes:15.3f}")
            results["rows"].append({"architecture": architecture, "algorithm": name, "forward_backward_s": fb,
                                    "gossip_s_per_worker": seconds, "ratio": seconds / fb, "mb_per_worker_per_step": megabytes})
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    main()
