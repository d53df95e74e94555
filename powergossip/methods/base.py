"""What every method shares: the interface (`Method`, formerly `GossipAlgorithm`), the
typed settings every gossip method takes, and the batched operations on `[L, ...]` stacks
and `[H, ...]` half-edge rows that the methods' rounds are written in.

Every method works on a list of parameters, each stacked over this process's local workers:
`params[k]` has shape `[L, *shape_k]`, row l belongs to worker `comm.first_worker + l`.
`step(params)` runs one round in place: a few batched tensor ops and one `comm.exchange` per
round. The same seed gives the same bits whether one process hosts all workers or each
worker has its own process, on a CPU with one thread per process (the README's layout
contract): sums over workers and a worker's products are written so that they do not depend
on how many workers its process holds (powergossip/per_worker.py).

Notation: W is the mixing matrix, w_ij = W[i, j], gamma the consensus step ("diffusion
rate"). Per-edge state is stacked over the local half-edges `[H, ...]` in
`comm.half_edges(graph)` order. docs/algorithms.md writes out each method's update and what
it sends, byte by byte.

Graphs over time: every step is one round on the graph of that round, `topology.at(round)`
(`next_graph`); the round counter is part of each method's state. Each method says what it
needs of the graph (`graph_needs`: symmetric at every round, doubly stochastic, or
column-stochastic), checked once when it is built.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from powergossip import kernels, topologies
from powergossip.compressors import matrix_shape
from powergossip.errors import SettingError, require  # noqa: F401 (SettingError: for the methods' modules)
from powergossip.per_worker import add_matmul_per_worker_, matmul_per_worker, sum_into_workers  # noqa: F401 (the methods' helpers)

# Purposes that keep the random streams of different uses apart (see compressors.WorkerRandom).
COMPRESSOR_STREAM, MONIQUA_STREAM, POWERSGD_STREAM = 1, 2, 3
FUSED = "fused GPU kernels"  # a method's backend when its kernels run (else "torch path: <why>")
_ANNOUNCED: set[str] = set()  # the backend lines this process has printed


@dataclass(kw_only=True)
class GossipConfig:
    """The setting every gossip method takes; each method's config adds its own fields."""

    diffusion_rate: float = 1.0  # gamma, the consensus step: 1 is plain averaging; compressed methods need it smaller (tuned)

    def __post_init__(self):
        require(self.diffusion_rate > 0, "diffusion_rate", f"must be > 0, got {self.diffusion_rate}")


def own_config(method_class) -> type | None:
    """The settings dataclass `method_class` declares in its own body (not one it inherits)."""
    return vars(method_class).get("config_class")


def configured(config_class: type, config, settings: dict):
    """A method's config: `config` as given, or built from keyword `settings` (never both)."""
    if config is None:
        return config_class(**settings)
    if settings or not isinstance(config, config_class):
        raise TypeError(f"give a {config_class.__name__} or its settings as keywords, not "
                        f"{type(config).__name__ if not settings else 'both'} (e.g. diffusion_rate=0.5, not a positional 0.5)")
    return config


def kernel_problem(*stack_lists) -> str | None:
    """Why the fused kernels cannot run on these stacks (None: they can)."""
    if not kernels.available(*stack_lists):
        return "not float32 stacks on a GPU with Triton"
    if stack_lists and stack_lists[0] and stack_lists[0][0].shape[0] > kernels.MAX_ROWS:
        return f"more than {kernels.MAX_ROWS} local workers"
    return None


def edge_seed(seed: int, i: int, j: int, since: int = 0) -> int:
    """A 63-bit seed shared by the two ends of edge {i, j}; distinct for distinct
    (seed, min(i, j), max(i, j)) (unlike string concatenation: 1,12 vs 11,2). `since` > 0:
    the edge's state starts at that round (a graph over time), a stream of its own."""
    return _ordered_edge_seed(seed, min(i, j), max(i, j), since)


@functools.lru_cache(maxsize=4096)  # the edge's other end, when in the same process, asks next (SeedSequence is slow)
def _ordered_edge_seed(seed: int, a: int, b: int, since: int) -> int:
    return int(np.random.SeedSequence([seed, a, b] + ([since] if since else [])).generate_state(1, np.uint64)[0] >> 1)


def orthogonalize_(matrices: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Gram-Schmidt on the columns of a batch `[..., m, r]`, in place, in float32.
    The eps keeps a zero column at zero instead of producing NaN."""
    for c in range(matrices.shape[-1]):
        column = matrices[..., c:c + 1]
        column /= column.norm(dim=-2, keepdim=True) + eps
        if c + 1 < matrices.shape[-1]:
            rest = matrices[..., c + 1:]
            rest -= (column * rest).sum(dim=-2, keepdim=True) * column
    return matrices


def to_worker_slots(edges, per_edge: torch.Tensor) -> torch.Tensor:
    """`[H, ..., c]` half-edge rows -> `[L, ..., max_degree * c]`: each worker's half-edges
    side by side in the last dimension (slot order), zeros in unused slots. With it a
    worker's sum over its half-edges of a_h b_h^T is one matrix product A_l B_l^T."""
    H, *middle, c = per_edge.shape
    num_workers = edges.incoming.shape[0]
    if edges.same_degree:  # half-edge h = l * degree + slot already: no empty slots to fill
        slots = per_edge.reshape(num_workers, edges.max_degree, *middle, c)
    else:
        slots = per_edge.new_zeros((num_workers, edges.max_degree, *middle, c))
        slots[edges.local_sender, edges.slot] = per_edge
    return slots.movedim(1, -2).reshape(num_workers, *middle, edges.max_degree * c)


def from_worker_slots(edges, slots: torch.Tensor) -> torch.Tensor:
    """The inverse of to_worker_slots: `[L, ..., max_degree * c]` -> `[H, ..., c]`."""
    num_workers, *middle, width = slots.shape
    by_slot = slots.reshape(num_workers, *middle, edges.max_degree, width // edges.max_degree).movedim(-2, 1)
    return by_slot[edges.local_sender, edges.slot]


def matrix_view(stack: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """A `[L, ...]` parameter stack as `[L, m, n]` matrices, sharing its memory (PowerGossip
    writes through it)."""
    return stack.view(stack.shape[0], m, n)


def check_layout(comm, stacks: list[torch.Tensor]) -> None:
    """ValueError (saying what was expected and how to launch) unless every tensor is stacked
    over this process's workers, `[L, *shape]`."""
    for stack in stacks:
        if stack.shape[0] != comm.num_local:
            raise ValueError(comm.layout_problem(stack.shape[0]))


def matrix_groups(stacks: list[torch.Tensor], rank: int, keep=lambda shape: True) -> list[tuple[list[int], int, int, int]]:
    """[(indices, m, n, r)]: the stacks whose per-worker shape `keep` accepts, grouped by their
    matrix view and rank (compressors.matrix_shape), so that same-shape matrices are batched."""
    shapes: dict[tuple[int, int, int], list[int]] = {}
    for k, stack in enumerate(stacks):
        if keep(stack.shape[1:]):
            shapes.setdefault(matrix_shape(stack.shape[1:], rank), []).append(k)
    return [(indices, m, n, r) for (m, n, r), indices in shapes.items()]


class EdgeRows:
    """Which row of a per-edge state stack belongs to which local half-edge (i -> j), kept
    across the rounds the edge is absent: an edge of one_peer_hypercube comes back every
    log2(n) rounds and continues where it stopped (PowerGossip's P and Q, push-sum's running
    sums under lost messages).

    A row is freed once its edge has been absent for more than `memory` consecutive rounds
    (None: never), so that a graph whose edges rarely repeat (random_matching) holds at most
    (memory + 1) x (half-edges per round) rows in use instead of growing toward all n(n-1)
    half-edges (the stack keeps at most one round's more, freed rows waiting for reuse).
    Both ends of an edge see the same rounds, so they free and re-create its state together.
    """

    def __init__(self, memory: int | None):
        self.memory = memory
        self.row_of: dict[tuple[int, int], int] = {}
        self.edge_of_row: list[tuple[int, int] | None] = []
        self.last_seen = np.zeros(0, dtype=np.int64)  # round each row's edge was last present
        self.free: list[int] = []
        self._previous = (None, None)  # the last round's `pairs` object and its rows

    def assign(self, pairs: list[tuple[int, int]], round: int) -> tuple[np.ndarray, list[int], list[int]]:
        """The rows of this round's half-edges `pairs`, the positions (in `pairs`) of those whose
        state starts now, and the rows freed now. Freed rows are reused before the stack grows."""
        if pairs is self._previous[0]:  # the round before's half-edges (a static graph): its rows, none fresh
            rows, fresh = self._previous[1], []
        else:
            rows, fresh = [], []
            for position, pair in enumerate(pairs):
                row = self.row_of.get(pair)
                if row is None:
                    row = self.free.pop() if self.free else len(self.edge_of_row)
                    if row == len(self.edge_of_row):
                        self.edge_of_row.append(None)
                    self.row_of[pair], self.edge_of_row[row] = row, pair
                    fresh.append(position)
                rows.append(row)
            rows = np.array(rows, dtype=np.int64)
            self.last_seen = np.concatenate([self.last_seen, np.zeros(len(self.edge_of_row) - len(self.last_seen), np.int64)])
            self._previous = (pairs, rows)
        self.last_seen[rows] = round
        freed = []
        if self.memory is not None:  # absent for more than `memory` rounds, this one included
            stale = self.last_seen < round - self.memory
            freed = np.flatnonzero(stale).tolist()
            for row in freed:
                del self.row_of[self.edge_of_row[row]]
                self.edge_of_row[row] = None
            self.last_seen[stale] = np.iinfo(np.int64).max  # a free row is never stale again
            self.free = sorted(self.free + freed, reverse=True)  # the smallest free row is taken first
        return rows, fresh, freed

    def state_dict(self) -> dict:  # plain lists and a tensor: checkpoints load with weights_only=True
        return {"edge_of_row": [None if e is None else list(e) for e in self.edge_of_row],
                "last_seen": torch.from_numpy(self.last_seen.copy()), "free": list(self.free)}

    def load_state_dict(self, state: dict) -> None:
        self.edge_of_row = [None if e is None else tuple(e) for e in state["edge_of_row"]]
        self.row_of = {edge: row for row, edge in enumerate(self.edge_of_row) if edge is not None}
        self.last_seen, self.free = state["last_seen"].numpy().astype(np.int64), list(state["free"])
        self._previous = (None, None)


class Method:
    """Interface of every method (gossip or not). `step(params)` runs one round in place;
    bytes are counted by `comm`.

    `graph_needs` (a key of topologies.REQUIREMENTS, or None for any graph) is what the
    method needs of every round's graph; the constructor refuses a topology that does not
    give it, naming the graphs that would. Methods that exchange along both directions of
    an edge and rely on equal weights (the default) need "symmetric"."""

    graph_needs: str | None = "symmetric"
    # Methods that use _senders_in_process mix their workers' own values when a round's messages
    # all stay in this process; False (settable per instance): always use what the exchange
    # hands back, as across processes (the tests compare the two).
    in_process_mixing = True
    # Methods with fused kernels (kernels.py) run their round in a few passes over the model on a
    # CUDA device (Choco, DeepSqueeze and Moniqua when the round's messages all stay in this process;
    # PowerGossip's half-steps also across processes); False (settable per instance): the torch path.
    fused_kernels = True

    # A class whose constructor takes (comm, topology, config) declares its settings dataclass here, in
    # its own body (a subclass with a keyword constructor does not inherit it: its signature speaks).
    config_class: type | None = None
    backend: str | None = None  # FUSED or "torch path: <why>", chosen once, at the first step (_use_fused)
    asynchronous = False  # True: no rounds; `pair(params, worker, partner)` at each event (powergossip/asynchronous.py)

    def __init__(self, comm, topology, diffusion_rate: float = 1.0):
        GossipConfig(diffusion_rate=diffusion_rate)  # its check
        if self.graph_needs is not None:
            topologies.check_requirement(topology, self.graph_needs, type(self).__name__)
        self.comm, self.topology, self.diffusion_rate = comm, topology, float(diffusion_rate)
        self.round = 0  # gossip rounds done: round t gossips on topology.at(t)
        self._layout = None  # the fused kernels' kernels.Layout of the parameters, once they ran

    def step(self, params: list[torch.Tensor]) -> None:
        raise NotImplementedError

    def next_graph(self):
        """The graph of this round, topology.at(round), and one more round counted (once per step)."""
        graph = self.topology.at(self.round)
        self.round += 1
        return graph

    @property
    def faults(self):
        """The run's faults.Faults (its topology is a faults.FaultyTopology), or None."""
        return getattr(self.topology, "faults", None)

    def loses_messages(self) -> bool:
        """Whether this run's messages may be lost one way (faults.py's message_loss_probability)."""
        return self.faults is not None and bool(self.faults.settings.message_loss_probability)

    def present_rows(self, round: int):
        """Who is there at `round` (faults.py's absences): over all workers (None without faults:
        Communicator.all_reduce_mean's `present`), and this process's rows of those (all rows)."""
        if self.faults is None:
            return None, slice(None)
        present = ~self.faults.away(round)
        return present, self.local_part(present)

    def local_part(self, per_worker: np.ndarray) -> torch.Tensor:
        """This process's rows of `per_worker` (one value per worker of the job), on its device."""
        return torch.as_tensor(per_worker[self.comm.first_worker:self.comm.first_worker + self.comm.num_local],
                               device=self.comm.device)

    def _fault_rule_in_torch(self) -> bool:
        """Whether this run's faults call for a rule the fused kernels do not have: messages lost one
        way (a cut link is a graph over time, which they mix with)."""
        return self.loses_messages()

    def arrived(self, edges, both_ways: bool = False) -> torch.Tensor | None:
        """Per local half-edge of this round's graph (the one next_graph gave last), whether the
        message from its neighbour arrived (`both_ways`: and the one to it, which the sender
        learns from the simulator, for a rule where both ends skip): None when no message is
        lost (faults.py's message_loss_probability), else booleans on the device. Counts the
        messages this process's workers sent that were lost (Communicator.messages_lost): call
        it once per exchange."""
        if not self.loses_messages():
            return None
        lost = self.faults.lost(self.round - 1)  # [sender, receiver]
        senders, neighbors = edges.on_host
        outgoing_lost = lost[senders, neighbors]
        self.comm.count_lost(edges, outgoing_lost)
        arrived = ~lost[neighbors, senders] & (~outgoing_lost if both_ways else True)
        return torch.as_tensor(arrived, device=edges.incoming.device)

    def start(self, params: list[torch.Tensor]) -> None:
        """x^0: the parameters before the first local step, for a method registered to take the
        local step first that needs them (RelaySum's fill-in, the x^t of D² and gradient
        tracking's u^t). TrainingStep calls it once, before its first local step; a method whose
        state was loaded from a checkpoint keeps that state. Default: nothing."""

    def step_size_scale(self):
        """Factor on the local step's learning rate, per local worker or one number (push-sum: 1 / w)."""
        return 1.0

    def prepare(self, stacks: list[torch.Tensor]) -> None:
        """Builds the state that depends on the stacks it acts on (`[L, *shape]`), as its first
        round does, without sending anything. After it, state_dict() has the form a save of a
        run on such stacks has: a resume checks a loaded state against it (train.py). A method
        whose state does not depend on the stacks has nothing to build."""

    def working_copies(self, degree: float, shapes: list[tuple[int, ...]]) -> float:
        """About how many tensors the size of its workers' parameters (each worker's of `shapes`)
        this method holds beside them during a round, with `degree` half-edges per local worker:
        its state, what the round receives and its update's temporaries (measured on the CPU's
        torch path). A run budgets memory with it before any work (gossip_run.check_memory). A
        method that does not say is budgeted a full message from every neighbour and two copies
        more (per_worker.sum_into_workers' sum and the one slot's terms it adds)."""
        return degree + 2.0

    def state_dict(self) -> dict:
        return {"round": self.round}

    def load_state_dict(self, state: dict) -> None:
        self.round = state.get("round", 0)

    def _senders_in_process(self, graph) -> torch.Tensor | None:
        """Per local half-edge, the local worker whose per-worker message it receives, when every
        message of the round stays in this process (and in_process_mixing); else None."""
        return self.comm.senders_in_process(graph) if self.in_process_mixing else None

    def _use_fused(self, why_not: str | None) -> bool:
        """Whether this method runs its fused kernels: decided once, at its first step, from
        `why_not` (None: they can run; else the reason for the torch path), and said in one
        line of the run's log on process 0."""
        if self.backend is None:
            if not self.fused_kernels:
                why_not = "fused_kernels=False"
            self.backend = FUSED if why_not is None else f"torch path: {why_not}"
            line = f"{type(self).__name__}: {self.backend}"
            if self.comm.process_index == 0 and self.comm.local_workers and line not in _ANNOUNCED:
                _ANNOUNCED.add(line)  # once per process: a consensus sweep builds the method anew per setting
                print(line, flush=True)
        return self.backend == FUSED

    def _on_torch_path(self) -> bool:
        """The backend is decided, and it is torch: a round need not ask again."""
        return self.backend is not None and self.backend != FUSED

    def _kernel_layout(self, senders, params, *states) -> kernels.Layout | None:
        """The flat layout the fused kernels use for `params`, when this round runs them: the
        backend is FUSED (parameters and states float32 on a GPU with Triton, at most
        kernels.MAX_ROWS rows) and every message of the round stays in the process (`senders`)."""
        if self._on_torch_path():
            return None
        why_not = ("in_process_mixing=False" if not self.in_process_mixing else "a round's messages leave the process"
                   if senders is None else "faults (faults.py: the rule for what does not arrive runs in torch)"
                   if self._fault_rule_in_torch() else kernel_problem(params, *states))
        if not self._use_fused(why_not) or why_not is not None:  # decided at the first step; a later round that
            return None  # sends across processes (a graph over time) takes the torch path
        layout = self._layout
        if layout is None or layout.shapes != [p.shape for p in params]:
            layout = self._layout = kernels.Layout(params)
        return layout


GossipAlgorithm = Method  # the name before the methods that do not gossip (all-reduce, PowerSGD) shared the base
