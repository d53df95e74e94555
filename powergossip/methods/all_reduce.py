"""All-reduce: the centralized baseline every decentralized method is measured against."""
from __future__ import annotations

from powergossip.methods.base import Method
from powergossip.methods.registry import register_algorithm


class AllReduce(Method):
    """The all-reduce baseline: every worker takes the exact average (bits: the buffer once per step)."""

    graph_needs = None

    def step(self, params):
        for x, mean in zip(params, self.comm.all_reduce_mean(params)):
            x.copy_(mean.unsqueeze(0).expand_as(x))

    def working_copies(self, degree, shapes):
        return 1.0  # the sum of one worker's size, whatever the graph


register_algorithm("all-reduce", AllReduce, needs_tuning=False, local_step_first=True)
