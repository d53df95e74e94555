"""Tests for topologies.py: mixing-matrix invariants, exact weights and spectral gaps
(the PowerGossip paper's graphs), and helpful errors on bad input."""
import math

import networkx
import numpy as np
import pytest

from powergossip import topologies
from powergossip.topologies import Topology, build

SIZES = range(1, 18)

# (builder name, sizes where it is defined)
CASES = [
    ("ring", SIZES),
    ("unidirectional_ring", SIZES),
    ("torus", SIZES),
    ("fully_connected", SIZES),
    ("exponential", SIZES),
    ("star", SIZES),
    ("hypercube", [1, 2, 4, 8, 16, 32]),
    ("watts_strogatz", range(3, 18)),
    ("social_network", [32]),
    ("directed_exponential", SIZES),
    ("chain", SIZES),
    ("binary_tree", SIZES),
    ("double_binary_trees", SIZES),
]
TIME_VARYING = [("one_peer_exponential", SIZES), ("one_peer_hypercube", [1, 2, 4, 8, 16, 32]), ("random_matching", SIZES)]
DIRECTED = ("unidirectional_ring", "directed_exponential")
ALL = [(name, n) for name, sizes in CASES for n in sizes]


def support_graph(W):
    """Undirected graph of the non-zero off-diagonal entries, computed independently of Topology."""
    n = len(W)
    graph = networkx.Graph()
    graph.add_nodes_from(range(n))
    graph.add_edges_from((i, j) for i in range(n) for j in range(n) if i != j and (W[i, j] > 0 or W[j, i] > 0))
    return graph


@pytest.mark.parametrize("name,n", ALL)
def test_invariants(name, n):
    topology = build(name, n)
    W = topology.diffusion_matrix
    assert topology.n_workers == n and W.shape == (n, n) and W.dtype == np.float64
    assert np.all(W >= 0)
    np.testing.assert_allclose(W.sum(axis=1), 1, atol=1e-12)
    assert topology.is_doubly_stochastic
    np.testing.assert_allclose(W.sum(axis=0), 1, atol=1e-12)
    assert topology.is_symmetric == (name not in DIRECTED or n <= 2 or (name == "directed_exponential" and n == 3))
    if name not in DIRECTED:
        np.testing.assert_allclose(W, W.T, atol=1e-12)
    assert networkx.is_connected(support_graph(W))
    assert 0 <= topology.spectral_gap() <= 1 + 1e-12

    graph = support_graph(W)
    for i in range(n):
        assert topology.neighbor_ranks(i) == sorted(graph.neighbors(i))
        for j in range(n):
            assert topology.weight(sender=j, receiver=i) == W[i, j]
    assert topology.edges() == sorted(tuple(sorted(e)) for e in graph.edges())


def test_matrix_is_read_only():
    W = build("ring", 5).diffusion_matrix
    with pytest.raises(ValueError):
        W[0, 0] = 1.0


def test_weight_is_receiver_row():
    # In the unidirectional ring worker i listens to i + 1: W[i, i + 1] = 1/2, W[i + 1, i] = 0.
    topology = topologies.unidirectional_ring(5)
    assert topology.weight(sender=1, receiver=0) == 0.5
    assert topology.weight(sender=0, receiver=1) == 0.0
    assert topology.neighbor_ranks(0) == [1, 4]  # undirected support
    assert not topology.is_symmetric
    assert topology.is_doubly_stochastic


# --- exact weights -----------------------------------------------------------


def test_ring_weights():
    np.testing.assert_allclose(build("ring", 2).diffusion_matrix, [[1 / 3, 2 / 3], [2 / 3, 1 / 3]])
    np.testing.assert_allclose(build("ring", 1).diffusion_matrix, [[1.0]])
    W = build("ring", 6).diffusion_matrix
    np.testing.assert_allclose(W[0], [1 / 3, 1 / 3, 0, 0, 0, 1 / 3])
    assert build("ring", 6).neighbor_ranks(0) == [1, 5]


def test_fully_connected_weights():
    np.testing.assert_array_equal(build("fully_connected", 1).diffusion_matrix, [[1.0]])
    np.testing.assert_allclose(build("fully_connected", 5).diffusion_matrix, np.full((5, 5), 0.2))


def test_torus_16_is_4x4_with_degree_4():
    topology = build("torus", 16)
    assert topology.name == "4x4-torus"
    W = topology.diffusion_matrix
    # worker 5 = row 1, column 1: neighbours 4, 6 (same row) and 1, 9 (same column)
    assert topology.neighbor_ranks(5) == [1, 4, 6, 9]
    # worker 0 wraps around: 1, 3 and 4, 12
    assert topology.neighbor_ranks(0) == [1, 3, 4, 12]
    for i in range(16):
        assert len(topology.neighbor_ranks(i)) == 4
        assert W[i, i] == pytest.approx(0.2)
        assert all(W[i, j] == pytest.approx(0.2) for j in topology.neighbor_ranks(i))


def test_torus_8_is_2x4_and_coinciding_neighbours_add():
    topology = build("torus", 8)
    assert topology.name == "2x4-torus"
    W = topology.diffusion_matrix
    # worker 0 = row 0, column 0 of a 2-wide grid: column +-1 are both worker 1
    assert topology.neighbor_ranks(0) == [1, 2, 6]
    assert W[0, 1] == pytest.approx(2 / 5)
    assert W[0, 2] == pytest.approx(1 / 5) and W[0, 6] == pytest.approx(1 / 5)
    assert W[0, 0] == pytest.approx(1 / 5)


def test_torus_prime_is_ring_with_heavier_self_weight():
    W = build("torus", 7).diffusion_matrix  # 1 x 7: both column neighbours are the worker itself
    assert W[3, 3] == pytest.approx(3 / 5)
    assert W[3, 2] == pytest.approx(1 / 5) and W[3, 4] == pytest.approx(1 / 5)


def test_star_weights():
    W = build("star", 5).diffusion_matrix
    # hub degree 4, leaves degree 1: Metropolis-Hastings gives 1 / (1 + 4) on every edge
    np.testing.assert_allclose(W[0], [0.2] * 5)
    np.testing.assert_allclose(W[3], [0.2, 0, 0, 0.8, 0])
    assert build("star", 5).neighbor_ranks(0) == [1, 2, 3, 4]


def test_hypercube_weights():
    topology = build("hypercube", 8)  # 3-regular: 1/4 on edges and self
    assert topology.neighbor_ranks(5) == [1, 4, 7]  # 5 = 0b101 flips to 0b100, 0b111, 0b001
    np.testing.assert_allclose(topology.diffusion_matrix[5], [0, 0.25, 0, 0, 0.25, 0.25, 0, 0.25])


def test_exponential_neighbours():
    assert build("exponential", 8).neighbor_ranks(0) == [1, 2, 4, 6, 7]
    assert build("exponential", 10).neighbor_ranks(3) == [1, 2, 4, 5, 7, 9]  # 3 +- 1, 2, 4, 8 mod 10
    # n = 4: offsets +-1 and 2 reach everyone, so it is the fully connected graph
    np.testing.assert_allclose(build("exponential", 4).diffusion_matrix, np.full((4, 4), 0.25))


def reference_decreasing_degree(graph):
    """Independent transcription of the original code's rule, as in the paper's code."""
    W = networkx.to_numpy_array(graph, nodelist=range(len(graph)))
    degrees = W.sum(axis=1) + 1
    for node in np.argsort(degrees, kind="stable")[::-1]:
        W[:, node][W[:, node] == 1] = 1 / degrees[node]
        W[node, :][W[node, :] == 1] = 1 / degrees[node]
        W[node, node] = 1 - W[node].sum() + W[node, node]
    return W


def test_social_network():
    topology = build("social-network", 32)
    W = topology.diffusion_matrix
    graph = networkx.convert_node_labels_to_integers(networkx.davis_southern_women_graph())
    assert topology.edges() == sorted(tuple(sorted(e)) for e in graph.edges())
    assert topology.is_symmetric and topology.is_doubly_stochastic
    np.testing.assert_allclose(W, reference_decreasing_degree(graph), atol=1e-15)
    # Evelyn Jefferson (node 0, degree 8) and event E1 (degree 3) share an edge: 1 / (8 + 1)
    e1 = list(networkx.davis_southern_women_graph().nodes).index("E1")
    assert graph.degree(0) == 8 and graph.degree(e1) == 3
    assert W[0, e1] == pytest.approx(1 / 9) and W[e1, 0] == pytest.approx(1 / 9)


@pytest.mark.parametrize("n", [5, 8, 16, 33])
def test_watts_strogatz_graph_and_weights(n):
    topology = build("watts-strogatz", n)
    graph = networkx.connected_watts_strogatz_graph(n, 3, 0.9, seed=1)
    assert topology.edges() == sorted(tuple(sorted(e)) for e in graph.edges())
    np.testing.assert_allclose(topology.diffusion_matrix, reference_decreasing_degree(graph), atol=1e-15)
    other_seed = build("watts_strogatz", n, seed=2, p=0.5)
    assert other_seed.name != topology.name


@pytest.mark.parametrize("seed", range(5))
def test_decreasing_degree_rule_equals_metropolis_hastings(seed):
    # Each edge is set by its endpoint of larger degree, i.e. 1 / (1 + max(deg_i, deg_j)).
    graph = networkx.gnm_random_graph(20, 40, seed=seed)
    A = networkx.to_numpy_array(graph, nodelist=range(20)) > 0
    np.testing.assert_allclose(
        topologies._decreasing_degree_weights(A), topologies._metropolis_hastings_weights(A), atol=1e-15
    )


def test_from_graph_metropolis_hastings():
    graph = networkx.path_graph(3)  # degrees 1, 2, 1
    W = topologies.from_graph(graph).diffusion_matrix
    np.testing.assert_allclose(W, [[2 / 3, 1 / 3, 0], [1 / 3, 1 / 3, 1 / 3], [0, 1 / 3, 2 / 3]])
    graph.add_edge(1, 1)  # self-loops do not count towards the degree
    np.testing.assert_allclose(topologies.from_graph(graph).diffusion_matrix, W)


def test_from_matrix_keeps_matrix():
    W = np.array([[0.5, 0.5, 0], [0.25, 0.5, 0.25], [0, 0.5, 0.5]])
    topology = topologies.from_matrix(W, name="mine")
    np.testing.assert_array_equal(topology.diffusion_matrix, W)
    assert topology.name == "mine"
    assert not topology.is_symmetric and not topology.is_doubly_stochastic  # columns sum to 0.75, 1.5, 0.75
    assert "mine" in repr(topology) and "n_workers=3" in repr(topology)


# --- spectral gap (1 - second largest eigenvalue modulus) ---------------------


def test_ring_spectral_gaps_from_reference():
    assert build("ring", 4).spectral_gap() == pytest.approx(2 / 3)  # eigenvalues 1, 1/3, 1/3, -1/3
    assert build("ring", 16).spectral_gap() == pytest.approx(0.05, abs=0.001)
    assert build("ring", 36).spectral_gap() == pytest.approx(0.01, abs=0.0002)
    assert build("ring", 2).spectral_gap() == pytest.approx(2 / 3)  # eigenvalues 1, -1/3
    assert build("ring", 1).spectral_gap() == 1.0


@pytest.mark.parametrize("n", range(3, 41))
def test_ring_spectral_gap_closed_form(n):
    # Eigenvalues (1 + 2 cos(2 pi k / n)) / 3. The largest after k = 0 is k = 1; the most
    # negative is -1/3 (even n) or (1 - 2 cos(pi / n)) / 3 (odd n), whose modulus is
    # <= (1 + 2 cos(2 pi / n)) / 3 for all n >= 3 (equal at n = 3: 0 = 0, and n = 4: 1/3 = 1/3).
    assert build("ring", n).spectral_gap() == pytest.approx(1 - (1 + 2 * math.cos(2 * math.pi / n)) / 3)


def test_torus_4x4_spectral_gap():
    # W = (I + S1 + S1^T + S2 + S2^T) / 5 on Z_4 x Z_4 has eigenvalues
    # (1 + 2 cos(pi a / 2) + 2 cos(pi b / 2)) / 5: (a, b) = (1, 0) gives (1 + 0 + 2) / 5 = 3/5 and
    # (2, 2) gives (1 - 2 - 2) / 5 = -3/5, so the gap is 1 - 3/5 = 2/5.
    assert build("torus", 16).spectral_gap() == pytest.approx(0.4)


@pytest.mark.parametrize("n", [1, 2, 5, 16])
def test_fully_connected_gap_is_one(n):
    assert build("fully_connected", n).spectral_gap() == pytest.approx(1.0)


@pytest.mark.parametrize("d", [1, 2, 3, 4, 5])
def test_hypercube_gap(d):
    # (I + A) / (d + 1), A has eigenvalues d - 2m: second largest (d - 1) / (d + 1), smallest -(d - 1) / (d + 1)
    assert build("hypercube", 2**d).spectral_gap() == pytest.approx(2 / (d + 1))


@pytest.mark.parametrize("n", [3, 4, 9])
def test_star_gap(n):
    # W = I - L / n, star Laplacian eigenvalues 0, 1 (n - 2 times), n: W has 1, 1 - 1/n, 0.
    assert build("star", n).spectral_gap() == pytest.approx(1 / n)


@pytest.mark.parametrize("n", [2, 3, 4, 8, 13])
def test_unidirectional_ring_gap(n):
    # Eigenvalues (1 + e^{2 pi i k / n}) / 2 have modulus |cos(pi k / n)|; the largest after k = 0 is k = 1.
    assert build("unidirectional_ring", n).spectral_gap() == pytest.approx(1 - math.cos(math.pi / n))


# --- factory ------------------------------------------------------------------


def test_build_accepts_dashes_and_names_tuple():
    assert set(topologies.NAMES) == {name for name, _ in CASES + TIME_VARYING}
    for name in topologies.NAMES:
        alias = name.replace("_", "-")
        n = 32 if name == "social_network" else 8
        np.testing.assert_array_equal(build(alias, n).at(3).diffusion_matrix, build(name, n).at(3).diffusion_matrix)


def test_build_from_networkx_graph():
    topology = build(networkx.cycle_graph(6), 6)
    np.testing.assert_allclose(topology.diffusion_matrix, build("ring", 6).diffusion_matrix)
    with pytest.raises(ValueError, match="has 6 workers but n_workers = 7"):
        build(networkx.cycle_graph(6), 7)


def test_build_from_edge_list_file(tmp_path):
    path = tmp_path / "graph.txt"
    path.write_text("# a 4-cycle with a chord\n0 1\n1 2  # trailing comment\n\n2 3\n3 0\n0 2\n")
    topology = build(f"file:{path}", 4)
    assert topology.edges() == [(0, 1), (0, 2), (0, 3), (1, 2), (2, 3)]
    # degrees 3, 2, 3, 2: edge {0, 1} gets 1 / (1 + 3), edge {0, 2} too; worker 1 keeps 1/2
    assert topology.weight(0, 1) == pytest.approx(1 / 4)
    assert topology.diffusion_matrix[1, 1] == pytest.approx(1 / 2)
    assert topology.is_symmetric and topology.is_doubly_stochastic
    with pytest.raises(ValueError, match="has 4 workers but n_workers = 5"):
        build(f"file:{path}", 5)


# --- errors -------------------------------------------------------------------


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match="unknown topology 'grid'.*valid names: ring, unidirectional_ring, torus"):
        build("grid", 4)


def test_hypercube_needs_power_of_two():
    with pytest.raises(ValueError, match="power of two, got 12; try 8 or 16"):
        build("hypercube", 12)


def test_social_network_needs_32():
    with pytest.raises(ValueError, match="needs n_workers = 32, got 16"):
        build("social_network", 16)


@pytest.mark.parametrize("name", ["ring", "torus", "star", "fully_connected"])
def test_zero_workers(name):
    with pytest.raises(ValueError, match="needs n_workers >= 1, got 0"):
        build(name, 0)


def test_watts_strogatz_too_small():
    with pytest.raises(ValueError, match=r"watts_strogatz needs n_workers >= 3, got 2"):
        build("watts_strogatz", 2)


def test_bad_option():
    with pytest.raises(ValueError, match=r"accepts \['k', 'p', 'seed'\]"):
        build("watts_strogatz", 8, q=3)
    with pytest.raises(ValueError, match="accepts none"):
        build("ring", 8, k=3)


def test_disconnected_graph():
    graph = networkx.Graph([(0, 1), (2, 3)])
    with pytest.raises(ValueError, match=r"not connected: it has 2 components \(\[0, 1\], \[2, 3\]\)"):
        topologies.from_graph(graph)


def test_graph_with_bad_node_ids():
    with pytest.raises(ValueError, match="must have nodes 0..2"):
        topologies.from_graph(networkx.Graph([("a", "b"), ("b", "c")]))
    with pytest.raises(ValueError, match="is directed"):
        topologies.from_graph(networkx.DiGraph([(0, 1), (1, 0)]))


def test_edge_list_with_gap_in_node_ids(tmp_path):
    path = tmp_path / "gap.txt"
    path.write_text("0 1\n1 2\n2 4\n")  # node 3 missing
    with pytest.raises(ValueError, match=r"must have nodes 0..3 .* outside that range and lacks \[3\]"):
        build(f"file:{path}", 4)


def test_edge_list_with_malformed_line(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("0 1\n1 2 3\n")
    with pytest.raises(ValueError, match="line 2: expected two integer node ids"):
        topologies.from_edge_list(path)


def test_matrix_rows_must_sum_to_one():
    with pytest.raises(ValueError, match="row 1 sums to 0.9; normalize"):
        topologies.from_matrix([[0.5, 0.5], [0.5, 0.4]])


def test_matrix_other_errors():
    with pytest.raises(ValueError, match="negative entry W\\[0, 1\\]"):
        topologies.from_matrix([[1.5, -0.5], [0.5, 0.5]])
    with pytest.raises(ValueError, match="square"):
        topologies.from_matrix(np.ones((2, 3)) / 3)
    with pytest.raises(ValueError, match="not connected"):
        topologies.from_matrix(np.eye(3))
    # Connected through the one-directional entry W[1, 0]: accepted.
    assert Topology([[1.0, 0.0], [0.5, 0.5]]).neighbor_ranks(0) == [1]


# --- plot ---------------------------------------------------------------------


@pytest.mark.parametrize("name,n", [("ring", 8), ("torus", 9), ("unidirectional_ring", 5), ("fully_connected", 1)])
def test_plot_writes_png(tmp_path, name, n):
    path = tmp_path / f"{name}.png"
    build(name, n).plot(path)
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


# --- graphs over time -----------------------------------------------------------


@pytest.mark.parametrize("name,n", [(name, n) for name, sizes in TIME_VARYING for n in sizes])
def test_time_varying_rounds_are_doubly_stochastic_with_one_message_per_worker(name, n):
    topology = build(name, n)
    assert not topology.is_static and topology.n_workers == n
    assert topology.is_doubly_stochastic
    assert topology.is_symmetric == (name != "one_peer_exponential" or n <= 2)
    union = np.zeros((n, n), dtype=bool)
    for t in range(12):
        W = topology.at(t).diffusion_matrix
        off_diagonal = W - np.diag(np.diag(W))
        assert np.all((off_diagonal > 0).sum(axis=0) <= 1)  # every worker sends to one peer at most
        np.testing.assert_allclose(off_diagonal[off_diagonal > 0], 0.5)
        union |= off_diagonal > 0
    assert networkx.is_connected(support_graph(union.astype(float))) or n == 1
    assert topology.at(5) is topology.at(5)  # one object per round: the communicator plans it once


@pytest.mark.parametrize("name", ["one_peer_exponential", "one_peer_hypercube"])
@pytest.mark.parametrize("n", [2, 4, 8, 16, 64])
def test_one_peer_graphs_average_exactly_after_one_period(name, n):
    topology = build(name, n)
    assert topology.period == int(math.log2(n))
    product = np.eye(n)
    for t in range(topology.period):
        product = topology.at(t).diffusion_matrix @ product
    np.testing.assert_allclose(product, np.full((n, n), 1 / n), atol=1e-12)
    assert topology.spectral_gap() == 1.0
    assert topology.at(topology.period) is topology.at(0)


def test_one_peer_exponential_sends_to_i_plus_a_power_of_two():
    topology = build("one_peer_exponential", 8)
    for t, shift in enumerate([1, 2, 4, 1]):
        W = topology.at(t).diffusion_matrix
        for i in range(8):
            assert W[(i + shift) % 8, i] == 0.5 and W[i, i] == 0.5


def test_directed_exponential_weights():
    W = build("directed_exponential", 8).diffusion_matrix
    for i in range(8):
        assert sorted(np.flatnonzero(W[:, i])) == sorted({i, (i + 1) % 8, (i + 2) % 8, (i + 4) % 8})
    np.testing.assert_allclose(W[W > 0], 1 / 4)


def test_random_matching_is_a_seeded_matching_with_the_expected_gap():
    n = 10
    topology, again, other = build("random_matching", n), build("random_matching", n), build("random_matching", n, seed=1)
    np.testing.assert_array_equal(topology.at(7).diffusion_matrix, again.at(7).diffusion_matrix)
    assert not np.array_equal(topology.at(7).diffusion_matrix, other.at(7).diffusion_matrix)
    assert not np.array_equal(topology.at(7).diffusion_matrix, topology.at(8).diffusion_matrix)
    mean = np.zeros((n, n))
    rounds = 4000
    for t in range(rounds):
        W = topology.at(t).diffusion_matrix
        assert np.all(np.diag(W) == 0.5)  # even n: everybody has a partner
        mean += W.T @ W / rounds
    p = 1 / (n - 1)  # the chance that a given pair is matched
    expected = (1 - n * p / 2) * np.eye(n) + p / 2  # E[W^T W] = E[W]
    np.testing.assert_allclose(mean, expected, atol=0.012)  # 5 standard deviations of the estimate
    assert topology.spectral_gap() == pytest.approx(1 - math.sqrt(np.sort(np.linalg.eigvalsh(expected))[-2]))
    odd = build("random_matching", 7).at(0).diffusion_matrix
    assert sorted(np.diag(odd)) == [0.5] * 6 + [1.0]


def test_periodic_gap_is_a_per_round_equivalent():
    ring = build("ring", 8)
    schedule = topologies.from_callable(lambda t: ring, 8, period=3)
    assert schedule.spectral_gap() == pytest.approx(ring.spectral_gap())
    assert math.isnan(topologies.from_callable(lambda t: ring, 8).spectral_gap())


def test_schedule_file_cycles_its_lines(tmp_path):
    (tmp_path / "pairs.txt").write_text("0 1\n2 3\n")
    path = tmp_path / "schedule.txt"
    path.write_text("# two graphs, then a matching\nring\n\ntorus  # comment\nfile:pairs.txt\n")
    topology = build(f"schedule:{path}", 4)
    assert topology.period == 3
    np.testing.assert_array_equal(topology.at(4).diffusion_matrix, build("torus", 4).diffusion_matrix)
    np.testing.assert_allclose(topology.at(2).diffusion_matrix, [[.5, .5, 0, 0], [.5, .5, 0, 0], [0, 0, .5, .5], [0, 0, .5, .5]])
    assert topology.is_symmetric


@pytest.mark.parametrize("lines,match", [
    ("ring\ngrid\n", r"line 2 \('grid'\): unknown topology"),
    ("ring\n\n# comment\nfile:missing.txt\n", r"line 4 \('file:missing.txt'\)"),
    ("ring\nrandom_matching\n", r"line 2 .*changes over time itself"),
    ("ring\nschedule:other.txt\n", r"line 2 .*not another schedule"),
    ("ring\nhypercube\n", r"line 2 .*power of two, got 6"),
    ("# nothing\n", "lists no graph"),
])
def test_bad_schedule_line_is_named(tmp_path, lines, match):
    path = tmp_path / "schedule.txt"
    path.write_text(lines)
    with pytest.raises(ValueError, match=match):
        build(f"schedule:{path}", 6)


def test_schedule_whose_rounds_never_connect_everybody_is_refused(tmp_path):
    (tmp_path / "pairs.txt").write_text("0 1\n2 3\n")
    path = tmp_path / "schedule.txt"
    path.write_text("file:pairs.txt\n")
    with pytest.raises(ValueError, match="together is not connected: it has 2 components"):
        build(f"schedule:{path}", 4)


def test_callable_from_python_takes_graphs_matrices_and_names():
    def graph(t):
        return ["ring", networkx.Graph([(0, 1), (2, 3)]), np.eye(4)][t % 3]
    topology = build(graph, 4)
    assert topology.period is None
    np.testing.assert_array_equal(topology.at(3).diffusion_matrix, build("ring", 4).diffusion_matrix)
    np.testing.assert_allclose(topology.at(4).diffusion_matrix[0], [.5, .5, 0, 0])
    assert topology.is_symmetric


def test_from_digraph_gives_push_sum_weights():
    chords = networkx.DiGraph([(i, (i + 1) % 6) for i in range(6)] + [(0, 3), (1, 4)])
    topology = topologies.from_digraph(chords)
    W = topology.diffusion_matrix
    assert topology.is_column_stochastic and not topology.is_row_stochastic and not topology.is_doubly_stochastic
    assert W[3, 0] == W[1, 0] == W[0, 0] == pytest.approx(1 / 3) and W[3, 2] == 0.5
    assert topologies.requirement_problem(topology, "column_stochastic") is None
    assert "not doubly stochastic" in topologies.requirement_problem(topology, "doubly_stochastic")
    one_way = topologies.from_digraph(networkx.DiGraph([(0, 1), (1, 2)]))  # 2 never reaches 0
    assert "not strongly connected" in topologies.requirement_problem(one_way, "column_stochastic")


def test_requirement_message_names_the_graphs_that_would_do():
    with pytest.raises(ValueError, match=r"PowerGossip needs a symmetric topology at every round.*8-one-peer-exponential "
                                         r"is not symmetric at round 0. Graphs that would do: ring, torus,.* one_peer_hypercube, "
                                         r"random_matching, chain, binary_tree, file:PATH"):
        topologies.check_requirement(build("one_peer_exponential", 8), "symmetric", "PowerGossip")
    topologies.check_requirement(build("one_peer_exponential", 8), "doubly_stochastic", "SimpleGossip")


@pytest.mark.parametrize("n", [1, 2, 5, 8, 16, 17])
def test_trees(n):
    """chain and binary_tree are spanning trees (depth log2 n for the binary tree); the double
    binary trees are two, and every worker is a leaf (degree <= 1) of at least one of them."""
    for name in ("chain", "binary_tree"):
        tree = build(name, n)
        assert len(tree.edges()) == n - 1 and topologies.requirement_problem(tree, "tree") is None
    assert max(networkx.shortest_path_length(support_graph(build("binary_tree", n).diffusion_matrix), 0).values()) \
        == (n.bit_length() - 1)
    double = build("double_binary_trees", n)
    assert topologies.requirement_problem(double, "tree") is None
    assert all(len(tree.edges()) == n - 1 and tree.n_workers == n for tree in double.trees)
    assert all(min(len(tree.neighbors(i)) for tree in double.trees) <= 1 for i in range(n))
    assert "not one mixing matrix" in topologies.requirement_problem(double, "doubly_stochastic")


def test_rounds_of_256_workers_are_cheap_to_plan():
    """A random matching of 256 workers: one Topology and one communication plan per round."""
    from powergossip import comm as comm_module
    comm = comm_module.Communicator(256, "cpu")
    topology = build("random_matching", 256)
    for t in range(20):
        edges = comm.half_edges(topology.at(t))
        assert edges.num == 256 and edges.max_degree == 1
    assert len(comm._plans) <= comm_module.PLANS_KEPT
