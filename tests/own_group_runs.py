"""A user's own script, as torchrun and DDP scripts are written: it makes the default process
group itself (when launched), trains with DecentralizedOptimizer and with the reference
interface of PowerSGD, and goes on using its group afterwards, then destroys it.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/own_group_runs.py OUT
    mpirun -np 2 python tests/own_group_runs.py OUT      (MASTER_PORT set by the caller)
    python tests/own_group_runs.py OUT                   (one process, no group)

writes OUT/rank<r>.pt: for the drop-in (D-PSGD on a ring, plain SGD), this worker's flat
parameters before every step, its gradients, the parameters after the last step, its losses
and bytes sent; for PowerSGD, powersgd_runs.ours (losses, floats sent per step, final
parameters); and the sum over processes of (rank + 1), computed through the group once both
optimizers are done.
"""
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import powergossip  # noqa: E402
from tests import powersgd_runs  # noqa: E402 (PowerSGD's loop, through its reference interface)

STEPS, LR = 8, powersgd_runs.LR  # the drop-in's; the model and data are powersgd_runs'


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().flatten() for t in tensors]).clone()


def make_group() -> int:
    """What the user's script does before anything of ours: under torchrun, env:// has its
    variables; under mpirun, the script takes rank and size from OpenMPI's."""
    if "OMPI_COMM_WORLD_RANK" in os.environ:
        os.environ.update(RANK=os.environ["OMPI_COMM_WORLD_RANK"], WORLD_SIZE=os.environ["OMPI_COMM_WORLD_SIZE"],
                          MASTER_ADDR="127.0.0.1")
    if "RANK" not in os.environ:
        return 0
    dist.init_process_group("gloo")
    return dist.get_rank()


def drop_in(worker: int) -> dict:
    net = powersgd_runs.model()
    optimizer = powergossip.DecentralizedOptimizer(torch.optim.SGD(net.parameters(), lr=LR), net, algorithm="dpsgd",
                                                   topology="ring")
    before, gradients, losses = [], [], []
    for step in range(STEPS):
        optimizer.zero_grad()
        x, y = powersgd_runs.batch(worker, step)
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        before.append(flat(net.parameters()))
        gradients.append(flat(p.grad for p in net.parameters()))
        optimizer.step()
        losses.append(loss.item())
    return {"before": torch.stack(before), "gradients": torch.stack(gradients), "after": flat(net.parameters()),
            "losses": losses, "bytes_sent": optimizer.bytes_sent}


if __name__ == "__main__":
    rank = make_group()
    results = {"drop_in": drop_in(rank), "powersgd": powersgd_runs.ours(rank, seed=0)}
    if dist.is_initialized():  # the script's group is still its own: it uses it, then destroys it
        total = torch.tensor([rank + 1.0])
        dist.all_reduce(total)
        results["sum_over_processes"] = total.item()
        dist.destroy_process_group()
    os.makedirs(sys.argv[1], exist_ok=True)
    torch.save(results, os.path.join(sys.argv[1], f"rank{rank}.pt"))
