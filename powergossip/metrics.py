"""What train.py measures and records: per-worker totals of an epoch, evaluation of a
model on the test set, the end-of-epoch records (every worker's train and test loss
and accuracy, the averaged model's, consensus distances, spectra of neighbour
differences, timers), and the Recorder that writes each record to
`output_dir/metrics.jsonl`, TensorBoard and the `log_metric` hook.

A record is one JSON object per line of metrics.jsonl:

    {"name": "accuracy", "value": 0.87, "epoch": 3.0, "bits": 1.6e7, "messages": 960.0,
     "tags": {"split": "test_avg"}}

- "epoch" counts from 1 (the record is taken at the end of that epoch; on a GPU it is
  written once the averaged model's test, which runs beside the next epoch's first steps,
  has ended: Recorder.aside); there is no step field.
- "bits" / "messages": sent per worker so far (mean over workers, cumulative), so any
  metric can be plotted against communication, the paper's x-axis.
- "tags": "split" (train, test: each worker's own model, test_avg: the averaged
  model, test_worst: the lowest of the workers' own test accuracies, runtime) and
  "worker" for a worker's own record; records without "worker" are means over workers
  (test_worst: their minimum).
- `time_<section>` records (split runtime) are cumulative: the seconds spent in that
  section since this launch began (a resumed run counts from its resume). The step's
  compute is `time_batch`, `time_forward_backward` and `time_update`.
- `communication_time_model` (split network_model): the seconds a worker's
  communication since the start of the run would take on a latency-bandwidth network
  (`network_seconds`, train.py's `network_*` keys), from the same bits and messages.
- `messages_lost` (split network, with message_loss_probability > 0): of the messages a worker
  sent since the start of the run (the record's "messages"), how many were lost (faults.py).
- "simulated_time_s" (with simulated_clock=true only; no such field otherwise): the run's
  simulated time when the record was written, the seconds its steps so far take on the
  cluster the clock's keys describe (powergossip/clock.py; the same in every launch layout
  and after a resume).
- `simulated_time`, `simulated_compute`, `simulated_sending`, `simulated_waiting` (split
  clock, with simulated_clock=true): at the end of each epoch, the simulated time and where
  each worker's went since the start of the run: computing, sending what compute did not
  hide, and waiting (latency, slower neighbours, lost messages' timeouts); per worker the
  three add up to the worker's own time (the slowest worker's is simulated_time). AD-PSGD's
  (asynchronous.py) count its gradients ended and their exchanges: they add up to when its
  last exchange was over, at most simulated_time (a gradient under way is not in them yet).
- `metrics_gap` (split history): written by a resume with accept_metrics_gap=true when
  epochs the checkpoint covers have no records (`resumed_history`); "value" counts them,
  tags "missing_epochs" lists them, "epoch" is the checkpoint's.

TensorBoard gets every record without a "worker" tag twice, three times with the clock on
(runs.to_tensorboard): tag `<name>/<tags...>` against the epoch, tag
`by_kB_sent/<name>/<tags...>` against the kB sent per worker (TensorBoard's steps are
integers: kB keep small runs apart), and with the clock on `by_simulated_us/<name>/<tags...>`
against the simulated microseconds. At the end of a run, `output_dir/curves.png`
(figures.training_figure) plots the curves against epochs and MB sent (and simulated
seconds, with the clock on), the spread over workers shaded.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import math
import os
import warnings
import weakref

import numpy as np
import torch

from powergossip import configuration, data, models, runs
from powergossip.models.stacked import loss_and_correct


class EpochTotals:
    """Per-local-worker sums of the epoch's training loss, correct predictions and counts.

    On a GPU the steps of every local worker are kept and added `FOLD` at a time (`folded`):
    six kernels for those steps, where adding each step took at least six. The host launches
    each kernel, and a training step's launches are time the device waits. The sums are those
    of adding the steps one after the other, in order."""

    FOLD = 8  # steps added at once on a GPU

    def __init__(self, loss, correct, count, trained, hidden=None):
        self._sums = torch.stack([loss, correct, count])  # [3, local workers], float64
        self.hidden = hidden
        self.trained = trained  # on the host: whether each local worker took a gradient (read without waiting)
        self.fold_every = self.FOLD if self._sums.is_cuda else 1
        self.steps = []  # every local worker's (losses, corrects, counts) of the steps not added yet

    @classmethod
    def zeros(cls, num_local, device):
        return cls(*(torch.zeros(num_local, dtype=torch.float64, device=device) for _ in range(3)),
                   np.zeros(num_local, dtype=bool))

    @property
    def loss(self):
        return self.folded()[0]

    @property
    def correct(self):
        return self.folded()[1]

    @property
    def count(self):
        return self.folded()[2]

    def add(self, losses, corrects, counts, rows=slice(None)):
        """A step's losses, correct predictions and counts of the local workers `rows` (all; an
        asynchronous run's event: one worker's gradient)."""
        self.trained[rows] = True
        if rows == slice(None):
            self.steps.append((losses, corrects, counts))
            if len(self.steps) >= self.fold_every:
                self.folded()
            return
        sums = self.folded()
        sums[0, rows] += losses.double() * counts
        sums[1, rows] += corrects.double()
        sums[2, rows] += counts

    def folded(self):
        """The sums with every step added: the kept steps' loss x count, correct and count in
        float64, as one step's are, added in order (a cumulative sum along the steps adds them
        one after the other)."""
        if self.steps:
            steps = torch.stack([value for step in self.steps for value in step]).view(len(self.steps), 3, -1).double()
            steps[:, 0] *= steps[:, 2]
            self._sums.copy_(torch.cat([self._sums[None], steps]).cumsum(0)[-1])
            self.steps = []
        return self._sums

    def state(self):
        hidden = None if self.hidden is None else [list(h) for h in self.hidden]
        loss, correct, count = self.folded()  # views: a save copies what it is given (runs.Checkpoints.save)
        return {"loss": loss, "correct": correct, "count": count, "hidden": hidden}

    @classmethod
    def from_state(cls, state, device):
        """The totals a checkpoint saved; None when the checkpoint ended an epoch."""
        if state is None:
            return None
        hidden = None if state["hidden"] is None else [tuple(h.to(device) for h in pair) for pair in state["hidden"]]
        return cls(state["loss"].to(device), state["correct"].to(device), state["count"].to(device),
                   (state["count"] > 0).cpu().numpy(), hidden)


GAP = "metrics_gap"  # a record that marks epochs whose records were lost before a resume


def resumed_history(comm, folder: str, epoch: int, step: int, accept_gap: bool) -> tuple[list[dict], dict | None]:
    """What a run resumed from a checkpoint after `epoch` whole epochs (and `step` steps) keeps
    of its metrics.jsonl, read before anything is changed: (the records of epochs 1..epoch,
    on process 0 ([] on the others); None, or a GAP record, the same on every process). Each
    of those epochs must have records, or be listed by an earlier GAP record: a history that
    does not reach the checkpoint (a deleted metrics.jsonl, lost records) is a ConfigError on
    every process naming accept_metrics_gap=true, unless `accept_gap`; then a warning says
    which epochs are missing and the returned GAP record lists them ("value": how many,
    "tags": {"split": "history", "missing_epochs": [...]}; Recorder adds bits and messages)."""
    kept, missing, problem = [], [], None
    if comm.process_index == 0:
        path = os.path.join(folder, "metrics.jsonl")
        exists = os.path.exists(path)
        try:
            kept = [r for r in runs.read_metrics(path) if r["epoch"] <= epoch] if exists else []
        except ValueError as bad:  # a line that is not a record: say which, change nothing
            kept, exists = [], True
            problem = f"resume=true but {bad}: repair or remove that line, then resume again"
        covered = {int(r["epoch"]) for r in kept if r["name"] != GAP}
        covered |= {e for r in kept if r["name"] == GAP for e in r["tags"]["missing_epochs"]}
        missing = [e for e in range(1, epoch + 1) if e not in covered]
        if missing and problem is None:
            lost = (f"{folder} has no metrics.jsonl" if not exists else f"{path} has no records of epochs {_ranges(missing)}")
            if accept_gap:
                warnings.warn(f"{lost}; going on as accept_metrics_gap=true asks: a {GAP!r} record in metrics.jsonl "
                              f"lists the missing epochs")
            else:
                problem = (f"resume=true but {lost}, while the checkpoint continues from {runs.position(epoch, step)}: "
                           f"the run's history does not reach its checkpoint. Put the records back, or pass "
                           f"accept_metrics_gap=true to go on without them (the gap is recorded in metrics.jsonl)")
    missing, problem = comm.gather_objects((missing, problem))[0]
    if problem is not None:
        raise configuration.ConfigError(problem)
    gap = {"name": GAP, "value": float(len(missing)), "epoch": float(epoch), "tags": {"split": "history", "missing_epochs": missing}}
    return kept, gap if missing else None


def _ranges(numbers: list[int]) -> str:
    """'1-3, 7' for [1, 2, 3, 7] (sorted)."""
    groups = []
    for number in numbers:
        if groups and number == groups[-1][1] + 1:
            groups[-1][1] = number
        else:
            groups.append([number, number])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in groups)


class Recorder:
    """Writes records (process 0): metrics.jsonl, TensorBoard and the log_metric hook.
    bits/messages are per worker (mean over workers, cumulative). metrics.jsonl starts with
    `history` (a resumed run's records, `resumed_history`) and `gap` (when not None: its
    GAP record, with the bits and messages restored from the checkpoint), which replace
    the file in one atomic step."""

    def __init__(self, comm, folder: str, run_id: str, history: list[dict], gap: dict | None, log_metric, clock=None):
        self.comm, self.folder, self.run_id, self.log_metric = comm, folder, run_id, log_metric
        self.clock = clock  # the run's clock.RunClock: every record gains its simulated_time_s (None, ClockOff: none)
        self.queue: list[tuple] = []  # (value, what takes it) of the records taken and the checks not written yet (flush)
        self.then: list = []  # what follows their writing (flush): train.py's epoch line
        self.stream = None  # a GPU's stream for work whose records wait (aside) and their copy to the host, made on first use
        self.staged = None  # (how many queued records, their GPU values on the host, the event that copy ends with)
        self.aside_done = None  # the event the last work aside ended with, until the current stream waits for it
        self.written_time = None  # the simulated time of the last record written (the epoch line's)
        self.is_root = comm.process_index == 0
        self.last_test_avg = None
        self.latest: dict[tuple[str, str], float] = {}  # (name, split) -> the last record over all workers
        self.bits = self.messages = 0.0  # per worker, cumulative; refreshed by count_traffic()
        if gap is not None:
            self.count_traffic()
            history = history + [gap | {"bits": float(self.bits), "messages": float(self.messages)} | self.simulated_time()]
        if not self.is_root:
            return
        self.file = runs.MetricsFile(folder, history)  # summary.json stays until this run writes its own
        for record in history:
            if record["name"] == "accuracy" and record["tags"].get("split") == "test_avg":
                self.last_test_avg = record["value"]
        self.tensorboard = runs.tensorboard_writer(folder, history if history or gap is not None else None)  # a resume: rewritten

    def count_traffic(self, also=()) -> np.ndarray:
        """Bits and messages sent per worker so far (mean over workers); collective. `also`: more
        numbers to sum over processes in the same all-reduce; returns their sums."""
        totals = np.array([self.comm.bytes_sent.sum() * 8.0, self.comm.messages_sent.sum(), *also], dtype=np.float64)
        totals = self.comm.sum_over_processes(totals)
        self.bits, self.messages = totals[:2] / self.comm.n_workers
        return totals[2:]

    def record(self, name, epoch, value, tags):
        """Takes a record with the run's counts (and simulated time) as they are now; `value` is a
        number, a one-number tensor the device may still be computing, or a function that gives
        the number once the device has passed what was launched before the record (runs.Timers.cut).
        flush() writes it (`_write`)."""
        if self.is_root:
            counts = {"epoch": float(epoch), "bits": float(self.bits), "messages": float(self.messages)} | self.simulated_time()
            self.queue.append((value, functools.partial(self._write, name, counts, tags)))

    def check(self, values, refusal):
        """What is taken from now on is written only if `refusal` lets it through. `values`: a
        tensor the device may still be computing, the same on every process (train.py: where each
        worker of the run diverged, runs.LossCheck.diverged_at gathered); flush reads it in the
        records' order, as a float64 numpy array of its shape, and calls `refusal(array)`, which
        returns None or the error to raise instead: then flush raises it and drops what follows,
        records and what would follow their writing (`then`), on every process."""
        self.queue.append((values, functools.partial(self._refuse, refusal)))

    def _refuse(self, refusal, values: np.ndarray):
        error = refusal(values)
        if error is not None:
            self.queue, self.then = [], []  # what a check refuses is no result: never written
            raise error

    @contextlib.contextmanager
    def aside(self, device: torch.device):
        """On a GPU, the work inside runs on a stream of its own, after what the device has queued
        so far, and the next steps do not wait for it; record its results: their copy to the host
        follows it on that stream (flush), so they are written, and the work is over, once it has
        ended. Elsewhere nothing changes."""
        if device.type != "cuda":
            yield
            return
        with torch.cuda.stream(self._stream(device)):
            yield
        self.aside_done = self.stream.record_event()

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        """The stream aside, after everything launched so far on the current one."""
        if self.stream is None:
            self.stream = torch.cuda.Stream(device)
        self.stream.wait_stream(torch.cuda.current_stream(device))
        return self.stream

    @contextlib.contextmanager
    def written_at_exit(self, read_steps):
        """Around a run's loop: a run that ends with an error still writes the records taken before
        it, but none that a check refuses (`check`). The error raised is the run's own, unless it
        is not a FloatingPointError (the loss check's, which names the step) and the run diverged
        before it (an error of a diverged model: a NaN in a method's state, a failed
        factorization): then the divergence is raised, the run's error its cause. The divergence
        is what `read_steps()` raises (train.py: runs.LossCheck.finish, which reads the steps the
        loss check has not read yet) or else what a check the flush reads raises (another
        process's worker)."""
        try:
            yield
        except BaseException as error:
            diverged = None
            for read in (read_steps, self.flush):
                try:
                    read()
                except FloatingPointError as found:
                    diverged = diverged or found
                except Exception:  # the run's error says more
                    pass
            if diverged is not None and not isinstance(error, FloatingPointError):
                raise diverged from error
            raise

    def flush(self, if_ready: bool = False):
        """Writes the records taken, in order, unless a check refuses them (`check`), then runs what
        follows them (`then`). On a GPU this waits for a copy (`_stage`) that follows everything
        launched so far, the steps never do: their tensors reach the host in it, and what runs here
        reads only what the device has passed. With `if_ready` a call starts that copy or, once it
        has ended, writes: it never waits. Without, what follows on the current stream also waits
        for the work aside (on every process)."""
        if self.aside_done is not None and not if_ready:
            torch.cuda.current_stream(self.stream.device).wait_event(self.aside_done)
            self.aside_done = None
        while self.queue or self.then:
            if self.staged is None:
                self.staged = self._stage()
            count, host, ended = self.staged
            if ended is not None and not ended.query():
                if if_ready:
                    return
                ended.synchronize()
            self.staged = None
            written, self.queue = self.queue[:count], self.queue[count:]
            staged, at = (host.numpy() if host is not None else None), 0
            for value, take in written:
                if callable(value):
                    value = value()
                elif isinstance(value, torch.Tensor) and value.is_cuda:
                    value, at = staged[at:at + value.numel()].reshape(value.shape), at + value.numel()
                elif isinstance(value, torch.Tensor):
                    value = value.detach().double().numpy()
                take(value)
            if not self.queue:  # records taken after the copy began wait for the next one
                then, self.then = self.then, []
                for action in then:
                    action()

    def _stage(self) -> tuple:
        """(how many records and checks are queued, their GPU tensors' values one after the other
        in pinned host memory, float64, the event their copy ends with): on a GPU one copy on the
        stream aside, after everything launched so far there and on the current stream (with no
        value to copy, the event alone); elsewhere (count, None, None)."""
        if self.comm.device.type != "cuda":
            return len(self.queue), None, None
        on_gpu = [value for value, _ in self.queue if isinstance(value, torch.Tensor) and value.is_cuda]
        with torch.cuda.stream(self._stream(self.comm.device)):
            host = None
            if on_gpu:
                host = torch.empty(sum(value.numel() for value in on_gpu), dtype=torch.float64, pin_memory=True)
                host.copy_(torch.cat([value.reshape(-1).double() for value in on_gpu]), non_blocking=True)
            return len(self.queue), host, self.stream.record_event()

    def _write(self, name, counts, tags, value):
        """Writes a record; `value`: a number, or a numpy array of one (flush)."""
        value = float(np.reshape(value, ()))
        if name == "accuracy" and tags.get("split") == "test_avg":
            self.last_test_avg = value
        if "worker" not in tags and "split" in tags:
            self.latest[name, tags["split"]] = value
        values = {"value": value} | counts
        self.written_time = counts.get("simulated_time_s")
        self.file.write({"name": name, **values, "tags": tags})
        if self.tensorboard is not None:
            runs.to_tensorboard(self.tensorboard, {"name": name, **values, "tags": tags})
        self.log_metric(name, values, tags)

    def simulated_time(self) -> dict:
        """{"simulated_time_s": the run's simulated time so far} with the clock on, else {}."""
        now = None if self.clock is None else self.clock.now
        return {} if now is None else {"simulated_time_s": now}

    def record_clock(self, epoch: int) -> None:
        """With the clock on, where each worker's simulated time went (clock.RunClock.spent):
        the run's simulated_time and each worker's simulated_compute, _sending and _waiting
        seconds so far (split clock), each also as the mean over workers."""
        if not self.simulated_time():
            return
        self.record("simulated_time", epoch, self.clock.now, {"split": "clock"})
        for part, seconds in zip(self.clock.PARTS, self.clock.spent.tolist()):
            for worker, value in enumerate(seconds):
                self.record(f"simulated_{part}", epoch, value, {"split": "clock", "worker": worker})
            self.record(f"simulated_{part}", epoch, float(np.mean(seconds)), {"split": "clock"})

    def epoch_line(self, epoch: int, num_epochs: int) -> str:
        """The epoch's numbers for a line of progress (runs.Progress adds the times)."""
        def shown(name, split, form):
            value = self.latest.get((name, split))
            return "n/a" if value is None else format(value, form)
        workers = "" if ("accuracy", "test_worst") not in self.latest else (
            f" (workers: mean {shown('accuracy', 'test', '.2%')}, worst {shown('accuracy', 'test_worst', '.2%')})")
        now = self.written_time  # the epoch's records' own (the clock may have run on since)
        simulated = "" if now is None else f", simulated time {now:.4g} s"
        return (f"epoch {epoch}/{num_epochs}: train loss {shown('loss', 'train', '.4f')}, averaged-model test accuracy "
                f"{shown('accuracy', 'test_avg', '.2%')}{workers}, {runs.megabytes(self.bits / 8)} MB sent per worker{simulated}")

    def summary(self, cfg, wall_time):
        """summary.json (which marks the run as finished), curves.png and the summary line."""
        self.flush()
        self.count_traffic()
        if not self.is_root:
            return
        mb_per_epoch = self.bits / 8 / 1e6 / max(1, cfg["num_epochs"])
        accuracy = "not evaluated" if self.last_test_avg is None else f"{100 * self.last_test_avg:.2f}%"
        from powergossip import figures  # here: only the process that draws pays for matplotlib

        run = f"{cfg['optimizer']} on a {cfg['n_workers']}-worker {cfg['topology']}, {cfg['task']} {cfg['task_architecture']}"
        figure = os.path.join(self.folder, "curves.png")
        records = runs.read_metrics(self.folder)
        drawn = figures.training_figure(records, run)
        runs.write_file(figure, lambda f: figures.write_png(drawn, f), binary=True)
        summary = {"test_avg_accuracy": self.last_test_avg, "mb_per_worker_per_epoch": mb_per_epoch,
                   "wall_time_s": wall_time, "epochs": cfg["num_epochs"], "run_id": self.run_id} | self.simulated_time()
        target = "" if cfg["target_accuracy"] is None else "; " + reaching(records, cfg["target_accuracy"], summary)
        runs.write_summary(self.folder, summary)
        now = self.simulated_time().get("simulated_time_s")
        simulated = "" if now is None else f"; simulated time {now:.4g} s"
        print(f"\nsummary: {run}: averaged-model test accuracy {accuracy}; {mb_per_epoch:.3f} MB sent per worker per "
              f"epoch; wall time {wall_time:.1f} s{simulated}{target}; results in {self.folder}, figure {figure}", flush=True)

    def close(self):
        if self.is_root:
            self.file.close()
            if self.tensorboard is not None:
                self.tensorboard.close()


def reaching(records: list[dict], target: float, summary: dict) -> str:
    """Where the run's averaged model first reached test accuracy `target`: adds to `summary` the
    "target_accuracy", the "target_epoch" (None: not reached), the MB a worker had sent by then
    ("target_mb_per_worker") and, with the simulated clock, the "target_simulated_time_s"; returns
    a phrase for the summary line."""
    first = next((r for r in records if r["name"] == "accuracy" and r["tags"] == {"split": "test_avg"}
                  and r["value"] >= target), None)
    summary["target_accuracy"] = target
    summary["target_epoch"] = None if first is None else first["epoch"]
    if first is None:
        return f"test accuracy {100 * target:.2f}% not reached"
    summary["target_mb_per_worker"] = first["bits"] / 8 / 1e6
    phrase = f"test accuracy {100 * target:.2f}% reached at epoch {first['epoch']:g}, {summary['target_mb_per_worker']:.4g} MB sent per worker"
    if "simulated_time_s" in first:
        summary["target_simulated_time_s"] = first["simulated_time_s"]
        phrase += f", simulated time {first['simulated_time_s']:.4g} s"
    return phrase


@torch.no_grad()
def evaluate(model, dataset, cfg, graphed: bool = False) -> torch.Tensor:
    """Test loss and accuracy (perplexity-ready mean loss per token for the language model) over
    exactly the first min(max_test_examples, test set) examples, for any evaluation batch size:
    images in order; the language model's predicted tokens window by window, a window's row by row.
    At the training's precision: with dtype=bfloat16 under bfloat16 autocast, as the steps run
    (models/stacked.py), on a GPU with the images channels_last, as stacked_compute=graph's steps
    take them.
    A float64 tensor [loss, accuracy] on the model's device, not waited for.

    `graphed` (an image model on a GPU; train.py's averaged model under stacked_compute=graph):
    the first call runs as above and records its kernels in a CUDA graph, which later calls with
    the same model object (refilled in place: StackedReplicas.model_from_rows), data set and
    settings replay: the same kernels, so the same numbers, with one launch where the host
    launched about a hundred kernels per batch, time a GPU waited at the end of every epoch."""
    if graphed and not dataset.is_language_model and next(model.parameters()).is_cuda:
        return _graphed_test(model, dataset, cfg)
    return _test_pass(model, dataset, cfg)


def _graphed_test(model, dataset, cfg) -> torch.Tensor:
    """evaluate(graphed=True): the test pass of `model`, from its second call on a replay of the
    first call's pass recorded in a CUDA graph (_replayed), recorded again when the model's
    tensors have moved or the data set or its test tensors are others (a model's pass records
    as its steps do under stacked_compute=graph)."""
    key = (tuple(t.data_ptr() for t in itertools.chain(model.parameters(), model.buffers())),
           cfg["dtype"], cfg["evaluation_batch_size"], cfg["max_test_examples"])
    return _replayed(model, key, (dataset, dataset.test_x, dataset.test_y),
                     lambda recording: (_test_pass(model, dataset, cfg, keep_casts=not recording),))[0]


_RECORDINGS = weakref.WeakKeyDictionary()  # owner -> (what it was recorded for, what it reads, graph, its outputs)


def _replayed(owner, key, reads: tuple, run) -> tuple:
    """run(recording=False)'s outputs (a tuple), from the second call for `owner` on a replay of
    run(recording=True) recorded in a CUDA graph: the same kernels, so the same numbers, in one
    launch. The first call runs and then records (this waits for the device once). A graph
    reads and writes the memory it was recorded with: it is recorded again when `key` (the
    data pointers it depends on and the settings) differs or the objects `reads` are others,
    and it keeps those alive. Tensor outputs are copies out of the graph's memory, which the
    next replay overwrites."""
    recorded = _RECORDINGS.get(owner)
    if recorded is not None and recorded[0] == key and all(a is b for a, b in zip(recorded[1], reads)):
        recorded[2].replay()
        return tuple(o.clone() if isinstance(o, torch.Tensor) else o for o in recorded[3])
    outputs = run(recording=False)  # also the warm-up a capture needs (cuDNN's plans, the allocator)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # waits for the device
        recorded_outputs = run(recording=True)  # recorded, not run
    _RECORDINGS[owner] = (key, reads, graph, recorded_outputs)
    return outputs


def _test_pass(model, dataset, cfg, keep_casts: bool = True) -> torch.Tensor:
    """evaluate's pass over the test set, launched kernel by kernel (`keep_casts=False` inside a
    CUDA graph's capture: a graph cannot keep autocast's weight casts; the same values)."""
    model.eval()
    device = next(model.parameters()).device
    half = cfg["dtype"] == "bfloat16"
    precision = torch.autocast(device.type, dtype=torch.bfloat16, enabled=half, cache_enabled=None if keep_casts else False)
    channels_last = half and device.type == "cuda"
    sums, count = None, 0  # [loss, correct] in float64 on the model's device: the host never waits here
    hidden = None
    limit = math.inf if cfg["max_test_examples"] is None else cfg["max_test_examples"]
    if dataset.is_language_model:
        batches = data.test_batches(dataset, cfg["batch_size"], bptt=cfg["bptt"])
    else:  # no batch larger than the limit: nothing beyond it is normalized or run
        batches = data.test_batches(dataset, min(cfg["evaluation_batch_size"], limit))
    for x, y in batches:
        room = limit - count  # examples still to evaluate
        if room <= 0:
            break
        if dataset.is_language_model:
            with precision:
                logits, hidden = model(x, hidden)
            if y.numel() > room:  # the window's first `room` predictions
                logits, y = logits.reshape(y.numel(), -1)[:room], y.reshape(-1)[:room]
        else:
            if len(y) > room:
                x, y = x[:room], y[:room]
            with precision:
                logits = model(x.contiguous(memory_format=torch.channels_last) if channels_last else x)
        loss, right = loss_and_correct(logits, y, reduction="sum")
        batch = torch.stack([loss.double(), right.double()])  # float32 loss and integer count, exact in float64
        sums, count = batch if sums is None else sums + batch, count + y.numel()  # batch by batch, in order
    model.train()
    # float64 divisions as the host's: a GPU divides by a number as a product with its reciprocal, which
    # may round otherwise; by a tensor of the same shape it divides
    return sums / torch.full_like(sums, count)


def network_seconds(bits, messages, latency_s: float, bandwidth_bits_per_s: float):
    """Seconds a worker spends communicating on a latency-bandwidth network: alpha per message
    plus its bits at the link's bandwidth beta (the alpha-beta model).

    A worker's messages go in sequence over its one link (its network interface, shared by
    all its neighbours), so their times add up; the gossip step is synchronous and every
    worker of a regular graph sends the same. Linear in bits and messages, so applied to a
    run's cumulative counts (train.py's records: per worker, mean over workers) it gives the
    sum of every step's time. Counts are what comm.py sends: all-reduce and PowerSGD count the
    buffer once per step, one message, which is less than a ring all-reduce moves."""
    return messages * latency_s + bits / bandwidth_bits_per_s


def total_seconds(times, label: str) -> float:
    """A timer's seconds so far, from runs.Timers.cut's summary."""
    mean, _, instances = times()[label]
    return mean * instances


def end_of_epoch(cfg, epoch, totals, workers, dataset, comm, recorder, timers, diverged_at, divergence):
    """Train and test metrics per worker, of the averaged model, consensus distances, spectra;
    written only if no worker of any process diverged so far: `diverged_at` (on the device, a
    row per local worker: runs.LossCheck.diverged_at) is gathered over processes with the train
    metrics and `divergence` (runs.LossCheck.divergence) judges it before any record of the
    epoch is written (Recorder.check)."""
    e = epoch + 1
    recorder.flush()  # the last epoch's records first (and its model's test is over: the model is refilled below)
    # The gossip is done for this epoch: every record carries the same counts. Their sum over processes also
    # counts, on the host (no wait for the device), which workers trained (an asynchronous run's worker may end no
    # gradient in an epoch) and the messages lost.
    mine = np.zeros(comm.n_workers + 1)
    mine[comm.first_worker:comm.first_worker + comm.num_local] = totals.trained
    mine[-1] = comm.messages_lost.sum()
    summed = recorder.count_traffic(also=mine)
    trained, lost = (summed[:-1] > 0).tolist(), summed[-1]
    # Values stay on the device until the records are written (Recorder.flush): one copy to the host. Where workers
    # diverged goes with the train metrics: every process learns whether a worker of any process did without a wait
    # or a collective of its own, and no record below is written if one did.
    train = comm.all_gather_workers(torch.cat([torch.stack([totals.loss / totals.count, totals.correct / totals.count],
                                                           dim=1), diverged_at], dim=1))
    train, everyone = train[:, :2], train[:, 2:]
    recorder.check(everyone, divergence)
    for worker, (loss, accuracy) in enumerate(train):
        if trained[worker]:
            recorder.record("loss", e, loss, {"split": "train", "worker": worker})
            recorder.record("accuracy", e, accuracy, {"split": "train", "worker": worker})
    if not all(trained):  # the mean over the workers that trained (rows taken one by one: no index copied to a GPU)
        train = torch.stack([row for row, did in zip(train, trained) if did])
    recorder.record("loss", e, train[:, 0].mean(), {"split": "train"})
    recorder.record("accuracy", e, train[:, 1].mean(), {"split": "train"})

    if cfg["evaluate_each_worker"]:
        test = comm.all_gather_workers(torch.stack([evaluate(replica, dataset, cfg) for replica in workers.replicas]))
        for worker, (loss, accuracy) in enumerate(test):
            recorder.record("loss", e, loss, {"split": "test", "worker": worker})
            recorder.record("accuracy", e, accuracy, {"split": "test", "worker": worker})
        recorder.record("loss", e, test[:, 0].mean(), {"split": "test"})
        recorder.record("accuracy", e, test[:, 1].mean(), {"split": "test"})
        recorder.record("accuracy", e, test[:, 1].min(), {"split": "test_worst"})  # the RelaySGD paper's measure

    # Under stacked_compute=graph (a GPU), from the second epoch on, the averaged model with the consensus distances and
    # the model's test are each one CUDA graph's replay, where the host launched some 800 and 1,000 small kernels while
    # the GPU waited.
    graphed = cfg["stacked_compute"] == "graph"
    model, distances = averaged_state(workers, comm, cfg["evaluate_average_model"], graphed)
    if cfg["evaluate_average_model"]:
        if dataset.is_language_model:  # its perplexity is taken on the host
            loss, accuracy = evaluate(model, dataset, cfg).tolist()
        else:  # on a GPU beside the next epoch's first steps (Recorder.aside): the model is this test's alone
            with recorder.aside(comm.device):
                loss, accuracy = evaluate(model, dataset, cfg, graphed=graphed)
        recorder.record("loss", e, loss, {"split": "test_avg"})
        recorder.record("accuracy", e, accuracy, {"split": "test_avg"})
        if dataset.is_language_model:
            recorder.record("perplexity", e, math.exp(min(loss, 50.0)), {"split": "test_avg"})

    distances = comm.all_gather_workers(distances)
    recorder.record("consensus_distance", e, distances[:, 0].mean(), {"type": "params_only"})
    recorder.record("consensus_distance", e, distances[:, 1].mean(), {"type": "full_state_vector"})

    if e in cfg["spectrum_logging_epochs"]:
        log_spectra(cfg, e, workers, comm, recorder)
    labels, times = timers.cut()  # read when the records are written: the host does not wait for the device here
    for label in labels:
        recorder.record(f"time_{label}", e, functools.partial(total_seconds, times, label), {"split": "runtime"})
    recorder.record("communication_time_model", e, network_seconds(recorder.bits, recorder.messages, cfg["network_latency_s"],
                                                                   cfg["network_bandwidth_bits_per_s"]), {"split": "network_model"})
    if cfg["message_loss_probability"]:
        recorder.record("messages_lost", e, lost / comm.n_workers, {"split": "network"})


def averaged_state(workers, comm, with_model: bool, graphed: bool = False):
    """The workers' average x̄ = (1/n) sum_i x_i of the parameters and float buffers, put into the
    standalone model (StackedReplicas.model_from_rows; None without `with_model`), and each
    local worker's consensus distance ||x_i - x̄|| [L, 2]: over the parameters, and over the
    parameters and float buffers (the full state vector).
    `graphed` (on a GPU, in one process: no collective in a graph): from the second call on, a
    replay of the first call's kernels, recorded in a CUDA graph (_replayed): the same numbers. The graph keeps the memory of its
    intermediates, as much as an eager call's peak: about 20 bytes per worker and entry of the
    largest parameter (its float64 difference to the mean), 6 MB for 8 ResNet-20 workers."""
    def run(recording: bool):  # the same kernels, recorded or not
        mean_params = comm.all_reduce_mean(workers.params, count=False)
        float_buffers = workers.float_buffer_indices()
        mean_buffers = comm.all_reduce_mean([workers.buffers[k] for k in float_buffers], count=False)
        model = None
        if with_model:
            buffers = [b[0] for b in workers.buffers]
            for k, mean in zip(float_buffers, mean_buffers):
                buffers[k] = mean
            model = workers.model_from_rows(mean_params, buffers)
        params_sq = sum((x - m).reshape(x.shape[0], -1).double().pow(2).sum(dim=1)
                        for x, m in zip(workers.params, mean_params))
        buffers_sq = sum(((workers.buffers[k] - m).reshape(len(workers), -1).double().pow(2).sum(dim=1)
                          for k, m in zip(float_buffers, mean_buffers)), torch.zeros_like(params_sq))
        return model, torch.stack([params_sq.sqrt(), (params_sq + buffers_sq).sqrt()], dim=1)

    if not (graphed and comm.world_size == 1):
        return run(recording=False)
    key = (tuple(t.data_ptr() for t in itertools.chain(workers.params, workers.buffers)), with_model)
    return _replayed(workers, key, (), run)


def check_spectrum_logging(cfg: dict) -> None:
    """The spectrum-logging keys name parameters of the model, epochs of the run and pairs of workers."""
    if cfg["spectrum_logging_params"]:
        with torch.device("meta"):  # names only: no memory, no time
            model = models.build(cfg["task_architecture"], vocab_size=10)
        names = list(dict(model.named_parameters()))  # as StackedReplicas.parameter_names
        unknown = [name for name in cfg["spectrum_logging_params"] if name not in names]
        if unknown:
            raise configuration.ConfigError(f"spectrum_logging_params: {cfg['task_architecture']} has no parameter "
                                   f"{', '.join(map(repr, unknown))}; its parameters: {', '.join(names)}")
    for epoch in cfg["spectrum_logging_epochs"]:
        if not configuration.is_integer(epoch) or not 1 <= epoch <= cfg["num_epochs"]:
            raise configuration.ConfigError(f"spectrum_logging_epochs holds epochs 1..num_epochs={cfg['num_epochs']}, got {epoch!r}")
    for pair in cfg["spectrum_logging_worker_pairs"]:
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(configuration.is_integer(w) and 0 <= w < cfg["n_workers"] for w in pair)
                and pair[0] != pair[1]):
            raise configuration.ConfigError(f"spectrum_logging_worker_pairs holds [i, j] pairs of distinct workers in "
                                   f"0..{cfg['n_workers'] - 1}, got {pair!r}")


def log_spectra(cfg, e, workers, comm, recorder):
    """Singular values of x_i - x_j for the configured parameters and worker pairs (the
    spectrum-logging keys of the original code); measurement traffic is not counted."""
    for name in cfg["spectrum_logging_params"]:  # names checked by check_spectrum_logging (before the run)
        everyone = comm.all_gather_workers(workers.params[workers.parameter_names.index(name)])
        for i, j in cfg["spectrum_logging_worker_pairs"]:
            difference = (everyone[i] - everyone[j]).reshape(everyone.shape[1], -1).double().cpu()
            for index, value in enumerate(torch.linalg.svdvals(difference).tolist()):
                recorder.record("spectrum", e, value, {"parameter": name, "workers": f"{i}-{j}", "index": index})
