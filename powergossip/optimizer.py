"""The drop-in optimizers: a decentralized optimizer for any `nn.Module` and any torch
optimizer, and PowerSGD with its reference implementation's interface (`PowerSGD`, `Config`,
`optimizer_step`). The local SGD step over stacked workers (train.py's) is step.py's.

One worker per process (launch with `mpirun -np N` or `torchrun --nproc-per-node N`; a script
that made its own default process group first is joined in it, and a plain `python` process is
a graph of one worker that sends nothing, for debugging the loop):

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

from typing import Callable, NamedTuple

import torch

from powergossip import faults, methods, names, topologies
from powergossip import step as step_module
from powergossip import comm as comm_module
from powergossip import launch
from powergossip.methods.powersgd import StackedPowerSGD
from powergossip.methods.push_sum import PushSum


# --- drop-in optimizers for one worker per process ----------------------------------------------------
class _OneWorkerPerProcess:
    """What both drop-ins share: a Communicator with one worker per process of the job (the
    script's own default process group when it made one, else the launch's, launch.py; one
    process alone is a job of one worker, whose graph has no edge), every worker starting from
    worker 0's `parameters` (as in the paper), and this worker's byte and message counts,
    which their state_dict carries."""

    def __init__(self, parameters: list[torch.Tensor], device):
        device = parameters[0].device if device is None else device
        world_size = launch.init_distributed(str(device)).world_size
        self.comm = comm_module.Communicator(world_size, device)
        with torch.no_grad():
            self.comm.broadcast_from_worker0([p.data.unsqueeze(0) for p in parameters])

    @property
    def bytes_sent(self) -> int:
        """Payload bytes this worker has sent (what goes on the wire, exactly)."""
        return int(self.comm.bytes_sent[0])

    def _counters(self) -> dict:
        return {"bytes_sent": int(self.comm.bytes_sent[0]), "messages_sent": int(self.comm.messages_sent[0]),
                "messages_lost": int(self.comm.messages_lost[0])}

    def _load_counters(self, state: dict) -> None:
        self.comm.bytes_sent[0], self.comm.messages_sent[0] = state["bytes_sent"], state["messages_sent"]
        self.comm.messages_lost[0] = state.get("messages_lost", 0)  # a state from before messages could be lost: none were


def _stacked_gradients(parameters) -> list[torch.Tensor]:
    """Each trained parameter's gradient as a `[1, *shape]` view (a zero gradient where backward
    left none this step, so that a method sees the same tensors every step and averages in the
    other workers' gradients; frozen parameters, requires_grad=False, get none and stay as they are)."""
    trained = [p for p in parameters if p.requires_grad]
    for p in trained:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad.unsqueeze(0) for p in trained]


class DecentralizedOptimizer(_OneWorkerPerProcess, torch.optim.Optimizer):
    """Wraps `optimizer` (any torch optimizer, any parameter groups) so that `step()` also
    gossips `model`'s parameters with this worker's neighbours in `topology` (a name of
    topologies.build, or a Topology). Workers start from worker 0's parameters.

    It is a torch.optim.Optimizer: `param_groups`, `state` and `defaults` are the wrapped
    optimizer's own objects, so LR schedulers set the learning rate it steps with, and
    torch.amp.GradScaler hands its scale to `step` (see there).

    `momentum_type="quasi-global"` (Lin, Karimireddy, Stich, Jaggi 2021; step.QuasiGlobalMomentum)
    turns a wrapped torch.optim.SGD's momentum buffer into quasi-global momentum: the SGD
    steps with it unchanged and, after the method, it becomes mu m + (1 - mu) (x_t - x_{t+1}) / lr
    (each group's momentum and learning rate); other optimizers are refused when it is built.

    `link_failure_probability`, `offline_probability`, `churn` and `message_loss_probability`
    (powergossip/faults.py, drawn
    with `fault_seed`) make the network unreliable as in train.py: the same faults for the same
    seed, whatever the processes, and a state_dict continues them."""

    # GradScaler passes its scale and found_inf to step() instead of skipping it (see step)
    _step_supports_amp_scaling = True

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module, algorithm: str = "power-gossip",
                 topology="ring", device: str | torch.device | None = None, momentum_type: str = "local",
                 link_failure_probability: float = 0.0, offline_probability: float = 0.0, churn: str | None = None,
                 message_loss_probability: float = 0.0, fault_seed: int = 0, **hyper):
        parameters = list(dict.fromkeys(model.parameters()))  # tied parameters once
        if not parameters:
            raise ValueError("the model has no parameters to gossip")
        check_momentum_type(momentum_type, optimizer)
        self.momentum_type = momentum_type
        name = methods.registered_name(algorithm)  # the name and the settings checked before any communication
        if methods.METHODS[name].asynchronous:
            raise ValueError(f"method {name} is asynchronous: it runs on the simulated clock's events, not in a step "
                             f"of each worker's optimizer; train with it in train.py (simulated_clock=true)")
        settings = {names.KEY_ALIASES.get(key, key).removeprefix(names.SETTING_PREFIX): value for key, value in hyper.items()}
        try:
            methods.METHODS[name].settings(settings, strict=True)
        except ValueError as problem:
            raise ValueError(f"method {name}: {problem}") from None
        if name == "push-sum" and settings.get("one_step_delay"):  # see the push-sum check below
            raise ValueError("method push-sum: one_step_delay moves w off 1 on every graph (the mass in flight), and "
                             "the drop-in cannot step z at lr / w; train.py runs it")
        self.optimizer = optimizer
        # torch.optim.Optimizer's hooks and step wrapper, without parameter groups of its own
        # (its __init__ would make some; they are the wrapped optimizer's, see param_groups)
        torch.optim.Optimizer.__setstate__(self, {})
        super().__init__(parameters, device)  # neighbours agree at step 0 (as in the paper)
        world_size = self.comm.n_workers
        self.topology = topologies.build(topology, world_size) if isinstance(topology, str) else topology
        if self.topology.n_workers != world_size:
            raise ValueError(f"the topology has {self.topology.n_workers} workers but the job has {world_size} processes")
        fault_settings = faults.FaultSettings(link_failure_probability, offline_probability, churn, message_loss_probability)
        faults.check(fault_settings, name, methods.METHODS[name].graph_needs, self.topology)  # on the fault-free graph
        self.topology = faults.apply(fault_settings, self.topology, fault_seed)
        self.gossip = methods.build(name, self.comm, self.topology, strict=True, **settings)
        if isinstance(self.gossip, PushSum):
            # SGP steps the numerator x at learning rate lr (z at lr / w); a wrapped optimizer of any
            # kind cannot be told that, so here push-sum runs where w stays 1 (train.py: any graph).
            topologies.check_requirement(self.topology, "doubly_stochastic", "push-sum in DecentralizedOptimizer")
        self.parameters = parameters
        self.params = [p.data.unsqueeze(0) for p in parameters]  # [1, *shape] views: gossip edits the model
        self.training_step = step_module.TrainingStep(self.gossip, methods.METHODS[name], self.params,
                                                      lambda: _stacked_gradients(self.parameters))

    # The wrapped optimizer's own objects (an LR scheduler's change of group["lr"] is the one it steps with)
    @property
    def param_groups(self) -> list[dict]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list[dict]) -> None:
        self.optimizer.param_groups = groups

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, state) -> None:
        self.optimizer.state = state

    @property
    def defaults(self) -> dict:
        return self.optimizer.defaults

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        """Add a group to the wrapped optimizer, when every parameter in it is one of the model's
        (all of them are gossiped from the start: unfreezing layers for fine-tuning works);
        refused otherwise, since the gossip is set up over the model's parameters."""
        if isinstance(param_group, dict) and not isinstance(param_group["params"], (torch.Tensor, set)):
            param_group["params"] = list(param_group["params"])  # iterated twice: here and by the optimizer
        params = param_group["params"] if isinstance(param_group, dict) else []  # torch's checks say the rest
        tensors = [params] if isinstance(params, torch.Tensor) else [p[1] if isinstance(p, tuple) else p for p in params]
        gossiped = {id(p) for p in self.parameters}
        if not all(id(p) in gossiped for p in tensors):
            raise ValueError("DecentralizedOptimizer.add_param_group: the gossip is set up over the model's parameters "
                             "when it is built, and this group holds parameters the model does not have; add them "
                             "to the model and build a new DecentralizedOptimizer (its load_state_dict takes the state)")
        self.optimizer.add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """Gossip x_t, then the wrapped optimizer's step with the gradients taken at x_t (a
        method that acts on gradients, such as PowerSGD: average them, then the step; all-reduce
        and push-sum: the step, then the method), as train.py's (step.TrainingStep). Returns what
        `closure` returns: it is evaluated once, first, for the gradient at x_t; the wrapped
        optimizer steps without it.

        Under torch.amp.GradScaler, which sets `grad_scale` and `found_inf` here before the call,
        the gradients are unscaled first. Where they are not finite, this worker's gossip still
        runs (its neighbours wait for it; skipping the call, as GradScaler does for other
        optimizers, would leave them waiting), its gradients count as zero and its local step is
        skipped; a method that acts on gradients still steps every worker with the same average."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        finite = self._unscale_gradients()
        local_step = self.optimizer.step if finite or self.training_step.on_gradients else lambda: None
        if self.momentum_type == "quasi-global":
            self._quasi_global_step(local_step)
        else:
            self.training_step(local_step)
        return loss

    def _quasi_global_step(self, local_step) -> None:
        """The training step with quasi-global momentum (step.QuasiGlobalMomentum): the wrapped
        SGD steps with its momentum buffer m-hat, whose update in its step is undone, and then
        each group's m-hat <- mu m-hat + (1 - mu) (x^t - x^{t+1}) / lr, with the group's momentum
        and learning rate (the buffers stay the SGD's "momentum_buffer": its state_dict has them)."""
        groups = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.requires_grad]
            for p in params:
                if self.optimizer.state[p].get("momentum_buffer") is None:
                    self.optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)  # SGD's first step: mu 0 + d
            buffers = [self.optimizer.state[p]["momentum_buffer"] for p in params]
            momentum = step_module.QuasiGlobalMomentum([p.data for p in params], buffers, group["momentum"])
            groups.append((momentum, [b.clone() for b in buffers], momentum.start(), group["lr"]))
        self.training_step(local_step)
        for momentum, saved, start, lr in groups:
            torch._foreach_copy_(momentum.momenta, saved)
            momentum.update(start, lr)

    def _unscale_gradients(self) -> bool:
        """Unscale the gradients of the wrapped optimizer's groups (those GradScaler checks) by its
        `grad_scale`, through the reciprocal computed in float64 as GradScaler.unscale_ does, and
        zero them where it found an inf or NaN: False then. True without a GradScaler."""
        scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        gradients = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if scale is not None:
            inverse = scale.double().reciprocal().float()
            for gradient in gradients:
                gradient.mul_(inverse.to(gradient.device))
        if found_inf is None or not found_inf.item():
            return True
        for gradient in gradients:
            gradient.zero_()
        return False

    def state_dict(self) -> dict:
        """The wrapped optimizer's state_dict (its "state" and "param_groups", as any torch
        optimizer's) with the method's state, the byte counts, and this worker's parameters (a
        new DecentralizedOptimizer starts every worker from worker 0's)."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        state = self.optimizer.state_dict() | {"gossip": self.gossip.state_dict(),
                                               "parameters": [p[0].clone() for p in self.params]} | self._counters()
        for hook in self._optimizer_state_dict_post_hooks.values():
            state = hook(self, state) or state
        return state

    def load_state_dict(self, state: dict) -> None:
        """Load a state_dict of this class, also one saved before it was a torch optimizer
        (the wrapped optimizer's state under "optimizer")."""
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            state = hook(self, state) or state
        with torch.no_grad():
            for target, saved in zip(self.params, state["parameters"]):
                target[0].copy_(saved)
        own = ("gossip", "parameters", "bytes_sent", "messages_sent", "messages_lost")
        self.optimizer.load_state_dict(state["optimizer"] if "optimizer" in state else
                                       {key: value for key, value in state.items() if key not in own})
        self.gossip.load_state_dict(state["gossip"])
        self._load_counters(state)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)


def check_momentum_type(momentum_type: str, optimizer: torch.optim.Optimizer) -> None:
    """ValueError, before any work, unless `momentum_type` is "local" or "quasi-global" with a
    torch.optim.SGD whose every group has momentum > 0 (quasi-global momentum replaces that
    momentum buffer; other optimizers have none)."""
    if momentum_type not in ("local", "quasi-global"):
        raise ValueError(f"momentum_type={momentum_type!r} is not one of local, quasi-global")
    if momentum_type == "quasi-global" and not (isinstance(optimizer, torch.optim.SGD)
                                                and all(group["momentum"] > 0 for group in optimizer.param_groups)):
        raise ValueError(f"momentum_type='quasi-global' replaces the momentum buffer of a wrapped torch.optim.SGD with "
                         f"momentum > 0 in every group; got {type(optimizer).__name__} (use momentum_type='local')")


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
