"""All-reduce: the centralized baseline every decentralized method is measured against."""
from __future__ import annotations

from powergossip.methods.base import Method
from powergossip.methods.registry import register_algorithm


class AllReduce(Method):
    """The all-reduce baseline: every worker takes the exact average (bits: the buffer once per step).
    With workers away (faults.py's offline_probability, churn), the round's average is over the
    workers present, which alone send and take it; a worker away keeps its own model."""

    graph_needs = None

    def step(self, params):
        self.next_graph()  # one more round: the faults' draws are keyed by it
        present, mine = self.present_rows(self.round - 1)
        for x, mean in zip(params, self.comm.all_reduce_mean(params, present=present)):
            x[mine] = mean.to(x.dtype)

    def working_copies(self, degree, shapes):
        return 1.0  # the sum of one worker's size, whatever the graph


register_algorithm("all-reduce", AllReduce, needs_tuning=False, local_step_first=True)
