"""The order of a training step (step.TrainingStep), which train.py and DecentralizedOptimizer share."""
from types import SimpleNamespace

import pytest

from powergossip import step


class Recording:
    """A method that records what it was given."""

    def __init__(self, calls):
        self.calls = calls

    def step(self, stacks):
        self.calls.append(("method", stacks))


@pytest.mark.parametrize("acts_on,local_step_first,expected", [
    ("parameters", False, [("method", "params"), "local"]),  # D-PSGD, PowerGossip, ...: gossip x_t, then the step
    ("parameters", True, ["local", ("method", "params")]),  # all-reduce, push-sum: the step, then the method
    ("gradients", False, [("method", "grads"), "local"]),  # PowerSGD: the average of the gradients, then the step
    ("gradients", True, [("method", "grads"), "local"]),  # on gradients, the method always comes first
])
def test_the_order_follows_the_registry_entry(acts_on, local_step_first, expected):
    calls = []
    entry = SimpleNamespace(acts_on=acts_on, local_step_first=local_step_first)
    training_step = step.TrainingStep(Recording(calls), entry, "params", lambda: "grads")
    training_step(lambda: calls.append("local"))
    assert calls == expected
    calls.clear()
    training_step(lambda: calls.append("local"), gossips=False)  # local_steps=H: a step without the method
    assert calls == ["local"]


def test_the_method_is_timed_as_gossip():
    labels = []

    class Timer:
        def __init__(self, label):
            labels.append(label)

        def __enter__(self):
            return self

        def __exit__(self, *exception):
            return False

    entry = SimpleNamespace(acts_on="parameters", local_step_first=False)
    step.TrainingStep(Recording([]), entry, [], [], timer=Timer)(lambda: None)
    assert labels == ["gossip"]


# --- quasi-global momentum against its formula over all workers (Lin et al. 2021, Algorithm 1) ----------
def quasi_global_reference(mixing, A, b, X, lr, mu, wd, steps, method_first):
    """Every worker's iterate after `steps` steps on f_i(x) = |A_i x - b_i|^2 / 2, written out
    over the stack: the gradient G at x_t; method first, X' = mixing(X) and the Nesterov step
    from X' with the buffer M unchanged; local step first, the step from X, then mixing; then
    M <- mu M + (1 - mu) (X - X_next) / lr. Weight decay acts on the parameters the step starts from."""
    import torch

    M = torch.zeros_like(X)
    for _ in range(steps):
        G = torch.einsum("nji,nj->ni", A, torch.einsum("nij,nj->ni", A, X) - b)
        start = mixing(X) if method_first else X
        D = G + wd * start
        N = mu * M + D
        after = start - lr * (D + mu * N)
        X_next = after if method_first else mixing(after)
        M = mu * M + (1 - mu) * (X - X_next) / lr
        X = X_next
    return X, M


@pytest.mark.parametrize("name", ["dpsgd", "all-reduce"])  # method first; local step first
def test_quasi_global_momentum_matches_its_formula_and_sends_nothing_more(name):
    import torch

    from powergossip import comm as comm_module
    from powergossip import methods, topologies
    from tests import dense_reference

    n, dim, lr, mu, wd = 4, 3, 0.1, 0.9, 0.05
    generator = torch.Generator().manual_seed(0)
    A, b = torch.randn(n, dim, dim, generator=generator, dtype=torch.float64), torch.randn(n, dim, generator=generator, dtype=torch.float64)
    X0 = torch.randn(n, dim, generator=generator, dtype=torch.float64)
    ring = topologies.build("ring", n)
    mixing = {"dpsgd": lambda X: dense_reference.gossip(ring, [X], 1.0)[0],
              "all-reduce": lambda X: dense_reference.all_reduce([X])[0]}[name]
    expected_X, expected_M = quasi_global_reference(mixing, A, b, X0, lr, mu, wd, 3, name == "dpsgd")

    bytes_sent = {}
    for momentum_type in ("local", "quasi-global"):
        comm = comm_module.Communicator(n, "cpu")
        method = methods.build(name, comm, ring)
        params, grads, momenta = [X0.clone()], [torch.zeros_like(X0)], [torch.zeros_like(X0)]
        training_step = step.TrainingStep(method, methods.METHODS[name], params, grads)
        quasi_global = step.QuasiGlobalMomentum(params, momenta, mu) if momentum_type == "quasi-global" else None
        for _ in range(3):
            grads[0].copy_(torch.einsum("nji,nj->ni", A, torch.einsum("nij,nj->ni", A, params[0]) - b))
            local = lambda: step.nesterov_sgd_step(params, grads, momenta, lr, mu, [wd], keep_momenta=quasi_global is not None)
            if quasi_global is None:
                training_step(local)
            else:
                quasi_global(lambda: training_step(local), lr)
        bytes_sent[momentum_type] = comm.bytes_sent.copy().tolist()
    # the plan holds mixing weights in float32 (1/3 to 6e-8): the rest is float64
    torch.testing.assert_close(params[0], expected_X, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(momenta[0], expected_M, rtol=1e-6, atol=1e-9)
    assert not torch.allclose(momenta[0], torch.zeros_like(X0))
    assert bytes_sent["quasi-global"] == bytes_sent["local"]
