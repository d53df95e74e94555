"""The communication layer: messages land on the right half-edge, bytes are exact, failures end the job."""
import json
import sys
import time
import types

import pytest
import torch

from powergossip import comm as comm_module
from powergossip import launch, plan
from powergossip import topologies
from tests import exchange_runs
from tests.launch import ROOT, run_mpi


def check_exchange(results: list[dict], topology_name: str, n_workers: int):
    topology = topologies.build(topology_name, n_workers)
    seen = set()
    bytes_sent, messages_sent = {}, {}
    for result in results:
        for h, (i, j) in enumerate(result["half_edges"]):
            seen.add((i, j))
            assert result["per_edge_floats"][h] == [j, i, 7.5]  # the partner (j -> i) produced it
            assert result["per_edge_codes"][h] == [j * 100 + i, -j]
            assert result["per_edge_flags"][h] == [j % 2 == 0]
            assert result["per_worker"][h] == j
        # The local worker whose message each half-edge receives, when every partner is in the process
        local = {i for i, _ in result["half_edges"]}
        all_local = all(j in local for _, j in result["half_edges"])
        expected = [j - min(local) for _, j in result["half_edges"]] if all_local else None
        assert result["senders_in_process"] == expected
        bytes_sent.update({int(k): v for k, v in result["bytes_sent"].items()})
        messages_sent.update({int(k): v for k, v in result["messages_sent"].items()})
    assert seen == {(i, j) for i in range(n_workers) for j in topology.neighbor_ranks(i)}
    for worker in range(n_workers):
        degree = len(topology.neighbor_ranks(worker))
        assert bytes_sent[worker] == degree * (12 + 4 + 1) + degree * 32  # per-edge round + per-worker round
        assert messages_sent[worker] == 2 * degree


@pytest.mark.parametrize("topology_name,n_workers", [("ring", 4), ("ring", 2), ("torus", 8), ("star", 5), ("fully_connected", 4)])
def test_exchange_in_one_process(topology_name, n_workers):
    check_exchange([exchange_runs.run(topology_name, n_workers)], topology_name, n_workers)


EXCHANGE_LAYOUTS = {(4, 4): ["ring"], (2, 4): ["ring", "fully_connected"], (3, 6): ["star"]}  # (processes, workers): graphs


@pytest.fixture(scope="module")
def mpirun_exchanges(tmp_path_factory):
    """One mpirun per layout, exchanging on each of its graphs; the results of `processes`
    processes and `workers` workers are in FOLDER/{processes}x{workers}/GRAPH."""
    folder = tmp_path_factory.mktemp("exchanges")
    for (num_processes, n_workers), topology_names in EXCHANGE_LAYOUTS.items():
        run_mpi(num_processes, ["tests/exchange_runs.py", ",".join(topology_names), str(n_workers),
                                str(folder / f"{num_processes}x{n_workers}")])
    return folder


@pytest.mark.parametrize("num_processes,n_workers,topology_name",
                         [(p, n, name) for (p, n), names in EXCHANGE_LAYOUTS.items() for name in names])
def test_exchange_under_mpirun(mpirun_exchanges, num_processes, n_workers, topology_name):
    folder = mpirun_exchanges / f"{num_processes}x{n_workers}" / topology_name
    results = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(num_processes)]
    check_exchange(results, topology_name, n_workers)


def test_a_failing_process_ends_the_job(tmp_path):
    started = time.monotonic()
    result = run_mpi(3, ["tests/failing_rank.py"], timeout=90, check=False)
    assert result.returncode != 0
    assert time.monotonic() - started < 60
    assert "worker 1 failed on purpose" in result.stderr
    assert "unreachable" not in result.stdout


def test_directed_graph_sends_only_where_listened_to():
    n = 4
    comm = comm_module.Communicator(n, "cpu")
    topology = topologies.build("unidirectional_ring", n)  # worker i listens to i - 1 only
    edges = comm.half_edges(topology)
    received = comm.exchange(topology, [torch.arange(n, dtype=torch.float32).view(n, 1) + 1], per="worker")[0]
    for h, (i, j) in enumerate(zip(edges.self_worker_list, edges.neighbor_list)):
        expected = j + 1 if topology.weight(j, i) > 0 else 0
        assert received[h].item() == expected
    assert (comm.bytes_sent == 4).all() and (comm.messages_sent == 1).all()
    assert comm.senders_in_process(topology) is None  # some half-edges receive nothing: no mixing of own rows


def test_collectives_in_one_process():
    comm = comm_module.Communicator(4, "cpu")
    stack = torch.arange(8, dtype=torch.float32).view(4, 2)
    (mean,) = comm.all_reduce_mean([stack])
    torch.testing.assert_close(mean, torch.tensor([3.0, 4.0]))
    assert (comm.bytes_sent == 8).all()
    comm.broadcast_from_worker0([stack])
    assert torch.equal(stack, torch.tensor([[0.0, 1.0]] * 4))


def test_workers_must_divide_over_processes():
    # In one process every n works; the rule is checked on the arithmetic the processes use.
    with pytest.raises(ValueError, match="n_workers must be >= 1"):
        comm_module.Communicator(0, "cpu")


def test_n_workers_not_divisible_under_mpirun_is_a_clear_error():
    result = run_mpi(2, ["-c", "from powergossip import comm; comm.Communicator(3, 'cpu')"], check=False, timeout=60)
    assert result.returncode != 0
    assert "not divisible by the number of processes (2)" in result.stderr


def test_environment_mpi_test_passes_under_mpirun():
    result = run_mpi(4, ["environment/mpi_test.py"], timeout=90)
    assert "mpi_test: 4 processes, checks on cpu: all passed" in result.stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("launcher", ["project flags", "plain mpirun"])
def test_single_host_run_listens_on_loopback_only(launcher):
    from tests import listening_sockets  # Linux only

    if launcher == "project flags":
        result = run_mpi(2, ["tests/listening_sockets.py"], timeout=120)
    else:  # as a user types it: mpirun -np 2 python script.py
        import subprocess
        mpirun = launch.mpirun_command(2)[0]
        env = launch.mpirun_environment()
        result = subprocess.run([mpirun, "--oversubscribe", "-np", "2", sys.executable, "tests/listening_sockets.py"],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert sorted(report["rank"] for report in reports) == [0, 1]
    for report in reports:
        exposed = [(address, port) for address, port in report["listening"] if not listening_sockets.is_loopback(address)]
        assert not exposed, f"rank {report['rank']} listens beyond loopback: {exposed}"
        if report["external"]:  # the machine has another address: nothing answers there
            assert set(report["probes"].values()) <= {"refused"}, f"rank {report['rank']}: {report['probes']}"


def test_store_folders_of_jobs_that_were_killed_are_removed():
    import os
    import shutil
    import subprocess
    import tempfile

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, timeout=60)
    dead_pid = int(finished.stdout)  # a job killed through mpirun leaves its folder behind
    stale = tempfile.mkdtemp(prefix=f"powergossip-store-{dead_pid}-")
    living = tempfile.mkdtemp(prefix=f"powergossip-store-{os.getpid()}-")  # a job still running keeps its folder
    try:
        fresh = launch._private_folder()
        assert not os.path.exists(stale) and os.path.isdir(living) and os.path.isdir(fresh)
        assert os.stat(fresh).st_mode & 0o777 == 0o700
    finally:
        for folder in (stale, living, fresh):
            shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("method", ["dpsgd", "power-gossip", "choco"])
def test_a_layout_mistake_says_what_was_expected_and_how_to_launch(method):
    from powergossip import algorithms

    comm = comm_module.Communicator(4, "cpu")  # one process hosting 4 workers
    gossip = algorithms.build(method, comm, topologies.build("ring", 4))
    one_worker_stacks = [torch.zeros(1, 3, 5)]  # stacked as if this process hosted one worker
    with pytest.raises(ValueError, match=r"stacked over 1 workers, but this process hosts 4 of the 4 workers "
                                         r"\(0..3\).*\[4, \*shape\].*mpirun -np 4"):
        gossip.step(one_worker_stacks)


@pytest.mark.parametrize("name, n, round", [("ring", 8, 0), ("star", 6, 0), ("one_peer_exponential", 8, 1),
                                            ("random_matching", 8, 3), ("unidirectional_ring", 6, 0)])
def test_routes_of_every_process_pair_each_half_edge_with_its_partner(name, n, round):
    """The array-built plan against the definition, for every process of every layout: a local partner's
    row is found, and a peer process gets the half-edges it listens on, ordered as it orders its own."""
    graph = topologies.build(name, n).at(round)
    W = graph.diffusion_matrix
    for processes in [p for p in (1, 2, n // 2, n) if n % p == 0]:
        for rank in range(processes):
            L = n // processes
            stand_in = types.SimpleNamespace(device=torch.device("cpu"), n_workers=n, first_worker=rank * L, num_local=L)
            edges = plan.HalfEdges(graph, rank * L, L, stand_in.device)
            routes = comm_module._Routes(edges, stand_in)
            pairs = edges.pairs
            assert pairs == [(i, j) for i in range(rank * L, rank * L + L) for j in graph.neighbor_ranks(i)]
            local = [(h, pairs.index((j, i))) for h, (i, j) in enumerate(pairs) if j // L == rank and W[i, j] > 0]
            assert list(zip(routes.local_targets.tolist(), routes.local_sources.tolist())) == local
            assert routes.local_source_workers.tolist() == [pairs[h][1] - rank * L for h, _ in local]
            assert routes.sending_worker.tolist() == [i - rank * L for i, j in pairs if W[j, i] > 0]
            for peer in range(processes):
                sends = sorted((j, i, h) for h, (i, j) in enumerate(pairs) if j // L == peer and W[j, i] > 0)
                receives = [h for h, (i, j) in enumerate(pairs) if j // L == peer and W[i, j] > 0]
                if peer == rank or not any(j // L == peer for _, j in pairs):
                    assert peer not in routes.peers
                    continue
                assert routes.peers[peer][0].tolist() == [h for _, _, h in sends]
                assert routes.peers[peer][1].tolist() == receives


def test_launch_and_plan_stand_below_the_exchange():
    """launch.py and plan.py import no module of the package that moves messages; comm.py still
    answers to the launch helpers' older spellings (comm.init_distributed, comm.mpirun_command, ...)."""
    import subprocess

    code = ("import sys; import powergossip.launch, powergossip.plan; "
            "print(sorted(m for m in sys.modules if m.startswith('powergossip.')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["['powergossip.launch',", "'powergossip.plan']"]
    for name in ("init_distributed", "mpirun_command", "mpirun_environment", "launched_by_mpirun"):
        assert getattr(comm_module, name) is getattr(launch, name)
    assert comm_module.Communicator(4, "cpu").half_edges(topologies.build("ring", 4)).__class__ is plan.HalfEdges
