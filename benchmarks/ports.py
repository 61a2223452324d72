"""Ports for the local servers that tests and benchmarks start (Prefect, PostgreSQL, a
webhook listener), chosen before the server binds them."""

from __future__ import annotations

import random
import socket
from pathlib import Path


def free_port() -> int:
    """A port for a server that binds it later, below the kernel's ephemeral range.

    A port the kernel hands out (``bind`` to 0) is free only until the server binds it,
    and any outgoing connection of the busy suite may take it as its local port meanwhile
    ("Port 43857 is already in use", seen at a pool's start). Outgoing connections take
    their ports from the ephemeral range only, so a free port below it stays ours unless
    another server picks the same one of some ten thousand at the same moment.
    """
    low = _ephemeral_low()
    candidates = list(range(max(low - 12_000, 1_024), low))
    for port in random.sample(candidates, 200):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError(f"no free port found below the ephemeral range (from {low})")


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768  # Linux's default
