"""Gradient tracking in the adapt-then-combine form of RelaySGD's code base (epfml/relaysgd):
each worker tracks the average update with a correction gossiped alongside its model."""
from __future__ import annotations

from powergossip.methods.base import GossipConfig
from powergossip.methods.corrected import CorrectedGossip
from powergossip.methods.registry import register_algorithm


class GradientTracking(CorrectedGossip):
    """Gradient tracking after the local step, u^t = x^{t+1/2} - x^t:

        x^{t+1} = W (x^{t+1/2} + c^t),    c^{t+1} = W (c^t + u^t) - u^t,    c^0 = 0;

    with plain SGD (u^t = -alpha g^t) this is x^{t+1} = W (x^t - alpha y^t),
    y^{t+1} = W y^t + g^{t+1} - g^t, y^0 = g^0 (c^t = -alpha (y^t - g^t)). It keeps x^t (its own
    last output; x^0 from `start`, else the first parameters it sees) and c^t. W: doubly
    stochastic (W_gamma = (1 - gamma) I + gamma W). Bytes: two vectors per edge per round."""

    graph_needs = "doubly_stochastic"
    config_class = GossipConfig
    state_names = ("correction", "previous")

    def __init__(self, comm, topology, config: GossipConfig | None = None, **settings):
        super().__init__(comm, topology, config, **settings)
        self.previous = None  # x^t per parameter

    def start(self, params):
        super().start(params)
        if self.previous is None:
            self.previous = [x.detach().clone() for x in params]

    def step(self, params):
        self.start(params)
        for x, c, u in zip(params, self.correction, self.previous):
            u.neg_().add_(x)  # u^t = x^{t+1/2} - x^t, in x^t's buffer
            x.add_(c)  # x^{t+1/2} + c^t
            c.add_(u)  # c^t + u^t
        self.mix(list(params) + self.correction)  # both in one message per neighbour
        for x, c, u in zip(params, self.correction, self.previous):
            c.sub_(u)  # c^{t+1} = W (c^t + u^t) - u^t
            u.copy_(x)  # x^{t+1}, next round's x^t


register_algorithm("gradient-tracking", GradientTracking, needs_tuning=False, local_step_first=True, config=GossipConfig)
