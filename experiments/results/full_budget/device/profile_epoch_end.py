"""Where train.py's time goes at the end of an epoch (GPU): synchronized wall times of the
pieces of metrics.end_of_epoch over a short run, then variants of the averaged model's
evaluation on the run's final workers, and torch.profiler over one end of an epoch.
Run from the repository root on a GPU, with Fashion-MNIST's files in .device_work/fashion-mnist:

    python experiments/results/full_budget/device/profile_epoch_end.py OUT_FOLDER 6

It writes OUT_FOLDER/profile.json and OUT_FOLDER/end_of_epoch_profile.txt (call 7's are beside
this file). On a machine without a GPU it runs a few batches on the CPU (a check that it runs)."""
import json, sys, time, copy, os
import torch
GPU = torch.cuda.is_available()
sync = torch.cuda.synchronize if GPU else (lambda: None)
sys.path.insert(0, os.getcwd())  # the repository root
from powergossip import train, metrics, data
from powergossip.models.stacked import StackedReplicas

out = sys.argv[1]
times = {}
def timed(owner, name, label):
    original = getattr(owner, name)
    def wrapper(*a, **k):
        sync(); t = time.perf_counter()
        r = original(*a, **k)
        sync(); times.setdefault(label, []).append(time.perf_counter() - t)
        return r
    setattr(owner, name, wrapper)
    return original

captured = {}
orig_end = metrics.end_of_epoch
def end_capture(*a, **k):
    captured["args"] = a
    return orig_end(*a, **k)
metrics.end_of_epoch = end_capture
timed(metrics, "end_of_epoch", "end_of_epoch")
timed(metrics, "evaluate", "evaluate")
timed(StackedReplicas, "model_from_rows", "model_from_rows")
timed(metrics.Recorder, "record", "record")
timed(metrics, "log_spectra", "log_spectra")
from powergossip import runs
timed(runs.Timers, "summary", "timers.summary")
timed(runs.Checkpoints, "save", "checkpoint.save")
timed(runs.Progress, "end_of_epoch", "progress.end_of_epoch")

metrics.Recorder.close = lambda self: None  # the recorder stays usable for the variants below
epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 6
t0 = time.perf_counter()
train.command_line(["experiments/configs/train/cifar10_resnet20_ring8/power_gossip_1_iteration.yaml", "task=fashion_mnist",
                    "data_dir=.device_work/fashion-mnist", "evaluate_each_worker=false", *(["device=cuda", "stacked_compute=graph", "dtype=bfloat16"] if GPU else ["device=cpu", "max_batches_per_epoch=2", "max_test_examples=2000"]), f"num_epochs={epochs}", "checkpoint_every=0", f"output_dir={out}/run", "overwrite=true"])
total = time.perf_counter() - t0
report = {"wall_s": total, "epochs": epochs}
for label, values in times.items():
    report[label] = {"calls": len(values), "total_s": sum(values), "mean_ms": 1e3 * sum(values) / len(values),
                     "last_ms": 1e3 * values[-1]}

cfg, epoch, totals, workers, dataset, comm, recorder, timers = captured["args"]
mean_params = comm.all_reduce_mean(workers.params, count=False)
buffers = [b[0] for b in workers.buffers]
fb = workers.float_buffer_indices()
for k, m in zip(fb, comm.all_reduce_mean([workers.buffers[k] for k in fb], count=False)):
    buffers[k] = m
model = workers.model_from_rows(mean_params, buffers)
def clock(fn, repeat=10):
    fn(); sync(); t = time.perf_counter()
    for _ in range(repeat): r = fn()
    sync(); return 1e3 * (time.perf_counter() - t) / repeat, r.tolist() if torch.is_tensor(r) else r  # evaluate: a tensor since call 7
variants = {}
variants["evaluate as now (fp32, batch 1000)"] = clock(lambda: metrics.evaluate(model, dataset, cfg))
for bs in (2500, 10000):
    variants[f"evaluate fp32 batch {bs}"] = clock(lambda: metrics.evaluate(model, dataset, dict(cfg, evaluation_batch_size=bs)))
def autocast_eval(bs):
    with torch.autocast("cuda" if GPU else "cpu", dtype=torch.bfloat16):
        return metrics.evaluate(model, dataset, dict(cfg, evaluation_batch_size=bs))
variants["evaluate bf16 autocast batch 1000"] = clock(lambda: autocast_eval(1000))
variants["evaluate bf16 autocast batch 10000"] = clock(lambda: autocast_eval(10000))
model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
variants["evaluate fp32 channels_last batch 1000"] = clock(lambda: metrics.evaluate(model_cl, dataset, cfg))
normalized = [(dataset.normalize(dataset.test_x[s:s+1000]), dataset.test_y[s:s+1000]) for s in range(0, dataset.test_x.shape[0], 1000)]
@torch.no_grad()
def forward_only():
    model.eval()
    acc = None
    for x, y in normalized:
        l = model(x)
        acc = l.sum() if acc is None else acc + l.sum()
    model.train(); return acc.item()
variants["forward only, fp32, pre-normalized batches"] = clock(forward_only)
variants["normalize test set (1000 batches)"] = clock(lambda: [dataset.normalize(dataset.test_x[s:s+1000]) for s in range(0, 10000, 1000)][0].sum().item())
variants["model_from_rows"] = clock(lambda: workers.model_from_rows(mean_params, buffers))
variants["average params+buffers"] = clock(lambda: comm.all_reduce_mean(workers.params, count=False)[0].sum().item())
variants["end_of_epoch whole"] = clock(lambda: orig_end(*captured["args"]), repeat=5)
report["variants_ms"] = {k: v[0] for k, v in variants.items()}
report["variant_results"] = {k: v[1] for k, v in variants.items() if isinstance(v[1], tuple)}
print(json.dumps(report, indent=1))
json.dump(report, open(f"{out}/profile.json", "w"), indent=1)
# torch profiler over one end_of_epoch
from torch.profiler import profile, ProfilerActivity
with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if GPU else [])) as prof:
    orig_end(*captured["args"]); sync()
open(f"{out}/end_of_epoch_profile.txt", "w").write(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40) + "\n\n" +
                                                  prof.key_averages().table(sort_by="cuda_time_total", row_limit=30))
