"""Under mpirun: join the process group, run a collective, then report this process's own
listening TCP sockets and whether a connection to each from a non-loopback address of the
machine is refused. Prints one JSON line per rank (Linux only: reads /proc)."""
import fcntl
import ipaddress
import json
import os
import socket
import struct
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from powergossip import comm as comm_module  # noqa: E402
from powergossip import launch  # noqa: E402

LISTEN = "0A"  # TCP state in /proc/net/tcp*
SIOCGIFADDR = 0x8915


def listening_addresses() -> list[tuple[str, int]]:
    """(address, port) of every socket this process listens on, from its fds and /proc/self/net."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[len("socket:["):-1])
    found = []
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in open(table).read().splitlines()[1:]:
            fields = line.split()
            if fields[3] == LISTEN and fields[9] in inodes:
                address, port = fields[1].split(":")
                found.append((_address(address), int(port, 16)))
    return found


def _address(hex_address: str) -> str:
    """/proc/net/tcp* writes each 32-bit word of an address in host (little-endian) order."""
    raw = bytes.fromhex(hex_address)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(raw))


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback


def non_loopback_ipv4() -> str | None:
    """An IPv4 address of one of this machine's interfaces other than loopback, if any."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(probe.fileno(), SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on this interface
                continue
            address = socket.inet_ntoa(raw[20:24])
            if not ipaddress.ip_address(address).is_loopback:
                return address
    return None


def connect_outcome(address: str, port: int) -> str:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
        client.settimeout(5)
        client.bind((address, 0))
        try:
            client.connect((address, port))
        except ConnectionRefusedError:
            return "refused"
        except OSError as error:
            return f"error: {error}"
        return "accepted"


def main():
    comm = comm_module.Communicator(2 * launch.init_distributed("cpu").world_size, "cpu")
    (mean,) = comm.all_reduce_mean([torch.ones(comm.num_local, 1)])
    assert mean.item() == 1.0
    listening = listening_addresses()
    external = non_loopback_ipv4()
    probes = {port: connect_outcome(external, port) for _, port in listening} if external else {}
    comm.barrier()  # every rank probed while the others' listeners were still up
    print(json.dumps({"rank": comm.rank, "listening": listening, "external": external,
                      "probes": probes}), flush=True)


if __name__ == "__main__":
    main()
