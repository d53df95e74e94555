"""What train.py's steps run beside the benchmark's (call 26): torch.profiler over epochs 3 and 4 (116 steps) of the
full-budget Moniqua run (its committed config.yaml) and over 116 steps of benchmarks/simulation_efficiency.simulation
in the same layout; writes OUT/profile_train.txt and OUT/profile_bench.txt, sorted by device time. On a GPU, from the
repository root, with Fashion-MNIST's files where the configuration's data_dir says:

    python experiments/results/full_budget/device/profile_steps.py OUT"""
import os, sys
import torch
from torch.profiler import ProfilerActivity, profile
sys.path.insert(0, os.getcwd()); sys.path.insert(0, os.path.join(os.getcwd(), "benchmarks"))
from powergossip import train, metrics
import simulation_efficiency as bench

out = sys.argv[1]; os.makedirs(out, exist_ok=True)
def write(prof, name):
    with open(f"{out}/{name}.txt", "w") as f:
        f.write(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=60, max_name_column_width=90))
        f.write("\n\nby host time\n")
        f.write(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=90))
prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
original_end = metrics.end_of_epoch
def end_of_epoch(cfg, epoch, *a, **k):
    if epoch == 4:
        torch.cuda.synchronize(); prof.stop()
    out_ = original_end(cfg, epoch, *a, **k)
    if epoch == 2:
        torch.cuda.synchronize(); prof.start()
    return out_
metrics.end_of_epoch = end_of_epoch
train.command_line(["experiments/results/full_budget/runs/ring8_moniqua_seed2/config.yaml", "num_epochs=6", f"output_dir={out}/run", "overwrite=true", "checkpoint_every=0"])
write(prof, "profile_train")
with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
    rate, _ = bench.simulation("resnet20", 8, 128, "moniqua", "bfloat16", "graph", 8, torch.device("cuda"), 116, image_shape=(1, 28, 28))
write(p, "profile_bench")
print("benchmark images/s under the profiler", rate)
