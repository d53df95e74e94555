"""The per-round plan of a graph, for one process's block of workers: its half-edges, in a
fixed order, with their mixing weights and slots.

Graph layer (docs/design.md): it reads a topology's pairs and mixing matrix and imports
only torch and numpy. Methods and the kernels read what it holds; comm.py builds one per
round's graph (`Communicator.half_edges(graph)`, kept per graph object) and derives from it
its routes, which rows travel to which peer process.
"""
from __future__ import annotations

import numpy as np
import torch


class HalfEdges:
    """The local half-edges of a topology, in a fixed order, with what the methods need.

    Half-edge h is (self_worker[h] -> neighbor[h]); they are ordered by local worker,
    then by neighbour id, so per-worker sums over half-edges happen in the same order
    in every layout. `weight_in[h]` = w_ij, the weight worker i gives to j's message;
    `sends[h]` is False only on directed graphs where j does not listen to i.
    """

    def __init__(self, topology, first_worker: int, num_local: int, device: torch.device):
        # Array operations over all half-edges at once: a round's plan costs time linear in
        # its edges, also when a graph over time makes a new one every round.
        W = topology.diffusion_matrix
        senders, neighbors = topology.half_edges_of(first_worker, num_local)
        self.topology = topology
        self.num = len(senders)
        self.on_host = (senders, neighbors)  # (i, j) of every half-edge, numpy int64
        self.self_worker_list = senders.tolist()
        self.neighbor_list = neighbors.tolist()
        self.pairs = list(zip(self.self_worker_list, self.neighbor_list))  # one list per plan: EdgeRows knows a repeated round by it
        as_long = lambda values: torch.as_tensor(values, dtype=torch.long, device=device)
        self.self_worker = as_long(senders)
        self.neighbor = as_long(neighbors)
        self.local_sender = self.self_worker - first_worker  # index into [L, ...] stacks
        self.weight_in = torch.tensor(W[senders, neighbors], dtype=torch.float32, device=device)
        local = np.arange(first_worker, first_worker + num_local)
        self.weight_self = torch.tensor(W[local, local], dtype=torch.float32, device=device)
        self._weights = {}  # dtype other than float32 -> (weight_self, incoming) in it
        self._float64_weights = (W[local, local], W[senders, neighbors])
        self.sends = W[neighbors, senders] > 0  # numpy booleans, one per half-edge
        self.receives = W[senders, neighbors] > 0
        self.is_lower = self.self_worker < self.neighbor  # this end holds the smaller worker id
        # slot[h]: the position of half-edge h among its worker's half-edges (a worker's
        # half-edges side by side in `[L, max_degree, ...]`, unused slots left empty).
        degrees = np.bincount(senders - first_worker, minlength=num_local)
        self.degrees = degrees.tolist()  # half-edges of each local worker, on the host
        slots = np.arange(self.num) - np.repeat(np.cumsum(degrees) - degrees, degrees)
        self.slot = as_long(slots)
        self.max_degree = int(degrees.max(initial=0))
        self.same_degree = bool(len(degrees)) and int(degrees.min()) == self.max_degree  # slot layout = half-edge order
        self.first_edge = as_long(np.concatenate([[0], np.cumsum(degrees)]))  # local worker l: half-edges first_edge[l] .. [l + 1] - 1
        # incoming[l, h] = w_ij on worker l's own half-edges: incoming @ messages = sum_j w_ij m_j.
        self.incoming = self.incoming_of(self.weight_in)

    def incoming_of(self, weight_in: torch.Tensor) -> torch.Tensor:
        """`[L, H]`: weight_in[h] at (local sender of h, h), zeros elsewhere, in weight_in's dtype."""
        incoming = weight_in.new_zeros((len(self.degrees), self.num))
        incoming[self.local_sender, torch.arange(self.num, device=incoming.device)] = weight_in
        return incoming

    def weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight_self `[L]`, incoming `[L, H]`) in `dtype`, rounded once from W's float64 values
        (float32: the attributes themselves; float64 parameters mix with W's exact weights, so
        that its rows and columns still sum to 1 to float64 precision)."""
        if dtype == torch.float32:
            return self.weight_self, self.incoming
        if dtype not in self._weights:
            own, weight_in = self._float64_weights
            device = self.incoming.device
            self._weights[dtype] = (torch.tensor(own, dtype=dtype, device=device),
                                    self.incoming_of(torch.tensor(weight_in, dtype=dtype, device=device)))
        return self._weights[dtype]
