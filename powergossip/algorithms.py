"""Gossip algorithms over stacked local workers: PowerGossip (Vogels, Karimireddy, Jaggi
2020) and the methods it compares with.

Every algorithm works on a list of parameters, each stacked over this process's
local workers: `params[k]` has shape `[L, *shape_k]`, row l belongs to worker
`comm.first_worker + l`. `step(params)` runs one gossip step in place: a few
batched tensor ops and one `comm.exchange` per round. The same seed gives the same
numbers whether one process hosts all workers or each worker has its own process.

    comm = comm_module.Communicator(n_workers)
    topology = topologies.build("ring", n_workers)
    gossip = PowerGossip(comm, topology, rank=1, num_iterations=1)
    gossip.step(params)             # params: list of [L, ...] float32 tensors
    comm.bytes_sent                 # per local worker, cumulative

Notation: W is the mixing matrix, w_ij = W[i, j], gamma the consensus step
("diffusion rate"). Per-edge state is stacked over the local half-edges `[H, ...]`
in `comm.half_edges(graph)` order. docs/algorithms.md writes out each method's
update and what it sends, byte by byte.

Graphs over time: every step is one gossip round on the graph of that round,
`topology.at(round)` (`next_graph`); the round counter is part of each method's state.
Each method says what it needs of the graph (`graph_needs`: symmetric at every round,
doubly stochastic, or column-stochastic), checked once when it is built.
"""
from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from powergossip import compressors, kernels, registries, topologies
from powergossip.models.stacked import in_one_buffer, zeros_in_one_buffer
from powergossip.compressors import Compressor, SignAndNorm, WorkerRandom, matrix_shape, pack_bits, unpack_bits, worth_compressing

# Purposes that keep the random streams of different uses apart (see WorkerRandom).
COMPRESSOR_STREAM, MONIQUA_STREAM, POWERSGD_STREAM = 1, 2, 3


def edge_seed(seed: int, i: int, j: int, since: int = 0) -> int:
    """A 63-bit seed shared by the two ends of edge {i, j}; distinct for distinct
    (seed, min(i, j), max(i, j)) (unlike string concatenation: 1,12 vs 11,2). `since` > 0:
    the edge's state starts at that round (a graph over time), a stream of its own."""
    return _ordered_edge_seed(seed, min(i, j), max(i, j), since)


@functools.lru_cache(maxsize=4096)  # the edge's other end, when in the same process, asks next (SeedSequence is slow)
def _ordered_edge_seed(seed: int, a: int, b: int, since: int) -> int:
    return int(np.random.SeedSequence([seed, a, b] + ([since] if since else [])).generate_state(1, np.uint64)[0] >> 1)


def orthogonalize_(matrices: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Gram-Schmidt on the columns of a batch `[..., m, r]`, in place, in float32.
    The eps keeps a zero column at zero instead of producing NaN."""
    for c in range(matrices.shape[-1]):
        column = matrices[..., c:c + 1]
        column /= column.norm(dim=-2, keepdim=True) + eps
        if c + 1 < matrices.shape[-1]:
            rest = matrices[..., c + 1:]
            rest -= (column * rest).sum(dim=-2, keepdim=True) * column
    return matrices


def to_worker_slots(edges, per_edge: torch.Tensor) -> torch.Tensor:
    """`[H, ..., c]` half-edge rows -> `[L, ..., max_degree * c]`: each worker's half-edges
    side by side in the last dimension (slot order), zeros in unused slots. With it a
    worker's sum over its half-edges of a_h b_h^T is one matrix product A_l B_l^T."""
    H, *middle, c = per_edge.shape
    num_workers = edges.incoming.shape[0]
    if edges.same_degree:  # half-edge h = l * degree + slot already: no empty slots to fill
        slots = per_edge.reshape(num_workers, edges.max_degree, *middle, c)
    else:
        slots = per_edge.new_zeros((num_workers, edges.max_degree, *middle, c))
        slots[edges.local_sender, edges.slot] = per_edge
    return slots.movedim(1, -2).reshape(num_workers, *middle, edges.max_degree * c)


def from_worker_slots(edges, slots: torch.Tensor) -> torch.Tensor:
    """The inverse of to_worker_slots: `[L, ..., max_degree * c]` -> `[H, ..., c]`."""
    num_workers, *middle, width = slots.shape
    by_slot = slots.reshape(num_workers, *middle, edges.max_degree, width // edges.max_degree).movedim(-2, 1)
    return by_slot[edges.local_sender, edges.slot]


def sum_into_workers(weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`out[l] = sum over half-edges h of weights[l, h] * values[h]` for `weights` `[L, H]`
    (nonzero on worker l's own half-edges only) and `values` `[H, ...]`: one matrix
    product, summing each worker's half-edges in their fixed order."""
    flat = weights.to(values.dtype) @ values.reshape(values.shape[0], -1)
    return flat.reshape((weights.shape[0],) + tuple(values.shape[1:]))


def matrix_view(stack: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """A `[L, ...]` parameter stack as `[L, m, n]` matrices, sharing its memory (PowerGossip
    writes through it)."""
    return stack.view(stack.shape[0], m, n)


def check_layout(comm, stacks: list[torch.Tensor]) -> None:
    """ValueError (saying what was expected and how to launch) unless every tensor is stacked
    over this process's workers, `[L, *shape]`."""
    for stack in stacks:
        if stack.shape[0] != comm.num_local:
            raise ValueError(comm.layout_problem(stack.shape[0]))


def matrix_groups(stacks: list[torch.Tensor], rank: int, keep=lambda shape: True) -> list[tuple[list[int], int, int, int]]:
    """[(indices, m, n, r)]: the stacks whose per-worker shape `keep` accepts, grouped by their
    matrix view and rank (compressors.matrix_shape), so that same-shape matrices are batched."""
    shapes: dict[tuple[int, int, int], list[int]] = {}
    for k, stack in enumerate(stacks):
        if keep(stack.shape[1:]):
            shapes.setdefault(matrix_shape(stack.shape[1:], rank), []).append(k)
    return [(indices, m, n, r) for (m, n, r), indices in shapes.items()]


class GossipAlgorithm:
    """Interface. `step(params)` gossips in place (one round); bytes are counted by `comm`.

    `graph_needs` (a key of topologies.REQUIREMENTS, or None for any graph) is what the
    method needs of every round's graph; the constructor refuses a topology that does not
    give it, naming the graphs that would. Methods that exchange along both directions of
    an edge and rely on equal weights (the default) need "symmetric"."""

    graph_needs: str | None = "symmetric"
    # Methods that use _senders_in_process mix their workers' own values when a round's messages
    # all stay in this process; False (settable per instance): always use what the exchange
    # hands back, as across processes (the tests compare the two).
    in_process_mixing = True
    # Methods with fused kernels (kernels.py) run their round in a few passes over the model on a
    # CUDA device (Choco, DeepSqueeze and Moniqua when the round's messages all stay in this process;
    # PowerGossip's half-steps also across processes); False (settable per instance): the torch path.
    fused_kernels = True

    def __init__(self, comm, topology, diffusion_rate: float = 1.0):
        if not diffusion_rate > 0:
            raise ValueError(f"diffusion_rate must be > 0, got {diffusion_rate}")
        if self.graph_needs is not None:
            topologies.check_requirement(topology, self.graph_needs, type(self).__name__)
        self.comm, self.topology, self.diffusion_rate = comm, topology, float(diffusion_rate)
        self.round = 0  # gossip rounds done: round t gossips on topology.at(t)
        self._layout = None  # the fused kernels' kernels.Layout of the parameters, once they ran

    def step(self, params: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def next_graph(self):
        """The graph of this round, topology.at(round), and one more round counted (once per step)."""
        graph = self.topology.at(self.round)
        self.round += 1
        return graph

    def step_size_scale(self):
        """Factor on the local step's learning rate, per local worker or one number (push-sum: 1 / w)."""
        return 1.0

    def state_dict(self) -> dict:
        return {"round": self.round}

    def load_state_dict(self, state: dict) -> None:
        self.round = state.get("round", 0)

    def _senders_in_process(self, graph) -> torch.Tensor | None:
        """Per local half-edge, the local worker whose per-worker message it receives, when every
        message of the round stays in this process (and in_process_mixing); else None."""
        return self.comm.senders_in_process(graph) if self.in_process_mixing else None

    def _kernel_layout(self, senders, params, *states) -> kernels.Layout | None:
        """The flat layout the fused kernels use for `params`, when this round runs them: every
        message in the process (`senders`), parameters and states where they run (float32 on a
        GPU), at most kernels.MAX_ROWS rows."""
        if senders is None or not self.fused_kernels or params[0].shape[0] > kernels.MAX_ROWS or not kernels.available(params, *states):
            return None
        layout = self._layout
        if layout is None or layout.shapes != [p.shape for p in params]:
            layout = self._layout = kernels.Layout(params)
        return layout


class AllReduce(GossipAlgorithm):
    """The all-reduce baseline: every worker takes the exact average (bits: the buffer once per step)."""

    graph_needs = None

    def step(self, params):
        for x, mean in zip(params, self.comm.all_reduce_mean(params)):
            x.copy_(mean.unsqueeze(0).expand_as(x))


class SimpleGossip(GossipAlgorithm):
    """Uncompressed gossip (D-PSGD): x_i += gamma * sum_{j in N(i)} w_ij (x_j - x_i).
    Sends the full x_i to each neighbour. Works on directed graphs too, as long as W
    is doubly stochastic (the average is kept and reached)."""

    graph_needs = "doubly_stochastic"

    def step(self, params):
        graph = self.next_graph()
        if not params:
            return
        edges = self.comm.half_edges(graph)
        received = self.comm.exchange(graph, params, per="worker")
        keep = 1 - self.diffusion_rate * (1 - edges.weight_self)  # 1 - gamma sum_{j in N(i)} w_ij
        for x, from_neighbors in zip(params, received):
            # x = keep x + gamma sum_j w_ij x_j: one scaling and one matrix product, in place
            rows = x.view(x.shape[0], -1)
            rows.mul_(keep.to(x.dtype).unsqueeze(1))
            rows.addmm_(edges.incoming.to(x.dtype), from_neighbors.view(from_neighbors.shape[0], -1), alpha=self.diffusion_rate)


class EdgeRows:
    """Which row of a per-edge state stack belongs to which local half-edge (i -> j), kept
    across the rounds the edge is absent: an edge of one_peer_hypercube comes back every
    log2(n) rounds and continues where it stopped.

    A row is freed once its edge has been absent for more than `memory` consecutive rounds
    (None: never), so that a graph whose edges rarely repeat (random_matching) holds at most
    (memory + 1) x (half-edges per round) rows in use instead of growing toward all n(n-1)
    half-edges (the stack keeps at most one round's more, freed rows waiting for reuse).
    Both ends of an edge see the same rounds, so they free and re-create its state together.
    """

    def __init__(self, memory: int | None):
        self.memory = memory
        self.row_of: dict[tuple[int, int], int] = {}
        self.edge_of_row: list[tuple[int, int] | None] = []
        self.last_seen = np.zeros(0, dtype=np.int64)  # round each row's edge was last present
        self.free: list[int] = []
        self._previous = (None, None)  # the last round's `pairs` object and its rows

    def assign(self, pairs: list[tuple[int, int]], round: int) -> tuple[np.ndarray, list[int], list[int]]:
        """The rows of this round's half-edges `pairs`, the positions (in `pairs`) of those whose
        state starts now, and the rows freed now. Freed rows are reused before the stack grows."""
        if pairs is self._previous[0]:  # the round before's half-edges (a static graph): its rows, none fresh
            rows, fresh = self._previous[1], []
        else:
            rows, fresh = [], []
            for position, pair in enumerate(pairs):
                row = self.row_of.get(pair)
                if row is None:
                    row = self.free.pop() if self.free else len(self.edge_of_row)
                    if row == len(self.edge_of_row):
                        self.edge_of_row.append(None)
                    self.row_of[pair], self.edge_of_row[row] = row, pair
                    fresh.append(position)
                rows.append(row)
            rows = np.array(rows, dtype=np.int64)
            self.last_seen = np.concatenate([self.last_seen, np.zeros(len(self.edge_of_row) - len(self.last_seen), np.int64)])
            self._previous = (pairs, rows)
        self.last_seen[rows] = round
        freed = []
        if self.memory is not None:  # absent for more than `memory` rounds, this one included
            stale = self.last_seen < round - self.memory
            freed = np.flatnonzero(stale).tolist()
            for row in freed:
                del self.row_of[self.edge_of_row[row]]
                self.edge_of_row[row] = None
            self.last_seen[stale] = np.iinfo(np.int64).max  # a free row is never stale again
            self.free = sorted(self.free + freed, reverse=True)  # the smallest free row is taken first
        return rows, fresh, freed

    def state_dict(self) -> dict:  # plain lists and a tensor: checkpoints load with weights_only=True
        return {"edge_of_row": [None if e is None else list(e) for e in self.edge_of_row],
                "last_seen": torch.from_numpy(self.last_seen.copy()), "free": list(self.free)}

    def load_state_dict(self, state: dict) -> None:
        self.edge_of_row = [None if e is None else tuple(e) for e in state["edge_of_row"]]
        self.row_of = {edge: row for row, edge in enumerate(self.edge_of_row) if edge is not None}
        self.last_seen, self.free = state["last_seen"].numpy().astype(np.int64), list(state["free"])
        self._previous = (None, None)


class PowerGossip(GossipAlgorithm):
    """PowerGossip (Vogels et al. 2020, Algorithm 1): low-rank approximations of the
    parameter differences D = X_max(i,j) - X_min(i,j) across each edge, by power
    iteration that continues across steps.

    Hyper-parameters and what they trade:
      rank: columns r of the factors; bits per round grow as r (m or n) per matrix.
      num_iterations: power-iteration rounds per step; more rounds = better
        approximation of D, more messages and bits. All of a step's iterations use
        the graph of that step's round.
      warm_start: start each iteration from the previous iteration's result (power
        iteration on D across steps; the paper's default) or redraw from the edge's
        shared generator.
      round_weights: the sign variant (rank 1): start vector sign(v) / sqrt(len(v)).
      diffusion_rate: gamma; 1 needs no tuning.
      edge_memory: graphs over time. An edge's P, Q and generator are kept while it is
        absent, so its power iteration continues when it comes back, for up to this many
        consecutive absent rounds, then dropped (bounded memory on random_matching); an
        edge that comes back after that starts afresh from a generator seeded by the edge
        and the round (both ends alike). None: the graph's period - 1 (a periodic graph
        keeps every edge's state; a static one is unaffected), 16 rounds on graphs
        without a period. 0: start afresh whenever an edge comes back.
    Each matrix of shape m x n (m = shape[0]) uses rank r' = min(r, m, n).
    """

    DEFAULT_EDGE_MEMORY = 16  # rounds an absent edge's state is kept on graphs without a period
    ROWS_KEPT = 64  # distinct rounds' state rows kept on the device (a periodic graph's phases)

    def __init__(self, comm, topology, rank: int = 1, num_iterations: int = 1, warm_start: bool = True,
                 round_weights: bool = False, diffusion_rate: float = 1.0, seed: int = 0, edge_memory: int | None = None):
        super().__init__(comm, topology, diffusion_rate)
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
        if round_weights and rank != 1:
            raise ValueError("round_weights (the sign variant) is defined for rank 1 only")
        if edge_memory is not None and (isinstance(edge_memory, bool) or not isinstance(edge_memory, int) or edge_memory < 0):
            raise ValueError(f"edge_memory must be an integer >= 0 (rounds) or None, got {edge_memory!r}")
        self.rank, self.num_iterations, self.warm_start = rank, num_iterations, warm_start
        self.round_weights, self.seed = round_weights, seed
        if edge_memory is None:
            edge_memory = topology.period - 1 if topology.period else self.DEFAULT_EDGE_MEMORY
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
    def step(self, params):
        graph = self.next_graph()
        if self.groups is None:  # the first step sees the stacks: check their layout once
            check_layout(self.comm, params)
        if self.groups is None or self._pending_state is not None:  # also a state loaded after steps
            self._init_state(params)
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
            # round whose edges do not gossips the even ones, then the odd ones.
            for left in (True, False):
                chosen = np.flatnonzero((half_steps + k) % 2 == (0 if left else 1))
                if len(chosen) == edges.num and (left or edges.num):
                    self._half_step(params, graph, edges, rows_on_host, p, q, left)
                elif len(chosen):
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
            per_matrix = [torch.bmm(matrix_view(params[k], m, n).transpose(1, 2) if left else matrix_view(params[k], m, n),
                                    start_slots[:, position]) for position, k in enumerate(indices)]
            products.append(from_worker_slots(edges, torch.stack(per_matrix, dim=1)))
        received = self.comm.exchange(graph, products, per="half_edge")

        weight_of_edge, sign = weight_of_edge.view(-1, 1, 1, 1), sign.view(-1, 1, 1, 1)
        results = q if left else p
        for g, (indices, m, n, r) in enumerate(self.groups):
            # Both ends store the same product of D = X_max - X_min: the smaller id theirs - mine,
            # the larger mine - theirs, which is exactly -(theirs - mine).
            results[g] = (received[g] - products[g]).mul_(sign)
            # X_i += sum_j (+-gamma w_ij) P_ij Q_ij^T: one in-place matrix product per matrix
            weighted_p = to_worker_slots(edges, p[g] * weight_of_edge)
            q_slots = to_worker_slots(edges, q[g])
            for position, k in enumerate(indices):
                matrix_view(params[k], m, n).baddbmm_(weighted_p[:, position], q_slots[:, position].transpose(1, 2))

    def _fused_layout(self, params, edges) -> tuple[kernels.MatrixLayout, torch.Tensor] | None:
        """The kernels' layout of the matrices and the parameters' storage as one flat tensor, when
        this half-step runs the fused kernels: float32 parameters in one storage on a GPU
        (models.stacked.StackedReplicas keeps them so), factors the kernels hold; else None. The
        sign variant (round_weights) keeps the torch path: its start vectors are not orthonormalized."""
        if not self.fused_kernels or self.round_weights or not edges.num or not kernels.available(params, self.p, self.q):
            return None
        storage = kernels.in_one_storage(params)
        if storage is None:
            return None
        x, offsets = storage
        layout = self._matrix_layout
        if layout is None or layout.offsets != offsets:  # the groups are the layout's; the stacks may have moved
            layout = self._matrix_layout = kernels.MatrixLayout(self.groups, offsets, x.device)
        return (layout, x) if kernels.fits(layout, edges.max_degree) else None

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


class PushSum(SimpleGossip):
    """Push-sum (Kempe et al. 2003, Algorithm 1 "Push-Sum"), as Stochastic Gradient Push runs
    it (Assran et al., ICML 2019, Algorithm 1): on a column-stochastic P_t every worker keeps
    a numerator x_i and a weight w_i (1 at the start) and mixes both alike,

        x_i <- sum_j p_ij x_j,    w_i <- sum_j p_ij w_j,

    sending p_ji-weighted copies to its out-neighbours (here: x_i and w_i once to each; the
    receiver applies p_ij). The parameters the caller holds are the de-biased z_i = x_i / w_i:
    they reach the average of the starting values on any strongly connected directed graph,
    doubly stochastic or not. A local step on z at learning rate lr / w_i (step_size_scale)
    is SGP's step x_i -= lr grad f(z_i) on the numerator. Bytes: x_i and the weight, one scalar."""

    graph_needs = "column_stochastic"

    def __init__(self, comm, topology, diffusion_rate: float = 1.0):
        super().__init__(comm, topology, diffusion_rate)
        self.weight = None  # w_i per local worker `[L]`, in the parameters' dtype (from the first step)

    def step(self, params):
        if not params:
            self.next_graph()
            return
        if self.weight is None:
            self.weight = torch.ones(params[0].shape[0], dtype=params[0].dtype, device=params[0].device)
        per_worker = lambda x: self.weight.view((-1,) + (1,) * (x.dim() - 1))
        numerators = [x * per_worker(x) for x in params]
        weight = self.weight.unsqueeze(1).clone()
        super().step(numerators + [weight])  # x and w mixed alike, in one message per out-neighbour
        self.weight = weight[:, 0]
        for x, numerator in zip(params, numerators):
            torch.div(numerator, per_worker(x), out=x)

    def step_size_scale(self):
        return 1.0 if self.weight is None else 1 / self.weight

    def state_dict(self):
        return super().state_dict() | ({} if self.weight is None else {"weight": self.weight.clone()})

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.weight = state["weight"].to(self.comm.device) if "weight" in state else None


class CompressedGossip(GossipAlgorithm):
    """What Choco and DeepSqueeze share: a compressor (with per-worker randomness when
    it needs some), one compressed message per worker per round, and per-worker state
    tensors (named in `state_names`) that state_dict saves.

    When every neighbour of the round lives in this process, a received payload is bit for
    bit its sender's own, so its decompression is the sender's own reconstruction: the
    neighbours' sum is an [L, L] matrix times the own reconstructions, and the received
    `[H, ...]` copies are never decompressed (the payload still goes through comm.exchange:
    the wire and the byte counts stay those of a run across processes)."""

    state_names: tuple[str, ...] = ()
    own_weight_offset = 0.0  # the worker's own message enters its mix with weight w_ii + this

    def __init__(self, comm, topology, compressor: Compressor, diffusion_rate: float = 1.0, seed: int = 0):
        super().__init__(comm, topology, diffusion_rate)
        self.compressor = compressor
        self.randomness = WorkerRandom(seed, comm.local_workers, comm.device, COMPRESSOR_STREAM) \
            if compressor.needs_randomness else None
        self.state = None  # name -> list of [L, ...] tensors, created at the first step
        self._mixing = None  # (a round's HalfEdges, its [L, L] mixing matrix): a fixed graph's is built once

    def _ensure_state(self, params):
        if self.state is None:  # each state in one buffer, which the fused kernels update in place
            self.state = {name: zeros_in_one_buffer(params) for name in self.state_names}

    def _own_weights(self, edges) -> torch.Tensor:
        return edges.weight_self + self.own_weight_offset

    def _mixing_matrix(self, edges, senders) -> torch.Tensor:
        """A `[L, L]`: A[i, k] = (w_ii + own_weight_offset) [k = i] + sum_h incoming[i, h] [senders[h] = k],
        for the round's `edges` (comm keeps one HalfEdges per graph, so a fixed graph's is reused)."""
        if self._mixing is None or self._mixing[0] is not edges:
            self._mixing = (edges, torch.diag(self._own_weights(edges)).index_add_(1, senders, edges.incoming))
        return self._mixing[1]

    def _fused_sign_and_norm(self, senders, params, *states):
        """The flat layout when this round runs the fused sign-and-norm kernels, else None."""
        return self._kernel_layout(senders, params, *states) if type(self.compressor) is SignAndNorm else None

    def _fused_round(self, graph, edges, senders, layout, params, states, b_sign: int, update) -> None:
        """A sign-and-norm round in two passes (kernels.py): the payload C(x_i + b_sign states[0]_i)
        from one pass, sent as the torch path sends it, then `update` (a kernels launcher) of x and
        the states in place with the scales and the `[L, L]` mixing matrix."""
        buffers = kernels.flat_buffers(params, *states)
        x, *flat_states = (buffer for buffer, _ in buffers)
        payload = kernels.sign_and_norm(layout, x, flat_states[0], b_sign)
        self.comm.exchange(graph, payload, per="worker")
        update(layout, x, *flat_states, payload[1], self._mixing_matrix(edges, senders), self.diffusion_rate)
        kernels.write_back((params, *states), buffers)

    def _compress_and_exchange(self, graph, edges, senders, tensors):
        """Send q_i = C(tensors_i) to the neighbours of `graph` (`senders`: _senders_in_process(graph)).
        Returns q `[L, ...]` as each worker reconstructs it, and (A, rows): an `[L, R]` matrix and per
        tensor `[R, ...]` rows with A @ rows = (w_ii + own_weight_offset) q_i + sum_{j in N(i)} w_ij q_j
        for every local worker i."""
        payload = self.compressor.compress(tensors, self.randomness)
        received = self.comm.exchange(graph, payload, per="worker")
        if senders is not None:
            own = self.compressor.reconstruct(tensors, payload)
            return own, (self._mixing_matrix(edges, senders), own)
        # The own and the received payloads decompressed together, A = [diag(own weights) | incoming]
        shapes = [t.shape[1:] for t in tensors]
        values = self.compressor.decompress([torch.cat(pair) for pair in zip(payload, received)], shapes)
        own = [v[:self.comm.num_local] for v in values]
        return own, (torch.cat([torch.diag(self._own_weights(edges)), edges.incoming], dim=1), values)

    @staticmethod
    def _add_mixed_(out: list[torch.Tensor], mixing: tuple, alpha: float = 1.0) -> None:
        """out[k] += alpha A @ rows[k] for (A, rows) = `mixing`: one matrix product per tensor.
        Not addmm_: with one worker per process (A of one row, BLAS's gemv) it adds out inside the
        product, in another order than with several rows, and the layouts' numbers would part."""
        A, rows = mixing
        for o, r in zip(out, rows):
            o.view(o.shape[0], -1).add_(A.to(o.dtype) @ r.reshape(r.shape[0], -1).to(o.dtype), alpha=alpha)

    def state_dict(self):
        state = super().state_dict()
        if self.state is not None:
            state |= {name: [t.clone() for t in ts] for name, ts in self.state.items()}
        if self.randomness is not None:
            state["randomness"] = self.randomness.state_dict()
        return state

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if all(name in state for name in self.state_names):
            self.state = {name: in_one_buffer([t.to(self.comm.device) for t in state[name]]) for name in self.state_names}
        if self.randomness is not None:
            self.randomness.load_state_dict(state["randomness"])


class ChocoGossip(CompressedGossip):
    """Choco-Gossip (Koloskova et al. 2019, Algorithm 1 with the s_i bookkeeping):
    q_i = C(x_i - x_hat_i); send q_i; x_hat_i += q_i;
    s_i += sum_{j in N(i) + i} w_ij q_j; x_i += gamma (s_i - x_hat_i).
    gamma needs tuning per compressor (the paper's tuned values are in experiments/configs/train/).
    s_i stands for sum_j w_ij x_hat_j only while W stays the same: a graph that changes from
    round to round would need every neighbour's x_hat_j, which a worker receives only from the
    neighbours of the round, so Choco takes fixed graphs."""

    graph_needs = "fixed_symmetric"
    state_names = ("x_hat", "s")

    def step(self, params):
        graph = self.next_graph()
        if not params:
            return
        self._ensure_state(params)
        edges = self.comm.half_edges(graph)
        x_hats, ss = self.state["x_hat"], self.state["s"]
        senders = self._senders_in_process(graph)
        layout = self._fused_sign_and_norm(senders, params, x_hats, ss)
        if layout is not None:  # q_i = C(x_i - x_hat_i), then the updates below in one pass
            self._fused_round(graph, edges, senders, layout, params, (x_hats, ss), -1, kernels.choco_update)
            return
        q, mixing = self._compress_and_exchange(graph, edges, senders, torch._foreach_sub(params, x_hats))
        torch._foreach_add_(x_hats, q)  # x_hat_i += q_i
        self._add_mixed_(ss, mixing)  # s_i += sum_{j in N(i) + i} w_ij q_j
        torch._foreach_add_(params, torch._foreach_sub(ss, x_hats), alpha=self.diffusion_rate)  # x_i += gamma (s_i - x_hat_i)


class DeepSqueezeGossip(CompressedGossip):
    """DeepSqueeze (Tang et al. 2019) with error feedback:
    v_i = x_i + delta_i; c_i = C(v_i); delta_i = v_i - c_i; send c_i;
    x_i += -gamma (1 - w_ii) c_i + gamma sum_{j in N(i)} w_ij c_j."""

    state_names = ("delta",)
    own_weight_offset = -1.0  # -(1 - w_ii) c_i

    def step(self, params):
        graph = self.next_graph()
        if not params:
            return
        self._ensure_state(params)
        edges = self.comm.half_edges(graph)
        deltas = self.state["delta"]
        senders = self._senders_in_process(graph)
        layout = self._fused_sign_and_norm(senders, params, deltas)
        if layout is not None:  # c_i = C(x_i + delta_i), then the updates below in one pass
            self._fused_round(graph, edges, senders, layout, params, (deltas,), +1, kernels.deepsqueeze_update)
            return
        torch._foreach_add_(deltas, params)  # v_i = x_i + delta_i, in delta's buffer
        c, mixing = self._compress_and_exchange(graph, edges, senders, deltas)
        self._add_mixed_(params, mixing, alpha=self.diffusion_rate)  # x_i += gamma (sum_j w_ij c_j - (1 - w_ii) c_i)
        torch._foreach_sub_(deltas, c)  # delta_i = v_i - c_i


class MoniquaGossip(GossipAlgorithm):
    """Moniqua (Lu & De Sa 2020), 2-bit, with stochastic rounding:
    delta = 1/3, B = 2 theta / (1 - 2 delta);
    q_i = SR(mod(x_i / B, 1) + 1/2) - 1/2 (4 values: 2 bits each on the wire);
    e_i = q_i B - mod(x_i, B); x_i += gamma sum_{j in N(i)} w_ij (mod(q_j B - x_i, B) - e_i).
    theta must bound how far neighbours' parameters may differ; tune it with gamma."""

    delta = 1 / 3

    def __init__(self, comm, topology, theta: float, diffusion_rate: float = 1.0, seed: int = 0):
        super().__init__(comm, topology, diffusion_rate)
        if not theta > 0:
            raise ValueError(f"theta must be > 0, got {theta}")
        self.theta = float(theta)
        self.B = 2 * self.theta / (1 - 2 * self.delta)
        self.randomness = WorkerRandom(seed, comm.local_workers, comm.device, MONIQUA_STREAM)

    @staticmethod
    def modulo(x: torch.Tensor, a: float) -> torch.Tensor:
        """mod(x, a) = fmod(x + sign(x) a/2, a) - sign(x) a/2: zero at multiples of a."""
        return torch.fmod(x + torch.sign(x) * a / 2, a) - torch.sign(x) * a / 2

    def step(self, params):
        graph = self.next_graph()
        if not params:
            return
        edges = self.comm.half_edges(graph)
        rows = params[0].shape[0]
        senders = self._senders_in_process(graph)
        layout = self._kernel_layout(senders, params)
        if layout is not None:  # the same round in two passes (kernels.py)
            buffers = kernels.flat_buffers(params)
            x = buffers[0][0]
            codes = kernels.moniqua_codes(layout, x, self.randomness.uniform((layout.width,)), self.B, self.delta)
            self.comm.exchange(graph, [kernels.pack_bits(codes, 2)], per="worker")
            kernels.moniqua_update(layout, x, codes, senders, edges.weight_in, edges.first_edge, self.B, self.delta, self.diffusion_rate)
            kernels.write_back((params,), buffers)
            return
        x = torch.cat([p.reshape(rows, -1) for p in params], dim=1)
        noise = self.randomness.uniform((x.shape[1],))
        codes = torch.floor((self.modulo(x / self.B, 1.0) + 0.5) / self.delta + noise).clamp_(0, 3)
        q_own = codes * self.delta - 0.5
        error = q_own * self.B - self.modulo(x, self.B)
        packed = pack_bits(codes.to(torch.uint8), 2)
        received = self.comm.exchange(graph, [packed], per="worker")[0]
        if senders is not None:  # every code received is its sender's own: nothing to unpack
            q_neighbors = q_own[senders]
        else:
            q_neighbors = unpack_bits(received, 2, x.shape[1]).float() * self.delta - 0.5
        x_per_edge = x[edges.local_sender]
        corrections = self.modulo(q_neighbors * self.B - x_per_edge, self.B) - error[edges.local_sender]
        x += self.diffusion_rate * sum_into_workers(edges.incoming, corrections)  # sum_{j in N(i)} w_ij (...)
        for p, part in zip(params, x.split([p[0].numel() for p in params], dim=1)):
            p.copy_(part.reshape(p.shape))

    def state_dict(self):
        return super().state_dict() | {"randomness": self.randomness.state_dict()}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.randomness.load_state_dict(state["randomness"])


def _switch_of_both(name: str) -> property:
    """A switch of GossipAlgorithm (fused_kernels, in_process_mixing) that, set on a method made of
    two, reaches both; read, it is on when it is on in either."""
    def set_both(self, on: bool) -> None:
        setattr(self.compressed, name, on)
        setattr(self.uncompressed, name, on)
    return property(lambda self: getattr(self.compressed, name) or getattr(self.uncompressed, name), set_both)


class OnlyOnLargeParameters(GossipAlgorithm):
    """The compressed method on tensors with ndim > 1 (per worker), uncompressed gossip
    on 1-D tensors (biases, batch norm), as in the paper's experiments.

    min_compression_rate (PowerSGD's rule): a matrix m x n whose rank-r factors would
    compress it by less than this factor, m n / ((m + n) r) < min_compression_rate,
    is gossiped uncompressed too (needs `rank`)."""

    graph_needs = None  # its two methods check the graph

    def __init__(self, compressed: GossipAlgorithm, uncompressed: GossipAlgorithm,
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


class PowerSGD(GossipAlgorithm):
    """PowerSGD (Vogels, Karimireddy, Jaggi, NeurIPS 2019): the all-reduce of gradients
    through rank-r power iteration, warm-started across steps, with error feedback. It acts
    on gradients: `step(grads)` replaces every worker's gradient `[L, *shape]` by the same
    approximate average, so workers that start equal stay equal (a centralized method; the
    topology is not used and may be None).

    For each gradient G_i of worker i viewed as an m x n matrix (m = shape[0], as PowerGossip
    views parameters), with Q [n, r] shared by all workers:
        M_i = G_i + E_i                          error feedback (Algorithm 2)
        P = mean_i M_i Q;  P = orthogonalize(P)  Algorithm 1: P <- M Q, all-reduce, orthogonalize
        Q = mean_i M_i^T P                       Algorithm 1: Q <- M^T P, all-reduce
        update = P Q^T;  E_i = M_i - update      the decompressed average; the new memory
    Q is orthogonalized before P = M Q (as PyTorch's powerSGD_hook does; it changes no span,
    only keeps Q's scale from drifting over steps). With num_iterations = k the two half-steps
    run k times per step. Vectors (biases, batch norm), matrices compressed by less than
    `min_compression_rate`, and every tensor in the first `start_compressing_after_num_steps`
    steps are all-reduced exactly (and leave no memory).

    Hyper-parameters and what they trade:
      rank: columns r of P and Q; bytes per matrix per iteration are (m + n) r floats.
      num_iterations: power iterations per step: a better approximation of the average,
        k times the bytes and 2k all-reduces.
      min_compression_rate: m n / ((m + n) r) below this: sent uncompressed (small matrices
        gain little and cost the approximation error).
      start_compressing_after_num_steps: exact all-reduce for this many first steps.
      warm_start: Q continues from the previous step (the paper's default) or is redrawn,
        identically on every worker, from the shared seed each step.
    Bytes are counted as for all-reduce (comm.all_reduce_mean): per all-reduce, each worker
    sends its buffer once.
    """

    graph_needs = None

    def __init__(self, comm, topology=None, rank: int = 1, num_iterations: int = 1, min_compression_rate: float = 2.0,
                 start_compressing_after_num_steps: int = 0, warm_start: bool = True, seed: int = 0):
        super().__init__(comm, topology)
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        if num_iterations < 1:
            raise ValueError(f"num_iterations must be >= 1, got {num_iterations}")
        if not min_compression_rate >= 1:
            raise ValueError(f"min_compression_rate must be >= 1 (a factor of compression), got {min_compression_rate}")
        if start_compressing_after_num_steps < 0:
            raise ValueError(f"start_compressing_after_num_steps must be >= 0, got {start_compressing_after_num_steps}")
        self.rank, self.num_iterations = rank, num_iterations
        self.min_compression_rate, self.warm_start = float(min_compression_rate), warm_start
        self.start_compressing_after_num_steps = start_compressing_after_num_steps
        self.generator = torch.Generator(device="cpu")  # the same draws on every worker: Q is shared
        self.generator.manual_seed(int(np.random.SeedSequence([seed, POWERSGD_STREAM]).generate_state(1, np.uint64)[0] >> 1))
        self.groups = None  # [(param indices, m, n, r)]: same-shape matrices are batched
        self.compressed = set()  # the indices in groups: the tensors sent as factors once compressing starts
        self.q = None  # per group [G, n, r], identical on all workers
        self.memory = None  # per parameter [L, *shape] (zeros for the uncompressed ones)
        self._pending = None  # a loaded state waits for the first step, which knows the shapes

    def _init_state(self, grads):
        self.groups = matrix_groups(grads, self.rank, lambda shape: worth_compressing(shape, self.rank, self.min_compression_rate))
        self.compressed = {k for indices, *_ in self.groups for k in indices}
        self.dtype = grads[0].dtype if grads else torch.float32
        self.q = self._draw_q()
        self.memory = [torch.zeros_like(g) for g in grads]

    def _draw_q(self) -> list[torch.Tensor]:
        """Standard normal Q per group, the same draws on every worker (the shared generator)."""
        return [torch.randn((len(indices), n, r), generator=self.generator).to(self.comm.device, self.dtype)
                for indices, m, n, r in self.groups]

    @torch.no_grad()
    def step(self, grads: list[torch.Tensor]) -> None:
        if self.groups is None:
            check_layout(self.comm, grads)
            self._init_state(grads)
        if self._pending is not None:
            self.q = [q.to(self.comm.device, self.dtype, copy=True) for q in self._pending["q"]]
            self.memory = [e.to(self.comm.device).clone() for e in self._pending["memory"]]
            self._pending = None
        compressing = self.round >= self.start_compressing_after_num_steps  # round: the steps done
        self.round += 1
        exact = [g for k, g in enumerate(grads) if not (compressing and k in self.compressed)]
        for g, mean in zip(exact, self.comm.all_reduce_mean(exact)):
            g.copy_(mean.unsqueeze(0).expand_as(g))
        if not compressing:
            return
        if not self.warm_start:
            self.q = self._draw_q()
        # M_i = G_i + E_i for every group: [L, G, m, n]
        ms = [torch.stack([matrix_view(grads[k], m, n) + matrix_view(self.memory[k], m, n) for k in indices], dim=1)
              for indices, m, n, r in self.groups]
        for _ in range(self.num_iterations):
            for q in self.q:
                orthogonalize_(q)
            ps = self.comm.all_reduce_mean([torch.matmul(M, q) for M, q in zip(ms, self.q)])  # [G, m, r]
            for p in ps:
                orthogonalize_(p)
            self.q = self.comm.all_reduce_mean([torch.matmul(M.transpose(-1, -2), p) for M, p in zip(ms, ps)])
        for (indices, m, n, r), M, p, q in zip(self.groups, ms, ps, self.q):
            update = torch.matmul(p, q.transpose(-1, -2))  # [G, m, n], the same on every worker
            for position, k in enumerate(indices):
                matrix_view(self.memory[k], m, n).copy_(M[:, position] - update[position])
                matrix_view(grads[k], m, n).copy_(update[position].expand_as(M[:, position]))

    def state_dict(self) -> dict:
        if self._pending is not None:  # loaded and not yet put back: it is still the state
            return dict(self._pending)
        state = super().state_dict() | {"generator": self.generator.get_state()}
        if self.groups is not None:
            state |= {"q": [q.clone() for q in self.q], "memory": [e.clone() for e in self.memory]}
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.generator.set_state(state["generator"])
        self._pending = state if "q" in state else None
        if self._pending is None:  # saved before the first step: the next step draws Q afresh, as a new instance
            self.groups = None


# --- the registry: methods by name ---------------------------------------------------------------
@dataclass(frozen=True)
class Method:
    """A registry entry. `factory(comm, topology, **hyper)` builds the method; it is given
    the hyper-parameters its signature names (the vocabulary: diffusion_rate, rank,
    num_iterations, warm_start, round_weights, compressor, keep_ratio, qsgd_levels,
    theta, seed) and checks them itself."""

    factory: Callable[..., GossipAlgorithm]
    acts_on: str = "parameters"  # "parameters": x_t, after the gradient and before the local step;
    # "gradients": the gradients, before the local step takes them (PowerSGD)
    needs_tuning: bool = True  # consensus sweeps its diffusion rate unless one is given
    local_step_first: bool = False  # True: the local step, then the method (all-reduce of parameters)


ACTS_ON = ("parameters", "gradients")
METHODS: dict[str, Method] = registries.METHODS
_METHOD_ALIASES = {"uncompressed": "dpsgd", "allreduce": "all-reduce", "deep-squeeze": "deepsqueeze"}


def register_algorithm(name: str, factory: Callable[..., GossipAlgorithm], acts_on: str = "parameters",
                       needs_tuning: bool = True, local_step_first: bool = False) -> None:
    """Make a method available by `name` in train.py, gossip_run.py, the drop-in optimizer and
    the benchmarks: `register_algorithm("my-gossip", MyGossip)` with
    `MyGossip(comm, topology, diffusion_rate=1.0, ...)`.

    Where it runs in a training step (D-PSGD as Lian et al. 2017 run it, the paper's order):
    the gradient at x_t, the method on x_t, the local step on its result; with
    `local_step_first`, the local step and then the method (all-reduce: x_{t+1} = the
    average of the workers' stepped parameters). A method registered with
    `acts_on="gradients"` gets the gradient stacks instead, before the local step (PowerSGD)."""
    if acts_on not in ACTS_ON:
        raise ValueError(f"acts_on={acts_on!r} is not one of {', '.join(ACTS_ON)}")
    METHODS[registries.canonical_name(name)] = Method(factory, acts_on, needs_tuning, local_step_first)


def registered_name(name: str) -> str:
    """The registry key of `name` (either spelling, aliases included); ValueError names the known ones."""
    key = registries.lookup(METHODS, _METHOD_ALIASES, name)
    if key is None:
        raise ValueError(f"unknown method {name!r}; registered: {', '.join(METHODS)}")
    return key


def build(name: str, comm, topology, strict: bool = False, **hyper) -> GossipAlgorithm:
    """The method registered as `name`, given the hyper-parameters its factory takes (the
    entrypoints hand it the whole vocabulary). `strict`: a hyper-parameter it does not take,
    or a missing one it needs, is a ValueError (the drop-in optimizer's keyword arguments)."""
    key = registered_name(name)
    parameters = inspect.signature(METHODS[key].factory).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    accepted = [p for p in list(parameters)[2:] if parameters[p].kind is not parameters[p].VAR_KEYWORD]
    if strict:
        unknown = [h for h in hyper if h not in parameters and not takes_any]
        missing = [p for p in accepted if parameters[p].default is parameters[p].empty and p not in hyper]
        if unknown or missing:
            raise ValueError(f"method {key} takes {', '.join(accepted) or 'no hyper-parameters'}"
                             + (f"; not {', '.join(unknown)}" if unknown else "")
                             + (f"; it needs {', '.join(missing)}" if missing else ""))
    elif not takes_any:
        hyper = {h: value for h, value in hyper.items() if h in parameters}
    return METHODS[key].factory(comm, topology, **hyper)


class _StandIn:
    """What a method's constructor reads of a Communicator (no local workers, no process
    group): enough to run the constructor's checks before any work."""

    def __init__(self, n_workers: int):
        self.n_workers, self.local_workers, self.device = n_workers, range(0), torch.device("cpu")


def check(name: str, topology, **hyper) -> None:
    """Run the checks of method `name`'s constructor, the one place they live, before any
    work; ValueError says what is wrong. A constructor that needs more of a communicator
    than the stand-in has is checked when the run builds it."""
    try:
        build(name, _StandIn(topology.n_workers), topology, **hyper)
    except AttributeError:
        pass


def _power_gossip(comm, topology, rank=1, num_iterations=1, warm_start=True, round_weights=False,
                  diffusion_rate=1.0, seed=0, edge_memory=None):
    """PowerGossip on matrices, exact gossip on vectors (as in the paper's experiments)."""
    power = PowerGossip(comm, topology, rank=rank, num_iterations=num_iterations, warm_start=warm_start,
                        round_weights=round_weights, diffusion_rate=diffusion_rate, seed=seed, edge_memory=edge_memory)
    return OnlyOnLargeParameters(power, SimpleGossip(comm, topology))


def _with_compressor(method_class):
    def factory(comm, topology, compressor="sign-and-norm", keep_ratio=None, rank=1, qsgd_levels=16,
                diffusion_rate=1.0, seed=0):
        return method_class(comm, topology, compressors.build(compressor, keep_ratio, rank, qsgd_levels),
                            diffusion_rate=diffusion_rate, seed=seed)
    return factory


register_algorithm("all-reduce", lambda comm, topology: AllReduce(comm, topology), needs_tuning=False, local_step_first=True)
register_algorithm("dpsgd", SimpleGossip, needs_tuning=False)
register_algorithm("power-gossip", _power_gossip, needs_tuning=False)
register_algorithm("choco", _with_compressor(ChocoGossip))
register_algorithm("deepsqueeze", _with_compressor(DeepSqueezeGossip))
register_algorithm("moniqua", MoniquaGossip)
register_algorithm("powersgd", PowerSGD, acts_on="gradients", needs_tuning=False)
register_algorithm("push-sum", PushSum, needs_tuning=False, local_step_first=True)  # SGP: step on z_t, then mix
