import sys, torch
sys.path.insert(0, ".")
from powergossip import models
from powergossip.models.stacked import StackedReplicas
from powergossip.step import nesterov_sgd_step
torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.deterministic = True
rel = lambda a, b: ((a - b).norm() / b.norm().clamp_min(1e-12)).item()
torch.manual_seed(0)
template = models.build("resnet20")
device = torch.device("cuda")
eager = StackedReplicas(template, 4, device, "graph", graph_streams=2)
compiled = StackedReplicas(template, 4, device, "graph", graph_streams=2, compile_replicas=True)
momenta = {id(w): [torch.zeros_like(p) for p in w.params] for w in (eager, compiled)}
decays = [1e-4] * len(eager.params)
g = torch.Generator(device="cuda").manual_seed(1)
for step in range(3):
    x = torch.randn(4, 32, 3, 32, 32, device="cuda", generator=g); y = torch.randint(0, 10, (4, 32), device="cuda", generator=g)
    lc, le = compiled.gradients(x, y)[0], eager.gradients(x, y)[0]
    print(step, "loss rel", ((lc - le).abs() / le.abs()).max().item())
    print("  grads max rel", max(rel(a[r], b[r]) for a, b in zip(compiled.grads, eager.grads) for r in range(4)),
          "median", sorted(rel(a[r], b[r]) for a, b in zip(compiled.grads, eager.grads) for r in range(4))[len(eager.grads) * 2])
    fl = [(rel(a, b), n) for a, b, n in zip(compiled.buffers, eager.buffers, eager.buffer_names) if b.is_floating_point()]
    print("  buffers max rel", max(fl), "ints equal", all(torch.equal(a, b) for a, b in zip(compiled.buffers, eager.buffers) if not b.is_floating_point()))
    print("  ints", [ (a.flatten()[:2].tolist(), b.flatten()[:2].tolist()) for a, b in zip(compiled.buffers, eager.buffers) if not b.is_floating_point()][:2])
    for w in (eager, compiled):
        nesterov_sgd_step(w.params, w.grads, momenta[id(w)], 0.1, 0.9, decays)
print("params max rel", max(rel(a, b) for a, b in zip(compiled.params, eager.params)))
