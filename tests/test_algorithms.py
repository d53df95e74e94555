"""Every algorithm against the dense reference, in one process and under mpirun."""
import glob
import math
import os

import numpy as np
import pytest
import torch

from powergossip import algorithms
from powergossip import comm as comm_module
from powergossip import compressors
from powergossip import configuration
from powergossip import topologies
from tests import algorithm_runs, dense_reference
from tests.launch import run_mpi

STEPS = 6


def reference(spec, W, X0s, steps):
    """The dense-reference twin of each entry of algorithm_runs.SPECS (same hyper-parameters);
    W: a matrix or a topology (static or over time)."""
    if spec == "simple":
        Xs = X0s
        for t in range(steps):
            Xs = dense_reference.gossip(W, Xs, 0.9, t)
        return Xs
    if spec == "push_sum":
        return dense_reference.push_sum(W, X0s, 0.8, steps)
    if spec == "push_sum_delayed":
        return dense_reference.push_sum_delayed(W, X0s, 0.8, steps)[0]
    if spec == "power_afresh":
        return [dense_reference.power_gossip(W, X0s[0], 1.0, rank=1, steps=steps, seed=3, edge_memory=0)]
    if spec == "all_reduce":
        return dense_reference.all_reduce(X0s)
    if spec == "power":
        return [dense_reference.power_gossip(W, X0s[0], 1.0, rank=2, steps=steps, num_iterations=2, seed=3)]
    if spec == "power_random_signs":
        return [dense_reference.power_gossip(W, X0s[0], 1.0, rank=1, steps=steps, warm_start=False,
                                             round_weights=True, seed=3)]
    choco = {"choco_sign": (compressors.SignAndNorm(), 0.4, 0), "choco_top_k": (compressors.TopK(keep_ratio=0.3), 0.3, 0),
             "choco_random_k": (compressors.RandomK(keep_ratio=0.3), 0.3, 5), "choco_svd": (compressors.SVD(rank=1), 0.4, 0),
             "choco_qsgd": (compressors.QSGD(levels=4), 0.4, 5)}
    if spec in choco:
        compressor, gamma, seed = choco[spec]
        return dense_reference.choco(W, X0s, gamma, compressor, steps, seed=seed)
    if spec == "deep_squeeze_sign":
        return dense_reference.deep_squeeze(W, X0s, 0.2, compressors.SignAndNorm(), steps)
    if spec == "moniqua":
        return dense_reference.moniqua(W, X0s, 0.3, 4.0, steps, seed=5)
    n = X0s[0].shape[0]
    targets = algorithm_runs.targets(spec, n)
    lr = algorithm_runs.LEARNING_RATE
    gradient = lambda Xs: [X - B for X, B in zip(Xs, targets)]
    if spec == "relay_sum":
        return dense_reference.relay_sum(W, X0s, steps, lambda Xs: [X - lr * g for X, g in zip(Xs, gradient(Xs))])
    halved = (np.eye(n) + dense_reference.at(W, 0)) / 2
    if spec == "d2":  # diffusion rate 1/2: (I + W) / 2
        return dense_reference.d2(halved, X0s, steps, gradient, lr)
    if spec == "gradient_tracking":
        return dense_reference.gradient_tracking(W, X0s, steps, gradient, lr)
    raise KeyError(spec)


def assert_matches_reference(spec, topology_name, n_workers, params_of_all_workers):
    W = algorithm_runs.graph(topology_name, n_workers)
    expected = reference(spec, W, algorithm_runs.initial_state(spec, n_workers), STEPS)
    for got, want in zip(params_of_all_workers, expected):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


TREES = ["chain", "binary_tree", "double_binary_trees"]  # RelaySum's graphs (and star)


@pytest.mark.parametrize("spec,topology_name", [(spec, name) for spec in sorted(algorithm_runs.SPECS)
                                                for name in ["ring", "torus", "star"] + (TREES if spec == "relay_sum" else [])
                                                if algorithm_runs.accepts(spec, name, 6)])
def test_one_process_matches_dense_reference(spec, topology_name):
    result = algorithm_runs.run(spec, topology_name, 6, STEPS)
    assert_matches_reference(spec, topology_name, 6, result["params"])


def collect(folder):
    parts = sorted((torch.load(path) for path in glob.glob(os.path.join(folder, "rank*.pt"))), key=lambda r: r["first_worker"])
    params = [torch.cat(tensors) for tensors in zip(*(p["params"] for p in parts))]
    return params, torch.cat([p["bytes_sent"] for p in parts]), torch.cat([p["messages_sent"] for p in parts])


@pytest.mark.parametrize("num_processes,n_workers", [(4, 4), (2, 8)])
def test_mpirun_matches_dense_reference_and_one_process(mpirun_runs, num_processes, n_workers):
    runs = [(spec, name) for spec in sorted(algorithm_runs.SPECS) for name in LAUNCHED_GRAPHS[num_processes, n_workers]
            if name not in GRAPHS_OVER_TIME[1:] and algorithm_runs.accepts(spec, name, n_workers)]
    assert_layouts_agree(mpirun_runs(num_processes, n_workers), runs, n_workers)


# --- graphs over time: every method on every graph it takes --------------------------------
GRAPHS_OVER_TIME = ["ring", "one_peer_hypercube", "random_matching", "one_peer_exponential", "directed_exponential",
                    "chorded_ring"]
ACCEPTED = [(spec, name) for spec in sorted(algorithm_runs.SPECS) for name in GRAPHS_OVER_TIME
            if spec != "all_reduce" and algorithm_runs.accepts(spec, name, 8)]


def test_every_method_takes_the_graphs_it_declares():
    symmetric = {"ring", "one_peer_hypercube", "random_matching"}
    for spec in set(algorithm_runs.SPECS) - {"all_reduce"}:
        taken = {name for s, name in ACCEPTED if s == spec}
        if spec.startswith("push_sum"):
            assert taken == set(GRAPHS_OVER_TIME)
        elif spec == "simple":
            assert taken == set(GRAPHS_OVER_TIME) - {"chorded_ring"}
        elif spec.startswith("choco") or spec == "d2":  # its s_i = sum_j w_ij x_hat_j needs the same W every round
            assert taken == {"ring"}, spec
        elif spec == "relay_sum":
            assert taken == set(), spec  # trees only
        elif spec == "gradient_tracking":
            assert taken == set(GRAPHS_OVER_TIME) - {"chorded_ring"}
        else:
            assert taken == symmetric, spec


@pytest.mark.parametrize("spec,topology_name", ACCEPTED)
def test_one_process_matches_dense_reference_on_graphs_over_time(spec, topology_name):
    result = algorithm_runs.run(spec, topology_name, 8, STEPS)
    assert_matches_reference(spec, topology_name, 8, result["params"])


# Graphs that each mpirun layout (processes, workers) runs every method on: the 2 x 8 layout also
# takes the graphs over time, one launch for both tests that use it.
LAUNCHED_GRAPHS = {(4, 4): ["ring", "torus", "chain", "double_binary_trees"], (2, 8): ["torus"] + GRAPHS_OVER_TIME}


@pytest.fixture(scope="module")
def mpirun_runs(tmp_path_factory):
    """folder(processes, workers): where one mpirun of that layout wrote SPEC-GRAPH/rank{r}.pt for
    every method and each graph of LAUNCHED_GRAPHS it takes; launched when a test first asks."""
    folders = {}

    def folder(num_processes, n_workers):
        if (num_processes, n_workers) not in folders:
            launched = tmp_path_factory.mktemp(f"mpirun_{num_processes}x{n_workers}")
            run_mpi(num_processes, ["tests/algorithm_runs.py", ",".join(sorted(algorithm_runs.SPECS)),
                                    ",".join(LAUNCHED_GRAPHS[num_processes, n_workers]), str(n_workers), str(STEPS),
                                    str(launched)], timeout=300)
            folders[num_processes, n_workers] = launched
        return folders[num_processes, n_workers]
    return folder


def test_mpirun_matches_dense_reference_on_graphs_over_time(mpirun_runs):
    assert_layouts_agree(mpirun_runs(2, 8), ACCEPTED, 8)


def assert_layouts_agree(folder, runs, n_workers):
    """What the mpirun processes wrote (`folder/SPEC-GRAPH`) equals the dense reference, and one
    process's run bit for bit in values, bytes and messages (the layout contract, README)."""
    for spec, topology_name in runs:
        params, bytes_sent, messages_sent = collect(folder / f"{spec}-{topology_name}")
        assert_matches_reference(spec, topology_name, n_workers, params)
        single = algorithm_runs.run(spec, topology_name, n_workers, STEPS)
        for got, want in zip(params, single["params"]):
            assert torch.equal(got, want), (spec, topology_name)
        assert torch.equal(bytes_sent, single["bytes_sent"]), spec
        assert torch.equal(messages_sent, single["messages_sent"]), spec


# --- properties ------------------------------------------------------------------------------
def stacked_random(n, *shape, seed=0):
    return torch.randn((n,) + shape, generator=torch.Generator().manual_seed(seed))


def consensus_error(params):
    return sum(((x - x.mean(0)) ** 2).sum().item() for x in params) / params[0].shape[0]


def test_power_gossip_with_full_rank_is_exact_gossip():
    n = 6
    comm = comm_module.Communicator(n, "cpu")
    topology = topologies.build("ring", n)
    X = stacked_random(n, 5, 5)  # square: P P^T = Q Q^T = I at full rank, on even and odd iterations
    power = [X.clone()]
    gossip = [X.clone()]
    algorithm = algorithms.PowerGossip(comm, topology, rank=5)
    algorithm.step(power)  # step 0 is skipped: neighbours normally start identical
    torch.testing.assert_close(power[0], X)
    simple = algorithms.SimpleGossip(comm, topology)
    for _ in range(5):
        algorithm.step(power)
        simple.step(gossip)
        torch.testing.assert_close(power[0], gossip[0], atol=1e-5, rtol=1e-5)


def test_choco_with_identity_is_gossip_with_step_gamma():
    n, gamma = 5, 0.7
    comm = comm_module.Communicator(n, "cpu")
    topology = topologies.build("torus", n)
    X = [stacked_random(n, 3, 4), stacked_random(n, 6, seed=1)]
    choco = [x.clone() for x in X]
    gossip = [x.clone() for x in X]
    a = algorithms.ChocoGossip(comm, topology, compressors.Identity(), diffusion_rate=gamma)
    b = algorithms.SimpleGossip(comm, topology, diffusion_rate=gamma)
    a.step(choco)  # x_hat = x after the first round, from then on Choco is exact gossip
    b.step(gossip)
    for _ in range(10):
        a.step(choco)
        b.step(gossip)
    for got, want in zip(choco, gossip):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_moniqua_with_large_theta_tracks_gossip_in_expectation():
    """Stochastic rounding is unbiased, so with theta above every difference one Moniqua
    round equals a gossip round on average: check it over many entries of equal value."""
    n, entries, gamma = 4, 200_000, 0.5
    comm = comm_module.Communicator(n, "cpu")
    topology = topologies.build("ring", n)
    start = torch.tensor([0.1, -0.3, 0.25, 0.05]).view(n, 1).expand(n, entries).clone()
    moniqua = [start.clone()]
    algorithms.MoniquaGossip(comm, topology, theta=1.0, diffusion_rate=gamma).step(moniqua)
    gossip = [start.clone()]
    algorithms.SimpleGossip(comm, topology, diffusion_rate=gamma).step(gossip)
    noise_scale = 2 * 1.0 / (1 - 2 / 3) / 3  # B * delta: the largest rounding step
    torch.testing.assert_close(moniqua[0].mean(dim=1), gossip[0][:, 0], atol=5 * noise_scale / math.sqrt(entries), rtol=0)


@pytest.mark.parametrize("spec", sorted(set(algorithm_runs.SPECS) - {"moniqua", "deep_squeeze_sign", "push_sum_delayed"}
                                         - set(algorithm_runs.LOCAL_STEP_FIRST)))  # delayed: mass in flight moves z's mean
def test_average_is_preserved(spec):
    result = algorithm_runs.run(spec, "ring", 8, 20)
    for x, x0 in zip(result["params"], algorithm_runs.initial_state(spec, 8)):
        torch.testing.assert_close(x.mean(0), x0.mean(0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("spec", sorted(set(algorithm_runs.SPECS) - {"moniqua"} - set(algorithm_runs.LOCAL_STEP_FIRST)))
def test_consensus_error_decreases(spec):
    start = consensus_error(algorithm_runs.initial_state(spec, 8))
    end = consensus_error(algorithm_runs.run(spec, "ring", 8, 30)["params"])
    assert end < start / 2


def test_moniqua_consensus_error_decreases_with_a_small_step():
    """2-bit rounding noise is of the order of theta, so Moniqua needs a small gamma."""
    comm = comm_module.Communicator(8, "cpu")
    params = [x.clone() for x in algorithm_runs.initial_state("moniqua", 8)]
    start = consensus_error(params)
    moniqua = algorithms.MoniquaGossip(comm, topologies.build("ring", 8), theta=2.0, diffusion_rate=0.1)
    for _ in range(30):
        moniqua.step(params)
    assert consensus_error(params) < start / 2


def test_zero_columns_give_no_nan():
    matrices = torch.zeros(3, 5, 2)
    matrices[1, :, 0] = 1.0
    algorithms.orthogonalize_(matrices)
    assert torch.isfinite(matrices).all()
    torch.testing.assert_close(matrices[1, :, 0].norm(), torch.tensor(1.0))
    assert torch.equal(matrices[0], torch.zeros(5, 2))


def test_edge_seed_is_symmetric_and_collision_free():
    assert algorithms.edge_seed(7, 3, 9) == algorithms.edge_seed(7, 9, 3)
    assert algorithms.edge_seed(1, 1, 12) != algorithms.edge_seed(1, 11, 2)  # "1"+"12" == "11"+"2"
    seeds = {algorithms.edge_seed(0, i, j) for i in range(40) for j in range(i + 1, 40)}
    assert len(seeds) == 40 * 39 // 2


# --- bytes on the wire follow the counting rules --------------------------------------------
def bytes_after_one_step(algorithm_factory, params, n=8, topology="ring", steps=1):
    comm = comm_module.Communicator(n, "cpu")
    algorithm = algorithm_factory(comm, topologies.build(topology, n))
    for _ in range(steps):
        algorithm.step(params)
    return comm.bytes_sent, comm.messages_sent


def test_bytes_follow_formulas():
    n, m, k = 8, 6, 5
    X = lambda: [stacked_random(n, m, k), stacked_random(n, 4, seed=2)]
    D = m * k + 4
    sent, messages = bytes_after_one_step(lambda c, t: algorithms.SimpleGossip(c, t), X())
    assert (sent == 2 * 4 * D).all() and (messages == 2).all()
    sent, messages = bytes_after_one_step(lambda c, t: algorithms.AllReduce(c, t), X())
    assert (sent == 4 * D).all() and (messages == 1).all()
    sent, _ = bytes_after_one_step(lambda c, t: algorithms.ChocoGossip(c, t, compressors.SignAndNorm()), X())
    assert (sent == 2 * (math.ceil(D / 8) + 4 * 2)).all()  # signs 8 per byte + one float per tensor
    sent, _ = bytes_after_one_step(lambda c, t: algorithms.MoniquaGossip(c, t, theta=1.0), X())
    assert (sent == 2 * math.ceil(D / 4)).all()  # 2-bit codes, 4 per byte
    sent, _ = bytes_after_one_step(lambda c, t: algorithms.ChocoGossip(c, t, compressors.TopK(keep_ratio=0.5)), X())
    assert (sent == 2 * ((15 + 2) * 4 + (15 + 2) * 1)).all()  # float32 values + uint8 indices
    # PowerGossip rank 2, 2 iterations per step: step 0 sends nothing, then iteration 2
    # (even: X^T P, k x r floats) and iteration 3 (odd: X Q, m x r floats).
    power = lambda c, t: algorithms.PowerGossip(c, t, rank=2, num_iterations=2)
    sent, messages = bytes_after_one_step(power, [stacked_random(n, m, k)], steps=2)
    assert (sent == 2 * 4 * (k * 2 + m * 2)).all() and (messages == 4).all()


def test_only_on_large_parameters_routes_by_dimension():
    n = 4
    comm = comm_module.Communicator(n, "cpu")
    topology = topologies.build("ring", n)
    power = algorithms.PowerGossip(comm, topology, rank=1)
    wrapped = algorithms.OnlyOnLargeParameters(power, algorithms.SimpleGossip(comm, topology))
    params = [stacked_random(n, 8, 8), stacked_random(n, 8, seed=1)]
    wrapped.step(params)  # PowerGossip skips step 0; the vector is gossiped uncompressed
    assert comm.bytes_sent[0] == 2 * 4 * 8
    strict = algorithms.OnlyOnLargeParameters(power, algorithms.SimpleGossip(comm, topology),
                                              min_compression_rate=3.0, rank=1)
    assert strict.is_compressed(stacked_random(n, 16, 16))  # 256 / 32 = 8 >= 3
    assert not strict.is_compressed(stacked_random(n, 2, 3))  # 6 / 5 < 3


@pytest.mark.parametrize("spec", ["power", "choco_qsgd", "deep_squeeze_sign", "moniqua", "choco_random_k", "push_sum_delayed"])
def test_state_dict_resumes_exactly(spec):
    n = 4
    comm = comm_module.Communicator(n, "cpu")
    topology = topologies.build("ring", n)
    params = [x.clone() for x in algorithm_runs.initial_state(spec, n)]
    uninterrupted = algorithm_runs.SPECS[spec](comm, topology)
    for _ in range(3):
        uninterrupted.step(params)
    saved_params = [x.clone() for x in params]
    saved_state = uninterrupted.state_dict()
    for _ in range(3):
        uninterrupted.step(params)
    loaded_and_saved = algorithm_runs.SPECS[spec](comm, topology)  # a resume that is saved before it steps
    loaded_and_saved.load_state_dict(saved_state)
    resumed = algorithm_runs.SPECS[spec](comm, topology)
    resumed.load_state_dict(loaded_and_saved.state_dict())
    stepped = algorithm_runs.SPECS[spec](comm, topology)  # one that has run steps of its own first takes it too
    other_params = [x.clone() for x in saved_params]
    for _ in range(2):
        stepped.step(other_params)
    stepped.load_state_dict(saved_state)
    other_params = [x.clone() for x in saved_params]
    for _ in range(3):
        resumed.step(saved_params)
        stepped.step(other_params)
    for got, again, want in zip(saved_params, other_params, params):
        assert torch.equal(got, want) and torch.equal(again, want)


@pytest.mark.parametrize("make", [algorithm_runs.SPECS["power"],
                                  lambda c, t: algorithms.StackedPowerSGD(c, t, rank=2, min_compression_rate=1.0)],
                         ids=["power-gossip", "powersgd"])
def test_a_state_saved_before_the_first_step_restarts_a_method_that_has_stepped(make):
    comm = comm_module.Communicator(4, "cpu")
    topology = topologies.build("ring", 4)
    fresh = make(comm, topology)
    saved = fresh.state_dict()  # before any step: no factors yet
    stepped = make(comm, topology)
    elsewhere = [x.clone() for x in algorithm_runs.initial_state("power", 4)]
    for _ in range(3):
        stepped.step([x * 2 for x in elsewhere])
    stepped.load_state_dict(saved)
    start = algorithm_runs.initial_state("power", 4)
    mine, theirs = [x.clone() for x in start], [x.clone() for x in start]
    for _ in range(3):
        fresh.step(mine)
        stepped.step(theirs)
    assert all(torch.equal(a, b) for a, b in zip(mine, theirs)) and not torch.equal(mine[0], start[0])


def test_bad_input_is_refused():
    comm = comm_module.Communicator(4, "cpu")
    ring = topologies.build("ring", 4)
    with pytest.raises(ValueError, match="rank must be >= 1"):
        algorithms.PowerGossip(comm, ring, rank=0)
    with pytest.raises(ValueError, match="rank 1 only"):
        algorithms.PowerGossip(comm, ring, rank=2, round_weights=True)
    with pytest.raises(ValueError, match="symmetric topology"):
        algorithms.PowerGossip(comm, topologies.build("unidirectional_ring", 4))
    with pytest.raises(ValueError, match="theta must be > 0"):
        algorithms.MoniquaGossip(comm, ring, theta=0)
    with pytest.raises(ValueError, match="diffusion_rate"):
        algorithms.SimpleGossip(comm, ring, diffusion_rate=-1)


def test_worker_slots_put_each_workers_half_edges_side_by_side():
    """A star (degrees 5 and 1): every half-edge lands in its worker's slot, the rest stay zero."""
    comm = comm_module.Communicator(6, "cpu")
    edges = comm.half_edges(topologies.star(6))
    per_edge = torch.randn(edges.num, 3, 2)
    slots = algorithms.to_worker_slots(edges, per_edge)
    assert slots.shape == (6, 3, 5 * 2)
    for h in range(edges.num):
        l, s = edges.local_sender[h].item(), edges.slot[h].item()
        assert torch.equal(slots[l, :, 2 * s:2 * s + 2], per_edge[h])
    assert slots[1:, :, 2:].abs().sum() == 0  # leaves have one half-edge each
    assert torch.equal(algorithms.from_worker_slots(edges, slots), per_edge)


# --- graphs over time: properties -------------------------------------------------------------
@pytest.mark.parametrize("graph", ["one_peer_exponential", "one_peer_hypercube"])
@pytest.mark.parametrize("n", [8, 16])
def test_one_peer_graphs_reach_the_exact_average_in_log2_n_rounds(graph, n):
    comm = comm_module.Communicator(n, "cpu")
    x = stacked_random(n, 4, 5).double()  # float64: the exact average up to rounding
    start = consensus_error([x])
    gossip = algorithms.SimpleGossip(comm, topologies.build(graph, n))
    for _ in range(int(math.log2(n))):
        gossip.step([x])
    assert consensus_error([x]) < 1e-10 * start
    assert (comm.messages_sent == int(math.log2(n))).all()  # one message per worker per round
    assert (comm.bytes_sent == int(math.log2(n)) * 4 * 5 * 8).all()


def test_push_sum_reaches_the_average_on_a_directed_graph_where_plain_gossip_does_not():
    n = 8
    comm = comm_module.Communicator(n, "cpu")
    chorded = algorithm_runs.graph("chorded_ring", n)
    assert chorded.is_column_stochastic and not chorded.is_doubly_stochastic
    x0 = stacked_random(n, 3, 4).double()
    average = x0.mean(0)
    initial = ((x0 - average) ** 2).sum().item()
    z = x0.clone()
    push_sum = algorithms.PushSum(comm, chorded)
    for _ in range(200):
        push_sum.step([z])
    assert ((z - average) ** 2).sum().item() < 1e-10 * initial
    assert (comm.bytes_sent == 200 * 8 * (12 + 1) * torch.tensor([2, 1] * 4).numpy()).all()  # x_i and w_i per out-neighbour
    # Plain gossip on the same directed graph (every worker averages what it receives) agrees,
    # on a weighted average that is not the average.
    receive = (chorded.diffusion_matrix > 0).astype(float)
    plain = [x0.clone()]
    for t in range(200):
        plain = dense_reference.gossip(receive / receive.sum(axis=1, keepdims=True), plain, 1.0, t)
    assert consensus_error(plain) < 1e-10 * initial
    assert ((plain[0] - average) ** 2).sum().item() > 1e-3 * initial
    with pytest.raises(ValueError, match="SimpleGossip needs a doubly stochastic topology"):
        algorithms.SimpleGossip(comm, chorded)


@pytest.mark.parametrize("graph", ["one_peer_exponential", "chorded_ring"])
def test_delayed_push_sum_keeps_its_mass_in_flight_and_reaches_the_exact_average(graph):
    """Overlapped SGP (one_step_delay): sum_i w_i + the weight in flight stays n (exactly on
    one_peer_exponential, whose shares are halves), sum_i x_i + in flight stays n times the
    average, the de-biased z reach that average on a directed graph, and the bytes are push-sum's."""
    n, steps = 8, 120
    comm = comm_module.Communicator(n, "cpu")
    topology = algorithm_runs.graph(graph, n)
    x0 = stacked_random(n, 3, 4).double()
    average = x0.mean(0)
    z = x0.clone()
    delayed = algorithms.PushSum(comm, topology, one_step_delay=True)
    for t in range(steps):
        delayed.step([z])
        numerator, weight = z * delayed.weight.view(-1, 1, 1), delayed.weight
        if graph == "one_peer_exponential":  # halves: every sum exact in floating point
            assert weight.sum() + delayed.in_flight[1].sum() == n
        torch.testing.assert_close(weight.sum() + delayed.in_flight[1].sum(), torch.tensor(n, dtype=torch.float64))
        torch.testing.assert_close(numerator.sum(0) + delayed.in_flight[0].sum(0), n * average)
        if t < 3:
            assert not torch.allclose(weight, torch.ones_like(weight))  # w moves off 1 while mass is in flight
    assert ((z - average) ** 2).sum() < 1e-10 * ((x0 - average) ** 2).sum()
    expected_z, expected_w, expected_in_flight = dense_reference.push_sum_delayed(topology, [x0], 1.0, steps)
    torch.testing.assert_close(z, expected_z[0])
    torch.testing.assert_close(delayed.weight, expected_w[:, 0])
    torch.testing.assert_close(delayed.in_flight[1], expected_in_flight[1])
    plain_comm = comm_module.Communicator(n, "cpu")
    plain = algorithms.PushSum(plain_comm, topology)
    for _ in range(steps):
        plain.step([x0.clone()])
    assert (comm.bytes_sent == plain_comm.bytes_sent).all() and (comm.messages_sent == plain_comm.messages_sent).all()
    out_degree = (topology.at(0).diffusion_matrix > 0).sum(axis=0) - 1 if graph == "chorded_ring" else 1
    assert (comm.bytes_sent == steps * 8 * (12 + 1) * out_degree).all()  # x_i and w_i (float64) per out-neighbour


def test_one_step_delay_is_a_push_sum_setting_of_both_entrypoints():
    import gossip_run
    import train

    cfg = train.validated(dict(train._DEFAULTS, optimizer="push-sum", optimizer_one_step_delay=True, n_workers=8,
                               topology="one_peer_exponential"))
    method = train.build_method(cfg, comm_module.Communicator(8, "cpu"), topologies.build("one_peer_exponential", 8))
    assert method.one_step_delay
    assert gossip_run.check(dict(gossip_run.DEFAULTS, algorithm="push-sum", one_step_delay=True))["optimizer_one_step_delay"]
    with pytest.raises(configuration.ConfigError, match="optimizer_one_step_delay must be true or false, got 'yes'"):
        gossip_run.check(dict(gossip_run.DEFAULTS, algorithm="push-sum", optimizer_one_step_delay="yes"))


@pytest.mark.parametrize("name", ["one_peer_exponential", "directed_exponential", "unidirectional_ring"])
def test_power_gossip_on_a_directed_graph_is_refused_naming_the_graphs_that_would_do(name):
    import gossip_run

    config = dict(gossip_run.DEFAULTS, algorithm="power_gossip", topology=name, n_workers=8)
    with pytest.raises(configuration.ConfigError, match=r"PowerGossip needs a symmetric topology at every round.* is not "
                                                        r"symmetric.* Graphs that would do: ring, torus, .*one_peer_hypercube, "
                                                        r"random_matching"):
        gossip_run.check(config)


@pytest.mark.parametrize("n", [8, 16])  # periods 3 and 4: an edge's half-steps alternate either way
def test_power_gossip_warm_start_survives_an_edges_absence(n):
    """On a one-peer hypercube an edge comes back every log2(n) rounds: by default it continues its
    power iteration where it stopped (the dense reference keeps P, Q and its half-step count) and
    agrees faster than when edge_memory=0 starts every reappearance afresh."""
    steps = 60
    x0 = stacked_random(n, 6, 5)
    hypercube = topologies.build("one_peer_hypercube", n)
    kept = dense_reference.power_gossip(hypercube, x0, 1.0, rank=1, steps=steps, seed=3)
    afresh = dense_reference.power_gossip(hypercube, x0, 1.0, rank=1, steps=steps, seed=3, edge_memory=0)
    assert consensus_error([kept]) < consensus_error([afresh]) / 2 < consensus_error([x0]) / 20
    comm = comm_module.Communicator(n, "cpu")
    for memory, expected in ((None, kept), (0, afresh)):
        power = algorithms.PowerGossip(comm, hypercube, rank=1, seed=3, edge_memory=memory)
        x = [x0.clone()]
        for _ in range(steps):
            power.step(x)
        torch.testing.assert_close(x[0], expected, atol=1e-4 * x0.abs().max().item(), rtol=0)  # 60 float32 rounds
        assert len(power.edge_rows.row_of) == (n * hypercube.period if memory is None else n)  # kept: the period's edges


def test_power_gossip_state_stays_bounded_on_random_matching():
    n, rounds = 64, 120
    comm = comm_module.Communicator(n, "cpu")
    power = algorithms.PowerGossip(comm, topologies.build("random_matching", n), rank=1)
    x = [stacked_random(n, 3, 2)]
    for _ in range(rounds):
        power.step(x)
    bound = (algorithms.PowerGossip.DEFAULT_EDGE_MEMORY + 1) * n  # n half-edges per round
    assert len(power.edge_rows.row_of) <= bound and power.p[0].shape[0] <= bound + n  # + a round's freed rows
    assert power.p[0].shape[0] < rounds * n // 4  # far below the half-edges seen (most appear once)
    assert sum(g is not None for g in power.generators) == len(power.edge_rows.row_of)


@pytest.mark.parametrize("spec,graph,memory", [("power", "random_matching", 2), ("push_sum", "chorded_ring", None),
                                               ("push_sum_delayed", "one_peer_exponential", None),
                                               ("deep_squeeze_sign", "one_peer_hypercube", None)])
def test_state_dict_resumes_exactly_on_graphs_over_time(spec, graph, memory):
    n = 8
    comm = comm_module.Communicator(n, "cpu")
    topology = algorithm_runs.graph(graph, n)
    build = (lambda: algorithms.PowerGossip(comm, topology, rank=2, num_iterations=2, edge_memory=memory, seed=3)) \
        if spec == "power" else (lambda: algorithm_runs.SPECS[spec](comm, topology))
    params = [x.clone() for x in algorithm_runs.initial_state(spec, n)]
    uninterrupted = build()
    for _ in range(5):
        uninterrupted.step(params)
    saved_params, saved_state = [x.clone() for x in params], uninterrupted.state_dict()
    assert saved_state["round"] == 5
    for _ in range(9):
        uninterrupted.step(params)
    resumed = build()
    resumed.load_state_dict(saved_state)
    for _ in range(9):
        resumed.step(saved_params)
    for got, want in zip(saved_params, params):
        assert torch.equal(got, want)


def test_a_schedule_file_goes_through_both_entrypoints_checks(tmp_path):
    import gossip_run
    import train

    (tmp_path / "pairs.txt").write_text("0 1\n2 3\n4 5\n6 7\n")
    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("ring\nfile:pairs.txt  # a matching every other round\n")
    bad.write_text("ring\n\nrign\n")
    config = dict(gossip_run.DEFAULTS, algorithm="power_gossip", topology=f"schedule:{good}", n_workers=8)
    assert gossip_run.check(config)["topology"] == f"schedule:{good}"
    train.validated(dict(train._DEFAULTS, topology=f"schedule:{good}", n_workers=8))
    with pytest.raises(configuration.ConfigError, match=r"topology: schedule .*bad.txt, line 3 \('rign'\): unknown topology"):
        gossip_run.check(dict(config, topology=f"schedule:{bad}"))
    with pytest.raises(ValueError, match=r"line 3 \('rign'\)"):
        train.validated(dict(train._DEFAULTS, topology=f"schedule:{bad}", n_workers=8))


def test_power_gossip_copies_a_periodic_graphs_rows_to_the_device_once_per_phase():
    """On one_peer_hypercube (period log2 n) every phase's state rows go to the device in the first
    period only: a copy from the host each round would make every GPU step wait for the queue."""
    n = 8
    comm = comm_module.Communicator(n, "cpu")
    gossip = algorithms.PowerGossip(comm, topologies.build("one_peer_hypercube", n))
    x = [torch.randn(n, 4, 3, generator=torch.Generator().manual_seed(0))]
    device_rows = []
    original = gossip._rows_of_round
    gossip._rows_of_round = lambda edges, round: device_rows.append(original(edges, round)) or device_rows[-1]
    for _ in range(3 * 3):
        gossip.step(x)
    period = 3
    # The first period creates every edge's state (its pools grow); from the second on, each phase
    # finds its rows on the device.
    second = [rows[1] for rows in device_rows[period:2 * period]]
    assert len({id(t) for t in second}) == period  # a row tensor per phase
    for round, rows in enumerate(device_rows):
        assert round < 2 * period or rows[1] is second[round % period]  # the same tensor when the phase comes back
        assert torch.equal(rows[1], torch.as_tensor(rows[0]))
