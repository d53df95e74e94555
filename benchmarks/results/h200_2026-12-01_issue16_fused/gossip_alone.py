"""Time one gossip step alone (synchronized) on ResNet-18's parameters x 16 workers."""
import sys, time, torch
sys.path.insert(0, ".")
from powergossip import algorithms, kernels, models, topologies, comm as comm_module
from powergossip.models.stacked import StackedReplicas
from benchmarks.simulation_efficiency import build_method

comm = comm_module.Communicator(16, "cuda")
workers = StackedReplicas(models.build("resnet18"), 16, comm.device, compute="loop")
with torch.no_grad():
    for p in workers.params:
        p.add_(0.01 * torch.randn_like(p))
topology = topologies.build("ring", 16)

def timed(name, steps=20):
    gossip = build_method(name, comm, topology)
    for _ in range(3):
        gossip.step(workers.params)
    torch.cuda.synchronize(); start = time.perf_counter()
    for _ in range(steps):
        gossip.step(workers.params)
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps * 1e3, gossip

for name in ["dpsgd", "power-gossip", "power-gossip-2", "choco-unfused", "choco", "deepsqueeze-unfused", "deepsqueeze", "moniqua-unfused", "moniqua"]:
    print(f"{name:22s} {timed(name)[0]:7.2f} ms", flush=True)
from torch.profiler import profile, ProfilerActivity
for name in ["choco", "moniqua", "power-gossip-2"]:
    gossip = timed(name, 1)[1]
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            gossip.step(workers.params)
        torch.cuda.synchronize()
    print(name, prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70))
