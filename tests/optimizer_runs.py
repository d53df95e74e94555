"""The drop-in optimizer as a user runs it: one worker per process, a model the project did
not write (a TransformerEncoder classifier), a torch optimizer. Also the same training on
the stacked single-process path, for comparison.

    mpirun -np 4 python tests/optimizer_runs.py OUT '[[NAME, ALGORITHM, {"rank": 1}, "sgd"], ...]'

trains each run for STEPS steps, then GOSSIP_ONLY more with the learning rate at zero
(consensus alone), and writes OUT/NAME/rank<r>.pt: this worker's parameters after
every step, its losses, and its bytes sent.
"""
import copy
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import powergossip  # noqa: E402
from powergossip import algorithms, faults, topologies  # noqa: E402
from powergossip import comm as comm_module  # noqa: E402
from powergossip.models.stacked import StackedReplicas  # noqa: E402

N_WORKERS, TOKENS, WIDTH, CLASSES, BATCH = 4, 6, 16, 3, 8
STEPS, GOSSIP_ONLY = 12, 12


def transformer_classifier() -> torch.nn.Module:
    torch.manual_seed(0)  # every worker builds the same model
    layer = torch.nn.TransformerEncoderLayer(WIDTH, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    return torch.nn.Sequential(torch.nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False),
                               MeanOverTokens(), torch.nn.Linear(WIDTH, CLASSES))


class MeanOverTokens(torch.nn.Module):
    def forward(self, x):
        return x.mean(dim=1)


def batch(worker: int, step: int):
    """Worker-specific data with a learnable rule (the class is where the first token's features peak)."""
    generator = torch.Generator().manual_seed(1000 * worker + step)
    x = torch.randn(BATCH, TOKENS, WIDTH, generator=generator) + 0.5 * worker
    return x, x[:, 0, :CLASSES].argmax(dim=1)


def torch_optimizer(kind: str, model: torch.nn.Module) -> torch.optim.Optimizer:
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    matrices = [p for p in model.parameters() if p.dim() > 1]  # two parameter groups, as users write them
    vectors = [p for p in model.parameters() if p.dim() <= 1]
    return torch.optim.AdamW([{"params": matrices, "weight_decay": 0.01}, {"params": vectors, "weight_decay": 0.0}], lr=1e-2)


def drop_in(out: str, algorithm: str, hyper: dict, kind: str) -> None:
    """Train STEPS steps, then GOSSIP_ONLY with the learning rate at zero; halfway, a second
    model and optimizer are built from the first's state_dict and run the rest beside it."""
    model = transformer_classifier()
    gossip = powergossip.DecentralizedOptimizer(torch_optimizer(kind, model), model, algorithm=algorithm,
                                                topology="ring", **hyper)
    worker = gossip.comm.rank
    trajectory, losses = [], []
    for step in range(STEPS + GOSSIP_ONLY):
        if step == STEPS // 2:
            saved = copy.deepcopy({"model": model.state_dict(), "optimizer": gossip.state_dict()})  # as torch.save would
        if step == STEPS:
            for group in gossip.param_groups:
                group["lr"] = 0.0
        loss = train_step(model, gossip, worker, step)
        trajectory.append(torch.cat([p.detach().flatten() for p in model.parameters()]).clone())
        losses.append(loss)
    resumed = transformer_classifier()  # the same run continued from the halfway state_dict
    resumed.load_state_dict(saved["model"])
    again = powergossip.DecentralizedOptimizer(torch_optimizer(kind, resumed), resumed, algorithm=algorithm,
                                               topology="ring", **hyper)
    again.load_state_dict(saved["optimizer"])
    for step in range(STEPS // 2, STEPS):
        train_step(resumed, again, worker, step)
    os.makedirs(out, exist_ok=True)
    torch.save({"trajectory": torch.stack(trajectory), "losses": losses, "bytes_sent": gossip.bytes_sent,
                "resumed": torch.cat([p.detach().flatten() for p in resumed.parameters()]),
                "resumed_bytes_sent": again.bytes_sent}, os.path.join(out, f"rank{worker}.pt"))


def train_step(model, gossip, worker: int, step: int) -> float:
    gossip.zero_grad()
    x, y = batch(worker, step)
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    gossip.step()
    return loss.item()


def stacked(algorithm: str, hyper: dict):
    """All workers in one process: StackedReplicas, one torch optimizer per replica."""
    comm = comm_module.Communicator(N_WORKERS, "cpu")
    workers = StackedReplicas(transformer_classifier(), N_WORKERS, torch.device("cpu"))
    optimizers = [torch.optim.SGD(replica.parameters(), lr=0.05, momentum=0.9) for replica in workers.replicas]
    fault_keys = {key: hyper.pop(key) for key in faults.KEYS if key in hyper}  # as DecentralizedOptimizer takes them
    ring = faults.apply(faults.FaultSettings(**fault_keys), topologies.build("ring", N_WORKERS), hyper.pop("fault_seed", 0))
    gossip = algorithms.build(algorithm, comm, ring, **hyper)
    trajectory = []
    for step in range(STEPS + GOSSIP_ONLY):
        if step == STEPS:
            for optimizer in optimizers:
                optimizer.param_groups[0]["lr"] = 0.0
        workers.zero_grad()
        for worker, replica in enumerate(workers.replicas):
            x, y = batch(worker, step)
            F.cross_entropy(replica(x), y).backward()
        with torch.no_grad():
            acts_on_gradients = algorithms.METHODS[algorithms.registered_name(algorithm)].acts_on == "gradients"
            gossip.step(workers.grads if acts_on_gradients else workers.params)
            for optimizer in optimizers:
                optimizer.step()
        trajectory.append(torch.cat([p.reshape(N_WORKERS, -1) for p in workers.params], dim=1).clone())
    return torch.stack(trajectory, dim=1), comm.bytes_sent.copy()


if __name__ == "__main__":
    for name, algorithm, hyper, kind in json.loads(sys.argv[2]):
        drop_in(os.path.join(sys.argv[1], name), algorithm, hyper, kind)
