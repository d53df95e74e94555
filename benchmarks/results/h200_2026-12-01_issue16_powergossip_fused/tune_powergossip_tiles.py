"""Each PowerGossip kernel alone on ResNet-18's matrices (16 workers, ring), against the torch half-step; tile shapes tried."""
import sys, time, itertools, torch
sys.path.insert(0, ".")
from powergossip import algorithms, kernels, models, topologies, comm as comm_module
from powergossip.models import stacked

def timed(fn, reps=20):
    fn(); torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record(); torch.cuda.synchronize()
    return start.elapsed_time(end) / reps

L = 16
comm = comm_module.Communicator(L, "cuda")
template = models.build("resnet18")
params = stacked.in_one_buffer([p.detach().to("cuda").unsqueeze(0).repeat(L, *[1] * p.dim()) + 0.01 * torch.randn((L,) + p.shape, device="cuda") for p in template.parameters()])
mats = [p for p in params if p.dim() > 2]
print("model MB (fp32, 16 workers):", sum(p.numel() for p in mats) * 4 / 1e6)
ring = topologies.build("ring", L)
for fused in (False, True):
    method = algorithms.build("power-gossip", comm, ring)
    method.fused_kernels = fused
    for _ in range(3):
        method.step(params)
    print(f"PG step (one half-step + vectors), fused={fused}: {timed(lambda: method.step(params)):.3f} ms")
pg = method.compressed
edges = comm.half_edges(ring)
x, offsets = kernels.in_one_storage(mats)
H = edges.num
bytes_x = sum(p.numel() for p in mats) * 4
def build(**attrs):
    cls = type("Tuned", (kernels.MatrixLayout,), attrs)
    return cls(pg.groups, offsets, x.device)
base = build()
P = torch.randn(H, base.p_width, device="cuda"); Q = torch.randn(H, base.q_width, device="cuda")
w = torch.randn(H, device="cuda") * 1e-3
print(f"orthogonalize P {timed(lambda: kernels.orthogonalize_(base, P, True)):.3f} ms, Q {timed(lambda: kernels.orthogonalize_(base, Q, False)):.3f} ms")
print(f"cat of factors: {timed(lambda: torch.cat([p.reshape(H, -1) for p in pg.q], 1)):.3f} ms")
results = {}
for cols, summed, warps in itertools.product((64, 128, 256), (8, 16, 32), (4, 8)):
    lay = build(COLUMNS=cols, SUMMED=summed, WARPS=warps)
    t = timed(lambda: kernels.factor_products(lay, x, P, edges.first_edge, edges.max_degree, True))
    print(f"X^T P  COLUMNS={cols} SUMMED={summed} WARPS={warps}: {t:.3f} ms = {bytes_x / t / 1e6:.0f} GB/s", flush=True)
for rows, summed, warps in itertools.product((4, 8, 16, 32), (64, 128, 256), (4, 8)):
    lay = build(ROWS=rows, SUMMED=summed, WARPS=warps)
    t = timed(lambda: kernels.factor_products(lay, x, Q, edges.first_edge, edges.max_degree, False))
    print(f"X Q    ROWS={rows} SUMMED={summed} WARPS={warps}: {t:.3f} ms = {bytes_x / t / 1e6:.0f} GB/s", flush=True)
for update, warps in itertools.product(((16, 64), (32, 64), (64, 64), (16, 128), (32, 128), (8, 256), (16, 256)), (4, 8)):
    lay = build(UPDATE=update, WARPS=warps)
    t = timed(lambda: kernels.low_rank_update(lay, x, P, Q, w, edges.first_edge, edges.max_degree))
    print(f"update UPDATE={update} WARPS={warps}: {t:.3f} ms = {2 * bytes_x / t / 1e6:.0f} GB/s", flush=True)
# torch's per-matrix products for comparison
def torch_left():
    for k in mats:
        mv = k.view(L, k.shape[1], -1)
        torch.bmm(mv.transpose(1, 2), torch.ones(L, mv.shape[1], 2, device="cuda"))
def torch_right():
    for k in mats:
        mv = k.view(L, k.shape[1], -1)
        torch.bmm(mv, torch.ones(L, mv.shape[2], 2, device="cuda"))
def torch_update():
    for k in mats:
        mv = k.view(L, k.shape[1], -1)
        mv.baddbmm_(torch.full((L, mv.shape[1], 2), 1e-6, device="cuda"), torch.ones(L, 2, mv.shape[2], device="cuda"))
for name, fn in (("torch bmm X^T P", torch_left), ("torch bmm X Q", torch_right), ("torch baddbmm update", torch_update)):
    t = timed(fn)
    print(f"{name} (with a factor allocation per matrix): {t:.3f} ms = {bytes_x * (2 if 'update' in name else 1) / t / 1e6:.0f} GB/s")
