"""The drop-in optimizers in a user's own script: a process group the script made itself
(torchrun, mpirun, or none in one plain process), torch's LR schedulers, closures, GradScaler,
state dicts of today and of before."""
import copy
import os
import socket
import subprocess
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import powergossip
from powergossip import launch, methods, topologies
from tests import dense_reference, own_group_runs, powersgd_runs
from tests.launch import ROOT, run_mpi
from tests.test_powersgd import sent_as_factors

# float32 rounding of one mixing and one SGD step per step, over a handful of steps
TOLERANCE = dict(rtol=1e-5, atol=1e-6)


def launched_environment() -> dict[str, str]:
    """This environment without a launch's variables (mpirun_environment drops them), with this checkout first on the path."""
    env = launch.mpirun_environment()
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_script(launcher: str, out, monkeypatch) -> list[dict]:
    script = ["tests/own_group_runs.py", str(out)]
    if launcher == "mpirun":
        with socket.socket() as probe:  # the port the user's script meets on (env://)
            probe.bind(("127.0.0.1", 0))
            monkeypatch.setenv("MASTER_PORT", str(probe.getsockname()[1]))
        run_mpi(2, script, timeout=120)
    else:
        prefix = ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"] if launcher == "torchrun" else []
        for attempt in range(2):  # once more only after Gloo's rare abort at interpreter exit (launch._leave_process_group)
            result = subprocess.run([sys.executable, *prefix, *script], cwd=ROOT, env=launched_environment(),
                                    capture_output=True, text=True, timeout=120)
            if result.returncode == 0 or "terminate called without an active exception" not in result.stderr:
                break
        assert result.returncode == 0, result.stderr
    n = 1 if launcher == "python" else 2
    return [torch.load(out / f"rank{worker}.pt") for worker in range(n)]


@pytest.mark.parametrize("launcher", ["torchrun", "mpirun", "python"])
def test_a_script_that_made_its_process_group_keeps_it(tmp_path, monkeypatch, launcher):
    """The drop-ins join the group the script made (or, in one plain process, are a graph of one
    worker that sends nothing); the script's group still works after them, for the script."""
    results = run_script(launcher, tmp_path, monkeypatch)
    n = len(results)
    runs = [result["drop_in"] for result in results]
    # D-PSGD's dense reference, step by step: X_{t+1} = W X_t - lr G_t (W = 1 for one worker)
    before = torch.stack([run["before"] for run in runs], dim=1)  # [steps, workers, entries]
    after = torch.cat([before[1:], torch.stack([run["after"] for run in runs]).unsqueeze(0)])
    gradients = torch.stack([run["gradients"] for run in runs], dim=1)
    ring = topologies.build("ring", n)
    for t in range(own_group_runs.STEPS):
        expected = dense_reference.gossip(ring, [before[t]], 1.0)[0] - own_group_runs.LR * gradients[t]
        torch.testing.assert_close(after[t], expected, **TOLERANCE)
    entries = before.shape[-1]
    assert [run["bytes_sent"] for run in runs] == [4 * entries * own_group_runs.STEPS * (n - 1)] * n  # one neighbour each

    aggregated = [dict(zip(("losses", "sent", "after"), result["powersgd"])) for result in results]
    for other in aggregated[1:]:  # every worker steps with the same average
        torch.testing.assert_close(other["after"], aggregated[0]["after"], **TOLERANCE)
    shapes = [p.shape for p in powersgd_runs.model().parameters()]
    exact = sum(shape.numel() for shape in shapes)
    rank, rate = powersgd_runs.RANK, powersgd_runs.MIN_RATE
    compressed = sum((shape[0] + shape[1]) * rank if sent_as_factors(shape, rank, rate) else shape.numel() for shape in shapes)
    start, steps = powersgd_runs.START, powersgd_runs.STEPS
    expected_sent = [exact] * start + [compressed] * (steps - start) if n > 1 else [0] * steps  # floats
    assert [run["sent"] for run in aggregated] == [expected_sent] * n

    for run in runs + aggregated:  # and they learned
        assert sum(run["losses"][-2:]) < sum(run["losses"][:2])
    assert [result.get("sum_over_processes") for result in results] == ([3.0, 3.0] if n == 2 else [None])


def test_a_group_made_in_this_process_is_joined_and_left_to_its_owner(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    alone = powergossip.DecentralizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    assert alone.comm.context.launcher == "single"
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        joined = powergossip.DecentralizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
        assert (joined.comm.context.launcher, joined.comm.context.backend) == ("existing", "gloo")
    finally:
        dist.destroy_process_group()  # the owner's to do
    again = powergossip.DecentralizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), model)
    assert again.comm.context.launcher == "single"


# --- one process: every method, and torch's optimizer protocol ----------------------------------
def classifier():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))


def batch(step: int):
    generator = torch.Generator().manual_seed(step)
    x = torch.randn(16, 6, generator=generator)
    return x, x[:, :3].argmax(dim=1)


def loss_of(model, step: int) -> torch.Tensor:
    x, y = batch(step)
    return F.cross_entropy(model(x), y)


def backward(model, step: int) -> torch.Tensor:
    loss = loss_of(model, step)
    loss.backward()
    return loss


@pytest.mark.parametrize("algorithm", [name for name, entry in methods.METHODS.items() if not entry.asynchronous])
def test_one_process_is_a_graph_of_one_worker(algorithm):
    """Every method runs its own code on a graph of one worker: nothing sent, and the parameters
    those of the wrapped optimizer alone (PowerSGD here all-reduces exactly: its compression of
    one worker's gradient is the subprocess runs' business)."""
    hyper = {"moniqua": {"theta": 1.0}, "powersgd": {"start_compressing_after_num_steps": 4}}.get(algorithm, {})
    topology = "directed_exponential" if algorithm == "push-sum" else "ring"
    model, twin = classifier(), classifier()
    optimizer = powergossip.DecentralizedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), model,
                                                   algorithm=algorithm, topology=topology, **hyper)
    plain = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9)
    for step in range(4):
        for net, opt in ((model, optimizer), (twin, plain)):
            opt.zero_grad()
            backward(net, step)
            opt.step()
    assert optimizer.bytes_sent == 0
    for mine, reference in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(mine, reference, **TOLERANCE)


def wrapped(model, **sgd):
    return powergossip.DecentralizedOptimizer(torch.optim.SGD(model.parameters(), **sgd), model, algorithm="power-gossip")


def test_it_is_a_torch_optimizer_over_the_wrapped_ones_groups():
    model = classifier()
    optimizer = wrapped(model, lr=0.1, momentum=0.9)
    assert isinstance(optimizer, torch.optim.Optimizer)
    inner = optimizer.optimizer
    assert optimizer.param_groups is inner.param_groups and optimizer.state is inner.state and optimizer.defaults is inner.defaults
    backward(model, 0)
    optimizer.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())


SCHEDULERS = {
    "StepLR": lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5),
    "OneCycleLR": lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=6, cycle_momentum=False),
}


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_lr_schedulers_set_the_learning_rate_of_each_update(name):
    """The update (x_t - x_{t+1}) / g_t is the learning rate the same scheduler gives a plain SGD,
    step by step, without torch's warnings about the order of the steps (float64: the ratio is
    exact to rounding even at OneCycleLR's smallest rates)."""
    model, twin = classifier().double(), classifier()
    optimizer, plain = wrapped(model, lr=0.1), torch.optim.SGD(twin.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduler, reference = SCHEDULERS[name](optimizer), SCHEDULERS[name](plain)
        used, scheduled = [], []
        for step in range(6):
            optimizer.zero_grad()
            x, y = batch(step)
            F.cross_entropy(model(x.double()), y).backward()
            weight = model[0].weight
            before, gradient = weight.detach().clone(), weight.grad.clone()
            optimizer.step()
            used.append(((before - weight.detach()) / gradient)[gradient != 0].mean().item())
            scheduled.append(reference.get_last_lr()[0])
            scheduler.step()
            plain.step()  # no gradients: only the scheduler's protocol
            reference.step()
    assert used == pytest.approx(scheduled, rel=1e-9)
    assert len(set(scheduled)) > 2


def test_one_cycle_cycles_the_wrapped_optimizers_momentum():
    optimizer = wrapped(classifier(), lr=0.1, momentum=0.9)
    torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.5, total_steps=6, max_momentum=0.95)
    assert optimizer.optimizer.param_groups[0]["momentum"] == 0.95


def test_step_evaluates_the_closure_once_at_x_t_and_returns_its_loss():
    model, twin = classifier(), classifier()
    optimizer, plain = wrapped(model, lr=0.1), torch.optim.SGD(twin.parameters(), lr=0.1)
    calls = []

    def closure():
        calls.append(1)
        optimizer.zero_grad()
        return backward(model, 0)

    loss = optimizer.step(closure)
    plain.zero_grad()
    assert len(calls) == 1 and loss.item() == backward(twin, 0).item()
    plain.step()
    for mine, reference in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(mine, reference, **TOLERANCE)


def test_grad_scaler_unscales_and_skips_a_non_finite_step_but_not_the_gossip():
    model, twin = classifier(), classifier()
    optimizer, plain = wrapped(model, lr=0.1), torch.optim.SGD(twin.parameters(), lr=0.1)
    rounds = []
    gossip = optimizer.gossip.step
    optimizer.gossip.step = lambda params: (rounds.append(1), gossip(params))
    off = torch.amp.GradScaler("cpu", enabled=False)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    for step, (grad_scaler, factor) in enumerate([(off, 1.0), (scaler, 1.0), (scaler, float("inf"))]):
        optimizer.zero_grad()
        grad_scaler.scale(loss_of(model, step) * factor).backward()
        grad_scaler.step(optimizer)
        grad_scaler.update()
        if factor == 1.0:  # the same step as plain SGD, gradients unscaled
            plain.zero_grad()
            backward(twin, step)
            plain.step()
    for mine, reference in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(mine, reference, **TOLERANCE)
    assert len(rounds) == 3 and scaler.get_scale() == 2.0 ** 9  # gossiped every step; the scale backed off


def test_state_dict_is_torch_shaped_and_yesterdays_still_loads():
    """A state_dict carries the wrapped optimizer's entries at the top, as any torch optimizer's;
    one in the format saved before (the wrapped optimizer's under "optimizer") loads alike."""
    model = classifier()
    optimizer = wrapped(model, lr=0.1, momentum=0.9)
    for step in range(3):
        optimizer.zero_grad()
        backward(model, step)
        optimizer.step()
    called = []  # torch's state_dict hooks, registered on the wrapper, run as on any optimizer
    optimizer.register_state_dict_pre_hook(lambda opt: called.append("pre"))
    optimizer.register_state_dict_post_hook(lambda opt, state: called.append("post"))
    state = copy.deepcopy(optimizer.state_dict())  # as torch.save would: the momenta go on changing
    assert called == ["pre", "post"]
    assert state["param_groups"][0]["lr"] == 0.1 and len(state["state"]) == 4
    yesterdays = copy.deepcopy({"optimizer": optimizer.optimizer.state_dict(), "gossip": optimizer.gossip.state_dict(),
                                "parameters": [p.detach() for p in model.parameters()], "bytes_sent": 123, "messages_sent": 4})

    def continued(saved) -> tuple[list[torch.Tensor], int]:
        resumed = classifier()  # its own initial parameters: the state's replace them
        again = wrapped(resumed, lr=0.1, momentum=0.9)
        loaded = []
        again.register_load_state_dict_pre_hook(lambda opt, state: loaded.append("pre"))
        again.register_load_state_dict_post_hook(lambda opt: loaded.append("post"))
        again.load_state_dict(saved)
        assert loaded == ["pre", "post"]
        for step in range(3, 5):
            again.zero_grad()
            backward(resumed, step)
            again.step()
        return [p.detach() for p in resumed.parameters()], again.bytes_sent

    for step in range(3, 5):
        optimizer.zero_grad()
        backward(model, step)
        optimizer.step()
    (today, sent), (before, sent_before) = continued(state), continued(yesterdays)
    for mine, a, b in zip(model.parameters(), today, before):
        assert torch.equal(mine, a) and torch.equal(mine, b)
    assert (sent, sent_before) == (0, 123)


def test_add_param_group_takes_the_models_parameters_only():
    model = classifier()
    optimizer = powergossip.DecentralizedOptimizer(torch.optim.SGD(model[2].parameters(), lr=0.1), model)
    optimizer.add_param_group({"params": model[0].parameters(), "lr": 0.01})  # unfreezing: gossiped from the start
    assert [group["lr"] for group in optimizer.optimizer.param_groups] == [0.1, 0.01]
    with pytest.raises(ValueError, match="add_param_group: the gossip is set up over the model's parameters"):
        optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(2))]})
