"""Communication layer: which worker lives where, messages along edges, byte counts.

The stacked-local-workers contract (docs/design.md): a process hosts a contiguous
block of L >= 1 workers, and every message lives on a *half-edge* (i -> j), worker
i's end of edge {i, j}. An algorithm hands `exchange` one message per local
half-edge (or one per local worker, sent to all its neighbours) and gets back,
for every local half-edge, the message its partner (j -> i) produced: from memory
when j is local, over `torch.distributed` point-to-point otherwise, with one packed
byte buffer per peer process. What each worker sends is counted exactly, in bytes.

How the processes join the job (mpirun, torchrun, one process) is launch.py's; which
half-edges a round has, with their weights and slots, is plan.py's (`half_edges`).
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from powergossip.launch import pick_device
from powergossip.plan import HalfEdges

# Older spellings: the launch helpers lived here before launch.py, and users and the README called
# them comm.<name>. Re-exported for them (imports only, no logic; init_distributed is also used below).
from powergossip.launch import init_distributed, launched_by_mpirun, mpirun_command, mpirun_environment  # noqa: F401

# Communication plans kept per Communicator, one per graph (a periodic graph's phases all stay).
PLANS_KEPT = 32


class Communicator:
    """Moves messages between the `n_workers` workers of a job; counts what they send.

    Every process builds one with the same `n_workers`. This process hosts workers
    `first_worker .. first_worker + num_local - 1`. Counters are per local worker,
    cumulative: `bytes_sent[l]` and `messages_sent[l]` (one message = one payload to
    one neighbour in one round, or one all-reduce participation).
    """

    def __init__(self, n_workers: int, device: str | torch.device = "auto"):
        if isinstance(device, torch.device):
            device = str(device)
        context = init_distributed(device)
        if n_workers < 1:
            raise ValueError(f"n_workers must be >= 1, got {n_workers}")
        if n_workers % context.world_size != 0:
            raise ValueError(
                f"n_workers={n_workers} is not divisible by the number of processes ({context.world_size}); "
                f"every process hosts the same number of workers: pick n_workers as a multiple of "
                f"{context.world_size} or start {_divisors_hint(n_workers)} processes")
        self.context = context
        self.n_workers = n_workers
        self.process_index, self.world_size = context.process_index, context.world_size
        # The process joined the job with one device; a later Communicator in the same process
        # may hold its workers elsewhere (CPU after a GPU run): its tensors live there.
        self.device = context.device if device in ("auto", str(context.device)) else \
            pick_device(device, context.index_on_host, 1)
        if context.backend == "nccl" and self.device.type != "cuda":
            raise ValueError(f"this job's processes talk through NCCL, which moves GPU tensors only; device={device!r} "
                             f"is not a GPU")
        self.num_local = n_workers // context.world_size
        self.first_worker = context.process_index * self.num_local
        self.local_workers = range(self.first_worker, self.first_worker + self.num_local)
        self.bytes_sent = np.zeros(self.num_local, dtype=np.int64)
        self.messages_sent = np.zeros(self.num_local, dtype=np.int64)
        self.messages_lost = np.zeros(self.num_local, dtype=np.int64)  # sent (and counted) but lost (faults.py)
        # while a simulated clock times the run (clock.RunClock): what this process's workers sent since the
        # clock last read it, one entry per counted exchange or all-reduce: (senders, receivers or None, bits)
        self.log = None
        self._plans: dict[int, tuple] = {}  # id(topology) -> (topology, HalfEdges, _Routes), latest used last
        # Gloo moves CPU tensors only: GPU tensors are staged through the host.
        staged = context.backend == "gloo" and self.device.type == "cuda"
        self._wire_device = torch.device("cpu") if staged else self.device

    # --- who lives where -------------------------------------------------------
    @property
    def rank(self) -> int:
        """This process's index under torch.distributed's name (kept for users' scripts and the
        drop-ins; the code says `process_index`)."""
        return self.process_index

    def process_of(self, worker: int) -> int:
        return worker // self.num_local

    def is_local(self, worker: int) -> bool:
        return self.first_worker <= worker < self.first_worker + self.num_local

    def half_edges(self, topology) -> HalfEdges:
        """Local half-edges of `topology`, one round's graph (built once per graph object)."""
        return self._plan(topology)[0]

    def _plan(self, topology) -> tuple[HalfEdges, _Routes]:
        """The plan of one round's graph, built once per graph object and kept for the PLANS_KEPT
        latest (every phase of a periodic graph; a random graph's rounds pass through)."""
        plan = self._plans.pop(id(topology), None)
        if plan is None:
            if not topology.is_static:
                raise ValueError(f"{topology.name} changes from round to round: exchange along the graph of the "
                                 f"round, topology.at(t) (GossipAlgorithm.next_graph() counts the rounds)")
            if topology.n_workers != self.n_workers:
                raise ValueError(f"topology has {topology.n_workers} workers, the job {self.n_workers}")
            edges = HalfEdges(topology, self.first_worker, self.num_local, self.device)
            plan = (topology, edges, _Routes(edges, self))
        self._plans[id(topology)] = plan  # the plan holds the topology: its id stays its own while kept
        if len(self._plans) > PLANS_KEPT:
            del self._plans[next(iter(self._plans))]
        return plan[1], plan[2]

    # --- point-to-point ----------------------------------------------------------
    def exchange(self, topology, payloads: list[torch.Tensor], per: str = "half_edge") -> list[torch.Tensor]:
        """Deliver every local half-edge's partner message (Algorithm steps "send ... receive").

        `payloads`: tensors stacked over local half-edges `[H, ...]` (per="half_edge"),
        or over local workers `[L, ...]` (per="worker": the same message goes to every
        neighbour). Returns, for each payload, a tensor `[H, ...]` whose row h is the
        row that the partner of half-edge h produced (zeros where the partner does not
        send to us). Any dtype; all payloads travel in one packed buffer per peer process.
        """
        edges, routes = self._plan(topology)
        if per not in ("half_edge", "worker"):
            raise ValueError(f"per must be 'half_edge' or 'worker', got {per!r}")
        rows_expected = edges.num if per == "half_edge" else self.num_local
        for payload in payloads:
            if payload.shape[0] != rows_expected:
                raise ValueError(self.layout_problem(payload.shape[0]) if per == "worker" else
                                 f"a message has {payload.shape[0]} rows, expected one per local half-edge ({edges.num})")
        row_of_half_edge = routes.identity if per == "half_edge" else edges.local_sender

        bytes_per_message = message_bytes(payloads)
        np.add.at(self.bytes_sent, routes.sending_worker, bytes_per_message)
        np.add.at(self.messages_sent, routes.sending_worker, 1)
        if self.log is not None:
            senders, neighbors = edges.on_host
            self.log.append((senders[edges.sends], neighbors[edges.sends], 8 * bytes_per_message))

        source_rows = routes.local_sources if per == "half_edge" else routes.local_source_workers
        if routes.all_local:  # one gather per payload, nothing to zero or scatter
            return [payload[source_rows] for payload in payloads]
        received = [torch.zeros((edges.num,) + tuple(p.shape[1:]), dtype=p.dtype, device=p.device) for p in payloads]
        if routes.local_targets.numel():
            for out, payload in zip(received, payloads):
                out[routes.local_targets] = payload[source_rows]
        if routes.peers:
            self._exchange_remote(routes, row_of_half_edge, payloads, received)
        return received

    def skip_exchange(self) -> None:
        """An exchange of the round that this process's workers take no part in (no edge of theirs
        in it), while other processes' may: logged as one without messages, so that every process's
        log holds the round's exchanges in the same order (clock.RunClock pairs them by position)."""
        if self.log is not None:
            self.log.append((np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64), 0))

    def count_lost(self, edges, lost: np.ndarray) -> None:
        """Count the messages of this round's local half-edges `edges` that `lost` (booleans, one per
        half-edge) marks lost on their way from the half-edge's worker to its neighbour."""
        np.add.at(self.messages_lost, edges.on_host[0][lost & edges.sends] - self.first_worker, 1)

    def senders_in_process(self, topology) -> torch.Tensor | None:
        """When every message of `topology`'s round stays in this process: per local half-edge h,
        the local worker row whose message `exchange(topology, payloads, per="worker")` hands to h
        (its row h is payload[senders[h]], bit for bit). None when some message crosses processes.
        With it an algorithm can mix its workers' own values instead of the `[H, ...]` copies."""
        _, routes = self._plan(topology)
        return routes.local_source_workers if routes.all_local else None

    def _exchange_remote(self, routes, row_of_half_edge, payloads, received) -> None:
        wire_device = self._wire_device
        shapes = [tuple(p.shape[1:]) for p in payloads]
        dtypes = [p.dtype for p in payloads]
        row_bytes = [_row_bytes(p) for p in payloads]
        operations, inboxes = [], []
        for peer, (send_rows, recv_rows) in routes.peers.items():
            if send_rows.numel():
                rows = row_of_half_edge[send_rows]
                packed = torch.cat([_as_bytes(p[rows]) for p in payloads], dim=1).to(wire_device)
                operations.append(dist.P2POp(dist.isend, packed.contiguous(), peer))
            if recv_rows.numel():
                inbox = torch.empty((recv_rows.numel(), sum(row_bytes)), dtype=torch.uint8, device=wire_device)
                operations.append(dist.P2POp(dist.irecv, inbox, peer))
                inboxes.append((recv_rows, inbox))
        for request in dist.batch_isend_irecv(operations):
            request.wait()
        for recv_rows, inbox in inboxes:
            inbox = inbox.to(self.device)
            for out, part, shape, dtype in zip(received, inbox.split(row_bytes, dim=1), shapes, dtypes):
                out[recv_rows] = _from_bytes(part, shape, dtype)

    # --- collectives -------------------------------------------------------------------
    def all_reduce_mean(self, stacks: list[torch.Tensor], count: bool = True, present: np.ndarray | None = None) -> list[torch.Tensor]:
        """Exact average over all workers of each `[L, ...]` stack; returns `[...]` tensors.
        `present` (booleans over all n workers, the same on every process): the average of
        those only, which alone send (a round with workers away, faults.py).

        On the CPU the sum adds the workers in their order (`_sum_in_worker_order`), the same
        float additions in every layout, so every layout gets the same bits; on a GPU, one sum
        per process and then the backend's all-reduce (the layouts agree to float rounding).
        Counted (when `count`) as the all-reduce baseline of the paper's byte counts: each worker
        sends its buffer once per call; a job of one worker sends nothing (its average is itself).
        """
        if not stacks:
            return []
        members = self.n_workers
        if present is not None:
            members = int(present.sum())
            mine = present[self.first_worker:self.first_worker + self.num_local]
            mask = torch.as_tensor(mine, device=stacks[0].device)
            stacks = [torch.where(mask.view((-1,) + (1,) * (s.dim() - 1)), s, 0) for s in stacks]  # +0 for those away
        if count and members > 1:
            sending = slice(None) if present is None else mine
            buffer_bytes = message_bytes(stacks)
            self.bytes_sent[sending] += buffer_bytes
            self.messages_sent[sending] += 1
            if self.log is not None:
                local = np.arange(self.first_worker, self.first_worker + self.num_local)
                self.log.append((local[sending], None, 8 * buffer_bytes))
        if self.device.type == "cpu":
            sums = self._sum_in_worker_order(stacks)
        else:
            sums = [s.sum(dim=0, dtype=torch.float64 if s.dtype == torch.float64 else torch.float32) for s in stacks]
            if self.world_size > 1:
                sums = self._all_reduce_sum(sums)
        return [total.div(max(members, 1)).to(s.dtype) for total, s in zip(sums, stacks)]

    def _sum_in_worker_order(self, stacks: list[torch.Tensor]) -> list[torch.Tensor]:
        """x_0 + x_1 + ... + x_{n-1} for each `[L, ...]` stack, added in that order in every layout.
        Float addition is not associative: a sum over the stack and a sum of the processes'
        partial sums group the terms differently. Across processes, each process adds up its
        1/P of the entries: an all-to-all brings it every worker's rows of that part (in worker
        order) and an all-gather shares the parts, about the bytes of a ring all-reduce."""
        accumulate = torch.float64 if any(s.dtype == torch.float64 for s in stacks) else torch.float32
        rows = torch.cat([s.reshape(self.num_local, -1).to(accumulate) for s in stacks], dim=1)  # [L, N]
        size = rows.shape[1]
        if self.world_size > 1:
            part = max(1, -(-size // self.world_size))
            padded = torch.nn.functional.pad(rows, (0, part * self.world_size - size))
            outgoing = padded.view(self.num_local, self.world_size, part).transpose(0, 1).contiguous()  # [P, L, part]
            rows = torch.empty_like(outgoing)  # process p's workers' rows of this process's part: worker order
            dist.all_to_all_single(rows, outgoing)
            rows = rows.view(self.n_workers, part)
        total = rows[0].clone()
        for row in rows[1:]:
            total += row
        if self.world_size > 1:
            parts = [torch.empty_like(total) for _ in range(self.world_size)]
            dist.all_gather(parts, total)
            total = torch.cat(parts)[:size]
        return [part.view(s.shape[1:]) for part, s in zip(total.split([s[0].numel() for s in stacks]), stacks)]

    def _all_reduce_sum(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        flat = torch.cat([t.reshape(-1) for t in tensors]).to(self._wire_device)
        dist.all_reduce(flat)
        flat = flat.to(self.device)
        return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

    def broadcast_from_worker0(self, stacks: list[torch.Tensor]) -> None:
        """Overwrite every worker's row of each `[L, ...]` stack with worker 0's (not counted)."""
        for stack in stacks:
            source = stack[0].clone()
            if self.world_size > 1:
                wire = source.to(self._wire_device)
                dist.broadcast(wire, src=0)
                source = wire.to(self.device)
            stack.copy_(source.unsqueeze(0).expand_as(stack))

    def all_gather_workers(self, stack: torch.Tensor) -> torch.Tensor:
        """All workers' rows `[n_workers, ...]` on every process (for metrics; not counted)."""
        if self.world_size == 1:
            return stack
        local = stack.contiguous().to(self._wire_device)
        parts = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(parts, local)
        return torch.cat(parts).to(self.device)

    def sum_over_processes(self, values: np.ndarray) -> np.ndarray:
        """Sum a small float64 array over processes (metrics bookkeeping; not counted)."""
        if self.world_size == 1:
            return values
        tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64))
        dist.all_reduce(tensor, group=self.context.host_group)  # on the host: waits for no GPU work
        return tensor.numpy()

    def layout_problem(self, rows: int) -> str:
        """What to say when tensors are stacked over `rows` workers but this process hosts another number."""
        last = self.first_worker + self.num_local - 1
        return (f"a tensor is stacked over {rows} workers, but this process hosts {self.num_local} of the {self.n_workers} "
                f"workers ({self.first_worker}..{last}): stack every parameter over them, [{self.num_local}, *shape]; "
                f"or, for one worker per process, launch {self.n_workers} processes (mpirun -np {self.n_workers} python ...)")

    def gather_objects(self, value) -> list:
        """Every process's `value` (small, picklable), in process order, on every process: what
        processes must agree on before they act (run folder, checkpoint to load)."""
        if self.world_size == 1:
            return [value]
        gathered = [None] * self.world_size
        dist.all_gather_object(gathered, value, group=self.context.host_group)
        return gathered

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


class _Routes:
    """How one topology's messages travel from/to this process (built once per topology)."""

    def __init__(self, edges: HalfEdges, comm: Communicator):
        device = comm.device
        n = comm.n_workers
        senders, neighbors = edges.on_host
        self.identity = torch.arange(edges.num, device=device)
        self.sending_worker = senders[edges.sends] - comm.first_worker
        # Half-edges are sorted by (i, j), so the partner (j -> i) of a local j is found by bisection.
        is_local = (neighbors >= comm.first_worker) & (neighbors < comm.first_worker + comm.num_local)
        local_targets = np.flatnonzero(is_local & edges.receives)
        local_sources = np.searchsorted(senders * n + neighbors, neighbors[local_targets] * n + senders[local_targets])
        as_long = lambda values: torch.as_tensor(values, dtype=torch.long, device=device)
        self.local_targets, self.local_sources = as_long(local_targets), as_long(local_sources)
        self.local_source_workers = edges.local_sender[self.local_sources]  # whose per-worker message each target gets
        self.all_local = np.array_equal(local_targets, np.arange(edges.num))  # every message stays in this process
        peer_of = neighbors // comm.num_local
        self.peers = {}
        for peer in np.unique(peer_of[~is_local]).tolist():
            to_peer = peer_of == peer
            sends = np.flatnonzero(to_peer & edges.sends)
            sends = sends[np.lexsort((senders[sends], neighbors[sends]))]  # ordered as the peer orders its half-edges
            self.peers[peer] = (as_long(sends), as_long(np.flatnonzero(to_peer & edges.receives)))


def message_bytes(stacks: list[torch.Tensor]) -> int:
    """Bytes of one message carrying one row of each `[R, ...]` stack (one worker's model: its
    row of every parameter stack)."""
    return sum(_row_bytes(stack) for stack in stacks)


def _row_bytes(stack: torch.Tensor) -> int:
    """Bytes in one row of a `[R, ...]` stack (what one message of it weighs on the wire)."""
    return int(np.prod(stack.shape[1:], dtype=np.int64)) * stack.element_size()


def _as_bytes(rows: torch.Tensor) -> torch.Tensor:
    """`[R, ...]` of any dtype -> `[R, bytes_per_row]` uint8, bit for bit."""
    flat = rows.reshape(rows.shape[0], -1).contiguous()
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return flat.view(torch.uint8)


def _from_bytes(raw: torch.Tensor, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bool:
        return raw.reshape((raw.shape[0],) + shape).bool()
    return raw.clone(memory_format=torch.contiguous_format).view(dtype).reshape((raw.shape[0],) + shape)  # clone: fresh, aligned storage


def _divisors_hint(n: int) -> str:
    return "a number of processes that divides n_workers (" + ", ".join(str(d) for d in range(1, n + 1) if n % d == 0) + ")"
