"""Where PowerGossip with 2 iterations spends a ResNet-18 training step (16 workers, graph layout, bf16)."""
import sys, time, torch
sys.path.insert(0, ".")
from torch.profiler import profile, ProfilerActivity
from powergossip import models, topologies, comm as comm_module
from powergossip.models.stacked import StackedReplicas
from powergossip.step import nesterov_sgd_step, weight_decays
from benchmarks.simulation_efficiency import build_method

comm = comm_module.Communicator(16, "cuda")
torch.manual_seed(0)
template = models.build("resnet18")
workers = StackedReplicas(template, 16, comm.device, compute="graph", graph_streams=8, autocast_dtype=torch.bfloat16)
momenta = [torch.zeros_like(p) for p in workers.params]
decays = weight_decays(template, workers.parameter_names, 1e-4)
x = torch.randn(16, 128, 3, 32, 32, device="cuda"); y = torch.randint(0, 10, (16, 128), device="cuda")
for name in ["no-gossip", "power-gossip", "power-gossip-2"]:
    gossip = build_method(name, comm, topologies.build("ring", 16))
    def step():
        workers.gradients(x, y)
        if gossip is not None:
            gossip.step(workers.params)
        nesterov_sgd_step(workers.params, workers.grads, momenta, 0.01, 0.9, decays)
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter(); cpu = []
    for _ in range(10):
        a = time.perf_counter(); workers.gradients(x, y); b = time.perf_counter()
        if gossip is not None: gossip.step(workers.params)
        c = time.perf_counter(); nesterov_sgd_step(workers.params, workers.grads, momenta, 0.01, 0.9, decays); d = time.perf_counter()
        cpu.append((b - a, c - b, d - c))
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / 10 * 1e3
    mean = [sum(v[i] for v in cpu) / len(cpu) * 1e3 for i in range(3)]
    print(f"{name}: {wall:.2f} ms a step; host time in gradients {mean[0]:.2f}, gossip {mean[1]:.2f}, nesterov {mean[2]:.2f} ms", flush=True)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    events = prof.key_averages()
    syncs = [e for e in events if "Synchronize" in e.key or "Memcpy" in e.key or "cudaStreamWait" in e.key]
    for e in syncs:
        print(f"   {e.key}: {e.count} calls, {e.cpu_time_total / 1e3:.2f} ms host")
    print(events.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))
