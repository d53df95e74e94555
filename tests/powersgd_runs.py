"""PowerSGD beside a peer no one here wrote: PyTorch's DDP with its powerSGD_hook, and this
project's `powergossip.PowerSGD` with `optimizer_step`, on the same small model and data.

    mpirun -np 2 python tests/powersgd_runs.py OUT SEEDS

writes OUT/rank<r>.pt: per step, the loss of this worker's batch and the number of entries
each side sent in that step (the hook: its own count of what it compressed and sent whole;
ours: bytes_sent / 4, and our final parameters), for the hook, for DDP's exact average
("exact"), and for our PowerSGD with each seed of SEEDS (the seed draws Q's first value;
nothing else differs between those runs).
"""
import json
import os
import sys

# PyTorch's hook synchronizes "the device" whenever CUDA is available, which fails for the
# CPU tensors of this Gloo run on a GPU machine: the comparison is on CPU, so hide the GPUs.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import powergossip  # noqa: E402
from powergossip import launch  # noqa: E402

STEPS, START, RANK, MIN_RATE, LR = 150, 2, 1, 2.0, 0.1
IN, HIDDEN, CLASSES, BATCH = 20, 32, 2, 32


def model() -> torch.nn.Module:
    """Two matrices worth compressing (32 x 20, 32 x 32), one that is not (2 x 32: rank-1
    factors would send 68 of its 64 entries), and three biases."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(IN, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU(),
                               torch.nn.Linear(HIDDEN, CLASSES))


def batch(worker: int, step: int):
    """This worker's batch: a learnable rule (is the sum of the first five features positive?),
    with worker-specific inputs."""
    generator = torch.Generator().manual_seed(10_000 * worker + step)
    x = torch.randn(BATCH, IN, generator=generator) + 0.3 * worker
    return x, (x[:, :5].sum(dim=1) > 1.5 * worker).long()


def with_hook(worker: int, compress: bool = True):
    """DDP with PyTorch's powerSGD_hook (without it, compress=False: DDP's exact average)."""
    net = model()
    ddp = DistributedDataParallel(net)
    state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=RANK, start_powerSGD_iter=START,
                                        min_compression_rate=MIN_RATE, use_error_feedback=True, warm_start=True)
    if compress:
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    losses, sent = [], []
    for step in range(STEPS):
        optimizer.zero_grad()
        x, y = batch(worker, step)
        loss = F.cross_entropy(ddp(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        sent.append(state.total_numel_after_compression)
    return losses, [b - a for a, b in zip([0] + sent, sent)]


def ours(worker: int, seed: int):
    net = model()
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    config = powergossip.Config(rank=RANK, min_compression_rate=MIN_RATE, num_iters_per_step=1,
                                start_compressing_after_num_steps=START)
    powersgd = powergossip.PowerSGD(net.parameters(), config=config, seed=seed)
    losses, sent = [], []
    for step in range(STEPS):
        x, y = batch(worker, step)
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        before = powersgd.bytes_sent
        powergossip.optimizer_step(optimizer, powersgd)
        losses.append(loss.item())
        sent.append((powersgd.bytes_sent - before) // 4)
    return losses, sent, torch.cat([p.detach().flatten() for p in net.parameters()])


if __name__ == "__main__":
    out, seeds = sys.argv[1], json.loads(sys.argv[2])
    worker = launch.init_distributed("cpu").rank
    results = {"hook": with_hook(worker), "exact": with_hook(worker, compress=False)}
    results |= {f"ours_{seed}": ours(worker, seed) for seed in seeds}
    os.makedirs(out, exist_ok=True)
    torch.save(results, os.path.join(out, f"rank{worker}.pt"))
