"""Communication graphs and their mixing matrices.

A *topology* says who talks to whom and how much each message counts. It is a
mixing (diffusion) matrix W of shape [n_workers, n_workers]: one gossip round
replaces worker i's value by the weighted average

    x_i <- sum_j W[i, j] x_j,

so row i holds the weights worker i *receives* with, and W[i, j] > 0 for j != i
means j sends to i. Every W here has entries >= 0 and is row-stochastic (rows sum
to 1: gossip) or column-stochastic (columns sum to 1: what push-sum needs, see
`from_digraph`), and its graph is connected; the builders of the paper's graphs
give symmetric, doubly stochastic matrices, the directed ones (`unidirectional_ring`,
`directed_exponential`, `one_peer_exponential`) doubly stochastic ones.

Graphs over time. A topology answers "which edges and weights at round t" through
`at(t)` (t counts gossip rounds from 0): a `Topology` answers itself at every t; a
`TimeVarying` graph answers round t's `Topology`, whose own graph need not be
connected (a matching) as long as the rounds together connect the workers:
`one_peer_exponential` and `one_peer_hypercube` (Ying et al., NeurIPS 2021, "Exponential
Graph is Provably Efficient for Decentralized Deep Training": exact averaging after
log2(n) rounds for n a power of two, one message per worker per round),
`random_matching`, a schedule file (`schedule:FILE`, `from_schedule`) and any
callable round -> graph (`from_callable`). `check_requirement` says whether a method
can run on a topology (symmetric at every round, doubly stochastic, or
column-stochastic and strongly connected).

How fast gossip mixes is measured by the spectral gap (see
`Topology.spectral_gap`): about 2/3 for a 4-ring, 0.05 for a 16-ring.

Configs name topologies with `build(name, n_workers, **options)`; `NAMES` lists
the names. Arbitrary graphs come in through `from_graph`, `from_edge_list`,
`from_matrix`, `from_digraph`, `from_schedule` and `from_callable`.

Single worker: every builder whose formula is defined at n = 1 (all but
`social_network` and `watts_strogatz`) returns W = [[1]]: the worker keeps its
own value, which is what the formulas give anyway (e.g. the ring's shift S is
the identity at n = 1, so (I + S + S^T) / 3 = I).

This module depends on numpy and networkx only (matplotlib for `plot`), so that
every layer above can import it cheaply.
"""
import inspect
import itertools
import math
import os

import networkx
import numpy as np

TOLERANCE = 1e-9  # for row/column sums and symmetry
CHECKED_ROUNDS = 16  # rounds whose graphs are checked of a graph over time without a period


class Topology:
    """A validated mixing matrix W (see the module docstring) with a name.

    W[i, j] is the weight worker i gives to the value it receives from worker j.
    """

    is_static = True  # the same graph at every round
    period = 1

    def __init__(self, W, name="custom", layout="spring", connected=True):
        """Check W and keep a read-only float64 copy.

        `layout` ("circular" or "spring") only affects `plot`. `connected=False` accepts
        a graph that does not connect the workers on its own (one round of a graph over
        time). Raises ValueError naming what is wrong with W and how to fix it.
        """
        try:
            W = np.array(W, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise ValueError(f"mixing matrix of {name!r} is not a numeric array: {error}") from None
        if W.ndim != 2 or W.shape[0] != W.shape[1] or W.shape[0] == 0:
            raise ValueError(
                f"mixing matrix of {name!r} must be a non-empty square [n, n] array, got shape {W.shape}"
            )
        if not np.all(np.isfinite(W)):
            i, j = np.argwhere(~np.isfinite(W))[0]
            raise ValueError(f"mixing matrix of {name!r} has a non-finite entry W[{i}, {j}] = {W[i, j]}")
        if np.any(W < 0):
            i, j = np.argwhere(W < 0)[0]
            raise ValueError(
                f"mixing matrix of {name!r} has a negative entry W[{i}, {j}] = {W[i, j]:g}; "
                "gossip weights must be >= 0 (each row is a weighted average)"
            )
        row_error = np.abs(W.sum(axis=1) - 1)
        if np.any(row_error > TOLERANCE) and np.any(np.abs(W.sum(axis=0) - 1) > TOLERANCE):
            i = int(np.argmax(row_error))
            raise ValueError(
                f"rows of the mixing matrix of {name!r} must sum to 1 (tolerance {TOLERANCE:g}), "
                f"but row {i} sums to {W[i].sum():.12g}; normalize with W / W.sum(axis=1, keepdims=True) "
                "(or make every column sum to 1: push-sum weights)"
            )

        self.name = name
        self.layout = layout
        self._W = W
        self._W.flags.writeable = False  # callers may hold it; nobody should edit it in place

        # Undirected support: i and j exchange messages if either one listens to the other.
        support = (W > 0) | (W.T > 0)
        np.fill_diagonal(support, False)
        self._support = support
        # Every (i, j) of the support, sorted by i then j: one pass over W, not one per worker.
        self._pairs = np.nonzero(support)
        self._first_pair = np.searchsorted(self._pairs[0], np.arange(len(W) + 1))  # worker i's pairs: [first[i], first[i + 1])

        if connected:
            _check_connected(support, f"the graph of {name!r} (non-zero off-diagonal entries of W, as undirected)")

    @property
    def n_workers(self) -> int:
        return self._W.shape[0]

    def at(self, t: int) -> "Topology":
        """The graph of round t: this one, at every round."""
        return self

    @property
    def diffusion_matrix(self) -> np.ndarray:
        """W itself, read-only (copy it to modify)."""
        return self._W

    def _check_worker(self, worker):
        if not 0 <= worker < self.n_workers:
            raise ValueError(f"worker {worker} does not exist in {self.name!r} (workers are 0..{self.n_workers - 1})")

    def neighbors(self, worker):
        """Sorted workers j != worker with W[worker, j] > 0 or W[j, worker] > 0."""
        self._check_worker(worker)
        return self._pairs[1][self._first_pair[worker]:self._first_pair[worker + 1]].tolist()

    neighbor_ranks = neighbors  # the original code's name, kept for users' scripts

    def half_edges_of(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(i, j) of every pair of neighbours with i in first .. first + count - 1, sorted by i then j:
        `neighbors` of a block of workers at once, as two int64 arrays."""
        span = slice(self._first_pair[first], self._first_pair[first + count])
        return self._pairs[0][span].astype(np.int64), self._pairs[1][span].astype(np.int64)

    def weight(self, sender, receiver) -> float:
        """How much `receiver` weighs the message from `sender`: W[receiver, sender]."""
        self._check_worker(sender)
        self._check_worker(receiver)
        return float(self._W[receiver, sender])

    def edges(self):
        """Undirected edges (i, j), i < j, of the support, in lexicographic order."""
        return [(int(i), int(j)) for i, j in zip(*np.nonzero(np.triu(self._support, k=1)))]

    def spectral_gap(self) -> float:
        """1 - |lambda_2|, with W's eigenvalues sorted by modulus, descending.

        The paper says "1 - second largest eigenvalue of W" and
        quotes ring gaps of about 0.67 (n=4), 0.05 (n=16), 0.01 (n=36) and 0.4 for
        a 4x4 torus. Those cases have lambda_min = -lambda_2 or |lambda_min| <
        lambda_2, so they cannot tell the two readings apart; we take the modulus
        because |lambda_2| is the rate at which x <- W x contracts towards the
        average, and it keeps the gap in [0, 1]. It differs from the signed
        1 - lambda_2 (used by the original code) only when a negative eigenvalue
        dominates, e.g. the 2-ring: eigenvalues 1, -1/3 give 2/3 here, 4/3 signed.
        A single worker has gap 1 (it is always at consensus).
        """
        if self.n_workers == 1:
            return 1.0
        if self.is_symmetric:
            eigenvalues = np.linalg.eigvalsh(self._W)
        else:
            eigenvalues = np.linalg.eigvals(self._W)  # complex for directed graphs
        moduli = np.sort(np.abs(eigenvalues))[::-1]
        return float(1 - moduli[1])

    @property
    def is_symmetric(self) -> bool:
        return bool(np.max(np.abs(self._W - self._W.T)) <= TOLERANCE)

    @property
    def is_row_stochastic(self) -> bool:
        return bool(np.max(np.abs(self._W.sum(axis=1) - 1)) <= TOLERANCE)

    @property
    def is_column_stochastic(self) -> bool:
        """What every worker sends sums to 1: the total of the values is kept (push-sum)."""
        return bool(np.max(np.abs(self._W.sum(axis=0) - 1)) <= TOLERANCE)

    @property
    def is_doubly_stochastic(self) -> bool:
        return self.is_row_stochastic and self.is_column_stochastic

    def plot(self, path):
        """Write a PNG to `path`: the graph (left) and W as an image (right)."""
        # Imported here so training processes never pay for matplotlib; a bare
        # Figure renders with Agg and leaves pyplot's global backend alone.
        from matplotlib.figure import Figure

        if self.is_symmetric:
            graph = networkx.Graph(self.edges())
        else:  # arrows from sender j to receiver i
            graph = networkx.DiGraph((int(j), int(i)) for i, j in np.argwhere(self._W > 0) if i != j)
        graph.add_nodes_from(range(self.n_workers))
        if self.layout == "circular":
            positions = networkx.circular_layout(sorted(graph.nodes))
        else:
            positions = networkx.spring_layout(graph, seed=0)

        figure = Figure(figsize=(10, 4.5))
        graph_axes, matrix_axes = figure.subplots(1, 2)
        networkx.draw_networkx(graph, positions, ax=graph_axes, node_size=200, font_size=7)
        graph_axes.set_title(f"{self.name}")
        graph_axes.set_axis_off()
        image = matrix_axes.imshow(self._W, cmap="viridis")
        matrix_axes.set_title(f"W (spectral gap {self.spectral_gap():.3g})")
        matrix_axes.set_xlabel("sender j")
        matrix_axes.set_ylabel("receiver i")
        figure.colorbar(image, ax=matrix_axes)
        figure.tight_layout()
        figure.savefig(os.fspath(path), format="png", dpi=100, bbox_inches="tight")

    def __repr__(self):
        return f"Topology(name={self.name!r}, n_workers={self.n_workers}, spectral_gap={self.spectral_gap():.4f})"


class TimeVarying:
    """A graph that changes from round to round: `at(t)` is round t's `Topology`.

    `graph_of_round(t)` builds round t's graph (t in 0..period-1 for a periodic graph,
    any t >= 0 otherwise). A periodic graph keeps one Topology per phase, so that the
    communicator's plan of each is built once; an aperiodic one keeps only the latest
    round's. Over one period (or the first CHECKED_ROUNDS rounds) the rounds together
    must connect the workers. `expected_gap`: the spectral gap of a random graph, when
    known in closed form.
    """

    is_static = False

    def __init__(self, n_workers: int, name: str, graph_of_round, period: int | None = None,
                 expected_gap: float | None = None):
        self.n_workers, self.name, self.period = n_workers, name, period
        self._graph_of_round, self._expected_gap = graph_of_round, expected_gap
        self._built: dict[int, Topology] = {}
        union = np.zeros((n_workers, n_workers), dtype=bool)
        for t in rounds_to_check(self):
            W = self.at(t).diffusion_matrix
            union |= (W > 0) | (W.T > 0)
        np.fill_diagonal(union, False)
        _check_connected(union, f"the graphs of {name!r} over rounds {_rounds_text(self)} together")

    def at(self, t: int) -> Topology:
        key = t % self.period if self.period else t
        graph = self._built.get(key)
        if graph is None:
            graph = self._graph_of_round(key)
            if graph.n_workers != self.n_workers:
                raise ValueError(f"round {t} of {self.name!r} has {graph.n_workers} workers, expected {self.n_workers}")
            if not self.period:
                self._built.clear()
            self._built[key] = graph
        return graph

    @property
    def is_symmetric(self) -> bool:
        return all(self.at(t).is_symmetric for t in rounds_to_check(self))

    @property
    def is_doubly_stochastic(self) -> bool:
        return all(self.at(t).is_doubly_stochastic for t in rounds_to_check(self))

    def spectral_gap(self) -> float:
        """A per-round equivalent of `Topology.spectral_gap`, comparable with static graphs' gaps.

        Periodic: 1 - |lambda_2(M)|^(1 / period) with M = W_{period-1} ... W_1 W_0, the
        product of one period's matrices (gap 1: exact averaging after one period).
        Random graphs give their `expected_gap`; a callable without a period gives nan.
        """
        if self._expected_gap is not None:
            return self._expected_gap
        if not self.period:
            return float("nan")
        product = np.eye(self.n_workers)
        for t in range(self.period):
            product = self.at(t).diffusion_matrix @ product
        moduli = np.sort(np.abs(np.linalg.eigvals(product)))[::-1]
        second = moduli[1] if self.n_workers > 1 and moduli[1] > TOLERANCE else 0.0
        return float(1 - second ** (1 / self.period))

    def __repr__(self):
        return (f"TimeVarying(name={self.name!r}, n_workers={self.n_workers}, period={self.period}, "
                f"spectral_gap={self.spectral_gap():.4f})")


def rounds_to_check(topology) -> range:
    """The rounds whose graphs stand for all of a topology's: one period, or the first CHECKED_ROUNDS."""
    return range(topology.period or CHECKED_ROUNDS)


def _rounds_text(topology) -> str:
    rounds = rounds_to_check(topology)
    return f"0..{rounds[-1]}" if len(rounds) > 1 else "0"


def _check_connected(support, what):
    """ValueError unless the undirected boolean adjacency `support` is connected."""
    components = list(networkx.connected_components(networkx.from_numpy_array(support.astype(np.int8))))
    if len(components) > 1:
        parts = sorted(sorted(c) for c in components)
        shown = ", ".join(str(p if len(p) <= 8 else p[:8] + ["..."]) for p in parts[:3])
        raise ValueError(
            f"{what} is not connected: it has {len(components)} components ({shown}{', ...' if len(parts) > 3 else ''}); "
            "workers in different components can never agree. Add edges (non-zero weights) "
            "that join the components."
        )


# ---------------------------------------------------------------------------
# Weighting rules: graph (0/1 adjacency) -> mixing matrix.


def _adjacency(graph, name):
    """Symmetric boolean adjacency of an undirected networkx graph with nodes 0..n-1 (self-loops dropped)."""
    if graph.is_directed():
        raise ValueError(
            f"graph {name!r} is directed; the weighting rules need an undirected graph. Pass "
            "graph.to_undirected(), or build W yourself and use from_matrix(W)."
        )
    nodes = set(graph.nodes)
    n = len(nodes)
    if n == 0:
        raise ValueError(f"graph {name!r} has no nodes; it needs nodes 0..n-1 with n >= 1")
    expected = set(range(n))
    if nodes != expected:
        bad = sorted(nodes - expected, key=repr)[:5]
        missing = sorted(expected - nodes)[:5]
        raise ValueError(
            f"graph {name!r} must have nodes 0..{n - 1} (worker ids), but it has nodes {bad} "
            f"outside that range and lacks {missing}. Relabel with "
            "networkx.convert_node_labels_to_integers(graph)."
        )
    A = np.zeros((n, n), dtype=bool)
    for i, j in graph.edges():
        A[i, j] = A[j, i] = True
    np.fill_diagonal(A, False)  # the diagonal is set by the rules, never by the graph
    return A


def _fill_diagonal_with_rest(W):
    """Self weight = whatever the row has left, so rows sum to 1."""
    np.fill_diagonal(W, 0.0)
    np.fill_diagonal(W, 1.0 - W.sum(axis=1))
    return W


def _metropolis_hastings_weights(A):
    """w_ij = 1 / (1 + max(deg_i, deg_j)) on edges, diagonal the rest: symmetric, doubly stochastic."""
    degree = A.sum(axis=1)
    W = np.where(A, 1.0 / (1.0 + np.maximum.outer(degree, degree)), 0.0)
    return _fill_diagonal_with_rest(W)


def _decreasing_degree_weights(A):
    """The original code's rule for the social network and Watts-Strogatz graphs.

    Visit nodes by decreasing degree; every still-unset edge entry in that node's
    row and column becomes 1 / (degree + 1); the diagonal takes the rest of the row.
    An edge {i, j} is thus set by its endpoint of larger degree (ties give the same
    value either way), so the result equals `_metropolis_hastings_weights`; we keep
    the literal procedure so the reproduction can be checked against the paper's code.
    """
    degree = A.sum(axis=1)
    W = np.zeros(A.shape)
    unset = A.copy()
    for node in sorted(range(len(A)), key=lambda v: -degree[v]):
        value = 1.0 / (degree[node] + 1)
        W[node, unset[node]] = value
        W[unset[:, node], node] = value
        unset[node, :] = unset[:, node] = False
    return _fill_diagonal_with_rest(W)


# ---------------------------------------------------------------------------
# Builders (the graphs of the PowerGossip paper's experiments).


def _check_size(n, what, minimum=1, hint=""):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise ValueError(f"{what}: n_workers must be an integer, got {n!r}")
    if n < minimum:
        raise ValueError(f"{what} needs n_workers >= {minimum}, got {n}{hint}")
    return int(n)


def _shift(n):
    """Cyclic shift S with S[i, (i + 1) % n] = 1, so (S x)_i = x_{i+1}."""
    return np.roll(np.eye(n), 1, axis=1)


def ring(n):
    """W = (I + S + S^T) / 3. At n = 2, S = S^T so the other worker gets 2/3; at n = 1, W = [[1]]."""
    n = _check_size(n, "ring")
    S = _shift(n)
    return Topology((np.eye(n) + S + S.T) / 3, name=f"{n}-ring", layout="circular")


def unidirectional_ring(n):
    """W = (I + S) / 2: worker i listens to i + 1 only. Not symmetric (directed experiments)."""
    n = _check_size(n, "unidirectional ring")
    return Topology((np.eye(n) + _shift(n)) / 2, name=f"{n}-ring (unidirectional)", layout="circular")


def torus(n):
    """d1 x d2 wrap-around grid, d1 = largest divisor of n <= sqrt(n), d2 = n / d1.

    Worker i = r * d1 + c has self weight 1/5 and 1/5 for each of its four
    neighbours (r, c +- 1 mod d1) and (r +- 1 mod d2, c); where neighbours coincide
    (a side of length 1 or 2) their weights add up. A prime n gives a 1 x n torus:
    a ring with self weight 3/5.
    """
    n = _check_size(n, "torus")
    d1 = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    d2 = n // d1
    rows, cols = np.divmod(np.arange(n), d1)
    W = np.eye(n) / 5
    for neighbor in (
        rows * d1 + (cols + 1) % d1,
        rows * d1 + (cols - 1) % d1,
        (rows + 1) % d2 * d1 + cols,
        (rows - 1) % d2 * d1 + cols,
    ):
        W[np.arange(n), neighbor] += 1 / 5  # one direction at a time, so coinciding neighbours add up
    return Topology(W, name=f"{d1}x{d2}-torus")


def fully_connected(n):
    """W = 1/n everywhere: one round is an exact average."""
    n = _check_size(n, "fully connected")
    return Topology(np.full((n, n), 1.0 / n), name=f"fully-connected ({n} workers)", layout="circular")


def social_network(n=32):
    """networkx's Davis Southern Women graph (32 nodes: 18 women then 14 events, in the
    graph's node order), weighted by the original code's decreasing-degree rule."""
    if n != 32:
        raise ValueError(
            f"the social network topology is the fixed 32-node Davis Southern Women graph; "
            f"it needs n_workers = 32, got {n!r}. Use another topology for {n!r} workers."
        )
    graph = networkx.convert_node_labels_to_integers(networkx.davis_southern_women_graph(), ordering="default")
    return Topology(_decreasing_degree_weights(_adjacency(graph, "social network")), name="social network (Davis)")


def watts_strogatz(n, k=3, p=0.9, seed=1):
    """networkx.connected_watts_strogatz_graph(n, k, p, seed), weighted by the original code's
    decreasing-degree rule. Note k=3 links each node to k // 2 = 1 neighbour per side
    before rewiring with probability p."""
    n = _check_size(n, "watts_strogatz", minimum=k, hint=f" (each node starts with k={k} ring neighbours)")
    try:
        graph = networkx.connected_watts_strogatz_graph(n, k, p, seed=seed)
    except networkx.NetworkXException as error:
        raise ValueError(
            f"watts_strogatz(n={n}, k={k}, p={p}, seed={seed}) found no connected graph ({error}); "
            "use k >= 2 or another seed"
        ) from None
    A = _adjacency(graph, "watts_strogatz")
    return Topology(_decreasing_degree_weights(A), name=f"watts-strogatz (n={n}, k={k}, p={p}, seed={seed})")


def hypercube(n):
    """log2(n)-dimensional hypercube: i ~ i XOR 2^b. d-regular, so Metropolis-Hastings gives 1/(d+1)."""
    n = _check_size(n, "hypercube")
    if n & (n - 1):
        lower = 1 << (n.bit_length() - 1)
        raise ValueError(f"hypercube needs n_workers to be a power of two, got {n}; try {lower} or {2 * lower}")
    graph = networkx.Graph((i, i ^ (1 << b)) for i in range(n) for b in range(n.bit_length() - 1))
    graph.add_nodes_from(range(n))
    return from_graph(graph, name=f"{n}-hypercube")


def exponential(n):
    """Static exponential graph: i ~ i +- 2^k (mod n) for every 2^k < n, Metropolis-Hastings weights."""
    n = _check_size(n, "exponential")
    graph = networkx.Graph()
    graph.add_nodes_from(range(n))
    for i in range(n):
        for k in range((n - 1).bit_length()):  # all k with 2^k < n
            graph.add_edges_from([(i, (i + 2**k) % n), (i, (i - 2**k) % n)])
    return from_graph(graph, name=f"{n}-exponential", layout="circular")


def star(n):
    """Worker 0 is the hub, linked to every other worker; Metropolis-Hastings weights (1/n on edges)."""
    n = _check_size(n, "star")
    graph = networkx.star_graph(n - 1) if n > 1 else networkx.empty_graph(1)
    return from_graph(graph, name=f"{n}-star")


def chain(n):
    """A path 0 - 1 - ... - n-1 (a tree of diameter n - 1), Metropolis-Hastings weights."""
    n = _check_size(n, "chain")
    return from_graph(networkx.path_graph(n), name=f"{n}-chain", layout="circular")


def _heap_tree(order):
    """The binary tree on the workers `order` laid out as a heap: order[p]'s children are
    order[2p + 1] and order[2p + 2]. Its inner nodes are order[0 .. n // 2 - 1]."""
    return networkx.Graph([(order[(p - 1) // 2], order[p]) for p in range(1, len(order))])


def binary_tree(n):
    """A binary tree with worker 0 at the root and worker p's children 2p + 1 and 2p + 2
    (depth log2(n)), Metropolis-Hastings weights."""
    n = _check_size(n, "binary_tree")
    graph = _heap_tree(list(range(n)))
    graph.add_nodes_from(range(n))
    return from_graph(graph, name=f"{n}-binary-tree")


class TwoTrees(Topology):
    """Two spanning trees over the same workers (`trees`, two Topology objects), as RelaySum
    relays over them (Vogels et al. 2021, "multi-topology" relaying): each tree carries half of
    the entries. Its own W (Metropolis-Hastings weights on the union of the trees' edges) serves
    plots and the communication plan; methods that mix with one W refuse it
    (`requirement_problem`): it is two graphs, not one mixing matrix."""

    def __init__(self, trees, name):
        union = networkx.compose(*(networkx.Graph(tree.edges()) for tree in trees))
        union.add_nodes_from(range(trees[0].n_workers))
        super().__init__(_metropolis_hastings_weights(_adjacency(union, name)), name=name)
        self.trees = tuple(trees)


def double_binary_trees(n):
    """Two binary trees laid out as heaps (`binary_tree`), the first over workers 0, 1, ..,
    n-1 and the second over n-1, n-2, .., 0: the first's inner nodes are 0 .. n//2 - 1, the
    second's n-1 down to n - n//2, so every worker is a leaf of at least one tree (the
    double binary trees of NCCL and of RelaySum's multi-topology relaying)."""
    n = _check_size(n, "double_binary_trees")
    trees = []
    for order in (list(range(n)), list(range(n - 1, -1, -1))):
        graph = _heap_tree(order)
        graph.add_nodes_from(range(n))
        trees.append(from_graph(graph, name=f"{n}-binary-tree over {'0..' if order[0] == 0 else f'{n - 1}..0'}"))
    return TwoTrees(trees, name=f"{n}-double-binary-trees")


def _powers_of_two_below(n):
    """2^k for every k with 2^k < n: the exponential graphs' shifts (k = 0..log2(n)-1 for n a power of 2)."""
    return [2**k for k in range((n - 1).bit_length())]


def _sends_to(n, targets, weight):
    """W with W[targets[i], i] += weight for every worker i (i sends to targets[i]) and the diagonal the rest."""
    W = np.zeros((n, n))
    np.add.at(W, (targets, np.arange(n)), weight)
    return _fill_diagonal_with_rest(W)


def directed_exponential(n):
    """Ying et al. (NeurIPS 2021)'s static exponential graph: worker i sends to i + 2^k (mod n)
    for every 2^k < n, every weight 1/(K+1) with K the number of such k (self too). Directed,
    doubly stochastic (every worker receives from K workers as well)."""
    n = _check_size(n, "directed_exponential")
    shifts = _powers_of_two_below(n)
    W = np.eye(n) / (len(shifts) + 1)
    for shift in shifts:
        W[(np.arange(n) + shift) % n, np.arange(n)] += 1 / (len(shifts) + 1)
    return Topology(W, name=f"{n}-directed-exponential", layout="circular")


def one_peer_exponential(n):
    """Ying et al. (NeurIPS 2021)'s one-peer exponential graph: at round t, worker i sends to
    i + 2^k (mod n), k = t mod K (K = log2(n) for n a power of 2), weights 1/2: W_t = (I + S^(2^k)) / 2
    with S the cyclic shift. Directed, doubly stochastic; one message per worker per round.
    For n a power of 2 the product of K consecutive rounds is (1/n) 1 1^T: exact averaging."""
    n = _check_size(n, "one_peer_exponential")
    shifts = _powers_of_two_below(n) or [0]  # n = 1: the worker keeps its value
    return TimeVarying(n, f"{n}-one-peer-exponential", period=len(shifts), graph_of_round=lambda phase: Topology(
        _sends_to(n, (np.arange(n) + shifts[phase]) % n, 0.5),
        name=f"{n}-one-peer-exponential (+{shifts[phase]})", layout="circular", connected=False))


def one_peer_hypercube(n):
    """At round t, worker i pairs with i XOR 2^k, k = t mod log2(n), weights 1/2: a perfect
    matching each round (symmetric, doubly stochastic), exact averaging after log2(n) rounds."""
    n = _check_size(n, "one_peer_hypercube")
    if n & (n - 1):
        lower = 1 << (n.bit_length() - 1)
        raise ValueError(f"one_peer_hypercube needs n_workers to be a power of two, got {n}; try {lower} or {2 * lower}")
    dimensions = max(n.bit_length() - 1, 1)
    return TimeVarying(n, f"{n}-one-peer-hypercube", period=dimensions, graph_of_round=lambda phase: Topology(
        _sends_to(n, np.arange(n) ^ (1 << phase), 0.5) if n > 1 else np.eye(1),
        name=f"{n}-one-peer-hypercube (dimension {phase})", connected=False))


def random_matching(n, seed=0):
    """A fresh uniformly random perfect matching every round (one worker left alone, with
    weight 1, at odd n), drawn from (seed, round) so every process draws the same; weights 1/2.

    Its spectral gap is 1 - sqrt(lambda_2(E[W^T W])) (the expected per-round contraction of
    the squared consensus error, as a per-round rate on the error itself): W^T W = W for a
    matching and E[W] = (1 - n p / 2) I + (p / 2) 1 1^T with p = P(i is paired with a given j)
    = 1/(n-1) (n even) or 1/n (n odd), so lambda_2 = 1 - n p / 2."""
    n = _check_size(n, "random_matching")
    p = 1 / (n - 1) if n % 2 == 0 else 1 / n
    gap = 1 - math.sqrt(max(0.0, 1 - n * p / 2)) if n > 1 else 1.0

    def matching(t):
        order = np.random.default_rng([seed, t]).permutation(n)
        partner = np.arange(n)
        partner[order[0:n - 1:2]], partner[order[1::2]] = order[1::2], order[0:n - 1:2]
        return Topology(_sends_to(n, partner, 0.5), name=f"{n}-random-matching (round {t})",
                        connected=False)

    return TimeVarying(n, f"{n}-random-matching (seed {seed})", matching, expected_gap=gap)


def from_graph(graph, name=None, layout="spring", connected=True):
    """Any undirected networkx graph with nodes 0..n-1 and Metropolis-Hastings weights:
    w_ij = 1 / (1 + max(deg_i, deg_j)) on edges, the diagonal the rest. Self-loops are ignored."""
    name = name or graph.name or "graph"
    return Topology(_metropolis_hastings_weights(_adjacency(graph, name)), name=name, layout=layout, connected=connected)


def from_digraph(graph, name=None):
    """A directed networkx graph with nodes 0..n-1, edge (i, j) = i sends to j, with push-sum
    weights: every worker splits what it has equally among itself and its out-neighbours,
    P[j, i] = 1 / (outdeg_i + 1). Column-stochastic; doubly stochastic only when every worker
    receives as much as it sends (e.g. equal in- and out-degrees everywhere)."""
    name = name or graph.name or "directed graph"
    n = graph.number_of_nodes()
    if set(graph.nodes) != set(range(n)) or n == 0:
        raise ValueError(f"graph {name!r} must have nodes 0..n-1 (worker ids), n >= 1")
    P = np.eye(n)
    for i, j in graph.edges():
        if i != j:
            P[j, i] = 1.0
    return Topology(P / P.sum(axis=0, keepdims=True), name=name)


def from_edge_list(path, n_workers=None, connected=True, max_workers=None):
    """Read a text file with one "i j" edge per line ('#' starts a comment; blank lines are
    skipped); nodes must be 0..n-1 (0..n_workers-1 when given: then a worker may have no
    edge). Weighted like `from_graph`. With n_workers or `max_workers`, a file that names
    more workers, or is longer than an edge list of that many workers could be
    (`_longest_file`), is refused while it is read, before anything of size n x n exists."""
    limit = n_workers if n_workers is not None else max_workers
    name = f"edge list {os.path.basename(os.fspath(path))}"
    nodes, edges = set(range(n_workers or 0)), []
    longest = None if limit is None else _longest_file(limit)
    for line_number, text in _lines_of(path, "one 'i j' edge per line", longest):
        try:
            i, j = (int(f) for f in text.split())
        except ValueError:
            raise ValueError(f"{path}, line {line_number}: expected two integer node ids 'i j', got {_shown(text)}") from None
        nodes.update((i, j))
        if limit is None or len(nodes) <= limit:  # past the limit, only the count of workers is kept, for the message
            edges.append((i, j))
    if limit is not None and len(nodes) > limit:
        raise ValueError(_size_mismatch(name, len(nodes), limit))
    if not edges and connected:
        raise ValueError(f"edge-list file {path} has no edges; write one 'i j' pair per line")
    graph = networkx.Graph()
    graph.add_nodes_from(range(n_workers or 0))
    graph.add_edges_from(edges)
    return from_graph(graph, name=name, connected=connected)


MAX_LINE = 4096  # characters in a line of an edge list or a schedule: far more than "i j  # a comment" needs


def _longest_file(n_workers: int) -> int:
    """Characters an edge-list (or schedule) file for `n_workers` workers may hold: every
    ordered pair of workers on a line of 64 characters, and at least 1 MiB."""
    return max(1 << 20, 64 * n_workers * n_workers)


def _lines_of(path, form: str, longest: int | None = None):
    """(line number, text) of a file's lines that hold something: '#' starts a comment.
    `form` says what a line should hold. A line longer than MAX_LINE characters, a file
    longer than `longest` characters and a file that is not text are ValueErrors naming the
    file, raised while it is read: no more than that is ever read (file:/dev/zero included)."""
    with open(path) as file:
        characters = 0
        for line_number in itertools.count(1):
            try:
                line = file.readline(MAX_LINE + 1)
            except UnicodeDecodeError as problem:
                raise ValueError(f"{path} is not a text file ({problem.reason} in line {line_number}); it should hold "
                                 f"{form}") from None
            if not line:
                return
            characters += len(line)
            if len(line.rstrip("\n")) > MAX_LINE:
                raise ValueError(f"{path}, line {line_number} is longer than {MAX_LINE} characters (it starts "
                                 f"{line[:12]!r}); "
                                 f"the file should hold {form}")
            if longest is not None and characters > longest:
                raise ValueError(f"{path} is longer than {longest} characters, more than such a file needs for "
                                 f"the workers it may name; it should hold {form}")
            text = line.split("#", 1)[0].strip()
            if text:
                yield line_number, text


def _shown(text: str, length: int = 60) -> str:
    """`text` for a message: repr'd, cut to `length` characters (and its length said) when longer."""
    shown = repr(text)
    return shown if len(shown) <= length else f"{shown[:length]}... ({len(text)} characters)"


def _size_mismatch(name: str, found: int, n_workers: int) -> str:
    return (f"topology {name!r} has {found} workers but n_workers = {n_workers}; "
            f"set n_workers = {found} or use a graph with {n_workers} nodes")


def without_edges(topology, pairs):
    """Round t's graph `topology` without the edges {i, j} of `pairs` (their weights go to
    the diagonal): a part of a round, for a method that gossips its edges in groups."""
    W = np.array(topology.diffusion_matrix)
    if pairs:
        i, j = np.array(pairs).T
        W[i, j] = W[j, i] = 0.0
    return Topology(_fill_diagonal_with_rest(W), name=f"{topology.name} (part)", connected=False)


def without_messages_of(topology, workers):
    """Round t's graph `topology` in which the workers marked in `workers` (booleans, one per
    worker) send nothing and still receive: their columns' weights go to the receivers' own, a
    directed graph whose rows sum to 1 (Choco's round under faults, methods/choco.py)."""
    W = np.array(topology.diffusion_matrix)
    W[:, workers] = 0.0
    return Topology(_fill_diagonal_with_rest(W), name=f"{topology.name} (some silent)", connected=False)


def from_matrix(W, name="custom"):
    """Use a given mixing matrix as is (validated by Topology)."""
    return Topology(W, name=name)


def from_schedule(path, n_workers):
    """A schedule file: one graph per line, cycled round by round (round t uses the graph of
    line t mod L, L graphs). A line is a static topology name of NAMES (built for n_workers)
    or `file:PATH` (an edge list, PATH relative to the schedule's folder; a worker may have
    no edge that round); '#' starts a comment, blank lines are skipped. The graphs together
    must connect the workers. A line that cannot be read is named by its number."""
    graphs = []
    for line_number, text, edge_list in _schedule_lines(path, n_workers):
        try:
            if edge_list is not None:
                graph = from_edge_list(edge_list, n_workers, connected=False)
            elif text.startswith("schedule:"):
                raise ValueError("a schedule lists static graphs, not another schedule")
            else:
                key = text.lower().replace("-", "_")
                if key in _BUILDERS and key not in _STATIC:
                    raise ValueError(f"{text!r} changes over time itself; a schedule lists static graphs")
                graph = build(text, n_workers)
        except (ValueError, OSError) as problem:
            raise ValueError(f"schedule {path}, line {line_number} ({_shown(text)}): {problem}") from None
        graphs.append(graph)
    if not graphs:
        raise ValueError(f"schedule {path} lists no graph; write one topology name or file:PATH per line")
    return TimeVarying(n_workers, f"schedule {os.path.basename(os.fspath(path))}", graphs.__getitem__, period=len(graphs))


def _schedule_lines(path, n_workers: int | None = None):
    """(line number, text, the edge list's path for a `file:PATH` line, else None) of a
    schedule's lines; PATH is relative to the schedule's folder. With `n_workers`, a file
    longer than a schedule for that many workers needs is refused while it is read."""
    folder = os.path.dirname(os.fspath(path))
    longest = _longest_file(n_workers) if n_workers is not None else None
    for line_number, text in _lines_of(path, "one topology name or file:PATH per line", longest):
        yield line_number, text, os.path.join(folder, text[len("file:"):]) if text.startswith("file:") else None


def files_read(name) -> dict[str, str]:
    """The files `build(name, ...)` reads, each under a label that names it: an edge list
    (`file:PATH`), a schedule and the edge lists it lists (`schedule:FILE`); none for a graph
    built from its name or given as an object. A run's fingerprint hashes them (runs.fingerprint)."""
    if not isinstance(name, str) or not name.startswith(("file:", "schedule:")):
        return {}
    if name.startswith("file:"):
        return {f"edge list {name[len('file:'):]}": name[len("file:"):]}
    path = name[len("schedule:"):]
    listed = {f"edge list {edge_list}": edge_list for _, _, edge_list in _schedule_lines(path) if edge_list is not None}
    return {f"schedule {path}": path} | listed


def from_callable(graph_of_round, n_workers, period=None, name=None):
    """Any Python callable round -> graph (t = 0, 1, ...): each answer is a Topology, a
    mixing matrix, a networkx graph (weighted like `from_graph`) or a static topology name.
    With `period`, round t reuses round t mod period's graph and the spectral gap is known;
    without, the first CHECKED_ROUNDS rounds stand for all when a method checks the graph."""
    name = name or getattr(graph_of_round, "__name__", "callable")

    def graph(t):
        answer = graph_of_round(t)
        if isinstance(answer, (Topology, str)):
            return answer if isinstance(answer, Topology) else build(answer, n_workers)
        if isinstance(answer, networkx.Graph):
            return from_digraph(answer) if answer.is_directed() else from_graph(answer, name=f"{name} (round {t})", connected=False)
        return Topology(answer, name=f"{name} (round {t})", connected=False)

    return TimeVarying(n_workers, name, graph, period=period)


# ---------------------------------------------------------------------------
# What a method needs of a graph.

REQUIREMENTS = {
    "symmetric": "a symmetric topology at every round (every edge used both ways, with equal weights)",
    "fixed_symmetric": "a symmetric topology that stays the same every round",
    "doubly_stochastic": "a doubly stochastic topology at every round (rows and columns of W sum to 1; directed "
                         "edges are fine)",
    "column_stochastic": "a column-stochastic topology at every round (what each worker sends sums to 1) whose "
                         "rounds together are strongly connected",
    "tree": "a fixed spanning tree (n - 1 edges that connect the workers) or two of them (double_binary_trees)",
}
TWO_GRAPHS = "is two trees (two graphs), not one mixing matrix"  # why methods that mix with W refuse TwoTrees


def fault_free(topology):
    """The fault-free topology of a faults.FaultyTopology (its `without_faults`), else `topology` itself."""
    return getattr(topology, "without_faults", topology)


def requirement_problem(topology, need: str) -> str | None:
    """Why `topology` (static or over time) does not give what REQUIREMENTS[need] says, or None.
    A topology with faults (faults.FaultyTopology) is judged by its fault-free graph."""
    if need not in REQUIREMENTS:
        raise ValueError(f"unknown graph requirement {need!r}; one of {', '.join(REQUIREMENTS)}")
    topology = fault_free(topology)
    if need == "fixed_symmetric" and topology.period != 1:
        return f"{topology.name} changes from round to round"
    if need == "tree":
        return _tree_problem(topology)
    if hasattr(topology, "trees"):
        return f"{topology.name} {TWO_GRAPHS}"
    union = np.eye(topology.n_workers, dtype=bool)
    for t in rounds_to_check(topology):
        graph = topology.at(t)
        meets = {"symmetric": graph.is_symmetric, "fixed_symmetric": graph.is_symmetric,
                 "doubly_stochastic": graph.is_doubly_stochastic, "column_stochastic": graph.is_column_stochastic}[need]
        if not meets:
            where = "" if topology.is_static else f" at round {t}"
            return f"{topology.name} is not {need.removeprefix('fixed_').replace('_', ' ')}{where}"
        union |= graph.diffusion_matrix > 0
    if need == "column_stochastic" and not networkx.is_strongly_connected(networkx.DiGraph(union.T)):
        return f"{topology.name} is not strongly connected (some worker's values never reach another)"
    return None


def _tree_problem(topology) -> str | None:
    """Why `topology` is not one fixed spanning tree or a TwoTrees, or None."""
    if not topology.is_static:
        return f"{topology.name} changes from round to round"
    for tree in getattr(topology, "trees", (topology,)):
        if len(tree.edges()) != tree.n_workers - 1:  # connected (Topology checks it) with n - 1 edges: a tree
            return f"{tree.name} has {len(tree.edges())} edges, not n - 1 = {tree.n_workers - 1}: it is not a tree"
    return None


def check_requirement(topology, need: str, who: str) -> None:
    """ValueError naming what `who` needs, why `topology` does not give it and which graphs would."""
    problem = requirement_problem(topology, need)
    if problem is not None:
        names = list(_TREES) if need == "tree" else \
            [name for name in NAMES if (need not in ("symmetric", "fixed_symmetric") or name not in _DIRECTED)
             and (need != "fixed_symmetric" or name in _STATIC) and name != "double_binary_trees"]
        forms = "file:PATH" + ("" if need in ("tree", "fixed_symmetric") else ", schedule:FILE of those") \
            + (", from_digraph (Python)" if need == "column_stochastic" else "")
        raise ValueError(f"{who} needs {REQUIREMENTS[need]}; {problem}. Graphs that would do: {', '.join(names)}, {forms}")


# ---------------------------------------------------------------------------
# Factory for configs.

_BUILDERS = {
    "ring": ring,
    "unidirectional_ring": unidirectional_ring,
    "torus": torus,
    "fully_connected": fully_connected,
    "social_network": social_network,
    "watts_strogatz": watts_strogatz,
    "hypercube": hypercube,
    "exponential": exponential,
    "star": star,
    "directed_exponential": directed_exponential,
    "one_peer_exponential": one_peer_exponential,
    "one_peer_hypercube": one_peer_hypercube,
    "random_matching": random_matching,
    "chain": chain,
    "binary_tree": binary_tree,
    "double_binary_trees": double_binary_trees,
}
NAMES = tuple(_BUILDERS)
_TIME_VARYING = ("one_peer_exponential", "one_peer_hypercube", "random_matching")
_STATIC = tuple(name for name in NAMES if name not in _TIME_VARYING)
_DIRECTED = ("unidirectional_ring", "directed_exponential", "one_peer_exponential")
_TREES = ("chain", "binary_tree", "double_binary_trees", "star")


def build(name, n_workers, **options):
    """The topology a config asks for, with exactly `n_workers` workers.

    `name` is one of NAMES ('-' may replace '_', e.g. "fully-connected"),
    "file:PATH" for an edge-list file (see `from_edge_list`), "schedule:FILE" for a
    graph per line cycled round by round (see `from_schedule`), a networkx graph (see
    `from_graph`; directed: `from_digraph`), or a callable round -> graph (see
    `from_callable`). `options` go to the builder (e.g. watts_strogatz's k, p, seed;
    random_matching's seed).
    """
    kind = None
    if isinstance(name, networkx.Graph):
        kind = "a networkx graph"
    elif isinstance(name, str) and name.startswith(("file:", "schedule:")):
        kind = "an edge-list file" if name.startswith("file:") else "a schedule file"
    elif callable(name):
        kind = "a callable"
    if kind is not None and options:
        raise ValueError(f"{kind} takes no options, got {sorted(options)}")
    if isinstance(name, networkx.Graph):
        topology = from_digraph(name) if name.is_directed() else from_graph(name)
    elif kind == "an edge-list file":
        topology = from_edge_list(name[len("file:"):], max_workers=n_workers)
    elif kind == "a schedule file":
        topology = from_schedule(name[len("schedule:"):], n_workers)
    elif kind == "a callable":
        topology = from_callable(name, n_workers)
    else:
        key = str(name).strip().lower().replace("-", "_")
        if key not in _BUILDERS:
            raise ValueError(
                f"unknown topology {name!r}; valid names: {', '.join(NAMES)}, 'file:PATH' "
                "(edge list), 'schedule:FILE' (one graph per line), a networkx graph, or a callable round -> graph"
            )
        builder = _BUILDERS[key]
        try:
            inspect.signature(builder).bind(n_workers, **options)
        except TypeError:
            accepted = list(inspect.signature(builder).parameters)[1:]
            raise ValueError(
                f"topology {key!r} got options {sorted(options)}; it accepts {accepted or 'none'}"
            ) from None
        topology = builder(n_workers, **options)
    if topology.n_workers != n_workers:
        raise ValueError(_size_mismatch(topology.name, topology.n_workers, n_workers))
    return topology
