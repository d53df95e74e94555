"""Push-sum gossip (Kempe et al. 2003) as Stochastic Gradient Push runs it (Assran et al. 2019):
directed graphs, column-stochastic mixing, de-biased by a per-worker weight."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from powergossip.methods.base import EdgeRows, GossipConfig, configured, require, sum_into_workers
from powergossip.methods.dpsgd import SimpleGossip
from powergossip.methods.registry import register_algorithm


@dataclass(kw_only=True)
class PushSumConfig(GossipConfig):
    """Push-sum's settings, each with what it trades."""

    one_step_delay: bool = False  # overlapped SGP (tau = 1): a round's messages are added a round later, so
    # sending hides behind the next step's compute; the same bytes, w moves off 1 on every graph, mixing lags a round

    def __post_init__(self):
        super().__post_init__()
        require(isinstance(self.one_step_delay, bool), "one_step_delay", f"must be true or false, got {self.one_step_delay!r}")


class PushSum(SimpleGossip):
    """Push-sum (Kempe et al. 2003, Algorithm 1 "Push-Sum"), as Stochastic Gradient Push runs
    it (Assran et al., ICML 2019, Algorithm 1): on a column-stochastic P_t every worker keeps
    a numerator x_i and a weight w_i (1 at the start) and mixes both alike,

        x_i <- sum_j p_ij x_j,    w_i <- sum_j p_ij w_j,

    sending p_ji-weighted copies to its out-neighbours (here: x_i and w_i once to each; the
    receiver applies p_ij). The parameters the caller holds are the de-biased z_i = x_i / w_i:
    they reach the average of the starting values on any strongly connected directed graph,
    doubly stochastic or not. A local step on z at learning rate lr / w_i (step_size_scale)
    is SGP's step x_i -= lr grad f(z_i) on the numerator. Bytes: x_i and the weight, one scalar.

    `one_step_delay`: overlapped SGP with tau = 1 (Assran et al. 2019, Algorithm 3, "Overlap SGP"):
    what a round's messages bring is added one round later,

        x_i <- p_ii x_i + sum_{j != i} p_ij^(t-1) x_j^(t-1),   w_i likewise (nothing arrives at round 0),

    so a worker need not wait for this round's messages; they are part of the state
    (`in_flight`, each worker's sum of them, saved with it), and sum_i w_i + in flight = n."""

    graph_needs = "column_stochastic"
    config_class = PushSumConfig

    def __init__(self, comm, topology, config: PushSumConfig | None = None, **settings):
        config = configured(PushSumConfig, config, settings)
        super().__init__(comm, topology, config)
        self.one_step_delay = config.one_step_delay
        self.weight = None  # w_i per local worker `[L]`, in the parameters' dtype (from the first step)
        # one_step_delay: per stack (the parameters', then the weight's `[L, 1]`), sum_{j != i} p_ij x_j of the
        # messages received last round (p_ij = gamma w_ij), added this round (zeros before the first)
        self.in_flight = None
        # with messages lost one way (_robust_step): each half-edge's running sums, one row per pair ever seen
        self.edge_rows = EdgeRows(memory=None)
        self.sent_sums, self.got_sums = None, None

    def prepare(self, params):
        if self.weight is None and params:
            self.weight = torch.ones(params[0].shape[0], dtype=params[0].dtype, device=params[0].device)
        if self.one_step_delay and self.in_flight is None and params:
            self.in_flight = [torch.zeros_like(x) for x in params] + [self.weight.new_zeros((self.weight.shape[0], 1))]

    def _add_received(self, k, x, received):
        """one_step_delay: last round's messages (Algorithm 3, lines 10-11) are added, this round's kept."""
        if not self.one_step_delay:
            return super()._add_received(k, x, received)
        x.add_(self.in_flight[k])
        self.in_flight[k] = received.mul_(self.diffusion_rate)  # sum_j p_ij x_j, as the running sums' arrivals

    def step(self, params):
        if not params:
            self.next_graph()
            return
        self.prepare(params)
        per_worker = lambda x: self.weight.view((-1,) + (1,) * (x.dim() - 1))
        numerators = [x * per_worker(x) for x in params]
        weight = self.weight.unsqueeze(1).clone()
        if self.loses_messages():
            self._robust_step(numerators + [weight])
        else:
            super().step(numerators + [weight])  # x and w mixed alike, in one message per out-neighbour
        self.weight = weight[:, 0]
        for x, numerator in zip(params, numerators):
            torch.div(numerator, per_worker(x), out=x)

    def _robust_step(self, values) -> None:
        """Running-sum push-sum (Hadjicostis, Dominguez-Garcia, Charalambous, IEEE TAC 2016), for
        messages lost one way (faults.py): for every out-edge i -> j the sender keeps the running
        sum sigma_ij of all it has ever pushed along it, gamma w_ji v_i per round, and sends it
        (float64: the sums grow with the rounds); the receiver keeps rho_ji, the last sum that
        arrived from j, and adds sigma_ji - rho_ji when one does:

            v_i <- (1 - gamma (1 - w_ii)) v_i + sum_{j: arrived} (sigma_ji - rho_ji),   rho_ji <- sigma_ji

        so the mass of a lost message arrives with the next one that gets through, none is lost,
        and x / w reaches the exact average. Bytes: the float64 sums, 8 bytes an entry."""
        graph = self.next_graph()
        edges = self.comm.half_edges(graph)
        W = graph.diffusion_matrix
        senders, neighbors = edges.on_host
        rows = torch.as_tensor(self.edge_rows.assign(edges.pairs, self.round - 1)[0], device=self.comm.device)
        flat = [v.reshape(v.shape[0], -1).double() for v in values]
        if self.sent_sums is None:
            self.sent_sums = [v.new_zeros((0, v.shape[1])) for v in flat]
            self.got_sums = [v.new_zeros((0, v.shape[1])) for v in flat]
        grow = len(self.edge_rows.edge_of_row) - self.sent_sums[0].shape[0]
        if grow > 0:
            self.sent_sums = [torch.cat([s, s.new_zeros((grow, s.shape[1]))]) for s in self.sent_sums]
            self.got_sums = [torch.cat([g, g.new_zeros((grow, g.shape[1]))]) for g in self.got_sums]
        pushed = torch.as_tensor(self.diffusion_rate * W[neighbors, senders], dtype=torch.float64, device=flat[0].device)
        for sums, v in zip(self.sent_sums, flat):
            sums[rows] += pushed.unsqueeze(1) * v[edges.local_sender]
        received = self.comm.exchange(graph, [sums[rows] for sums in self.sent_sums], per="half_edge")
        arrived = self.arrived(edges)
        own = (edges.weights(torch.float64)[1] != 0).double()  # [L, H]: 1 on each worker's half-edges
        local = range(self.comm.first_worker, self.comm.first_worker + self.comm.num_local)
        keep = torch.as_tensor(1 - self.diffusion_rate * (1 - W[local, local]), dtype=torch.float64, device=flat[0].device)
        for k, (value, v, got, sums) in enumerate(zip(values, flat, self.got_sums, received)):
            new_mass = torch.where(arrived.unsqueeze(1), sums - got[rows], 0)
            got[rows] = torch.where(arrived.unsqueeze(1), sums, got[rows])
            arriving = sum_into_workers(own, new_mass)
            if self.one_step_delay:  # last round's arrivals now, this round's the next (running sums are delay-proof)
                arriving, self.in_flight[k] = self.in_flight[k].reshape(arriving.shape).double(), \
                    arriving.reshape(value.shape).to(value.dtype)
            mixed = keep.unsqueeze(1) * v + arriving
            value.copy_(mixed.reshape(value.shape).to(value.dtype))

    def working_copies(self, degree, shapes):
        return super().working_copies(degree, shapes) + (1.0 if self.one_step_delay else 0.0)  # the messages in flight

    def step_size_scale(self):
        return 1.0 if self.weight is None else 1 / self.weight

    def state_dict(self):
        state = super().state_dict() | ({} if self.weight is None else {"weight": self.weight.clone()})
        if self.in_flight is not None:
            state["in_flight"] = [m.clone() for m in self.in_flight]
        if self.sent_sums is not None:
            state |= {"edge_rows": self.edge_rows.state_dict(),
                      "sent_sums": [s.clone() for s in self.sent_sums], "got_sums": [g.clone() for g in self.got_sums]}
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.weight = state["weight"].to(self.comm.device) if "weight" in state else None
        self.in_flight = [m.to(self.comm.device) for m in state["in_flight"]] if "in_flight" in state else None
        self.edge_rows = EdgeRows(memory=None)
        if "edge_rows" in state:
            self.edge_rows.load_state_dict(state["edge_rows"])
        self.sent_sums = [s.to(self.comm.device) for s in state["sent_sums"]] if "sent_sums" in state else None
        self.got_sums = [g.to(self.comm.device) for g in state["got_sums"]] if "got_sums" in state else None


register_algorithm("push-sum", PushSum, needs_tuning=False, local_step_first=True, config=PushSumConfig)  # SGP: step on z_t, then mix
