"""PowerGossip (Vogels, Karimireddy, Jaggi 2020, Algorithm 1): low-rank approximations of the
parameter differences across each edge by power iteration, warm-started across steps, with
the per-edge state (P, Q, the edge's generator) kept across the rounds an edge is absent."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from powergossip import kernels, topologies
from powergossip.methods.base import (EdgeRows, GossipConfig, Method, add_matmul_per_worker_, check_layout, configured, edge_seed,
                                      from_worker_slots, matmul_per_worker, matrix_groups, matrix_view, orthogonalize_,
                                      require, to_worker_slots)
from powergossip.methods.dpsgd import SimpleGossip
from powergossip.methods.large_parameters import OnlyOnLargeParameters
from powergossip.methods.registry import register_algorithm


@dataclass(kw_only=True)
class PowerGossipConfig(GossipConfig):
    """PowerGossip's settings (the paper's defaults), each with what it trades."""

    rank: int = 1  # columns r of the factors: bits per round grow as r (m + n) per matrix; a better approximation of D
    num_iterations: int = 1  # power-iteration rounds per step: a better approximation, more messages and bits (all on the step's graph)
    warm_start: bool = True  # continue each edge's power iteration across steps (the paper's default), or redraw from its generator
    round_weights: bool = False  # the sign variant (rank 1): start vector sign(v) / sqrt(len(v)) instead of orthonormalized
    edge_memory: int | None = None  # graphs over time: rounds an absent edge keeps P, Q, its generator (None: the period - 1, 16 without one, always for a fixed graph's edges that faults cut; 0: afresh)
    seed: int = 0  # the run's seed: the edges' shared generators

    def __post_init__(self):
        super().__post_init__()
        require(self.rank >= 1, "rank", f"must be >= 1, got {self.rank}")
        require(self.num_iterations >= 1, "num_iterations", f"must be >= 1, got {self.num_iterations}")
        require(not (self.round_weights and self.rank != 1), "round_weights", "(the sign variant) is defined for rank 1 only")
        require(self.edge_memory is None or (not isinstance(self.edge_memory, bool) and isinstance(self.edge_memory, int)
                                             and self.edge_memory >= 0),
                "edge_memory", f"must be an integer >= 0 (rounds) or None, got {self.edge_memory!r}")


class PowerGossip(Method):
    """PowerGossip (Vogels et al. 2020, Algorithm 1): low-rank approximations of the
    parameter differences D = X_max(i,j) - X_min(i,j) across each edge, by power
    iteration that continues across steps.

    Its settings and what they trade: PowerGossipConfig.
    Each matrix of shape m x n (m = shape[0]) uses rank r' = min(r, m, n).
    """

    config_class = PowerGossipConfig
    DEFAULT_EDGE_MEMORY = 16  # rounds an absent edge's state is kept on graphs without a period
    ROWS_KEPT = 64  # distinct rounds' state rows kept on the device (a periodic graph's phases)

    def __init__(self, comm, topology, config: PowerGossipConfig | None = None, **settings):
        config = configured(PowerGossipConfig, config, settings)
        super().__init__(comm, topology, config.diffusion_rate)
        self.rank, self.num_iterations, self.warm_start = config.rank, config.num_iterations, config.warm_start
        self.round_weights, self.seed = config.round_weights, config.seed
        edge_memory = config.edge_memory
        base = topologies.fault_free(topology)  # faults.FaultyTopology: a fault is not an absence
        if edge_memory is None and base is not topology and base.period == 1:
            edge_memory = None  # a fixed graph's edges, down for a while: each keeps P, Q and its generator, and goes on
        elif edge_memory is None:
            edge_memory = base.period - 1 if base.period else self.DEFAULT_EDGE_MEMORY
        self.iteration = 0  # runs on across steps (the sign of the next power-iteration half-step)
        self.edge_memory = edge_memory
        self._pending_state = None  # a loaded state waits for the first step, which knows the shapes
        self._start_afresh()

    # -- state ------------------------------------------------------------------------------
    def _start_afresh(self) -> None:
        """No per-edge state yet: the next step sees the stacks and starts every edge anew."""
        self.groups = None  # [(param indices, m, n, r)]: same-shape matrices are batched
        self.edge_rows = EdgeRows(self.edge_memory)
        # Per-edge state, one row per EdgeRows row: P `[rows, G, m, r]` and Q `[rows, G, n, r]` per group,
        # the edge's generator and how many power-iteration half-steps it has done (its next one's parity).
        self.p, self.q, self.generators = None, None, []
        self.half_steps = np.zeros(0, dtype=np.int64)
        # Rounds' rows: (on the host, on the device, whether they are every pool row in order), kept for
        # the ROWS_KEPT latest distinct ones (every phase of a periodic graph such as one_peer_hypercube)
        self._rows: dict[tuple[bytes, int], tuple[np.ndarray, torch.Tensor, bool]] = {}
        self._matrix_layout = None  # the fused kernels' kernels.MatrixLayout of the groups, once built

    def _init_state(self, params):
        self.groups = matrix_groups(params, self.rank)
        self._matrix_layout = None  # built for the groups of the first fused half-step
        self.p = [torch.zeros((0, len(indices), m, r), device=self.comm.device) for indices, m, n, r in self.groups]
        self.q = [torch.zeros((0, len(indices), n, r), device=self.comm.device) for indices, m, n, r in self.groups]
        pending, self._pending_state = self._pending_state, None
        if pending is not None:
            self.p = [p.to(self.comm.device, copy=True) for p in pending["p"]]  # the loaded dict stays as it was
            self.q = [q.to(self.comm.device, copy=True) for q in pending["q"]]
            self.generators = [None if saved is None else torch.Generator(device="cpu") for saved in pending["generators"]]
            for generator, saved in zip(self.generators, pending["generators"]):
                if saved is not None:
                    generator.set_state(saved)
            self.edge_rows.load_state_dict(pending["edge_rows"])
            self.half_steps = pending["half_steps"].numpy().astype(np.int64)

    def _rows_of_round(self, edges, round: int) -> tuple[np.ndarray, torch.Tensor, bool]:
        """This round's state rows in half-edge order, on the host and on the device, and whether
        they are every row of the pools in order (a static graph: the pools are the round's P and Q).
        A half-edge whose state starts now gets a generator seeded by its edge (and the round,
        after round 0) and draws P, then Q, from it, so that both ends hold identical buffers."""
        rows, fresh, freed = self.edge_rows.assign(edges.pairs, round)
        grow = len(self.edge_rows.edge_of_row) - self.p[0].shape[0] if self.p else 0
        if grow > 0:
            self.p = [torch.cat([p, p.new_zeros((grow,) + p.shape[1:])]) for p in self.p]
            self.q = [torch.cat([q, q.new_zeros((grow,) + q.shape[1:])]) for q in self.q]
        self.generators += [None] * (len(self.edge_rows.edge_of_row) - len(self.generators))
        if len(self.half_steps) < len(self.generators):
            self.half_steps = np.concatenate([self.half_steps, np.zeros(len(self.generators) - len(self.half_steps), np.int64)])
        if fresh:
            fresh_rows = rows[fresh]
            self.half_steps[fresh_rows] = 0
            for position, row in zip(fresh, fresh_rows):
                generator = torch.Generator(device="cpu")
                generator.manual_seed(edge_seed(self.seed, edges.self_worker_list[position], edges.neighbor_list[position],
                                                since=round))
                self.generators[row] = generator
            fresh_generators = [self.generators[row] for row in fresh_rows]
            fresh_rows = torch.as_tensor(fresh_rows, device=self.comm.device)
            for pool, drawn in zip(self.p, self._draw(fresh_generators, lambda m, n, r: (m, r))):
                pool[fresh_rows] = drawn
            for pool, drawn in zip(self.q, self._draw(fresh_generators, lambda m, n, r: (n, r))):
                pool[fresh_rows] = drawn
        for row in freed:
            self.generators[row] = None  # a freed row's generator goes with its edge (its P and Q rows wait for reuse)
        rows = np.asarray(rows, dtype=np.int64)
        key = (rows.tobytes(), len(self.generators))
        kept = self._rows.pop(key, None)
        if kept is None:
            # Copied to the device once per distinct round (never again on a static or periodic graph):
            # a copy from the host each round would wait for the GPU's queue to drain at every step.
            every_row = bool(len(rows) == len(self.generators) and np.array_equal(rows, np.arange(len(rows))))
            kept = (rows, torch.tensor(rows, dtype=torch.long, device=self.comm.device), every_row)
            if len(self._rows) >= self.ROWS_KEPT:
                del self._rows[next(iter(self._rows))]  # the least recently used
        self._rows[key] = kept
        return kept

    def _draw(self, generators, factor_shape) -> list[torch.Tensor]:
        """Fresh standard normal factors `[len(generators), G, rows, r]` per group from the edges' generators."""
        shapes = [(len(indices),) + factor_shape(m, n, r) for indices, m, n, r in self.groups]
        sizes = [math.prod(s) for s in shapes]
        draws = torch.stack([torch.randn(sum(sizes), generator=g) for g in generators]) if generators \
            else torch.zeros((0, sum(sizes)))
        draws = draws.to(self.comm.device)
        return [part.reshape((draws.shape[0],) + s) for part, s in zip(draws.split(sizes, dim=1), shapes)]

    def working_copies(self, degree, shapes):
        return 1.0  # P, Q and the products are low rank: small beside the matrices

    def state_dict(self):
        if self._pending_state is not None:  # loaded and not yet put back: it is still the state
            return dict(self._pending_state)
        state = super().state_dict() | {"iteration": self.iteration}
        if self.groups is None:
            return state
        return state | {"p": [p.clone() for p in self.p], "q": [q.clone() for q in self.q],
                        "generators": [None if g is None else g.get_state() for g in self.generators],
                        "edge_rows": self.edge_rows.state_dict(), "half_steps": torch.from_numpy(self.half_steps.copy())}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.iteration = state["iteration"]
        self._pending_state = state if "p" in state else None
        if self._pending_state is None:  # saved before the first step: the next step starts afresh, as in a new instance
            self._start_afresh()

    # -- the step ---------------------------------------------------------------------------
    def prepare(self, params):
        """The groups and empty per-edge pools (rows are added as edges appear), or a loaded state put back."""
        if self.groups is None:  # the first step sees the stacks: check their layout once
            check_layout(self.comm, params)
        if self.groups is None or self._pending_state is not None:  # also a state loaded after steps
            self._init_state(params)

    def step(self, params):
        graph = self.next_graph()
        self.prepare(params)
        edges = self.comm.half_edges(graph)
        rows_on_host, rows, every_row = self._rows_of_round(edges, self.round - 1)
        # This round's edges' P and Q: the pools themselves when the round holds every row in order
        p, q = (self.p, self.q) if every_row else ([pool[rows] for pool in self.p], [pool[rows] for pool in self.q])
        half_steps = self.half_steps[rows_on_host]
        for k in range(self.num_iterations):
            if self.iteration + k == 0:
                break  # nobody has moved yet, so there is no disagreement to send
            # Each edge alternates its own half-steps (even: orthonormalize P, send X^T P, store
            # Q = D^T P; odd: the roles swapped), so an edge that comes back continues its power
            # iteration. All edges of a static graph (or of one_peer_hypercube's round) agree; a
            # round whose edges do not gossips the even ones, then the odd ones. A half-step with
            # none of this process's edges is skipped here (comm.skip_exchange: another process's
            # edges may take it).
            for left in (True, False):
                chosen = np.flatnonzero((half_steps + k) % 2 == (0 if left else 1))
                if not len(chosen):
                    self.comm.skip_exchange()
                elif len(chosen) == edges.num:
                    self._half_step(params, graph, edges, rows_on_host, p, q, left)
                else:
                    part = topologies.without_edges(graph, [(edges.self_worker_list[h], edges.neighbor_list[h])
                                                            for h in np.setdiff1d(np.arange(edges.num), chosen)])
                    at = torch.as_tensor(chosen, device=self.comm.device)
                    p_part, q_part = [x[at] for x in p], [x[at] for x in q]
                    self._half_step(params, part, self.comm.half_edges(part), rows_on_host[chosen], p_part, q_part, left)
                    for mine, part_of in zip(p + q, p_part + q_part):
                        mine[at] = part_of
        self.half_steps[rows_on_host] += self.num_iterations
        if not every_row:
            for pool, mine in zip(self.p + self.q, p + q):
                pool[rows] = mine
        self.iteration += self.num_iterations

    def _half_step(self, params, graph, edges, rows, p, q, left: bool) -> None:
        """One power-iteration half-step on every half-edge of `graph` (`rows`: their state rows on
        the host; P, Q: those rows, changed in place in the lists), and the update
        X_i += sum_j (+-gamma w_ij) P_ij Q_ij^T."""
        if not self.warm_start:
            generators = [self.generators[row] for row in rows]
            (p if left else q)[:] = self._draw(generators, (lambda m, n, r: (m, r)) if left else (lambda m, n, r: (n, r)))
        # The smaller id adds gamma w_ij P Q^T, the larger one subtracts it.
        sign = torch.where(edges.is_lower, 1.0, -1.0)
        weight_of_edge = self.diffusion_rate * edges.weight_in * sign
        fused = self._fused_layout(params, edges)
        if fused is not None:
            self._fused_half_step(fused, graph, edges, p, q, sign, weight_of_edge, left)
            return
        starts = p if left else q
        for start in starts:
            if self.round_weights:
                start.copy_(start.sign() / math.sqrt(start.shape[-2]))
            else:
                orthogonalize_(start)

        # X^T P (or X Q) for every half-edge: each worker multiplies its X once by its
        # half-edges' factors side by side (to_worker_slots).
        products = []
        for (indices, m, n, r), start in zip(self.groups, starts):
            start_slots = to_worker_slots(edges, start)  # [L, G, m or n, degree r]
            widths = [degree * r for degree in edges.degrees]  # each worker's own slots (its process's others' may be wider)
            per_matrix = [matmul_per_worker(matrix_view(params[k], m, n).transpose(1, 2) if left else matrix_view(params[k], m, n),
                                            start_slots[:, position], widths) for position, k in enumerate(indices)]
            products.append(from_worker_slots(edges, torch.stack(per_matrix, dim=1)))
        received = self.comm.exchange(graph, products, per="half_edge")
        # A message lost either way (faults.py): both ends skip the edge's half-step, keep its old
        # factor and leave X alone, so that they never part
        both_arrived = self.arrived(edges, both_ways=True)
        if both_arrived is not None:
            both_arrived = both_arrived.view(-1, 1, 1, 1)
            weight_of_edge = weight_of_edge * both_arrived.view(-1)

        weight_of_edge, sign = weight_of_edge.view(-1, 1, 1, 1), sign.view(-1, 1, 1, 1)
        results = q if left else p
        for g, (indices, m, n, r) in enumerate(self.groups):
            # Both ends store the same product of D = X_max - X_min: the smaller id theirs - mine,
            # the larger mine - theirs, which is exactly -(theirs - mine).
            result = (received[g] - products[g]).mul_(sign)
            results[g] = result if both_arrived is None else torch.where(both_arrived, result, results[g])
            # X_i += sum_j (+-gamma w_ij) P_ij Q_ij^T: one matrix product per matrix (and worker, on the CPU)
            weighted_p = to_worker_slots(edges, p[g] * weight_of_edge)
            q_slots = to_worker_slots(edges, q[g])
            widths = [degree * r for degree in edges.degrees]
            for position, k in enumerate(indices):
                add_matmul_per_worker_(matrix_view(params[k], m, n), weighted_p[:, position], q_slots[:, position].transpose(1, 2),
                                       widths)

    def _fused_layout(self, params, edges) -> tuple[kernels.MatrixLayout, torch.Tensor] | None:
        """The kernels' layout of the matrices and the parameters' storage as one flat tensor, when
        this half-step runs the fused kernels: float32 parameters in one storage on a GPU
        (models.stacked.StackedReplicas keeps them so), factors the kernels hold; else None. The
        sign variant (round_weights) keeps the torch path: its start vectors are not orthonormalized.
        The backend is decided (and said) at the first half-step; a later round whose degree needs
        more factor columns than the kernels hold (a graph over time) takes the torch path."""
        if self._on_torch_path():
            return None
        storage = kernels.in_one_storage(params) if kernels.available(params, self.p, self.q) else None
        layout = None
        if storage is not None and not self.round_weights:
            x, offsets = storage
            layout = self._matrix_layout
            if layout is None or layout.offsets != offsets:  # the groups are the layout's; the stacks may have moved
                layout = self._matrix_layout = kernels.MatrixLayout(self.groups, offsets, x.device)
        fits = layout is not None and kernels.fits(layout, edges.max_degree)
        why_not = ("round_weights (the sign variant)" if self.round_weights
                   else "messages lost one way (faults.py: its rule runs in torch)" if self.loses_messages()
                   else "not float32 stacks in one storage on a GPU with Triton" if storage is None
                   else f"more than {kernels.MAX_FACTOR_COLUMNS} factor columns (rank x degree)" if not fits else None)
        if not self._use_fused(why_not) or not fits or not edges.num:
            return None
        return layout, storage[0]

    def _fused_half_step(self, fused, graph, edges, p, q, sign, weight_of_edge, left: bool) -> None:
        """_half_step in a few launches over all matrices (kernels.py): the factors of every group
        side by side in one flat row per half-edge, one message of them per half-edge (the same
        bytes as one per group)."""
        layout, x = fused
        starts, results = (p, q) if left else (q, p)
        flat_starts = torch.cat([start.reshape(start.shape[0], -1) for start in starts], dim=1)
        kernels.orthogonalize_(layout, flat_starts, left)
        products = kernels.factor_products(layout, x, flat_starts, edges.first_edge, edges.max_degree, left)
        received, = self.comm.exchange(graph, [products], per="half_edge")
        flat_results = received.sub_(products).mul_(sign.view(-1, 1))  # both ends store the same product of D
        flat_p, flat_q = (flat_starts, flat_results) if left else (flat_results, flat_starts)
        kernels.low_rank_update(layout, x, flat_p, flat_q, weight_of_edge, edges.first_edge)
        # The pools become views of the flat rows, group by group (the torch path takes them as they are)
        for pools, flat in ((starts, flat_starts), (results, flat_results)):
            widths = [math.prod(pool.shape[1:]) for pool in pools]
            pools[:] = [part.view(pool.shape) for pool, part in zip(pools, flat.split(widths, dim=1))]


def power_gossip(comm, topology, config: PowerGossipConfig) -> OnlyOnLargeParameters:
    """PowerGossip on matrices, exact gossip on vectors (as in the paper's experiments)."""
    return OnlyOnLargeParameters(PowerGossip(comm, topology, config), SimpleGossip(comm, topology))


register_algorithm("power-gossip", power_gossip, needs_tuning=False, config=PowerGossipConfig, graph_needs=PowerGossip)
