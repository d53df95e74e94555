"""Run a gossip algorithm on known data and save what every local worker ends with.

Used by the tests in one process (`run(...)`) and under mpirun
(`python tests/algorithm_runs.py SPECS TOPOLOGIES N_WORKERS STEPS OUT_DIR`, comma-separated
lists): each process writes `OUT_DIR/SPEC-TOPOLOGY/rank{r}.pt` with its local workers' final parameters and
byte counts, so the test can stitch all workers together and compare.
"""
import os
import sys

import networkx
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from powergossip import algorithms  # noqa: E402
from powergossip import comm as comm_module  # noqa: E402
from powergossip import launch  # noqa: E402
from powergossip import compressors  # noqa: E402
from powergossip import topologies  # noqa: E402

SPECS = {
    "simple": lambda c, t: algorithms.SimpleGossip(c, t, diffusion_rate=0.9),
    "all_reduce": lambda c, t: algorithms.AllReduce(c, t),
    "power": lambda c, t: algorithms.PowerGossip(c, t, rank=2, num_iterations=2, diffusion_rate=1.0, seed=3),
    "power_random_signs": lambda c, t: algorithms.PowerGossip(c, t, rank=1, warm_start=False, round_weights=True, seed=3),
    "choco_sign": lambda c, t: algorithms.ChocoGossip(c, t, compressors.SignAndNorm(), diffusion_rate=0.4),
    "choco_top_k": lambda c, t: algorithms.ChocoGossip(c, t, compressors.TopK(keep_ratio=0.3), diffusion_rate=0.3),
    "choco_random_k": lambda c, t: algorithms.ChocoGossip(c, t, compressors.RandomK(keep_ratio=0.3), diffusion_rate=0.3, seed=5),
    "choco_svd": lambda c, t: algorithms.ChocoGossip(c, t, compressors.SVD(rank=1), diffusion_rate=0.4),
    "choco_qsgd": lambda c, t: algorithms.ChocoGossip(c, t, compressors.QSGD(levels=4), diffusion_rate=0.4, seed=5),
    "deep_squeeze_sign": lambda c, t: algorithms.DeepSqueezeGossip(c, t, compressors.SignAndNorm(), diffusion_rate=0.2),
    "moniqua": lambda c, t: algorithms.MoniquaGossip(c, t, theta=4.0, diffusion_rate=0.3, seed=5),
    "power_afresh": lambda c, t: algorithms.PowerGossip(c, t, rank=1, edge_memory=0, seed=3),
    "push_sum": lambda c, t: algorithms.PushSum(c, t, diffusion_rate=0.8),
    "push_sum_delayed": lambda c, t: algorithms.PushSum(c, t, diffusion_rate=0.8, one_step_delay=True),
    "relay_sum": lambda c, t: algorithms.RelaySum(c, t),
    "d2": lambda c, t: algorithms.D2(c, t, diffusion_rate=0.5),
    "gradient_tracking": lambda c, t: algorithms.GradientTracking(c, t),
}
# Methods that correct for the workers' different data: run with a local step first,
# x <- x - LEARNING_RATE (x - b_i) (the gradient of |x - b_i|^2 / 2, b_i each worker's own).
LOCAL_STEP_FIRST = ("relay_sum", "d2", "gradient_tracking")
LEARNING_RATE = 0.1


def graph(name: str, n_workers: int):
    """topologies.build's names, and `chorded_ring`: a directed ring i -> i + 1 with chords
    i -> i + 3 from every even worker, push-sum weights (column-stochastic, not doubly)."""
    if name == "chorded_ring":
        edges = [(i, (i + 1) % n_workers) for i in range(n_workers)] + [(i, (i + 3) % n_workers) for i in range(0, n_workers, 2)]
        return topologies.from_digraph(networkx.DiGraph(edges), name=f"{n_workers}-chorded-ring")
    return topologies.build(name, n_workers)


def accepts(spec: str, graph_name: str, n_workers: int) -> bool:
    """Whether method `spec` takes the graph (its constructor's check)."""
    try:
        SPECS[spec](comm_module.Communicator(n_workers, "cpu"), graph(graph_name, n_workers))
    except ValueError:
        return False
    return True


def initial_state(spec: str, n_workers: int) -> list[torch.Tensor]:
    """The same global starting point in every layout: one matrix for PowerGossip
    (its dense reference is per matrix), several shapes for everything else."""
    generator = torch.Generator().manual_seed(1234)
    if spec.startswith("power"):
        return [torch.randn(n_workers, 6, 5, generator=generator)]
    return [torch.randn(n_workers, 6, 5, generator=generator), torch.randn(n_workers, 4, generator=generator),
            torch.randn(n_workers, 3, 2, 2, generator=generator)]


def targets(spec: str, n_workers: int) -> list[torch.Tensor]:
    """b_i of the local step of the LOCAL_STEP_FIRST methods: shaped as initial_state."""
    generator = torch.Generator().manual_seed(99)
    return [torch.randn(x.shape, generator=generator) for x in initial_state(spec, n_workers)]


def run(spec: str, topology_name: str, n_workers: int, steps: int):
    comm = comm_module.Communicator(n_workers, "cpu")
    algorithm = SPECS[spec](comm, graph(topology_name, n_workers))
    local = slice(comm.first_worker, comm.first_worker + comm.num_local)
    params = [x[local].clone() for x in initial_state(spec, n_workers)]
    aims = [b[local] for b in targets(spec, n_workers)]
    algorithm.start(params)  # x^0, before the first local step (as step.TrainingStep does)
    for _ in range(steps):
        if spec in LOCAL_STEP_FIRST:
            for x, b in zip(params, aims):
                x.sub_(LEARNING_RATE * (x - b))
        algorithm.step(params)
    return {"first_worker": comm.first_worker, "params": params,
            "bytes_sent": torch.from_numpy(comm.bytes_sent.copy()), "messages_sent": torch.from_numpy(comm.messages_sent.copy())}


if __name__ == "__main__":
    specs, topology_names, n_workers, steps, out_dir = sys.argv[1:6]
    rank = launch.init_distributed("cpu").rank
    for spec in specs.split(","):
        for topology_name in topology_names.split(","):
            if not accepts(spec, topology_name, int(n_workers)):
                continue  # a graph the method refuses (the test lists the pairs it expects)
            result = run(spec, topology_name, int(n_workers), int(steps))
            folder = os.path.join(out_dir, f"{spec}-{topology_name}")
            os.makedirs(folder, exist_ok=True)
            torch.save(result, os.path.join(folder, f"rank{rank}.pt"))
