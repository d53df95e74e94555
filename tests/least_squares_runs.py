"""A heterogeneous least-squares problem, f_i(x) = |A_i x - b_i|^2 / 2 with each worker its own
A_i, b_i, trained with full gradients and a constant step: stacked in one process
(`stacked`), or one worker per process through DecentralizedOptimizer
(`mpirun -np 5 python tests/least_squares_runs.py OUT METHOD,TOPOLOGY[,SETTING=VALUE] ...`:
each process writes OUT/METHOD-TOPOLOGY/rank{r}.pt, its final x)."""
import functools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import powergossip  # noqa: E402
from powergossip import methods, topologies  # noqa: E402
from powergossip import comm as comm_module  # noqa: E402
from powergossip import launch  # noqa: E402
from powergossip import step as step_module  # noqa: E402

N_WORKERS, ROWS, DIM = 5, 4, 3
LEARNING_RATE, STEPS = 0.2, 250


@functools.lru_cache(maxsize=1)
def problem():
    """(A [n, ROWS, DIM], b [n, ROWS]) in float64, each worker's own."""
    generator = torch.Generator().manual_seed(7)
    A = torch.randn(N_WORKERS, ROWS, DIM, generator=generator, dtype=torch.float64) / 2
    b = torch.randn(N_WORKERS, ROWS, generator=generator, dtype=torch.float64) + torch.arange(N_WORKERS).unsqueeze(1)
    return A, b


def minimiser():
    """argmin_x sum_i f_i(x) = (sum_i A_i^T A_i)^{-1} sum_i A_i^T b_i."""
    A, b = problem()
    return torch.linalg.solve(torch.einsum("nrd,nre->de", A, A), torch.einsum("nrd,nr->d", A, b))


def gradients(x):
    """grad f_i(x_i) for every worker's row of x `[n, DIM]`."""
    A, b = problem()
    return torch.einsum("nrd,nr->nd", A, torch.einsum("nrd,nd->nr", A, x) - b)


def stacked(method: str, topology: str, steps: int = STEPS, **settings) -> torch.Tensor:
    """Every worker's x `[n, DIM]` after `steps` steps of the method in one process, in the order
    its registry entry gives (step.TrainingStep); all workers start at 0."""
    comm = comm_module.Communicator(N_WORKERS, "cpu")
    name = methods.registered_name(method)
    gossip = methods.build(name, comm, topologies.build(topology, N_WORKERS), **settings)
    x = torch.zeros(N_WORKERS, DIM, dtype=torch.float64)
    gradient = torch.zeros_like(x)
    training_step = step_module.TrainingStep(gossip, methods.METHODS[name], [x], [gradient])
    for _ in range(steps):
        gradient.copy_(gradients(x))
        training_step(lambda: x.sub_(LEARNING_RATE * gradient))
    return x


def drop_in(method: str, topology: str, steps: int = STEPS, **settings) -> torch.Tensor:
    """This process's worker's x after `steps` steps through DecentralizedOptimizer and torch.optim.SGD."""
    model = torch.nn.Module()
    model.x = torch.nn.Parameter(torch.zeros(DIM, dtype=torch.float64))
    gossip = powergossip.DecentralizedOptimizer(torch.optim.SGD(model.parameters(), lr=LEARNING_RATE), model,
                                                algorithm=method, topology=topology, device="cpu", **settings)
    A, b = (part[gossip.comm.first_worker] for part in problem())
    for _ in range(steps):
        gossip.zero_grad()
        (0.5 * ((A @ model.x - b) ** 2).sum()).backward()
        gossip.step()
    return model.x.detach().clone()


if __name__ == "__main__":
    out = sys.argv[1]
    rank = launch.init_distributed("cpu").rank
    for run in sys.argv[2:]:
        method, topology, *pairs = run.split(",")
        settings = {key: float(value) for key, value in (pair.split("=") for pair in pairs)}
        folder = os.path.join(out, f"{method}-{topology}")
        os.makedirs(folder, exist_ok=True)
        torch.save(drop_in(method, topology, **settings), os.path.join(folder, f"rank{rank}.pt"))
