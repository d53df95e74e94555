"""Unreliable networks (powergossip/faults.py): links that fail and workers that are away, drawn
from keyed streams, as each round's graph; what the methods that take them keep."""
import json
import os

import numpy as np
import pytest
import torch

from powergossip import comm as comm_module
from powergossip import configuration, faults, methods, topologies
from tests import train_runs
from tests.launch import run_mpi
from tests.test_gossip_run import run_main
from tests.test_train import layout_overrides, tiny_data  # noqa: F401 (tiny_data: a fixture)

RING8 = topologies.build("ring", 8)


def faulty(topology, seed=5, **settings):
    return faults.apply(faults.FaultSettings(**settings), topology, seed)


def test_draws_are_keyed_by_seed_and_round_and_happen_as_often_as_asked():
    draws = faults.Faults(faults.FaultSettings(link_failure_probability=0.2, offline_probability=0.1), 8, seed=5)
    down = np.stack([draws.links_down(t) for t in range(300)])
    assert (down == down.transpose(0, 2, 1)).all() and not down[:, range(8), range(8)].any()
    edges = np.triu_indices(8, k=1)
    assert 0.18 < down[:, edges[0], edges[1]].mean() < 0.22  # 300 x 28 draws at p = 0.2
    away = np.stack([draws.away(t) for t in range(300)])
    assert 0.08 < away.mean() < 0.12
    again = faults.Faults(draws.settings, 8, seed=5)
    assert (again.links_down(17) == down[17]).all() and (again.away(17) == away[17]).all()  # a round's own draws
    other = faults.Faults(draws.settings, 8, seed=6)
    assert not all((other.links_down(t) == down[t]).all() for t in range(10))


def test_faults_off_leave_the_topology_as_it_is():
    assert faults.apply(faults.FaultSettings(), RING8, 1) is RING8


def test_a_round_loses_its_failed_links_and_absent_workers_edges_and_stays_doubly_stochastic():
    topology = faulty(RING8, link_failure_probability=0.3, offline_probability=0.2)
    for t in range(30):
        graph, down, away = topology.at(t), topology.faults.links_down(t), topology.faults.away(t)
        expected = [(i, j) for i, j in RING8.edges() if not down[i, j] and not away[i] and not away[j]]
        assert graph.edges() == expected
        W = graph.diffusion_matrix
        assert np.allclose(W, W.T) and np.allclose(W.sum(axis=0), 1) and np.allclose(W.sum(axis=1), 1)
    assert topology.without_faults is RING8 and topology.period is None


def test_a_churn_file_replays_absences_and_a_bad_line_is_named(tmp_path):
    trace = tmp_path / "churn.txt"
    trace.write_text("# worker leave return\n3 2 5\n\n0 4 6  # worker 0 too\n")
    draws = faults.Faults(faults.FaultSettings(churn=str(trace)), 8, seed=1)
    assert [np.flatnonzero(draws.away(t)).tolist() for t in range(7)] == [[], [], [3], [3], [0, 3], [0], []]
    for line, problem in [("3 2", "three integers"), ("8 1 2", "worker 8 is not one of the 8 workers"),
                          ("1 5 5", "leave_round < return_round"), ("a b c", "three integers")]:
        trace.write_text(f"0 1 2\n{line}\n")
        with pytest.raises(ValueError, match=f"line 2 .*{problem}"):
            faults.read_churn(str(trace), 8)
    with pytest.raises(ValueError, match="does not exist"):
        faults.read_churn(str(tmp_path / "missing.txt"), 8)


@pytest.mark.parametrize("setting,problem", [
    ({"link_failure_probability": 1.0}, "link_failure_probability must be a probability in \\[0, 1\\)"),
    ({"offline_probability": -0.1}, "offline_probability must be a probability"),
    ({"link_failure_probability": True}, "link_failure_probability must be a probability"),
])
def test_impossible_settings_are_refused(setting, problem):
    with pytest.raises(ValueError, match=problem):
        faults.FaultSettings(**setting)


def test_cut_links_on_a_directed_graph_are_refused_before_any_work(tmp_path):
    with pytest.raises(configuration.ConfigError, match="link_failure_probability: faults need a symmetric graph"):
        run_main(tmp_path, algorithm="push-sum", topology="one_peer_exponential", n_workers=8, matrix_size=4, num_steps=5,
                 link_failure_probability=0.1)
    assert not os.path.exists(tmp_path / "metrics.jsonl")


@pytest.mark.parametrize("settings,graph_needs,problem", [
    ({"offline_probability": 0.1}, None, "offline_probability: my-method does not gossip over the graph"),
    ({"message_loss_probability": 0.1}, "symmetric", "message_loss_probability: my-method has no rule yet"),
    ({"link_failure_probability": 0.1}, "fixed_symmetric", "link_failure_probability: my-method needs .* and has no rule "
                                                            "for a link that is down"),
    ({"churn": "trace.txt"}, "tree", "churn: my-method needs .* and has no rule"),
])
def test_a_method_without_a_rule_is_refused(settings, graph_needs, problem):
    """Every registered method has its rules; one of a user's that states no graph need, or a need
    for a fixed graph (Choco's, D2's and RelaySum's rules are their own), or that is not among those with a
    rule for lost messages, is refused."""
    with pytest.raises(ValueError, match=problem):
        faults.check(faults.FaultSettings(**settings), "my-method", graph_needs, RING8)


def gossip(method_name, topology, steps, **settings):
    """`steps` rounds of a method in one process from random starts: (start, end, bytes sent, the method)."""
    comm = comm_module.Communicator(8, "cpu")
    method = methods.build(method_name, comm, topology, **settings)
    x = torch.randn(8, 6, 5, generator=torch.Generator().manual_seed(0))
    start = x.clone()
    method.start([x])
    for _ in range(steps):
        method.step([x])
    return start, x, comm.bytes_sent.copy(), method


CHOCO = {"compressor": "sign-and-norm", "diffusion_rate": 0.3}


@pytest.mark.parametrize("method_name,settings", [("dpsgd", {}), ("power-gossip", {"rank": 1}), ("push-sum", {}),
                                                  ("gradient-tracking", {}), ("choco", CHOCO)])
def test_mixing_keeps_the_average_under_link_failures_and_absences_and_still_agrees(method_name, settings):
    topology = faulty(RING8, link_failure_probability=0.2, offline_probability=0.1)
    start, end, sent, _ = gossip(method_name, topology, 400, **settings)
    initial_error = (start - start.mean(0)).norm()
    assert (end.mean(0) - start.mean(0)).norm() < 1e-5 * initial_error  # each round's W is doubly stochastic (float32)
    assert (end - end.mean(0)).norm() < 1e-4 * initial_error  # and the workers still agree
    *_, fault_free, _ = gossip(method_name, RING8, 400, **settings)
    assert (sent < fault_free).all()  # what a cut link or an absent worker would have sent is not counted


def test_dpsgd_counts_exactly_the_messages_of_each_rounds_remaining_edges():
    topology = faulty(RING8, link_failure_probability=0.3, offline_probability=0.2)
    *_, sent, _ = gossip("dpsgd", topology, 20)
    degrees = sum(np.count_nonzero(topology.at(t).diffusion_matrix - np.diag(np.diag(topology.at(t).diffusion_matrix)), axis=0)
                  for t in range(20))
    assert (sent == degrees * 6 * 5 * 4).all()  # a float32 6 x 5 matrix to each neighbour that is there


def test_powergossip_keeps_a_cut_edges_state_through_a_long_absence(tmp_path):
    """A fault is not an absence for edge_memory: worker 0 away for 40 rounds (more than the 16 an
    edge of a graph over time is kept) comes back to its edges' P, Q and generators, and both
    ends of every edge still hold the same factors."""
    trace = tmp_path / "churn.txt"
    trace.write_text("0 3 43\n")
    topology = faulty(RING8, churn=str(trace))
    *_, method = gossip("power-gossip", topology, 44, rank=1)
    power = method.compressed  # OnlyOnLargeParameters: PowerGossip on the matrices
    rows = power.edge_rows.row_of
    assert set(rows) == {(i, j) for i in range(8) for j in range(8) if RING8.diffusion_matrix[i, j] > 0 and i != j}
    assert not power.edge_rows.free
    for (i, j), row in rows.items():
        other = rows[(j, i)]
        assert all(torch.equal(p[row], p[other]) for p in power.p) and all(torch.equal(q[row], q[other]) for q in power.q)
    assert power.half_steps[rows[(0, 1)]] < power.half_steps[rows[(3, 4)]]  # its power iteration paused while 0 was away


def test_choco_publishes_only_what_reaches_every_neighbour_so_no_copy_goes_stale():
    """Choco's rule (methods/choco.py): worker i's q_i moves x_hat_i, and enters its neighbours' s,
    only in a round in which it reaches all of them. Round by round, x_hat moves for exactly the
    workers the draws say publish; one that knows beforehand that it will not (a link of its down,
    itself or a neighbour away) sends nothing; lost messages were sent. At the end s_i = sum_j
    w_ij x_hat_j to float32 rounding (a stale copy would be off by a whole q), the average is kept
    and the workers agree."""
    topology = faulty(RING8, link_failure_probability=0.2, offline_probability=0.1, message_loss_probability=0.1)
    comm = comm_module.Communicator(8, "cpu")
    method = methods.build("choco", comm, topology, **CHOCO)
    x = torch.randn(8, 6, 5, generator=torch.Generator().manual_seed(0))
    start, steps = x.clone(), 300
    neighbours = (RING8.diffusion_matrix > 0) & ~np.eye(8, dtype=bool)
    messages, lost, published = np.zeros(8, dtype=np.int64), np.zeros(8, dtype=np.int64), 0
    for t in range(steps):
        x_hat = method.state["x_hat"][0].clone() if method.state else torch.zeros_like(x)
        method.step([x])
        silent = (neighbours & (topology.at(t).diffusion_matrix == 0)).any(axis=1)
        lost_now = topology.faults.lost(t) & neighbours & ~silent[:, None]
        publishes = ~silent & ~lost_now.any(axis=1)
        assert ((method.state["x_hat"][0] != x_hat).flatten(1).any(dim=1).numpy() == publishes).all()
        messages += ~silent * neighbours.sum(axis=1)
        lost += lost_now.sum(axis=1)
        published += publishes.sum()
    assert (comm.messages_sent == messages).all() and (comm.messages_lost == lost).all() and lost.sum() > 0
    assert 0.25 < published / (8 * steps) < 0.5  # 0.9^3 0.8^2 (present, links up) 0.9^2 (not lost): 0.38
    x_hat, s = method.state["x_hat"][0], method.state["s"][0]
    W = torch.tensor(RING8.diffusion_matrix, dtype=torch.float32)
    # a few float32 roundings of terms no larger than x_hat per round
    assert (s - torch.einsum("ij,j...->i...", W, x_hat)).abs().max() < steps * 4 * 2**-24 * x_hat.abs().max()
    initial_error = (start - start.mean(0)).norm()
    assert (x.mean(0) - start.mean(0)).norm() < 1e-5 * initial_error
    assert (x - x.mean(0)).norm() < 1e-3 * initial_error


@pytest.mark.parametrize("method_name,topology,settings", [
    ("choco", RING8, CHOCO), ("choco", RING8, CHOCO | {"compressor": "random-k", "keep_ratio": 0.2}),  # random-k draws
    ("relay-sum", topologies.build("chain", 8), {})])
def test_choco_and_relay_sum_under_faults_resume_bit_for_bit(method_name, topology, settings):
    """Their state (Choco's x_hat, s and compressor randomness; RelaySum's x^0, messages and counts)
    and the round that keys the faults' draws: 10 rounds, a new method loading the state, 10 more
    equal 20 rounds in one go."""
    every_fault = {"link_failure_probability": 0.2, "offline_probability": 0.1, "message_loss_probability": 0.1}
    _, uninterrupted, _, _ = gossip(method_name, faulty(topology, **every_fault), 20, **settings)
    _, x, _, first = gossip(method_name, faulty(topology, **every_fault), 10, **settings)
    second = methods.build(method_name, comm_module.Communicator(8, "cpu"), faulty(topology, **every_fault), **settings)
    second.load_state_dict(first.state_dict())
    for _ in range(10):
        second.step([x])
    assert torch.equal(x, uninterrupted)


@pytest.mark.parametrize("faulty_settings", [  # (PowerGossip's lost messages, all-reduce's absences: train.py's LAYOUT_RUNS)
    {"algorithm": "power_gossip", "link_failure_probability": 0.25, "offline_probability": 0.15},
    {"algorithm": "dpsgd", "link_failure_probability": 0.1, "message_loss_probability": 0.2},
    {"algorithm": "push_sum", "topology": "random_matching", "message_loss_probability": 0.2, "offline_probability": 0.1},
    {"algorithm": "deepsqueeze", "optimizer_diffusion_rate": 0.2, "message_loss_probability": 0.2},
    {"algorithm": "moniqua", "optimizer_diffusion_rate": 0.1, "optimizer_theta": 2.0, "message_loss_probability": 0.2},
    {"algorithm": "choco", "optimizer_diffusion_rate": 0.3, "link_failure_probability": 0.2, "offline_probability": 0.1,
     "message_loss_probability": 0.1},
    {"algorithm": "d2", "optimizer_diffusion_rate": 0.5, "link_failure_probability": 0.25, "offline_probability": 0.15}])
def test_the_same_faults_in_one_process_and_under_mpirun(tmp_path, faulty_settings):
    settings = {"n_workers": 4, "matrix_size": 6, "num_steps": 40, "seed": 3} | faulty_settings
    single = run_main(tmp_path / "single", **settings)
    run_mpi(2, ["gossip_run.py", f"output_dir={tmp_path / 'mpi'}"] + [f"{k}={json.dumps(v)}" for k, v in settings.items()],
            timeout=300)
    from powergossip import runs
    assert runs.read_metrics(str(tmp_path / "mpi")) == single


def test_relay_sum_under_every_fault_trains_alike_in_one_process_and_under_mpirun(tmp_path, tiny_data):
    """RelaySum is not in gossip_run.py: train.py on a 4-chain, one process against mpirun -np 2,
    every record the same (the wall-clock ones aside)."""
    overrides = layout_overrides(tiny_data, "relay-sum") + ["topology=chain", "link_failure_probability=0.2",
                                                            "offline_probability=0.2", "message_loss_probability=0.1"]
    train_runs.run(str(tmp_path / "single"), overrides)
    run_mpi(2, ["tests/train_runs.py", str(tmp_path), json.dumps({"mpi": overrides})], timeout=300)
    from powergossip import runs
    timed = lambda folder: [r for r in runs.read_metrics(str(tmp_path / folder)) if not r["name"].startswith("time_")]
    assert timed("mpi") == timed("single") and any(r["name"] == "messages_lost" for r in timed("single"))


def test_dpsgd_under_one_way_loss_counts_what_was_sent_and_lost_and_its_average_drifts():
    """A lost message was sent (counted) but does not arrive: its weight moves to the receiver's
    own, so that round's W is not symmetric and the workers' average drifts; they still agree."""
    topology = faulty(RING8, message_loss_probability=0.2)
    start, end, sent, method = gossip("dpsgd", topology, 300)
    _, _, fault_free, _ = gossip("dpsgd", RING8, 300)
    assert (sent == fault_free).all()  # every message was sent
    draws = np.stack([topology.faults.lost(t) for t in range(300)])
    neighbours = (RING8.diffusion_matrix > 0) & ~np.eye(8, dtype=bool)
    assert (method.comm.messages_lost == (draws & neighbours).sum(axis=(0, 2))).all()
    assert 0.15 < method.comm.messages_lost.sum() / (300 * 16) < 0.25
    initial_error = (start - start.mean(0)).norm()
    assert (end.mean(0) - start.mean(0)).norm() > 1e-3 * initial_error  # not kept
    assert (end - end.mean(0)).norm() < 1e-4 * initial_error  # consensus, elsewhere


def test_powergossip_under_one_way_loss_skips_the_edge_at_both_ends_and_keeps_the_average():
    """A PowerGossip message lost either way: both ends (told by the simulator) keep the edge's
    old factor and leave X alone, so their factors never part and the average is kept."""
    topology = faulty(RING8, message_loss_probability=0.2)
    start, end, sent, method = gossip("power-gossip", topology, 400, rank=1)
    *_, fault_free, _ = gossip("power-gossip", RING8, 400, rank=1)
    assert (sent == fault_free).all() and 0.15 < method.comm.messages_lost.sum() / method.comm.messages_sent.sum() < 0.25
    initial_error = (start - start.mean(0)).norm()
    assert (end.mean(0) - start.mean(0)).norm() < 1e-5 * initial_error
    assert (end - end.mean(0)).norm() < 1e-3 * initial_error  # slower: 36% of the edges' half-steps are skipped
    power = method.compressed
    rows = power.edge_rows.row_of
    for (i, j), row in rows.items():
        assert all(torch.equal(p[row], p[rows[(j, i)]]) for p in power.p)
        assert all(torch.equal(q[row], q[rows[(j, i)]]) for q in power.q)


@pytest.mark.parametrize("one_step_delay", [False, True])
def test_robust_push_sum_reaches_the_exact_average_under_message_loss(one_step_delay):
    """Running sums (Hadjicostis et al. 2016): a lost message's mass arrives with the next one
    that gets through, so x / w reaches the starting average exactly, where mixing the rest
    (D-PSGD's rule) drifts away from it; with one_step_delay too (cut links included)."""
    topology = faulty(RING8, message_loss_probability=0.1, link_failure_probability=0.1)
    start, end, sent, method = gossip("push-sum", topology, 300, one_step_delay=one_step_delay)
    initial_error = (start - start.mean(0)).norm()
    assert (end - start.mean(0)).norm() < 1e-5 * initial_error  # every worker at the starting average
    assert method.comm.messages_lost.sum() > 0.05 * method.comm.messages_sent.sum()
    _, dpsgd_end, _, _ = gossip("dpsgd", topology, 300)
    assert (dpsgd_end.mean(0) - start.mean(0)).norm() > 1e-3 * initial_error


@pytest.mark.parametrize("one_step_delay", [False, True])
def test_robust_push_sum_reaches_the_exact_average_on_a_directed_graph_over_time(one_step_delay):
    """Also with one_step_delay (overlapped SGP): what arrives of the running sums is added a round
    later; the mass of lost messages waits in them, the arrived mass in flight, and none is lost."""
    topology = faulty(topologies.build("one_peer_exponential", 8), message_loss_probability=0.1)
    start, end, sent, method = gossip("push-sum", topology, 300, one_step_delay=one_step_delay)
    assert (end - start.mean(0)).norm() < 1e-5 * (start - start.mean(0)).norm()
    assert method.comm.messages_lost.sum() > 0
    if one_step_delay:
        assert not torch.allclose(method.in_flight[1], torch.zeros(8, 1))
        _, _, plain_sent, _ = gossip("push-sum", topology, 300)
        assert (sent == plain_sent).all()  # the same running sums on the wire


def test_all_reduce_averages_the_workers_present_and_leaves_those_away_alone():
    topology = faulty(RING8, offline_probability=0.3)
    comm = comm_module.Communicator(8, "cpu")
    method = methods.build("all-reduce", comm, topology)
    x = torch.randn(8, 6, 5, generator=torch.Generator().manual_seed(0))
    sent, absences = np.zeros(8, dtype=np.int64), 0
    for t in range(10):
        before, present = x.clone(), ~topology.faults.away(t)
        method.step([x])
        absences += 8 - present.sum()
        torch.testing.assert_close(x[present], before[present].mean(0).expand_as(x[present]), rtol=1e-6, atol=1e-6)
        assert torch.equal(x[~present], before[~present])
        sent += present * 6 * 5 * 4
    assert absences > 10 and (comm.bytes_sent == sent).all()  # only those present send their buffer


def test_all_reduce_has_no_links_to_fail(tmp_path):
    with pytest.raises(configuration.ConfigError, match="link_failure_probability: all-reduce does not gossip over the graph's links"):
        run_main(tmp_path, algorithm="all_reduce", n_workers=8, matrix_size=4, num_steps=5, link_failure_probability=0.1)


def distance_to_the_minimiser(method_name, topology, **settings):
    """Relative distance of the workers to the minimiser of sum_i f_i after the heterogeneous
    least-squares problem's steps (tests/least_squares_runs.py), in float64."""
    from powergossip import step as step_module
    from tests import least_squares_runs as problem

    comm = comm_module.Communicator(problem.N_WORKERS, "cpu")
    method = methods.build(method_name, comm, topology, **settings)
    x = torch.zeros(problem.N_WORKERS, problem.DIM, dtype=torch.float64)
    gradient = torch.zeros_like(x)
    training_step = step_module.TrainingStep(method, methods.METHODS[method_name], [x], [gradient])
    for _ in range(problem.STEPS):
        gradient.copy_(problem.gradients(x))
        training_step(lambda: x.sub_(problem.LEARNING_RATE * gradient))
    return float((x - problem.minimiser()).norm() / problem.minimiser().norm())


CORRECTED = [("gradient-tracking", {}), ("d2", {"diffusion_rate": 0.5})]


@pytest.mark.parametrize("method_name,settings", CORRECTED)
def test_d2_and_gradient_tracking_lose_their_exactness_when_messages_are_lost(method_name, settings):
    """No fix for them: a lost message breaks D2's correction and the sum of gradient tracking's
    trackers. On heterogeneous least squares both reach the minimiser of sum_i f_i exactly
    without loss and miss it with 5% of the messages lost (the D-PSGD rule for their mixing)."""
    ring = topologies.build("ring", 5)
    assert distance_to_the_minimiser(method_name, ring, **settings) < 1e-6
    assert distance_to_the_minimiser(method_name, faulty(ring, message_loss_probability=0.05), **settings) > 1e-3


@pytest.mark.parametrize("method_name,settings", CORRECTED)
def test_d2_and_gradient_tracking_stay_exact_under_link_failures_and_absences(method_name, settings):
    """Each round's W is symmetric and doubly stochastic: D2's corrections (and gradient tracking's
    trackers) keep their sum, and a consensus at the minimiser is a fixed point of every such W,
    so both still reach it, as without faults (float64: 1e-13 measured)."""
    topology = faulty(topologies.build("ring", 5), link_failure_probability=0.2, offline_probability=0.1)
    assert distance_to_the_minimiser(method_name, topology, **settings) < 1e-6


@pytest.mark.parametrize("fill_missing,last", [("start", 10 / 3), ("latest", 5.0)])
def test_relay_sum_fills_a_lost_message_as_computed_by_hand(fill_missing, last):
    """A 3-chain 0 - 1 - 2, x^0 = 0, starting at (3, 6, 9); round 0 loses the message 0 -> 1.
    Round 0: worker 1 hears only 2: x_1 = (6 + 9 + (3 - 1 - 1) r_1) / 3 = 5 (r = x^0 = 0 so far),
    and keeps (0, count 0) as what 0 sent; x = (3 + 6, 6 + 9, 9 + 6) / 3 = (3, 5, 5). Round 1,
    nothing lost: 1 relays to 0 m = 5 + 0 + 9 = 14 with count 1 + 0 + 1 = 2 and to 2 m = 5 + 0 = 5
    with count 1, so x = ((3 + 14) / 3, (5 + 3 + 5) / 3, (5 + 5 + (3 - 1 - 1) r_2) / 3): worker 2's
    one gap takes x^0 = 0 (fill_missing=start: 10/3) or its own last average 5 (latest: 15/3)."""
    chain = topologies.build("chain", 3)
    topology = faulty(chain, message_loss_probability=0.5)
    lost_in_round = {0: np.array([[False, True, False], [False, False, False], [False, False, False]])}
    topology.faults.lost = lambda t: lost_in_round.get(t, np.zeros((3, 3), dtype=bool))
    comm = comm_module.Communicator(3, "cpu")
    method = methods.build("relay-sum", comm, topology, fill_missing=fill_missing)
    x = torch.tensor([[3.0], [6.0], [9.0]], dtype=torch.float64)
    method.start([torch.zeros_like(x)])  # x^0 = 0
    method.step([x])
    assert x[:, 0].tolist() == [3.0, 5.0, 5.0]
    method.step([x])
    torch.testing.assert_close(x[:, 0], torch.tensor([17 / 3, 13 / 3, last], dtype=torch.float64), rtol=1e-15, atol=0)
    assert comm.messages_lost.tolist() == [1, 0, 0] and comm.messages_sent.tolist() == [2, 4, 2]


def test_relay_sum_latest_fill_is_each_present_workers_last_average():
    """fill_missing=latest: after a round the fill is the mixed model of each worker present; a
    worker away keeps its fill (x^0 here). The 3-chain from (3, 6, 9), worker 1 away: (1, 6, 3)."""
    topology = faulty(topologies.build("chain", 3), offline_probability=0.5)
    topology.faults.away = lambda t: np.array([False, t == 0, False])
    method = methods.build("relay-sum", comm_module.Communicator(3, "cpu"), topology, fill_missing="latest")
    x = torch.tensor([[3.0], [6.0], [9.0]], dtype=torch.float64)
    method.start([torch.zeros_like(x)])
    method.step([x])
    assert x[:, 0].tolist() == [1.0, 6.0, 3.0] and method.fill[0][:, 0].tolist() == [1.0, 0.0, 3.0]


def test_relay_sum_refuses_an_unknown_fill_before_any_work():
    with pytest.raises(ValueError, match="fill_missing must be one of start, latest .*got 'x0'"):
        methods.build("relay-sum", comm_module.Communicator(3, "cpu"), topologies.build("chain", 3), fill_missing="x0")


@pytest.mark.parametrize("fault,cut,first_round,second_round,sent", [
    ("links_down", np.array([[0, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=bool), [1, 5, 5], [5, 11 / 3, 10 / 3], [1, 3, 2]),
    ("away", np.array([False, True, False]), [1, 6, 3], [7 / 3, 10 / 3, 3], [1, 2, 1])])
def test_relay_sum_takes_a_cut_link_or_an_absent_worker_as_lost_both_ways(fault, cut, first_round, second_round, sent):
    """The 3-chain 0 - 1 - 2 of the test above, from (3, 6, 9) with x^0 = 0, round 0 cut.
    Link {0, 1} down: 0 hears nothing, x_0 = 3 / 3 = 1; 1 hears 2 only, x_1 = (6 + 9) / 3 = 5;
    x_2 = (9 + 6) / 3 = 5. Round 1: 1 relays 5 + 9 = 14 (count 2) to 0 and 5 (count 1) to 2, so
    x = ((1 + 14) / 3, (5 + 1 + 5) / 3, (5 + 5) / 3). Worker 1 away: it keeps 6, x_0 = 3 / 3,
    x_2 = 9 / 3; round 1: it relays 6 (count 1) both ways, x = ((1 + 6) / 3, (6 + 1 + 3) / 3,
    (3 + 6) / 3). Nothing is sent on a cut link."""
    chain = topologies.build("chain", 3)
    topology = faulty(chain, **{"links_down": {"link_failure_probability": 0.5}, "away": {"offline_probability": 0.5}}[fault])
    setattr(topology.faults, fault, lambda t: cut if t == 0 else np.zeros_like(cut))
    comm = comm_module.Communicator(3, "cpu")
    method = methods.build("relay-sum", comm, topology)
    x = torch.tensor([[3.0], [6.0], [9.0]], dtype=torch.float64)
    method.start([torch.zeros_like(x)])  # x^0 = 0
    method.step([x])
    assert x[:, 0].tolist() == first_round
    method.step([x])
    torch.testing.assert_close(x[:, 0], torch.tensor(second_round, dtype=torch.float64), rtol=1e-15, atol=0)
    assert comm.messages_sent.tolist() == sent and not comm.messages_lost.any()


@pytest.mark.parametrize("method_name,settings", [("deepsqueeze", {"compressor": "sign-and-norm", "diffusion_rate": 0.05}),
                                                  ("moniqua", {"theta": 2.0, "diffusion_rate": 0.1})])
def test_deepsqueeze_and_moniqua_leave_a_lost_message_out_and_still_come_together(method_name, settings):
    """They send their own compressed value every round and keep no copy of a neighbour's, so a
    lost message leaves nothing stale: the receiver mixes without it (D-PSGD's rule)."""
    topology = faulty(RING8, message_loss_probability=0.1)
    start, end, sent, method = gossip(method_name, topology, 300, **settings)
    _, fault_free_end, fault_free_sent, _ = gossip(method_name, RING8, 300, **settings)
    assert (sent == fault_free_sent).all() and method.comm.messages_lost.sum() > 0
    assert not torch.equal(end, fault_free_end)  # the rule ran
    error, fault_free_error = (end - end.mean(0)).norm(), (fault_free_end - fault_free_end.mean(0)).norm()
    assert error < 0.5 * (start - start.mean(0)).norm() and error < 2 * fault_free_error  # (their compression's floor)


def test_powersgd_leaves_a_worker_away_out_of_its_average():
    """A worker away keeps its own gradient and error memory; those present share the average
    (exact tensors) or the compressed one, computed from them alone, and only they send."""
    topology = faulty(RING8, offline_probability=0.3)
    comm = comm_module.Communicator(8, "cpu")
    method = methods.build("powersgd", comm, topology, rank=1, start_compressing_after_num_steps=1)
    generator = torch.Generator().manual_seed(0)
    away_seen = 0
    for t in range(6):
        grads = [torch.randn(8, 6, 5, generator=generator), torch.randn(8, 4, generator=generator)]
        before, memory_before = [g.clone() for g in grads], [e.clone() for e in method.memory] if method.memory else None
        present = ~topology.faults.away(t)
        method.step(grads)
        away_seen += int((~present).sum())
        for g, b in zip(grads, before):
            assert torch.equal(g[~present], b[~present])  # its own gradient
            assert (g[present] == g[present][0]).all()  # one update for all present
        torch.testing.assert_close(grads[1][present][0], before[1][present].mean(0))  # the exact vector: their mean
        if t == 0:
            torch.testing.assert_close(grads[0][present][0], before[0][present].mean(0))  # before compressing: exact
        elif memory_before is not None:
            assert torch.equal(method.memory[0][~present], memory_before[0][~present])
    assert away_seen > 5
