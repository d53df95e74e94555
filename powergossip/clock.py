"""The simulated clock: how long each step of a run would take on a cluster described by the
configuration (issue 30), deterministic from it, whatever the launch layout.

Communication layer (docs/design.md): it reads each round's graph (topologies) and the bits of
its messages, and returns every worker's time; nothing here changes what the methods compute.
Its model, one step k of worker i (T_i(k): when worker i ends step k; T_i(-1) = 0):

- compute: c_i(k) = worker_step_seconds / speed_i, times straggler_slowdown when worker i
  straggles at step k: u(seed, k, i) < straggler_probability, one uniform draw per (step,
  worker) from a stream of its own (STRAGGLER_STREAM, apart from the faults' and the methods').
- a message: latency plus its exact payload bits over its link's bandwidth. A worker's messages
  of a round go out back to back on its link, in neighbour order: the k-th (k = 1, 2, ...) of
  equal ones arrives at start + k * bits / bandwidth + latency (`deliveries`).
- a round ends, per method (`send_rule_of` reads its registry entry), by one of three rules:

  "overlap" (D-PSGD, PowerGossip, Choco, DeepSqueeze, Moniqua gossip x_t while its gradient is
  computed): worker i sends at the start of its step,

      T_i(k) = max(T_i(k-1) + c_i, max_{j in N(i) ∪ {i}} T_j(k-1) + m_ji)        (issue 30, eq. overlap)

  long-run pace max(c_max, m); "after_step" (all-reduce of parameters, push-sum, RelaySum, D²,
  gradient tracking take the local step first; a method on gradients sends after computing them):

      T_i(k) = max_{j in N(i) ∪ {i}} (T_j(k-1) + c_j) + m                        (issue 30, eq. after-step)

  long-run pace c_max + m (the slowest worker's self-loop); "all_reduce" (a step whose messages
  are all-reduces: all-reduce, PowerSGD): a ring all-reduce once the slowest contribution is in,

      T_i(k) = max_j (T_j(k-1) + c_j) + 2(n-1) latency + 2(n-1)/n * bits / bandwidth   (issue 30, eq. all-reduce)

  Here m_ji is when j's message reaches i after j sent it, and m_ii when i's own last message
  has arrived: a worker's exchange ends when its messages are in and its own are delivered
  (comm.exchange waits on its sends too). That is the issue's j = i term, which the issue writes
  for the after-step rule and which is added here to the overlap rule: with one m for every message
  it changes nothing there, but with messages back to back a worker could otherwise start its next
  round while its link still sends (on a 4-ring, worker 0 gets both neighbours' first messages
  and worker 2 their second ones). The long-run paces stay the issue's.

  The ring all-reduce moves 2(n-1)/n of the buffer per worker; the byte records
  (Communicator.all_reduce_mean, metrics.py's bits) keep counting the buffer once per
  all-reduce, the paper's convention, so the clock's seconds are not the records' bits at the
  bandwidth: they are what a bandwidth-optimal all-reduce takes.
- faults take their time: a message lost on its way (faults.Faults.lost) is waited for up to
  message_timeout_s after the receiver began to receive, then the receiver goes on without it;
  the sender sent it all the same. A message that arrives, however late, is waited for: choose
  the timeout above a round's normal message time. The timeout runs from the receiver's
  start, not the sender's: a message lost by a straggler can end the wait sooner than it would arriving late. A worker away (no edges in the round's
  graph; `present` for all-reduce) computes and takes its step alone.

A round may hold several exchanges in sequence (PowerGossip's power iterations, PowerSGD's P and
Q): each starts at a worker when its previous one ended there. `RoundTimes` says where a step's
time went, per worker: compute, sending (the link's transmission not hidden behind compute),
waiting (latency, slower neighbours, lost messages). A run's simulated_time_s is
`SimulatedClock.now`: when the last worker ended the steps so far.

The entrypoints (train.py, gossip_run.py) run it with `simulated_clock=true` through `RunClock`:
the Communicator logs every exchange and all-reduce it counts (its senders and receivers and the
bits of a message), and after each step RunClock gathers the step's log over the processes (every
process feeds the clock the same inputs) and times each exchange on the messages it held: a
worker that sent nothing (away, or Choco's silent one) is waited for by no one, RelaySum's two
trees are two exchanges, PowerGossip's P and Q have their own sizes; lost messages are
faults.py's draws of the round. The compute is worker_step_seconds, never a measurement (0: the
clock counts communication only), so the times are the same in every launch layout, on every
machine and after a resume (the clock's state is in the checkpoints).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from powergossip import names, topologies
from powergossip.errors import ConfigError

STRAGGLER_STREAM = 14  # the stragglers' random stream (the faults' are 11-13, the methods' 1-3)
SEND_RULES = ("overlap", "after_step", "all_reduce")
KEYS = ("worker_step_seconds", "worker_speeds", "straggler_probability", "straggler_slowdown", "message_timeout_s",
        "network_latency_s", "network_bandwidth_bits_per_s", "network_bandwidth_file")


@dataclass(frozen=True)
class ClockSettings:
    """The cluster the clock simulates. Each value is checked here (ConfigError naming the key);
    what depends on the number of workers and the files, by `check(n_workers)`."""

    worker_step_seconds: float = 0.0  # c: a worker's compute per step at speed 1; 0: the clock counts communication only
    worker_speeds: list | tuple | str | None = None  # per worker, time = worker_step_seconds / speed: a list of n
    # numbers > 0, or the path of a file of n numbers (whitespace apart, '#' starts a comment); None: all 1
    straggler_probability: float = 0.0  # at each (step, worker), the chance that the worker straggles, in [0, 1]
    straggler_slowdown: float = 2.0  # a straggler's compute takes this many times as long (>= 1)
    message_timeout_s: float = 1.0  # how long a receiver waits for a lost message: what a loss costs; 1 s is
    # TCP's lowest retransmission timeout (RFC 6298), far above a round's normal message time on a LAN
    network_latency_s: float = 1e-4  # alpha: seconds from a message's last bit sent to its arrival
    network_bandwidth_bits_per_s: float = 1e9  # beta: a link's bits per second (here also inf: no transmission time;
    # the entrypoints' keys take finite numbers)
    network_bandwidth_file: str | None = None  # 'i j bits_per_s' lines: the link {i, j}'s own bandwidth, both ways

    def __post_init__(self):
        _number("worker_step_seconds", self.worker_step_seconds, "seconds >= 0 (the compute of one step at speed 1)")
        _number("network_latency_s", self.network_latency_s, "seconds >= 0")
        _number("message_timeout_s", self.message_timeout_s, "seconds >= 0 (how long a lost message is waited for)")
        _number("network_bandwidth_bits_per_s", self.network_bandwidth_bits_per_s, "bits per second > 0 (inf: no "
                "transmission time)", above=0, infinite=True)
        _number("straggler_probability", self.straggler_probability, "a probability in [0, 1]", at_most=1)
        _number("straggler_slowdown", self.straggler_slowdown, "a factor >= 1 on a straggler's compute time (1: no "
                "slowdown)", at_least=1)
        speeds = self.worker_speeds
        if isinstance(speeds, (list, tuple)):
            for worker, speed in enumerate(speeds):
                _number(f"worker_speeds[{worker}]", speed, "a speed > 0 (1: worker_step_seconds per step, 0.5: twice "
                        "as long)", above=0)
        elif speeds is not None and not (isinstance(speeds, str) and speeds):
            raise ConfigError(f"worker_speeds must be a list of one speed per worker or the path of a file of them, "
                              f"got {speeds!r}")
        if self.network_bandwidth_file is not None and not (isinstance(self.network_bandwidth_file, str)
                                                            and self.network_bandwidth_file):
            raise ConfigError(f"network_bandwidth_file must be the path of a file of 'i j bits_per_s' lines, got "
                              f"{self.network_bandwidth_file!r}")

    def check(self, n_workers: int) -> None:
        """ConfigError unless the settings work for `n_workers` workers: one speed per worker, files
        that can be read and hold what they should."""
        self.speeds(n_workers)
        self.bandwidths(n_workers)

    def speeds(self, n_workers: int) -> np.ndarray:
        """`[n]` speeds, from worker_speeds (a list, a file or None: all 1), checked."""
        speeds = self.worker_speeds
        if speeds is None:
            return np.ones(n_workers)
        where = "worker_speeds"
        if isinstance(speeds, str):
            where = f"worker_speeds file {speeds!r}"
            numbers = []
            for number, text in _lines(speeds, "worker_speeds", "one speed per worker, in worker order", n_workers):
                for field in text.split():
                    try:
                        numbers.append(float(field))
                    except ValueError:
                        raise ConfigError(f"{where}, line {number}: {field!r} is not a number; the file holds one "
                                          f"speed > 0 per worker, in worker order") from None
            for worker, speed in enumerate(numbers):
                _number(f"{where}: worker {worker}'s speed", speed, "a speed > 0", above=0)
            speeds = numbers
        if len(speeds) != n_workers:
            raise ConfigError(f"{where} has {len(speeds)} speeds, but the run has {n_workers} workers: give one speed "
                              f"per worker, in worker order (1.0 takes worker_step_seconds per step)")
        return np.array(speeds, dtype=np.float64)

    def bandwidths(self, n_workers: int) -> np.ndarray:
        """`[n, n]` bits per second of the link from i to j: network_bandwidth_bits_per_s, or the
        network_bandwidth_file's value for the links it names (both directions)."""
        links = np.full((n_workers, n_workers), float(self.network_bandwidth_bits_per_s))
        path = self.network_bandwidth_file
        if path is None:
            return links
        named = set()
        for number, text in _lines(path, "network_bandwidth_file", "one 'i j bits_per_s' line per link", n_workers ** 2):
            where = f"network_bandwidth_file {path!r}, line {number} ({text[:60]!r})"
            fields = text.split()
            try:
                i, j, bandwidth = int(fields[0]), int(fields[1]), float(fields[2])
                if len(fields) != 3:
                    raise ValueError
            except (ValueError, IndexError):
                raise ConfigError(f"{where}: expected 'i j bits_per_s' (two worker ids and a bandwidth)") from None
            for worker in (i, j):
                if not 0 <= worker < n_workers:
                    raise ConfigError(f"{where}: worker {worker} is not one of the {n_workers} workers "
                                      f"(0..{n_workers - 1})")
            if i == j or (min(i, j), max(i, j)) in named:
                raise ConfigError(f"{where}: " + ("a link joins two workers" if i == j else f"link {{{i}, {j}}} is "
                                  "named twice; keep one line per link"))
            _number(where, bandwidth, "a bandwidth > 0 in bits per second", above=0, infinite=True)
            named.add((min(i, j), max(i, j)))
            links[i, j] = links[j, i] = bandwidth
        return links


def _number(key: str, value, what: str, at_least: float = 0.0, above: float | None = None, at_most: float | None = None,
            infinite: bool = False) -> None:
    """ConfigError naming `key` unless `value` is a number in the range (`what` says which)."""
    fine = isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool) and \
        not math.isnan(value) and (infinite or math.isfinite(value))
    if fine:
        fine = (value > above if above is not None else value >= at_least) and (at_most is None or value <= at_most)
    if not fine:
        raise ConfigError(f"{key} must be {what}, got {value!r}")


def _lines(path: str, key: str, form: str, n_workers: int):
    """(line number, text) of a settings file's lines, as ConfigErrors naming `key` when it cannot be read."""
    if not os.path.isfile(path):
        raise ConfigError(f"{key}: {path!r} is not a file (it should hold {form}); give the path of one")
    try:
        yield from topologies._lines_of(path, form, topologies._longest_file(n_workers))
    except (OSError, ValueError) as problem:
        raise ConfigError(f"{key}: cannot read {path!r}: {problem}") from None


def settings_of(config: dict) -> ClockSettings:
    """The ClockSettings of a run's configuration (train.py's, gossip_run.py's)."""
    return ClockSettings(**{key: config[key] for key in KEYS})


def check(config: dict, read_elsewhere: tuple[str, ...] = ()) -> None:
    """ConfigError naming the key for clock settings that cannot work for the run's workers, and,
    with simulated_clock=false, for a clock key set although nothing reads it (`read_elsewhere`:
    keys the run reads without the clock too, as train.py's communication_time_model does)."""
    settings = settings_of(config)
    if config["simulated_clock"]:
        settings.check(config["n_workers"])
        return
    unread = [key for key in KEYS if key not in read_elsewhere and getattr(settings, key) != getattr(ClockSettings, key)]
    if unread:
        raise ConfigError(f"{unread[0]}={config[unread[0]]!r} sets the simulated clock, which is off: pass "
                          f"simulated_clock=true to run it (or leave {', '.join(unread)} out)")


def may_change_on_resume(keys: tuple[str, ...], config: dict) -> tuple[str, ...]:
    """`keys` (what a resumed run may change) less the clock's when the clock runs: the times a
    run records from its start are one cluster's, so its clock keys define it (they change no
    training, but a resume with others would join two clusters' times in one curve)."""
    return tuple(key for key in keys if key not in KEYS) if config["simulated_clock"] else keys


def files_read(config: dict) -> dict[str, str]:
    """The files that define a run's clock, for runs.fingerprint: name -> path."""
    named = {"worker_speeds file": config.get("worker_speeds"), "network_bandwidth_file": config.get("network_bandwidth_file")}
    return {f"{label} {path}": path for label, path in named.items() if isinstance(path, str)}


def send_rule_of(method_name: str, settings: dict | None = None) -> str:
    """How a round of the registered method that gossips ends (module docstring): "after_step"
    for methods that take the local step first or act on gradients, "overlap" for those that
    gossip x_t while its gradient is computed. A step whose messages are all-reduces ends by
    eq. all-reduce whatever the method (StepClock). `settings` (the method's, as
    names.settings_of gives them; None: its defaults): a method that takes one_step_delay and
    runs with it (push-sum's overlapped SGP, Assran et al. 2019) overlaps, its round's messages
    needed only by the next step's end."""
    from powergossip import methods  # here: the communication layer does not import the methods

    name = methods.registered_name(method_name)
    registration = methods.METHODS[name]
    if "one_step_delay" in registration.setting_names() and (settings or {}).get("one_step_delay"):
        return "overlap"
    return "after_step" if registration.local_step_first or registration.acts_on == "gradients" else "overlap"


@dataclass(frozen=True)
class Deliveries:
    """One exchange's messages, in the order their senders send them: message e goes from
    `sender[e]` to `receiver[e]` and arrives `arrival[e]` seconds after its sender began to send;
    `transmitting[i]`: seconds worker i's link transmits; `delivered[i]`: when i's last message
    has arrived (0 when it sends none)."""

    sender: np.ndarray
    receiver: np.ndarray
    arrival: np.ndarray
    transmitting: np.ndarray
    delivered: np.ndarray


@dataclass(frozen=True)
class RoundTimes:
    """One step's times, `[n]` each: when each worker began and ended it, and where that time
    went: compute + sending + waiting = end - start (to float rounding)."""

    start: np.ndarray  # T_i(k-1)
    end: np.ndarray  # T_i(k)
    compute: np.ndarray  # c_i(k), stragglers included
    sending: np.ndarray  # the link's transmission that compute did not hide
    waiting: np.ndarray  # the rest: latency, slower neighbours, lost messages' timeouts

    @property
    def duration(self) -> np.ndarray:
        return self.end - self.start


class SimulatedClock:
    """Every worker's simulated time, step by step (module docstring): `round` advances it by one
    step. Each process of a job keeps the whole clock (a worker's time depends on its
    neighbours'); its draws are keyed by (seed, step, worker), so every layout has the same."""

    def __init__(self, settings: ClockSettings, topology, n_workers: int, seed: int):
        if topology is not None and topology.n_workers != n_workers:
            raise ValueError(f"the topology has {topology.n_workers} workers, the clock {n_workers}")
        self.settings, self.topology, self.n_workers, self.seed = settings, topology, n_workers, seed
        self.speed, self.bandwidth = settings.speeds(n_workers), settings.bandwidths(n_workers)
        self.time = np.zeros(n_workers)  # T_i(k-1): when worker i ended its last step
        self.steps = 0  # steps done: the next round is step `steps`

    @property
    def now(self) -> float:
        """simulated_time_s: when the last worker ended the steps so far."""
        return float(self.time.max(initial=0.0))

    def straggling(self, step: int, workers=None) -> np.ndarray:
        """Booleans: worker k straggles at `step` when u(seed, step, k) < straggler_probability,
        u the k-th uniform of the stream keyed by (seed, STRAGGLER_STREAM, step): worker k's draw is
        its own, whichever workers are asked for (`workers`: an index array or slice; all by default)."""
        workers = np.arange(self.n_workers)[workers if workers is not None else slice(None)]
        p = self.settings.straggler_probability
        if not p or not len(workers):
            return np.zeros(len(workers), dtype=bool)
        stream = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, STRAGGLER_STREAM, step])))
        return stream.random(int(workers.max()) + 1)[workers] < p

    def compute_seconds(self, step: int) -> np.ndarray:
        """`[n]` c_i(step) = worker_step_seconds / speed_i, times straggler_slowdown for stragglers."""
        slowdown = np.where(self.straggling(step), self.settings.straggler_slowdown, 1.0)
        return self.settings.worker_step_seconds / self.speed * slowdown

    def deliveries(self, graph, payload_bits) -> Deliveries:
        """The messages of one exchange over `graph` and when each arrives: back to back on its
        sender's link, in neighbour order, the k-th at sum_{l <= k} bits_l / bandwidth_l + latency.

        `graph`: a round's Topology (i sends to j when W[j, i] > 0, j != i: j listens to i), or
        neighbour lists (worker i sends to each of lists[i], in that order). `payload_bits`: the
        bits of every message (a number), of each sender's messages (`[n]`), or of the message
        from i to j (`[n, n]`)."""
        sender, receiver = self._messages(graph)
        bits = np.asarray(payload_bits, dtype=np.float64)
        if bits.shape not in ((), (self.n_workers,), (self.n_workers, self.n_workers)):
            raise ValueError(f"payload bits must be a number, [n] or [n, n] with n = {self.n_workers}, got shape {bits.shape}")
        if (bits < 0).any() or not np.isfinite(bits).all():
            raise ValueError("payload bits must be finite and >= 0")
        bits = bits if bits.ndim == 0 else bits[sender] if bits.ndim == 1 else bits[sender, receiver]
        seconds = np.broadcast_to(bits, sender.shape) / self.bandwidth[sender, receiver]
        # each sender's messages side by side, [n, max degree]: exact per-worker running sums
        first = np.searchsorted(sender, sender)
        position = np.arange(len(sender)) - first
        queue = np.zeros((self.n_workers, int(position.max(initial=-1)) + 1))
        queue[sender, position] = seconds
        queue = np.cumsum(queue, axis=1)
        transmitting = queue[:, -1] if queue.shape[1] else np.zeros(self.n_workers)
        sends = np.bincount(sender, minlength=self.n_workers) > 0
        delivered = np.where(sends, transmitting + self.settings.network_latency_s, 0.0)
        return Deliveries(sender, receiver, queue[sender, position] + self.settings.network_latency_s, transmitting, delivered)

    def _messages(self, graph) -> tuple[np.ndarray, np.ndarray]:
        """(senders, receivers) of a round's messages, grouped by sender in its send order."""
        if hasattr(graph, "diffusion_matrix"):
            listens = graph.diffusion_matrix.T > 0  # [i, j]: j weighs i's message
            np.fill_diagonal(listens, False)
            sender, receiver = np.nonzero(listens)
            return sender.astype(np.int64), receiver.astype(np.int64)
        if len(graph) != self.n_workers:
            raise ValueError(f"neighbour lists: expected one list per worker ({self.n_workers}), got {len(graph)}")
        receivers = [np.asarray(targets, dtype=np.int64).reshape(-1) for targets in graph]
        sender = np.repeat(np.arange(self.n_workers), [len(targets) for targets in receivers])
        receiver = np.concatenate(receivers) if receivers else np.zeros(0, dtype=np.int64)
        if ((receiver < 0) | (receiver >= self.n_workers) | (receiver == sender)).any():
            raise ValueError(f"neighbour lists name a worker outside 0..{self.n_workers - 1} or a worker itself")
        return sender, receiver

    def round(self, step: int, send_rule: str, *payload_bits, lost: np.ndarray | None = None, graph=None,
              present: np.ndarray | None = None, graphs=None) -> RoundTimes:
        """Advance the clock by step `step` (the next one) of a method whose round ends by
        `send_rule` (SEND_RULES, `send_rule_of`), and return its RoundTimes.

        `payload_bits`: one argument per exchange of the step, in order: for "overlap" and
        "after_step", as `deliveries` takes them; for "all_reduce", the bits of each all-reduce's
        buffer (a number, the same at every worker). None of them: the step only computes.
        `lost`: `[n, n]` booleans, the message from i to j is lost (faults.Faults.lost(step)).
        `graph`: the round's graph or neighbour lists (default: the topology's at `step`);
        `graphs`: one per exchange instead (RelaySum sends over each of its trees in turn).
        `present`: `[n]` booleans, the workers in the step's all-reduce (default: all); a gossip
        round's graph says itself who is away (faults.FaultyTopology leaves them no edges)."""
        if step != self.steps:
            raise ValueError(f"the clock is at step {self.steps}: it advances one step at a time, got step {step}")
        if send_rule not in SEND_RULES:
            raise ValueError(f"send_rule must be one of {', '.join(SEND_RULES)}, got {send_rule!r}")
        start, compute = self.time, self.compute_seconds(step)
        if send_rule == "all_reduce":
            end, sending = self._all_reduce(start + compute, payload_bits, present)
        else:
            if graphs is None:
                if graph is None and payload_bits:
                    if self.topology is None:
                        raise ValueError("a clock without a topology needs the round's graph")
                    graph = self.topology.at(step)
                graphs = [graph] * len(payload_bits)
            elif len(graphs) != len(payload_bits):
                raise ValueError(f"graphs: one per exchange ({len(payload_bits)}), got {len(graphs)}")
            end, sending = self._gossip(start, compute, send_rule, payload_bits, graphs, lost)
        end.flags.writeable = False  # the clock's state, which RoundTimes shows
        self.time, self.steps = end, self.steps + 1
        waiting = np.maximum(end - start - compute - sending, 0.0)  # >= 0 but for float rounding
        return RoundTimes(start, end, compute, sending, waiting)

    def _gossip(self, start, compute, send_rule, payload_bits, graphs, lost):
        """(T(k), sending) by eq. overlap or eq. after-step, exchange after exchange."""
        if lost is not None and np.shape(lost) != (self.n_workers, self.n_workers):
            raise ValueError(f"lost must be [n, n] booleans with n = {self.n_workers}, got shape {np.shape(lost)}")
        computed = start + compute
        ready = start.copy() if send_rule == "overlap" else computed  # when each worker begins to send and receive
        sending = np.zeros(self.n_workers)
        for bits, graph in zip(payload_bits, graphs):
            messages = self.deliveries(graph, bits)
            end = ready + messages.delivered  # its own messages delivered (the j = i term)
            arrives = ready[messages.sender] + messages.arrival
            if lost is not None:  # waited for up to the timeout, from when the receiver began to receive
                gone = np.asarray(lost, dtype=bool)[messages.sender, messages.receiver]
                arrives = np.where(gone, ready[messages.receiver] + self.settings.message_timeout_s, arrives)
            np.maximum.at(end, messages.receiver, arrives)
            # overlap: what the link transmits after the compute ended; after_step: all of it
            sending += np.maximum(ready + messages.transmitting - np.maximum(ready, computed), 0.0)
            ready = end
        return np.maximum(computed, ready), sending

    def _all_reduce(self, computed, payload_bits, present):
        """(T(k), sending) by eq. all-reduce: a ring over the workers present, in worker order,
        its transmission at the ring's slowest link."""
        members = np.arange(self.n_workers) if present is None else np.flatnonzero(np.asarray(present, dtype=bool))
        end, sending = computed.copy(), np.zeros(self.n_workers)
        p = len(members)
        if p < 2 or not payload_bits:
            return end, sending  # nobody to average with: each worker steps alone
        ring = self.bandwidth[members, np.roll(members, -1)].min()
        transmit = 0.0
        for bits in payload_bits:
            if np.ndim(bits) != 0 or not (math.isfinite(bits) and bits >= 0):
                raise ValueError(f"an all-reduce's payload bits are one number >= 0 (its buffer at every worker), got {bits!r}")
            transmit += 2 * (p - 1) * bits / (p * ring)  # 2(n-1)/n of the buffer, in one division: exact where it can be
        latency = 2 * (p - 1) * self.settings.network_latency_s * len(payload_bits)
        end[members] = computed[members].max() + latency + transmit
        sending[members] = transmit
        return end, sending

    def state_dict(self) -> dict:
        """What a checkpoint keeps of the clock: the steps done and every worker's time."""
        return {"steps": self.steps, "time": self.time.tolist()}

    def load_state_dict(self, state: dict) -> None:
        if len(state["time"]) != self.n_workers:
            raise ValueError(f"the saved clock has {len(state['time'])} workers, this one {self.n_workers}")
        self.steps, self.time = int(state["steps"]), np.array(state["time"], dtype=np.float64)


class StepClock:
    """A run's simulated clock, step by step, from what the workers sent in each step:
    `step(exchanges, gossiped)` times one step; `now` is the run's simulated_time_s; `spent`
    holds each worker's compute, sending and waiting seconds so far, `[3, n]` (their sum over
    the three is the worker's own time). RunClock feeds it a live run's messages;
    train.traffic_trace's steps time a synchronous run again on another cluster without
    training it again (its training does not depend on the clock).

    An exchange is (senders, receivers, bits): the messages of one comm.exchange, sender[e] to
    receiver[e], `bits` each, or, with receivers None, one all-reduce of the senders' buffers
    of `bits` bits (Communicator.log's entries, over all processes). A step's all-reduces end
    by eq. all-reduce, its gossip exchanges by the method's rule (`send_rule_of`), one after
    the other, each on the messages it held: a worker that sent nothing is waited for by no one."""

    PARTS = ("compute", "sending", "waiting")

    def __init__(self, settings: ClockSettings, topology, n_workers: int, method_name: str, seed: int,
                 method_settings: dict | None = None):
        self.clock = SimulatedClock(settings, topology, n_workers, seed)
        self.n_workers, self.send_rule = n_workers, send_rule_of(method_name, method_settings)
        faults = getattr(topology, "faults", None)  # a faults.FaultyTopology's
        self.faults = faults if faults is not None and faults.settings.message_loss_probability else None
        self.spent = np.zeros((len(self.PARTS), n_workers))
        self.rounds = 0  # gossip rounds so far: the next one is the method's round `rounds` (faults' draws)

    @property
    def now(self) -> float:
        return self.clock.now

    def step(self, exchanges: list[tuple], gossiped: bool = True) -> RoundTimes:
        """Time the next step, in which the workers sent `exchanges` (class docstring), in order
        (`gossiped`: the method ran its round in it; train.py's local_steps skip some)."""
        collective = [bits for _, receivers, bits in exchanges if receivers is None]
        gossip = [(senders, receivers, bits) for senders, receivers, bits in exchanges if receivers is not None]
        if collective and gossip:
            raise ValueError("a step that both all-reduces and gossips: the clock times one or the other")
        if collective:
            present = np.zeros(self.n_workers, dtype=bool)
            for senders, _, _ in exchanges:
                present[senders] = True
            times = self.clock.round(self.clock.steps, "all_reduce", *collective, present=present)
        else:
            lost = None if self.faults is None or not gossip else self.faults.lost(self.rounds)
            graphs = [self._neighbour_lists(senders, receivers) for senders, receivers, _ in gossip]
            times = self.clock.round(self.clock.steps, self.send_rule, *(bits for _, _, bits in gossip),
                                     lost=lost, graphs=graphs)
        self.rounds += bool(gossiped)
        self.spent += (times.compute, times.sending, times.waiting)
        return times

    def _neighbour_lists(self, senders: np.ndarray, receivers: np.ndarray) -> list[np.ndarray]:
        """Each worker's receivers, in the exchange's order (grouped by sender, as half-edges are)."""
        order = np.argsort(senders, kind="stable")
        return np.split(receivers[order], np.searchsorted(senders[order], np.arange(1, self.n_workers)))

    def state_dict(self) -> dict:
        """The clock's state, the rounds and every worker's totals so far."""
        return self.clock.state_dict() | {"rounds": self.rounds} | dict(zip(self.PARTS, self.spent.tolist()))

    def load_state_dict(self, state: dict) -> None:
        self.clock.load_state_dict(state)
        self.rounds = int(state["rounds"])
        self.spent = np.array([state[part] for part in self.PARTS], dtype=np.float64)


class RunClock(StepClock):
    """The simulated clock of a live run (module docstring): `tick(gossiped)` after each step of
    the run, on every process, times that step from the messages the Communicator logged in it
    (gathered over the processes). Its state, with the clock's, goes into a run's checkpoints."""

    def __init__(self, settings: ClockSettings, comm, topology, method_name: str, seed: int,
                 method_settings: dict | None = None):
        super().__init__(settings, topology, comm.n_workers, method_name, seed, method_settings)
        self.comm = comm
        comm.log = []

    def tick(self, gossiped: bool = True) -> RoundTimes:
        """Time the step just taken from what the workers sent in it. Collective."""
        logs, self.comm.log = self.comm.gather_objects(self.comm.log), []
        if len({len(log) for log in logs}) > 1:  # a method whose processes skip exchanges differently (comm.skip_exchange)
            raise RuntimeError(f"the processes logged {[len(log) for log in logs]} exchanges in one step: the simulated "
                               "clock needs every exchange of a step logged by every process, in one order")
        return self.step([merged(parts) for parts in zip(*logs)], gossiped)


def merged(parts: list[tuple]) -> tuple:
    """One exchange from the processes' log entries of it: every process's senders (and
    receivers), the bits of a message (the same payload everywhere)."""
    senders = np.concatenate([part[0] for part in parts])
    receivers = None if parts[0][1] is None else np.concatenate([part[1] for part in parts])
    return senders, receivers, parts[0][2]


class ClockOff:
    """What a run holds in RunClock's place with simulated_clock=false: nothing is timed, saved or recorded."""

    now = None

    def tick(self, gossiped: bool = True) -> None:
        pass

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state) -> None:
        pass


def of_run(config: dict, comm, topology, method_name: str) -> RunClock | ClockOff:
    """The clock of a run of `method_name` over `topology` (with its faults), as `config` says
    (its method settings too: they can change how a round ends, `send_rule_of`)."""
    if not config["simulated_clock"]:
        return ClockOff()
    return RunClock(settings_of(config), comm, topology, method_name, config["seed"], names.settings_of(config))
