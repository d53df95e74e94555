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
