"""Run train.main() several times in one launch (one mpirun start for many configs).

`python tests/train_runs.py OUT_ROOT RUNS_JSON [--sigterm-at=FRACTION]` where RUNS_JSON
maps a run name to a list of `key=value` overrides; run NAME writes to OUT_ROOT/NAME.
With --sigterm-at, process 0 sends itself SIGTERM once the run's progress passes
FRACTION (as a cluster's scheduler would). Configuration errors end every process
the way train.py's command line does.
"""
import functools
import itertools
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch  # noqa: E402
from powergossip import configuration, runs  # noqa: E402
from powergossip.models.stacked import StackedReplicas  # noqa: E402
import train  # noqa: E402

DEFAULTS = train._DEFAULTS


def run(out_dir: str, overrides: list[str]) -> None:
    train.config = configuration.apply_overrides(DEFAULTS, overrides)
    train.output_dir = out_dir
    train.main()


def stopped_and_resumed(out_dir: str, overrides: list[str], monkeypatch, progress=(0.6, 0.7)) -> None:
    """A run into `out_dir` stopped by SIGTERM once its progress is inside `progress` (as a
    cluster's scheduler would stop it), then resumed to its end (a test's, with pytest's monkeypatch)."""
    import pytest

    def send_sigterm(info):
        if progress[0] < info["state.progress"] < progress[1]:
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(train, "log_info", send_sigterm)
    with pytest.raises(SystemExit):
        run(out_dir, overrides)
    monkeypatch.setattr(train, "log_info", lambda info: None)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    run(out_dir, overrides + ["resume=true"])


def deferred(setattr=setattr) -> None:
    """train.py's loss check as on a GPU, where an epoch's end reads no step's loss (runs.LossCheck's
    `deferred`). `setattr`: a test's monkeypatch.setattr."""
    setattr(runs, "LossCheck", functools.partial(runs.LossCheck, deferred=True))


def diverging_at(step: int | None, setattr=setattr) -> None:
    """`deferred`, and this process's last worker's loss nan at the run's `step`-th step (from 0;
    None: none), its model left finite: a divergence that only the loss check sees."""
    gradients, steps = StackedReplicas.gradients, itertools.count()

    def diverging(replicas, *args):
        losses, *rest = gradients(replicas, *args)
        if next(steps) == step:
            losses = torch.cat([losses[:-1], torch.tensor([float("nan")], device=losses.device)])
        return (losses, *rest)
    deferred(setattr)
    setattr(StackedReplicas, "gradients", diverging)


def sigterm_once_past(fraction: float):
    def hook(info):
        if info["state.progress"] > fraction and not hook.sent and os.environ.get("OMPI_COMM_WORLD_RANK", "0") == "0":
            hook.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
    hook.sent = False
    return hook


if __name__ == "__main__":
    out_root, runs_json = sys.argv[1], sys.argv[2]
    for option in sys.argv[3:]:
        if option.startswith("--sigterm-at="):
            train.log_info = sigterm_once_past(float(option.split("=", 1)[1]))
    for name, overrides in json.loads(runs_json).items():
        configuration.run_or_exit("train.py", lambda: run(os.path.join(out_root, name), overrides))
