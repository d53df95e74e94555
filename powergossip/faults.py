"""Faults of an unreliable network: links that fail and workers that are away, round by round.

It reads a topology and returns, for every round, the graph the round really has; its
`check` (what the entrypoints call first) reads the methods' registry, so it sits above the
methods (docs/design.md's layers), which see only the faulty topology it makes. Each fault is drawn from a random stream of its own, apart from the
methods' shared randomness, and keyed so that the same seed gives the same faults in every
launch layout and after a resume (nothing is saved but the round counter the methods keep):

- `link_failure_probability`: at round t, edge {i, j} is down in both directions when
  u(seed, t, min(i, j), max(i, j)) < p, one uniform draw per edge and round;
- `offline_probability`: at round t, worker k is away when v(seed, t, k) < p: it sends and
  receives nothing that round and keeps taking its local steps;
- `churn`: a file of `worker leave_round return_round` lines (the worker is away at rounds
  leave_round <= t < return_round), a trace to replay; '#' starts a comment;
- `message_loss_probability`: at round t, the message from i to j is lost when
  w(seed, t, i, j) < p (the two directions of an edge drawn apart): it was sent, and counts as
  sent, but does not arrive. Each method says what it does then (`Method.arrived`).

The round's graph is the fault-free one without the edges that are down or touch an absent
worker, their weights moved to the two ends' own weights (topologies.without_edges): on a
symmetric graph every round's W stays symmetric and doubly stochastic, so a method that
mixes with it keeps the workers' average exactly, and a message that is not sent is not
counted (comm.exchange counts the round's edges). The requirements of a method are checked
on the fault-free graph. Which methods take faults, and why the others do not yet: `check`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np

from powergossip import topologies

LINK_STREAM, ABSENCE_STREAM, LOSS_STREAM = 11, 12, 13  # the faults' random streams (the methods' are 1, 2, 3: methods.base)
KEYS = ("link_failure_probability", "offline_probability", "churn", "message_loss_probability")  # the configuration's keys, off by default
# the methods with a rule for a message lost one way (docs/algorithms.md); D2 and gradient tracking run with D-PSGD's
# rule for their mixing, which has no fix for their corrections: the study shows what it costs them
LOSS_RULES = ("dpsgd", "power-gossip", "push-sum", "d2", "gradient-tracking", "relay-sum", "deepsqueeze", "moniqua", "choco")
# cut links and absences: every method whose graph need says it mixes with each round's W (the base classes' rule,
# a user's method built on them too), and those with fixed graphs that have a rule of their own (docs/algorithms.md)
TAKES_CUTS = ("symmetric", "doubly_stochastic", "column_stochastic")
OWN_CUT_RULES = ("choco", "d2", "relay-sum")


@dataclass(frozen=True)
class FaultSettings:
    """The configuration of the faults (all off by default); raises ValueError naming a key that cannot work."""
    link_failure_probability: float = 0.0
    offline_probability: float = 0.0
    churn: str | None = None
    message_loss_probability: float = 0.0

    def __post_init__(self):
        for key in ("link_failure_probability", "offline_probability", "message_loss_probability"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"{key} must be a probability in [0, 1) (1 would cut every round), got {value!r}")
        if self.churn is not None and not (isinstance(self.churn, str) and self.churn):
            raise ValueError(f"churn must be the path of a file of 'worker leave_round return_round' lines, got {self.churn!r}")

    @property
    def active(self) -> bool:
        return bool(self.link_failure_probability or self.offline_probability or self.churn or self.message_loss_probability)


def settings_of(config: dict) -> FaultSettings:
    """The FaultSettings of a run's configuration (train.py's, gossip_run.py's)."""
    return FaultSettings(**{key: config[key] for key in KEYS})


def read_churn(path: str, n_workers: int) -> list[tuple[int, int, int]]:
    """The (worker, leave_round, return_round) spans of a churn file, each checked, the line named in any error."""
    if not os.path.isfile(path):
        raise ValueError(f"churn file {path!r} does not exist")
    spans = []
    with open(path, errors="replace") as f:
        for number, line in enumerate(f, start=1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            fields = text.split()
            where = f"churn file {path!r}, line {number} ({line.strip()[:80]!r})"
            if len(fields) != 3 or not all(field.lstrip("-").isdigit() for field in fields):
                raise ValueError(f"{where}: expected three integers, 'worker leave_round return_round'")
            worker, leave, back = map(int, fields)
            if not 0 <= worker < n_workers:
                raise ValueError(f"{where}: worker {worker} is not one of the {n_workers} workers (0..{n_workers - 1})")
            if not 0 <= leave < back:
                raise ValueError(f"{where}: needs 0 <= leave_round < return_round (away at leave_round <= t < return_round)")
            spans.append((worker, leave, back))
    return spans


def files_read(config: dict) -> dict[str, str]:
    """The files that define a run's faults (its churn file), for runs.fingerprint: name -> path."""
    return {f"churn file {config['churn']}": config["churn"]} if config.get("churn") else {}


class Faults:
    """The faults of every round for `n_workers` workers and `seed`."""

    def __init__(self, settings: FaultSettings, n_workers: int, seed: int):
        self.settings, self.n_workers, self.seed = settings, n_workers, seed
        self.churn = read_churn(settings.churn, n_workers) if settings.churn else []

    def _uniform(self, stream: int, round: int, shape) -> np.ndarray:
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, stream, round]))).random(shape)

    def links_down(self, round: int) -> np.ndarray:
        """`[n, n]` booleans, symmetric: edge {i, j} is down at this round (drawn at [min, max])."""
        p, n = self.settings.link_failure_probability, self.n_workers
        if not p:
            return np.zeros((n, n), dtype=bool)
        down = np.triu(self._uniform(LINK_STREAM, round, (n, n)) < p, k=1)
        return down | down.T

    def away(self, round: int) -> np.ndarray:
        """`[n]` booleans: worker k sends and receives nothing at this round."""
        p, n = self.settings.offline_probability, self.n_workers
        away = self._uniform(ABSENCE_STREAM, round, n) < p if p else np.zeros(n, dtype=bool)
        for worker, leave, back in self.churn:
            away[worker] |= leave <= round < back
        return away

    def lost(self, round: int) -> np.ndarray:
        """`[n, n]` booleans: the message from worker i to worker j is lost at this round ([i, j])."""
        p, n = self.settings.message_loss_probability, self.n_workers
        return self._uniform(LOSS_STREAM, round, (n, n)) < p if p else np.zeros((n, n), dtype=bool)

    def graph(self, graph, round: int):
        """Round `round`'s graph: `graph` (the fault-free one) without the edges that are down or
        touch an absent worker, their weights on the diagonal."""
        cut = self.links_down(round)
        away = self.away(round)
        cut |= away[:, None] | away[None, :]
        pairs = [(i, j) for i, j in graph.edges() if cut[i, j]]
        return topologies.without_edges(graph, pairs) if pairs else graph


class FaultyTopology(topologies.TimeVarying):
    """A topology whose every round loses what `faults` draws: a graph over time (no period)
    whose `without_faults` is the fault-free topology."""

    def __init__(self, topology, faults: Faults):
        # TimeVarying's check that the rounds connect the workers is the fault-free graph's (it passed)
        self.without_faults, self.faults = topology, faults
        self.n_workers, self.name, self.period = topology.n_workers, f"{topology.name} with faults", None
        if not cuts(faults.settings):  # messages lost one way only: every round's graph is the fault-free one's
            self.period, self.is_static = topology.period, topology.is_static
        self._graph_of_round = lambda t: faults.graph(topology.at(t), t)
        self._expected_gap, self._built = None, {}

    def spectral_gap(self) -> float:
        return math.nan  # what the faults leave of the fault-free graph's gap is not known in closed form


def check(settings: FaultSettings, method_name: str, graph_needs: str | None, topology) -> None:
    """ValueError unless the method takes these faults on this (fault-free) topology, on a
    symmetric graph (a directed one would lose its column sums). Cut links and absences: every
    method that gossips over the graph (it states a graph need; each has its rule, docs/algorithms.md),
    and all-reduce and PowerSGD (absences only). Messages lost one way: the methods of LOSS_RULES."""
    if not settings.active:
        return
    key = next(k for k in KEYS if getattr(settings, k))
    if method_name in ("all-reduce", "powersgd"):  # no graph: only absences concern them
        if settings.link_failure_probability or settings.message_loss_probability:
            raise ValueError(f"{'link_failure_probability' if settings.link_failure_probability else 'message_loss_probability'}: "
                             f"{method_name} does not gossip over the graph's links; offline_probability and churn apply to "
                             "it (a worker away is left out of that round's average)")
        return
    if cuts(settings) and graph_needs not in TAKES_CUTS and method_name not in OWN_CUT_RULES:
        from powergossip import methods  # here: the graph layer does not import the methods

        why = "does not gossip over the graph (an absent worker's place in its average is not implemented)" \
            if graph_needs is None else f"needs {topologies.REQUIREMENTS[graph_needs]} and has no rule for a link that is down"
        takes = [name for name, registration in methods.METHODS.items()
                 if registration.graph_needs in TAKES_CUTS or name in OWN_CUT_RULES]
        raise ValueError(f"{key}: {method_name} {why}, so it does not take faults yet; methods that do (on a symmetric "
                         f"graph): {', '.join(takes)}")
    if settings.message_loss_probability and method_name not in LOSS_RULES:
        raise ValueError(f"message_loss_probability: {method_name} has no rule yet for a message lost one way; methods "
                         f"that have: {', '.join(LOSS_RULES)}")
    if not topology.is_symmetric and (cuts(settings) or method_name != "push-sum"):
        raise ValueError(f"{key}: faults need a symmetric graph (an edge that fails on a directed one would change its "
                         f"column sums; push-sum's running sums take lost messages there), and {topology.name} is not")


def cuts(settings: FaultSettings) -> bool:
    """Whether the faults take edges out of rounds (links down, workers away), not only lose messages."""
    return bool(settings.link_failure_probability or settings.offline_probability or settings.churn)


def apply(settings: FaultSettings, topology, seed: int):
    """`topology` itself when no fault is on, else the FaultyTopology of its faults."""
    return FaultyTopology(topology, Faults(settings, topology.n_workers, seed)) if settings.active else topology
