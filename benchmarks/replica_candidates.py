"""Issue 16, target 2: candidates for a ResNet-18 step of 16 workers nearer the ceiling, each
measured alone against what it would replace, side by side in one run.

- `compile`: the 16 workers' forward/backward in the graph layout (bf16 autocast, channels_last,
  8 streams, as train.py runs it) with each replica's forward compiled by torch.compile (its
  kernels recorded into the graph) against eager replicas, and the ceiling (one model at batch
  16 x 128) compiled against eager.
- `grouped`: every convolution of the model forward in bf16 channels_last, as the graph layout
  runs it (16 convolutions at batch 128 one after the other), as one grouped convolution over
  the 16 replicas (groups = 16: each replica its own weights), and as one convolution at
  batch 2,048 (the ceiling's), summed over the model's convolutions.

    python benchmarks/replica_candidates.py --architecture resnet18 --json out.json
"""
import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from powergossip import models  # noqa: E402
from benchmarks.timing import run_description, seconds_per_call, write_json  # noqa: E402
from powergossip.models.stacked import StackedReplicas, loss_and_correct  # noqa: E402


def training_step(model, x, y, dtype):
    """One forward/backward as the graph layout runs a replica's (autocast, channels_last input)."""
    def step():
        model.zero_grad(set_to_none=True)
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype != torch.float32):
            loss, _ = loss_and_correct(model(x), y)
        loss.backward()
    return step


def compile_rows(architecture, n_workers, batch_size, device, dtype, repetitions, streams: int) -> list[dict]:
    """The workers' forward/backward in the graph layout (train.py's, `streams` streams) with eager
    replicas and with each replica's forward compiled, and the ceiling eager and compiled."""
    rows = []
    for compiled in (False, True):
        torch.manual_seed(0)
        workers = StackedReplicas(models.build(architecture), n_workers, device, compute="graph", graph_streams=streams,
                                  autocast_dtype=dtype, compile_replicas=compiled)
        x = torch.randn(n_workers, batch_size, 3, 32, 32, device=device)
        y = torch.randint(0, 10, (n_workers, batch_size), device=device)
        seconds = seconds_per_call(lambda: workers.gradients(x, y), device, repetitions)
        rows.append({"candidate": "compile", "what": f"graph layout, {streams} streams", "compiled": compiled,
                     "images_per_s": n_workers * batch_size / seconds})
    batch = n_workers * batch_size
    x = torch.randn(batch, 3, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,), device=device)
    model = models.build(architecture).to(device, memory_format=torch.channels_last)
    for compiled in (False, True):
        seconds = seconds_per_call(training_step(torch.compile(model) if compiled else model, x, y, dtype), device, repetitions,
                                   warmup=5)
        rows.append({"candidate": "compile", "what": "ceiling", "compiled": compiled, "images_per_s": batch / seconds})
    return rows


def convolution_inputs(model: nn.Module, batch_size: int, device) -> list[tuple[nn.Conv2d, tuple]]:
    """Every convolution of the model with the shape of its input at `batch_size`."""
    seen = []
    hooks = [m.register_forward_hook(lambda module, inputs, output: seen.append((module, tuple(inputs[0].shape))))
             for m in model.modules() if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(batch_size, 3, 32, 32, device=device))
    for hook in hooks:
        hook.remove()
    return seen


def grouped_rows(architecture, n_workers, batch_size, device, dtype, repetitions) -> list[dict]:
    model = models.build(architecture).to(device)
    channels_last = lambda t: t.contiguous(memory_format=torch.channels_last)
    totals = {"one after the other": 0.0, "grouped": 0.0, "one batch": 0.0}
    for conv, shape in convolution_inputs(model, batch_size, device):
        _, c, h, w = shape
        options = dict(stride=conv.stride, padding=conv.padding)
        weights = [channels_last(torch.randn_like(conv.weight, dtype=dtype)) for _ in range(n_workers)]
        inputs = [channels_last(torch.randn(batch_size, c, h, w, device=device, dtype=dtype)) for _ in range(n_workers)]
        grouped_weight = channels_last(torch.cat(weights))
        grouped_input = channels_last(torch.cat(inputs, dim=1))  # [B, L * C, H, W]: replica l's channels l*C .. (l+1)*C-1
        one_batch = channels_last(torch.cat(inputs))  # [L * B, C, H, W]
        calls = {
            "one after the other": lambda: [torch.nn.functional.conv2d(i, wt, **options) for i, wt in zip(inputs, weights)],
            "grouped": lambda: torch.nn.functional.conv2d(grouped_input, grouped_weight, groups=n_workers, **options),
            "one batch": lambda: torch.nn.functional.conv2d(one_batch, weights[0], **options),
        }
        for name, call in calls.items():
            with torch.no_grad():
                totals[name] += seconds_per_call(call, device, repetitions)
    images = n_workers * batch_size
    return [{"candidate": "grouped", "what": name, "forward_images_per_s": images / seconds,
             "over_one_after_the_other": totals["one after the other"] / seconds} for name, seconds in totals.items()]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--architecture", default="resnet18")
    parser.add_argument("--n-workers", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repetitions", type=int, default=20)
    parser.add_argument("--graph-streams", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="ResNet-20, 2 workers, batch 4, 2 repetitions, float32 (CPU)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.quick:
        args.architecture, args.n_workers, args.batch_size, args.repetitions = "resnet20", 2, 4, 2
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # CPU convolutions in bf16 are not what is measured
    description = run_description(device) | {"architecture": args.architecture, "n_workers": args.n_workers,
                                             "batch_size": args.batch_size, "dtype": str(dtype)}
    print(f"replica candidates: {args.architecture}, {args.n_workers} workers x batch {args.batch_size}, {dtype}; "
          f"{description['device']}; torch {description['torch']}; {description['date']}")
    rows = []
    if device.type == "cuda":  # the graph layout is CUDA's; torch.compile needs a C++ compiler on a CPU (CI has none)
        rows = compile_rows(args.architecture, args.n_workers, args.batch_size, device, dtype, args.repetitions, args.graph_streams)
    else:
        print("compile: the graph layout and torch.compile are measured on a GPU only")
    eager = {row["what"]: row["images_per_s"] for row in rows if not row["compiled"]}
    for row in rows:
        print(f"compile  {row['what']:24} {'compiled' if row['compiled'] else 'eager':8}: {row['images_per_s']:,.0f} images/s, "
              f"ratio {row['images_per_s'] / eager[row['what']]:.3f} of eager, {row['images_per_s'] / eager['ceiling']:.3f} of the eager ceiling")
    grouped = grouped_rows(args.architecture, args.n_workers, args.batch_size, device, dtype, args.repetitions)
    for row in grouped:
        print(f"grouped  {row['what']:20}: convolutions forward {row['forward_images_per_s']:,.0f} images/s, "
              f"ratio {row['over_one_after_the_other']:.3f} of one after the other")
    if args.json:
        write_json(args.json, description | {"rows": rows + grouped})


if __name__ == "__main__":
    main()
