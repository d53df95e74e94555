"""The training step: the order in which a method and the local optimizer step run once the
gradient at x_t is taken, written once for train.py and the drop-in DecentralizedOptimizer,
and the local optimizers over stacked workers that train.py steps with (Nesterov SGD with
local or quasi-global momentum).

The order is the paper's (D-PSGD as Lian et al. 2017 run it; Vogels, Karimireddy, Jaggi 2020,
"Deep learning experiments"), chosen by what the method was registered with
(algorithms.register_algorithm):

- acts_on="gradients" (PowerSGD): the method on the gradient stacks (their approximate
  average), then the local step with them;
- local_step_first=True (all-reduce, push-sum): the local step, then the method on the
  parameters;
- otherwise (D-PSGD, PowerGossip, Choco, ...): the method on the parameters x_t, then the
  local step on the gossiped parameters with the gradient taken at x_t.
"""
from __future__ import annotations

import contextlib

import torch

from powergossip import models


class TrainingStep:
    """The part of a training step after the gradient at x_t: `method` (a methods.Method)
    and a local step, in the order of the method's registry entry
    `entry` (its `acts_on` and `local_step_first`). The method changes in place the stacks
    `params` (`[L, *shape]`), or, when it acts on gradients, the gradient stacks: `gradients`,
    the stacks themselves or a function that returns them (called only for such a method).
    `timer(label)`, when given (runs.Timers), times the method under "gossip"."""

    def __init__(self, method, entry, params, gradients, timer=None):
        self.method = method
        self.on_gradients = entry.acts_on == "gradients"
        self.local_step_first = entry.local_step_first and not self.on_gradients
        self.params, self.gradients = params, gradients
        self.timer = timer
        self.started = False  # method.start(params) called, before the first local step

    def __call__(self, local_step, gossips: bool = True) -> None:
        """`local_step()` and, when `gossips` (train.py's local_steps=H: every H-th step), the method."""
        if self.local_step_first:
            if not self.started and hasattr(self.method, "start"):  # a user's method need not subclass Method
                self.method.start(self._stacks())  # x^0, for methods that form u^t = x^{t+1/2} - x^t
            self.started = True
            local_step()
        if gossips:
            with self.timer("gossip") if self.timer is not None else contextlib.nullcontext():
                self.method.step(self._stacks())
        if not self.local_step_first:
            local_step()

    def _stacks(self):
        if not self.on_gradients:
            return self.params
        return self.gradients() if callable(self.gradients) else self.gradients


# --- the local step over stacked workers ----------------------------------------------------------
def weight_decays(template, parameter_names, weight_decay: float) -> list[float]:
    """Each parameter's weight decay: none for those models.no_weight_decay_parameter_names lists."""
    no_decay = models.no_weight_decay_parameter_names(template)
    return [0.0 if name in no_decay else weight_decay for name in parameter_names]


def nesterov_sgd_step(params, grads, momenta, lr, momentum, decays, keep_momenta=False):
    """PyTorch's SGD with Nesterov momentum, on all workers' stacks at once:
    d = g + wd x; m = mu m + d; x -= lr (d + mu m). One fused (foreach) kernel per
    operation and weight-decay group instead of one per parameter. `lr` is a number, or a
    tensor `[L]` with one learning rate per worker (push-sum's lr / w). `keep_momenta`: the
    step uses m = mu m + d but leaves `momenta` as they were (quasi-global momentum's
    buffer, which QuasiGlobalMomentum updates)."""
    for wd in sorted(set(decays)):
        group = [k for k, decay in enumerate(decays) if decay == wd]
        x, g, m = [params[k] for k in group], [grads[k] for k in group], [momenta[k] for k in group]
        d = torch._foreach_add(g, x, alpha=wd) if wd else g
        if momentum:
            if keep_momenta:
                m = torch._foreach_mul(m, momentum)
            else:
                torch._foreach_mul_(m, momentum)
            torch._foreach_add_(m, d)
            d = torch._foreach_add(d, m, alpha=momentum)
        if isinstance(lr, torch.Tensor):
            for x_k, d_k in zip(x, d):
                x_k.sub_(d_k * per_worker(lr, d_k))
        else:
            torch._foreach_add_(x, d, alpha=-lr)


def per_worker(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`values` `[L]` shaped to broadcast over a stack `like` `[L, *shape]`, in its dtype."""
    return values.view((-1,) + (1,) * (like.dim() - 1)).to(like.dtype)


class QuasiGlobalMomentum:
    """Quasi-global momentum (Lin, Karimireddy, Stich, Jaggi, ICML 2021, arXiv 2102.04761,
    Algorithm 1) around a whole training step, whichever order the method and the local step
    run in: the local step uses the buffer m-hat without updating it (nesterov_sgd_step with
    keep_momenta=True), and after the method's round

        d = (x^t - x^{t+1}) / eta,    m-hat <- mu m-hat + (1 - mu) d,

    x^t the parameters before the step, x^{t+1} after the method and the local step, eta the
    local step's learning rate. The buffer follows the model's change over the gossip too,
    an estimate of the global direction on heterogeneous data; nothing more is sent.
    `momenta` (the stacks of m-hat, `[L, *shape]` like `params`) are a run's momentum
    buffers: checkpoints save them as such."""

    def __init__(self, params, momenta, momentum: float):
        self.params, self.momenta, self.momentum = params, momenta, momentum

    def __call__(self, training_step, lr) -> None:
        """`training_step()` (the method and the local step with learning rate `lr`: a number
        or a tensor `[L]`), then the update of m-hat."""
        start = self.start()
        training_step()
        self.update(start, lr)

    def start(self) -> list[torch.Tensor]:
        """x^t: a copy of the parameters before the step."""
        return [x.clone() for x in self.params]

    def update(self, start, lr) -> None:
        """m-hat <- mu m-hat + (1 - mu) (x^t - x^{t+1}) / lr, x^t being `start`."""
        change = torch._foreach_sub(start, self.params)  # x^t - x^{t+1}
        if isinstance(lr, torch.Tensor):
            for c in change:
                c.div_(per_worker(lr, c))
        else:
            torch._foreach_div_(change, lr)
        torch._foreach_mul_(self.momenta, self.momentum)
        torch._foreach_add_(self.momenta, change, alpha=1 - self.momentum)


def clip_per_worker(grads, max_norm: float):
    """Each worker's gradient scaled to norm <= max_norm (torch.nn.utils.clip_grad_norm_ per worker)."""
    norms = torch.sqrt(sum(g.reshape(g.shape[0], -1).float().pow(2).sum(dim=1) for g in grads))
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view((-1,) + (1,) * (g.dim() - 1)))
