"""Exchange known messages along every half-edge and report what arrived where.

`python tests/exchange_runs.py TOPOLOGIES N_WORKERS OUT_DIR` (under mpirun or not; a comma-separated
list of graphs) writes `OUT_DIR/TOPOLOGY/rank{r}.json`: for each local half-edge, who it is, what arrived on it, and the
bytes and messages each local worker is counted for.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from powergossip import comm as comm_module  # noqa: E402
from powergossip import launch  # noqa: E402
from powergossip import topologies  # noqa: E402


def run(topology_name: str, n_workers: int) -> dict:
    comm = comm_module.Communicator(n_workers, "cpu")
    topology = topologies.build(topology_name, n_workers)
    edges = comm.half_edges(topology)
    i, j = edges.self_worker.float(), edges.neighbor.float()
    per_edge_floats = torch.stack([i, j, torch.full_like(i, 7.5)], dim=1)  # 12 bytes
    per_edge_codes = torch.stack([edges.self_worker * 100 + edges.neighbor, -edges.self_worker], dim=1).to(torch.int16)  # 4 bytes
    per_edge_flags = (edges.self_worker % 2 == 0).unsqueeze(1)  # 1 byte (bool)
    per_edge = comm.exchange(topology, [per_edge_floats, per_edge_codes, per_edge_flags])
    workers = torch.tensor(list(comm.local_workers))
    per_worker = comm.exchange(topology, [workers.to(torch.float64).view(-1, 1, 1).expand(-1, 2, 2).contiguous()], per="worker")  # 32 bytes
    return {
        "half_edges": list(zip(edges.self_worker_list, edges.neighbor_list)),
        "per_edge_floats": per_edge[0].tolist(), "per_edge_codes": per_edge[1].tolist(), "per_edge_flags": per_edge[2].tolist(),
        "per_worker": per_worker[0][:, 0, 0].tolist(),
        "senders_in_process": None if (senders := comm.senders_in_process(topology)) is None else senders.tolist(),
        "bytes_sent": dict(zip(comm.local_workers, comm.bytes_sent.tolist())),
        "messages_sent": dict(zip(comm.local_workers, comm.messages_sent.tolist())),
    }


if __name__ == "__main__":
    topology_names, n_workers, out_dir = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    for topology_name in topology_names.split(","):
        result = run(topology_name, n_workers)
        rank = launch.init_distributed("cpu").rank
        os.makedirs(os.path.join(out_dir, topology_name), exist_ok=True)
        with open(os.path.join(out_dir, topology_name, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
