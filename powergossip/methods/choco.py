"""Choco-Gossip (Koloskova, Stich, Jaggi 2019): compressed gossip with error feedback through
public copies x_hat of every worker's parameters."""
from __future__ import annotations

import numpy as np
import torch

from powergossip import kernels, topologies
from powergossip.methods.compressed import CompressedConfig, CompressedGossip, with_compressor
from powergossip.methods.registry import register_algorithm


class ChocoGossip(CompressedGossip):
    """Choco-Gossip (Koloskova et al. 2019, Algorithm 1 with the s_i bookkeeping):
    q_i = C(x_i - x_hat_i); send q_i; x_hat_i += q_i;
    s_i += sum_{j in N(i) + i} w_ij q_j; x_i += gamma (s_i - x_hat_i).
    gamma needs tuning per compressor (the paper's tuned values are in experiments/configs/train/).
    s_i stands for sum_j w_ij x_hat_j only while W stays the same: a graph that changes from
    round to round would need every neighbour's x_hat_j, which a worker receives only from the
    neighbours of the round, so Choco takes fixed graphs.

    Faults (faults.py): i's neighbours hold x_hat_i only inside their s, so a q_i that missed one
    of them would leave its copy stale for good. Rule: worker i publishes q_i (x_hat_i += q_i, and
    w_ji q_i into every neighbour's s_j) only in a round in which it reaches every neighbour of
    the fault-free graph: itself present, no link of its down, no neighbour away, none of its
    messages lost. One that knows beforehand that it will not (a link down, someone away) sends
    nothing; one with a message lost has sent (counted), and its neighbours drop what they got:
    the simulator tells them, where a real network would need an acknowledgement and a commit.
    So s_i = sum_j w_ij x_hat_j holds in every round with the fault-free W, each copy equals its
    owner's, and the step x_i += gamma (s_i - x_hat_i), which needs no message and which every
    worker takes (away or not), keeps the workers' average exactly. An unpublished q_i is not
    lost to error feedback: x_i - x_hat_i still holds it at the next round."""

    graph_needs = "fixed_symmetric"
    state_names = ("x_hat", "s")

    def __init__(self, comm, topology, compressor, diffusion_rate: float = 1.0, seed: int = 0):
        super().__init__(comm, topology, compressor, diffusion_rate, seed)
        # the W that s sums with: the fault-free one (a faults.FaultyTopology's rounds lose edges)
        self.fixed_weights = topologies.fault_free(topology).at(0).diffusion_matrix
        self.neighbours = (self.fixed_weights > 0) & ~np.eye(comm.n_workers, dtype=bool)  # [n, n]: those i must reach
        self.publishes = None  # under faults, this round's [n_workers] booleans: whose q_i counts

    def _sending_graph(self, graph):
        if self.faults is None:
            return graph
        # a link of its down, itself or a neighbour away: known before sending
        silent = (self.neighbours & (graph.diffusion_matrix == 0)).any(axis=1)
        self.publishes = ~silent & ~(self.neighbours & self.faults.lost(self.round - 1)).any(axis=1)
        return topologies.without_messages_of(graph, silent) if silent.any() else graph

    def _fault_weights(self, edges, arrived):
        """w_ii [i publishes] and w_ij [j publishes], from the fault-free W: s takes the published q only."""
        if self.publishes is None:
            return None
        senders, neighbours = edges.on_host
        local = np.arange(self.comm.first_worker, self.comm.first_worker + self.comm.num_local)
        # float32, rounded from W as HalfEdges rounds it
        as_weights = lambda w: torch.tensor(w, dtype=torch.float32, device=edges.weight_in.device)
        return (as_weights(self.fixed_weights[local, local] * self.publishes[local]),
                as_weights(self.fixed_weights[senders, neighbours] * self.publishes[neighbours]))

    def _fault_rule_in_torch(self):
        return self.faults is not None

    def _round(self, graph, edges, senders, params, x_hats, ss):
        layout = self._fused_sign_and_norm(senders, params, x_hats, ss)
        if layout is not None:  # q_i = C(x_i - x_hat_i), then the updates below in one pass
            self._fused_round(graph, edges, senders, layout, params, (x_hats, ss), -1, kernels.choco_update)
            return
        q, mixed = self._compress_and_exchange(graph, edges, senders, torch._foreach_sub(params, x_hats))
        if self.publishes is not None:  # only a published q_i moves x_hat_i
            mine = self.local_part(self.publishes)
            q = [torch.where(mine.view((-1,) + (1,) * (t.dim() - 1)), t, 0) for t in q]
        torch._foreach_add_(x_hats, q)  # x_hat_i += q_i
        torch._foreach_add_(ss, mixed)  # s_i += sum_{j in N(i) + i} w_ij q_j
        torch._foreach_add_(params, torch._foreach_sub(ss, x_hats), alpha=self.diffusion_rate)  # x_i += gamma (s_i - x_hat_i)


register_algorithm("choco", with_compressor(ChocoGossip), config=CompressedConfig, graph_needs=ChocoGossip)
