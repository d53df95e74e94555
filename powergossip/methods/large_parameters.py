"""A compressed method on the large parameters only, uncompressed gossip on the rest (the
paper's experiments: biases and batch norm are gossiped exactly)."""
from __future__ import annotations

import torch

from powergossip.compressors import worth_compressing
from powergossip.methods.base import Method


def _switch_of_both(name: str) -> property:
    """A switch of Method (fused_kernels, in_process_mixing) that, set on a method made of
    two, reaches both; read, it is on when it is on in either."""
    def set_both(self, on: bool) -> None:
        setattr(self.compressed, name, on)
        setattr(self.uncompressed, name, on)
    return property(lambda self: getattr(self.compressed, name) or getattr(self.uncompressed, name), set_both)


class OnlyOnLargeParameters(Method):
    """The compressed method on tensors with ndim > 1 (per worker), uncompressed gossip
    on 1-D tensors (biases, batch norm), as in the paper's experiments.

    min_compression_rate (PowerSGD's rule): a matrix m x n whose rank-r factors would
    compress it by less than this factor, m n / ((m + n) r) < min_compression_rate,
    is gossiped uncompressed too (needs `rank`)."""

    graph_needs = None  # its two methods check the graph

    def __init__(self, compressed: Method, uncompressed: Method,
                 min_compression_rate: float | None = None, rank: int | None = None):
        super().__init__(compressed.comm, compressed.topology, compressed.diffusion_rate)
        if min_compression_rate is not None and rank is None:
            raise ValueError("min_compression_rate needs the compressor's rank")
        self.compressed, self.uncompressed = compressed, uncompressed
        self.min_compression_rate, self.rank = min_compression_rate, rank

    fused_kernels = _switch_of_both("fused_kernels")
    in_process_mixing = _switch_of_both("in_process_mixing")

    def is_compressed(self, x: torch.Tensor) -> bool:
        if x.dim() <= 2:  # [L, n]: a 1-D parameter
            return False
        return self.min_compression_rate is None or worth_compressing(x.shape[1:], self.rank, self.min_compression_rate)

    def step(self, params):
        compressed = [x for x in params if self.is_compressed(x)]
        uncompressed = [x for x in params if not self.is_compressed(x)]
        self.compressed.step(compressed)
        self.uncompressed.step(uncompressed)

    def state_dict(self):
        return {"compressed": self.compressed.state_dict(), "uncompressed": self.uncompressed.state_dict()}

    def load_state_dict(self, state):
        self.compressed.load_state_dict(state["compressed"])
        self.uncompressed.load_state_dict(state["uncompressed"])
