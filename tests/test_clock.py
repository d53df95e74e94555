"""The simulated clock (powergossip/clock.py): every expected time is computed by hand in the
comments, with binary fractions, so the comparisons are exact."""
import networkx
import numpy as np
import pytest
import torch

from powergossip import clock as clock_module
from powergossip import comm as comm_module
from powergossip import faults, methods, topologies
from powergossip.clock import ClockSettings, SimulatedClock, send_rule_of
from powergossip.errors import ConfigError

RING4 = topologies.build("ring", 4)  # neighbours: 0: [1, 3], 1: [0, 2], 2: [1, 3], 3: [0, 2]
# a 256-bit message over 1024 bit/s takes 0.25 s on the link, then 0.125 s of latency: a worker's
# first message arrives 0.375 s after it began to send, its second 0.25 s later, at 0.625 s
NETWORK = dict(network_latency_s=0.125, network_bandwidth_bits_per_s=1024.0)


def clock(topology=RING4, seed=0, **settings):
    return SimulatedClock(ClockSettings(**settings), topology, topology.n_workers, seed)


def steps(simulated, count, rule, *bits, **round_arguments):
    return [simulated.round(simulated.steps, rule, *bits, **round_arguments) for _ in range(count)]


def test_a_4_ring_of_equal_workers_sending_at_the_start_of_the_step():
    # eq. overlap: T(k) = T(k-1) + max(c, 0.625) (each worker's second message is in at 0.625 s)
    rounds = steps(clock(worker_step_seconds=0.5, **NETWORK), 3, "overlap", 256)
    assert [r.end.tolist() for r in rounds] == [[0.625] * 4, [1.25] * 4, [1.875] * 4]
    # the link's 0.5 s of sending hide behind the 0.5 s of compute; the last message's latency is waited for
    assert (rounds[2].compute == 0.5).all() and (rounds[2].sending == 0).all() and (rounds[2].waiting == 0.125).all()
    rounds = steps(clock(worker_step_seconds=1.0, **NETWORK), 3, "overlap", 256)  # compute-bound: max(1, 0.625)
    assert [r.end.tolist() for r in rounds] == [[1.0] * 4, [2.0] * 4, [3.0] * 4]
    assert (rounds[2].sending == 0).all() and (rounds[2].waiting == 0).all()


def test_a_4_ring_of_equal_workers_sending_after_the_local_step():
    # eq. after-step: T(k) = T(k-1) + c + 0.625 = T(k-1) + 1.125
    rounds = steps(clock(worker_step_seconds=0.5, **NETWORK), 3, "after_step", 256)
    assert [r.end.tolist() for r in rounds] == [[1.125] * 4, [2.25] * 4, [3.375] * 4]
    last = rounds[2]
    assert (last.start == 2.25).all() and (last.compute == 0.5).all() and (last.sending == 0.5).all()
    assert (last.waiting == 0.125).all() and (last.compute + last.sending + last.waiting == last.duration).all()


def test_a_worker_with_two_neighbours_sends_back_to_back_in_neighbour_order(tmp_path):
    simulated = clock(topologies.build("chain", 3), **NETWORK)  # 0 - 1 - 2: worker 1 sends to 0, then to 2
    messages = simulated.deliveries(simulated.topology, 256)
    assert list(zip(messages.sender.tolist(), messages.receiver.tolist(), messages.arrival.tolist())) == \
        [(0, 1, 0.375), (1, 0, 0.375), (1, 2, 0.625), (2, 1, 0.375)]  # k * 0.25 + 0.125, k = 1, 2
    assert messages.transmitting.tolist() == [0.25, 0.5, 0.25] and messages.delivered.tolist() == [0.375, 0.625, 0.375]
    lists = simulated.deliveries([[1], [2, 0], [1]], 256)  # neighbour lists say the order: to 2 first
    assert lists.arrival.tolist() == [0.375, 0.375, 0.625, 0.375] and lists.receiver.tolist() == [1, 2, 0, 1]
    bits = np.zeros((3, 3))
    bits[1, 0], bits[1, 2], bits[0, 1], bits[2, 1] = 512, 256, 256, 256  # the first message takes 0.5 s
    assert simulated.deliveries(simulated.topology, bits).arrival.tolist() == [0.375, 0.625, 0.875, 0.375]
    # after_step with no compute: worker 2 waits for worker 1's second message, worker 1 for its own
    rounds = simulated.round(0, "after_step", 256)
    assert rounds.end.tolist() == [0.375, 0.625, 0.625]
    assert rounds.sending.tolist() == [0.25, 0.5, 0.25] and rounds.waiting.tolist() == [0.125, 0.125, 0.375]
    # a link of its own: {1, 2} at 512 bit/s, so 1's message to 2 takes 0.5 s after the 0.25 s to 0
    links = tmp_path / "links.txt"
    links.write_text("# i j bits_per_s\n2 1 512  # both ways\n")
    own = clock(topologies.build("chain", 3), network_bandwidth_file=str(links), **NETWORK)
    assert own.deliveries(own.topology, 256).arrival.tolist() == [0.375, 0.375, 0.875, 0.625]


def test_a_lost_message_is_waited_for_until_the_timeout():
    simulated = clock(worker_step_seconds=0.5, message_timeout_s=2.0, **NETWORK)
    lost = np.zeros((4, 4), dtype=bool)
    lost[1, 0] = True  # worker 1's message to worker 0
    first = simulated.round(0, "overlap", 256, lost=lost)
    assert first.end.tolist() == [2.0, 0.625, 0.625, 0.625]  # worker 0 waits 2 s from its start; 1 sent all the same
    assert first.waiting.tolist() == [1.5, 0.125, 0.125, 0.125]
    # step 1: 0 starts at 2.0; its first message (to 1) is in at 2.375, its second (to 3) at 2.625;
    # worker 2 gets the others' second messages at 0.625 + 0.625 = 1.25
    assert simulated.round(1, "overlap", 256).end.tolist() == [2.625, 2.375, 1.25, 2.625]


def test_every_steps_time_is_compute_sending_and_waiting(tmp_path):
    links = tmp_path / "links.txt"
    links.write_text("0 1 300\n2 3 5000\n")
    graph = topologies.build("torus", 16)
    simulated = clock(graph, seed=2, worker_step_seconds=0.3, worker_speeds=list(np.linspace(0.5, 2, 16)),
                      straggler_probability=0.2, straggler_slowdown=3.0, message_timeout_s=0.7, network_latency_s=0.01,
                      network_bandwidth_bits_per_s=1000.0, network_bandwidth_file=str(links))
    draws = np.random.default_rng(0)
    for step in range(30):
        rule = ("overlap", "after_step", "all_reduce")[step % 3]
        bits = (draws.integers(0, 400, (16, 16)), 100) if rule != "all_reduce" else (250, 120)
        lost = draws.random((16, 16)) < 0.1 if rule != "all_reduce" else None
        times = simulated.round(step, rule, *bits, lost=lost)
        assert (times.waiting >= 0).all() and (times.sending >= 0).all() and (times.end >= times.start + times.compute).all()
        assert np.allclose(times.compute + times.sending + times.waiting, times.duration, rtol=0, atol=1e-12)
    assert simulated.now == times.end.max()


def test_the_issues_long_run_paces_with_one_worker_4_times_slower_on_a_16_ring():
    ring16 = topologies.build("ring", 16)
    slow = dict(worker_step_seconds=0.25, worker_speeds=[0.25] + [1.0] * 15)  # worker 0: 1 s per step, the others 0.25 s
    no_network = dict(network_latency_s=0.0, network_bandwidth_bits_per_s=float("inf"))
    # D-PSGD, no network cost: a worker d hops from 0 ends step k at k + 1 - d (it waits on 0's chain)
    ends = [r.end for r in steps(clock(ring16, **slow, **no_network), 41, "overlap", 1e6)]
    hops = np.minimum(np.arange(16), 16 - np.arange(16))
    assert ends[40].tolist() == (41.0 - hops).tolist() and (ends[40] - ends[39] == 1.0).all()  # pace = c_max
    ends = [r.end for r in steps(clock(ring16, **slow, **no_network), 41, "all_reduce", 1e6)]
    assert ends[40].tolist() == [41.0] * 16 and (ends[40] - ends[39] == 1.0).all()  # all-reduce: the slowest too
    # with 0.125 s per message: overlap keeps max(c_max, m) = 1; after-step, c_max + m = 1.125 (0's self-loop)
    latency = dict(network_latency_s=0.125, network_bandwidth_bits_per_s=float("inf"))
    ends = [r.end for r in steps(clock(ring16, **slow, **latency), 41, "overlap", 1e6)]
    assert (ends[40] - ends[39] == 1.0).all()
    ends = [r.end for r in steps(clock(ring16, **slow, **latency), 41, "after_step", 1e6)]
    assert (ends[40] - ends[39] == 1.125).all() and ends[40][0] == 41 * 1.125


def test_all_reduce_waits_for_the_slowest_and_costs_a_ring_all_reduce():
    # 4 workers, a 1024-bit buffer: 2 * 3 latencies = 0.75 s, and 2 * 3 / 4 of the buffer = 1.5 s on the link
    first = clock(worker_step_seconds=0.5, worker_speeds=[1, 1, 0.5, 1], **NETWORK).round(0, "all_reduce", 1024)
    assert first.end.tolist() == [3.25] * 4  # worker 2 computes 1 s, then 2.25 s of all-reduce
    assert first.sending.tolist() == [1.5] * 4 and first.waiting.tolist() == [1.25, 1.25, 0.75, 1.25]
    # worker 3 away: a ring of 3, 4 latencies (0.5 s) and 2 * 2 / 3 of 3072 bits = 4 s; worker 3 steps alone
    alone = clock(worker_step_seconds=0.5, **NETWORK).round(0, "all_reduce", 3072, present=np.array([1, 1, 1, 0]))
    assert alone.end.tolist() == [5.0, 5.0, 5.0, 0.5] and alone.sending.tolist() == [4.0, 4.0, 4.0, 0.0]
    # PowerSGD's two all-reduces in sequence (P: 1024 bits, Q: 2048): 1.5 s of latency, 1.5 + 3 s on the link
    assert clock(worker_step_seconds=0.5, **NETWORK).round(0, "all_reduce", 1024, 2048).end.tolist() == [6.5] * 4


def test_a_graph_over_time_is_timed_round_by_round():
    pairs = ([(0, 1), (2, 3)], [(1, 2), (3, 0)])
    matchings = topologies.from_callable(lambda t: networkx.Graph(pairs[t % 2]), 4, period=2)
    simulated = clock(matchings, worker_step_seconds=0.5, worker_speeds=[0.5, 1, 1, 1], **NETWORK)
    # one message each, in at 0.375 s; worker 0 computes 1 s, the others 0.5 s (eq. after-step per pair)
    assert simulated.round(0, "after_step", 256).end.tolist() == [1.375, 1.375, 0.875, 0.875]
    # round 1 pairs 3 with 0: 0 ends at 1.375 + 1 + 0.375, 3 waits for it; 1 at 1.375 + 0.5 + 0.375, 2 waits for it
    assert simulated.round(1, "after_step", 256).end.tolist() == [2.75, 2.25, 2.25, 2.75]
    again = clock(matchings, worker_step_seconds=0.5, worker_speeds=[0.5, 1, 1, 1], **NETWORK)
    assert again.round(0, "after_step", 256, graph=[[1], [0], [3], [2]]).end.tolist() == [1.375, 1.375, 0.875, 0.875]


def test_straggler_draws_are_keyed_by_seed_step_and_worker():
    settings = dict(worker_step_seconds=0.5, straggler_probability=0.25, straggler_slowdown=4.0)
    simulated = clock(topologies.build("ring", 16), seed=7, **settings)
    draws = np.stack([simulated.straggling(step) for step in range(400)])
    assert 0.22 < draws.mean() < 0.28  # 6400 draws at p = 0.25
    for block in (1, 2, 4, 8):  # a process holding `block` workers draws its own the same
        assert all((np.concatenate([simulated.straggling(step, slice(first, first + block))
                                    for first in range(0, 16, block)]) == draws[step]).all() for step in (0, 5, 399))
    fewer = clock(topologies.build("ring", 8), seed=7, **settings)  # worker k's draw does not depend on n
    assert all((fewer.straggling(step) == draws[step, :8]).all() for step in range(20))
    assert (clock(topologies.build("ring", 16), seed=7, **settings).straggling(123) == draws[123]).all()
    assert not (np.stack([clock(topologies.build("ring", 16), seed=8, **settings).straggling(s) for s in range(20)])
                == draws[:20]).all()
    assert (simulated.compute_seconds(9) == np.where(draws[9], 2.0, 0.5)).all()  # 0.5 s, or 4 x 0.5 s
    assert (clock(straggler_probability=1, straggler_slowdown=4.0, worker_step_seconds=0.5).compute_seconds(3) == 2.0).all()


def test_worker_speeds_from_a_list_and_from_a_file(tmp_path):
    speeds = tmp_path / "speeds.txt"
    speeds.write_text("# one speed per worker\n1 0.5\n2\n0.25  # the slow one\n")
    from_list = clock(worker_step_seconds=1.0, worker_speeds=[1, 0.5, 2, 0.25]).compute_seconds(0)
    from_file = clock(worker_step_seconds=1.0, worker_speeds=str(speeds)).compute_seconds(0)
    assert from_list.tolist() == from_file.tolist() == [1.0, 2.0, 0.5, 4.0]


@pytest.mark.parametrize("settings, message", [
    (dict(worker_step_seconds=-1.0), "worker_step_seconds must be seconds >= 0"),
    (dict(worker_step_seconds=float("nan")), "worker_step_seconds must be"),
    (dict(worker_step_seconds=True), "worker_step_seconds must be"),
    (dict(network_latency_s=-0.1), "network_latency_s must be seconds >= 0"),
    (dict(message_timeout_s=-1), "message_timeout_s must be seconds >= 0"),
    (dict(network_bandwidth_bits_per_s=0), "network_bandwidth_bits_per_s must be bits per second > 0"),
    (dict(straggler_probability=1.5), r"straggler_probability must be a probability in \[0, 1\]"),
    (dict(straggler_probability=-0.1), "straggler_probability must be a probability"),
    (dict(straggler_slowdown=0.5), "straggler_slowdown must be a factor >= 1"),
    (dict(worker_speeds=[1, 0]), r"worker_speeds\[1\] must be a speed > 0"),
    (dict(worker_speeds=3), "worker_speeds must be a list of one speed per worker or the path of a file"),
    (dict(network_bandwidth_file=""), "network_bandwidth_file must be the path of a file"),
])
def test_a_setting_that_cannot_work_is_named_with_its_fix(settings, message):
    with pytest.raises(ConfigError, match=message):
        ClockSettings(**settings)


@pytest.mark.parametrize("key, content, message", [
    ("worker_speeds", [1, 1, 1], "worker_speeds has 3 speeds, but the run has 4 workers: give one speed per worker"),
    ("worker_speeds", None, "worker_speeds: .* is not a file"),
    ("worker_speeds", "1 1\n1 fast\n", "line 2: 'fast' is not a number"),
    ("worker_speeds", "1 1 1\n", "has 3 speeds, but the run has 4 workers"),
    ("worker_speeds", "1 1 1 -2\n", "worker 3's speed must be a speed > 0"),
    ("worker_speeds", b"\xff\xfe\x00\x01", "worker_speeds: cannot read .* not a text file"),
    ("network_bandwidth_file", "0 9 100\n", "line 1 .* worker 9 is not one of the 4 workers"),
    ("network_bandwidth_file", "0 1\n", r"expected 'i j bits_per_s'"),
    ("network_bandwidth_file", "0 1 -5\n", "must be a bandwidth > 0"),
    ("network_bandwidth_file", "0 1 5\n1 0 6\n", r"line 2 .* link \{1, 0\} is named twice"),
])
def test_a_list_or_file_that_does_not_fit_the_run_is_named(tmp_path, key, content, message):
    value = content
    if isinstance(content, (str, bytes)) or content is None:
        value = str(tmp_path / "missing.txt")
        if content is not None:
            (tmp_path / "given.txt").write_bytes(content if isinstance(content, bytes) else content.encode())
            value = str(tmp_path / "given.txt")
    with pytest.raises(ConfigError, match=message):
        ClockSettings(**{key: value}).check(4)
    if content is None:  # a folder is no file either
        with pytest.raises(ConfigError, match="is not a file"):
            ClockSettings(**{key: str(tmp_path)}).check(4)


def test_the_clock_goes_step_by_step_and_resumes_from_its_state():
    settings = dict(worker_step_seconds=0.5, straggler_probability=0.5, **NETWORK)
    straight = clock(seed=3, **settings)
    ends = [r.end.tolist() for r in steps(straight, 5, "after_step", 256)]
    first = clock(seed=3, **settings)
    steps(first, 3, "after_step", 256)
    resumed = clock(seed=3, **settings)
    resumed.load_state_dict(first.state_dict())
    assert [r.end.tolist() for r in steps(resumed, 2, "after_step", 256)] == ends[3:]
    assert resumed.now == straight.now == max(ends[4])
    with pytest.raises(ValueError, match="the clock is at step 5"):
        resumed.round(7, "after_step", 256)


def test_each_registered_method_ends_its_round_by_its_rule():
    rules = {name: send_rule_of(name) for name in ("dpsgd", "power-gossip", "choco", "deepsqueeze", "moniqua", "push-sum",
                                                    "relay-sum", "d2", "gradient-tracking", "all-reduce", "powersgd")}
    assert rules == {"dpsgd": "overlap", "power-gossip": "overlap", "choco": "overlap", "deepsqueeze": "overlap",
                     "moniqua": "overlap", "push-sum": "after_step", "relay-sum": "after_step", "d2": "after_step",
                     "gradient-tracking": "after_step", "all-reduce": "after_step", "powersgd": "after_step"}  # their all-reduces: eq. all-reduce (StepClock)
    # overlapped SGP: a round's messages are needed by the next step's end only
    assert send_rule_of("push-sum", {"one_step_delay": True}) == "overlap"
    assert send_rule_of("push_sum", {"one_step_delay": False, "rank": 1}) == "after_step"
    assert send_rule_of("dpsgd", {"one_step_delay": True}) == "overlap" and send_rule_of("d2", {}) == "after_step"


# --- a run's clock (RunClock): the steps' bits and messages from the Communicator's counters -------
def run_clock(method_name, topology=RING4, seed=0, **settings):
    comm = comm_module.Communicator(topology.n_workers, "cpu")
    method = methods.build(method_name, comm, topology)
    return method, clock_module.RunClock(ClockSettings(**settings), comm, topology, method_name, seed)


def test_a_run_clock_times_each_step_from_what_the_workers_sent():
    # D-PSGD on a 4-ring, 16 float32 numbers a worker: 512-bit messages, 0.5 s each on the link, 0.125 s of
    # latency: the second message is in at 1.125 s; 0.5 s of compute hide the first message (eq. overlap)
    method, timing = run_clock("dpsgd", worker_step_seconds=0.5, **NETWORK)
    x = torch.randn(4, 16)
    for _ in range(3):
        method.step([x])
        timing.tick()
    assert timing.now == 3 * 1.125 and (timing.spent.sum(axis=0) == timing.clock.time).all()
    assert timing.spent.tolist() == [[1.5] * 4, [1.5] * 4, [0.375] * 4]  # compute, sending not hidden, latency
    timing.tick(gossiped=False)  # a step without its round (local_steps): compute only, as long as the slowest
    assert timing.now == 3 * 1.125 + 0.5 and timing.rounds == 3
    saved = timing.state_dict()
    again = run_clock("dpsgd", worker_step_seconds=0.5, **NETWORK)[1]
    again.load_state_dict(saved)
    assert again.now == timing.now and again.rounds == 3 and (again.spent == timing.spent).all()


def test_a_run_clock_all_reduces_the_step_s_buffers_among_those_that_sent():
    # worker 3 away sends nothing (Communicator.all_reduce_mean's present): a ring of 3, 16 float32 numbers =
    # 512 bits, 2 * 2 / 3 of them at 1024 bit/s = 2/3 s, and 4 latencies = 0.5 s; worker 3 steps alone
    _, timing = run_clock("all-reduce", worker_step_seconds=0.5, **NETWORK)
    present = np.array([True, True, True, False])
    timing.comm.all_reduce_mean([torch.randn(4, 16)], present=present)
    times = timing.tick()
    assert times.end.tolist() == pytest.approx([0.5 + 0.5 + 2 / 3] * 3 + [0.5], abs=1e-15)
    assert times.sending.tolist() == pytest.approx([2 / 3] * 3 + [0.0], abs=1e-15)


def test_a_run_clock_waits_for_the_lost_messages_of_the_round():
    lossy = faults.apply(faults.FaultSettings(message_loss_probability=0.5), RING4, 3)
    _, timing = run_clock("dpsgd", lossy, message_timeout_s=2.0, **NETWORK)
    method = methods.build("dpsgd", timing.comm, lossy)
    method.step([torch.randn(4, 8)])  # 256-bit messages: in at 0.375 and 0.625 s unless lost
    times = timing.tick()
    neighbours = RING4.diffusion_matrix > 0
    np.fill_diagonal(neighbours, False)
    waits = (lossy.faults.lost(0) & neighbours).any(axis=0)  # [i, j]: i's message to j is lost
    assert 0 < waits.sum() < 4 and times.end.tolist() == [2.0 if waits[j] else 0.625 for j in range(4)]


def test_clock_keys_without_the_clock_are_refused_and_settings_are_checked_for_the_run():
    config = {key: getattr(ClockSettings, key) for key in clock_module.KEYS} | {"simulated_clock": False, "n_workers": 4}
    clock_module.check(config)
    with pytest.raises(ConfigError, match="worker_step_seconds=0.5 sets the simulated clock, which is off: pass "
                                          "simulated_clock=true"):
        clock_module.check(config | {"worker_step_seconds": 0.5})
    clock_module.check(config | {"network_latency_s": 0.5}, read_elsewhere=("network_latency_s",))
    with pytest.raises(ConfigError, match="network_latency_s=0.5 sets the simulated clock"):
        clock_module.check(config | {"network_latency_s": 0.5})
    with pytest.raises(ConfigError, match="worker_speeds has 2 speeds, but the run has 4 workers"):
        clock_module.check(config | {"simulated_clock": True, "worker_speeds": [1, 2]})
    assert isinstance(clock_module.of_run(config, None, RING4, "dpsgd"), clock_module.ClockOff)
    keys = ("num_epochs", "network_latency_s", "network_bandwidth_bits_per_s")
    assert clock_module.may_change_on_resume(keys, config) == keys
    assert clock_module.may_change_on_resume(keys, config | {"simulated_clock": True}) == ("num_epochs",)


def test_a_run_clock_times_each_exchange_on_the_messages_it_held():
    # RelaySum on double binary trees sends over each tree in turn, a tree's share to each of its neighbours
    # there (an edge of both trees carries two messages): with no latency and no compute, each worker's link
    # sends exactly the bits it counted, at 1024 bit/s, whatever its degree in either tree
    trees = topologies.build("double_binary_trees", 8)
    method, timing = run_clock("relay-sum", trees, network_latency_s=0.0, network_bandwidth_bits_per_s=1024.0)
    x = torch.randn(8, 10)
    method.start([x])
    for _ in range(2):
        sent = timing.comm.bytes_sent.copy()
        method.step([x])
        times = timing.tick()
        assert times.sending.tolist() == pytest.approx(((timing.comm.bytes_sent - sent) * 8 / 1024.0).tolist(), rel=1e-12)
    assert len({int(degree) for degree in np.bincount(np.nonzero(trees.diffusion_matrix > 0)[0])}) > 1


def test_a_run_clock_waits_only_for_messages_that_were_sent():
    # Choco under faults: a worker that does not publish this round sends nothing (choco.py); its neighbours
    # do not wait for its message, even where the loss draws would have lost it (a 100 s timeout shows a wait)
    faulty = faults.apply(faults.FaultSettings(offline_probability=0.3, message_loss_probability=0.3), RING4, 5)
    method, timing = run_clock("choco", faulty, message_timeout_s=100.0, **NETWORK)  # its comm logs what is sent
    x = torch.randn(4, 8)
    silent_and_lost = 0
    for round in range(20):
        method.step([x])
        sent = {(int(i), int(j)) for senders, receivers, _ in timing.comm.log for i, j in zip(senders, receivers)}
        lost = faulty.faults.lost(round)
        neighbours = [(i, j) for i in range(4) for j in range(4) if i != j and RING4.diffusion_matrix[j, i] > 0]
        silent_and_lost += sum(bool(lost[i, j]) and (i, j) not in sent for i, j in neighbours)
        alone = clock_module.StepClock(timing.clock.settings, faulty, 4, "choco", seed=0)  # every worker starts at 0
        alone.rounds = round  # the round's loss draws
        times = alone.step(timing.comm.log)
        timing.comm.log = []
        assert {j for j in range(4) if times.end[j] >= 100} == {j for i, j in sent if lost[i, j]}
    assert silent_and_lost > 0  # the case arose
