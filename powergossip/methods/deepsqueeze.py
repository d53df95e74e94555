"""DeepSqueeze (Tang et al. 2019): compressed gossip of the parameters with error feedback."""
from __future__ import annotations

import torch

from powergossip import kernels
from powergossip.methods.compressed import CompressedConfig, CompressedGossip, with_compressor
from powergossip.methods.registry import register_algorithm


class DeepSqueezeGossip(CompressedGossip):
    """DeepSqueeze (Tang et al. 2019) with error feedback:
    v_i = x_i + delta_i; c_i = C(v_i); delta_i = v_i - c_i; send c_i;
    x_i += -gamma (1 - w_ii) c_i + gamma sum_{j in N(i)} w_ij c_j."""

    state_names = ("delta",)
    own_weight_offset = -1.0  # -(1 - w_ii) c_i

    def _round(self, graph, edges, senders, params, deltas):
        layout = self._fused_sign_and_norm(senders, params, deltas)
        if layout is not None:  # c_i = C(x_i + delta_i), then the updates below in one pass
            self._fused_round(graph, edges, senders, layout, params, (deltas,), +1, kernels.deepsqueeze_update)
            return
        torch._foreach_add_(deltas, params)  # v_i = x_i + delta_i, in delta's buffer
        c, mixed = self._compress_and_exchange(graph, edges, senders, deltas)
        torch._foreach_add_(params, mixed, alpha=self.diffusion_rate)  # x_i += gamma (sum_j w_ij c_j - (1 - w_ii) c_i)
        torch._foreach_sub_(deltas, c)  # delta_i = v_i - c_i


register_algorithm("deepsqueeze", with_compressor(DeepSqueezeGossip), config=CompressedConfig,
                   graph_needs=DeepSqueezeGossip)
