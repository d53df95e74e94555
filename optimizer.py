"""The optimizers: the local SGD step over stacked workers (train.py's), and a drop-in
decentralized optimizer for any `nn.Module` and any torch optimizer.

One worker per process (launch with `mpirun -np N` or `torchrun --nproc-per-node N`):

    model = MyModel()
    gossip = powergossip.DecentralizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model,
                                                algorithm="power-gossip", topology="ring", rank=1)
    for x, y in my_batches:
        gossip.zero_grad()
        loss_fn(model(x), y).backward()   # gradient at x_t
        gossip.step()                     # gossip x_t, then the local step on the gossiped parameters
    gossip.bytes_sent                     # this worker's payload bytes so far

The order is the paper's (D-PSGD as Lian et al. 2017 run it, Vogels, Karimireddy, Jaggi 2020, "Deep learning experiments"):
the gradient is taken at x_t, the parameters are gossiped, and the wrapped optimizer
applies that gradient to the gossiped parameters; all-reduce takes the local step first
and then the exact average. Every registered method works (`algorithms.METHODS`), with
its hyper-parameters as keyword arguments (the vocabulary of `register_algorithm`).
The model's parameters are gossiped in place as `[1, *shape]` views; buffers (batch-norm
statistics) stay local, as in train.py.
"""
from __future__ import annotations

import torch

from powergossip import algorithms, configuration, models, topologies
from powergossip import comm as comm_module


# --- the local step over stacked workers ----------------------------------------------------------
def weight_decays(template, parameter_names, weight_decay: float) -> list[float]:
    """Each parameter's weight decay: none for those models.no_weight_decay_parameter_names lists."""
    no_decay = models.no_weight_decay_parameter_names(template)
    return [0.0 if name in no_decay else weight_decay for name in parameter_names]


def nesterov_sgd_step(params, grads, momenta, lr, momentum, decays):
    """PyTorch's SGD with Nesterov momentum, on all workers' stacks at once:
    d = g + wd x; m = mu m + d; x -= lr (d + mu m). One fused (foreach) kernel per
    operation and weight-decay group instead of one per parameter. `lr` is a number, or a
    tensor `[L]` with one learning rate per worker (push-sum's lr / w)."""
    for wd in sorted(set(decays)):
        group = [k for k, decay in enumerate(decays) if decay == wd]
        x, g, m = [params[k] for k in group], [grads[k] for k in group], [momenta[k] for k in group]
        d = torch._foreach_add(g, x, alpha=wd) if wd else g
        if momentum:
            torch._foreach_mul_(m, momentum)
            torch._foreach_add_(m, d)
            d = torch._foreach_add(d, m, alpha=momentum)
        if isinstance(lr, torch.Tensor):
            for x_k, d_k in zip(x, d):
                x_k.sub_(d_k * lr.view((-1,) + (1,) * (d_k.dim() - 1)).to(d_k.dtype))
        else:
            torch._foreach_add_(x, d, alpha=-lr)


def clip_per_worker(grads, max_norm: float):
    """Each worker's gradient scaled to norm <= max_norm (torch.nn.utils.clip_grad_norm_ per worker)."""
    norms = torch.sqrt(sum(g.reshape(g.shape[0], -1).float().pow(2).sum(dim=1) for g in grads))
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view((-1,) + (1,) * (g.dim() - 1)))


# --- the drop-in optimizer ----------------------------------------------------------------------------


class DecentralizedOptimizer:
    """Wraps `optimizer` (any torch optimizer, any parameter groups) so that `step()` also
    gossips `model`'s parameters with this worker's neighbours in `topology` (a name of
    topologies.build, or a Topology). Workers start from worker 0's parameters."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, algorithm: str = "power-gossip",
                 topology="ring", device: str | torch.device | None = None, **hyper):
        parameters = list(dict.fromkeys(model.parameters()))  # tied parameters once
        if not parameters:
            raise ValueError("the model has no parameters to gossip")
        device = device if device is not None else parameters[0].device
        world_size = comm_module.init_distributed(str(device)).world_size
        if world_size < 2:
            raise ValueError("DecentralizedOptimizer runs one worker per process: launch several, with "
                             "`mpirun -np N python script.py` or `torchrun --nproc-per-node N script.py`")
        self.comm = comm_module.Communicator(world_size, device)  # one worker per process
        self.topology = topologies.build(topology, world_size) if isinstance(topology, str) else topology
        if self.topology.n_workers != world_size:
            raise ValueError(f"the topology has {self.topology.n_workers} workers but {world_size} processes were launched")
        name = algorithms.registered_name(algorithm)
        if algorithms.METHODS[name].acts_on != "parameters":
            raise ValueError(f"{name} acts on gradients; DecentralizedOptimizer gossips parameters")
        hyper = {configuration.ALIASES.get(key, key).removeprefix("optimizer_"): value for key, value in hyper.items()}
        self.gossip = algorithms.build(name, self.comm, self.topology, strict=True, **hyper)
        self.local_step_first = algorithms.METHODS[name].local_step_first
        self.optimizer = optimizer
        self.params = [p.data.unsqueeze(0) for p in parameters]  # [1, *shape] views: gossip edits the model
        with torch.no_grad():
            self.comm.broadcast_from_worker0(self.params)  # neighbours agree at step 0 (as in the paper)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def bytes_sent(self) -> int:
        """Payload bytes this worker has sent (what goes on the wire, exactly)."""
        return int(self.comm.bytes_sent[0])

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        """Gossip x_t, then the wrapped optimizer's step with the gradients taken at x_t."""
        if self.local_step_first:
            self.optimizer.step()
            self.gossip.step(self.params)
        else:
            self.gossip.step(self.params)
            self.optimizer.step()

    def state_dict(self) -> dict:
        """The wrapped optimizer's and the method's state, the byte counts, and this worker's
        parameters (a new DecentralizedOptimizer starts every worker from worker 0's)."""
        return {"optimizer": self.optimizer.state_dict(), "gossip": self.gossip.state_dict(),
                "parameters": [p[0].clone() for p in self.params],
                "bytes_sent": int(self.comm.bytes_sent[0]), "messages_sent": int(self.comm.messages_sent[0])}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for target, saved in zip(self.params, state["parameters"]):
                target[0].copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.gossip.load_state_dict(state["gossip"])
        self.comm.bytes_sent[0], self.comm.messages_sent[0] = state["bytes_sent"], state["messages_sent"]
