"""Rank 1 raises while the others wait for its message: the job must end, not hang."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from powergossip import comm as comm_module  # noqa: E402
from powergossip import launch  # noqa: E402
from powergossip import topologies  # noqa: E402

comm = comm_module.Communicator(launch.init_distributed("cpu").world_size, "cpu")
if comm.rank == 1:
    raise RuntimeError("worker 1 failed on purpose")
topology = topologies.build("ring", comm.n_workers)
comm.exchange(topology, [torch.zeros(comm.half_edges(topology).num, 3)])  # waits for rank 1 forever
print("unreachable: the exchange completed", flush=True)
