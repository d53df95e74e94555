"""AD-PSGD's pairwise average (Lian, Zhang, Zhang, Liu, ICML 2018, arXiv 1710.06952): an
asynchronous method, driven by the events of powergossip/asynchronous.py instead of rounds."""
from __future__ import annotations

import torch

from powergossip.comm import message_bytes
from powergossip.methods.base import GossipConfig, Method, configured
from powergossip.methods.registry import register_algorithm


class ADPSGD(Method):
    """Asynchronous decentralized SGD. There are no rounds: when worker i's gradient is done (an
    event of the simulated clock, which also draws its partner j among its neighbours), i and j
    average their models, both ends at once (Algorithm 1, line 4),

        x_i, x_j <- x_i + (gamma / 2) (x_j - x_i),  x_j + (gamma / 2) (x_i - x_j)

    (gamma = 1: both become (x_i + x_j) / 2, the paper's), and then i applies its gradient
    (line 5: the caller's local step). One model message goes each way, counted on both
    workers. The pair's sum is kept, so every event keeps the workers' mean. Its step runs
    on the stacks of one process holding both workers (asynchronous.check refuses mpirun)."""

    asynchronous = True
    graph_needs = "symmetric"  # the partner is a neighbour both ways: it sends its model back
    config_class = GossipConfig

    def __init__(self, comm, topology, config: GossipConfig | None = None, **settings):
        config = configured(GossipConfig, config, settings)
        super().__init__(comm, topology, config.diffusion_rate)

    def step(self, params):
        raise RuntimeError("ad-psgd is asynchronous: it has no rounds; its pair(params, worker, partner) runs at each "
                           "event of the simulated clock (train.py and gossip_run.py drive it with "
                           "powergossip/asynchronous.py)")

    def pair(self, params: list[torch.Tensor], worker: int, partner: int | None) -> None:
        """The event's average of workers `worker` and `partner` in the stacks `params`, in place
        (partner None: the worker has no neighbour in the event's graph and steps alone)."""
        if partner is None:
            return
        rows = [worker - self.comm.first_worker, partner - self.comm.first_worker]
        if not all(0 <= row < self.comm.num_local for row in rows):
            raise ValueError(f"workers {worker} and {partner} must both be this process's "
                             f"({self.comm.first_worker}..{self.comm.first_worker + self.comm.num_local - 1})")
        with torch.no_grad():
            for x in params:
                mine, theirs = x[rows[0]].clone(), x[rows[1]].clone()
                if self.diffusion_rate == 1.0:  # the plain average: the same bits at both ends
                    x[rows[0]] = x[rows[1]] = (mine + theirs) / 2
                else:
                    moved = (theirs - mine) * (self.diffusion_rate / 2)
                    x[rows[0]], x[rows[1]] = mine + moved, theirs - moved
        self.comm.bytes_sent[rows] += message_bytes(params)  # one model each way
        self.comm.messages_sent[rows] += 1

    def state_dict(self) -> dict:
        return {}  # no state: the events are the clock's

    def load_state_dict(self, state: dict) -> None:
        pass


register_algorithm("ad-psgd", ADPSGD, needs_tuning=False, config=GossipConfig)
