"""Where train.py's time goes beside its steps (call 26's split): one run of train.py with timed phases.
Run from the repository root on a GPU, with Fashion-MNIST's files where the configuration's data_dir says:

    [OLD_PACKAGE=FOLDER] python experiments/results/full_budget/device/split_phases.py MODE CONFIG key=value...

MODE: fp32 (train.py as it is) | lag32 (runs.LossCheck.LAG 32: the host may run 32 steps ahead of the GPU)
| nobook (no per-step loss check, epoch sums only from each epoch's first step: their cost's upper bound)
| syncsave (each checkpoint written before the run goes on, as before fe20c7e, instead of in the background).
OLD_PACKAGE: a folder holding another version's `powergossip` package (git archive REV powergossip | tar -x -C FOLDER),
imported instead of the repository's. Prints a DIAG line: host times (the device synchronized) of the import, loading the
data, building the replicas and the method, start-up to the first step's end, every checkpoint save, the host's time in
each end of an epoch (min, median, max, ms), the run's wall time and final averaged-model accuracy. Call 26 ran it as:

    C="experiments/results/full_budget/runs/ring8_moniqua_seed2/config.yaml num_epochs=30 overwrite=true output_dir=runs/d"
    python experiments/results/full_budget/device/split_phases.py fp32 $C checkpoint_every=10   # and checkpoint_every=0,
        # evaluate_average_model=false, the modes nobook and lag32, and with OLD_PACKAGE (0f82cef's package)
"""
import sys, time, os, json
T0 = time.time()
sys.path.insert(0, os.environ.get("OLD_PACKAGE") or os.getcwd())
import torch
from powergossip import train, metrics, runs
from powergossip.models import stacked
mode, args = sys.argv[1], sys.argv[2:]
sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
marks = {"import_s": time.time() - T0}
original_gradients = stacked.StackedReplicas.gradients
def gradients(self, *a, **k):
    out = original_gradients(self, *a, **k)
    if "first_step_s" not in marks:
        sync(); marks["first_step_s"] = time.time() - T0
    return out
stacked.StackedReplicas.gradients = gradients
def timed(owner, name, label):  # host time of a start-up phase, the device synchronized at both ends
    original = getattr(owner, name)
    def wrapper(*a, **k):
        sync(); t = time.time(); out = original(*a, **k); sync()
        marks.setdefault(label + "_s", round(time.time() - t, 4)); return out
    setattr(owner, name, wrapper)
timed(train, "load_data", "load_data"); timed(stacked.StackedReplicas, "__init__", "replicas"); timed(train, "build_method", "build_method")
host_end = []  # host seconds in metrics.end_of_epoch (no synchronization: what the GPU's queue must cover)
original_end = metrics.end_of_epoch
def end_of_epoch(*a, **k):
    t = time.time(); out = original_end(*a, **k); host_end.append(time.time() - t); return out
metrics.end_of_epoch = end_of_epoch
if mode == "syncsave":  # the save waits for its own write
    background_save = runs.Checkpoints.save
    def save_and_wait(self, state): background_save(self, state); self.wait()
    runs.Checkpoints.save = save_and_wait
original_save = runs.Checkpoints.save  # (with syncsave: the save and its write)
saves = []
def save(self, state):
    sync(); t = time.time(); original_save(self, state); sync(); saves.append(time.time() - t)
runs.Checkpoints.save = save
if mode == "lag32":  # the host may run 32 steps ahead of the GPU instead of 8 (does it starve at an epoch's end?)
    runs.LossCheck.LAG = 32
if mode == "nobook":  # no per-step loss check or epoch sums (an upper bound of what they cost)
    runs.LossCheck.watch = lambda self, *a, **k: None
    original_add = metrics.EpochTotals.add
    def add(self, losses, corrects, counts, rows=slice(None)):  # an epoch's first step only (the figure needs a loss)
        if self.trained.any(): self.trained[rows] = True
        else: original_add(self, losses, corrects, counts, rows)
    metrics.EpochTotals.add = add
train.command_line(args)
folder = [a.split("=", 1)[1] for a in args if a.startswith("output_dir=")][-1]
sync(); marks["end_s"] = time.time() - T0
marks["saves_s"] = [round(s, 4) for s in saves]
marks["end_of_epoch_host_ms"] = [round(1000 * min(host_end), 1), round(1000 * sorted(host_end)[len(host_end) // 2], 1), round(1000 * max(host_end), 1)]
summary = json.load(open(os.path.join(folder, "summary.json")))
marks["wall_time_s"] = summary["wall_time_s"]; marks["test_avg_accuracy"] = summary["test_avg_accuracy"]
print("DIAG", mode, " ".join(args[1:]), json.dumps(marks), flush=True)
