"""Rank 1 raises (or, with the argument `freeze`, stops as a hung process would) while the
others wait for its message: the job must end, not hang (frozen: after POWERGOSSIP_TIMEOUT)."""
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from powergossip import comm as comm_module  # noqa: E402
from powergossip import launch  # noqa: E402
from powergossip import topologies  # noqa: E402

comm = comm_module.Communicator(launch.init_distributed("cpu").world_size, "cpu")
if comm.rank == 1:
    if sys.argv[1:] == ["freeze"]:
        os.kill(os.getpid(), signal.SIGSTOP)
    raise RuntimeError("worker 1 failed on purpose")
topology = topologies.build("ring", comm.n_workers)
comm.exchange(topology, [torch.zeros(comm.half_edges(topology).num, 3)])  # waits for rank 1 forever
print("unreachable: the exchange completed", flush=True)
