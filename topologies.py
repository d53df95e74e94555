"""Communication graphs and their mixing matrices.

A *topology* says who talks to whom and how much each message counts. It is a
mixing (diffusion) matrix W of shape [n_workers, n_workers]: one gossip round
replaces worker i's value by the weighted average

    x_i <- sum_j W[i, j] x_j,

so row i holds the weights worker i *receives* with, and W[i, j] > 0 for j != i
means j sends to i. Every W here is row-stochastic (rows sum to 1, entries >= 0)
and its graph is connected; the builders of the paper's graphs also give
symmetric, doubly stochastic matrices, except `unidirectional_ring`.

How fast gossip mixes is measured by the spectral gap (see
`Topology.spectral_gap`): about 2/3 for a 4-ring, 0.05 for a 16-ring.

Configs name topologies with `build(name, n_workers, **options)`; `NAMES` lists
the names. Arbitrary graphs come in through `from_graph`, `from_edge_list` and
`from_matrix`.

Single worker: every builder whose formula is defined at n = 1 (all but
`social_network` and `watts_strogatz`) returns W = [[1]]: the worker keeps its
own value, which is what the formulas give anyway (e.g. the ring's shift S is
the identity at n = 1, so (I + S + S^T) / 3 = I).

This module depends on numpy and networkx only (matplotlib for `plot`), so that
every layer above can import it cheaply.
"""
import inspect
import math
import os

import networkx
import numpy as np

TOLERANCE = 1e-9  # for row/column sums and symmetry


class Topology:
    """A validated mixing matrix W (see the module docstring) with a name.

    W[i, j] is the weight worker i gives to the value it receives from worker j.
    """

    def __init__(self, W, name="custom", layout="spring"):
        """Check W and keep a read-only float64 copy.

        `layout` ("circular" or "spring") only affects `plot`.
        Raises ValueError naming what is wrong with W and how to fix it.
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
        if np.any(row_error > TOLERANCE):
            i = int(np.argmax(row_error))
            raise ValueError(
                f"rows of the mixing matrix of {name!r} must sum to 1 (tolerance {TOLERANCE:g}), "
                f"but row {i} sums to {W[i].sum():.12g}; normalize with W / W.sum(axis=1, keepdims=True)"
            )

        self.name = name
        self.layout = layout
        self._W = W
        self._W.flags.writeable = False  # callers may hold it; nobody should edit it in place

        # Undirected support: i and j exchange messages if either one listens to the other.
        support = (W > 0) | (W.T > 0)
        np.fill_diagonal(support, False)
        self._support = support
        self._neighbors = [np.flatnonzero(row).tolist() for row in support]

        components = list(networkx.connected_components(networkx.from_numpy_array(support.astype(np.int8))))
        if len(components) > 1:
            parts = sorted(sorted(c) for c in components)
            shown = ", ".join(str(p if len(p) <= 8 else p[:8] + ["..."]) for p in parts[:3])
            raise ValueError(
                f"the graph of {name!r} (non-zero off-diagonal entries of W, as undirected) is not "
                f"connected: it has {len(components)} components ({shown}{', ...' if len(parts) > 3 else ''}); "
                "workers in different components can never agree. Add edges (non-zero weights) "
                "that join the components."
            )

    @property
    def n_workers(self) -> int:
        return self._W.shape[0]

    @property
    def diffusion_matrix(self) -> np.ndarray:
        """W itself, read-only (copy it to modify)."""
        return self._W

    def _check_rank(self, rank):
        if not 0 <= rank < self.n_workers:
            raise ValueError(f"worker {rank} does not exist in {self.name!r} (workers are 0..{self.n_workers - 1})")

    def neighbor_ranks(self, rank):
        """Sorted workers j != rank with W[rank, j] > 0 or W[j, rank] > 0."""
        self._check_rank(rank)
        return list(self._neighbors[rank])

    def weight(self, sender, receiver) -> float:
        """How much `receiver` weighs the message from `sender`: W[receiver, sender]."""
        self._check_rank(sender)
        self._check_rank(receiver)
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
    def is_doubly_stochastic(self) -> bool:
        # Rows already sum to 1 (checked in __init__); columns are the open question.
        return bool(np.max(np.abs(self._W.sum(axis=0) - 1)) <= TOLERANCE)

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


def from_graph(graph, name=None, layout="spring"):
    """Any undirected networkx graph with nodes 0..n-1 and Metropolis-Hastings weights:
    w_ij = 1 / (1 + max(deg_i, deg_j)) on edges, the diagonal the rest. Self-loops are ignored."""
    name = name or graph.name or "graph"
    return Topology(_metropolis_hastings_weights(_adjacency(graph, name)), name=name, layout=layout)


def from_edge_list(path):
    """Read a text file with one "i j" edge per line ('#' starts a comment; blank lines are
    skipped); nodes must be 0..n-1. Weighted like `from_graph`."""
    graph = networkx.Graph()
    with open(path) as file:
        for line_number, line in enumerate(file, start=1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            try:
                i, j = (int(f) for f in fields)
            except ValueError:
                raise ValueError(
                    f"{path}, line {line_number}: expected two integer node ids 'i j', got {line.strip()!r}"
                ) from None
            graph.add_edge(i, j)
    if graph.number_of_nodes() == 0:
        raise ValueError(f"edge-list file {path} has no edges; write one 'i j' pair per line")
    return from_graph(graph, name=f"edge list {os.path.basename(os.fspath(path))}")


def from_matrix(W, name="custom"):
    """Use a given mixing matrix as is (validated by Topology)."""
    return Topology(W, name=name)


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
}
NAMES = tuple(_BUILDERS)


def build(name, n_workers, **options):
    """The topology a config asks for, with exactly `n_workers` workers.

    `name` is one of NAMES ('-' may replace '_', e.g. "fully-connected"),
    "file:PATH" for an edge-list file (see `from_edge_list`), or a networkx graph
    (see `from_graph`). `options` go to the builder (e.g. watts_strogatz's k, p, seed).
    """
    if isinstance(name, networkx.Graph):
        if options:
            raise ValueError(f"a networkx graph takes no options, got {sorted(options)}")
        topology = from_graph(name)
    elif isinstance(name, str) and name.startswith("file:"):
        if options:
            raise ValueError(f"an edge-list file takes no options, got {sorted(options)}")
        topology = from_edge_list(name[len("file:"):])
    else:
        key = str(name).strip().lower().replace("-", "_")
        if key not in _BUILDERS:
            raise ValueError(
                f"unknown topology {name!r}; valid names: {', '.join(NAMES)}, 'file:PATH' "
                "(edge list), or a networkx graph"
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
        raise ValueError(
            f"topology {topology.name!r} has {topology.n_workers} workers but n_workers = {n_workers}; "
            f"set n_workers = {topology.n_workers} or use a graph with {n_workers} nodes"
        )
    return topology
