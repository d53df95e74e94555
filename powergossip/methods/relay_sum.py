"""RelaySum (Vogels, He, Koloskova, Karimireddy, Lin, Stich, Jaggi, NeurIPS 2021, "RelaySum for
decentralized deep learning on heterogeneous data", arXiv 2110.04175): on a spanning tree
every worker relays sums of its subtrees' models, so each worker averages all of them."""
from __future__ import annotations

import numpy as np
import torch

from powergossip import topologies
from powergossip.errors import require
from powergossip.methods.base import Method, sum_into_workers
from powergossip.methods.registry import register_algorithm


class RelaySum(Method):
    """RelaySum on a tree (or on TwoTrees, topologies.double_binary_trees), after the local step.

    Worker i holds x_i^{t+1/2}. To every tree neighbour j it sends

        m_{i->j}^t = x_i^{t+1/2} + sum_{k in N(i) \\ {j}} m_{k->i}^{t-1},
        c_{i->j}^t = 1 + sum_{k in N(i) \\ {j}} c_{k->i}^{t-1}       (m = c = 0 before round 0),

    and then x_i^{t+1} = (1/n) [x_i^{t+1/2} + sum_j m_{j->i}^t + (n - 1 - sum_j c_{j->i}^t) r_i]:
    worker k's term is its x_k^{t'+1/2} of d(i, k) - 1 rounds ago, the fill r_i standing in until
    it arrives. `fill_missing` picks r_i: "start" (the default, the paper's Algorithm 1) keeps
    x^0 (what `start()` was given, else the parameters of the first round); "latest" takes
    worker i's own last average x_i^t, as the RelaySGD paper's robustness runs do
    (epfml/relaysgd's relaysum_model_update_ref_state): a gap then pulls a worker towards where
    it is rather than back to x^0. On TwoTrees the first tree relays the even flat indices of
    every parameter, the second the odd ones.

    Bytes per tree neighbour and step: the tree's share of the entries, plus one int32 count
    per tree. State: the fill r_i, the last messages and counts received on every half-edge.

    Faults (faults.py), as epfml/relaysgd's relay mechanism takes a message that does not come:
    a lost message and its count are taken as 0, so they are not relayed and the receiver's
    n - 1 - sum_j c_{j->i} fills the gap with r_i. A tree link that is down, or one to or from
    a worker away, is not used (nothing sent or counted) and is taken as lost both ways; a
    worker away also leaves its own x (and its fill) as it is (it mixes nothing: an average of
    r_i and itself is no step of its own)."""

    graph_needs = "tree"
    FILLS = ("start", "latest")

    def __init__(self, comm, topology, fill_missing: str = "start"):
        super().__init__(comm, topology)
        require(fill_missing in self.FILLS, "fill_missing", f"must be one of {', '.join(self.FILLS)} (what stands in for the "
                f"models that have not arrived: x^0, or the worker's own last average), got {fill_missing!r}")
        base = topologies.fault_free(topology)  # faults.py: each round takes what the faults leave of the fixed trees
        self.trees = getattr(base, "trees", (base,))
        self.fill_missing = fill_missing
        self.fill = None  # the fill r_i per parameter, [L, *shape]: x^0, then (fill_missing="latest") x_i^t
        self.messages = None  # per tree, per parameter: [H, share] the last m_{j->i} received
        self.counts = None  # per tree: [H] int32, the last c_{j->i} received
        self.own = {}  # tree index -> [L, H] ones at (worker l, each of l's half-edges): per-worker sums

    def start(self, params):
        if self.fill is None:
            self.fill = [x.detach().clone() for x in params]

    def _share(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """Tree k's entries of a `[L, *shape]` stack, as a `[L, share]` view."""
        return x.view(x.shape[0], -1)[:, k::len(self.trees)]

    def step(self, params):
        self.next_graph()
        if not params:
            return
        self.start(params)
        n, rows, device = self.comm.n_workers, params[0].shape[0], params[0].device
        present = self.present_rows(self.round - 1)[1]  # the rows that mix: a worker away keeps its x
        if self.messages is None:
            self.messages, self.counts = [], []
            for k, tree in enumerate(self.trees):
                edges = self.comm.half_edges(tree)
                self.messages.append([x.new_zeros((edges.num, self._share(x, k).shape[1])) for x in params])
                self.counts.append(torch.zeros(edges.num, dtype=torch.int32, device=device))
        for k, tree in enumerate(self.trees):
            edges = self.comm.half_edges(tree)
            if k not in self.own:  # the trees are fixed graphs: their half-edges never change
                self.own[k] = torch.zeros((rows, edges.num), dtype=params[0].dtype, device=device)
                self.own[k][edges.local_sender, torch.arange(edges.num, device=device)] = 1
            own, sender = self.own[k], edges.local_sender
            shares = [self._share(x, k) for x in params]
            # m_{i->j} = x_i + (all i received) - (what i received from j); c likewise, in int32
            outgoing = [x[sender] + sum_into_workers(own, m)[sender] - m for x, m in zip(shares, self.messages[k])]
            received_counts = torch.zeros(rows, dtype=torch.int32, device=device).index_add_(0, sender, self.counts[k])
            outgoing_counts = 1 + received_counts[sender] - self.counts[k]
            *self.messages[k], self.counts[k], arrived = self._exchange(tree, edges, outgoing + [outgoing_counts])
            if arrived is not None:  # a lost message and its count: not relayed, the gap filled with r_i
                self.messages[k] = [torch.where(arrived.unsqueeze(1), m, 0) for m in self.messages[k]]
                self.counts[k] = torch.where(arrived, self.counts[k], 0)
            arrived = torch.zeros(rows, dtype=torch.int32, device=device).index_add_(0, sender, self.counts[k])
            missing = (n - 1 - arrived).to(params[0].dtype).unsqueeze(1)
            for x, fill, m in zip(shares, self.fill, self.messages[k]):
                x[present] = ((x + sum_into_workers(own, m) + missing * self._share(fill, k)) / n)[present]
        if self.fill_missing == "latest":  # the next round's gaps take this average (a worker away keeps its fill)
            for fill, x in zip(self.fill, params):
                fill[present] = x[present]

    def _exchange(self, tree, edges, payloads):
        """The payloads `[H, ...]` of the tree's half-edges `edges` sent along the links of this
        round (faults.py): what each half-edge received (0 where nothing came), and whether it
        arrived (None: all did)."""
        faults = self.faults
        graph = tree if faults is None else faults.graph(tree, self.round - 1)  # the tree less its cut links
        if graph is tree:
            return self.comm.exchange(tree, payloads) + [self.arrived(edges)]
        used = self.comm.half_edges(graph)
        n = self.comm.n_workers
        keys = lambda half_edges: half_edges.on_host[0] * n + half_edges.on_host[1]  # both sorted by (i, j)
        at = torch.as_tensor(np.searchsorted(keys(edges), keys(used)), device=self.comm.device)
        received = self.comm.exchange(graph, [p[at] for p in payloads])
        came = self.arrived(used)
        came = torch.ones(used.num, dtype=torch.bool, device=at.device) if came is None else came
        return [r.new_zeros((edges.num,) + r.shape[1:]).index_copy_(0, at, r) for r in received + [came]]

    def state_dict(self):
        state = super().state_dict()
        if self.fill is not None:  # saved as "initial", its name when it could only be x^0
            state["initial"] = [x.clone() for x in self.fill]
        if self.messages is not None:
            state["messages"] = [[m.clone() for m in tree] for tree in self.messages]
            state["counts"] = [c.clone() for c in self.counts]
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        device = self.comm.device
        self.fill = [x.to(device) for x in state["initial"]] if "initial" in state else None
        self.messages = [[m.to(device) for m in tree] for tree in state["messages"]] if "messages" in state else None
        self.counts = [c.to(device) for c in state["counts"]] if "counts" in state else None


register_algorithm("relay-sum", RelaySum, needs_tuning=False, local_step_first=True)
