"""Where the step of 64 ResNet-20 workers x batch 32 (and 256 x 8) goes without gossip, graph layout
over 32 streams, bf16, eager and compiled replicas, against the ceiling: kernels a step, their summed
GPU time and the step's wall time (profiled over 3 steps)."""
import sys, time, torch
sys.path.insert(0, ".")
from torch.profiler import profile, ProfilerActivity
from powergossip import models
from powergossip.models.stacked import StackedReplicas, loss_and_correct

def measure(name, step, images):
    for _ in range(5):
        step()
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(10):
        step()
    torch.cuda.synchronize(); wall = (time.perf_counter() - t) / 10
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    total = sum(e.device_time for e in kernels) / 3 / 1e3  # ms per step, summed over streams
    count = len(kernels) / 3
    print(f"{name}: {images / wall:,.0f} images/s, wall {wall * 1e3:.2f} ms a step; {count:,.0f} kernels a step, "
          f"summed GPU time {total:.2f} ms ({total / (wall * 1e3):.2f} x the wall), mean kernel {total / count * 1e3:.1f} us", flush=True)

x1 = torch.randn(2048, 3, 32, 32, device="cuda").contiguous(memory_format=torch.channels_last)
y1 = torch.randint(0, 10, (2048,), device="cuda")
model = models.build("resnet20").cuda().to(memory_format=torch.channels_last)
def ceiling():
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = loss_and_correct(model(x1), y1)
    loss.backward()
measure("ceiling, one model at batch 2048", ceiling, 2048)
for workers, batch in ((64, 32), (256, 8)):
    for compiled in (False, True):
        torch.manual_seed(0)
        w = StackedReplicas(models.build("resnet20"), workers, torch.device("cuda"), "graph", torch.bfloat16, 32, compile_replicas=compiled)
        x = torch.randn(workers, batch, 3, 32, 32, device="cuda"); y = torch.randint(0, 10, (workers, batch), device="cuda")
        measure(f"{workers} x {batch}, graph/32{' compiled' if compiled else ''}", lambda: w.gradients(x, y), workers * batch)
