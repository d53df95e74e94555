"""The drop-in optimizers: a decentralized optimizer for any `nn.Module` and any torch
optimizer, and PowerSGD with its reference implementation's interface (`PowerSGD`, `Config`,
`optimizer_step`). The local SGD step over stacked workers (train.py's) is step.py's.

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
and then the exact average; a method that acts on gradients (PowerSGD) averages the
gradients and the optimizer steps with that average (step.TrainingStep, train.py's order
too). Every registered method works (`methods.METHODS`), with
its hyper-parameters as keyword arguments (the vocabulary of `register_algorithm`).
The model's parameters are gossiped in place as `[1, *shape]` views; buffers (batch-norm
statistics) stay local, as in train.py.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from powergossip import methods, names, topologies
from powergossip import step as step_module
from powergossip import comm as comm_module
from powergossip import launch
from powergossip.methods.powersgd import StackedPowerSGD
from powergossip.methods.push_sum import PushSum


# --- drop-in optimizers for one worker per process ----------------------------------------------------
class _OneWorkerPerProcess:
    """What both drop-ins share: a Communicator with one worker per launched process (at least
    two), every worker starting from worker 0's `parameters` (as in the paper), and this
    worker's byte and message counts, which their state_dict carries."""

    def __init__(self, parameters: list[torch.Tensor], device):
        device = parameters[0].device if device is None else device
        world_size = launch.init_distributed(str(device)).world_size
        if world_size < 2:
            raise ValueError(f"{type(self).__name__} runs one worker per process: launch several, with "
                             "`mpirun -np N python script.py` or `torchrun --nproc-per-node N script.py`")
        self.comm = comm_module.Communicator(world_size, device)
        with torch.no_grad():
            self.comm.broadcast_from_worker0([p.data.unsqueeze(0) for p in parameters])

    @property
    def bytes_sent(self) -> int:
        """Payload bytes this worker has sent (what goes on the wire, exactly)."""
        return int(self.comm.bytes_sent[0])

    def _counters(self) -> dict:
        return {"bytes_sent": int(self.comm.bytes_sent[0]), "messages_sent": int(self.comm.messages_sent[0])}

    def _load_counters(self, state: dict) -> None:
        self.comm.bytes_sent[0], self.comm.messages_sent[0] = state["bytes_sent"], state["messages_sent"]


def _stacked_gradients(parameters) -> list[torch.Tensor]:
    """Each trained parameter's gradient as a `[1, *shape]` view (a zero gradient where backward
    left none this step, so that a method sees the same tensors every step and averages in the
    other workers' gradients; frozen parameters, requires_grad=False, get none and stay as they are)."""
    trained = [p for p in parameters if p.requires_grad]
    for p in trained:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad.unsqueeze(0) for p in trained]


class DecentralizedOptimizer(_OneWorkerPerProcess):
    """Wraps `optimizer` (any torch optimizer, any parameter groups) so that `step()` also
    gossips `model`'s parameters with this worker's neighbours in `topology` (a name of
    topologies.build, or a Topology). Workers start from worker 0's parameters."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, algorithm: str = "power-gossip",
                 topology="ring", device: str | torch.device | None = None, **hyper):
        parameters = list(dict.fromkeys(model.parameters()))  # tied parameters once
        if not parameters:
            raise ValueError("the model has no parameters to gossip")
        name = methods.registered_name(algorithm)  # the name and the settings checked before any communication
        settings = {names.KEY_ALIASES.get(key, key).removeprefix(names.SETTING_PREFIX): value for key, value in hyper.items()}
        try:
            methods.METHODS[name].settings(settings, strict=True)
        except ValueError as problem:
            raise ValueError(f"method {name}: {problem}") from None
        super().__init__(parameters, device)  # neighbours agree at step 0 (as in the paper)
        world_size = self.comm.n_workers
        self.topology = topologies.build(topology, world_size) if isinstance(topology, str) else topology
        if self.topology.n_workers != world_size:
            raise ValueError(f"the topology has {self.topology.n_workers} workers but {world_size} processes were launched")
        self.gossip = methods.build(name, self.comm, self.topology, strict=True, **settings)
        if isinstance(self.gossip, PushSum):
            # SGP steps the numerator x at learning rate lr (z at lr / w); a wrapped optimizer of any
            # kind cannot be told that, so here push-sum runs where w stays 1 (train.py: any graph).
            topologies.check_requirement(self.topology, "doubly_stochastic", "push-sum in DecentralizedOptimizer")
        self.optimizer = optimizer
        self.parameters = parameters
        self.params = [p.data.unsqueeze(0) for p in parameters]  # [1, *shape] views: gossip edits the model
        self.training_step = step_module.TrainingStep(self.gossip, methods.METHODS[name], self.params,
                                                      lambda: _stacked_gradients(self.parameters))

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        """Gossip x_t, then the wrapped optimizer's step with the gradients taken at x_t (a
        method that acts on gradients, such as PowerSGD: average them, then the step; all-reduce
        and push-sum: the step, then the method), as train.py's (step.TrainingStep)."""
        self.training_step(self.optimizer.step)

    def state_dict(self) -> dict:
        """The wrapped optimizer's and the method's state, the byte counts, and this worker's
        parameters (a new DecentralizedOptimizer starts every worker from worker 0's)."""
        return {"optimizer": self.optimizer.state_dict(), "gossip": self.gossip.state_dict(),
                "parameters": [p[0].clone() for p in self.params]} | self._counters()

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for target, saved in zip(self.params, state["parameters"]):
                target[0].copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.gossip.load_state_dict(state["gossip"])
        self._load_counters(state)


class Config(NamedTuple):
    """PowerSGD's settings, under the names of its reference implementation (epfml/powersgd).

    One difference in meaning: here an iteration is the paper's Algorithm 1 whole (P = M Q
    and Q = M^T P, two all-reduces, as PyTorch's powerSGD_hook does), where the reference
    counts half-steps that alternate between P and Q across steps; so num_iters_per_step=k
    here sends what 2k sends there. The compression rule is PowerSGD's with whole
    iterations: m n >= min_compression_rate (m + n) r (compressors.worth_compressing)."""

    rank: int  # columns of the factors P and Q: lower sends less and approximates more roughly
    min_compression_rate: float = 2  # a matrix its factors would compress by less is all-reduced whole
    num_iters_per_step: int = 1  # power iterations per step: a better approximation for more bytes
    start_compressing_after_num_steps: int = 100  # exact all-reduce for this many first steps


class PowerSGD(_OneWorkerPerProcess):
    """PowerSGD (Vogels, Karimireddy, Jaggi 2019; methods.powersgd.StackedPowerSGD) with the interface of its
    reference implementation, one worker per process (mpirun or torchrun):

        powersgd = powergossip.PowerSGD(model.parameters(), config=powergossip.Config(rank=2))
        for x, y in my_batches:
            loss_fn(model(x), y).backward()
            powergossip.optimizer_step(optimizer, powersgd)   # in place of optimizer.step()

    The error-feedback memory and Q live here (state_dict); workers start from worker 0's
    parameters, and stay equal since they all step with the same averaged gradient.
    """

    def __init__(self, params, config: Config, device: str | torch.device | None = None, warm_start: bool = True,
                 seed: int = 0):
        self.parameters = [p for p in dict.fromkeys(params) if p.requires_grad]  # frozen ones are not trained
        if not self.parameters:
            raise ValueError("PowerSGD was given no parameters that require gradients")
        self.config = config
        super().__init__(self.parameters, device)
        self.algorithm = StackedPowerSGD(self.comm, rank=config.rank, num_iterations=config.num_iters_per_step,
                                             min_compression_rate=config.min_compression_rate,
                                             start_compressing_after_num_steps=config.start_compressing_after_num_steps,
                                             warm_start=warm_start, seed=seed)

    @torch.no_grad()
    def average_gradients(self) -> None:
        """Replace every parameter's gradient by PowerSGD's approximate average over the workers."""
        self.algorithm.step(_stacked_gradients(self.parameters))

    def state_dict(self) -> dict:
        return {"algorithm": self.algorithm.state_dict()} | self._counters()

    def load_state_dict(self, state: dict) -> None:
        self.algorithm.load_state_dict(state["algorithm"])
        self._load_counters(state)


def optimizer_step(optimizer: torch.optim.Optimizer, powersgd: PowerSGD) -> None:
    """`optimizer.step()` with PowerSGD's averaged gradients. The gradients are zero afterwards
    (the reference leaves its error feedback in them; here it lives in `powersgd`), so the
    next backward starts clean with or without `optimizer.zero_grad()`."""
    powersgd.average_gradients()
    optimizer.step()
    with torch.no_grad():
        for p in powersgd.parameters:
            p.grad.zero_()
