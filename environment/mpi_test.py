"""Check a multi-process launch end to end: `mpirun -np 4 python environment/mpi_test.py`.

Every process reports its rank; then a point-to-point ring (each rank sends its rank
to the next and receives from the previous) and an all-reduce run through the
project's communication layer, on the CPU and, when there are GPUs, on this
process's GPU (NCCL when every process has its own, Gloo staging otherwise).
Prints one line per check from rank 0 and exits non-zero if anything is wrong.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from powergossip import comm as comm_module  # noqa: E402
from powergossip import launch  # noqa: E402
from powergossip import topologies  # noqa: E402


def check(device: str) -> list[str]:
    comm = comm_module.Communicator(launch.init_distributed(device).world_size, device)
    n = comm.n_workers
    failures = []
    rank_tensor = torch.tensor([[float(comm.rank)]], device=comm.device)
    # Point-to-point ring: on a unidirectional ring each rank hears one neighbour only.
    if n > 1:
        ring = topologies.build("unidirectional_ring", n)
        received = comm.exchange(ring, [rank_tensor], per="worker")[0].cpu()
        edges = comm.half_edges(ring)
        for h, neighbor in enumerate(edges.neighbor_list):
            expected = float(neighbor) if ring.weight(neighbor, comm.rank) > 0 else 0.0
            if received[h].item() != expected:
                failures.append(f"ring on {comm.device}: rank {comm.rank} got {received[h].item()} from {neighbor}")
    mean = comm.all_reduce_mean([rank_tensor])[0].item()
    if abs(mean - (n - 1) / 2) > 1e-6:
        failures.append(f"all-reduce on {comm.device}: rank {comm.rank} got mean {mean}, expected {(n - 1) / 2}")
    return failures


def main():
    context = launch.init_distributed("cuda" if torch.cuda.is_available() else "cpu")
    devices = ["cpu"] if context.backend != "nccl" else []  # a NCCL group moves GPU tensors only
    if torch.cuda.is_available():
        devices.append("cuda")
    print(f"rank {context.process_index} of {context.world_size} (index {context.index_on_host} on its host), "
          f"backend {context.backend}, device {context.device}", flush=True)
    failures = []
    for device in devices:
        failures += check(device)
    gathered = comm_module.Communicator(context.world_size, context.device).all_gather_workers(
        torch.tensor([[len(failures)]], device=context.device))
    for failure in failures:
        print("FAIL", failure, flush=True)
    if context.process_index == 0:
        total = int(gathered.sum())
        print(f"mpi_test: {context.world_size} processes, checks on {', '.join(devices)}: "
              f"{'all passed' if total == 0 else f'{total} FAILED'}", flush=True)
    sys.exit(1 if failures or int(gathered.sum()) else 0)


if __name__ == "__main__":
    main()
