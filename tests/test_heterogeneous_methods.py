"""RelaySum, D² and gradient tracking: exact on heterogeneous data where D-PSGD is biased,
their bytes, their refusals before any work, and their state across a checkpoint. (Their
dense references are in test_algorithms.py.)"""
import pytest
import torch

from powergossip import algorithms, methods, topologies
from powergossip import comm as comm_module
from tests import algorithm_runs, least_squares_runs
from tests.launch import run_mpi

EXACT = [("d2", "ring"), ("gradient-tracking", "ring"), ("relay-sum", "chain"), ("relay-sum", "double_binary_trees")]


def relative_errors(x: torch.Tensor) -> torch.Tensor:
    """Each worker's |x_i - x*| / |x*| (x `[n, DIM]`)."""
    minimiser = least_squares_runs.minimiser()
    return (x - minimiser).norm(dim=-1) / minimiser.norm()


@pytest.mark.parametrize("method,topology", EXACT)
def test_reaches_the_minimiser_of_heterogeneous_least_squares(method, topology):
    assert relative_errors(least_squares_runs.stacked(method, topology)).max() < 1e-6


@pytest.mark.parametrize("topology", ["ring", "chain"])
def test_dpsgd_keeps_a_bias_on_the_same_problem(topology):
    assert relative_errors(least_squares_runs.stacked("dpsgd", topology)).min() > 0.1


def test_drop_in_optimizer_under_mpirun_reaches_the_minimiser(tmp_path):
    runs = [f"{method},{topology}" for method, topology in EXACT[:3]]  # one launch (mpirun's start is most of its time)
    run_mpi(least_squares_runs.N_WORKERS, ["tests/least_squares_runs.py", str(tmp_path)] + runs, timeout=300)
    for run in runs:
        method, topology = run.split(",")
        x = torch.stack([torch.load(tmp_path / f"{method}-{topology}" / f"rank{r}.pt")
                         for r in range(least_squares_runs.N_WORKERS)])
        torch.testing.assert_close(x, least_squares_runs.stacked(method, topology), rtol=1e-9, atol=1e-12)
        assert relative_errors(x).max() < 1e-6, run


def bytes_of_one_step(method, topology, params, n=5):
    comm = comm_module.Communicator(n, "cpu")
    methods.build(method, comm, topologies.build(topology, n), **({"diffusion_rate": 0.5} if method == "d2" else {})).step(params)
    return comm.bytes_sent


def test_bytes():
    n = 5
    params = lambda: [torch.randn(n, 6, 5), torch.randn(n, 3)]  # 33 entries: 17 even, 16 odd
    degrees = lambda tree: torch.tensor([len(tree.neighbors(i)) for i in range(n)]).numpy()
    chain = topologies.build("chain", n)
    assert (bytes_of_one_step("relay-sum", "chain", params()) == degrees(chain) * (33 * 4 + 4)).all()
    first, second = topologies.build("double_binary_trees", n).trees
    expected = degrees(first) * ((15 + 2) * 4 + 4) + degrees(second) * ((15 + 1) * 4 + 4)  # a share and an int32 per tree
    assert (bytes_of_one_step("relay-sum", "double_binary_trees", params()) == expected).all()
    assert (bytes_of_one_step("d2", "ring", params()) == 2 * 33 * 4).all()  # one vector per edge
    assert (bytes_of_one_step("gradient-tracking", "ring", params()) == 2 * 2 * 33 * 4).all()  # two per edge


@pytest.mark.parametrize("method,topology,settings,message", [
    ("relay-sum", "ring", {}, "RelaySum needs a fixed spanning tree.*8-ring has 8 edges, not n - 1 = 7.*chain, binary_tree"),
    ("relay-sum", "one_peer_hypercube", {}, "RelaySum needs a fixed spanning tree.*changes from round to round"),
    ("d2", "one_peer_hypercube", {"diffusion_rate": 0.5}, "D2 needs a symmetric topology that stays the same every round"),
    ("d2", "ring", {}, "diffusion_rate must leave the mixing matrix's smallest eigenvalue above -1/3.*-0.333333; set it to 0.5"),
    ("d2", "torus", {}, "smallest eigenvalue above -1/3"),
    ("gradient-tracking", "chorded_ring", {}, "GradientTracking needs a doubly stochastic topology"),
    ("dpsgd", "double_binary_trees", {}, "is two trees \\(two graphs\\), not one mixing matrix"),
    ("gradient-tracking", "double_binary_trees", {}, "is two trees"),
])
def test_refused_before_any_work(method, topology, settings, message):
    with pytest.raises(ValueError, match=message):
        methods.check(method, algorithm_runs.graph(topology, 8), **settings)


def test_accepted_where_they_apply():
    for method, topology, settings in [("d2", "ring", {"diffusion_rate": 0.5}), ("d2", "chain", {}), ("relay-sum", "star", {}),
                                       ("relay-sum", "binary_tree", {}), ("gradient-tracking", "one_peer_exponential", {})]:
        methods.check(method, topologies.build(topology, 8), **settings)


@pytest.mark.parametrize("spec,topology", [("relay_sum", "double_binary_trees"), ("d2", "ring"), ("gradient_tracking", "ring")])
def test_state_dict_resumes_exactly(spec, topology):
    """Saved after 3 steps (with local steps toward each worker's own target), loaded into a new
    method: the next 4 steps are bit for bit those of the run that went on."""
    n = 6
    comm = comm_module.Communicator(n, "cpu")
    graph = topologies.build(topology, n)
    targets = algorithm_runs.targets(spec, n)

    def advance(method, params, steps):
        for _ in range(steps):
            for x, b in zip(params, targets):
                x.sub_(algorithm_runs.LEARNING_RATE * (x - b))
            method.step(params)

    params = algorithm_runs.initial_state(spec, n)
    uninterrupted = algorithm_runs.SPECS[spec](comm, graph)
    uninterrupted.start(params)
    advance(uninterrupted, params, 3)
    saved_params, saved_state = [x.clone() for x in params], uninterrupted.state_dict()
    advance(uninterrupted, params, 4)
    resumed = algorithm_runs.SPECS[spec](comm, graph)
    resumed.load_state_dict(saved_state)
    resumed.start([x * 0 for x in saved_params])  # a loaded state is kept (TrainingStep calls start at its first step)
    advance(resumed, saved_params, 4)
    assert all(torch.equal(got, want) for got, want in zip(saved_params, params))


def test_float64_parameters_mix_with_float64_weights():
    """W's weights reach float64 parameters unrounded (a float32 1/3 would break D²'s exactness)."""
    comm = comm_module.Communicator(5, "cpu")
    x = torch.eye(5, dtype=torch.float64)
    algorithms.SimpleGossip(comm, topologies.build("ring", 5)).step([x])
    assert (x - torch.tensor(topologies.build("ring", 5).diffusion_matrix)).abs().max() < 1e-15  # float32: 1e-8
