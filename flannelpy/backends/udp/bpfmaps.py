"""What the udp backend's BPF maps hold, as bytes: pure encoders, the diff that keeps them in
step with the peer table, and the decoding of the per-CPU counters.  No I/O here (bpfpath.py
writes the maps); the layouts mirror the structs in bpf/udp_encap.bpf.c.
"""

from __future__ import annotations

import struct
from ipaddress import IPv4Address, IPv4Network
from typing import Iterable, Mapping

# Index order of the `stats` per-CPU array (enum in udp_encap.bpf.c).
STAT_NAMES = (
    "tx_packets", "tx_bytes", "tx_to_python", "tx_dropped_expired", "tx_errors",
    "rx_packets", "rx_bytes", "rx_to_python", "rx_dropped_spoofed_source", "rx_dropped_expired",
    "rx_dropped_malformed", "rx_errors",
)


def peer_key(subnet: IPv4Network) -> bytes:
    """LPM trie key: prefix length (host order u32), then the network address (network order)."""
    return struct.pack("=I", subnet.prefixlen) + subnet.network_address.packed


def ipv4(address: IPv4Address | str) -> bytes:
    return IPv4Address(address).packed


def sender_value(subnet: IPv4Network) -> bytes:
    """struct sender: the subnet's network and mask, network order."""
    return subnet.network_address.packed + subnet.netmask.packed


def config_value(local_ip: IPv4Address, port: int, tun_ifindex: int, ext_ifindex: int) -> bytes:
    """struct config: outer source (network order), port, flannel0 and underlay ifindex."""
    return local_ip.packed + struct.pack("=III", port, tun_ifindex, ext_ifindex)


def desired_maps(subnets: Mapping[IPv4Network, str]) -> tuple[dict[bytes, bytes], dict[bytes, bytes]]:
    """(peers, senders) as the maps should hold them for these subnet -> PublicIP leases.

    A PublicIP holding more than one subnet (a changed config, rare) gets no `senders` entry:
    its datagrams go to the socket, where the Python path checks every subnet it holds."""
    peers = {peer_key(subnet): ipv4(ip) for subnet, ip in subnets.items()}
    held: dict[str, list[IPv4Network]] = {}
    for subnet, ip in subnets.items():
        held.setdefault(ip, []).append(subnet)
    senders = {ipv4(ip): sender_value(nets[0]) for ip, nets in held.items() if len(nets) == 1}
    return peers, senders


def map_changes(current: Mapping[bytes, bytes], wanted: Mapping[bytes, bytes]) -> tuple[list[tuple[bytes, bytes]], list[bytes]]:
    """(updates, deletions) turning `current` into `wanted`."""
    updates = [(k, v) for k, v in wanted.items() if current.get(k) != v]
    deletions = [k for k in current if k not in wanted]
    return updates, deletions


def sum_per_cpu(raw: bytes, ncpus: int) -> int:
    """A per-CPU u64 slot as the kernel returns it (one 8-byte value per possible CPU), summed."""
    return sum(struct.unpack_from(f"={ncpus}Q", raw))


def parse_cpu_list(text: str) -> int:
    """How many CPUs a list such as '0-3,5' (/sys/devices/system/cpu/possible) names, counting
    up to the highest (per-CPU map values have one slot per possible CPU index)."""
    highest = -1
    for part in text.strip().split(","):
        if not part:
            continue
        last = part.split("-")[-1]
        highest = max(highest, int(last))
    if highest < 0:
        raise ValueError(f"no CPUs in {text!r}")
    return highest + 1


def counters_from(values: Iterable[int]) -> dict[str, int]:
    return {f"bpf_{name}": value for name, value in zip(STAT_NAMES, values)}


# BPF counters that add to the backend's path-independent counters (what /metrics shows as
# flannel_backend_{packets,bytes,drops}); the bpf_* keys stay beside them for the split.
_INTO_TOTALS = {
    "bpf_tx_packets": "tx_packets", "bpf_tx_bytes": "tx_bytes", "bpf_tx_dropped_expired": "tx_dropped",
    "bpf_rx_packets": "rx_packets", "bpf_rx_bytes": "rx_bytes", "bpf_rx_dropped_expired": "rx_dropped",
    "bpf_rx_dropped_spoofed_source": "rx_dropped_spoofed_source",
    "bpf_rx_dropped_malformed": "rx_dropped_malformed",
}


def merged_counters(python: Mapping[str, int], bpf: Mapping[str, int]) -> dict[str, int]:
    """Totals over both paths under the Python forwarder's names, plus every bpf_* counter;
    the Python path's own share is the total minus the bpf_ part."""
    out = dict(python)
    for key, value in bpf.items():
        out[key] = value
        total = _INTO_TOTALS.get(key)
        if total is not None:
            out[total] = out.get(total, 0) + value
    return out
