"""A compressed method on the large parameters only, uncompressed gossip on the rest (the
paper's experiments: biases and batch norm are gossiped exactly)."""
from __future__ import annotations

import math

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
        return self.compresses(x.shape[1:])

    def compresses(self, shape) -> bool:
        """Whether a worker's parameter of `shape` goes to the compressed method."""
        if len(shape) <= 1:  # a 1-D parameter
            return False
        return self.min_compression_rate is None or worth_compressing(shape, self.rank, self.min_compression_rate)

    def _split(self, params) -> tuple[list, list]:
        return [x for x in params if self.is_compressed(x)], [x for x in params if not self.is_compressed(x)]

    def prepare(self, params):
        compressed, uncompressed = self._split(params)
        self.compressed.prepare(compressed)
        self.uncompressed.prepare(uncompressed)

    def step(self, params):
        compressed, uncompressed = self._split(params)
        self.compressed.step(compressed)
        self.uncompressed.step(uncompressed)

    def working_copies(self, degree, shapes):
        """Each method's copies of its own parameters, weighed by their sizes."""
        parts = [[s for s in shapes if self.compresses(s) == compressed] for compressed in (True, False)]
        size = lambda some: sum(math.prod(s) for s in some)
        return sum(size(part) * method.working_copies(degree, part) for part, method in
                   zip(parts, (self.compressed, self.uncompressed)) if part) / max(1, size(shapes))

    def state_dict(self):
        return {"compressed": self.compressed.state_dict(), "uncompressed": self.uncompressed.state_dict()}

    def load_state_dict(self, state):
        self.compressed.load_state_dict(state["compressed"])
        self.uncompressed.load_state_dict(state["uncompressed"])
