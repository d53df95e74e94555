"""What D² and gradient tracking share: gossip of the stepped parameters plus a correction,
x^{t+1} = W (x^{t+1/2} + c^t), run after the local step (any local optimizer: its update is
u^t = x^{t+1/2} - x^t). Each method says how c^t moves (d2.py, gradient_tracking.py)."""
from __future__ import annotations

import torch

from powergossip.methods.base import GossipConfig
from powergossip.methods.dpsgd import SimpleGossip


class CorrectedGossip(SimpleGossip):
    """x^{t+1} = W_gamma (x^{t+1/2} + c^t) with W_gamma = (1 - gamma) I + gamma W (gamma, the
    diffusion rate, 1 by default; 1/2 mixes with (I + W) / 2), c^0 = 0. Subclasses update c^t
    in `step`; its state (c^t, and what a subclass keeps) resumes through state_dict."""

    state_names = ("correction",)  # the per-parameter stacks this method keeps between steps

    def __init__(self, comm, topology, config: GossipConfig | None = None, **settings):
        super().__init__(comm, topology, config, **settings)
        self.correction = None  # c^t per parameter, [L, *shape]

    def start(self, params):
        if self.correction is None:
            self.correction = [torch.zeros_like(x) for x in params]

    def mix(self, stacks: list[torch.Tensor]) -> None:
        """stacks <- W_gamma stacks, in place, all in one exchange (one round)."""
        SimpleGossip.step(self, stacks)

    def state_dict(self):
        state = super().state_dict()
        for name in self.state_names:
            if getattr(self, name) is not None:
                state[name] = [x.clone() for x in getattr(self, name)]
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        for name in self.state_names:
            setattr(self, name, [x.to(self.comm.device) for x in state[name]] if name in state else None)
