"""Asynchronous methods on the simulated clock (powergossip/asynchronous.py): AD-PSGD's events,
its pairwise averages, and its runs in gossip_run.py and train.py."""
import json

import numpy as np
import pytest
import torch

from powergossip import asynchronous, methods, runs, topologies
from powergossip import comm as comm_module
from powergossip.asynchronous import EventClock
from powergossip.clock import ClockSettings
from powergossip.errors import ConfigError
import gossip_run
from tests.test_train import common, tiny_data  # noqa: F401 (a fixture)
from tests.launch import run_mpi
from tests.train_runs import run, stopped_and_resumed

NO_NETWORK = dict(network_latency_s=0.0, network_bandwidth_bits_per_s=float("inf"))


def events(topology, seed=0, bits=256.0, **settings):
    return EventClock(ClockSettings(**settings), topology, seed, bits)


def finishes(clock, count):
    """The next `count` gradient ends, (time, worker, partner, index) each."""
    ends = []
    while len(ends) < count:
        event = clock.next()
        if not event.starts:
            ends.append((event.time, event.worker, event.partner, event.index))
    return ends


def test_one_worker_4_times_slower_on_a_16_ring_does_not_slow_the_others():
    # worker 0 takes 1 s a gradient, the others 0.25 s; no network cost: nobody waits for anybody
    clock = events(topologies.build("ring", 16), worker_step_seconds=0.25, worker_speeds=[0.25] + [1.0] * 15, **NO_NETWORK)
    ends = finishes(clock, 16 * 61)
    times = {worker: [t for t, w, _, _ in ends if w == worker] for worker in range(16)}
    assert times[0] == [1.0 * k for k in range(1, len(times[0]) + 1)]
    for worker in range(1, 16):  # each of the others: a gradient every 0.25 s, its own compute time
        assert times[worker] == [0.25 * k for k in range(1, len(times[worker]) + 1)]
    per_gradient = [clock.now / len(times[worker]) for worker in range(1, 16)]
    assert np.mean(per_gradient) == pytest.approx(0.25, rel=0.02) and len(times[1]) == 4 * len(times[0])
    assert all(abs(p) == 1 or abs(p) == 15 for _, w, partner, _ in ends for p in [partner - w])  # ring neighbours
    assert clock.spent[0].tolist() == [1.0 * len(times[0])] + [0.25 * len(times[w]) for w in range(1, 16)]
    assert (clock.spent[1:] == 0).all()


def test_the_initiator_waits_for_the_exchange_and_stragglers_are_keyed_by_its_own_gradients():
    # 4-ring, 1024-bit models over 1024 bit/s plus 0.5 s of latency: 1.5 s after each gradient of 1 s
    clock = events(topologies.build("ring", 4), bits=1024.0, worker_step_seconds=1.0, network_latency_s=0.5,
                   network_bandwidth_bits_per_s=1024.0)
    ends = finishes(clock, 8)
    assert [t for t, *_ in ends] == [1.0] * 4 + [3.5] * 4 and [w for _, w, _, _ in ends] == [0, 1, 2, 3] * 2
    assert clock.spent.tolist() == [[2.0] * 4, [2.0] * 4, [1.0] * 4]  # 2 gradients and 2 exchanges each, the 3rd started
    stragglers = events(topologies.build("ring", 4), worker_step_seconds=1.0, straggler_probability=0.5,
                        straggler_slowdown=4.0, **NO_NETWORK)
    drawn = [[stragglers.clock.straggling(k)[w] for k in range(6)] for w in range(4)]  # the synchronous clock's keys
    assert [[stragglers.compute_seconds(w, k) for k in range(6)] for w in range(4)] == \
        [[4.0 if d else 1.0 for d in row] for row in drawn]


def test_the_same_configuration_gives_the_same_events_and_a_saved_queue_goes_on_alike():
    settings = dict(worker_step_seconds=0.5, worker_speeds=list(np.linspace(0.5, 2, 16)), straggler_probability=0.3,
                    network_latency_s=0.01, network_bandwidth_bits_per_s=5e4)
    torus = topologies.build("torus", 16)
    first, second = events(torus, seed=4, **settings), events(torus, seed=4, **settings)
    order = [first.next() for _ in range(500)]
    assert order == [second.next() for _ in range(500)]
    assert order != [events(torus, seed=5, **settings).next() for _ in range(500)]
    assert [e.time for e in order] == sorted(e.time for e in order)
    saved = first.state_dict()
    resumed = events(torus, seed=4, **settings)
    resumed.load_state_dict(json.loads(json.dumps(saved)))
    assert [first.next() for _ in range(200)] == [resumed.next() for _ in range(200)]


def test_a_graph_over_time_follows_each_workers_own_gradient_count():
    # 16 equal workers on a one-peer hypercube: the k-th gradients all end together, and each pairs
    # across dimension k mod 4, as round k of a synchronous run (indexed by the event number, each
    # worker kept one dimension forever: four groups that never mixed)
    clock = events(topologies.build("one_peer_hypercube", 16), worker_step_seconds=1.0, **NO_NETWORK)
    ends = finishes(clock, 16 * 8)
    for k in range(8):
        assert [(w, p) for _, w, p, _ in ends[16 * k:16 * (k + 1)]] == [(w, w ^ 2 ** (k % 4)) for w in range(16)]
    faster = events(topologies.build("one_peer_hypercube", 16), worker_step_seconds=1.0,
                    worker_speeds=[1.0] * 8 + [2.0] * 8, **NO_NETWORK)
    counts = np.zeros(16, dtype=int)
    for _, worker, partner, _ in finishes(faster, 200):  # each worker's k-th partner: across dimension k mod 4
        assert partner == worker ^ 2 ** (counts[worker] % 4)
        counts[worker] += 1


def test_pairwise_averages_keep_the_mean_and_reach_it():
    ring = topologies.build("ring", 8)
    comm = comm_module.Communicator(8, "cpu")
    method = methods.build("ad-psgd", comm, ring)
    x = torch.randn(8, 5, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    mean = x.mean(dim=0)
    start = (x - mean).pow(2).sum()
    clock = events(ring, worker_step_seconds=1.0, **NO_NETWORK)  # equal speeds: a round's ends tie, taken by worker
    for _, worker, partner, _ in finishes(clock, 400):
        before = x.clone()
        method.pair([x], worker, partner)
        assert torch.equal(x[worker], x[partner]) and torch.equal(x[worker], (before[worker] + before[partner]) / 2)
        torch.testing.assert_close(x.mean(dim=0), mean, rtol=0, atol=1e-12)
    assert (x - mean).pow(2).sum() < 1e-12 * start
    assert comm.bytes_sent.sum() == 2 * 400 * 15 * 8 and comm.messages_sent.sum() == 2 * 400  # one model each way
    with pytest.raises(RuntimeError, match="ad-psgd is asynchronous: it has no rounds"):
        method.step([x])


def test_gossip_run_reaches_the_workers_mean_with_ad_psgd(tmp_path):
    gossip_run.config = gossip_run.DEFAULTS | dict(algorithm="ad-psgd", n_workers=8, matrix_size=4, num_steps=60,
                                                   simulated_clock=True, worker_step_seconds=0.01, seed=2)
    gossip_run.output_dir = str(tmp_path / "consensus")
    gossip_run.main()
    records = runs.read_metrics(gossip_run.output_dir)
    error = [r for r in records if r["name"] == "error"]
    to_initial = [r for r in records if r["name"] == "error_to_initial_mean"]
    assert error[-1]["value"] < 1e-8 * error[0]["value"] and to_initial[-1]["value"] < 1e-8 * error[0]["value"]
    assert error[-1]["messages"] == 2 * 60 and error[-1]["simulated_time_s"] > 0  # a step: n_workers events
    gossip_run.config = dict(gossip_run.DEFAULTS)


def overrides(tiny_data, **extra):
    return common(tiny_data, **({"optimizer": "ad-psgd", "simulated_clock": True, "worker_step_seconds": 0.01,
                                 "worker_speeds": [1, 0.5, 1, 2], "straggler_probability": 0.2,
                                 "network_bandwidth_bits_per_s": 1e8} | extra))


def test_train_runs_ad_psgd_on_events_the_same_every_time(tmp_path, tiny_data):
    for name in ("first", "again"):
        run(str(tmp_path / name), overrides(tiny_data))
    first, again = ([r for r in runs.read_metrics(str(tmp_path / name)) if r["tags"].get("split") != "runtime"]
                    for name in ("first", "again"))
    assert first == again
    loss = [r for r in first if r["name"] == "loss" and r["tags"] == {"split": "train"}]
    assert len(loss) == 2 and all(np.isfinite(r["value"]) for r in loss)
    # an epoch: 4 workers x 4 batches = 16 gradients, each with one model message each way: 8 per worker
    assert [r["messages"] for r in loss] == [8.0, 16.0] and loss[1]["simulated_time_s"] > loss[0]["simulated_time_s"] > 0


def test_a_worker_that_ends_no_gradient_in_an_epoch_or_has_no_neighbour_does_not_stop_the_run(tmp_path, tiny_data):
    # worker 0 at 1/500 of the others' speed ends no gradient in the first epoch (16 gradients, 5 s per gradient
    # against 0.01 s): it has no train record then, and the mean is over the three that trained; on a random
    # matching of 5 workers one is alone in each round and applies its gradient without an average
    run(str(tmp_path / "slow"), overrides(tiny_data, worker_speeds=[0.002, 1, 1, 1], straggler_probability=0.0))
    records = runs.read_metrics(str(tmp_path / "slow"))
    first = [r for r in records if r["name"] == "loss" and r["tags"].get("split") == "train" and r["epoch"] == 1.0]
    assert sorted(r["tags"].get("worker", -1) for r in first) == [-1, 1, 2, 3]
    mean = next(r["value"] for r in first if "worker" not in r["tags"])
    assert mean == pytest.approx(np.mean([r["value"] for r in first if "worker" in r["tags"]]), rel=1e-12)
    run(str(tmp_path / "alone"), overrides(tiny_data, n_workers=5, topology="random_matching", worker_speeds=None,
                                           batch_size=8))
    with open(tmp_path / "alone" / "summary.json") as f:
        assert json.load(f)["epochs"] == 2
    sent = [r["messages"] for r in runs.read_metrics(str(tmp_path / "alone")) if r["name"] == "loss" and r["tags"] == {"split": "train"}]
    assert sent[-1] < 2 * 4 * 5 * 2 / 5  # fewer than one message each way per gradient: some stepped alone


def test_a_gradient_is_taken_at_the_model_read_at_its_start_and_applied_after_the_average(tmp_path, tiny_data, monkeypatch):
    """AD-PSGD's staleness (Lian et al. 2018, Algorithm 1): worker i's gradient is computed at the
    model it read when it started, and applied at its end, after its average with the partner;
    meanwhile neighbours' events may have averaged into x_i, so the model it steps from is not the
    one its gradient saw."""
    from powergossip.methods.ad_psgd import ADPSGD
    from powergossip.models.stacked import StackedReplicas
    started, ended = {}, []
    take_gradient, average = StackedReplicas.gradient_of, ADPSGD.pair

    def gradient_of(self, row, x, y):
        result = take_gradient(self, row, x, y)
        started[row] = (torch.cat([p[row].flatten() for p in self.params]).clone(),
                        torch.cat([g[row].flatten() for g in self.grads]).clone())
        started["workers"] = self
        return result

    def pair(self, params, worker, partner):
        held = torch.cat([g[worker].flatten() for g in started["workers"].grads])  # the gradient the step will apply
        ended.append((torch.cat([p[worker].flatten() for p in params]).clone(), started[worker], held.clone()))
        return average(self, params, worker, partner)

    monkeypatch.setattr(StackedReplicas, "gradient_of", gradient_of)
    monkeypatch.setattr(ADPSGD, "pair", pair)
    run(str(tmp_path / "run"), overrides(tiny_data, worker_speeds=[1, 0.5, 1, 2], straggler_probability=0.0))
    assert len(ended) == 2 * 16
    stale = 0
    for model_at_end, (model_at_start, gradient), held in ended:
        assert torch.equal(held, gradient)  # the start's gradient, not one taken again at the end
        stale += not torch.equal(model_at_end, model_at_start)  # a neighbour's event averaged into x_i meanwhile
    assert 0 < stale < len(ended)  # some gradients are stale, not all (taken after the average, all would differ)


def test_an_asynchronous_run_stopped_mid_epoch_resumes_with_the_uninterrupted_records(tmp_path, tiny_data, monkeypatch):
    """The event queue, the gradients under way (computed at the models their workers read),
    their losses and every worker's data position go into the checkpoint."""
    settings = overrides(tiny_data, network_latency_s=0.002, momentum=0.9)
    run(str(tmp_path / "full"), settings)
    stopped_and_resumed(str(tmp_path / "parts"), settings, monkeypatch)  # inside the second epoch
    full, parts = ([r for r in runs.read_metrics(str(tmp_path / name)) if r["tags"].get("split") != "runtime"]
                   for name in ("full", "parts"))
    assert parts == full and full[-1]["simulated_time_s"] > 0


@pytest.mark.parametrize("extra, message", [
    ({"simulated_clock": False, "worker_step_seconds": 0.0, "worker_speeds": None, "straggler_probability": 0.0,
      "network_bandwidth_bits_per_s": 1e9}, "ad-psgd is asynchronous: .* pass simulated_clock=true and worker_step_seconds > 0"),
    ({"worker_step_seconds": 0.0}, "worker_step_seconds > 0"),
    ({"link_failure_probability": 0.1}, "link_failure_probability=0.1: ad-psgd is asynchronous and takes no faults"),
    ({"local_steps": 2}, "local_steps=2 with optimizer=ad-psgd"),
    ({"momentum_type": "quasi-global"}, "momentum_type='quasi-global' with optimizer=ad-psgd"),
])
def test_what_an_asynchronous_run_cannot_do_is_refused_before_any_work(tmp_path, tiny_data, extra, message):
    with pytest.raises(ConfigError, match=message):
        run(str(tmp_path / "refused"), overrides(tiny_data, **extra))
    assert not (tmp_path / "refused").exists()


def test_ad_psgd_is_stacked_only_and_no_drop_in_optimizer():
    config = {"optimizer": "ad-psgd", "simulated_clock": True, "worker_step_seconds": 0.1, "link_failure_probability": 0.0,
              "offline_probability": 0.0, "churn": None, "message_loss_probability": 0.0}
    asynchronous.check(config, world_size=1)
    with pytest.raises(ConfigError, match="under mpirun with 2 processes .* run `python train.py n_workers=N"):
        asynchronous.check(config, world_size=2)
    assert asynchronous.is_asynchronous("ad-psgd") and not asynchronous.is_asynchronous("dpsgd")
    import powergossip

    with pytest.raises(ValueError, match="method ad-psgd is asynchronous"):
        powergossip.DecentralizedOptimizer(torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1),
                                           torch.nn.Linear(2, 2), algorithm="ad-psgd")


def test_under_mpirun_with_two_processes_ad_psgd_is_refused_before_any_work(tmp_path, tiny_data):
    result = run_mpi(2, ["train.py", *overrides(tiny_data), f"output_dir={tmp_path / 'run'}"], check=False)
    assert result.returncode != 0 and "under mpirun with 2 processes" in result.stdout + result.stderr
    assert not (tmp_path / "run").exists()


def test_a_workers_own_batches_are_its_rows_of_the_synchronous_epochs():
    from powergossip import data

    dataset = data.load("synthetic", num_train=96, num_test=8, image_size=8, seed=1)
    partition = data.make_partition("iid", dataset.train_y, 4, seed=2)
    loader = data.WorkerLoader(dataset, partition, batch_size=6, first_worker=1, num_local_workers=3, seed=2, augment=True)
    for pass_ in (0, 3, 1):
        for step, (x, y) in enumerate(loader.epoch_batches(pass_)):
            for worker in (1, 3):
                mine = loader.worker_batch(worker, pass_, step)
                assert torch.equal(mine[0], x[worker - 1]) and torch.equal(mine[1], y[worker - 1])
    with pytest.raises(ValueError, match="not a local worker's batch"):
        loader.worker_batch(0, 0, 0)
