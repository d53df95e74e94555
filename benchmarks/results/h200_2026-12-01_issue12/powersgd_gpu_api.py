# PowerSGD's reference interface and the drop-in with algorithm="powersgd", model on the GPU,
# one worker per process (run under mpirun -np 2 on a 1-GPU machine: Gloo, staged through the host).
import torch
import torch.nn.functional as F
import powergossip

for interface in ("reference", "drop-in"):
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = torch.nn.Sequential(torch.nn.Linear(20, 64), torch.nn.ReLU(), torch.nn.Linear(64, 2)).to(device)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if interface == "reference":
        powersgd = powergossip.PowerSGD(model.parameters(), config=powergossip.Config(rank=1, start_compressing_after_num_steps=10))
    else:
        powersgd = powergossip.DecentralizedOptimizer(sgd, model, algorithm="powersgd", rank=1)
    worker = powersgd.comm.rank
    data = torch.Generator().manual_seed(worker)
    for step in range(100):
        x = torch.randn(32, 20, generator=data).to(device)
        y = (x[:, 0] > 0).long()
        loss = F.cross_entropy(model(x), y)
        if interface == "reference":
            loss.backward()
            powergossip.optimizer_step(sgd, powersgd)
        else:
            powersgd.zero_grad()
            loss.backward()
            powersgd.step()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    print(f"RESULT {interface} worker {worker}: loss {loss.item():.3f}, {powersgd.bytes_sent / 1e3:.1f} kB sent, "
          f"device {flat.device}, parameter checksum {flat.double().sum().item():.6f}", flush=True)
