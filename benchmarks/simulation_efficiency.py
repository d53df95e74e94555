"""Many workers in one process: training throughput as a fraction of the single-model ceiling.

The ceiling is one model trained at the combined batch (n_workers x batch) with bf16
autocast and channels_last and no communication. The simulation is train.py's step:
n_workers replicas (models.stacked.StackedReplicas) each doing forward/backward on its
own batch, then the gossip and the Nesterov-SGD step on the stacks. Both are timed in
the same run on the same device; throughput is images per second; the ratio is
simulation / ceiling. Peak GPU memory is reported for each, counted from the row's start (start_row).

    python benchmarks/simulation_efficiency.py                         # ResNet-20, 16 workers
    python benchmarks/simulation_efficiency.py --architectures resnet20,resnet18 --optimizers power-gossip,dpsgd,choco
    python benchmarks/simulation_efficiency.py --quick                 # reduced run for CPU (CI)
    python benchmarks/simulation_efficiency.py --n-workers 8 --image-shape 1,28,28   # Fashion-MNIST's images (train.py's)
    mpirun -np 16 python benchmarks/simulation_efficiency.py --no-ceiling --dtypes float32   # processes sharing a GPU
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from powergossip import algorithms, models, topologies  # noqa: E402
from powergossip import comm as comm_module  # noqa: E402
from powergossip import launch  # noqa: E402
from benchmarks.timing import run_description, seconds_per_call, write_json  # noqa: E402
from powergossip.models.stacked import StackedReplicas  # noqa: E402
from powergossip.step import nesterov_sgd_step, weight_decays  # noqa: E402

CHOCO = ("choco", dict(compressor="sign-and-norm", diffusion_rate=0.45))
GOSSIP = {  # name: (registered method, hyper-parameters[, attributes set after building]); None: no gossip (the baseline)
    "no-gossip": None,
    "power-gossip": ("power-gossip", {}),
    "power-gossip-2": ("power-gossip", dict(num_iterations=2)),
    "dpsgd": ("dpsgd", {}),
    "choco": CHOCO,
    # Choco as across processes: the neighbours' payloads decompressed as received (the comparison
    # for the in-process mixing the other compressed rows use)
    "choco-exchanged": CHOCO + (dict(in_process_mixing=False),),
    "deepsqueeze": ("deepsqueeze", dict(compressor="sign-and-norm", diffusion_rate=0.01)),
    "moniqua": ("moniqua", dict(theta=0.25, diffusion_rate=0.005)),
}
# Each method with fused kernels (kernels.py, on a GPU) also without them: the plain torch round
UNFUSED = dict(fused_kernels=False)
GOSSIP |= {f"{name}-unfused": GOSSIP[name] + (UNFUSED,) for name in ("power-gossip", "power-gossip-2", "choco", "deepsqueeze", "moniqua")}


def build_method(name: str, comm, topology):
    """GOSSIP[name] built on `topology` (None for no-gossip)."""
    if GOSSIP[name] is None:
        return None
    method, hyper, *attributes = GOSSIP[name]
    gossip = algorithms.build(method, comm, topology, **hyper)
    for key, value in (attributes[0] if attributes else {}).items():
        setattr(gossip, key, value)
    return gossip


def images_per_second(step, images_per_step, device, steps, warmup=3) -> float:
    return images_per_step / seconds_per_call(step, device, steps, warmup)


def start_row(device) -> float:
    """Free what earlier rows left and restart the peak; returns the GB still allocated after that.

    An earlier row's replicas (modules, CUDA graphs) can sit in reference cycles that only
    the collector frees; without gc.collect() they stayed allocated and a row's peak counted
    them. Rows stay in one process, not one each, so that the script also runs under mpirun
    and every row shares the ceiling's CUDA context; what is still allocated after the
    collection (nothing of this row's) is subtracted from the row's peak."""
    gc.collect()
    if device.type != "cuda":
        return 0.0
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device) / 2**30


def peak_memory_gb(device, leftover_gb: float) -> float:
    """The row's own peak: the peak since start_row, less what was allocated before the row."""
    return torch.cuda.max_memory_allocated(device) / 2**30 - leftover_gb if device.type == "cuda" else float("nan")


def build_model(architecture, image_shape):
    """The model train.py builds for images of `image_shape` (channels, height, width)."""
    return models.build(architecture, in_channels=image_shape[0], image_size=image_shape[1])


def ceiling(architecture, batch, device, steps, image_shape=(3, 32, 32)) -> tuple[float, float]:
    """One model at the combined batch, bf16 autocast, channels_last, SGD; no communication."""
    leftover = start_row(device)
    torch.manual_seed(0)
    model = build_model(architecture, image_shape).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=1e-4)
    x = torch.randn(batch, *image_shape, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    return images_per_second(step, batch, device, steps), peak_memory_gb(device, leftover)


def simulation(architecture, n_workers, batch, optimizer, dtype, compute, streams, device, steps,
               topology="ring", image_shape=(3, 32, 32)) -> tuple[float, float]:
    """train.py's step over n_workers stacked replicas in one process, gossip included
    (compute "graph-compiled": the graph layout with compile_replicas)."""
    leftover = start_row(device)
    comm = comm_module.Communicator(n_workers, device)
    torch.manual_seed(0)
    template = build_model(architecture, image_shape)
    workers = StackedReplicas(template, comm.num_local, comm.device, compute=compute.removesuffix("-compiled"),
                              graph_streams=streams, autocast_dtype=torch.bfloat16 if dtype == "bfloat16" else None,
                              compile_replicas=compute == "graph-compiled")
    gossip = build_method(optimizer, comm, topologies.build(topology, n_workers))
    momenta = [torch.zeros_like(p) for p in workers.params]
    decays = weight_decays(template, workers.parameter_names, 1e-4)
    x = torch.randn(comm.num_local, batch, *image_shape, device=comm.device)
    y = torch.randint(0, 10, (comm.num_local, batch), device=comm.device)

    def step():  # train.py's step: the gradient at x_t, the gossip, the local step
        workers.gradients(x, y)
        if gossip is not None:
            gossip.step(workers.params)
        nesterov_sgd_step(workers.params, workers.grads, momenta, 0.01, 0.9, decays)

    return images_per_second(step, n_workers * batch, comm.device, steps), peak_memory_gb(comm.device, leftover)  # all processes' images


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--n-workers", type=int, help="default 16 (--quick: 2)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--architectures", default="resnet20")
    parser.add_argument("--optimizers", default="no-gossip,power-gossip",
                        help=f"from {', '.join(GOSSIP)}; no-gossip first gives each the time its gossip adds")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--computes", default="loop,vmap,graph", help="train.py's stacked_compute values to compare "
                        "(graph: CUDA only, skipped elsewhere; graph-compiled: graph with compile_replicas)")
    parser.add_argument("--graph-streams", default="4", help="graph_streams values to compare (stacked_compute=graph)")
    parser.add_argument("--topology", default="ring", help="the gossip graph (topologies.build's names)")
    parser.add_argument("--cudnn-benchmark", action="store_true", help="let cuDNN time its algorithms for each shape first")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--image-shape", type=lambda text: tuple(int(n) for n in text.split(",")), default=(3, 32, 32),
                        help="channels,height,width of the images (default CIFAR's 3,32,32; Fashion-MNIST's 1,28,28)")
    parser.add_argument("--quick", action="store_true", help="CPU: ResNet-20, 2 workers (or --n-workers) x 8 images, 2 steps")
    parser.add_argument("--no-ceiling", action="store_true", help="skip the single-model ceiling (under mpirun)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    if args.quick:
        args.batch_size, args.steps, args.dtypes = 8, 2, "float32"
    args.n_workers = args.n_workers or (2 if args.quick else 16)
    torch.backends.cudnn.benchmark = args.cudnn_benchmark
    context = launch.init_distributed(args.device)
    device = context.device
    say = print if context.process_index == 0 else (lambda *a, **k: None)
    run = run_description(device)
    say(f"{context.world_size} process(es), backend {context.backend}")
    say(f"simulation efficiency: {args.n_workers} workers x batch {args.batch_size} in one process vs one model at "
        f"batch {args.n_workers * args.batch_size} (bf16, channels_last); images {args.image_shape}; {args.topology}"
        f"{'; cudnn.benchmark' if args.cudnn_benchmark else ''}; {run['device']}; torch {run['torch']}; {run['date']}")
    rows = []
    for architecture in args.architectures.split(","):
        top, top_memory = (float("nan"), float("nan")) if args.no_ceiling else \
            ceiling(architecture, args.n_workers * args.batch_size, device, args.steps, args.image_shape)
        say(f"\n{architecture}: ceiling {top:,.0f} images/s (peak {top_memory:.1f} GB)")
        say(f"{'optimizer':14s} {'compute':10s} {'dtype':9s} {'images/s':>10s} {'ratio':>7s} {'gossip':>7s} {'peak GB':>8s}")
        layouts = [(compute, streams) for compute in args.computes.split(",")
                   for streams in ([int(s) for s in args.graph_streams.split(",")] if compute.startswith("graph") else [1])]
        for compute, streams in layouts:
            for dtype in args.dtypes.split(","):
                if (compute == "vmap" and dtype != "float32") or (compute.startswith("graph") and device.type != "cuda"):
                    continue  # train.py refuses these (see stacked_compute)
                label = {"graph": f"graph/{streams}", "graph-compiled": f"graph/{streams}+c"}.get(compute, compute)
                baseline = float("nan")  # the no-gossip rate of this layout, when measured first
                for optimizer in args.optimizers.split(","):
                    try:
                        rate, memory = simulation(architecture, args.n_workers, args.batch_size, optimizer, dtype, compute,
                                                  streams, device, args.steps, args.topology, args.image_shape)
                    except RuntimeError as failure:  # report and go on (e.g. a dtype a kernel lacks)
                        say(f"{optimizer:14s} {label:10s} {dtype:9s} failed: {str(failure).splitlines()[0][:80]}")
                        continue
                    if optimizer == "no-gossip":
                        baseline = rate
                    overhead = baseline / rate - 1  # time the gossip adds to the step without it
                    say(f"{optimizer:14s} {label:10s} {dtype:9s} {rate:10,.0f} {rate / top:7.3f} {overhead:7.1%} {memory:8.1f}")
                    rows.append({"architecture": architecture, "optimizer": optimizer, "compute": compute, "dtype": dtype,
                                 "graph_streams": streams if compute.startswith("graph") else None,
                                 "images_per_s": rate, "ceiling_images_per_s": top, "ratio": rate / top,
                                 "gossip_overhead": overhead, "peak_gb": memory, "ceiling_peak_gb": top_memory})
    if args.json and context.process_index == 0:
        write_json(args.json, run | {"n_workers": args.n_workers, "batch_size": args.batch_size, "topology": args.topology,
                                     "image_shape": list(args.image_shape),
                                     "cudnn_benchmark": args.cudnn_benchmark, "rows": rows})


if __name__ == "__main__":
    main()
