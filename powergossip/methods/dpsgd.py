"""D-PSGD's gossip (Lian et al. 2017): every worker mixes its neighbours' full parameters."""
from __future__ import annotations

import torch

from powergossip.methods.base import GossipConfig, Method, configured, sum_into_workers
from powergossip.methods.registry import register_algorithm


class SimpleGossip(Method):
    """Uncompressed gossip (D-PSGD): x_i += gamma * sum_{j in N(i)} w_ij (x_j - x_i).
    Sends the full x_i to each neighbour. Works on directed graphs too, as long as W
    is doubly stochastic (the average is kept and reached). A message lost on its way
    (faults.py) counts as sent; the receiver mixes as if w_ij were 0 and its own weight
    1 - sum of the rest, so the average drifts."""

    graph_needs = "doubly_stochastic"
    config_class = GossipConfig

    def __init__(self, comm, topology, config: GossipConfig | None = None, **settings):
        config = configured(GossipConfig, config, settings)
        super().__init__(comm, topology, config.diffusion_rate)

    def step(self, params):
        graph = self.next_graph()
        if not params:
            return
        edges = self.comm.half_edges(graph)
        received = self.comm.exchange(graph, params, per="worker")
        arrived = self.arrived(edges)
        for k, (x, from_neighbors) in enumerate(zip(params, received)):
            weight_self, incoming = edges.weights(x.dtype if x.is_floating_point() else torch.float32)
            if arrived is not None:  # a lost message's weight moves to the receiver's own: W is no longer symmetric
                incoming = incoming * arrived.to(incoming.dtype)
                weight_self = 1 - incoming.sum(dim=1)
            keep = 1 - self.diffusion_rate * (1 - weight_self)  # 1 - gamma sum_{j in N(i)} w_ij
            # x = keep x + gamma sum_j w_ij x_j: one scaling, then the neighbours' sum added (not one
            # fused product with x inside: its order would depend on the workers beside it).
            x.mul_(keep.to(x.dtype).view((-1,) + (1,) * (x.dim() - 1)))
            self._add_received(k, x, sum_into_workers(incoming, from_neighbors))

    def _add_received(self, k: int, x: torch.Tensor, received: torch.Tensor) -> None:
        """x += gamma * received, where received = sum_{j in N(i)} w_ij x_j is what this round's
        messages bring to the k-th stack (push-sum's one_step_delay adds it a round later)."""
        x.add_(received, alpha=self.diffusion_rate)


register_algorithm("dpsgd", SimpleGossip, needs_tuning=False, config=GossipConfig)
