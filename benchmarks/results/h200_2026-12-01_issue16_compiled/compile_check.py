"""How many graphs and recompiles torch.compile makes for 16 compiled replicas in the graph layout."""
import sys, torch
sys.path.insert(0, ".")
from powergossip import models
from powergossip.models.stacked import StackedReplicas
import torch._dynamo.utils as u
torch.manual_seed(0)
w = StackedReplicas(models.build("resnet18"), 16, torch.device("cuda"), "graph", torch.bfloat16, 8, compile_replicas=True)
x = torch.randn(16, 128, 3, 32, 32, device="cuda"); y = torch.randint(0, 10, (16, 128), device="cuda")
w.gradients(x, y); w.gradients(x, y); torch.cuda.synchronize()
print("dynamo stats:", dict(u.counters["stats"]), "recompiles:", dict(u.counters.get("recompiles", {})))
print("frames:", {k: v for k, v in u.counters["frames"].items()})
print("cache_size_limit", torch._dynamo.config.cache_size_limit)
