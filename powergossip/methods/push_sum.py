"""Push-sum gossip (Kempe et al. 2003) as Stochastic Gradient Push runs it (Assran et al. 2019):
directed graphs, column-stochastic mixing, de-biased by a per-worker weight."""
from __future__ import annotations

import torch

from powergossip.methods.base import GossipConfig
from powergossip.methods.dpsgd import SimpleGossip
from powergossip.methods.registry import register_algorithm


class PushSum(SimpleGossip):
    """Push-sum (Kempe et al. 2003, Algorithm 1 "Push-Sum"), as Stochastic Gradient Push runs
    it (Assran et al., ICML 2019, Algorithm 1): on a column-stochastic P_t every worker keeps
    a numerator x_i and a weight w_i (1 at the start) and mixes both alike,

        x_i <- sum_j p_ij x_j,    w_i <- sum_j p_ij w_j,

    sending p_ji-weighted copies to its out-neighbours (here: x_i and w_i once to each; the
    receiver applies p_ij). The parameters the caller holds are the de-biased z_i = x_i / w_i:
    they reach the average of the starting values on any strongly connected directed graph,
    doubly stochastic or not. A local step on z at learning rate lr / w_i (step_size_scale)
    is SGP's step x_i -= lr grad f(z_i) on the numerator. Bytes: x_i and the weight, one scalar."""

    graph_needs = "column_stochastic"
    config_class = GossipConfig

    def __init__(self, comm, topology, config: GossipConfig | None = None, **settings):
        super().__init__(comm, topology, config, **settings)
        self.weight = None  # w_i per local worker `[L]`, in the parameters' dtype (from the first step)

    def prepare(self, params):
        if self.weight is None and params:
            self.weight = torch.ones(params[0].shape[0], dtype=params[0].dtype, device=params[0].device)

    def step(self, params):
        if not params:
            self.next_graph()
            return
        self.prepare(params)
        per_worker = lambda x: self.weight.view((-1,) + (1,) * (x.dim() - 1))
        numerators = [x * per_worker(x) for x in params]
        weight = self.weight.unsqueeze(1).clone()
        super().step(numerators + [weight])  # x and w mixed alike, in one message per out-neighbour
        self.weight = weight[:, 0]
        for x, numerator in zip(params, numerators):
            torch.div(numerator, per_worker(x), out=x)

    def step_size_scale(self):
        return 1.0 if self.weight is None else 1 / self.weight

    def state_dict(self):
        return super().state_dict() | ({} if self.weight is None else {"weight": self.weight.clone()})

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.weight = state["weight"].to(self.comm.device) if "weight" in state else None


register_algorithm("push-sum", PushSum, needs_tuning=False, local_step_first=True, config=GossipConfig)  # SGP: step on z_t, then mix
