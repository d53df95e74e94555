"""GPU-only code paths (skipped without CUDA; run on the lent GPU machine).

`stacked_compute=graph` (StackedReplicas.graphed_gradients) replays the per-replica
loop from a CUDA graph, on several streams and with channels_last images. Against
the eager loop over the same channels_last images it must give the same numbers for
every replica, over several training steps. Against the NCHW loop of
`stacked_compute=loop` the gradients differ by cuDNN's different convolution
algorithms: float rounding, which a ResNet's batch-norm backward amplifies at
initialization (about 0.4% in float32 and 7% with TF32, measured on an H100 for
ResNet-20 at batch 32; benchmarks/README.md). The end-to-end test therefore turns
TF32 off and compares train.py's metrics with a tolerance.
"""
import contextlib

import pytest
import torch

from powergossip import data, models
from powergossip.models.stacked import StackedReplicas
from powergossip.step import nesterov_sgd_step
from tests.test_train import common, comparable, tiny_data  # noqa: F401 (fixture)
from tests.train_runs import run

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def exact_float32():
    """No TF32, deterministic cuDNN: equal kernels give equal numbers."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.deterministic)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.deterministic = saved


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


def twin_replicas(autocast_dtype, num_streams, num_replicas=4):
    torch.manual_seed(0)
    template = models.build("resnet20")
    device = torch.device("cuda")
    return (StackedReplicas(template, num_replicas, device, "loop", autocast_dtype),
            StackedReplicas(template, num_replicas, device, "graph", autocast_dtype, num_streams))


def eager_loop_channels_last(workers, x, y):
    """train.py's per-replica loop, on the channels_last images the graph uses."""
    x = x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    return workers.gradients(x, y)[0]


@pytest.mark.parametrize("num_streams,autocast_dtype", [(1, None), (3, None), (4, torch.bfloat16)])
def test_graphed_gradients_equal_the_eager_loop_over_training_steps(exact_float32, num_streams, autocast_dtype):
    looped, graphed = twin_replicas(autocast_dtype, num_streams)
    momenta = {id(w): [torch.zeros_like(p) for p in w.params] for w in (looped, graphed)}
    decays = [1e-4] * len(looped.params)
    generator = torch.Generator(device="cuda").manual_seed(1)
    for step in range(4):
        x = torch.randn(4, 32, 3, 32, 32, device="cuda", generator=generator)
        y = torch.randint(0, 10, (4, 32), device="cuda", generator=generator)
        loop_losses = eager_loop_channels_last(looped, x, y)
        graph_losses = graphed.gradients(x, y)[0]
        torch.testing.assert_close(graph_losses, loop_losses, rtol=1e-6, atol=1e-6)
        for g_graph, g_loop in zip(graphed.grads, looped.grads):
            assert g_graph.dtype == torch.float32
            for row in range(4):  # every replica its own gradient, none left at zero or mixed up
                assert relative_difference(g_graph[row], g_loop[row]) < 1e-5, step
        for b_graph, b_loop in zip(graphed.buffers, looped.buffers):
            if b_loop.is_floating_point():
                assert relative_difference(b_graph, b_loop) < 1e-6, step
            else:
                assert torch.equal(b_graph, b_loop)  # num_batches_tracked: recording did not count its warm-up
        for w in (looped, graphed):
            nesterov_sgd_step(w.params, w.grads, momenta[id(w)], 0.1, 0.9, decays)
    for p_graph, p_loop in zip(graphed.params, looped.params):
        assert relative_difference(p_graph, p_loop) < 1e-5


def test_train_graph_gives_the_loop_numbers(exact_float32, tmp_path, tiny_data):  # noqa: F811 (fixture)
    overrides = common(tiny_data, device="cuda") + ["optimizer=power-gossip"]
    run(str(tmp_path / "loop"), overrides)
    run(str(tmp_path / "graph"), overrides + ["stacked_compute=graph", "graph_streams=2"])
    loop, graphed = comparable(tmp_path / "loop"), comparable(tmp_path / "graph")
    assert [r[:3] for r in loop] == [r[:3] for r in graphed]
    for a, b in zip(loop, graphed):
        assert a[3] == pytest.approx(b[3], rel=1e-3, abs=1e-3), (a, b)
        assert a[4] == b[4]  # bits sent


def test_compiled_replicas_give_the_eager_graphs_numbers(exact_float32):
    """compile_replicas: each replica's forward as torch.compile makes it, recorded into the graph.
    Inductor fuses the batch-norm and reorders its sums, so from the same state each step's numbers
    are the eager graph's to float rounding, which batch-norm's backward amplifies in the gradients
    (module docstring; 0.2% median and 0.7% at most measured on an H200). Over several steps of
    SGD the two trajectories part as any two orders of summation do: each step starts alike."""
    torch._dynamo.utils.counters.clear()
    torch.manual_seed(0)
    template = models.build("resnet20")
    device = torch.device("cuda")
    eager = StackedReplicas(template, 4, device, "graph", graph_streams=2)
    compiled = StackedReplicas(template, 4, device, "graph", graph_streams=2, compile_replicas=True)
    momenta = [torch.zeros_like(p) for p in eager.params]
    generator = torch.Generator(device="cuda").manual_seed(1)
    for step in range(3):
        with torch.no_grad():  # the same state: parameters and batch-norm statistics
            torch._foreach_copy_(compiled.params + compiled.buffers, eager.params + eager.buffers)
        x = torch.randn(4, 32, 3, 32, 32, device="cuda", generator=generator)
        y = torch.randint(0, 10, (4, 32), device="cuda", generator=generator)
        torch.testing.assert_close(compiled.gradients(x, y)[0], eager.gradients(x, y)[0], rtol=1e-5, atol=0)
        for g_compiled, g_eager in zip(compiled.grads, eager.grads):
            for row in range(4):
                assert relative_difference(g_compiled[row], g_eager[row]) < 2e-2, step
        for b_compiled, b_eager in zip(compiled.buffers, eager.buffers):
            if b_eager.is_floating_point():
                assert relative_difference(b_compiled, b_eager) < 1e-5, step
            else:
                assert torch.equal(b_compiled, b_eager)
        nesterov_sgd_step(eager.params, eager.grads, momenta, 0.1, 0.9, [1e-4] * len(eager.params))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # Inductor's code ran, one graph for all replicas


def test_a_new_epochs_first_batch_waits_for_nothing_queued_on_the_gpu():
    """An epoch's sample indices and augmentation draws (drawn on the CPU) reach the GPU from
    pinned memory: the first batch waits for none of the work queued before it (at an epoch's
    start, the last epoch's steps), which set_sync_debug_mode("error") would refuse. The
    batches are the CPU loader's."""
    loaders = {}
    for device in ("cpu", "cuda"):
        dataset = data.load("synthetic", device=device, num_train=256, num_test=0, seed=1)
        partition = data.make_partition("iid", dataset.train_y, 4, seed=0)
        loaders[device] = data.WorkerLoader(dataset, partition, 16, first_worker=2, num_local_workers=2, augment=True)
    next(loaders["cuda"].epoch_batches(0))  # the normalization's constants go to the GPU once, at the first batch
    torch.cuda.set_sync_debug_mode("error")
    try:
        x, y = next(loaders["cuda"].epoch_batches(1))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    cpu_x, cpu_y = next(loaders["cpu"].epoch_batches(1))
    assert torch.equal(y.cpu(), cpu_y) and torch.allclose(x.cpu(), cpu_x, atol=1e-6)
    # the GPU makes the batches of several steps at once (4 an epoch here): each step's, bit for bit
    assert loaders["cuda"].steps_at_once == data.WorkerLoader.STEPS_AT_ONCE > 1
    grouped = list(loaders["cuda"].epoch_batches(2, 1))
    loaders["cuda"].steps_at_once = 1
    for (x, y), (x1, y1) in zip(grouped, loaders["cuda"].epoch_batches(2, 1), strict=True):
        assert torch.equal(x, x1) and torch.equal(y, y1)


def test_the_epoch_sums_and_loss_checks_blocks_on_a_gpu_give_each_steps_numbers():
    """EpochTotals adds the steps FOLD at a time (a cumulative sum along the steps must add them in
    order) and LossCheck checks them in blocks: on the GPU, the sums bit for bit those of adding
    each step, and diverged_at that of checking each step."""
    from powergossip import metrics, runs
    device = torch.device("cuda")
    generator = torch.Generator(device=device).manual_seed(0)
    folded, each = metrics.EpochTotals.zeros(8, device), [torch.zeros(8, dtype=torch.float64, device=device)
                                                           for _ in range(3)]
    assert folded.fold_every == metrics.EpochTotals.FOLD > 1
    for _ in range(29):  # losses over 24 orders of magnitude: the order of the additions shows in the last bits
        scale = 10.0 ** torch.randint(-12, 12, (8,), device=device, generator=generator)
        losses = (torch.rand(8, device=device, generator=generator) * scale).float()
        corrects = torch.randint(0, 200, (8,), device=device, generator=generator).float()
        counts = torch.full((8,), 128.0, device=device)
        folded.add(losses, corrects, counts)
        each[0] += losses.double() * counts
        each[1] += corrects.double()
        each[2] += counts
    for sums, expected in zip((folded.loss, folded.correct, folded.count), each):
        assert torch.equal(sums.view(torch.int64), expected.view(torch.int64))

    comm = type("Comm", (), {"device": device, "num_local": 8, "n_workers": 8, "first_worker": 0,
                             "sum_over_processes": staticmethod(lambda values: values)})()
    check = runs.LossCheck(comm, type("Checkpoints", (), {"last": None})(), 10.0, None)
    losses = torch.rand(20, 8, device=device, generator=generator)
    # worker 3 diverges twice in the block of steps 1-8, then again; worker 6 in the next block
    losses[5, 3], losses[7, 3], losses[9, 3], losses[13, 6] = 50.0, 60.0, float("nan"), float("inf")
    for step, row in enumerate(losses):
        with contextlib.suppress(FloatingPointError):
            check.watch(row.clone(), 0, step)
    assert check.reference == losses[0].mean().item()  # the first step's mean, as one step's check takes it
    expected = torch.full((8, 3), -1.0, dtype=torch.float64)
    expected[3], expected[6] = torch.tensor([0.0, 5.0, 50.0]), torch.tensor([0.0, 13.0, float("inf")])
    assert torch.equal(check.diverged_at.cpu(), expected)


def test_train_records_on_a_gpu_do_not_depend_on_the_blocks_of_steps(exact_float32, tmp_path, tiny_data,  # noqa: F811
                                                                      monkeypatch):
    """train.py on the GPU with the sums and loss check taken in blocks (11 steps an epoch: a block
    of 8 and one the epoch's end closes) and one step at a time: the same records, bit for bit."""
    from powergossip import metrics, runs
    overrides = common(tiny_data, device="cuda", batch_size=8, max_batches_per_epoch=11) + [
        "optimizer=power-gossip", "stacked_compute=graph", "graph_streams=2"]
    run(str(tmp_path / "blocks"), overrides)
    monkeypatch.setattr(metrics.EpochTotals, "FOLD", 1)
    monkeypatch.setattr(runs.LossCheck, "LAG", 1)
    run(str(tmp_path / "steps"), overrides)
    assert comparable(tmp_path / "blocks") == comparable(tmp_path / "steps")


def counted_test_passes(monkeypatch):
    """metrics._test_pass, counted: (the keyword arguments of each call, the pass itself)."""
    from powergossip import metrics
    passes, test_pass = [], metrics._test_pass
    monkeypatch.setattr(metrics, "_test_pass", lambda *args, **kwargs: passes.append(kwargs) or test_pass(*args, **kwargs))
    return passes, test_pass


def move_apart(workers):
    """Every worker's parameters and batch-norm statistics moved by its own noise, in place, as a step moves them."""
    with torch.no_grad():
        for stack in workers.params + [b for b in workers.buffers if b.is_floating_point()]:
            stack.add_(torch.randn_like(stack) * 0.05)


@pytest.mark.parametrize("dtype,evaluation_batch_size,max_test_examples",
                         [("bfloat16", 100, None), ("float32", 128, None), ("float32", 64, 250)])
def test_the_graphed_test_gives_the_test_passs_numbers_with_each_refill(monkeypatch, dtype, evaluation_batch_size,
                                                                        max_test_examples):
    """metrics.evaluate(graphed=True), train.py's test of the averaged model under
    stacked_compute=graph: its first call runs the pass and records it; later calls replay the
    recording, and must give the pass's numbers bit for bit for the weights refilled in place
    (StackedReplicas.model_from_rows), here each worker's in turn; batches that divide the test
    set, a partial last batch (300 = 128 + 128 + 44) and a limit on the examples included."""
    from powergossip import metrics
    device = torch.device("cuda")
    dataset = data.load("synthetic", device=device, num_train=64, num_test=300, in_channels=1, image_size=28,
                        num_classes=10, seed=1)
    torch.manual_seed(0)
    workers = StackedReplicas(models.build("resnet20", in_channels=1, image_size=28), 3, device, "graph",
                              torch.bfloat16 if dtype == "bfloat16" else None, 2)
    move_apart(workers)
    cfg = {"dtype": dtype, "evaluation_batch_size": evaluation_batch_size, "max_test_examples": max_test_examples}
    passes, test_pass = counted_test_passes(monkeypatch)
    for row in [0, 1, 2, 0]:
        model = workers.model_from_rows([p[row] for p in workers.params], [b[row] for b in workers.buffers])
        graphed = metrics.evaluate(model, dataset, cfg, graphed=True)
        with torch.no_grad():  # as evaluate runs it
            eager = test_pass(model, dataset, cfg)
        assert torch.equal(graphed, eager), (row, graphed, eager)
    assert passes == [{"keep_casts": True}, {"keep_casts": False}]  # run and recorded once, then replayed
    assert 0.0 < eager[1].item() < 1.0 and eager[0].item() > 0.0


def counted_runs(monkeypatch) -> list[bool]:
    """metrics._replayed, counted: the `recording` flag of each run of what it replays."""
    from powergossip import metrics
    runs, replayed = [], metrics._replayed
    monkeypatch.setattr(metrics, "_replayed", lambda owner, key, reads, run: replayed(
        owner, key, reads, lambda recording: runs.append(recording) or run(recording)))
    return runs


@pytest.mark.parametrize("with_model", [True, False])
def test_the_graphed_averaged_state_gives_the_eager_numbers_after_each_step(monkeypatch, with_model):
    """metrics.averaged_state(graphed=True), train.py's averaged model and consensus distances under
    stacked_compute=graph: its first call runs and records; later calls replay the recording, and
    must give the eager numbers bit for bit (the standalone model's weights and buffers, the
    distances) for the workers' parameters and batch-norm statistics changed in place in between."""
    from powergossip import comm as comm_module, metrics
    device = torch.device("cuda")
    comm = comm_module.Communicator(3, "cuda")
    torch.manual_seed(0)
    workers = StackedReplicas(models.build("resnet20", in_channels=1, image_size=28), 3, device, "graph",
                              torch.bfloat16, 2)
    runs = counted_runs(monkeypatch)
    for step in range(4):
        move_apart(workers)
        model, graphed = metrics.averaged_state(workers, comm, with_model, graphed=True)
        state = {k: v.clone() for k, v in model.state_dict().items()} if with_model else None
        model, eager = metrics.averaged_state(workers, comm, with_model)
        assert torch.equal(graphed, eager), (step, graphed, eager)
        if with_model:
            assert all(torch.equal(state[k], v) for k, v in model.state_dict().items()), step
    assert runs == [False, True]  # run and recorded once, then replayed
    assert (eager > 0).all() and (eager[:, 1] > eager[:, 0]).all()  # the buffers add to the full state's distance
    workers.params[0] = workers.params[0].clone()  # a stack moved: the recording would read the old one
    model, graphed = metrics.averaged_state(workers, comm, with_model, graphed=True)
    model, eager = metrics.averaged_state(workers, comm, with_model)
    assert torch.equal(graphed, eager) and runs == [False, True, False, True]  # recorded again


def test_train_records_on_a_gpu_do_not_depend_on_the_graphs_of_the_epochs_end(exact_float32, tmp_path,
                                                                             tiny_data, monkeypatch):  # noqa: F811
    """train.py under stacked_compute=graph averages the workers, takes their consensus distances
    and tests the averaged model from CUDA graphs (from its second epoch): the same records, bit
    for bit, as all of it launched kernel by kernel."""
    from powergossip import metrics
    overrides = common(tiny_data, device="cuda", num_epochs=3, evaluate_each_worker=False) + [
        "optimizer=power-gossip", "stacked_compute=graph", "graph_streams=2"]  # the averaged model's test alone
    passes, _ = counted_test_passes(monkeypatch)
    runs = counted_runs(monkeypatch)
    run(str(tmp_path / "graphed"), overrides)
    assert passes == [{"keep_casts": True}, {"keep_casts": False}]  # epoch 1 run and recorded, epochs 2 and 3 replayed
    assert runs == [False, True, False, True]  # the averaged state and its test, each run and recorded once
    monkeypatch.setattr(metrics, "_replayed", lambda owner, key, reads, run: run(recording=False))
    run(str(tmp_path / "eager"), overrides)
    graphed, eager = comparable(tmp_path / "graphed"), comparable(tmp_path / "eager")
    assert graphed == eager
    assert len([r for r in graphed if r[2].get("split") == "test_avg"]) == 6  # loss and accuracy, 3 epochs
