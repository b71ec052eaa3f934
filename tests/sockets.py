"""Listening sockets of a set of processes, read from /proc (no psutil): for the test that every
service the suite starts listens on the loopback interface only."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path

from appserver import process_tree  # noqa: F401 - the one process-tree walk, re-exported


def _inodes(pid: int) -> set[str]:
    out = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                out.add(target[8:-1])
    except OSError:
        pass
    return out


def _address(hex_addr: str, v6: bool) -> str:
    raw = bytes.fromhex(hex_addr)
    if v6:  # four little-endian 32-bit words
        raw = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))
        return socket.inet_ntop(socket.AF_INET6, raw)
    return socket.inet_ntop(socket.AF_INET, raw[::-1])


def listening(pids) -> list[tuple[int, str, str, int]]:
    """(pid, protocol, address, port) of every TCP socket in LISTEN state and every bound UDP
    socket of ``pids``."""
    by_inode: dict[str, int] = {}
    for pid in pids:
        for inode in _inodes(pid):
            by_inode[inode] = pid
    found = []
    for proto in ("tcp", "tcp6", "udp", "udp6"):
        path = Path(f"/proc/net/{proto}")
        if not path.exists():
            continue
        for line in path.read_text().splitlines()[1:]:
            cols = line.split()
            local, state, inode = cols[1], cols[3], cols[9]
            if inode not in by_inode:
                continue
            if proto.startswith("tcp") and state != "0A":  # 0A: LISTEN
                continue
            host, port = local.split(":")
            found.append((by_inode[inode], proto, _address(host, proto.endswith("6")),
                          int(port, 16)))
    return found


def not_loopback(sockets) -> list[tuple[int, str, str, int]]:
    """Those of ``sockets`` reachable from beyond this machine (any address but 127.0.0.0/8 and
    ::1; the wildcard 0.0.0.0 and :: included)."""
    def loopback(text: str) -> bool:
        ip = ipaddress.ip_address(text)
        mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is IPv4's loopback
        return (mapped or ip).is_loopback

    return [s for s in sockets if not loopback(s[2])]
