"""Asynchronous methods on the simulated clock (issue 30): an order of events, not of rounds.

A worker of an asynchronous method (AD-PSGD, Lian, Zhang, Zhang, Liu, ICML 2018, arXiv
1710.06952, Algorithm 1) never waits for a round: it reads its model, computes a gradient at
it, and when the gradient is done it averages its model with one random neighbour (both ends
at once), applies the gradient and starts the next one. Here that is a queue of events on the
simulated clock (clock.py's settings: speeds, stragglers, latency, bandwidth):

- "start" of worker i's k-th gradient at time t: it reads x_i as it is at t (the caller
  computes the gradient there, at once, and keeps it until the gradient ends); the gradient
  takes c_i(k) = worker_step_seconds / speed_i, times straggler_slowdown when
  u(seed, k, i) < straggler_probability (clock.SimulatedClock.straggling keyed by the
  worker's own gradient count k), so it ends at t + c_i(k).
- "finish" of that gradient, the run's e-th (e = 0, 1, ...): its partner j is drawn uniformly
  among i's neighbours in the topology's graph at i's own count k (topology.at(k): a graph over
  time is a schedule of each worker's iterations, as in a synchronous run, where round k is
  every worker's k-th step), from the stream keyed by (seed, PARTNER_STREAM, e); the caller
  averages x_i and x_j and applies i's gradient (a gradient computed at a model that may have
  changed since: the staleness of asynchrony); a worker without a neighbour in that graph (an
  odd random matching) applies it alone, at no cost.
  One model message goes each way: i waits until both are in, latency + bits / bandwidth of
  the link {i, j}, and starts its next gradient then; j does not stop computing.

Events are taken in time order, ties by worker number (a worker has one event pending at a
time), so the same configuration gives the same order: the clock's keys define the run. A
link carries each exchange as if it were alone on it (no queueing behind another exchange).
Where each worker's time went: compute (its gradients ended so far), sending (its exchanges'
transmission) and waiting (their latency); `now` is when the last event taken is over: a start's
time, a finish's with its exchange (as a synchronous step ends with its round).
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

from powergossip.clock import ClockSettings, SimulatedClock
from powergossip.errors import ConfigError

PARTNER_STREAM = 15  # the partners' random stream (the clock's stragglers: 14, the faults': 11-13, the methods': 1-3)
START, FINISH = 0, 1


def is_asynchronous(method_name: str) -> bool:
    """Whether the registered method runs on events (its registry entry says so)."""
    from powergossip import methods  # here: the clock's layer does not import the methods

    return methods.METHODS[methods.registered_name(method_name)].asynchronous


@dataclass(frozen=True)
class Event:
    """One event: worker `worker` starts its gradient number `gradient` (starts), or ends it
    (the run's `index`-th gradient to end) and averages with `partner`."""

    time: float
    worker: int
    starts: bool
    gradient: int  # the worker's own count: its data position and straggler key
    index: int = -1  # finish: the run's event number (the partner's draw, the epoch)
    partner: int | None = -1  # finish: the neighbour averaged with (None: none in the graph, it steps alone)


class EventClock:
    """The event queue of an asynchronous run (module docstring). `next()` takes the next event;
    `finished` counts the gradients ended so far. `message_bits`: one model message, in bits.
    `now`, `spent` ([3, n]: compute, sending, waiting seconds so far) and `PARTS` are what
    metrics.Recorder reads of a run's clock; its state goes into checkpoints."""

    PARTS = ("compute", "sending", "waiting")

    def __init__(self, settings: ClockSettings, topology, seed: int, message_bits: float):
        if not settings.worker_step_seconds > 0:
            raise ConfigError("asynchronous methods need worker_step_seconds > 0: the simulated compute time orders "
                              "their events (a measured time would make the training depend on the machine's load)")
        self.clock = SimulatedClock(settings, topology, topology.n_workers, seed)  # speeds, bandwidths, stragglers
        self.settings, self.topology, self.seed = settings, topology, seed
        self.n_workers, self.message_bits = topology.n_workers, float(message_bits)
        self.queue = [(0.0, worker, START) for worker in range(self.n_workers)]  # (time, worker, kind): a heap
        self.gradients = np.zeros(self.n_workers, dtype=np.int64)  # gradients each worker started
        self.finished = 0  # gradients ended: the next finish is event `finished`
        self.now = 0.0
        self.spent = np.zeros((len(self.PARTS), self.n_workers))
        self.computing = np.zeros(self.n_workers)  # the seconds of each worker's gradient under way (spent when it ends)

    def compute_seconds(self, worker: int, gradient: int) -> float:
        """c_i(k): worker i's k-th gradient, straggling or not."""
        straggles = self.clock.straggling(gradient, np.array([worker]))[0]
        seconds = self.settings.worker_step_seconds / self.clock.speed[worker]
        return seconds * (self.settings.straggler_slowdown if straggles else 1.0)

    def partner(self, event: int, worker: int, gradient: int) -> int | None:
        """A neighbour of `worker` in the graph of its gradient number `gradient` (its own count, not
        the event number: the module's docstring), uniformly, from the stream keyed by
        (seed, PARTNER_STREAM, event)."""
        candidates = self.topology.at(gradient).neighbors(worker)
        if not candidates:
            return None  # alone in its graph (an odd random matching, a schedule): it steps alone
        draw = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, PARTNER_STREAM, event])))
        return int(candidates[draw.integers(len(candidates))])

    def next(self) -> Event:
        """The next event in time order (ties: the lower worker first); schedules what follows it."""
        time, worker, kind = heapq.heappop(self.queue)
        self.now = max(self.now, time)
        if kind == START:
            gradient = int(self.gradients[worker])
            seconds = self.compute_seconds(worker, gradient)
            self.gradients[worker] += 1
            self.computing[worker] = seconds
            heapq.heappush(self.queue, (time + seconds, worker, FINISH))
            return Event(time, worker, True, gradient)
        index, self.finished = self.finished, self.finished + 1
        gradient = int(self.gradients[worker]) - 1  # the gradient ending: its worker has started no other
        partner = self.partner(index, worker, gradient)
        self.spent[0, worker] += self.computing[worker]
        sending, latency = 0.0, 0.0  # alone: no exchange
        if partner is not None:
            sending = self.message_bits / min(self.clock.bandwidth[worker, partner], self.clock.bandwidth[partner, worker])
            latency = self.settings.network_latency_s
        self.spent[1, worker] += sending
        self.spent[2, worker] += latency
        exchanged = time + sending + latency
        self.now = max(self.now, exchanged)  # the gradient counts once it is applied, after the average
        heapq.heappush(self.queue, (exchanged, worker, START))
        return Event(time, worker, False, gradient, index, partner)

    def state_dict(self) -> dict:
        """The queue, every worker's gradient count (its data position), the events and times so far."""
        return {"queue": [[float(time), int(worker), int(kind)] for time, worker, kind in sorted(self.queue)],
                "gradients": self.gradients.tolist(), "finished": self.finished, "now": float(self.now),
                "computing": self.computing.tolist()} | dict(zip(self.PARTS, self.spent.tolist()))

    def load_state_dict(self, state: dict) -> None:
        if len(state["gradients"]) != self.n_workers:
            raise ValueError(f"the saved event queue has {len(state['gradients'])} workers, this run {self.n_workers}")
        self.queue = [(float(time), int(worker), int(kind)) for time, worker, kind in state["queue"]]
        heapq.heapify(self.queue)
        self.gradients = np.array(state["gradients"], dtype=np.int64)
        self.finished, self.now = int(state["finished"]), float(state["now"])
        self.spent = np.array([state[part] for part in self.PARTS], dtype=np.float64)
        self.computing = np.array(state["computing"], dtype=np.float64)


def check(config: dict, world_size: int | None = None) -> None:
    """ConfigError, before any work, for what an asynchronous run cannot do (the `optimizer` or
    `algorithm` key names an asynchronous method): it needs the simulated clock with
    worker_step_seconds > 0, runs in one process (`world_size`, once known), and takes no faults
    yet. train.py's own refusals are its business (`train.checked`)."""
    name = config.get("optimizer", config.get("algorithm"))
    if not config["simulated_clock"] or not config["worker_step_seconds"] > 0:
        raise ConfigError(f"{name} is asynchronous: its events are ordered by the simulated clock; pass "
                          f"simulated_clock=true and worker_step_seconds > 0 (a measured compute time would make "
                          f"training depend on the machine's load)")
    from powergossip import faults

    given = [key for key in faults.KEYS if config[key]]
    if given:
        raise ConfigError(f"{given[0]}={config[given[0]]!r}: {name} is asynchronous and takes no faults yet "
                          f"(a pairwise average has no rule for a lost message); leave {', '.join(given)} out")
    if world_size is not None and world_size > 1:
        raise ConfigError(f"{name} is asynchronous and runs its workers stacked in one process: under mpirun with "
                          f"{world_size} processes the event order would need every process's models at every event; "
                          f"run `python train.py n_workers=N ...` without mpirun")
