"""PowerSGD (Vogels, Karimireddy, Jaggi 2019): the algorithm against a dense reference, its
bytes against a formula from parameter shapes, train.py in one process and under mpirun,
the reference implementation's interface, and a comparison with PyTorch's powerSGD_hook."""
import json
import math
import statistics

import pytest
import torch

from powergossip import algorithms, models, topologies
from powergossip import comm as comm_module
from tests import dense_reference, powersgd_runs
from tests.launch import run_mpi

SHAPES = [(6, 5), (6, 5), (8, 3, 2, 2), (7,), (3, 2), (16, 12)]  # two same-shape matrices are batched together


def sent_as_factors(shape, rank, rate=2.0):
    """PowerSGD's rule, written from the shape: an m x n matrix (m = shape[0]) goes as rank-r
    factors when m n >= rate (m + n) r, r = min(rank, m, n); vectors always go whole."""
    rows, columns = shape[0], math.prod(shape) // shape[0]
    return len(shape) > 1 and rows * columns >= rate * (rows + columns) * min(rank, rows, columns)


def build(n, **hyper):
    return algorithms.build("powersgd", comm_module.Communicator(n, "cpu"), topologies.build("ring", n), **hyper)


# float64: the orthogonalization's guard against zero columns (norm + 1e-8) scales the update by
# about 1 - 2e-8 / |P's column|, so 1e-6 of the average; float32: its rounding, well under 1e-5.
@pytest.mark.parametrize("dtype,tolerance", [(torch.float64, 1e-6), (torch.float32, 1e-5)])
@pytest.mark.parametrize("rank,num_iterations,start", [(1, 1, 0), (2, 2, 2), (3, 1, 1)])
def test_matches_the_dense_reference(dtype, tolerance, rank, num_iterations, start):
    n, steps = 4, 5
    generator = torch.Generator().manual_seed(rank * 10 + num_iterations)
    gradient_steps = [[torch.randn((n,) + shape, generator=generator, dtype=torch.float64) for shape in SHAPES]
                      for _ in range(steps)]
    method = build(n, rank=rank, num_iterations=num_iterations, start_compressing_after_num_steps=start)
    # A fixed Q: the reference's Q for each matrix worth compressing, put in through load_state_dict.
    compressed = [k for k, shape in enumerate(SHAPES) if sent_as_factors(shape, rank)]
    assert 0 < len(compressed) < len(SHAPES)  # both kinds are exercised
    q0 = {k: torch.randn(math.prod(SHAPES[k][1:]), min(rank, SHAPES[k][0], math.prod(SHAPES[k][1:])), generator=generator,
                         dtype=torch.float64) for k in compressed}
    groups = {}
    for k in compressed:
        groups.setdefault(SHAPES[k], []).append(k)
    state = {"round": 0, "generator": method.generator.get_state(),
             "q": [torch.stack([q0[k] for k in indices]) for indices in groups.values()],
             "memory": [torch.zeros((n,) + shape, dtype=dtype) for shape in SHAPES]}
    method.load_state_dict(state)
    expected = dense_reference.powersgd(gradient_steps, q0, num_iterations, start)
    for grads, reference in zip(gradient_steps, expected):
        stacks = [g.to(dtype) for g in grads]
        method.step(stacks)
        for stack, want in zip(stacks, reference):
            scale = want.norm()
            for worker in range(n):  # every worker steps with the same average
                assert (stack[worker].double() - want).norm() <= tolerance * scale


def test_error_feedback_sends_later_what_compression_left_out():
    """Algorithm 2's point: summed over steps, the updates equal the summed exact averages minus
    the workers' mean memory (E_i = G_i + E_i - update telescopes), to float64 rounding; and
    that memory stays bounded, so the updates track the averages while single steps miss them."""
    n, steps = 4, 60
    generator = torch.Generator().manual_seed(5)
    base = torch.randn(n, 12, 10, generator=generator, dtype=torch.float64)
    method = build(n, rank=1)
    total_update, total_average, total_miss = torch.zeros(12, 10, dtype=torch.float64), torch.zeros(12, 10, dtype=torch.float64), 0.0
    for _ in range(steps):
        grads = base + 0.1 * torch.randn(n, 12, 10, generator=generator, dtype=torch.float64)
        average = grads.mean(dim=0)
        stack = grads.clone()
        method.step([stack])
        total_update += stack[0]
        total_average += average
        total_miss += (stack[0] - average).norm().item()
    mean_memory = method.memory[0].mean(dim=0)
    assert (total_update - (total_average - mean_memory)).norm() <= 1e-10 * total_average.norm()
    assert mean_memory.norm() < 0.05 * total_miss  # the memory is one step's worth, not the sum of misses


def test_resnet20_bytes_on_8_workers_follow_the_shapes():
    n, rank, iterations, rate = 8, 2, 2, 2.0
    torch.manual_seed(0)
    shapes = [tuple(p.shape) for p in models.build("resnet20").parameters()]
    method = build(n, rank=rank, num_iterations=iterations, min_compression_rate=rate, start_compressing_after_num_steps=1)
    for step in range(3):
        method.step([torch.randn((n,) + shape) for shape in shapes])
    # P (m x r) and Q (n x r) per iteration for the matrices sent as factors; the rest whole.
    whole, factors = 0, 0
    for shape in shapes:
        rows, columns = shape[0], math.prod(shape) // shape[0]
        if sent_as_factors(shape, rank, rate):
            factors += (rows + columns) * min(rank, rows, columns)
        else:
            whole += math.prod(shape)
    total = sum(math.prod(s) for s in shapes)
    assert total == 272_474 and factors > 0
    # Step 0 all-reduces everything whole; steps 1 and 2 compress. Four bytes per float32.
    expected = 4 * (total + 2 * (whole + iterations * factors))
    comm = method.comm
    assert list(comm.bytes_sent) == [expected] * n
    assert list(comm.messages_sent) == [1 + 2 * (1 + 2 * iterations)] * n


def test_bad_settings_are_refused_with_their_names():
    for hyper, match in [({"rank": 0}, "rank must be >= 1"), ({"num_iterations": 0}, "num_iterations must be >= 1"),
                         ({"min_compression_rate": 0.5}, "min_compression_rate must be >= 1"),
                         ({"start_compressing_after_num_steps": -1}, "start_compressing_after_num_steps must be >= 0")]:
        with pytest.raises(ValueError, match=match):
            build(4, **hyper)


def test_state_dict_resumes_exactly():
    n = 4
    generator = torch.Generator().manual_seed(9)
    gradient_steps = [[torch.randn((n,) + shape, generator=generator) for shape in SHAPES] for _ in range(6)]
    straight, first, second = build(n, rank=2, seed=3), build(n, rank=2, seed=3), build(n, rank=2, seed=3)
    results = []
    for step, grads in enumerate(gradient_steps):
        stacks = [g.clone() for g in grads]
        straight.step(stacks)
        results.append(stacks)
        if step < 3:
            first.step([g.clone() for g in grads])
    # Saved again before any step (a resume that stops at once): the loaded state must survive.
    untouched = build(n, rank=2, seed=3)
    untouched.load_state_dict(first.state_dict())
    second.load_state_dict(untouched.state_dict())
    for grads, want in zip(gradient_steps[3:], results[3:]):
        stacks = [g.clone() for g in grads]
        second.step(stacks)
        for got, expected in zip(stacks, want):
            assert torch.equal(got, expected)


@pytest.fixture(scope="module")
def beside_the_hook(tmp_path_factory):
    folder = tmp_path_factory.mktemp("powersgd_peer")
    seeds = list(range(8))
    run_mpi(2, ["tests/powersgd_runs.py", str(folder), json.dumps(seeds)], timeout=300)
    return [torch.load(folder / f"rank{worker}.pt") for worker in range(2)], seeds


def test_payloads_equal_pytorchs_powersgd_hook(beside_the_hook):
    results, seeds = beside_the_hook
    for worker_results in results:
        hook_sent = worker_results["hook"][1]
        for seed in seeds:
            ours_sent = worker_results[f"ours_{seed}"][1]
            start = powersgd_runs.START
            # The hook counts only what it compresses; before START both all-reduce everything (1,794 floats).
            assert hook_sent[:start] == [0] * start and ours_sent[:start] == [1794] * start
            # From START on: P and Q of the 32 x 20 and 32 x 32 matrices, the rest whole, every step the same.
            assert ours_sent[start:] == hook_sent[start:] == [(32 + 20) + (32 + 32) + 2 * 32 + 32 + 32 + 2] * (powersgd_runs.STEPS - start)


def test_training_loss_follows_pytorchs_powersgd_hook(beside_the_hook):
    """Both sides run the same model, data, learning rate and first exact steps; they differ only
    in Q's random first value. So the hook's loss must look like one more draw of ours. The
    statistic is the mean loss over the steps from the first compressed one to step 100, where
    the approximation still shapes the trajectory (by step 150 exact averaging reaches the same
    loss, so the end tells nothing): within 5 standard deviations of our 8 draws' mean (seen
    here: 0.04 and 2.2 on the two workers), while DDP's exact average lies more than 10 away
    (seen: 26 and 33), so the test tells PowerSGD from no compression. The hook's loss over
    the last 50 steps is 0.37 and 0.39 of the first 10's."""
    results, seeds = beside_the_hook
    start = powersgd_runs.START
    for worker_results in results:
        hook_losses = worker_results["hook"][0]
        for seed in seeds:  # the exact all-reduce steps (and the first loss after them) agree to rounding
            assert worker_results[f"ours_{seed}"][0][:start + 1] == pytest.approx(hook_losses[:start + 1], rel=1e-5)

        def window(losses):
            return statistics.mean(losses[start + 1:100])

        ours = [window(worker_results[f"ours_{seed}"][0]) for seed in seeds]
        mean, spread = statistics.mean(ours), statistics.stdev(ours)
        assert abs(window(hook_losses) - mean) <= 5 * spread
        assert abs(window(worker_results["exact"][0]) - mean) >= 10 * spread
        final = statistics.mean(hook_losses[-50:])
        assert final < 0.5 * statistics.mean(hook_losses[:10])  # and it learned


def test_train_py_keeps_every_worker_identical(tmp_path):
    """All workers step with the same averaged gradient from the same start (the small CNN has no
    batch norm, whose statistics would stay local), so every worker's test loss is the averaged
    model's, and the bytes per step are the formula's."""
    from powergossip import runs
    from tests.test_data import fake_fmnist
    from tests.train_runs import run

    fake_fmnist(tmp_path / "data", n_train=512, n_test=64)
    run(str(tmp_path / "out"), [f"data_dir={tmp_path / 'data'}", "optimizer=powersgd", "optimizer_rank=2", "n_workers=4",
                                "batch_size=16", "num_epochs=1", "max_batches_per_epoch=3", "device=cpu"])
    records = [r for r in runs.read_metrics(str(tmp_path / "out")) if r["name"] == "loss" and r["tags"].get("split") == "test"]
    averaged = [r["value"] for r in records if r["tags"].get("worker") is None]
    per_worker = [r["value"] for r in records if r["tags"].get("worker") is not None]
    assert len(per_worker) == 4 and per_worker == pytest.approx(averaged * 4, rel=1e-6)
    shapes = [tuple(p.shape) for p in models.build("small_cnn", in_channels=1, num_classes=10).parameters()]
    floats = sum((s[0] + math.prod(s) // s[0]) * min(2, s[0], math.prod(s) // s[0]) if sent_as_factors(s, 2) else math.prod(s)
                 for s in shapes)
    assert records[-1]["bits"] == 3 * 32 * floats  # three steps, float32
