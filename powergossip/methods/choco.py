"""Choco-Gossip (Koloskova, Stich, Jaggi 2019): compressed gossip with error feedback through
public copies x_hat of every worker's parameters."""
from __future__ import annotations

import torch

from powergossip import kernels
from powergossip.methods.compressed import CompressedConfig, CompressedGossip, with_compressor
from powergossip.methods.registry import register_algorithm


class ChocoGossip(CompressedGossip):
    """Choco-Gossip (Koloskova et al. 2019, Algorithm 1 with the s_i bookkeeping):
    q_i = C(x_i - x_hat_i); send q_i; x_hat_i += q_i;
    s_i += sum_{j in N(i) + i} w_ij q_j; x_i += gamma (s_i - x_hat_i).
    gamma needs tuning per compressor (the paper's tuned values are in experiments/configs/train/).
    s_i stands for sum_j w_ij x_hat_j only while W stays the same: a graph that changes from
    round to round would need every neighbour's x_hat_j, which a worker receives only from the
    neighbours of the round, so Choco takes fixed graphs."""

    graph_needs = "fixed_symmetric"
    state_names = ("x_hat", "s")

    def _round(self, graph, edges, senders, params, x_hats, ss):
        layout = self._fused_sign_and_norm(senders, params, x_hats, ss)
        if layout is not None:  # q_i = C(x_i - x_hat_i), then the updates below in one pass
            self._fused_round(graph, edges, senders, layout, params, (x_hats, ss), -1, kernels.choco_update)
            return
        q, mixed = self._compress_and_exchange(graph, edges, senders, torch._foreach_sub(params, x_hats))
        torch._foreach_add_(x_hats, q)  # x_hat_i += q_i
        torch._foreach_add_(ss, mixed)  # s_i += sum_{j in N(i) + i} w_ij q_j
        torch._foreach_add_(params, torch._foreach_sub(ss, x_hats), alpha=self.diffusion_rate)  # x_i += gamma (s_i - x_hat_i)


register_algorithm("choco", with_compressor(ChocoGossip), config=CompressedConfig, graph_needs=ChocoGossip)
